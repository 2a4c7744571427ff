"""Every chunk of every pool of an image, in one pass: the walker behind the pool census and the benchmark.

Two pool designs, one answer:

* Segment heap (Windows 10 19H1+ and 11): every heap under ``ExPoolState``, every segment of its segment
  contexts, every busy page range read in one go and cut into its VS chunks, LFH blocks (never-allocated slots
  included, as free blocks) or, for a range allocated whole, one allocation.  Blocks without a pool header
  (page-aligned VS blocks, whole ranges) are named by the big page table entry at their address.
* Classic pool (Windows 7 to 10 1809): the mapped pages of the pool regions, found through the layer's own
  mapping (which skips a missing page table level at once, so the 128 GiB paged pool VA costs what is mapped),
  read in large blocks; the PreviousSize/BlockSize chain of every page is checked for all pages of a block at
  once with numpy, and only pages whose chain covers the page exactly are pool pages.  Other kernel data lives
  in these regions too (tag tables, big allocation bodies): such pages are counted, not reported, unless their
  first header looks like a pool header and the chain then breaks, which is corruption.

The big page table completes both: allocations no walk met (the VA manager's "large" allocations, classic big
pages) and freed entries whose memory no walked chunk occupies now.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
from volatility3.framework import exceptions

from . import bigchunks, bigpages, classic, poolheader, segheap, translate
from . import spans as pool_spans
from .census import CensusRow, Tally, census
from .columns import ALLOCATED, FREE, NO_BODY, Columns
from .kernel import PAGE_SIZE, SYMBOLS_MISSING, Fields, Kernel
from .model import BUSY_STATES, Backing, Chunk, Finding
from .tags import printable_tag

__all__ = ["Coverage", "PoolScan", "Census", "CensusRow", "census", "census_of", "scan_pools", "iter_chunks"]

Progress = Callable[[float, str], None]
Item = Chunk | Finding | Columns  # what the walkers hand over: plain chunks come as columns

BLOCK_BYTES = 4 << 20  # largest single read of pool pages
SEGMENTS_AT_ONCE = 8  # segment heap segments decoded together (1 MiB each on x64)
_WALK_STOPS = (*SYMBOLS_MISSING, exceptions.InvalidAddressException)  # end a walk; what it found stays


@dataclass
class Coverage:
    """How much of the pools the answer covers, and what it cost."""

    explains = True  # whether missing pages are told apart by cause (a class attribute, not a measure)

    heaps: int = 0
    segments: int = 0
    subsegments: int = 0  # VS and LFH subsegments walked
    pages_walked: int = 0  # pages read: busy page ranges (segment heap), mapped pool-region pages (classic)
    pages_unreadable: int = 0  # pages missing, whatever the cause: the three counts below
    # By cause; None where the walk cannot tell (see _classic_pool and _segment_heap for which it counts)
    pages_paged_out: int | None = None  # their entry names a pagefile, prototype or transition page
    pages_not_in_image: int | None = None  # mapped to a physical page the image does not hold
    pages_unmapped: int | None = None  # no page at all
    big_entries: int = 0  # in-use big page table entries, live and freed
    vs_subsegments: int = 0
    lfh_subsegments: int = 0
    whole_ranges: int = 0  # segment page ranges allocated as one block
    classic_pages: int = 0  # pages whose chunk chain covers the page exactly
    pages_validated: int = 0  # of those, pages taken for pool on their own chain alone (no region bookkeeping)
    segments_validated: int = 0  # segments on no heap list, taken for pool on their own signatures
    pages_not_pool: int = 0  # mapped pool-region pages that hold no chunk chain (other data, big allocations)
    bytes_read: int = 0
    seconds: float = 0.0

    def add_missing(self, absence: translate.Absence) -> None:
        """Count pages the walk could not read, by cause."""
        for cause in ("paged_out", "not_in_image", "unmapped"):
            pages, counted = getattr(absence, cause), getattr(self, f"pages_{cause}")
            if counted is not None or pages:
                setattr(self, f"pages_{cause}", (counted or 0) + pages)
        self.pages_unreadable += absence.pages


class _Uncounted(Coverage):
    """The coverage of a walk nobody asks about (a tally): missing pages are counted, but their causes, which
    cost a page-table walk for every run of them, are not looked up."""

    explains = False


@dataclass
class PoolScan:
    chunks: list[Chunk] = field(default_factory=list)  # address order, no duplicates
    findings: list[Finding] = field(default_factory=list)
    coverage: Coverage = field(default_factory=Coverage)
    # Address order: [start, end) spans whose chunks were found by page validation (pages or page ranges).
    validated: list[tuple[int, int]] = field(default_factory=list)

    def found_by_validation(self, address: int) -> bool:
        """Whether the chunk at ``address`` was found by page validation rather than through bookkeeping."""
        position = bisect.bisect_right(self.validated, (address, 1 << 64)) - 1
        return position >= 0 and address < self.validated[position][1]


def scan_pools(kernel: Kernel, progress: Progress | None = None) -> PoolScan:
    """Every chunk of every pool, sorted by address, with the problems met and the coverage reached."""
    result = PoolScan()
    for batch in _batches(kernel, progress, result.coverage, result.validated):
        for item in batch:
            if item.__class__ is Columns:
                result.chunks.extend(item.chunks())
            elif item.__class__ is Chunk:
                result.chunks.append(item)
            else:
                result.findings.append(item)
    result.chunks.sort(key=_address)
    result.validated.sort()
    return result


@dataclass
class Census:
    """A whole-pool census, and what else the walk was asked to note."""

    rows: list[CensusRow]
    findings: list[Finding]
    holders: list[Chunk]  # in address order: the walked chunks holding one of the watched addresses


def census_of(kernel: Kernel, progress: Progress | None = None, watched: Iterable[int] = ()) -> Census:
    """The census of every pool (free space that names no allocation grouped per pool), the problems met,
    and the chunks that hold any of the ``watched`` addresses.

    Chunks are counted a batch at a time as the walk goes and then dropped, so memory stays flat whatever
    the image size.
    """
    tally = Tally(group_untagged=True)
    result = Census([], [], [])
    marks = sorted(set(watched))
    mark_column = np.array(marks, dtype=np.uint64)
    for batch in _batches(kernel, progress, _Uncounted()):
        walked = []
        for item in batch:
            if item.__class__ is Columns:
                tally.add_columns(item)
                result.holders.extend(item.holding(mark_column))
            elif item.__class__ is Chunk:
                walked.append(item)
            else:
                result.findings.append(item)
        tally.add(walked)
        if marks:
            result.holders.extend(chunk for chunk in walked if _holds_any(chunk, marks))
    result.rows = tally.rows()
    result.holders.sort(key=_address)
    return result


def _holds_any(chunk: Chunk, marks: list[int]) -> bool:
    index = bisect.bisect_left(marks, chunk.address)
    return index < len(marks) and marks[index] < chunk.end


def iter_chunks(kernel: Kernel, progress: Progress | None = None,
                coverage: Coverage | None = None) -> Iterator[Chunk | Finding]:
    """The streaming form of :func:`scan_pools`: chunks in walk order (heap by heap, or region by region,
    then the big page table), findings as they are met.  ``progress(percent, message)`` is called along
    the way with 0..100, as Volatility's progress callbacks take it; ``coverage`` is filled in when given."""
    for batch in _batches(kernel, progress, coverage if coverage is not None else _Uncounted()):
        for item in batch:
            if item.__class__ is Columns:
                yield from item.chunks()
            else:
                yield item


