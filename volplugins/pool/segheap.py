"""Kernel pool on the segment heap (Windows 10 19H1+ and 11): heaps, segments, page ranges, VS and LFH chunks.

The layout of every structure comes from the kernel's ISF. The pure decoders at the top take a small
``SegHeapLayout`` record (built from an ISF dict or from a ``Kernel``) so they can be checked without an image;
the walkers below them read the image through ``Kernel`` and yield ``Chunk`` or ``Finding`` records.

Chain of ownership used throughout: ``ExPoolState.PoolNode[i].Heaps[j]`` -> ``_SEGMENT_HEAP`` ->
``SegContexts[k]`` -> segments (``SegmentListHead``) -> page range descriptors -> VS / LFH subsegments -> chunks.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
from volatility3.framework import exceptions

from volplugins.pool import poolheader
from volplugins.pool.kernel import PAGE_SIZE, FieldLayout, IsfTypes, Kernel
from volplugins.pool.model import Backing, Chunk, Finding, State, new_chunk
from volplugins.pool.poolheader import HeaderLayout, PoolHeader, Symbols

SEGMENT_HEAP_SIGNATURE = 0xDDEEDDEE
PAGE_SEGMENT_KEY = 0xA2E64EADA2E64EAD  # mixed into _HEAP_PAGE_SEGMENT.Signature; zero from build 26100
VS_SUBSEGMENT_KEY = 0x2BED  # _HEAP_VS_SUBSEGMENT.Signature ^ key == Size
DESCRIPTOR_SIGNATURE = 0xCCDDCCDD  # _HEAP_PAGE_RANGE_DESCRIPTOR.TreeSignature of a busy range

# _HEAP_PAGE_RANGE_DESCRIPTOR.RangeFlags bits: 3 = range allocated as a whole, 0xB = LFH, 0xF = VS,
# 1 = a later unit of a busy range (points back with UnitOffset), 0 / 2 = free.
RANGE_ALLOCATED = 0x1
RANGE_FIRST = 0x2
RANGE_VS = 0x4
RANGE_SUBSEGMENT = 0x8

HEAP_POOL_NAMES = ("NonPaged", "NonPagedNx", "Paged", "Paged")  # by index in PoolNode[i].Heaps / SpecialHeaps

MAX_SEGMENTS = 1 << 16  # per segment context (64 GiB of 1 MiB segments): a bound, not a Windows limit
MAX_SLIST_ENTRIES = 1 << 12  # per lookaside / delay-free list
MAX_RANGE_HOPS = 4  # UnitOffset links followed back to the first descriptor of a range

_SYMBOLS_MISSING = (KeyError, AttributeError, exceptions.SymbolError)  # the kernel's ISF lacks a type or field


def _reports_missing_symbols(walker):
    """A walker over a kernel whose ISF lacks a segment heap type yields a Finding instead of raising."""

    @functools.wraps(walker)
    def guarded(kernel, *args, **kwargs):
        try:
            yield from walker(kernel, *args, **kwargs)
        except _SYMBOLS_MISSING as error:
            yield Finding(0, f"{walker.__name__}: kernel symbols lack {error}")

    return guarded


# --------------------------------------------------------------------------- layout from the ISF


@dataclass(frozen=True)
class SegHeapLayout:
    """The bits of the segment heap and pool header the decoders need, taken from one kernel's ISF."""

    vs_header_size: int  # sizeof(_HEAP_VS_CHUNK_HEADER)
    vs_header_bits: FieldLayout  # _HEAP_VS_CHUNK_HEADER.Sizes.HeaderBits, the encoded word
    vs_memory_cost: FieldLayout  # relative to _HEAP_VS_CHUNK_HEADER_SIZE
    vs_unsafe_size: FieldLayout
    vs_unsafe_prev_size: FieldLayout
    vs_allocated: FieldLayout
    vs_subsegment_size: int  # sizeof(_HEAP_VS_SUBSEGMENT)
    vs_sub_size: FieldLayout
    vs_sub_signature: FieldLayout
    lfh_block_size: FieldLayout  # relative to _HEAP_LFH_SUBSEGMENT_ENCODED_OFFSETS
    lfh_first_block_offset: FieldLayout
    pool: HeaderLayout

    @property
    def unit(self) -> int:
        """The pool block unit: sizeof(_POOL_HEADER), 16 on x64."""
        return self.pool.size

    @classmethod
    def from_isf(cls, isf: dict) -> "SegHeapLayout":
        return cls.from_symbols(IsfTypes(isf))

    @classmethod
    def from_kernel(cls, kernel: Kernel) -> "SegHeapLayout":
        return _layout(kernel)

    @classmethod
    def from_symbols(cls, symbols: Symbols) -> "SegHeapLayout":
        size_type, offsets_type = "_HEAP_VS_CHUNK_HEADER_SIZE", "_HEAP_LFH_SUBSEGMENT_ENCODED_OFFSETS"
        field = symbols.field_layout
        return cls(
            vs_header_size=symbols.type_size("_HEAP_VS_CHUNK_HEADER"),
            vs_header_bits=field("_HEAP_VS_CHUNK_HEADER", "Sizes.HeaderBits"),
            vs_memory_cost=field(size_type, "MemoryCost"),
            vs_unsafe_size=field(size_type, "UnsafeSize"),
            vs_unsafe_prev_size=field(size_type, "UnsafePrevSize"),
            vs_allocated=field(size_type, "Allocated"),
            vs_subsegment_size=symbols.type_size("_HEAP_VS_SUBSEGMENT"),
            vs_sub_size=field("_HEAP_VS_SUBSEGMENT", "Size"),
            vs_sub_signature=field("_HEAP_VS_SUBSEGMENT", "Signature"),
            lfh_block_size=field(offsets_type, "BlockSize"),
            lfh_first_block_offset=field(offsets_type, "FirstBlockOffset"),
            pool=HeaderLayout.from_symbols(symbols),
        )


