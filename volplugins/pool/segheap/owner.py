"""Owner lookup on the segment heap: from any address to its segment, page range and the chunks of its page."""

from __future__ import annotations

from dataclasses import dataclass

from ..kernel import Kernel, page_base, per_kernel
from ..model import Chunk, Finding
from .chunks import Walk, whole_range
from .decoders import RangeKind
from .heaps import HeapKeys, PoolHeap, cached_free_addresses, heap_keys
from .layout import SYMBOLS_MISSING
from .lfh import lfh_walk
from .reads import read_field
from .segments import Descriptors, PageRange, Segment, range_of, read_descriptors, signature_owner
from .validation import listed, listed_contexts, segment_holding
from .vs import vs_walk


@dataclass(frozen=True)
class OwnerResult:
    """What ``!pool <address>`` shows on the segment heap: the page's chunks and the one holding the address."""

    address: int
    heap: PoolHeap | None = None
    segment: Segment | None = None
    page_range: PageRange | None = None
    chunks: tuple[Chunk, ...] = ()
    owner: Chunk | None = None
    findings: tuple[Finding, ...] = ()
    validated: bool = False  # the segment is on no heap list: found by its own signature


@per_kernel
def _masks(kernel: Kernel) -> tuple[int, ...]:
    return tuple(sorted({context.segment_mask for context in listed_contexts(kernel).values()}))


def _owning_segment(kernel: Kernel, address: int, heap_key: int) -> Segment | None:
    """The segment holding ``address`` whose signature names one of the listed contexts, else a segment found by
    its signature alone when the heap lists are incomplete."""
    contexts, masks = listed_contexts(kernel), _masks(kernel)
    for mask in masks:
        segment = address & mask
        signature = read_field(kernel, segment, "_HEAP_PAGE_SEGMENT", "Signature")
        if signature is None:
            continue
        context = signature_owner(signature, segment, heap_key, contexts)
        if context is not None and context.segment_mask == mask:
            return Segment(segment, context)
    return segment_holding(kernel, address)


@per_kernel
def _descriptors(kernel: Kernel, segment: Segment) -> Descriptors | Finding:
    """A segment's page range descriptors, kept for the next lookup in the same segment."""
    return read_descriptors(kernel, segment)


@per_kernel
def _range_walk(kernel: Kernel, page_range: PageRange, keys: HeapKeys,
                cached: frozenset[int]) -> tuple[tuple[Chunk | Finding, int, int], ...]:
    """Every item of a VS or LFH range with its extent, from one bulk read of the range: lookups of many
    addresses (an address file) mostly land in ranges an earlier one walked."""
    walk = Walk.of(kernel, page_range.segment.context.heap.pool, cached)
    data, missing = kernel.read_table(page_range.address, page_range.size)
    if not missing:
        walk.pages.preload_span(page_range.address, data)
    if page_range.kind is RangeKind.VS:
        return tuple(vs_walk(walk, page_range.address, keys.heap_key))
    return tuple((item, item.address, item.address if isinstance(item, Finding) else item.end)
                 for item in lfh_walk(walk, page_range.address, keys.lfh_key, page_range.size))


def find_owner_chunks(kernel: Kernel, address: int, cached: frozenset[int] | None = None) -> OwnerResult:
    """Segment -> page range -> the chunks listed in ``address``'s page, marking the one that holds it.

    VS: every chunk whose listed address is in the page, plus the chunk whose VS extent holds the address
    (its header may sit on an earlier page). LFH: the blocks of the page. A range allocated as a whole is one
    chunk with no header (its tag lives in the big page table). ``cached`` defaults to
    ``cached_free_addresses(kernel)``.
    """
    try:
        return _find_owner_chunks(kernel, address, cached)
    except SYMBOLS_MISSING as error:
        return OwnerResult(address, findings=(Finding(address, f"segment heap owner: kernel symbols lack {error}"),))


def _find_owner_chunks(kernel: Kernel, address: int, cached: frozenset[int] | None) -> OwnerResult:
    keys = heap_keys(kernel)
    if isinstance(keys, Finding):
        return OwnerResult(address, findings=(keys,))
    segment = _owning_segment(kernel, address, keys.heap_key)
    if segment is None:
        return OwnerResult(address, findings=(Finding(address, "not inside a pool segment heap segment"),))
    heap = segment.context.heap
    validated = segment.address not in listed(kernel).segments
    descriptors = _descriptors(kernel, segment)
    if isinstance(descriptors, Finding):
        return OwnerResult(address, heap, segment, findings=(descriptors,), validated=validated)
    page_range = range_of(segment, descriptors, address)
    if isinstance(page_range, Finding):
        return OwnerResult(address, heap, segment, findings=(page_range,), validated=validated)
    cached = cached_free_addresses(kernel) if cached is None else cached
    if page_range.kind is RangeKind.LARGE:
        owner = whole_range(Walk.of(kernel, heap.pool, cached), page_range)
        return OwnerResult(address, heap, segment, page_range, (owner,), owner, validated=validated)
    page = page_base(address)
    chunks: list[Chunk] = []
    findings: list[Finding] = []
    owner = None
    for item, start, end in _range_walk(kernel, page_range, keys, cached):
        if isinstance(item, Finding):
            findings.append(item)
            continue
        holds = start <= address < end
        if holds:
            owner = item
        if holds or page_base(item.address) == page:
            chunks.append(item)
    return OwnerResult(address, heap, segment, page_range, tuple(chunks), owner, tuple(findings), validated)