def _address(chunk: Chunk) -> int:
    return chunk.address


def _batches(kernel: Kernel, progress: Progress | None, coverage: Coverage,
             validated: list[tuple[int, int]] | None = None) -> Iterator[list[Item]]:
    """What :func:`iter_chunks` yields, a segment or a block of pages at a time, plain chunks as columns: a
    whole-pool walk makes a hundred thousand chunks, and a generator step (or a record) for each one costs
    more than decoding it."""
    report = progress or (lambda percent, message: None)
    started = time.perf_counter()
    table = bigpages.read_big_page_table(kernel)
    yield list(table.findings)
    coverage.big_entries = len(table.allocations)
    starts: list[np.ndarray | list[int]] = []  # of every chunk listed, a batch at a time
    sizes: list[np.ndarray | list[int]] = []
    try:
        walk = _segment_heap if kernel.uses_segment_heap else _classic_pool
        for batch in walk(kernel, table, coverage, report, [] if validated is None else validated):
            records = [item for item in batch if item.__class__ is Chunk]
            starts += [item.address for item in batch if item.__class__ is Columns] + [[c.address for c in records]]
            sizes += [item.size for item in batch if item.__class__ is Columns] + [[c.size for c in records]]
            yield batch
    except SYMBOLS_MISSING as error:
        yield [Finding(0, f"pool scan: kernel symbols lack {error}")]
    except exceptions.InvalidAddressException as error:
        yield [Finding(error.invalid_address, f"pool scan stopped: {error}")]
    report(95.0, "Big page table")
    listed = bigchunks.Extents(np.concatenate([np.asarray(part, dtype=np.uint64) for part in starts] or [[]]),
                               np.concatenate([np.asarray(part, dtype=np.uint64) for part in sizes] or [[]]))
    yield list(bigchunks.unwalked(kernel, table, listed))
    coverage.seconds = time.perf_counter() - started
    report(100.0, "Pool scan complete")


