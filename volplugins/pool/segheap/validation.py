"""Segments found by their own signatures, for when the lists that lead to them are unusable.

``ExPoolState`` (the pool heaps) or a heap's segment lists may be smeared, paged out or missing from the symbols.
A segment still names its owner: its ``Signature``, decoded with the heap key, is the address of the
``_HEAP_SEG_CONTEXT`` it belongs to, which lies inside a ``_SEGMENT_HEAP`` carrying the heap signature.  A
segment is taken when that chain holds, the context's bounds agree with the descriptor array (one descriptor
per unit) and its ``SegmentMask`` puts the segment on its own boundary.  Its page range descriptors, VS and LFH
headers are then checked by the walkers as for any listed segment.

Segments are aligned to their size, and the smallest has one page per descriptor: only the mapped addresses on
that boundary are read, a few bytes each.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

from volatility3.framework import exceptions

from .. import regions, spans, translate
from ..kernel import PAGE_SIZE, Kernel, per_kernel
from ..model import Finding
from .heaps import SEGMENT_HEAP_SIGNATURE, UNLISTED, PoolHeap, heap_keys, pool_heaps
from .layout import SYMBOLS_MISSING
from .reads import read_field
from .segments import SegContext, Segment, context_addresses, seg_contexts, segments

def smallest_segment(kernel: Kernel) -> int:
    """Bytes of the smallest segment: one descriptor per unit, and a unit is at least a page."""
    return kernel.array_count("_HEAP_PAGE_SEGMENT", "DescArray") * PAGE_SIZE


@per_kernel
def listed_contexts(kernel: Kernel) -> dict[int, SegContext]:
    """Every segment context of the pool heaps under ``ExPoolState``, by address."""
    contexts: dict[int, SegContext] = {}
    for heap in pool_heaps(kernel):
        if isinstance(heap, PoolHeap):
            contexts.update((c.address, c) for c in seg_contexts(kernel, heap) if isinstance(c, SegContext))
    return contexts


@dataclass(frozen=True)
class Listed:
    """What the heap lists lead to: the segments on them, and whether they lead everywhere (every heap pointer
    and signature checks, no segment list breaks)."""

    segments: frozenset[int]
    complete: bool


@per_kernel
def listed(kernel: Kernel) -> Listed:
    """Where the heap lists lead (read once per kernel): only when they do not lead everywhere are segments
    looked for by their signatures."""
    heaps = pool_heaps(kernel)
    complete = any(isinstance(heap, PoolHeap) for heap in heaps)
    keys = heap_keys(kernel)
    if isinstance(keys, Finding):
        return Listed(frozenset(), complete)  # nothing can be validated without the keys
    found: set[int] = set()
    for heap in heaps:
        if isinstance(heap, Finding):
            complete = False
            continue
        for item in segments(kernel, heap, keys.heap_key):
            if isinstance(item, Finding):
                complete = False
            else:
                found.add(item.address)
    return Listed(frozenset(found), complete)


@per_kernel
def _context_named(kernel: Kernel, address: int) -> SegContext | None:
    """The segment context at ``address``: a listed one, or one inside a heap that carries the heap signature
    and whose bounds agree with the descriptor array."""
    listed = listed_contexts(kernel)
    if address in listed:
        return listed[address]
    if address % kernel.type_size("pointer"):
        return None
    first = kernel.field_offset("_SEGMENT_HEAP", "SegContexts")
    size = kernel.type_size("_HEAP_SEG_CONTEXT")
    for index in range(kernel.array_count("_SEGMENT_HEAP", "SegContexts")):
        heap = address - first - index * size
        if read_field(kernel, heap, "_SEGMENT_HEAP", "Signature") != SEGMENT_HEAP_SIGNATURE:
            continue
        context = seg_contexts(kernel, PoolHeap(heap, "", UNLISTED, -1))[index]
        return context if isinstance(context, SegContext) and _bounds_agree(kernel, context) else None
    return None


def _bounds_agree(kernel: Kernel, context: SegContext) -> bool:
    descriptors = kernel.array_count("_HEAP_PAGE_SEGMENT", "DescArray")
    return (0 <= context.unit_shift < 64 and context.segment_size == descriptors << context.unit_shift
            and context.first_descriptor_index < descriptors)


def validated_segment(kernel: Kernel, address: int, signature: int, heap_key: int) -> Segment | None:
    """The segment at ``address`` when its signature names a context that owns it (see the module notes).

    A heap found this way takes its pool from the region the segment lies in ('' when no region is known)."""
    for context_address in context_addresses(signature, address, heap_key):
        context = _context_named(kernel, context_address)
        if context is None or not context.starts_segment(address):
            continue
        if context.heap.node == UNLISTED:
            pool = regions.classify(kernel, address).pool or ""
            context = dataclasses.replace(context, heap=dataclasses.replace(context.heap, pool=pool))
        return Segment(address, context)
    return None


@per_kernel
def validated_segments(kernel: Kernel, heap_key: int) -> tuple[Segment, ...]:
    """Every segment of the candidate spans that validates, in address order (read once per kernel)."""
    where = kernel.field_layout("_HEAP_PAGE_SEGMENT", "Signature")
    found = []
    for address, data in _segment_starts(kernel, smallest_segment(kernel), where.offset, where.size):
        segment = validated_segment(kernel, address, where.alone.extract(data), heap_key)
        if segment is not None:
            found.append(segment)
    return tuple(found)


def _segment_starts(kernel: Kernel, step: int, offset: int, size: int) -> Iterator[tuple[int, bytes]]:
    """(address, ``size`` bytes at address + ``offset``) for every mapped address on a ``step`` boundary of the
    pool spans (the rest of the kernel half when the region bookkeeping is unusable)."""
    for span in spans.with_validation(kernel):
        for start, length, mapped, _, layer_name in translate.mapping(kernel.context, kernel.layer_name,
                                                                      span.start, span.end - span.start):
            for address in range(-(-start // step) * step, start + length - offset - size + 1, step):
                try:
                    yield address, kernel.context.layers[layer_name].read(mapped + address - start + offset, size)
                except exceptions.InvalidAddressException:
                    continue


@per_kernel
def _starts(kernel: Kernel, heap_key: int) -> list[int]:
    return [segment.address for segment in validated_segments(kernel, heap_key)]


def segment_holding(kernel: Kernel, address: int) -> Segment | None:
    """The validated segment holding ``address``, when the heap lists are incomplete; None otherwise."""
    if listed(kernel).complete:
        return None
    keys = heap_keys(kernel)
    if isinstance(keys, Finding):
        return None
    try:
        found = validated_segments(kernel, keys.heap_key)
    except SYMBOLS_MISSING:
        return None
    position = bisect.bisect_right(_starts(kernel, keys.heap_key), address) - 1
    if position >= 0 and address < found[position].address + found[position].size:
        return found[position]
    return None
