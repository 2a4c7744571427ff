"""Segments of the pool heaps and the busy page ranges their descriptor arrays describe."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

from ..kernel import MASK64, FieldLayout, Kernel, per_kernel
from ..model import Backing, Finding
from .decoders import RANGE_ALLOCATED, RANGE_FIRST, RangeKind, classify_range, segment_context_of, PAGE_SEGMENT_KEY
from .heaps import PoolHeap, heap_keys, pool_heaps
from .layout import SYMBOLS_MISSING, reports_missing_symbols
from .reads import read_bytes, read_field, read_pointer

DESCRIPTOR_SIGNATURE = 0xCCDDCCDD  # _HEAP_PAGE_RANGE_DESCRIPTOR.TreeSignature of a busy range
MAX_SEGMENTS = 1 << 16  # per segment context (64 GiB of 1 MiB segments): a bound, not a Windows limit
MAX_RANGE_HOPS = 4  # UnitOffset links followed back to the first descriptor of a range
SIGNATURE_MISMATCH = "_HEAP_PAGE_SEGMENT signature does not name its context"


@dataclass(frozen=True)
class SegContext:
    """One ``_SEGMENT_HEAP.SegContexts[k]``: how its segments are sized and cut into units."""

    address: int
    heap: PoolHeap
    index: int
    segment_mask: int
    unit_shift: int
    first_descriptor_index: int
    max_allocation_size: int = 0  # largest request in bytes its segments serve

    @property
    def segment_size(self) -> int:
        return (~self.segment_mask & MASK64) + 1

    def starts_segment(self, address: int) -> bool:
        """Whether ``address`` lies on one of this context's segment boundaries (its SegmentMask clears nothing)."""
        return not address & ~self.segment_mask & MASK64


@dataclass(frozen=True)
class Segment:
    address: int
    context: SegContext

    @property
    def size(self) -> int:
        return self.context.segment_size


@dataclass(frozen=True)
class PageRange:
    """A busy page range: a VS or LFH subsegment, or one block allocated as a whole."""

    address: int
    size: int
    kind: RangeKind
    descriptor_index: int
    flags: int
    segment: Segment


def seg_contexts(kernel: Kernel, heap: PoolHeap) -> list[SegContext | Finding]:
    """The heap's ``SegContexts[]``: segment size (mask), unit size (shift) and first usable descriptor."""
    try:
        return _seg_contexts(kernel, heap)
    except SYMBOLS_MISSING as error:
        return [Finding(heap.address, f"segment contexts: kernel symbols lack {error}")]


def _seg_contexts(kernel: Kernel, heap: PoolHeap) -> list[SegContext | Finding]:
    heap_type, ctx_type = "_SEGMENT_HEAP", "_HEAP_SEG_CONTEXT"
    first = heap.address + kernel.field_offset(heap_type, "SegContexts")
    size = kernel.type_size(ctx_type)
    out: list[SegContext | Finding] = []
    for index in range(kernel.array_count(heap_type, "SegContexts")):
        address = first + index * size
        data = read_bytes(kernel, address, size)
        if data is None:
            out.append(Finding(address, "_HEAP_SEG_CONTEXT unreadable"))
            continue
        names = ("SegmentMask", "UnitShift", "FirstDescriptorIndex", "MaxAllocationSize")
        out.append(SegContext(address, heap, index, *(kernel.field_layout(ctx_type, name).extract(data) for name in names)))
    return out


def context_addresses(signature: int, segment: int, heap_key: int) -> tuple[int, ...]:
    """The context addresses a segment signature can name: one per key constant (the constant is zero from 26100)."""
    return tuple(segment_context_of(signature, segment, heap_key, constant) for constant in (PAGE_SEGMENT_KEY, 0))


def signature_owner(signature: int, segment: int, heap_key: int, contexts: dict[int, SegContext]) -> SegContext | None:
    """The context among ``contexts`` a segment signature names."""
    for address in context_addresses(signature, segment, heap_key):
        found = contexts.get(address)
        if found is not None:
            return found
    return None


