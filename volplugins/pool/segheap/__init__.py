"""Kernel pool on the segment heap (Windows 10 19H1+ and 11): heaps, segments, page ranges, VS and LFH chunks.

The layout of every structure comes from the kernel's ISF. The pure decoders take a small ``SegHeapLayout``
record (built from an ISF dict or from a ``Kernel``) so they can be checked without an image; the walkers read
the image through ``Kernel`` and yield ``Chunk`` or ``Finding`` records.

Chain of ownership used throughout: ``ExPoolState.PoolNode[i].Heaps[j]`` -> ``_SEGMENT_HEAP`` ->
``SegContexts[k]`` -> segments (``SegmentListHead``) -> page range descriptors -> VS / LFH subsegments -> chunks.

* ``layout``: the structure layout of one kernel; ``decoders``: pure decoders of encoded words and flags;
* ``reads``: reading kernel variables and the pages of a walk;
* ``heaps``: heap keys, the pool heaps and the lookaside / delay-free lists;
* ``segments``: segments and the page ranges of their descriptor arrays;
* ``chunks``: what the chunk walks share; ``vs``, ``lfh``: the two subsegment walks;
* ``ranges``: every chunk of one page range; ``owner``: from an address to the chunks of its page;
* ``validation``: segments found by their own signatures when the heap lists do not lead to them;
* ``recognise``: whether the image's build uses signature and key constants this library knows.
"""

from .decoders import (
    RangeKind,
    VsHeader,
    classify_range,
    decode_lfh_offsets,
    decode_vs_header,
    lfh_block_allocated,
    segment_context_of,
    segment_signature_ok,
    vs_block_has_pool_header,
    vs_free_tag,
    vs_pool_header_address,
    vs_subsegment_signature_ok,
)
from .heaps import HeapKeys, PoolHeap, cached_free_addresses, heap_keys, pool_heaps
from .layout import SegHeapLayout
from .lfh import lfh_blocks
from .owner import OwnerResult, find_owner_chunks, prepare_lookups
from .ranges import range_chunks, ranges_chunks
from .recognise import layout_problem
from .segments import PageRange, SegContext, Segment, big_backing, large_allocation_threshold, page_ranges, \
    seg_contexts, segments
from .validation import listed, validated_segments
from .vs import vs_chunks

__all__ = [
    "HeapKeys", "OwnerResult", "PageRange", "PoolHeap", "RangeKind", "SegContext", "SegHeapLayout", "Segment",
    "VsHeader", "big_backing", "cached_free_addresses", "classify_range", "decode_lfh_offsets", "decode_vs_header",
    "find_owner_chunks", "heap_keys", "prepare_lookups", "large_allocation_threshold", "layout_problem",
    "lfh_block_allocated", "lfh_blocks", "listed", "validated_segments",
    "page_ranges", "pool_heaps", "range_chunks", "ranges_chunks", "seg_contexts", "segment_context_of",
    "segment_signature_ok",
    "segments", "vs_block_has_pool_header", "vs_chunks", "vs_free_tag", "vs_pool_header_address",
    "vs_subsegment_signature_ok",
]