# --------------------------------------------------------------------------- segment heap


def _segment_heap(kernel: Kernel, table: bigpages.BigPageTable, coverage: Coverage, report: Progress,
                  validated: list[tuple[int, int]]) -> Iterator[list[Item]]:
    """Every segment the heap lists lead to; when they do not lead everywhere, then every other segment whose
    own signature validates (its ranges recorded in ``validated``)."""
    keys = segheap.heap_keys(kernel)
    if isinstance(keys, Finding):
        yield [keys]
        return
    problem = segheap.layout_problem(kernel)
    if problem:
        yield [Finding(_pool_state(kernel), problem)]
        return
    coverage.pages_paged_out = coverage.pages_not_in_image = coverage.pages_unmapped = 0  # every cause, any layer
    walker = _SegmentWalker(kernel, keys, segheap.cached_free_addresses(kernel),
                            {a.va: a for a in table.allocations if not a.free}, coverage)
    heaps = segheap.pool_heaps(kernel)
    walked: set[int] = set()
    for number, heap in enumerate(heaps):
        if isinstance(heap, Finding):
            yield [heap]
            continue
        coverage.heaps += 1
        found = list(segheap.segments(kernel, heap, keys.heap_key))
        group: list[segheap.Segment] = []
        for position, segment in enumerate(found):
            if isinstance(segment, Finding):
                yield [segment]
                continue
            walked.add(segment.address)
            group.append(segment)
            if len(group) == SEGMENTS_AT_ONCE or position == len(found) - 1:
                report(95.0 * (number + position / len(found)) / len(heaps),
                       f"{heap.pool} heap {heap.address:#x}: segment {segment.address:#x}")
                yield from walker.walk(group)
                group = []
        if group:
            yield from walker.walk(group)
    if segheap.listed(kernel).complete:
        return
    report(95.0, "Segments found by page validation")
    for segment in segheap.validated_segments(kernel, keys.heap_key):
        if segment.address not in walked:
            coverage.segments_validated += 1
            yield from walker.walk([segment], validated)


def _pool_state(kernel: Kernel) -> int:
    return kernel.symbol_address("ExPoolState") if kernel.has_symbol("ExPoolState") else 0


@dataclass
class _SegmentWalker:
    """What walking one segment needs, fixed for one scan."""

    kernel: Kernel
    keys: segheap.HeapKeys
    cached: frozenset[int]
    live_big: dict[int, bigpages.BigAllocation]
    coverage: Coverage

    def walk(self, segments: list[segheap.Segment],
             validated: list[tuple[int, int]] | None = None) -> Iterator[list[Item]]:
        """The chunks and findings of segments of one heap as one batch; the spans of their busy ranges go to
        ``validated``."""
        self.coverage.segments += len(segments)
        batch: list[Item] = []
        try:
            _segment_chunks(self.kernel, segments, self.keys, self.cached, self.live_big, self.coverage, batch,
                            validated)
        except _WALK_STOPS:
            yield batch
            raise
        yield batch