# SegContexts[1].MaxAllocationSize of the 19H1+ kernels: the bound used when no pool heap can be read.
DEFAULT_LARGE_THRESHOLD = 0x7F0000


@per_kernel
def large_allocation_threshold(kernel: Kernel) -> int:
    """Bytes above which the pool heaps serve a request from the VA manager ("large") instead of a segment.

    The bound is the largest ``MaxAllocationSize`` of the pool heaps' segment contexts (read once per kernel).
    """
    sizes = [
        context.max_allocation_size
        for heap in pool_heaps(kernel)
        if isinstance(heap, PoolHeap)
        for context in seg_contexts(kernel, heap)
        if isinstance(context, SegContext)
    ]
    return max(sizes, default=0) or DEFAULT_LARGE_THRESHOLD


def big_backing(kernel: Kernel, size: int) -> Backing:
    """How a big page table allocation of ``size`` bytes is backed: Large on the segment heap beyond every
    segment context's reach, Big otherwise (classic pool pages, segment page ranges, page-aligned VS blocks)."""
    if kernel.uses_segment_heap and size > large_allocation_threshold(kernel):
        return Backing.LARGE
    return Backing.BIG


@reports_missing_symbols
def segments(kernel: Kernel, heap: PoolHeap, heap_key: int | None = None) -> Iterator[Segment | Finding]:
    """Segments on each ``SegContexts[k].SegmentListHead``, each checked against its signature."""
    if heap_key is None:
        keys = heap_keys(kernel)
        if isinstance(keys, Finding):
            yield keys
            return
        heap_key = keys.heap_key
    head_offset = kernel.field_offset("_HEAP_SEG_CONTEXT", "SegmentListHead.Flink")
    link_offset = kernel.field_offset("_HEAP_PAGE_SEGMENT", "ListEntry.Flink")
    for context in seg_contexts(kernel, heap):
        if isinstance(context, Finding):
            yield context
            continue
        for entry in list_members(kernel, context.address + head_offset, "segment list"):
            if isinstance(entry, Finding):
                yield entry
                continue
            segment = entry - link_offset
            signature = read_field(kernel, segment, "_HEAP_PAGE_SEGMENT", "Signature")
            if not context.starts_segment(segment):
                yield Finding(segment, "segment not aligned to its context's SegmentMask")
            elif signature is None or not signature_owner(signature, segment, heap_key, {context.address: context}):
                yield Finding(segment, SIGNATURE_MISMATCH)
            else:
                yield Segment(segment, context)


def list_members(kernel: Kernel, head: int, name: str) -> Iterator[int | Finding]:
    """The entries of the circular ``_LIST_ENTRY`` list at ``head``, each once.

    Forward by Flink; when a link is unreadable or the chain loops, the rest
    is taken backward by Blink from the head, so one unmapped or smeared
    member costs only the members whose both links pass through it.
    """
    blink = kernel.field_offset("_LIST_ENTRY", "Blink")
    seen: set[int] = set()
    for offset, direction in ((0, "forward"), (blink, "backward")):
        entry = read_pointer(kernel, head + offset)
        while entry != head:
            if entry is None or entry in seen or len(seen) >= MAX_SEGMENTS:
                break
            seen.add(entry)
            yield entry
            entry = read_pointer(kernel, entry + offset)
        else:
            return
        if direction == "forward":
            yield Finding(head, f"{name} broken going forward (a link unreadable, or a loop); "
                                f"the rest is taken backward")
        elif entry not in seen:
            yield Finding(head, f"{name} broken going backward too; members between the breaks are lost")


