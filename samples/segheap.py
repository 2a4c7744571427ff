"""Kernel pool of segment-heap builds (Windows 10 1903 to 2004, Server 2022, Windows 11 21H2), as the kernel lays it out.

:class:`SegmentHeapPools` writes the heap manager state (``RtlpHpHeapGlobals``,
``ExPoolState`` with one pool node of four ``_SEGMENT_HEAP``), segments with
their page range descriptors, VS and LFH subsegments, page ranges and large
allocations, the dynamic lookaside lists and the quota cookie, and records
every chunk in the image manifest the way ``!pool`` lists it.

How requests are served (sizes include the 16-byte ``_POOL_HEADER``):

* LFH: blocks of up to 0x200 bytes, in 16-byte buckets, once a bucket of a
  heap has seen :data:`LFH_ACTIVATION` requests (the earlier ones went to VS).
* VS: other requests up to 0xFE0 bytes carry a pool header; requests above
  0xFE0 and below :data:`VS_MAX_BIG` are VS chunks whose data starts on a
  page (the kernel's VS context sets ``PageAlignLargeAllocs``), without pool
  header, tracked in the big page table.
* Page ranges of ``SegContexts[0]`` (4 KiB units, 1 MiB segments) up to
  0x7F000 bytes, of ``SegContexts[1]`` (64 KiB units, 16 MiB segments) up to
  :data:`CONTEXT1_MAX`, beyond that the VA manager ("Large").

VS placement: the kernel never lets a small pool block straddle a page.
A VS chunk whose pool header would sit in the last 16 bytes of a page keeps
those 16 bytes as padding inside the chunk and its pool header starts the
next page (chunk header at ``...fe0``, pool header at ``...000``); a block
that would otherwise cross a page boundary is aligned the same way, the
space before its chunk header becoming a free chunk (coalesced with a free
predecessor: two free VS chunks are never adjacent).  ``BlockSize`` of the
pool header reaches the end of its chunk, except for a last chunk of a
subsegment that had to take the final 16 bytes (too few for a free chunk):
those stay unused past the block and the chunk says so in
``AllocatedChunkBits.UnusedBytes``, which is also set when padding precedes
the pool header.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace

from .image import Image
from .manifest import Allocation, tag_text
from .pooltables import PoolTables
from .segheap_layout import (
    MASK64,
    RANGE_ALLOCATED,
    RANGE_COMMITTED_FREE,
    RANGE_CONTINUATION,
    RANGE_LFH_SUBSEGMENT,
    RANGE_TREE_SIGNATURE,
    RANGE_UNCOMMITTED_FREE,
    RANGE_VS_SUBSEGMENT,
    SEGMENT_HEAP_SIGNATURE,
    Fields,
    balanced_rb_tree,
    lfh_encoded_offsets,
    segment_signature,
    u64,
    vs_encode,
    vs_page_offset_bits,
)

PAGE = 0x1000
UNIT = 0x10  # pool block and VS granule
POOL_HEADER = 0x10
VS_HEADER = 0x10
SMALL_MAX = 0xFE0  # largest request (without header) that still gets a pool header
LFH_MAX_BLOCK = 0x200
LFH_ACTIVATION = 17
VS_SUBSEGMENT_PAGES = 16
VS_MAX_BIG = 0x1F000
CONTEXT0_MAX = 0x7F000
CONTEXT1_MAX = 0x7F0000
LOOKASIDE_MIN, LOOKASIDE_MAX = 0x200, 0xF80
LOOKASIDE_GRANULE = 0x40
LOOKASIDE_BUCKETS = (LOOKASIDE_MAX - LOOKASIDE_MIN) // LOOKASIDE_GRANULE + 1
IN_USE = 2  # pool header PoolType bit of an allocated block
CACHE_ALIGNED, QUOTA = 4, 8
CACHE_LINE = 0x40

# Seed page of the win10-19041 flavor (a WinDbg ``!pool`` transcript it reproduces).
SEED_SEGMENT = 0xFFFFDC0155E00000
SEED_SUBSEGMENT = 0xFFFFDC0155E90000
SEED_MMCI_CHUNK = 0xFFFFDC0155E93FF0
SEED_HEAP_KEY_HIGH = 0xDC7FF710

SEGMENT_CONTEXTS = (
    # SegmentMask, UnitShift, MaxAllocationSize
    (~0xFFFFF & MASK64, 12, CONTEXT0_MAX),
    (~0xFFFFFF & MASK64, 16, CONTEXT1_MAX),
)


@dataclass(frozen=True)
class PoolKind:
    heap_index: int
    pool_type: int
    region: str  # flavor region name
    label: str  # !pool's region wording
    lookaside: int | None  # index in PoolNode.Lookasides


POOLS = {
    "NonPaged": PoolKind(0, 0x000, "NonPagedPool", "Nonpaged pool", None),
    "NonPagedNx": PoolKind(1, 0x200, "NonPagedPool", "Nonpaged pool", 0),
    "Paged": PoolKind(2, 0x001, "PagedPool", "Paged pool", 1),
}
HEAP_REGIONS = ("NonPagedPool", "NonPagedPool", "PagedPool", "PagedPool")
HEAP_POOLS = ("NonPaged", "NonPagedNx", "Paged", "Paged")


def round_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) & ~(alignment - 1)


@dataclass
class VsChunk:
    address: int
    size: int
    allocated: bool
    record: Allocation | None = None
    data: int = 0  # first byte after the chunk header's padding (pool header or big allocation)
    pool_header: bool = False
    slack: int = 0  # bytes past the block that were too few to split off as a free chunk
    freed_headers: list[tuple[int, bytes]] = field(default_factory=list)  # (address, tag) of freed blocks' headers


@dataclass
class VsSubsegment:
    address: int
    end: int
    heap: "Heap"
    cursor: int
    chunks: list[VsChunk] = field(default_factory=list)
    closed: bool = False


@dataclass
class LfhSubsegment:
    address: int
    pages: int
    block_size: int
    first_block: int
    block_count: int
    free_slots: list[int]  # never handed out, usable
    withheld: set[int]
    bitmap: bytearray
    used: dict[int, Allocation] = field(default_factory=dict)


@dataclass
class LfhBucket:
    address: int
    block_size: int
    subsegments: list[LfhSubsegment] = field(default_factory=list)


@dataclass
class PageRange:
    unit: int
    units: int
    flags: int  # RangeFlags of the first descriptor; RANGE_COMMITTED_FREE for a freed range


@dataclass
class Segment:
    address: int
    context: int
    ranges: list[PageRange] = field(default_factory=list)
    used: bytearray = field(default_factory=lambda: bytearray(256))


@dataclass
class Heap:
    index: int
    address: int
    region: str
    segments: tuple[list[Segment], list[Segment]] = field(default_factory=lambda: ([], []))
    vs_current: VsSubsegment | None = None
    vs_subsegments: list[VsSubsegment] = field(default_factory=list)
    lfh_buckets: dict[int, LfhBucket] = field(default_factory=dict)
    requests: dict[int, int] = field(default_factory=dict)
    large: list[tuple[int, int, int]] = field(default_factory=list)  # (metadata, va, pages)


@dataclass
class SeedPage:
    """The chunks of the seed page; the build writes the process object at ``proc.body``."""

    mmci: Allocation
    free_after_mmci: Allocation
    proc: Allocation
    free_after_proc: Allocation


class SegmentHeapPools:
    """Kernel pool builder for segment-heap kernels (see the module docstring)."""

    def __init__(self, image: Image, tables: PoolTables):
        self.image = image
        self.tables = tables
        self.fields = Fields(image.types)
        self.rng = image.rng
        self.space = image.space
        low = self.rng.getrandbits(32)
        self.heap_key = SEED_HEAP_KEY_HIGH << 32 | low
        self.lfh_key = self.rng.getrandbits(64)
        self.quota_cookie = self.rng.getrandbits(64)
        self.globals_address = image.symbol("RtlpHpHeapGlobals")
        self.pool_state = image.symbol("ExPoolState")
        self.vs_header_room = round_up(self.fields.size("_HEAP_VS_SUBSEGMENT"), UNIT)
        self._cursors: dict[tuple[str, int], int] = {}
        self._reserved_segments: set[int] = {SEED_SEGMENT} if image.flavor.seed_page else set()
        self._metadata_next = self._region_base("NonPagedPool") + 0x10_0000_0000 + self.rng.randrange(0x100) * PAGE
        self._lookaside: dict[tuple[int, int], list[int]] = {}
        self.heaps = [Heap(i, self._metadata(self.fields.size("_SEGMENT_HEAP")), HEAP_REGIONS[i]) for i in range(4)]
        if image.flavor.seed_page:
            self._seed_segment_for(self.heaps[POOLS["NonPagedNx"].heap_index])
        self.seed: SeedPage | None = None
        self._write_globals()

    # -- public API ----------------------------------------------------------
    def allocate(
        self,
        size: int,
        tag: bytes,
        pool: str,
        state: str = "Allocated",
        quota_process: int | None = None,
        cache_aligned: bool = False,
    ) -> Allocation:
        """Place one request of ``size`` bytes as the kernel would and record it in the manifest."""
        kind = POOLS[pool]
        if state not in ("Allocated", "Free", "Cached-free"):
            raise ValueError(f"unknown state {state!r}")
        if len(tag) != 4:
            raise ValueError("a pool tag is 4 bytes")
        heap = self.heaps[kind.heap_index]
        pool_type = kind.pool_type | (CACHE_ALIGNED if cache_aligned else 0) | (QUOTA if quota_process else 0)
        block = POOL_HEADER + round_up(max(size, 1), UNIT) + (CACHE_LINE if cache_aligned else 0)
        if block > POOL_HEADER + SMALL_MAX:  # BlockSize is 8 bits: larger blocks go whole pages
            if state == "Cached-free":
                raise ValueError("only blocks of 0x200..0xF80 bytes are cached in the lookaside lists")
            return self._allocate_big(heap, kind, size, tag, pool_type, state, quota_process)
        if state == "Cached-free":
            if kind.lookaside is None or not LOOKASIDE_MIN <= block <= LOOKASIDE_MAX:
                raise ValueError("only NonPagedNx/Paged blocks of 0x200..0xF80 bytes are cached in lookasides")
            return self._allocate_vs_small(heap, kind, block, tag, pool_type, state, quota_process)
        if block <= LFH_MAX_BLOCK:
            seen = heap.requests.get(block, 0) + 1
            heap.requests[block] = seen
            if seen >= LFH_ACTIVATION:
                return self._allocate_lfh(heap, kind, block, tag, pool_type, state, quota_process)
        return self._allocate_vs_small(heap, kind, block, tag, pool_type, state, quota_process)

    def seed_page(self, filler_tags: tuple[bytes, ...] = (b"Ntfx", b"FMfn", b"Irp ", b"Vad ", b"File")) -> SeedPage:
        """Build (once) the VS page at 0xffffdc0155e94000 that reproduces the seed ``!pool`` transcript.

        The VS subsegment starts at 0xffffdc0155e90000 in the NonPagedNx heap;
        its first pages are filled with ``filler_tags`` allocations so that a chunk
        header lands at 0x...93ff0 (MmCi), followed by a free 0x60 chunk, the Proc
        chunk (header 0x...942b0, pool header 0x...942c0, BlockSize 0xd0), a free
        0x20 chunk and an allocation whose pool header starts the next page."""
        if self.seed is not None:
            return self.seed
        kind = POOLS["NonPagedNx"]
        heap = self.heaps[kind.heap_index]
        sub = VsSubsegment(SEED_SUBSEGMENT, SEED_SUBSEGMENT + VS_SUBSEGMENT_PAGES * PAGE, heap,
                           SEED_SUBSEGMENT + self.vs_header_room)
        self._make_current(heap, sub)
        filler = list(filler_tags)
        while SEED_MMCI_CHUNK - sub.cursor >= 0x600:
            room = SEED_MMCI_CHUNK - sub.cursor - 0x200
            block = POOL_HEADER + round_up(self.rng.randrange(0x20, min(0x3F0, room)), UNIT)
            self._allocate_vs_small(heap, kind, block, self.rng.choice(filler), kind.pool_type, "Allocated", None)
        gap = SEED_MMCI_CHUNK - sub.cursor
        if sub.chunks and sub.chunks[-1].allocated:
            self._vs_free_chunk(sub, gap, None)
        else:
            self._allocate_vs_small(heap, kind, gap - VS_HEADER, self.rng.choice(filler), kind.pool_type,
                                    "Allocated", None)
        mmci = self._allocate_vs_small(heap, kind, 0x250, b"MmCi", kind.pool_type, "Allocated", None)
        free_a = self._allocate_vs_small(heap, kind, 0x50, self.rng.choice(filler), kind.pool_type, "Free", None)
        proc = self._allocate_vs_small(heap, kind, 0xD00, b"Proc", kind.pool_type, "Allocated", None)
        free_b = self._vs_free_chunk(sub, 0x20, None)
        self._allocate_vs_small(heap, kind, POOL_HEADER + round_up(self.rng.randrange(0x40, 0x400), UNIT),
                                self.rng.choice(filler), kind.pool_type, "Allocated", None)
        self.seed = SeedPage(mmci, free_a, proc, free_b)
        return self.seed

    def finish(self) -> None:
        """Close every subsegment, write descriptors, lists, trees and lookasides."""
        if self.image.flavor.seed_page:
            self.seed_page()
        for heap in self.heaps:
            for sub in heap.vs_subsegments:
                self._close_vs(sub)
            self._write_vs_context(heap)
            self._write_lfh(heap)
            self._write_large(heap)
            for context in (0, 1):
                self._write_segments(heap, context)
            self._write_heap(heap)
        self._write_lookasides()

    # -- addresses -----------------------------------------------------------
    def _region_base(self, region: str) -> int:
        return self.image.flavor.regions[region][0]

    def _metadata(self, size: int) -> int:
        """Nonpaged memory for heap metadata (the heaps themselves, LFH buckets, large-allocation records)."""
        address = round_up(self._metadata_next, UNIT)
        self._metadata_next = address + size
        self.space.map_range(address, size)
        return address

    def _next_segment_address(self, region: str, context: int) -> int:
        span = 1 << (20 if context == 0 else 24)
        key = (region, context)
        if key not in self._cursors:
            start = 0x1_5000_0000 if region == "NonPagedPool" else 0x1_2000_0000
            if context == 1:
                start = 0x20_0000_0000
            self._cursors[key] = self._region_base(region) + start + self.rng.randrange(0x40) * span
        address = self._cursors[key]
        while address in self._reserved_segments:
            address += span
        self._cursors[key] = address + span
        self._reserved_segments.add(address)
        return address

    def _next_large_address(self, region: str, pages: int) -> int:
        key = (region, 2)
        if key not in self._cursors:
            self._cursors[key] = self._region_base(region) + 0x40_0000_0000 + self.rng.randrange(0x100) * PAGE
        address = self._cursors[key]
        self._cursors[key] = address + (pages + 1) * PAGE  # one unmapped guard page between them
        return address

    # -- segments and page ranges --------------------------------------------
    def _seed_segment_for(self, heap: Heap) -> None:
        """The NonPagedNx heap's first segment holds the seed page; its VS subsegment's units are kept."""
        segment = Segment(SEED_SEGMENT, 0)
        heap.segments[0].append(segment)
        self._claim_units(segment, (SEED_SUBSEGMENT - SEED_SEGMENT) >> 12, VS_SUBSEGMENT_PAGES, RANGE_VS_SUBSEGMENT)

    def _first_unit(self, context: int) -> int:
        """Units covered by the segment header (the descriptor array): 2 pages, or 1 of 64 KiB."""
        unit_bytes = 1 << SEGMENT_CONTEXTS[context][1]
        return round_up(self.fields.size("_HEAP_PAGE_SEGMENT"), unit_bytes) // unit_bytes

    def _claim_units(self, segment: Segment, unit: int, units: int, flags: int) -> None:
        segment.used[unit : unit + units] = b"\x01" * units
        segment.ranges.append(PageRange(unit, units, flags))

    def _allocate_range(self, heap: Heap, context: int, units: int, flags: int) -> int:
        """First-fit page range of ``units`` in the heap's segments of ``context``; returns its address."""
        first = self._first_unit(context)
        needle = b"\x00" * units
        for segment in heap.segments[context]:
            unit = segment.used.find(needle, first)
            if unit != -1 and unit + units <= 256:
                self._claim_units(segment, unit, units, flags)
                return segment.address + (unit << SEGMENT_CONTEXTS[context][1])
        segment = Segment(self._next_segment_address(heap.region, context), context)
        heap.segments[context].append(segment)
        self._claim_units(segment, first, units, flags)
        return segment.address + (first << SEGMENT_CONTEXTS[context][1])

    # -- VS ------------------------------------------------------------------
    def _new_vs_subsegment(self, heap: Heap, need: int) -> VsSubsegment:
        pages = max(VS_SUBSEGMENT_PAGES, (self.vs_header_room + PAGE + need + PAGE - 1) // PAGE)
        address = self._allocate_range(heap, 0, pages, RANGE_VS_SUBSEGMENT)
        sub = VsSubsegment(address, address + pages * PAGE, heap, address + self.vs_header_room)
        self._make_current(heap, sub)
        return sub

    def _make_current(self, heap: Heap, sub: VsSubsegment) -> None:
        if heap.vs_current is not None:
            self._close_vs(heap.vs_current)
        heap.vs_current = sub
        heap.vs_subsegments.append(sub)

    def _vs_layout(self, cursor: int, need: int, big: bool) -> tuple[int, int]:
        """(chunk header, data start) of a chunk placed at ``cursor`` holding ``need`` bytes of data."""
        data = cursor + VS_HEADER
        if big or (data & ~(PAGE - 1)) != ((data + need - 1) & ~(PAGE - 1)):
            boundary = round_up(data, PAGE)
        else:
            return cursor, data
        header = boundary - VS_HEADER
        if header - cursor == UNIT:
            header = cursor  # too small for a free chunk: the chunk keeps 16 bytes of padding
        return header, boundary

    def _vs_place(self, heap: Heap, need: int, big: bool, allocated: bool) -> tuple[VsSubsegment, VsChunk, int]:
        sub = heap.vs_current
        if sub is None:
            sub = self._new_vs_subsegment(heap, need)
        header, data = self._vs_layout(sub.cursor, need, big)
        if data + need > sub.end:
            sub = self._new_vs_subsegment(heap, need)
            header, data = self._vs_layout(sub.cursor, need, big)
        if header > sub.cursor:
            self._vs_free_chunk(sub, header - sub.cursor, None)
        size = data + need - header
        if not allocated and sub.chunks and not sub.chunks[-1].allocated:
            chunk = sub.chunks[-1]
            chunk.size += size
        else:
            chunk = VsChunk(header, size, allocated)
            sub.chunks.append(chunk)
        sub.cursor = data + need
        return sub, chunk, data

    def _vs_free_chunk(self, sub: VsSubsegment, size: int, record: Allocation | None) -> Allocation:
        """Append free space to the subsegment, coalescing with a free predecessor."""
        if sub.chunks and not sub.chunks[-1].allocated:
            chunk = sub.chunks[-1]
            chunk.size += size
        else:
            chunk = VsChunk(sub.cursor, size, False, record)
            sub.chunks.append(chunk)
        sub.cursor += size
        return self._free_record(sub, chunk)

    def _free_record(self, sub: VsSubsegment, chunk: VsChunk) -> Allocation:
        if chunk.record is None:
            pool = HEAP_POOLS[sub.heap.index]
            kind = POOLS[pool]
            chunk.record = self.image.manifest.add(Allocation(
                address=chunk.address, size=chunk.size, tag="", pool_type=kind.pool_type,
                pool=pool, state="Free",
                backing="VS", region=kind.label))
        chunk.record.size = chunk.size
        return chunk.record

    def _allocate_vs_small(self, heap: Heap, kind: PoolKind, block: int, tag: bytes, pool_type: int,
                           state: str, quota_process: int | None) -> Allocation:
        allocated = state != "Free"
        sub, chunk, data = self._vs_place(heap, block, big=False, allocated=allocated)
        if not allocated:
            body = self._write_pool_headers(data, data + block, pool_type, tag, quota_process, bool(pool_type & 4))
            chunk.freed_headers.append((data, tag))
            record = self._free_record(sub, chunk)
            record.note = (record.note + "; " if record.note else "") + f"freed {tag_text(tag)}"
            # The caller still writes what the freed allocation held (stale contents) at its body.
            return replace(record, body=body)
        end = chunk.address + chunk.size
        body = self._write_pool_headers(data, end, pool_type, tag, quota_process, bool(pool_type & 4))
        chunk.data, chunk.pool_header = data, True
        chunk.record = self.image.manifest.add(Allocation(
            address=data, size=end - data, tag=tag_text(tag), pool_type=pool_type, pool=self._pool_name(kind),
            state=state, backing="VS", region=kind.label, body=body, quota_process=quota_process or None))
        if state == "Cached-free":
            bucket = (end - data - LOOKASIDE_MIN) // LOOKASIDE_GRANULE
            self._lookaside.setdefault((kind.lookaside, bucket), []).append(body)
        return chunk.record

    def _close_vs(self, sub: VsSubsegment) -> None:
        """Give the rest of the subsegment to a free chunk and write every chunk header."""
        if sub.closed:
            return
        sub.closed = True
        rest = sub.end - sub.cursor
        if rest >= 2 * UNIT:
            self._vs_free_chunk(sub, rest, None)
        elif rest:
            last = sub.chunks[-1]
            last.size += rest
            sub.cursor = sub.end
            if last.allocated:
                last.slack = rest
            else:
                last.record.size = last.size
        if sub.heap.vs_current is sub:
            sub.heap.vs_current = None
        self._write_vs_chunks(sub)
        t = "_HEAP_VS_SUBSEGMENT"
        buffer = bytearray(self.fields.size(t))
        size = (sub.end - sub.address) // UNIT
        pages = (sub.end - sub.address) // PAGE
        self.fields.pack(buffer, 0, t, {
            "CommitBitmap": (1 << min(pages, 64)) - 1,
            "Size": size,
            "Signature": size ^ self.image.flavor.vs_subsegment_key,
            "FullCommit": 1,
        })
        self.space.write(sub.address + self.fields.offset(t, "CommitBitmap"),
                         bytes(buffer[self.fields.offset(t, "CommitBitmap"):]))

    def _write_vs_chunks(self, sub: VsSubsegment) -> None:
        f = self.fields
        t = "_HEAP_VS_CHUNK_HEADER_SIZE"
        bits_offset = f.offset("_HEAP_VS_CHUNK_HEADER", "AllocatedChunkBits")
        previous = 0
        for chunk in sub.chunks:
            units = chunk.size // UNIT
            cost = 0 if chunk.allocated else self._memory_cost(chunk)
            decoded = f.compose(t, {"MemoryCost": cost, "UnsafeSize": units, "UnsafePrevSize": previous,
                                    "Allocated": 1 if chunk.allocated else 0})
            raw = u64(vs_encode(decoded, chunk.address, self.heap_key))
            if chunk.allocated:
                padded = chunk.data - chunk.address > VS_HEADER or chunk.slack > 0
                allocated_bits = f.compose("_HEAP_VS_CHUNK_HEADER", {
                    "EncodedSegmentPageOffset": vs_page_offset_bits(chunk.address, sub.address, self.heap_key),
                    "UnusedBytes": 1 if padded else 0,
                }) >> (bits_offset * 8)
                self.space.write(chunk.address, raw + struct.pack("<I", allocated_bits))
            else:
                self.space.write(chunk.address, raw)
                chunk.record.tag = tag_text(raw[4:8])
                chunk.record.stale_tag = self._stale_tag(chunk)
            previous = units

    def _stale_tag(self, chunk: VsChunk) -> str:
        """The tag of the first freed block's pool header past the free chunk's free header (chunk header and
        free-tree node, which overwrite what lay there), "" when no freed block's header lies past it."""
        intact = chunk.address + self.fields.size("_HEAP_VS_CHUNK_FREE_HEADER")
        return next((tag_text(tag) for address, tag in chunk.freed_headers if address >= intact), "")

    @staticmethod
    def _memory_cost(chunk: VsChunk) -> int:
        """Whole pages a free chunk could give back (those past its 0x20-byte free header)."""
        first = round_up(chunk.address + 2 * UNIT, PAGE)
        last = (chunk.address + chunk.size) & ~(PAGE - 1)
        return max(0, (last - first) // PAGE)

    # -- pool headers --------------------------------------------------------
    def _write_pool_headers(self, data: int, end: int, pool_type: int, tag: bytes,
                            quota_process: int | None, cache_aligned: bool) -> int:
        """Write the pool header(s) of a block [data, end); return the caller's address."""
        header_type = (pool_type & 0xFF) | IN_USE
        first = self._pool_header(0, (end - data) // UNIT, header_type, tag)
        if quota_process:
            struct.pack_into("<Q", first, self.fields.offset("_POOL_HEADER", "ProcessBilled"),
                             (data ^ self.quota_cookie ^ quota_process) & MASK64)
        self.space.write(data, bytes(first))
        body = data + POOL_HEADER
        if cache_aligned:
            body = round_up(data + POOL_HEADER, CACHE_LINE)
            second = body - POOL_HEADER
            if second != data:
                header = self._pool_header((second - data) // UNIT, (end - second) // UNIT, header_type, tag)
                self.space.write(second, bytes(header))
        return body

    def _pool_header(self, previous: int, blocks: int, header_type: int, tag: bytes) -> bytearray:
        buffer = bytearray(POOL_HEADER)
        self.fields.pack(buffer, 0, "_POOL_HEADER", {
            "PreviousSize": previous, "PoolIndex": 0, "BlockSize": blocks, "PoolType": header_type,
            "PoolTag": int.from_bytes(tag, "little")})
        return buffer

    @staticmethod
    def _pool_name(kind: PoolKind) -> str:
        return HEAP_POOLS[kind.heap_index]

    # -- LFH -----------------------------------------------------------------
    def _allocate_lfh(self, heap: Heap, kind: PoolKind, block: int, tag: bytes, pool_type: int,
                      state: str, quota_process: int | None) -> Allocation:
        bucket = heap.lfh_buckets.get(block)
        if bucket is None:
            bucket = heap.lfh_buckets[block] = LfhBucket(self._metadata(self.fields.size("_HEAP_LFH_BUCKET")), block)
        sub = next((s for s in reversed(bucket.subsegments) if s.free_slots), None)
        if sub is None:
            sub = self._new_lfh_subsegment(heap, block)
            bucket.subsegments.append(sub)
        slot = sub.free_slots.pop()
        address = sub.address + sub.first_block + slot * block
        body = self._write_pool_headers(address, address + block, pool_type, tag, quota_process,
                                        bool(pool_type & 4))
        if state == "Allocated":
            sub.bitmap[slot // 4] |= 1 << (2 * (slot % 4))
        record = self.image.manifest.add(Allocation(
            address=address, size=block, tag=tag_text(tag), pool_type=pool_type, pool=self._pool_name(kind),
            state=state, backing="LFH", region=kind.label, body=body if state == "Allocated" else 0,
            quota_process=(quota_process or None) if state == "Allocated" else None,
            note="" if state == "Allocated" else f"freed {tag_text(tag)}"))
        sub.used[slot] = record
        return record

    def _new_lfh_subsegment(self, heap: Heap, block: int) -> LfhSubsegment:
        """An LFH subsegment sized for about 32 blocks (1 to 4 pages).

        Blocks follow each other at a stride of ``block`` from ``FirstBlockOffset``; a
        slot that would straddle a page boundary is withheld (marked busy in the bitmap,
        counted in ``WitheldBlockCount``) and never handed out, so no LFH block crosses a
        page, as the kernel's LFH configures it (``WitholdPageCrossingBlocks``)."""
        pages = min(4, max(1, (32 * block + PAGE - 1) // PAGE))
        span = pages * PAGE
        header = self.fields.offset("_HEAP_LFH_SUBSEGMENT", "BlockBitmap")
        count = (span - header) // block
        while True:
            bitmap_bytes = round_up((2 * count + 7) // 8, 8)
            first = round_up(header + bitmap_bytes, UNIT)
            fits = (span - first) // block
            if fits >= count:
                break
            count = fits
        address = self._allocate_range(heap, 0, pages, RANGE_LFH_SUBSEGMENT)
        self.space.map_range(address, span)  # committed whole: slots never handed out read as zeros
        withheld = {
            slot for slot in range(count)
            if (first + slot * block) // PAGE != (first + (slot + 1) * block - 1) // PAGE
        }
        bitmap = bytearray(bitmap_bytes)
        for slot in withheld:
            bitmap[slot // 4] |= 1 << (2 * (slot % 4))
        slots = [slot for slot in range(count) if slot not in withheld]
        self.rng.shuffle(slots)
        return LfhSubsegment(address, pages, block, first, count, slots, withheld, bitmap)

    def _write_lfh(self, heap: Heap) -> None:
        f = self.fields
        t = "_HEAP_LFH_SUBSEGMENT"
        kind = POOLS[HEAP_POOLS[heap.index]]
        lfh_context = heap.address + f.offset("_SEGMENT_HEAP", "LfhContext")
        owner = "_HEAP_LFH_SUBSEGMENT_OWNER"
        for block, bucket in sorted(heap.lfh_buckets.items()):
            index = block // UNIT
            available: list[int] = []
            full: list[int] = []
            for sub in bucket.subsegments:
                for slot in sub.free_slots:
                    address = sub.address + sub.first_block + slot * block
                    sub.used[slot] = self.image.manifest.add(Allocation(
                        address=address, size=block, tag=tag_text(bytes(4)), pool_type=kind.pool_type,
                        pool=self._pool_name(kind), state="Free", backing="LFH", region=kind.label,
                        note="never allocated"))
                free = sum(1 for slot in range(sub.block_count)
                           if slot not in sub.withheld and not (sub.bitmap[slot // 4] >> (2 * (slot % 4))) & 1)
                buffer = bytearray(f.offset(t, "BlockBitmap"))
                f.pack(buffer, 0, t, {
                    "Owner": bucket.address, "FreeCount": free, "BlockCount": sub.block_count,
                    "WitheldBlockCount": len(sub.withheld),
                    "BlockOffsets.EncodedData": lfh_encoded_offsets(
                        block, sub.first_block, self.lfh_key, sub.address, self.image.flavor.lfh_full_address_shift)})
                self.space.write(sub.address, bytes(buffer) + bytes(sub.bitmap))
                (available if free else full).append(sub.address)
            buffer = bytearray(f.size("_HEAP_LFH_BUCKET"))
            f.pack(buffer, 0, "_HEAP_LFH_BUCKET", {
                "State.IsBucket": 1, "State.BucketIndex": index,
                "State.AvailableSubsegmentCount": len(available),
                "TotalBlockCount": sum(s.block_count for s in bucket.subsegments),
                "TotalSubsegmentCount": len(bucket.subsegments)})
            self.space.write(bucket.address, bytes(buffer))
            list_offset = f.offset(t, "ListEntry")
            self._write_ring(bucket.address + f.offset(owner, "AvailableSubsegmentList"),
                             [a + list_offset for a in available])
            self._write_ring(bucket.address + f.offset(owner, "FullSubsegmentList"),
                             [a + list_offset for a in full])
            self.space.write_u64(lfh_context + f.offset("_HEAP_LFH_CONTEXT", f"Buckets[{index}]"), bucket.address)

    # -- big and large allocations ---------------------------------------------
    def _allocate_big(self, heap: Heap, kind: PoolKind, size: int, tag: bytes, pool_type: int, state: str,
                      quota_process: int | None) -> Allocation:
        """Requests above 0xFE0 bytes: page aligned, no pool header, tracked in the big page table."""
        pool = self._pool_name(kind)
        free = state == "Free"
        note = "quota charged (not recorded in the image)" if quota_process else ""
        if size <= VS_MAX_BIG:
            need = round_up(size, UNIT)
            sub, chunk, data = self._vs_place(heap, need, big=True, allocated=not free)
            self.tables.add_big(data, need, tag, pool_type, free=free)
            if free:
                record = self._free_record(sub, chunk)
                record.note = (record.note + "; " if record.note else "") + f"freed big {tag_text(tag)} at {data:#x}"
                return record
            self.space.map_page(data)
            chunk.data = data
            chunk.record = self.image.manifest.add(Allocation(
                address=data, size=need, tag=tag_text(tag), pool_type=pool_type, pool=pool, state=state,
                backing="Big", region=kind.label, body=data, note=note))
            return chunk.record
        pages = round_up(size, PAGE) // PAGE
        if size <= CONTEXT1_MAX:
            context = 0 if size <= CONTEXT0_MAX else 1
            unit_bytes = 1 << SEGMENT_CONTEXTS[context][1]
            units = round_up(size, unit_bytes) // unit_bytes
            address = self._allocate_range(heap, context, units, RANGE_COMMITTED_FREE if free else RANGE_ALLOCATED)
            backing = "Big"
        else:
            address = self._next_large_address(heap.region, pages)
            if not free:
                heap.large.append((self._metadata(self.fields.size("_HEAP_LARGE_ALLOC_DATA")), address, pages))
            backing = "Large"
        self.tables.add_big(address, pages * PAGE, tag, pool_type, free=free)
        if not free:
            self.space.map_page(address)
        return self.image.manifest.add(Allocation(
            address=address, size=pages * PAGE, tag=tag_text(tag), pool_type=pool_type, pool=pool, state=state,
            backing=backing, region=kind.label, body=0 if free else address, note=note))

    def _write_large(self, heap: Heap) -> None:
        f = self.fields
        t = "_HEAP_LARGE_ALLOC_DATA"
        node_offset = f.offset(t, "TreeNode")
        nodes = [meta + node_offset for meta, _, _ in sorted(heap.large, key=lambda item: item[1])]
        for meta, va, pages in heap.large:
            buffer = bytearray(f.size(t))
            f.pack(buffer, 0, t, {"VirtualAddress": va})
            f.pack(buffer, 0, t, {"AllocatedPages": pages})
            self.space.write(meta, bytes(buffer))
        self._write_tree(heap.address + f.offset("_SEGMENT_HEAP", "LargeAllocMetadata"), nodes)

    # -- finishing writes --------------------------------------------------------
    def _write_vs_context(self, heap: Heap) -> None:
        f = self.fields
        context = heap.address + f.offset("_SEGMENT_HEAP", "VsContext")
        list_offset = f.offset("_HEAP_VS_SUBSEGMENT", "ListEntry")
        self._write_ring(context + f.offset("_HEAP_VS_CONTEXT", "SubsegmentList"),
                         [sub.address + list_offset for sub in heap.vs_subsegments])
        free_chunks = [c for sub in heap.vs_subsegments for c in sub.chunks if not c.allocated]
        node_offset = f.offset("_HEAP_VS_CHUNK_FREE_HEADER", "Node")
        ordered = sorted(free_chunks, key=lambda c: (c.size, c.address))
        self._write_tree(context + f.offset("_HEAP_VS_CONTEXT", "FreeChunkTree"),
                         [c.address + node_offset for c in ordered])
        total = sum((sub.end - sub.address) // UNIT for sub in heap.vs_subsegments)
        buffer = bytearray(f.size("_HEAP_VS_CONTEXT"))
        f.pack(buffer, 0, "_HEAP_VS_CONTEXT", {
            "TotalCommittedUnits": total,
            "FreeCommittedUnits": sum(c.size // UNIT for c in free_chunks),
            "BackendCtx": heap.address + f.offset("_SEGMENT_HEAP", "SegContexts[0]"),
            "Config.Flags.PageAlignLargeAllocs": 1, "Config.Flags.FullDecommit": 0,
            "Config.Flags.EnableDelayFree": 1})
        for path in ("TotalCommittedUnits", "FreeCommittedUnits", "BackendCtx", "Config"):
            layout = f.layout("_HEAP_VS_CONTEXT", path)
            self.space.write(context + layout.offset, bytes(buffer[layout.offset : layout.offset + layout.size]))

    def _write_segments(self, heap: Heap, context: int) -> None:
        f = self.fields
        mask, shift, maximum = SEGMENT_CONTEXTS[context]
        seg_context = heap.address + f.offset("_SEGMENT_HEAP", f"SegContexts[{context}]")
        first_unit = self._first_unit(context)
        descriptor_size = f.size("_HEAP_PAGE_RANGE_DESCRIPTOR")
        free_nodes: list[tuple[int, int]] = []
        for segment in heap.segments[context]:
            table = bytearray(f.size("_HEAP_PAGE_SEGMENT"))
            f.pack(table, 0, "_HEAP_PAGE_SEGMENT", {
                "Signature": segment_signature(segment.address, seg_context, self.heap_key,
                                               self.image.flavor.page_segment_key)})
            for page_range in self._segment_ranges(segment, first_unit):
                base = page_range.unit * descriptor_size
                values = {"RangeFlags": page_range.flags, "UnitSize": page_range.units}
                if page_range.flags not in (RANGE_UNCOMMITTED_FREE, RANGE_COMMITTED_FREE):
                    values["TreeSignature"] = RANGE_TREE_SIGNATURE
                    if context == 0:
                        values["CommittedPageCount"] = page_range.units
                    for offset in range(1, page_range.units):
                        f.pack(table, base + offset * descriptor_size, "_HEAP_PAGE_RANGE_DESCRIPTOR",
                               {"RangeFlags": RANGE_CONTINUATION, "UnitOffset": offset})
                else:
                    free_nodes.append((page_range.units, segment.address + base))
                f.pack(table, base, "_HEAP_PAGE_RANGE_DESCRIPTOR", values)
            self.space.write(segment.address + f.offset("_HEAP_PAGE_SEGMENT", "Signature"),
                             bytes(table[f.offset("_HEAP_PAGE_SEGMENT", "Signature"):]))
        list_offset = f.offset("_HEAP_PAGE_SEGMENT", "ListEntry")
        self._write_ring(seg_context + f.offset("_HEAP_SEG_CONTEXT", "SegmentListHead"),
                         [segment.address + list_offset for segment in heap.segments[context]])
        self._write_tree(seg_context + f.offset("_HEAP_SEG_CONTEXT", "FreePageRanges"),
                         [node for _, node in sorted(free_nodes)])
        buffer = bytearray(f.size("_HEAP_SEG_CONTEXT"))
        f.pack(buffer, 0, "_HEAP_SEG_CONTEXT", {
            "SegmentMask": mask, "UnitShift": shift, "PagesPerUnitShift": shift - 12,
            "FirstDescriptorIndex": first_unit, "MaxAllocationSize": maximum,
            "LfhContext": heap.address + f.offset("_SEGMENT_HEAP", "LfhContext"),
            "VsContext": heap.address + f.offset("_SEGMENT_HEAP", "VsContext"),
            "Heap": heap.address, "SegmentCount": len(heap.segments[context])})
        end = f.offset("_HEAP_SEG_CONTEXT", "SegmentListHead")
        self.space.write(seg_context, bytes(buffer[:end]))
        count = f.layout("_HEAP_SEG_CONTEXT", "SegmentCount")
        self.space.write(seg_context + count.offset, bytes(buffer[count.offset : count.offset + count.size]))

    @staticmethod
    def _segment_ranges(segment: Segment, first_unit: int) -> list[PageRange]:
        """Allocated ranges as claimed, the gaps between them as coalesced free ranges."""
        allocated = sorted((r for r in segment.ranges if r.flags != RANGE_COMMITTED_FREE), key=lambda r: r.unit)
        freed = [r for r in segment.ranges if r.flags == RANGE_COMMITTED_FREE]
        result: list[PageRange] = []
        unit = first_unit
        for page_range in allocated + [PageRange(256, 0, RANGE_ALLOCATED)]:
            if page_range.unit > unit:
                committed = any(unit <= r.unit < page_range.unit for r in freed)
                result.append(PageRange(unit, page_range.unit - unit,
                                        RANGE_COMMITTED_FREE if committed else RANGE_UNCOMMITTED_FREE))
            if page_range.units:
                result.append(page_range)
            unit = page_range.unit + page_range.units
        return result

    def _write_heap(self, heap: Heap) -> None:
        f = self.fields
        buffer = bytearray(f.offset("_SEGMENT_HEAP", "SegContexts"))
        f.pack(buffer, 0, "_SEGMENT_HEAP", {"Signature": SEGMENT_HEAP_SIGNATURE})
        self.space.write(heap.address, bytes(buffer[: f.offset("_SEGMENT_HEAP", "CommitLimitData")]))
        lfh = heap.address + f.offset("_SEGMENT_HEAP", "LfhContext")
        config = bytearray(f.size("_HEAP_LFH_CONTEXT"))
        f.pack(config, 0, "_HEAP_LFH_CONTEXT", {
            "BackendCtx": heap.address + f.offset("_SEGMENT_HEAP", "SegContexts[0]"),
            "Config.MaxBlockSize": LFH_MAX_BLOCK, "Config.WitholdPageCrossingBlocks": 1})
        start = f.offset("_HEAP_LFH_CONTEXT", "BackendCtx")
        self.space.write(lfh + start, bytes(config[start : start + 8]))
        layout = f.layout("_HEAP_LFH_CONTEXT", "Config")
        self.space.write(lfh + layout.offset, bytes(config[layout.offset : layout.offset + layout.size]))

    def _write_lookasides(self) -> None:
        f = self.fields
        node = self.pool_state + f.offset("_EX_POOL_HEAP_MANAGER_STATE", "PoolNode[0]")
        for index in (0, 1):
            base = node + f.offset("_EX_HEAP_POOL_NODE", f"Lookasides[{index}]")
            enabled = 0
            for bucket in range(LOOKASIDE_BUCKETS):
                entries = self._lookaside.get((index, bucket), [])
                address = base + f.offset("_RTL_DYNAMIC_LOOKASIDE", f"Buckets[{bucket}]")
                depth = max(4, len(entries))
                buffer = bytearray(f.size("_RTL_LOOKASIDE"))
                values = {"Depth": depth, "MaximumDepth": 256, "TotalFrees": len(entries)}
                if entries:
                    enabled |= 1 << bucket
                    values.update({"ListHead.HeaderX64.Depth": len(entries),
                                   "ListHead.HeaderX64.Sequence": len(entries),
                                   "ListHead.HeaderX64.NextEntry": entries[-1] >> 4})
                    for newer, older in zip(entries[1:], entries[:-1]):
                        self.space.write_u64(newer, older)
                    self.space.write_u64(entries[0], 0)
                f.pack(buffer, 0, "_RTL_LOOKASIDE", values)
                self.space.write(address, bytes(buffer))
            header = bytearray(f.offset("_RTL_DYNAMIC_LOOKASIDE", "Buckets"))
            f.pack(header, 0, "_RTL_DYNAMIC_LOOKASIDE", {
                "EnabledBucketBitmap": enabled, "BucketCount": LOOKASIDE_BUCKETS,
                "ActiveBucketCount": bin(enabled).count("1")})
            self.space.write(base, bytes(header[:0x10]))

    def _write_globals(self) -> None:
        f = self.fields
        buffer = bytearray(0x10)
        f.pack(buffer, 0, "_RTLP_HP_HEAP_GLOBALS", {"HeapKey": self.heap_key, "LfhKey": self.lfh_key})
        self.space.write(self.globals_address, bytes(buffer))
        self.space.write_u64(self.image.symbol("ExpPoolQuotaCookie"), self.quota_cookie)
        state = "_EX_POOL_HEAP_MANAGER_STATE"
        self.space.write_u64(self.pool_state + f.offset(state, "HeapManager.Globals"), self.globals_address)
        self.space.write_u32(self.pool_state + f.offset(state, "NumberOfPools"), 1)
        for heap in self.heaps:
            self.space.write_u64(self.pool_state + f.offset(state, f"PoolNode[0].Heaps[{heap.index}]"), heap.address)

    # -- generic kernel lists and trees --------------------------------------------
    def _write_ring(self, head: int, entries: list[int]) -> None:
        """A LIST_ENTRY ring through ``entries`` (addresses of their LIST_ENTRY)."""
        ring = [head] + entries
        for position, entry in enumerate(ring):
            self.space.write(entry, u64(ring[(position + 1) % len(ring)]) + u64(ring[position - 1]))

    def _write_tree(self, tree: int, nodes: list[int]) -> None:
        """An ``_RTL_RB_TREE`` at ``tree`` over ``_RTL_BALANCED_NODE`` addresses in key order (not encoded)."""
        root, links = balanced_rb_tree(nodes)
        for node, link in links.items():
            self.space.write(node, u64(link.left) + u64(link.right) + u64(link.parent | int(link.red)))
        self.space.write(tree, u64(root) + u64(nodes[0] if nodes else 0))
