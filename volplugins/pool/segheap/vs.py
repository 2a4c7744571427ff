"""VS subsegments: a chain of chunks, each behind a ``_HEAP_VS_CHUNK_HEADER`` encoded with its own address.

Each chunk header gives the next one's address, so the chain is walked in order over one buffer of the
subsegment's pages; a header that does not decode, or that lies on an unreadable page, ends the walk with a
Finding.  Allocated chunks are listed at their pool header (size = BlockSize * unit); free ones at their VS
chunk header, with the chunk size and, as tag, bytes 4..8 of the still-encoded header (what WinDbg prints).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import numpy as np

from .. import poolheader
from ..kernel import PAGE_SIZE, FieldLayout, Fields, Kernel, page_base
from ..model import Backing, Chunk, Finding, State, new_chunk
from .chunks import Walk, is_cached, pool_chunk
from .decoders import VsHeader, vs_block_has_pool_header, vs_pool_header_address, vs_subsegment_signature_ok
from .layout import SegHeapLayout, reports_missing_symbols

Extent = tuple[Chunk | Finding, int, int]  # an item and the [start, end) of its VS chunk, chunk header included


def vs_walk(walk: Walk, subsegment: int, heap_key: int) -> Iterator[Extent]:
    """The chunks of the VS subsegment at ``subsegment`` in address order, each with its VS chunk's extent."""
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
    first = subsegment + -(-layout.vs_subsegment_size // layout.unit) * layout.unit
    yield from _chain(walk, _Buffer(*walk.pages.buffer(first, end)), first, end, heap_key)


class _Buffer:
    """The subsegment's bytes from ``base``, and which of its pages could not be read."""

    def __init__(self, data: bytes, base: int, holes: frozenset[int]):
        self.data, self.base, self.holes, self.end = data, base, holes, base + len(data)

    def readable(self, offsets: np.ndarray, size: int) -> np.ndarray:
        """Which of the ``size``-byte pieces at buffer ``offsets`` (each at most a page) avoid unreadable pages."""
        lead = self.base % PAGE_SIZE
        missing = np.zeros((lead + len(self.data)) // PAGE_SIZE + 1, dtype=bool)
        missing[[(page - self.base + lead) // PAGE_SIZE for page in self.holes]] = True
        return ~missing[(offsets + lead) // PAGE_SIZE] & ~missing[(offsets + lead + size - 1) // PAGE_SIZE]


def _chain(walk: Walk, buffer: _Buffer, chunk: int, end: int, heap_key: int) -> Iterator[Extent]:
    links = _Links(buffer, chunk, end, heap_key, walk.layout)
    chain, stop = links.follow()
    yield from _listed(walk, buffer, links, chain)
    if stop is not None:
        yield stop, stop.address, stop.address


class _Links:
    """The chunk header candidates of a subsegment, every one decoded at once.

    Chunks start on pool-block boundaries, so decoding every boundary's header (each XORed with its own
    address) in one pass and then following the sizes from the first chunk walks the chain with a few
    list lookups per chunk.
    """

    def __init__(self, buffer: _Buffer, first: int, end: int, heap_key: int, layout: SegHeapLayout):
        self.first, self.end, self.layout = first, end, layout
        unit, header_size = layout.unit, layout.vs_header_size
        last = min(end, buffer.end) - header_size  # the last address a header can be read from
        self.count = (last - first) // unit + 1 if last >= first else 0
        steps = np.arange(self.count, dtype=np.uint64)
        self.offsets = np.int64(first - buffer.base) + steps.astype(np.int64) * unit
        raw = Fields(buffer.data).field(self.offsets, layout.vs_header_bits)
        self.words = raw ^ (np.uint64(first) + steps * np.uint64(unit)) ^ np.uint64(heap_key & _WORD)
        self.sizes = (_column(self.words, layout.vs_unsafe_size) * np.uint64(unit)).astype(np.int64)
        self.previous = (_column(self.words, layout.vs_unsafe_prev_size) * np.uint64(unit)).astype(np.int64)
        self.allocated = _column(self.words, layout.vs_allocated) != 0
        self.readable = buffer.readable(self.offsets, header_size) if buffer.holes else None

    def follow(self) -> tuple[np.ndarray, Finding | None]:
        """The candidates the chain goes through, and the finding that ended it early (None: it reached the end).

        The sizes alone lead from link to link; readability and the PreviousSize back links are then checked
        for the whole chain at once, and the chain ends at its first bad link.
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
        return links, self._finding(index, links)

    def _finding(self, index: int, links: np.ndarray) -> Finding:
        """Why the chain cannot go on at candidate ``index`` (``links``: the good links before it)."""
        address = self.first + index * self.layout.unit
        if index >= self.count or (self.readable is not None and not self.readable[index]):
            return Finding(address, "VS chunk header unreadable")
        previous = int(self.sizes[links[-1]]) if len(links) else None
        header = VsHeader(self.layout.vs_memory_cost.of(int(self.words[index])), int(self.sizes[index]),
                          int(self.previous[index]), bool(self.allocated[index]))
        return Finding(address, _link_problem(header, address, self.end, previous, self.layout.vs_header_size))


_WORD = (1 << 64) - 1


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


def _listed(walk: Walk, buffer: _Buffer, links: _Links, chain: np.ndarray) -> Iterator[Extent]:
    """The chain's chunks: free ones at their chunk header, allocated ones at their pool header."""
    layout, unit, data = walk.layout, walk.layout.unit, buffer.data
    free_tag = layout.vs_header_bits.offset + 4  # bytes 4..8 of the still-encoded header (see vs_free_tag)
    busy = links.allocated[chain]
    headers = _pool_headers(walk, buffer, links, chain[busy])
    pool, free, vs, cached = walk.pool, State.FREE, Backing.VS, walk.cached
    base, first = buffer.base, links.first
    tag_at, tag_end = layout.pool.pool_tag.offset, layout.pool.pool_tag.offset + layout.pool.pool_tag.size
    for index, size, allocated in zip(chain.tolist(), links.sizes[chain].tolist(), busy.tolist()):
        chunk = first + index * unit
        chunk_end = chunk + size
        if not allocated:
            # Like !pool, report previous size 0: on the segment heap only cache-aligned pool headers use it.
            at = chunk - base + free_tag
            yield new_chunk(chunk, size, 0, data[at : at + 4], free, vs, pool, None), chunk, chunk_end
            continue
        decoded = headers.get(index)
        if decoded is None:
            yield _general(walk, chunk, chunk_end), chunk, chunk_end
            continue
        address, block_size, previous_size, pool_type = decoded
        heap_block, body, at = chunk + layout.vs_header_size, address + unit, address - base
        state = State.CACHED_FREE if cached and (heap_block in cached or address in cached or body in cached) \
            else State.ALLOCATED
        yield new_chunk(address, block_size, previous_size, data[at + tag_at : at + tag_end], state, vs, pool,
                        pool_type, body), chunk, chunk_end


def _pool_headers(walk: Walk, buffer: _Buffer, links: _Links,
                  busy: np.ndarray) -> dict[int, tuple[int, int, int, int]]:
    """(address, BlockSize, PreviousSize, PoolType) of the plain pool headers of the allocated chunks, by
    candidate; chunks that need more (no header, a header on an unreadable page, a cache-aligned body, a
    quota charge) are left to the general path."""
    if not len(busy):
        return {}
    layout, unit, header_size = walk.layout, walk.layout.unit, walk.layout.vs_header_size
    pool_layout = layout.pool
    index = busy
    heap_blocks = links.offsets[index] + header_size  # buffer offsets
    moved = (buffer.base % PAGE_SIZE + heap_blocks) % PAGE_SIZE == PAGE_SIZE - unit  # see vs_pool_header_address
    headers = heap_blocks + np.where(moved, unit, 0)
    block_sizes = links.sizes[index] - header_size
    plain = np.where(moved, block_sizes <= PAGE_SIZE, block_sizes <= PAGE_SIZE - unit)  # vs_block_has_pool_header
    plain &= headers + unit <= len(buffer.data)
    if buffer.holes:
        plain &= buffer.readable(headers, unit)
    index, headers = index[plain], headers[plain]
    fields = Fields(buffer.data)
    pool_types = fields.field(headers, pool_layout.pool_type)
    plain = (pool_types & np.uint64(pool_layout.cache_aligned_bit | poolheader.QUOTA_BIT)) == 0
    index, headers, pool_types = index[plain], headers[plain], pool_types[plain]
    block_sizes = fields.field(headers, pool_layout.block_size) * np.uint64(unit)
    previous_sizes = fields.field(headers, pool_layout.previous_size) * np.uint64(unit)
    addresses = [buffer.base + offset for offset in headers.tolist()]
    return dict(zip(index.tolist(), zip(addresses, block_sizes.tolist(), previous_sizes.tolist(),
                                        pool_types.tolist())))


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
