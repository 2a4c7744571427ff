"""VS subsegments: a chain of chunks, each behind a ``_HEAP_VS_CHUNK_HEADER`` encoded with its own address.

Each chunk header gives the next one's address, so the chain is walked in order over one buffer of the
subsegment's pages; a header that does not decode, or that lies on an unreadable page, ends the walk with a
Finding.  Allocated chunks are listed at their pool header (size = BlockSize * unit); free ones at their VS
chunk header, with the chunk size and, as tag, bytes 4..8 of the still-encoded header (what WinDbg prints).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

from .. import poolheader
from ..kernel import PAGE_SIZE, Kernel, page_base
from ..model import Backing, Chunk, Finding, State, new_chunk
from .chunks import Walk, is_cached, pool_chunk
from .decoders import (VsHeader, decode_vs_header, vs_block_has_pool_header, vs_free_tag, vs_pool_header_address,
                       vs_subsegment_signature_ok)
from .layout import reports_missing_symbols

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

    def holds(self, address: int, size: int) -> bool:
        """Whether [address, address + size) (at most a page) lies in the buffer on readable pages."""
        if address < self.base or address + size > self.end:
            return False
        return not self.holes or (page_base(address) not in self.holes
                                  and page_base(address + size - 1) not in self.holes)


def _chain(walk: Walk, buffer: _Buffer, chunk: int, end: int, heap_key: int) -> Iterator[Extent]:
    layout = walk.layout
    header_size, bits, data, base = layout.vs_header_size, layout.vs_header_bits, buffer.data, buffer.base
    pool, free, vs = walk.pool, State.FREE, Backing.VS
    previous: int | None = None
    while chunk + header_size <= end:
        if not buffer.holds(chunk, header_size):
            yield Finding(chunk, "VS chunk header unreadable"), chunk, chunk
            return
        at = chunk - base
        header = decode_vs_header(bits.extract(data, at), chunk, heap_key, layout)
        problem = _link_problem(header, chunk, end, previous, header_size)
        if problem:
            yield Finding(chunk, problem), chunk, chunk
            return
        chunk_end = chunk + header.size
        if header.allocated:
            yield _allocated(walk, buffer, chunk, chunk_end), chunk, chunk_end
        else:
            # Like !pool, report previous size 0: on the segment heap only cache-aligned pool headers use it.
            tag = vs_free_tag(data[at : at + header_size], layout)
            yield new_chunk(chunk, header.size, 0, tag, free, vs, pool, None), chunk, chunk_end
        previous = header.size
        chunk = chunk_end


def _link_problem(header: VsHeader, chunk: int, end: int, previous: int | None, header_size: int) -> str:
    """Why the chunk header at ``chunk`` breaks the chain, or '' when it fits."""
    if header.size < header_size:
        return f"VS chunk size {header.size:#x} too small"
    if chunk + header.size > end:
        return f"VS chunk size {header.size:#x} runs past the subsegment end {end:#x}"
    if previous is not None and header.previous_size != previous:
        return f"VS chunk previous size {header.previous_size:#x} != {previous:#x}"
    return ""


def _allocated(walk: Walk, buffer: _Buffer, chunk: int, chunk_end: int) -> Chunk:
    """An allocated VS block, its pool header decoded from the buffer.

    Headerless blocks, headers on unreadable pages, cache-aligned bodies and quota charges need more than the
    header's first fields and take the general path.
    """
    pool_layout, unit = walk.layout.pool, walk.layout.unit
    heap_block = chunk + walk.layout.vs_header_size
    address = vs_pool_header_address(heap_block, unit)
    if not vs_block_has_pool_header(heap_block, chunk_end - heap_block, unit) or not buffer.holds(address, unit):
        return _general(walk, chunk, chunk_end)
    header = poolheader.decode(buffer.data, pool_layout, address - buffer.base)
    if header.pool_type & (pool_layout.cache_aligned_bit | poolheader.QUOTA_BIT):
        return _general(walk, chunk, chunk_end)
    body = address + unit
    cached = walk.cached
    state = State.CACHED_FREE if cached and (heap_block in cached or address in cached or body in cached) \
        else State.ALLOCATED
    return new_chunk(address, header.block_size, header.previous_size, header.tag, state, Backing.VS, walk.pool,
                     header.pool_type, body)


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
