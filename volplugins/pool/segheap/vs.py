"""VS subsegments: a chain of chunks, each behind a ``_HEAP_VS_CHUNK_HEADER`` encoded with its own address.

Each chunk header gives the next one's address, so the chain is walked in order over one buffer of the
subsegment's pages; a header that does not decode, or that lies on an unreadable page, breaks the walk with a
Finding, and the walk picks the chain up again at the first later header from which it runs consistently to
the subsegment's end.  Allocated chunks are listed at their pool header (size = BlockSize * unit); free ones at their VS
chunk header, with the chunk size and, as tag, bytes 4..8 of the still-encoded header (what WinDbg prints).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np

from .. import poolheader
from ..columns import ALLOCATED, CACHED_FREE, FREE, NO_POOL_TYPE, Columns, columns, joined
from ..kernel import MASK64, PAGE_SIZE, FieldLayout, Fields, Kernel, page_base
from ..model import Backing, Chunk, Finding, State
from .chunks import Walk, cached_rows, is_cached, pool_chunk
from .decoders import VsHeader, vs_block_has_pool_header, vs_pool_header_address, vs_subsegment_signature_ok
from .layout import SegHeapLayout, reports_missing_symbols

SIDE_BY_SIDE = 32  # subsegments from which chains are followed side by side (each step costs the same for all)
Extent = tuple[Chunk | Finding, int, int]  # an item and the [start, end) of its VS chunk, chunk header included


@dataclass(frozen=True)
class VsChain:
    """A VS subsegment's chunks: the plain ones as rows of columns (shared by the subsegments decoded together)
    with their VS chunk extents, the ones that needed the general path as items, and the finding that ended
    the walk early (None: it reached the end)."""

    plain: Columns | None
    rows: np.ndarray  # this subsegment's rows of ``plain``
    starts: np.ndarray  # [starts, ends) of the VS chunk of every row of ``plain``, chunk header included
    ends: np.ndarray
    general: list[Extent]
    stop: Finding | None

    def extents(self) -> list[Extent]:
        """Every chunk with its VS chunk's extent in address order, then the stop finding."""
        listed: list[Extent] = list(self.general)
        if self.plain is not None:
            listed += zip(self.plain.chunks(self.rows), self.starts[self.rows].tolist(), self.ends[self.rows].tolist())
            listed.sort(key=_extent_start)
        if self.stop is not None:
            listed.append((self.stop, self.stop.address, self.stop.address))
        return listed


def _extent_start(extent: Extent) -> int:
    return extent[1]


def vs_walk(walk: Walk, subsegment: int, heap_key: int) -> Iterator[Extent]:
    """The chunks of the VS subsegment at ``subsegment`` in address order, each with its VS chunk's extent."""
    yield from vs_chain(walk, subsegment, heap_key).extents()


def vs_chain(walk: Walk, subsegment: int, heap_key: int) -> VsChain:
    """The chunks of the VS subsegment at ``subsegment``, the plain ones as columns."""
    followed = vs_follow(walk, subsegment, heap_key)
    if followed.__class__ is Finding:
        return vs_stopped(followed)
    return vs_list([followed])[1][0]


def vs_stopped(finding: Finding) -> VsChain:
    """The chain of a subsegment that has none, and why."""
    nothing = np.zeros(0, dtype=np.int64)
    return VsChain(None, nothing, nothing, nothing, [], finding)


class VsLinks(NamedTuple):
    """A subsegment's chain followed from its first chunk: what listing its chunks needs."""

    walk: Walk
    buffer: "_Buffer"
    offsets: np.ndarray  # of each chunk header of the chain in ``buffer``
    sizes: np.ndarray  # of each chunk, header included
    allocated: np.ndarray  # each chunk's Allocated bit
    stop: Finding | None  # what ended it early
    joined: bytes  # the buffers of the subsegments followed together, joined: ``buffer.data`` from ``at`` on
    at: int


def vs_follow(walk: Walk, subsegment: int, heap_key: int) -> VsLinks | Finding:
    """The chain of the VS subsegment at ``subsegment``, or why it has none."""
    return vs_follow_many([(walk, subsegment)], heap_key)[0]