@functools.lru_cache(maxsize=8)
def _layout(kernel: Kernel) -> SegHeapLayout:
    return SegHeapLayout.from_symbols(kernel)


# --------------------------------------------------------------------------- pure decoders


@dataclass(frozen=True)
class VsHeader:
    """A decoded ``_HEAP_VS_CHUNK_HEADER.Sizes``; sizes in bytes, including the chunk header."""

    memory_cost: int
    size: int
    previous_size: int
    allocated: bool


def decode_vs_header(header_bits: int, chunk_address: int, heap_key: int, layout: SegHeapLayout) -> VsHeader:
    """``HeaderBits`` is stored XORed with the chunk header's own address and ``RtlpHpHeapGlobals.HeapKey``."""
    bits = (header_bits ^ chunk_address ^ heap_key) & 0xFFFFFFFFFFFFFFFF
    return VsHeader(
        memory_cost=layout.vs_memory_cost.of(bits),
        size=layout.vs_unsafe_size.of(bits) * layout.unit,
        previous_size=layout.vs_unsafe_prev_size.of(bits) * layout.unit,
        allocated=layout.vs_allocated.of(bits) != 0,
    )


def decode_lfh_offsets(
    encoded: int, lfh_key: int, subsegment_address: int, layout: SegHeapLayout, shift_full_address: bool = False
) -> tuple[int, int]:
    """``BlockOffsets.EncodedData`` -> (BlockSize, FirstBlockOffset) in bytes.

    The key is ``(u32)LfhKey ^ ((u32)subsegment >> 12)``; from build 26100 the address is shifted
    before it is truncated (``shift_full_address``).
    """
    shifted = (subsegment_address >> 12) if shift_full_address else ((subsegment_address & 0xFFFFFFFF) >> 12)
    value = (encoded ^ lfh_key ^ shifted) & 0xFFFFFFFF
    return layout.lfh_block_size.of(value), layout.lfh_first_block_offset.of(value)


def segment_context_of(signature: int, segment: int, heap_key: int, key_constant: int = PAGE_SEGMENT_KEY) -> int:
    """The ``_HEAP_SEG_CONTEXT`` address a segment's signature names: how any address leads to its heap."""
    return (signature ^ segment ^ heap_key ^ key_constant) & 0xFFFFFFFFFFFFFFFF


def segment_signature_ok(
    signature: int, segment: int, seg_context: int, heap_key: int, key_constant: int = PAGE_SEGMENT_KEY
) -> bool:
    return segment_context_of(signature, segment, heap_key, key_constant) == seg_context


def vs_subsegment_signature_ok(size: int, signature: int) -> bool:
    return (signature ^ VS_SUBSEGMENT_KEY) == size