def _segment_chunks(kernel: Kernel, segments: list[segheap.Segment], keys: segheap.HeapKeys,
                    cached: frozenset[int], live_big: dict[int, bigpages.BigAllocation], coverage: Coverage,
                    out: list[Item], validated: list[tuple[int, int]] | None = None) -> None:
    """Append the chunks and findings of segments of one heap to ``out``: their page ranges are read, then
    decoded together; the span of each busy range goes to ``validated`` when given."""
    ranges: list[segheap.ranges.Read | Finding] = []
    for segment in segments:
        found = list(segheap.page_ranges(kernel, segment))
        busy = [item for item in found if item.__class__ is not Finding]
        mapped = _Mapped.of(kernel, busy[0].address, busy[-1].address + busy[-1].size) if busy else None
        for page_range in found:
            if page_range.__class__ is Finding:
                ranges.append(page_range)
                continue
            _count_range(page_range.kind, coverage)
            if validated is not None:
                validated.append((page_range.address, page_range.address + page_range.size))
            data, holes = _read_range(kernel, page_range.address, page_range.size, coverage, mapped)
            ranges.append((page_range, data, holes))
    for item in segheap.ranges_chunks(kernel, ranges, keys, cached):
        if item.__class__ is Chunk and not item.tag and _headerless(item):
            out.extend(_named_by_big_table(kernel, item, live_big))
        else:
            out.append(item)


def _count_range(kind: segheap.RangeKind, coverage: Coverage) -> None:
    if kind is segheap.RangeKind.VS:
        coverage.vs_subsegments += 1
    elif kind is segheap.RangeKind.LFH:
        coverage.lfh_subsegments += 1
    else:
        coverage.whole_ranges += 1
    coverage.subsegments = coverage.vs_subsegments + coverage.lfh_subsegments


def _headerless(chunk: Chunk) -> bool:
    """A busy block the walker found no pool header for: a page-aligned VS block or a whole page range."""
    return chunk.pool_type is None and chunk.state in BUSY_STATES and not chunk.tag


def _named_by_big_table(kernel: Kernel, chunk: Chunk,
                        live_big: dict[int, bigpages.BigAllocation]) -> Iterator[Chunk | Finding]:
    """Tag, size and backing of a headerless block come from its big page table entry."""
    entry = live_big.get(chunk.address)
    if entry is None:
        yield Finding(chunk.address, f"busy {chunk.backing.value} block of {chunk.size:#x} bytes has no pool header"
                                     " and no big page table entry")
        yield chunk
        return
    yield bigchunks.big_chunk(kernel, entry, walked=chunk)


def _read_range(kernel: Kernel, start: int, size: int, coverage: Coverage,
                mapped: "_Mapped | None" = None) -> tuple[bytes, frozenset[int]]:
    """The bytes of [start, start + size), zeros on the pages that could not be read, and those pages: each
    physically contiguous piece of the layer's mapping (taken from ``mapped`` when it covers the range) read
    straight into its place."""
    pieces = list(mapped.within(start, size) if mapped is not None else _mapping(kernel, start, size))
    view = memoryview(bytearray(size))
    done = _fill_pieces(kernel, view, [(offset - start, length, target, below)
                                       for offset, length, target, _, below in pieces])
    read = [(offset, length) for (offset, length, *_), ok in zip(pieces, done) if ok]
    got = sum(length for _, length in read)
    coverage.bytes_read += got
    if got == size:
        coverage.pages_walked += size // PAGE_SIZE
        return view.tobytes(), frozenset()
    held = {page for offset, length in read for page in range(offset, offset + length, PAGE_SIZE)}
    missing = [page for page in range(start, start + size, PAGE_SIZE) if page not in held]
    coverage.pages_walked += size // PAGE_SIZE - len(missing)
    if not coverage.explains:
        coverage.pages_unreadable += len(missing)
    else:
        for first, count in _page_runs(missing):
            coverage.add_missing(_absence(kernel, first, count))
    return view.tobytes(), frozenset(missing)


def _page_runs(addresses: list[int]) -> Iterator[tuple[int, int]]:
    """(first page, pages) of each run of consecutive pages among ``addresses`` (page addresses, in order)."""
    start = None
    for position, address in enumerate(addresses):
        if start is None:
            start, count = address, 0
        count += 1
        if position + 1 == len(addresses) or addresses[position + 1] != address + PAGE_SIZE:
            yield start, count
            start = None