def vs_follow_many(subsegments: list[tuple[Walk, int]], heap_key: int) -> list[VsLinks | Finding]:
    """:func:`vs_follow` of many VS subsegments of one heap (each with its walk), their chunk header candidates
    decoded in one pass: a subsegment holds a few thousand candidates, too few to pay for numpy on its own."""
    found: list[VsLinks | Finding | None] = []
    spans: list[tuple[int, Walk, _Buffer, int, int]] = []  # (position, walk, buffer, first, end)
    for walk, subsegment in subsegments:
        layout = walk.layout
        head = walk.pages.read(subsegment, layout.vs_subsegment_size)
        if head is None:
            found.append(Finding(subsegment, "VS subsegment header unreadable"))
            continue
        size = layout.vs_sub_size.extract(head)
        signature = layout.vs_sub_signature.extract(head)
        if not vs_subsegment_signature_ok(size, signature):
            found.append(Finding(subsegment, f"VS subsegment signature {signature:#x} does not match size {size:#x}"))
            continue
        end = subsegment + size * layout.unit
        first = subsegment + -(-layout.vs_subsegment_size // layout.unit) * layout.unit
        spans.append((len(found), walk, _Buffer(*walk.pages.buffer(first, end)), first, end))
        found.append(None)
    if spans:
        layout = spans[0][1].layout
        bounds = [(buffer, first, end) for _, _, buffer, first, end in spans]
        joined = b"".join(buffer.data for buffer, _, _ in bounds)
        lengths = np.array([len(buffer.data) for buffer, _, _ in bounds], dtype=np.int64)
        starts = np.cumsum(lengths) - lengths  # of each buffer in ``joined``
        clean = (_clean_chains(bounds, joined, starts, heap_key, layout) if len(spans) >= SIDE_BY_SIDE
                 else [None] * len(spans))
        rest = [index for index, chain in enumerate(clean) if chain is None]
        every = _Links.many([bounds[index] for index in rest], joined, starts[rest], heap_key, layout)
        for index, links in zip(rest, every):
            chain, stop = links.follow()
            clean[index] = (links.offsets[chain], links.sizes[chain], links.allocated[chain], stop)
        for (position, walk, buffer, _, _), (offsets, sizes, allocated, stop), at in zip(spans, clean,
                                                                                       starts.tolist()):
            found[position] = VsLinks(walk, buffer, offsets, sizes, allocated, stop, joined, at)
    return found


def _clean_chains(spans: list[tuple["_Buffer", int, int]], data: bytes, starts: np.ndarray, heap_key: int,
                  layout: SegHeapLayout) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, None] | None]:
    """The chains of many subsegments ((buffer, first chunk, end) each; their buffers joined in ``data``, each
    from ``starts``) followed side by side, one header of each per step: (header offsets, sizes, Allocated bits,
    None) of each chain that runs cleanly to its subsegment's
    end, None for one that does not (:class:`_Links` then decodes every candidate of that subsegment to find out
    where and why it breaks, and to pick it up again).

    Only the headers on the chain are decoded: a subsegment has a few thousand pool-block boundaries but a few
    dozen chunks.  A chain is clean when :meth:`_Links.follow` would take it whole: every size fits, every header
    is readable and every PreviousSize matches the size before it.
    """
    unit, header_size = layout.unit, layout.vs_header_size
    count = len(spans)
    fields = Fields(data)
    missing = _missing_pages(spans, starts, len(data))
    key = np.uint64(heap_key & MASK64)
    broken = np.array([bool(buffer.holes) and not buffer.whole_pages for buffer, _, _ in spans], dtype=bool)
    # The state of each chain still followed, row by row; rows leave as their chain ends or breaks.
    chain = np.flatnonzero(~broken)
    lead = np.array([first - buffer.base for buffer, first, _ in spans], dtype=np.int64)[chain]
    base = starts[chain] + lead  # where the chain's first chunk lies in ``data``
    origin = np.array([first for _, first, _ in spans], dtype=np.uint64)[chain]  # the first chunk's address
    room = np.array([end - first for _, first, end in spans], dtype=np.int64)[chain]
    held = np.array([min(end, buffer.end) - first for buffer, first, end in spans], dtype=np.int64)[chain]
    here = np.zeros(len(chain), dtype=np.int64)  # the next header, from the first chunk
    expected = np.full(len(chain), -1, dtype=np.int64)  # the size its PreviousSize must give (-1: first link)
    steps: list[tuple[np.ndarray, ...]] = []
    while len(chain):
        ending = here + header_size
        going = ending <= room  # the others ran cleanly to their subsegment's end
        fits = ending <= held
        if not fits.all():  # a header past the bytes read
            broken[chain[going & ~fits]] = True
            fits &= going
        else:
            fits = going
        if not fits.all():
            chain, lead, base, origin, room, held, here, expected = (
                column[fits] for column in (chain, lead, base, origin, room, held, here, expected))
        at = base + here
        words = fields.field(at, layout.vs_header_bits) ^ (origin + here.astype(np.uint64)) ^ key
        sizes = (_column(words, layout.vs_unsafe_size) * np.uint64(unit)).astype(np.int64)
        previous = (_column(words, layout.vs_unsafe_prev_size) * np.uint64(unit)).astype(np.int64)
        fits = (sizes >= header_size) & (here + sizes <= room) & ((expected < 0) | (previous == expected))
        if missing is not None:
            fits &= ~missing[at // PAGE_SIZE] & ~missing[(at + header_size - 1) // PAGE_SIZE]
        if not fits.all():
            broken[chain[~fits]] = True
            chain, lead, base, origin, room, held, here, sizes, words = (
                column[fits] for column in (chain, lead, base, origin, room, held, here, sizes, words))
        steps.append((chain, lead + here, sizes, _column(words, layout.vs_allocated) != 0))
        expected = sizes
        here = here + sizes
    if not steps:
        return [None if broken[index] else _empty_chain() for index in range(count)]
    owners, offsets, sizes, allocated = (np.concatenate(column) for column in zip(*steps))
    order = np.argsort(owners, kind="stable")  # each chain's links stay in step order
    edges = np.searchsorted(owners[order], np.arange(count + 1)).tolist()
    return [None if broken[index] else (offsets[mine], sizes[mine], allocated[mine], None)
            for index, mine in enumerate(order[edges[index] : edges[index + 1]] for index in range(count))]


def _empty_chain() -> tuple[np.ndarray, np.ndarray, np.ndarray, None]:
    nothing = np.zeros(0, dtype=np.int64)
    return nothing, nothing, np.zeros(0, dtype=bool), None


def _missing_pages(spans: list[tuple["_Buffer", int, int]], starts: np.ndarray, size: int) -> np.ndarray | None:
    """Which pages of the subsegments' buffers joined into one could not be read (None: all could).  Only the
    holes of buffers of whole pages are placed: their pages are pages of the joined bytes (a chain over any
    other buffer with holes is not followed side by side)."""
    if not any(buffer.holes for buffer, _, _ in spans):
        return None
    missing = np.zeros(size // PAGE_SIZE + 1, dtype=bool)
    for (buffer, _, _), start in zip(spans, starts.tolist()):
        for page in buffer.holes if buffer.whole_pages else ():
            missing[(start + page - buffer.base) // PAGE_SIZE] = True
    return missing


class _Buffer:
    """The subsegment's bytes from ``base``, and which of its pages could not be read."""

    def __init__(self, data: bytes, base: int, holes: frozenset[int]):
        self.data, self.base, self.holes, self.end = data, base, holes, base + len(data)

    @property
    def whole_pages(self) -> bool:
        """Whether the buffer holds whole pages from a page boundary."""
        return self.base % PAGE_SIZE == 0 == len(self.data) % PAGE_SIZE

    def readable(self, offsets: np.ndarray, size: int) -> np.ndarray:
        """Which of the ``size``-byte pieces at buffer ``offsets`` (each at most a page) avoid unreadable pages."""
        lead = self.base % PAGE_SIZE
        missing = np.zeros((lead + len(self.data)) // PAGE_SIZE + 1, dtype=bool)
        missing[[(page - self.base + lead) // PAGE_SIZE for page in self.holes]] = True
        return ~missing[(offsets + lead) // PAGE_SIZE] & ~missing[(offsets + lead + size - 1) // PAGE_SIZE]


class _Links:
    """The chunk header candidates of a subsegment, every one decoded at once.

    Chunks start on pool-block boundaries, so decoding every boundary's header (each XORed with its own
    address) in one pass and then following the sizes from the first chunk walks the chain with a few
    list lookups per chunk.
    """

    def __init__(self, first: int, end: int, layout: SegHeapLayout, offsets: np.ndarray, words: np.ndarray,
                 sizes: np.ndarray, previous: np.ndarray, allocated: np.ndarray, readable: np.ndarray | None):
        self.first, self.end, self.layout = first, end, layout
        self.count = len(offsets)
        self.offsets = offsets  # of each candidate in the subsegment's buffer
        self.words = words  # each candidate's header word, decoded
        self.sizes, self.previous, self.allocated = sizes, previous, allocated  # in bytes; the Allocated bit
        self.readable = readable  # None: every candidate is

    @classmethod
    def many(cls, spans: list[tuple[_Buffer, int, int]], data: bytes, starts: np.ndarray, heap_key: int,
             layout: SegHeapLayout) -> list["_Links"]:
        """The candidates of many subsegments ((buffer, first chunk, end) each; their buffers held in ``data``,
        each from ``starts``), decoded in one pass."""
        unit, header_size = layout.unit, layout.vs_header_size
        counts = np.array([max((min(end, buffer.end) - header_size - first) // unit + 1, 0)
                           for buffer, first, end in spans], dtype=np.int64)
        owner = np.repeat(np.arange(len(spans)), counts)
        steps = np.arange(len(owner), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        firsts = np.array([first for _, first, _ in spans], dtype=np.uint64)
        leads = np.array([first - buffer.base for buffer, first, _ in spans], dtype=np.int64)
        offsets = leads[owner] + steps * unit
        raw = Fields(data).field(starts[owner] + offsets, layout.vs_header_bits)
        words = raw ^ (firsts[owner] + steps.astype(np.uint64) * np.uint64(unit)) ^ np.uint64(heap_key & MASK64)
        sizes = (_column(words, layout.vs_unsafe_size) * np.uint64(unit)).astype(np.int64)
        previous = (_column(words, layout.vs_unsafe_prev_size) * np.uint64(unit)).astype(np.int64)
        allocated = _column(words, layout.vs_allocated) != 0
        bounds = np.cumsum(counts).tolist()
        out = []
        for (buffer, first, end), low, high in zip(spans, [0] + bounds[:-1], bounds):
            mine = offsets[low:high]
            readable = buffer.readable(mine, header_size) if buffer.holes else None
            out.append(cls(first, end, layout, mine, words[low:high], sizes[low:high], previous[low:high],
                           allocated[low:high], readable))
        return out

    def follow(self) -> tuple[np.ndarray, Finding | None]:
        """The candidates the chain goes through, and the finding that ended it early (None: it reached the end).

        The sizes alone lead from link to link; readability and the PreviousSize back links are then checked
        for the whole chain at once; at its first bad link the chain is broken (the finding) and picked up
        again where it can be (:meth:`_resumed`).
        """
        unit, header_size, end = self.layout.unit, self.layout.vs_header_size, self.end
        sizes = memoryview(self.sizes)  # plain ints, index by index, without converting the whole array
        chain: list[int] = []
        index, address, count = 0, self.first, self.count
        while address + header_size <= end and index < count:
            size = sizes[index]
            if size < header_size or address + size > end:
                break
            chain.append(index)
            index += size // unit
            address += size
        links = np.array(chain, dtype=np.int64)
        bad = np.zeros(len(links), dtype=bool)
        bad[1:] = self.previous[links[1:]] != self.sizes[links[:-1]]
        if self.readable is not None:
            bad |= ~self.readable[links]
        broken = np.flatnonzero(bad)
        if len(broken):
            links = links[: broken[0] + 1]
            index = int(links[-1])
            links = links[:-1]
        elif address + header_size > end:
            return links, None
        finding = self._finding(index, links)
        resumed = self._resumed(int(links[-1]) + 1 if len(links) else 0)
        return (np.concatenate([links, resumed]) if len(resumed) else links), finding

    def _resumed(self, start: int) -> np.ndarray:
        """The chain picked up again after a broken link, as ``!pool`` walks on past a bad header: from the
        first candidate at or after ``start`` whose chain runs, every back link agreeing, to the subsegment's
        end.  At least two links are asked for, so one stray word that happens to span the rest of the
        subsegment is not taken for a chunk; empty when no such chain exists."""
        unit, header_size, end = self.layout.unit, self.layout.vs_header_size, self.end
        sizes, previous = self.sizes.tolist(), self.previous.tolist()
        readable = self.readable.tolist() if self.readable is not None else None
        length = [0] * (self.count + 1)  # links of the consistent chain from each candidate to the end (0: none)
        for index in range(self.count - 1, start - 1, -1):
            size, address = sizes[index], self.first + index * unit
            if size < header_size or address + size > end or (readable is not None and not readable[index]):
                continue
            following = index + size // unit
            if address + size + header_size > end:
                length[index] = 1
            elif following < self.count and previous[following] == size and length[following]:
                length[index] = length[following] + 1
        first = next((index for index in range(start, self.count) if length[index] >= 2), None)
        chain: list[int] = []
        while first is not None and first < self.count and length[first]:
            chain.append(first)
            first += sizes[first] // unit
        return np.array(chain, dtype=np.int64)

    def _finding(self, index: int, links: np.ndarray) -> Finding:
        """Why the chain cannot go on at candidate ``index`` (``links``: the good links before it)."""
        address = self.first + index * self.layout.unit
        if index >= self.count or (self.readable is not None and not self.readable[index]):
            return Finding(address, "VS chunk header unreadable")
        previous = int(self.sizes[links[-1]]) if len(links) else None
        header = VsHeader(self.layout.vs_memory_cost.of(int(self.words[index])), int(self.sizes[index]),
                          int(self.previous[index]), bool(self.allocated[index]))
        return Finding(address, _link_problem(header, address, self.end, previous, self.layout.vs_header_size))


def _column(values: np.ndarray, where: FieldLayout) -> np.ndarray:
    """A field of many structures each held whole in one integer (see ``FieldLayout.of``)."""
    return (values >> np.uint64(where.shift)) & np.uint64(where.mask)


def _link_problem(header: VsHeader, chunk: int, end: int, previous: int | None, header_size: int) -> str:
    """Why the chunk header at ``chunk`` breaks the chain, or '' when it fits."""
    if header.size < header_size:
        return f"VS chunk size {header.size:#x} too small"
    if chunk + header.size > end:
        return f"VS chunk size {header.size:#x} runs past the subsegment end {end:#x}"
    if previous is not None and header.previous_size != previous:
        return f"VS chunk previous size {header.previous_size:#x} != {previous:#x}"
    return ""


def vs_list(followed: list[VsLinks]) -> tuple[Columns | None, list[VsChain]]:
    """The chunks of the chains of many VS subsegments of one heap, decoded together (a subsegment holds a few
    dozen chunks, too few to pay for numpy on its own): free ones at their chunk header, allocated ones at
    their pool header.  The plain ones of all come as one set of columns, which every chain indexes."""
    if not followed:
        return None, []
    walk = followed[0].walk
    layout, unit = walk.layout, walk.layout.unit
    rows = _ChainRows(followed)
    fields = rows.fields
    free = np.flatnonzero(~rows.allocated)
    # Like !pool, report previous size 0 for free chunks: on the segment heap only cache-aligned pool headers
    # use it.  Their tag is bytes 4..8 of the still-encoded header (see vs_free_tag).
    free_tag = FieldLayout(layout.vs_header_bits.offset + 4, 4)
    free_rows = columns(rows.chunks[free], rows.sizes[free], np.zeros(len(free)),
                        fields.field(rows.joined[free], free_tag), np.full(len(free), FREE),
                        np.full(len(free), NO_POOL_TYPE), np.zeros(len(free)), Backing.VS, walk.pool)
    busy, headers, pool_types = _pool_headers(rows, layout)
    at = rows.offsets[rows.owner[busy]] + headers
    addresses = rows.bases[rows.owner[busy]] + headers.astype(np.uint64)
    bodies = addresses + np.uint64(unit)
    cached = cached_rows(walk.cached, rows.chunks[busy] + np.uint64(layout.vs_header_size), addresses, bodies)
    busy_rows = columns(addresses, fields.field(at, layout.pool.block_size) * np.uint64(unit),
                        fields.field(at, layout.pool.previous_size) * np.uint64(unit),
                        fields.field(at, layout.pool.pool_tag), np.where(cached, CACHED_FREE, ALLOCATED), pool_types,
                        bodies, Backing.VS, walk.pool,
                        quota=poolheader.charged_processes(fields, at, addresses, pool_types, layout.pool, walk.cookie))
    source = np.concatenate([free, busy])  # the chain row of every plain row
    plain = joined(free_rows, busy_rows)
    starts = rows.chunks[source]
    ends = starts + rows.sizes[source].astype(np.uint64)
    general: list[list[Extent]] = [[] for _ in followed]
    general_rows = rows.allocated.copy()
    general_rows[busy] = False
    for row in np.flatnonzero(general_rows).tolist():
        owner, chunk = int(rows.owner[row]), int(rows.chunks[row])
        chunk_end = chunk + int(rows.sizes[row])
        general[owner].append((_general(followed[owner].walk, chunk, chunk_end), chunk, chunk_end))
    return plain, [VsChain(plain, chain_rows, starts, ends, extents, item.stop)
                   for item, chain_rows, extents in zip(followed, _grouped(rows.owner[source], len(followed)),
                                                        general)]


class _ChainRows:
    """The links of many chains as rows: which chain, VS chunk address and size, allocated bit, and where the
    chunk header lies in the chains' buffers joined into one."""

    def __init__(self, followed: list[VsLinks]):
        lengths = np.array([len(item.buffer.data) for item in followed], dtype=np.int64)
        if all(item.joined is followed[0].joined for item in followed):  # followed together: joined already
            self.data = followed[0].joined
            self.offsets = np.array([item.at for item in followed], dtype=np.int64)
        else:
            self.data = b"".join(item.buffer.data for item in followed)
            self.offsets = np.cumsum(lengths) - lengths  # where each chain's buffer starts in ``data``
        self.fields = Fields(self.data)
        self.lengths = lengths
        self.bases = np.array([item.buffer.base for item in followed], dtype=np.uint64)
        self.owner = np.repeat(np.arange(len(followed)), [len(item.offsets) for item in followed])
        self.local = np.concatenate([item.offsets for item in followed]).astype(np.int64)
        self.chunks = self.bases[self.owner] + self.local.astype(np.uint64)
        self.joined = self.offsets[self.owner] + self.local
        self.sizes = np.concatenate([item.sizes for item in followed]).astype(np.int64)
        self.allocated = np.concatenate([item.allocated for item in followed])
        self.followed = followed


def _grouped(owners: np.ndarray, count: int) -> list[np.ndarray]:
    """The rows of each of ``count`` owners, in row order."""
    order = np.argsort(owners, kind="stable")
    bounds = np.searchsorted(owners[order], np.arange(count + 1))
    return [order[bounds[index] : bounds[index + 1]] for index in range(count)]


def _pool_headers(rows: _ChainRows, layout: SegHeapLayout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The allocated rows with a plain pool header, with (offset in their buffer, PoolType) of that header;
    chunks that need more (no header, a header on an unreadable page, a cache-aligned body) are left to the
    general path."""
    unit, header_size, pool_layout = layout.unit, layout.vs_header_size, layout.pool
    busy = np.flatnonzero(rows.allocated)
    owner = rows.owner[busy]
    heap_blocks = rows.local[busy] + header_size  # buffer offsets
    moved = (rows.bases[owner] % np.uint64(PAGE_SIZE)).astype(np.int64) + heap_blocks
    moved = moved % PAGE_SIZE == PAGE_SIZE - unit  # see vs_pool_header_address
    headers = heap_blocks + np.where(moved, unit, 0)
    block_sizes = rows.sizes[busy] - header_size
    plain = np.where(moved, block_sizes <= PAGE_SIZE, block_sizes <= PAGE_SIZE - unit)  # vs_block_has_pool_header
    plain &= headers + unit <= rows.lengths[owner]
    for index, item in enumerate(rows.followed):
        if item.buffer.holes:
            mine = owner == index
            plain[mine] &= item.buffer.readable(headers[mine], unit)
    busy, headers = busy[plain], headers[plain]
    pool_types = rows.fields.field(rows.offsets[rows.owner[busy]] + headers, pool_layout.pool_type)
    plain = (pool_types & np.uint64(pool_layout.cache_aligned_bit)) == 0
    return busy[plain], headers[plain], pool_types[plain]


def _general(walk: Walk, chunk: int, chunk_end: int) -> Chunk:
    unit = walk.layout.unit
    heap_block = chunk + walk.layout.vs_header_size
    block_size = chunk_end - heap_block
    if not vs_block_has_pool_header(heap_block, block_size, unit):
        # Big requests are handed out page aligned: padding between the chunk header and the page may precede.
        start = min(page_base(heap_block + PAGE_SIZE - 1), chunk_end)
        state = State.CACHED_FREE if is_cached(walk.cached, heap_block, start) else State.ALLOCATED
        return Chunk(start, chunk_end - start, 0, b"", state, Backing.VS, walk.pool, body=start)
    address = vs_pool_header_address(heap_block, unit)
    found = pool_chunk(walk, address, Backing.VS, True, heap_block)
    return found if found.state is not State.UNREADABLE else replace(found, size=chunk_end - address)


@reports_missing_symbols
def vs_chunks(
    kernel: Kernel, subsegment_address: int, heap_key: int, pool: str = "", cached: frozenset[int] = frozenset()
) -> Iterator[Chunk | Finding]:
    """Chunks of one VS subsegment in address order (see the module notes)."""
    for item, _, _ in vs_walk(Walk.of(kernel, pool, cached), subsegment_address, heap_key):
        yield item