def lfh_block_allocated(bitmap: bytes, index: int) -> bool:
    """``BlockBitmap`` keeps two bits per block; a block is handed out iff they read 01."""
    bit = index * 2
    if bit // 8 >= len(bitmap):
        return False
    return (bitmap[bit // 8] >> (bit % 8)) & 3 == 1


class RangeKind(str, enum.Enum):
    VS = "VS"
    LFH = "LFH"
    LARGE = "Large"  # a page range allocated as one block (no pool header; tracked in the big page table)


def classify_range(flags: int) -> RangeKind | None:
    """The backend behind the first descriptor of a busy page range, or None for free/continuation units."""
    if flags & (RANGE_ALLOCATED | RANGE_FIRST) != RANGE_ALLOCATED | RANGE_FIRST:
        return None
    if flags & RANGE_SUBSEGMENT:
        return RangeKind.VS if flags & RANGE_VS else RangeKind.LFH
    return RangeKind.LARGE


def vs_free_tag(raw_header: bytes, layout: SegHeapLayout) -> bytes:
    """What WinDbg shows as the tag of a free VS chunk: bytes 4..8 of the still-encoded header."""
    start = layout.vs_header_bits.offset + 4
    return bytes(raw_header[start : start + 4])


def vs_pool_header_address(heap_block: int, unit: int) -> int:
    """Where the pool puts its header in a VS block: right at the block, except in a page's last unit.

    A header there would leave the body page aligned, which the free path reads as a big-page
    allocation, so the pool moves the header to the start of the next page.
    """
    return heap_block + unit if heap_block % PAGE_SIZE == PAGE_SIZE - unit else heap_block


def vs_block_has_pool_header(heap_block: int, block_size: int, unit: int) -> bool:
    """Requests above a page minus a header get no pool header (they are big-page-table allocations)."""
    if vs_pool_header_address(heap_block, unit) != heap_block:
        return block_size <= PAGE_SIZE
    return block_size <= PAGE_SIZE - unit


# --------------------------------------------------------------------------- reading the image


class _Pages:
    """Reads the image a page at a time and keeps the pages, so a walk touches each page once.

    A caller that read a whole page range in one go hands it over as a span: reads inside it are slices.
    """

    def __init__(self, kernel: Kernel):
        self._kernel = kernel
        self._pages: dict[int, bytes | None] = {}
        self._span_start = 0
        self._span = b""

    def preload(self, pages: dict[int, bytes | None]) -> None:
        """Pages a caller already read in bulk (None: known unreadable), keyed by page address."""
        self._pages.update(pages)

    def preload_span(self, start: int, data: bytes) -> None:
        """Contiguous bytes a caller already read from ``start`` (page aligned)."""
        self._span_start, self._span = start, data

    def span(self, start: int, end: int) -> tuple[bytes, int] | None:
        """The preloaded span and its start address, when it holds all of [start, end)."""
        if self._span_start <= start and end <= self._span_start + len(self._span):
            return self._span, self._span_start
        return None

    def _page(self, base: int) -> bytes | None:
        offset = base - self._span_start
        if 0 <= offset < len(self._span):
            return self._span[offset : offset + PAGE_SIZE]
        if base not in self._pages:
            try:
                self._pages[base] = self._kernel.read(base, PAGE_SIZE)
            except exceptions.InvalidAddressException:
                self._pages[base] = None
        return self._pages[base]

    def read(self, address: int, size: int) -> bytes | None:
        offset = address - self._span_start
        if 0 <= offset and offset + size <= len(self._span):
            return self._span[offset : offset + size]
        base = address & ~(PAGE_SIZE - 1)
        if address + size <= base + PAGE_SIZE:  # the common case: inside one page
            page = self._page(base)
            return None if page is None else page[address - base : address - base + size]
        out = bytearray()
        while size > 0:
            base = address & ~(PAGE_SIZE - 1)
            page = self._page(base)
            if page is None:
                return None
            take = min(size, base + PAGE_SIZE - address)
            out += page[address - base : address - base + take]
            address, size = address + take, size - take
        return bytes(out)


def _read(kernel: Kernel, address: int, size: int) -> bytes | None:
    try:
        return kernel.read(address, size)
    except exceptions.InvalidAddressException:
        return None


def _uint(kernel: Kernel, address: int, size: int) -> int | None:
    data = _read(kernel, address, size)
    return None if data is None else int.from_bytes(data, "little")


def _array_count(kernel: Kernel, type_name: str, field: str) -> int:
    return kernel.array_count(type_name, field)


def _pointer_size(kernel: Kernel) -> int:
    return kernel.type_size("pointer")


def _pointer(kernel: Kernel, address: int) -> int | None:
    return _uint(kernel, address, _pointer_size(kernel))


def _field(kernel: Kernel, base: int, type_name: str, path: str) -> int | None:
    """One field of the structure at ``base``, read with the width and bits the ISF gives it."""
    where = kernel.field_layout(type_name, path)
    data = _read(kernel, base + where.offset, where.size)
    return None if data is None else where.alone.extract(data)


@functools.lru_cache(maxsize=16)
def _global(kernel: Kernel, name: str, size: int) -> int | None:
    """A kernel variable, or None when the symbol is missing or its page is not in the image."""
    if not kernel.has_symbol(name):
        return None
    return _uint(kernel, kernel.symbol_address(name), size)


# --------------------------------------------------------------------------- heaps and keys


@dataclass(frozen=True)
class HeapKeys:
    heap_key: int
    lfh_key: int


def heap_keys(kernel: Kernel) -> HeapKeys | Finding:
    """``RtlpHpHeapGlobals.{HeapKey, LfhKey}``; found through ``ExPoolState.HeapManager.Globals`` when unnamed."""
    globals_type = "_RTLP_HP_HEAP_GLOBALS"
    try:
        if kernel.has_symbol("RtlpHpHeapGlobals"):
            address: int | None = kernel.symbol_address("RtlpHpHeapGlobals")
        else:
            pointer_at = kernel.symbol_address("ExPoolState")
            pointer_at += kernel.field_offset("_EX_POOL_HEAP_MANAGER_STATE", "HeapManager.Globals")
            address = _pointer(kernel, pointer_at)
        if address is None:
            return Finding(0, "RtlpHpHeapGlobals: pointer in ExPoolState unreadable")
        heap_key = _field(kernel, address, globals_type, "HeapKey")
        lfh_key = _field(kernel, address, globals_type, "LfhKey")
    except _SYMBOLS_MISSING as error:
        return Finding(0, f"segment heap keys: kernel symbols lack {error}")
    if heap_key is None or lfh_key is None:
        return Finding(address, "RtlpHpHeapGlobals unreadable")
    return HeapKeys(heap_key, lfh_key)


@dataclass(frozen=True)
class PoolHeap:
    address: int
    pool: str  # NonPaged, NonPagedNx, Paged
    node: int  # pool node index, -1 for ExPoolState.SpecialHeaps
    index: int  # index in Heaps[] / SpecialHeaps[]

    @property
    def special(self) -> bool:
        return self.node < 0


def pool_heaps(kernel: Kernel) -> list[PoolHeap | Finding]:
    """Every pool heap under ``ExPoolState``; heaps whose ``_SEGMENT_HEAP.Signature`` is wrong become Findings."""
    state_type, node_type = "_EX_POOL_HEAP_MANAGER_STATE", "_EX_HEAP_POOL_NODE"
    try:
        state = kernel.symbol_address("ExPoolState")
        pools_count = _field(kernel, state, state_type, "NumberOfPools")
        node_base = state + kernel.field_offset(state_type, "PoolNode")
        node_size = kernel.type_size(node_type)
        max_nodes = _array_count(kernel, state_type, "PoolNode")
        heaps_offset = kernel.field_offset(node_type, "Heaps")
        heaps_per_node = _array_count(kernel, node_type, "Heaps")
        special_base = state + kernel.field_offset(state_type, "SpecialHeaps")
        special_count = _array_count(kernel, state_type, "SpecialHeaps")
        pointer = _pointer_size(kernel)
        kernel.field_offset("_SEGMENT_HEAP", "Signature")
    except _SYMBOLS_MISSING as error:
        return [Finding(0, f"pool heaps: kernel symbols lack {error}")]
    if pools_count is None:
        return [Finding(state, "ExPoolState.NumberOfPools unreadable")]
    slots = [
        (node, index, node_base + node * node_size + heaps_offset + index * pointer)
        for node in range(min(pools_count, max_nodes))
        for index in range(heaps_per_node)
    ]
    slots += [(-1, index, special_base + index * pointer) for index in range(special_count)]
    out: list[PoolHeap | Finding] = []
    seen: set[int] = set()
    for node, index, slot in slots:
        address = _pointer(kernel, slot)
        if address is None:
            out.append(Finding(slot, "pool heap pointer unreadable"))
            continue
        if address == 0 or address in seen:
            continue
        seen.add(address)
        signature = _field(kernel, address, "_SEGMENT_HEAP", "Signature")
        if signature != SEGMENT_HEAP_SIGNATURE:
            shown = "unreadable" if signature is None else f"{signature:#x}"
            out.append(Finding(address, f"_SEGMENT_HEAP signature {shown}, expected {SEGMENT_HEAP_SIGNATURE:#x}"))
            continue
        name = HEAP_POOL_NAMES[index] if index < len(HEAP_POOL_NAMES) else ""
        out.append(PoolHeap(address, name, node, index))
    return out


# --------------------------------------------------------------------------- segments and page ranges


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


@dataclass(frozen=True)
class Segment:
    address: int
    context: SegContext

    @property
    def size(self) -> int:
        return (~self.context.segment_mask & 0xFFFFFFFFFFFFFFFF) + 1


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
    except _SYMBOLS_MISSING as error:
        return [Finding(heap.address, f"segment contexts: kernel symbols lack {error}")]


def _seg_contexts(kernel: Kernel, heap: PoolHeap) -> list[SegContext | Finding]:
    heap_type, ctx_type = "_SEGMENT_HEAP", "_HEAP_SEG_CONTEXT"
    first = heap.address + kernel.field_offset(heap_type, "SegContexts")
    size = kernel.type_size(ctx_type)
    out: list[SegContext | Finding] = []
    for index in range(_array_count(kernel, heap_type, "SegContexts")):
        address = first + index * size
        data = _read(kernel, address, size)
        if data is None:
            out.append(Finding(address, "_HEAP_SEG_CONTEXT unreadable"))
            continue
        names = ("SegmentMask", "UnitShift", "FirstDescriptorIndex", "MaxAllocationSize")
        out.append(SegContext(address, heap, index, *(kernel.field_layout(ctx_type, name).extract(data) for name in names)))
    return out


def _signature_owner(signature: int, segment: int, heap_key: int, contexts: dict[int, SegContext]) -> SegContext | None:
    """The context a segment signature names; both key constants are tried (the constant is zero from 26100)."""
    for constant in (PAGE_SEGMENT_KEY, 0):
        found = contexts.get(segment_context_of(signature, segment, heap_key, constant))
        if found is not None:
            return found
    return None


# SegContexts[1].MaxAllocationSize of the 19H1+ kernels: the bound used when no pool heap can be read.
DEFAULT_LARGE_THRESHOLD = 0x7F0000


@functools.lru_cache(maxsize=8)
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


@_reports_missing_symbols
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
        head = context.address + head_offset
        entry = _pointer(kernel, head)
        seen: set[int] = set()
        while entry != head:
            if entry is None:
                yield Finding(head, "segment list link unreadable")
                break
            if entry in seen or len(seen) >= MAX_SEGMENTS:
                yield Finding(entry, "segment list loops or is too long")
                break
            seen.add(entry)
            segment = entry - link_offset
            signature = _field(kernel, segment, "_HEAP_PAGE_SEGMENT", "Signature")
            if segment & ~context.segment_mask & 0xFFFFFFFFFFFFFFFF:
                yield Finding(segment, "segment not aligned to its context's SegmentMask")
            elif signature is None or not _signature_owner(signature, segment, heap_key, {context.address: context}):
                yield Finding(segment, "_HEAP_PAGE_SEGMENT signature does not name its context")
            else:
                yield Segment(segment, context)
            entry = _pointer(kernel, entry)


@dataclass(frozen=True)
class _Descriptors:
    """The raw descriptor array of one segment, with field positions from the ISF."""

    data: bytes
    size: int
    flags: FieldLayout
    unit_size: FieldLayout
    unit_offset: FieldLayout
    signature: FieldLayout

    def entry(self, index: int) -> tuple[int, int, int, int]:
        base = index * self.size
        return (
            self.flags.extract(self.data, base),
            self.unit_size.extract(self.data, base),
            self.unit_offset.extract(self.data, base),
            self.signature.extract(self.data, base),
        )


def _descriptors(kernel: Kernel, segment: Segment) -> _Descriptors | Finding:
    desc_type = "_HEAP_PAGE_RANGE_DESCRIPTOR"
    count = _array_count(kernel, "_HEAP_PAGE_SEGMENT", "DescArray")
    size = kernel.type_size(desc_type)
    start = segment.address + kernel.field_offset("_HEAP_PAGE_SEGMENT", "DescArray")
    data = _read(kernel, start, count * size)
    if data is None:
        return Finding(start, "page range descriptors unreadable")
    return _Descriptors(
        data,
        size,
        kernel.field_layout(desc_type, "RangeFlags"),
        kernel.field_layout(desc_type, "UnitSize"),
        kernel.field_layout(desc_type, "UnitOffset"),
        kernel.field_layout(desc_type, "TreeSignature"),
    )


def _range_at(segment: Segment, descriptors: _Descriptors, index: int) -> PageRange | Finding | None:
    flags, unit_size, _, signature = descriptors.entry(index)
    kind = classify_range(flags)
    if kind is None:
        return None
    address = segment.address + (index << segment.context.unit_shift)
    if signature != DESCRIPTOR_SIGNATURE or unit_size == 0:
        return Finding(address, f"page range descriptor {index} damaged (signature {signature:#x}, units {unit_size})")
    return PageRange(address, unit_size << segment.context.unit_shift, kind, index, flags, segment)


@_reports_missing_symbols
def page_ranges(kernel: Kernel, segment: Segment) -> Iterator[PageRange | Finding]:
    """Busy page ranges of a segment, in address order, from its descriptor array."""
    descriptors = _descriptors(kernel, segment)
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


def _range_of(segment: Segment, descriptors: _Descriptors, address: int) -> PageRange | Finding:
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


# --------------------------------------------------------------------------- chunks


@dataclass(frozen=True)
class _Walk:
    """What every chunk walk carries along: where to read, how to decode, how to label."""

    kernel: Kernel
    pages: _Pages
    layout: SegHeapLayout
    pool: str
    cached: frozenset[int]
    cookie: int | None  # ExpPoolQuotaCookie, for quota charges

    @classmethod
    def of(cls, kernel: Kernel, pool: str, cached: frozenset[int]) -> "_Walk":
        return cls(kernel, _Pages(kernel), _layout(kernel), pool, cached, poolheader.quota_cookie(kernel))

    def field(self, base: int, type_name: str, path: str) -> int | None:
        where = self.kernel.field_layout(type_name, path)
        data = self.pages.read(base + where.offset, where.size)
        return None if data is None else where.alone.extract(data)


def _body(walk: _Walk, header: PoolHeader, address: int) -> int:
    """The caller's body; a cache-aligned block may carry a second header whose PreviousSize points back here."""
    unit, aligned = walk.layout.unit, walk.layout.pool.cache_aligned_bit
    plain = address + unit
    if not header.pool_type & aligned:
        return plain
    cache_line = _global(walk.kernel, "ExpCacheLineSize", 4)
    if not cache_line:
        return plain
    for step in range(1, cache_line // unit + 1):
        candidate = address + step * unit
        if candidate + unit > address + header.block_size:
            break
        data = walk.pages.read(candidate, unit)
        if data is None:
            break
        second = poolheader.decode(data, walk.layout.pool)
        if second.previous_size == step * unit and second.tag == header.tag and second.pool_type & aligned:
            return candidate + unit
    return plain


def _cached(cached: frozenset[int], *addresses: int) -> bool:
    """Lookaside and delay-free entries are taken to point at the heap block, the pool header or the body."""
    return not cached.isdisjoint(addresses)


def _pool_chunk(
    walk: _Walk, address: int, backing: Backing, allocated: bool, heap_block: int, size: int | None = None
) -> Chunk:
    """The chunk whose ``_POOL_HEADER`` is at ``address``; ``size`` overrides BlockSize (LFH slots)."""
    data = walk.pages.read(address, walk.layout.unit)
    if data is None:
        state = State.UNREADABLE if allocated else State.FREE
        return Chunk(address, size or 0, 0, b"", state, backing, walk.pool)
    header = poolheader.decode(data, walk.layout.pool)
    state, body, quota = State.FREE, None, None
    if allocated:
        body = _body(walk, header, address)
        state = State.CACHED_FREE if _cached(walk.cached, heap_block, address, body) else State.ALLOCATED
        quota = poolheader.charged_process(header, address, walk.layout.pool, walk.cookie)
    return Chunk(
        address=address,
        size=header.block_size if size is None else size,
        previous_size=header.previous_size,
        tag=header.tag,
        state=state,
        backing=backing,
        pool=walk.pool,
        pool_type=header.pool_type,
        body=body,
        quota_process=quota,
    )


def _vs_walk(walk: _Walk, subsegment: int, heap_key: int) -> Iterator[tuple[Chunk | Finding, int, int]]:
    """VS chunks, each with the extent of its VS chunk (chunk header included) for owner lookups."""
    layout = walk.layout
    head = walk.pages.read(subsegment, layout.vs_subsegment_size)
    if head is None:
        yield Finding(subsegment, "VS subsegment header unreadable"), subsegment, subsegment
        return
    size = layout.vs_sub_size.extract(head)
    signature = layout.vs_sub_signature.extract(head)
    if not vs_subsegment_signature_ok(size, signature):
        problem = f"VS subsegment signature {signature:#x} does not match size {size:#x}"
        yield Finding(subsegment, problem), subsegment, subsegment
        return
    end = subsegment + size * layout.unit
    chunk = subsegment + -(-layout.vs_subsegment_size // layout.unit) * layout.unit
    span = walk.pages.span(chunk, end)
    if span is not None:
        yield from _vs_walk_span(walk, span, chunk, end, heap_key)
        return
    previous: int | None = None
    while chunk + layout.vs_header_size <= end:
        raw = walk.pages.read(chunk, layout.vs_header_size)
        if raw is None:
            yield Finding(chunk, "VS chunk header unreadable"), chunk, chunk
            return
        header = decode_vs_header(layout.vs_header_bits.extract(raw), chunk, heap_key, layout)
        problem = None
        if header.size < layout.vs_header_size:
            problem = f"VS chunk size {header.size:#x} too small"
        elif chunk + header.size > end:
            problem = f"VS chunk size {header.size:#x} runs past the subsegment end {end:#x}"
        elif previous is not None and header.previous_size != previous:
            problem = f"VS chunk previous size {header.previous_size:#x} != {previous:#x}"
        if problem:
            yield Finding(chunk, problem), chunk, chunk
            return
        chunk_end = chunk + header.size
        if header.allocated:
            yield _vs_allocated(walk, chunk, chunk_end), chunk, chunk_end
        else:
            tag = vs_free_tag(raw, layout)
            # Like !pool, report previous size 0: on the segment heap only cache-aligned pool headers use it.
            free = Chunk(chunk, header.size, 0, tag, State.FREE, Backing.VS, walk.pool)
            yield free, chunk, chunk_end
        previous = header.size
        chunk = chunk_end


def _vs_walk_span(walk: _Walk, span: tuple[bytes, int], chunk: int, end: int,
                  heap_key: int) -> Iterator[tuple[Chunk | Finding, int, int]]:
    """``_vs_walk`` over a subsegment read in one piece: the same chunks and findings, decoded inline.

    Each chunk header gives the next one's address, so the chain is walked in order; what costs is the
    per-chunk work, kept here to integer operations on slices of the one buffer.  Pool headers that need
    more than their first fields (quota charges, cache-aligned bodies) take the general path.
    """
    layout, data, base = walk.layout, span[0], span[1]
    unit, header_size = layout.unit, layout.vs_header_size
    bits_at, bits_end = layout.vs_header_bits.offset, layout.vs_header_bits.offset + layout.vs_header_bits.size
    bits_shift, bits_mask = layout.vs_header_bits.bit_position, layout.vs_header_bits.mask
    size_shift, size_mask = layout.vs_unsafe_size.shift, layout.vs_unsafe_size.mask
    back_shift, back_mask = layout.vs_unsafe_prev_size.shift, layout.vs_unsafe_prev_size.mask
    busy_shift, busy_mask = layout.vs_allocated.shift, layout.vs_allocated.mask
    pool_layout, decode = layout.pool, poolheader.decode
    special = pool_layout.cache_aligned_bit | poolheader.QUOTA_BIT
    cached, pool, span_end = walk.cached, walk.pool, base + len(data)
    free, allocated, cached_free, vs = State.FREE, State.ALLOCATED, State.CACHED_FREE, Backing.VS
    previous: int | None = None
    while chunk + header_size <= end:
        at = chunk - base
        raw = int.from_bytes(data[at + bits_at : at + bits_end], "little") >> bits_shift & bits_mask
        bits = (raw ^ chunk ^ heap_key) & 0xFFFFFFFFFFFFFFFF
        size = (bits >> size_shift & size_mask) * unit
        problem = None
        if size < header_size:
            problem = f"VS chunk size {size:#x} too small"
        elif chunk + size > end:
            problem = f"VS chunk size {size:#x} runs past the subsegment end {end:#x}"
        elif previous is not None and (bits >> back_shift & back_mask) * unit != previous:
            problem = f"VS chunk previous size {(bits >> back_shift & back_mask) * unit:#x} != {previous:#x}"
        if problem:
            yield Finding(chunk, problem), chunk, chunk
            return
        chunk_end = chunk + size
        if not bits >> busy_shift & busy_mask:
            # Like !pool, report previous size 0: on the segment heap only cache-aligned pool headers use it.
            tag = data[at + bits_at + 4 : at + bits_at + 8]
            yield new_chunk(chunk, size, 0, tag, free, vs, pool, None), chunk, chunk_end
        else:
            heap_block = chunk + header_size
            address = vs_pool_header_address(heap_block, unit)
            where = address - base
            header = None
            if vs_block_has_pool_header(heap_block, chunk_end - heap_block, unit) and address + unit <= span_end:
                header = decode(data, pool_layout, where)
            if header is None or header.pool_type & special:
                yield _vs_allocated(walk, chunk, chunk_end), chunk, chunk_end
            else:
                body = address + unit
                state = cached_free if cached and (heap_block in cached or address in cached or body in cached) \
                    else allocated
                yield new_chunk(address, header.block_size, header.previous_size, header.tag,
                                state, vs, pool, header.pool_type, body), chunk, chunk_end
        previous = size
        chunk = chunk_end


def _vs_allocated(walk: _Walk, chunk: int, chunk_end: int) -> Chunk:
    unit = walk.layout.unit
    heap_block = chunk + walk.layout.vs_header_size
    block_size = chunk_end - heap_block
    if not vs_block_has_pool_header(heap_block, block_size, unit):
        # Big requests are handed out page aligned: padding between the chunk header and the page may precede.
        start = min(-(-heap_block // PAGE_SIZE) * PAGE_SIZE, chunk_end)
        state = State.CACHED_FREE if _cached(walk.cached, heap_block, start) else State.ALLOCATED
        return Chunk(start, chunk_end - start, 0, b"", state, Backing.VS, walk.pool, body=start)
    address = vs_pool_header_address(heap_block, unit)
    found = _pool_chunk(walk, address, Backing.VS, True, heap_block)
    return found if found.state is not State.UNREADABLE else replace(found, size=chunk_end - address)


@_reports_missing_symbols
def vs_chunks(
    kernel: Kernel, subsegment_address: int, heap_key: int, pool: str = "", cached: frozenset[int] = frozenset()
) -> Iterator[Chunk | Finding]:
    """Chunks of one VS subsegment in address order.

    Allocated chunks are listed at their pool header (size = BlockSize * unit); free ones at their VS chunk
    header, with the chunk size and, as tag, bytes 4..8 of the still-encoded header (what WinDbg prints).
    A chunk header that does not decode ends the walk with a Finding.
    """
    for item, _, _ in _vs_walk(_Walk.of(kernel, pool, cached), subsegment_address, heap_key):
        yield item


def _lfh_walk(
    walk: _Walk, subsegment: int, lfh_key: int, range_size: int | None = None, page: int | None = None
) -> Iterator[Chunk | Finding]:
    sub_type = "_HEAP_LFH_SUBSEGMENT"
    encoded = walk.field(subsegment, sub_type, "BlockOffsets.EncodedData")
    count = walk.field(subsegment, sub_type, "BlockCount")
    if encoded is None or count is None:
        yield Finding(subsegment, "LFH subsegment header unreadable")
        return
    bitmap_offset = walk.kernel.field_offset(sub_type, "BlockBitmap")
    decoded = _plausible_lfh_offsets(encoded, lfh_key, subsegment, walk.layout, bitmap_offset)
    if decoded is None:
        yield Finding(subsegment, "LFH BlockOffsets do not decode to a usable block size and first offset")
        return
    block_size, first = decoded
    bitmap = walk.pages.read(subsegment + bitmap_offset, (count * 2 + 7) // 8)
    if bitmap is None:
        yield Finding(subsegment + bitmap_offset, "LFH block bitmap unreadable")
        return
    usable = count
    if range_size:
        usable = min(count, max(0, (range_size - first) // block_size))  # slots that end inside the range
    offsets, allocated = _lfh_slots(subsegment, first, block_size, usable, bitmap, page)
    yield from _lfh_blocks_at(walk, subsegment, offsets, allocated, block_size)
    if usable < count:
        end = subsegment + range_size
        yield Finding(subsegment + first + usable * block_size, f"LFH BlockCount {count} runs past the page range end {end:#x}")


def _lfh_slots(
    subsegment: int, first: int, block_size: int, count: int, bitmap: bytes, page: int | None
) -> tuple[list[int], list[bool]]:
    """Offsets (from the subsegment) and bitmap state of the slots that can hold blocks, for all slots at once.

    Slots that would straddle a page are never handed out; ``page`` keeps only the slots starting in that page.
    """
    index = np.arange(count, dtype=np.int64)
    offsets = first + index * block_size
    start_in_page = (subsegment % PAGE_SIZE + offsets) % PAGE_SIZE
    keep = start_in_page + block_size <= PAGE_SIZE
    if page is not None:
        wanted = page - subsegment  # offset of the page from the subsegment
        keep &= (offsets - start_in_page == wanted) if abs(wanted) < 1 << 62 else False
    bits = np.frombuffer(bitmap, dtype=np.uint8)
    byte = index // 4
    inside = byte < len(bits)
    pair = (bits[np.minimum(byte, max(len(bits) - 1, 0))] >> ((index % 4) * 2).astype(np.uint8)) & 3 if len(bits) \
        else np.zeros(count, dtype=np.uint8)
    allocated = inside & (pair == 1)  # two bits per block: 01 is handed out (see lfh_block_allocated)
    return offsets[keep].tolist(), allocated[keep].tolist()


def _lfh_blocks_at(
    walk: _Walk, subsegment: int, offsets: list[int], allocated: list[bool], block_size: int
) -> Iterator[Chunk]:
    """LFH blocks decoded from one buffer of the subsegment's pages; per-block reads when a page is missing."""
    layout, unit = walk.layout, walk.layout.unit
    lead = subsegment % PAGE_SIZE
    buffer = walk.pages.read(subsegment - lead, lead + offsets[-1] + unit) if offsets else None
    if buffer is None:
        for offset, busy in zip(offsets, allocated):
            yield _pool_chunk(walk, subsegment + offset, Backing.LFH, busy, subsegment + offset, block_size)
        return
    pool_layout, decode = layout.pool, poolheader.decode
    special = pool_layout.cache_aligned_bit | poolheader.QUOTA_BIT  # bodies and charges that need the full decode
    cached, pool = walk.cached, walk.pool
    free, lfh = State.FREE, Backing.LFH
    for offset, busy in zip(offsets, allocated):
        address = subsegment + offset
        header = decode(buffer, pool_layout, lead + offset)
        kind = header.pool_type
        if busy and kind & special:
            yield _pool_chunk(walk, address, Backing.LFH, True, address, block_size)
            continue
        if not busy:
            yield new_chunk(address, block_size, header.previous_size, header.tag, free, lfh, pool, kind)
            continue
        body = address + unit
        state = State.CACHED_FREE if cached and (address in cached or body in cached) else State.ALLOCATED
        yield new_chunk(address, block_size, header.previous_size, header.tag, state, lfh, pool, kind, body)


def _plausible_lfh_offsets(
    encoded: int, lfh_key: int, subsegment: int, layout: SegHeapLayout, bitmap_offset: int
) -> tuple[int, int] | None:
    """Decode BlockOffsets the pre-26100 way, else the 26100 way; keep whichever gives a sane layout."""
    for full in (False, True):
        block_size, first = decode_lfh_offsets(encoded, lfh_key, subsegment, layout, full)
        sizes_ok = layout.unit <= block_size <= PAGE_SIZE and block_size % layout.unit == 0
        if sizes_ok and bitmap_offset < first and first % layout.unit == 0:
            return block_size, first
    return None


@_reports_missing_symbols
def lfh_blocks(
    kernel: Kernel,
    subsegment_address: int,
    lfh_key: int,
    pool: str = "",
    cached: frozenset[int] = frozenset(),
    range_size: int | None = None,
) -> Iterator[Chunk | Finding]:
    """Blocks of one LFH subsegment: BlockCount slots of BlockSize from FirstBlockOffset, state from BlockBitmap.

    Slots keep a uniform stride (their index is their bitmap index); the ones that would cross a page
    boundary are skipped. Each block starts with a ``_POOL_HEADER``; the size reported is the block size.
    ``range_size`` (the page range's size), when given, bounds the walk.
    """
    yield from _lfh_walk(_Walk.of(kernel, pool, cached), subsegment_address, lfh_key, range_size)


def _whole_range(walk: _Walk, page_range: PageRange) -> Chunk:
    """A range allocated as one block: no pool header (its tag and size live in the big page table)."""
    start = page_range.address
    state = State.CACHED_FREE if _cached(walk.cached, start) else State.ALLOCATED
    return Chunk(start, page_range.size, 0, b"", state, Backing.LARGE, walk.pool, body=start)


@_reports_missing_symbols
def range_chunks(
    kernel: Kernel,
    page_range: PageRange,
    keys: HeapKeys,
    cached: frozenset[int] = frozenset(),
    pages: dict[int, bytes | None] | None = None,
    data: bytes | None = None,
) -> Iterator[Chunk | Finding]:
    """Every chunk of one busy page range in address order: its VS chunks, its LFH blocks, or the range itself.

    ``pages`` are the range's pages when the caller already read them in bulk (None for an unreadable page),
    or ``data`` all of its bytes when it read them in one piece, so a whole-heap walk reads each range once
    instead of page by page.  Headerless blocks (page-aligned VS blocks, whole ranges) come back with an
    empty tag and no PoolType: the big page table names them.
    """
    walk = _Walk.of(kernel, page_range.segment.context.heap.pool, cached)
    if pages:
        walk.pages.preload(pages)
    if data:
        walk.pages.preload_span(page_range.address, data)
    if page_range.kind is RangeKind.VS:
        for item, _, _ in _vs_walk(walk, page_range.address, keys.heap_key):
            yield item
    elif page_range.kind is RangeKind.LFH:
        yield from _lfh_walk(walk, page_range.address, keys.lfh_key, page_range.size)
    else:
        yield _whole_range(walk, page_range)


# --------------------------------------------------------------------------- lookasides and delay-free lists


def _slist_entries(kernel: Kernel, header: bytes, base: int, next_entry: FieldLayout) -> Iterator[int]:
    """Entries of an x64 ``_SLIST_HEADER``: ``HeaderX64.NextEntry`` holds the first entry's address >> 4,
    each ``_SLIST_ENTRY.Next`` the full address of the next."""
    link = kernel.field_offset("_SLIST_ENTRY", "Next")
    entry = next_entry.extract(header, base) << next_entry.bit_position
    seen: set[int] = set()
    while entry and entry not in seen and len(seen) < MAX_SLIST_ENTRIES:
        seen.add(entry)
        yield entry
        entry = _pointer(kernel, entry + link)


def cached_free_addresses(kernel: Kernel) -> frozenset[int]:
    """Blocks freed into the dynamic lookasides (``ExPoolState.PoolNode[n].Lookasides[k].Buckets[b]``) and
    the VS delay-free lists: the heap still marks them busy, so walkers report them as cached-free."""
    state_type, node_type, dyn_type, la_type = (
        "_EX_POOL_HEAP_MANAGER_STATE", "_EX_HEAP_POOL_NODE", "_RTL_DYNAMIC_LOOKASIDE", "_RTL_LOOKASIDE",
    )
    try:
        next_entry = kernel.field_layout("_SLIST_HEADER", "HeaderX64.NextEntry")
        state = kernel.symbol_address("ExPoolState")
        pools_count = _field(kernel, state, state_type, "NumberOfPools") or 0
        node_base = state + kernel.field_offset(state_type, "PoolNode")
        node_size = kernel.type_size(node_type)
        lookasides = kernel.field_offset(node_type, "Lookasides")
        dyn_size = kernel.type_size(dyn_type)
        dyn_count = _array_count(kernel, node_type, "Lookasides")
        buckets = kernel.field_offset(dyn_type, "Buckets")
        bucket_count = _array_count(kernel, dyn_type, "Buckets")
        la_size = kernel.type_size(la_type)
        list_head = kernel.field_offset(la_type, "ListHead")
        delay_free = kernel.field_offset("_SEGMENT_HEAP", "VsContext.DelayFreeContext.ListHead")
    except _SYMBOLS_MISSING:
        return frozenset()
    found: set[int] = set()
    for node in range(min(pools_count, _array_count(kernel, state_type, "PoolNode"))):
        start = node_base + node * node_size + lookasides
        data = _read(kernel, start, dyn_count * dyn_size)
        if data is None:
            continue
        for dyn in range(dyn_count):
            for bucket in range(bucket_count):
                base = dyn * dyn_size + buckets + bucket * la_size + list_head
                found.update(_slist_entries(kernel, data, base, next_entry))
    for heap in pool_heaps(kernel):
        if isinstance(heap, PoolHeap):
            header = _read(kernel, heap.address + delay_free, kernel.type_size("_SLIST_HEADER"))
            if header is not None:
                found.update(_slist_entries(kernel, header, 0, next_entry))
    return frozenset(found)


# --------------------------------------------------------------------------- owner lookup


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


def _owning_segment(kernel: Kernel, address: int, heap_key: int) -> Segment | None:
    contexts: dict[int, SegContext] = {}
    for heap in pool_heaps(kernel):
        if isinstance(heap, PoolHeap):
            contexts.update((c.address, c) for c in seg_contexts(kernel, heap) if isinstance(c, SegContext))
    for mask in sorted({c.segment_mask for c in contexts.values()}):
        segment = address & mask
        signature = _field(kernel, segment, "_HEAP_PAGE_SEGMENT", "Signature")
        if signature is None:
            continue
        context = _signature_owner(signature, segment, heap_key, contexts)
        if context is not None and context.segment_mask == mask:
            return Segment(segment, context)
    return None


def find_owner_chunks(kernel: Kernel, address: int, cached: frozenset[int] | None = None) -> OwnerResult:
    """Segment -> page range -> the chunks listed in ``address``'s page, marking the one that holds it.

    VS: every chunk whose listed address is in the page, plus the chunk whose VS extent holds the address
    (its header may sit on an earlier page). LFH: the blocks of the page. A range allocated as a whole is one
    chunk with no header (its tag lives in the big page table). ``cached`` defaults to
    ``cached_free_addresses(kernel)``.
    """
    try:
        return _find_owner_chunks(kernel, address, cached)
    except _SYMBOLS_MISSING as error:
        return OwnerResult(address, findings=(Finding(address, f"segment heap owner: kernel symbols lack {error}"),))


def _find_owner_chunks(kernel: Kernel, address: int, cached: frozenset[int] | None) -> OwnerResult:
    keys = heap_keys(kernel)
    if isinstance(keys, Finding):
        return OwnerResult(address, findings=(keys,))
    segment = _owning_segment(kernel, address, keys.heap_key)
    if segment is None:
        return OwnerResult(address, findings=(Finding(address, "not inside a pool segment heap segment"),))
    heap = segment.context.heap
    descriptors = _descriptors(kernel, segment)
    if isinstance(descriptors, Finding):
        return OwnerResult(address, heap, segment, findings=(descriptors,))
    page_range = _range_of(segment, descriptors, address)
    if isinstance(page_range, Finding):
        return OwnerResult(address, heap, segment, findings=(page_range,))
    cached = cached_free_addresses(kernel) if cached is None else cached
    page = address & ~(PAGE_SIZE - 1)
    walk = _Walk.of(kernel, heap.pool, cached)
    chunks: list[Chunk] = []
    findings: list[Finding] = []
    owner = None
    if page_range.kind is RangeKind.VS:
        for item, start, end in _vs_walk(walk, page_range.address, keys.heap_key):
            if isinstance(item, Finding):
                findings.append(item)
                continue
            holds = start <= address < end
            if holds:
                owner = item
            if holds or item.address & ~(PAGE_SIZE - 1) == page:
                chunks.append(item)
    elif page_range.kind is RangeKind.LFH:
        for item in _lfh_walk(walk, page_range.address, keys.lfh_key, page_range.size, page):
            if isinstance(item, Finding):
                findings.append(item)
                continue
            chunks.append(item)
            if item.contains(address):
                owner = item
    else:
        owner = _whole_range(walk, page_range)
        chunks.append(owner)
    return OwnerResult(address, heap, segment, page_range, tuple(chunks), owner, tuple(findings))