def _absence(kernel: Kernel, start: int, pages: int) -> translate.Absence:
    """Why ``pages`` pages from ``start`` could not be read; one that is mapped and held but whose read failed
    anyway counts as not in the image."""
    found = translate.absence(kernel.context, kernel.layer_name, start, pages * PAGE_SIZE)
    return replace(found, not_in_image=found.not_in_image + pages - found.pages)


def _fill_pieces(kernel: Kernel, view: memoryview, pieces: list[tuple[int, int, int, str]]) -> list[bool]:
    """Read each piece (position in ``view``, length, physical address, layer below) straight into its place;
    whether each could be read."""
    fillers: dict[str, translate.Filler] = {}  # the pieces nearly always share one layer below
    done = []
    for position, length, target, layer_name in pieces:
        if layer_name not in fillers:
            fillers[layer_name] = translate.physical_filler(kernel.context, layer_name)
        done.append(_fill(fillers[layer_name], target, view[position : position + length]))
    return done


def _fill(fill: translate.Filler, target: int, view: memoryview) -> bool:
    """Read the layer below into ``view`` from ``target``; False when it refuses."""
    try:
        fill(target, view)
    except exceptions.InvalidAddressException:
        return False
    return True


def _mapping(kernel: Kernel, start: int, size: int) -> Iterator[tuple[int, int, int, int, str]]:
    """The layer's own mapping, computed from the page tables in bulk (see :mod:`.translate`)."""
    return translate.mapping(kernel.context, kernel.layer_name, start, size)


@dataclass(frozen=True)
class _Mapped:
    """The mapping of a span translated once, then cut for each range inside it: a segment holds dozens of
    busy ranges, and a translation costs the same whatever the span's size."""

    pieces: list[translate.Mapping]
    ends: list[int]  # where each piece ends

    @classmethod
    def of(cls, kernel: Kernel, start: int, end: int) -> "_Mapped":
        pieces = list(_mapping(kernel, start, end - start))
        return cls(pieces, [piece[0] + piece[1] for piece in pieces])

    def within(self, start: int, size: int) -> list[translate.Mapping]:
        """The pieces of [start, start + size), as ``_mapping`` of that range gives them."""
        end, out = start + size, []
        for offset, length, target, _, layer_name in self.pieces[bisect.bisect_right(self.ends, start):]:
            if offset >= end:
                break
            low, high = max(offset, start), min(offset + length, end)
            out.append((low, high - low, target + low - offset, high - low, layer_name))
        return out


# --------------------------------------------------------------------------- classic pool


@dataclass(frozen=True)
class _ClassicDecoder:
    """What decoding classic pages needs, fixed for one kernel."""

    layout: poolheader.HeaderLayout
    cookie: int | None
    page_size: int
    pool_names: dict[int, str]  # header PoolType -> pool, filled as types are met

    @classmethod
    def of(cls, kernel: Kernel) -> "_ClassicDecoder":
        layout = poolheader.header_layout(kernel)
        return cls(layout, poolheader.quota_cookie(kernel), kernel.page_size, {})

    def pool_name(self, pool_type: int) -> str:
        name = self.pool_names.get(pool_type)
        if name is None:
            name = self.pool_names[pool_type] = self.layout.pool_name(pool_type)
        return name


def _classic_pool(kernel: Kernel, table: bigpages.BigPageTable, coverage: Coverage, report: Progress,
                  validated: list[tuple[int, int]]) -> Iterator[list[Item]]:
    """The pool pages of every span; pages of the validation spans whose own chain validates go to
    ``validated``."""
    decoder = _ClassicDecoder.of(kernel)
    live = sorted((a.va, a.end) for a in table.allocations if not a.free and a.size > 0)
    big_starts = np.array([start for start, _ in live], dtype=np.uint64)
    big_reach = np.maximum.accumulate(np.array([end for _, end in live] or [0], dtype=np.uint64))
    spans = pool_spans.with_validation(kernel)
    total = sum(span.end - span.start for span in spans) or 1
    done = 0
    tables = translate.page_tables(kernel.context, kernel.layer_name) if coverage.explains else None
    if tables is not None:
        coverage.pages_paged_out = coverage.pages_not_in_image = 0
    gathered = _Gathered(kernel, decoder.page_size)
    for span in spans:
        validating = span.validating
        if tables is not None and not validating:
            _count_missing_in_region(tables, span, coverage)
        for offset, length, target, _, layer_name in _mapping(kernel, span.start, span.end - span.start):
            while length > 0:
                take = min(length, BLOCK_BYTES - gathered.size)
                if gathered.add(offset, take, target, layer_name) >= BLOCK_BYTES:
                    report(95.0 * (done + offset - span.start) / total, f"{span.name}: pages at {offset:#x}")
                    yield from _classic_group(gathered.take(coverage), span, decoder, big_starts, big_reach,
                                              coverage, validated)
                offset, target, length = offset + take, target + take, length - take
        if gathered.size:
            yield from _classic_group(gathered.take(coverage), span, decoder, big_starts, big_reach, coverage,
                                      validated)
        done += span.end - span.start