@dataclass(frozen=True)
class Descriptors:
    """The raw descriptor array of one segment, with field positions from the ISF."""

    data: bytes
    size: int
    flags: FieldLayout
    unit_size: FieldLayout
    unit_offset: FieldLayout
    signature: FieldLayout

    def entry(self, index: int) -> tuple[int, int, int, int]:
        """(RangeFlags, UnitSize, UnitOffset, TreeSignature) of descriptor ``index``."""
        flags, unit_sizes, unit_offsets, signatures = self._columns
        return flags[index], unit_sizes[index], unit_offsets[index], signatures[index]

    @cached_property
    def _columns(self) -> tuple[list[int], ...]:
        """Every descriptor's fields, decoded at once: a walk looks at most of them, some twice."""
        count = len(self.data) // self.size
        return tuple(field.column(self.data, count, self.size).tolist()
                     for field in (self.flags, self.unit_size, self.unit_offset, self.signature))


def read_descriptors(kernel: Kernel, segment: Segment) -> Descriptors | Finding:
    desc_type = "_HEAP_PAGE_RANGE_DESCRIPTOR"
    count = kernel.array_count("_HEAP_PAGE_SEGMENT", "DescArray")
    size = kernel.type_size(desc_type)
    start = segment.address + kernel.field_offset("_HEAP_PAGE_SEGMENT", "DescArray")
    data = read_bytes(kernel, start, count * size)
    if data is None:
        return Finding(start, "page range descriptors unreadable")
    return Descriptors(
        data,
        size,
        kernel.field_layout(desc_type, "RangeFlags"),
        kernel.field_layout(desc_type, "UnitSize"),
        kernel.field_layout(desc_type, "UnitOffset"),
        kernel.field_layout(desc_type, "TreeSignature"),
    )


def _range_at(segment: Segment, descriptors: Descriptors, index: int) -> PageRange | Finding | None:
    flags, unit_size, _, signature = descriptors.entry(index)
    kind = classify_range(flags)
    if kind is None:
        return None
    address = segment.address + (index << segment.context.unit_shift)
    if signature != DESCRIPTOR_SIGNATURE or unit_size == 0:
        return Finding(address, f"page range descriptor {index} damaged (signature {signature:#x}, units {unit_size})")
    return PageRange(address, unit_size << segment.context.unit_shift, kind, index, flags, segment)


@reports_missing_symbols
def page_ranges(kernel: Kernel, segment: Segment) -> Iterator[PageRange | Finding]:
    """Busy page ranges of a segment, in address order, from its descriptor array."""
    descriptors = read_descriptors(kernel, segment)
    if isinstance(descriptors, Finding):
        yield descriptors
        return
    count = len(descriptors.data) // descriptors.size
    index = segment.context.first_descriptor_index
    while index < count:
        flags, unit_size, _, _ = descriptors.entry(index)
        found = _range_at(segment, descriptors, index)
        if found is not None:
            yield found
        starts_range = flags & RANGE_FIRST and unit_size
        index += unit_size if starts_range else 1


def range_of(segment: Segment, descriptors: Descriptors, address: int) -> PageRange | Finding:
    """The busy range holding ``address``: later units point back to the first one with ``UnitOffset``."""
    index = (address - segment.address) >> segment.context.unit_shift
    if index < segment.context.first_descriptor_index:
        return Finding(address, "address is inside the segment's own descriptor pages")
    if index >= len(descriptors.data) // descriptors.size:
        return Finding(address, "address is past the segment's last descriptor")
    for _ in range(MAX_RANGE_HOPS):
        flags, _, unit_offset, _ = descriptors.entry(index)
        if not flags & RANGE_ALLOCATED:
            return Finding(address, "address is in a free page range")
        if flags & RANGE_FIRST:
            found = _range_at(segment, descriptors, index)
            if isinstance(found, PageRange) and not found.address <= address < found.address + found.size:
                return Finding(address, f"page range at {found.address:#x} ({found.size:#x} bytes) does not cover it")
            return found if found is not None else Finding(address, f"page range flags {flags:#x} not understood")
        if unit_offset == 0 or unit_offset > index:
            break
        index -= unit_offset
    return Finding(address, "page range descriptor back-links do not reach a first unit")