class _Gathered:
    """Mapped pieces of a span gathered into blocks of about BLOCK_BYTES, each block read straight into one
    buffer.  The chain walk costs a few numpy calls per step whatever the block's size, and pool pages lie
    scattered in physical memory: a read per page, too many to make a bytes object of each and join them.

    The buffer is reused from block to block (a block's chunks are decoded into arrays and records of their own
    before the next block is read): memory the process has not touched yet costs a page fault per page."""

    def __init__(self, kernel: Kernel, page_size: int):
        self.kernel, self.page_size = kernel, page_size
        # (position in the block, address, length, physical address, layer below) of each piece
        self.pieces: list[tuple[int, int, int, int, str]] = []
        self.size = 0
        self._buffer = bytearray()

    def add(self, address: int, length: int, target: int, layer_name: str) -> int:
        """Add a piece; the size gathered so far."""
        self.pieces.append((self.size, address, length, target, layer_name))
        self.size += length
        return self.size

    def take(self, coverage: Coverage) -> tuple[bytes | memoryview, np.ndarray]:
        """The bytes of the pieces that could be read and the address of each of their pages (the others are
        counted as not in the image), valid until the next block is taken; the gathering starts over."""
        if len(self._buffer) < self.size:
            self._buffer = bytearray(self.size)
        view = block = memoryview(self._buffer)[: self.size]
        done = _fill_pieces(self.kernel, view, [(position, length, target, below)
                                                for position, _, length, target, below in self.pieces])
        read: list[tuple[int, int, int]] = []  # (position in the block, address, length)
        for (position, address, length, _, _), ok in zip(self.pieces, done):
            if ok:
                read.append((position, address, length))
            else:
                coverage.add_missing(translate.Absence(not_in_image=length // self.page_size))
        if len(read) < len(self.pieces):  # leave out what could not be read
            block = b"".join(view[at : at + length] for at, _, length in read)
        self.pieces, self.size = [], 0
        counts = np.array([length // self.page_size for _, _, length in read], dtype=np.int64)
        firsts = np.array([address for _, address, _ in read], dtype=np.uint64)
        steps = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        pages = np.repeat(firsts, counts) + steps.astype(np.uint64) * np.uint64(self.page_size)
        coverage.bytes_read += len(block)
        coverage.pages_walked += len(pages)
        return block, pages


def _classic_group(group: tuple[bytes | memoryview, np.ndarray], span: pool_spans.Span, decoder: _ClassicDecoder,
                   big_starts: np.ndarray, big_reach: np.ndarray, coverage: Coverage,
                   validated: list[tuple[int, int]]) -> Iterator[list[Item]]:
    """The chunks of a group of runs as one batch; with a validation span, its pool pages go to ``validated``."""
    data, page_addresses = group
    if not len(page_addresses):
        return
    in_big, starts = _chain_starts(page_addresses, big_starts, big_reach, decoder.page_size)
    batch: list[Item] = []
    before = coverage.classic_pages
    try:
        batch.extend(_classic_block(data, page_addresses, span.pool, decoder, in_big, starts, coverage,
                                    span.validating))
    except _WALK_STOPS:
        yield batch
        raise
    if span.validating:
        coverage.pages_validated += coverage.classic_pages - before
        validated.extend(_pages_of(batch, decoder.page_size))
    yield batch


def _count_missing_in_region(tables: translate.PageTables, span: pool_spans.Span, coverage: Coverage) -> None:
    """Pages of a pool region that are paged out or not in the image.

    Counted only where the page tables are read in bulk: page by page, a region of gigabytes would cost a
    translation per page.  Unmapped pages are never counted: a classic pool region is reserved address space
    that pool fills as it grows, and nothing says which of its pages should be there."""
    found = tables.absence(span.start, span.end - span.start)
    coverage.add_missing(replace(found, unmapped=0))


def _pages_of(batch: list[Item], page_size: int) -> list[tuple[int, int]]:
    """The pages the chunks of a batch lie on, as [start, end) spans."""
    pages: set[int] = set()
    for item in batch:
        if item.__class__ is Columns:
            pages.update((item.address & ~np.uint64(page_size - 1)).tolist())
        elif item.__class__ is Chunk:
            pages.add(item.address & ~(page_size - 1))
    return [(page, page + page_size) for page in sorted(pages)]


def _chain_starts(pages: np.ndarray, starts: np.ndarray, reach: np.ndarray,
                  page_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pages wholly inside a live big allocation, and where the chain of every other page starts: at the
    page start, or at the end of a big allocation that ends inside the page (``reach``: running maximum
    of the ends of the allocations sorted by start)."""
    offsets = np.zeros(len(pages), dtype=np.int64)
    if not len(starts):
        return np.zeros(len(pages), dtype=bool), offsets
    position = np.searchsorted(starts, pages, side="right").astype(np.int64) - 1
    covering = position >= 0
    end = np.where(covering, reach[np.maximum(position, 0)], np.uint64(0))
    inside = covering & (end >= pages + np.uint64(page_size))
    tail = covering & (end > pages) & ~inside
    offsets[tail] = (end[tail] - pages[tail]).astype(np.int64)
    return inside, offsets


def _classic_block(data: bytes, pages: np.ndarray, pool: str, decoder: _ClassicDecoder, in_big: np.ndarray,
                   starts: np.ndarray, coverage: Coverage, validating: bool = False) -> Iterator[Item]:
    """The chunks of every page of a block (``pages``: the address of each of its pages) whose chain is
    complete; findings for pool pages that break, unless ``validating`` (pages outside known pool regions,
    where a broken chain means no pool at all).

    A page whose chain neither starts at ``starts`` nor at the page start may be the last page of a big
    allocation the big page table does not describe: its chain is searched for from the page's bytes."""
    layout, page_size = decoder.layout, decoder.page_size
    headers = Fields(data)
    page_offsets = np.arange(len(data) // page_size, dtype=np.int64) * page_size
    first = page_offsets + starts
    candidates = np.flatnonzero(~in_big & (headers.field(first, layout.previous_size) == 0)
                                & (headers.field(first, layout.block_size) != 0))
    complete, where = _walk_chains(data, first[candidates], page_offsets[candidates] + page_size, layout,
                                   page_size)
    coverage.classic_pages += int(complete.sum())
    unexplained = ~in_big
    unexplained[candidates[complete]] = False
    searched = np.flatnonzero(unexplained)
    tails = list(_tail_pages(data, pages, searched, pool, decoder))
    coverage.classic_pages += len(tails)
    coverage.pages_not_pool += len(page_offsets) - int(complete.sum()) - len(tails)
    found_tails = {walk.page for walk in tails}
    if not validating:
        broken = [page for page in candidates[~complete].tolist() if int(pages[page]) not in found_tails]
        yield from _broken_pages(data, pages, broken, starts, decoder)
    yield from _classic_chunks(data, headers, where, pages, pool, decoder)
    for walk in tails:
        yield from walk.chunks


def _walk_chains(data: bytes, first: np.ndarray, ends: np.ndarray, layout: poolheader.HeaderLayout,
                 page_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Walk many chains at once from their first headers (byte positions in the block) to ``ends``; which of
    them end there exactly, with every PreviousSize matching, and the sorted header positions of those.

    The two size fields of every unit of the block are decoded once; each step of the walk only indexes them."""
    unit = layout.unit
    count = len(data) // unit
    previous_sizes = layout.previous_size.column(data, count, unit)
    block_sizes = layout.block_size.column(data, count, unit)
    offsets = first.copy()
    expected = np.zeros(len(first), dtype=np.uint64)
    alive = np.ones(len(first), dtype=bool)
    positions, owners = [], []
    for _ in range(page_size // unit):
        active = np.flatnonzero(alive & (offsets < ends))
        if not len(active):
            break
        where = offsets[active]
        previous = previous_sizes[where // unit]
        blocks = block_sizes[where // unit]
        sizes = blocks.astype(np.int64) * unit
        fits = (previous == expected[active]) & (blocks != 0) & (where + sizes <= ends[active])
        alive[active[~fits]] = False
        good = active[fits]
        positions.append(where[fits])
        owners.append(good)
        expected[good] = blocks[fits]
        offsets[good] += sizes[fits]
    complete = alive & (offsets == ends)
    if not positions:
        return complete, np.zeros(0, dtype=np.int64)
    where = np.concatenate(positions)
    return complete, np.sort(where[complete[np.concatenate(owners)]])


def _tail_pages(data: bytes, addresses: np.ndarray, pages: np.ndarray, pool: str,
                decoder: _ClassicDecoder) -> Iterator[classic.PageWalk]:
    """Complete chains of big allocations' last pages among ``pages`` (indices into ``addresses``, the address
    of each page of ``data``), found by their 'Frag' header."""
    layout, page_size = decoder.layout, decoder.page_size
    if not len(pages):
        return
    tag = np.frombuffer(classic.FRAG_TAG, dtype="<u4")[0]
    tags = np.frombuffer(data, dtype="<u4")[layout.pool_tag.offset // 4 :: layout.unit // 4]
    per_page = page_size // layout.unit
    marked = tags[: len(data) // layout.unit].reshape(-1, per_page)[pages] == tag
    for page in pages[marked.any(axis=1)].tolist():
        content = bytes(data[page * page_size : (page + 1) * page_size])
        start = classic.tail_start(content, layout, page_size)
        if start is not None:
            yield classic.parse_page(content, int(addresses[page]), layout, decoder.cookie, pool, start)


def _classic_chunks(data: bytes, headers: Fields, where: np.ndarray, pages: np.ndarray, pool: str,
                    decoder: _ClassicDecoder) -> Iterator[Chunk | Columns]:
    """The chunks whose headers are at ``where`` (``pages``: the address of each page of ``data``), as columns."""
    layout, unit, page_size = decoder.layout, decoder.layout.unit, decoder.page_size
    if not len(where):
        return
    types = headers.field(where, layout.pool_type)
    allocated = types != 0
    addresses = pages[where // page_size] + (where % page_size).astype(np.uint64)
    kinds, pool_index = np.unique(types, return_inverse=True)
    pools = tuple(decoder.pool_name(kind) if kind else pool for kind in kinds.tolist())
    quota = poolheader.charged_processes(headers, where, addresses, types, layout, decoder.cookie)
    yield Columns(addresses, (headers.field(where, layout.block_size) * np.uint64(unit)).astype(np.int64),
                  (headers.field(where, layout.previous_size) * np.uint64(unit)).astype(np.int64),
                  headers.field(where, layout.pool_tag), np.where(allocated, ALLOCATED, FREE).astype(np.uint8),
                  types.astype(np.int64), np.where(allocated, addresses + np.uint64(unit), np.uint64(NO_BODY)),
                  pool_index.astype(np.uint8).reshape(-1),
                  np.zeros(len(where), dtype=np.uint64) if quota is None else quota, pools, Backing.PAGE,
                  layout.pool_tag.size)


def _broken_pages(data: bytes, addresses: np.ndarray, pages: list[int], starts: np.ndarray,
                  decoder: _ClassicDecoder) -> Iterator[Finding]:
    """Pages (indices into ``addresses``, the address of each page of ``data``) whose first header looks like a
    pool header (printable tag) but whose chain breaks."""
    tag_at, tag_size = decoder.layout.pool_tag.offset, decoder.layout.pool_tag.size
    for page in pages:
        start = page * decoder.page_size
        first = start + int(starts[page])
        if not printable_tag(bytes(data[first + tag_at : first + tag_at + tag_size])):
            continue
        content = bytes(data[start : start + decoder.page_size])
        address = int(addresses[page])
        walk = classic.parse_page(content, address, decoder.layout, decoder.cookie, start=int(starts[page]))
        for finding in walk.findings:
            yield Finding(finding.address, f"pool page {address:#x}: {finding.reason}")
