"""What the VS and LFH walks share: the walk's context, and a chunk from its pool header."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .. import poolheader
from ..columns import Columns
from ..kernel import Kernel
from ..model import Backing, Chunk, State
from ..poolheader import PoolHeader
from .layout import SegHeapLayout, layout_of
from .reads import Pages, global_value
from .segments import PageRange


@dataclass(frozen=True)
class Walk:
    """What every chunk walk carries along: where to read, how to decode, how to label."""

    kernel: Kernel
    pages: Pages
    layout: SegHeapLayout
    pool: str
    cached: frozenset[int]
    cookie: int | None  # ExpPoolQuotaCookie, for quota charges

    @classmethod
    def of(cls, kernel: Kernel, pool: str, cached: frozenset[int]) -> "Walk":
        return cls(kernel, Pages(kernel), layout_of(kernel), pool, cached, poolheader.quota_cookie(kernel))

    def field(self, base: int, type_name: str, path: str) -> int | None:
        where = self.kernel.field_layout(type_name, path)
        data = self.pages.read(base + where.offset, where.size)
        return None if data is None else where.alone.extract(data)


@dataclass(frozen=True)
class Decoded:
    """Blocks of subsegments: the plain ones as columns, those that needed the full decode as records."""

    plain: Columns | None
    others: list[Chunk]

    def items(self) -> list[Chunk]:
        """Every block as a record, in address order."""
        listed = list(self.others)
        if self.plain is not None:
            listed += self.plain.chunks()
            listed.sort(key=_address)
        return listed


def _address(chunk: Chunk) -> int:
    return chunk.address


def _body(walk: Walk, header: PoolHeader, address: int) -> int:
    """The caller's body; a cache-aligned block may carry a second header whose PreviousSize points back here."""
    unit, aligned = walk.layout.unit, walk.layout.pool.cache_aligned_bit
    plain = address + unit
    if not header.pool_type & aligned:
        return plain
    cache_line = global_value(walk.kernel, "ExpCacheLineSize", 4)
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


def is_cached(cached: frozenset[int], *addresses: int) -> bool:
    """Lookaside and delay-free entries are taken to point at the heap block, the pool header or the body."""
    return not cached.isdisjoint(addresses)


def cached_rows(cached: frozenset[int], *addresses: np.ndarray) -> np.ndarray:
    """:func:`is_cached` for many chunks at once: ``addresses`` are columns (uint64) of candidate addresses."""
    hit = np.zeros(len(addresses[0]), dtype=bool)
    if cached:
        known = _cached_array(cached)
        for column in addresses:
            hit |= known[np.minimum(np.searchsorted(known, column), len(known) - 1)] == column
    return hit


@functools.lru_cache(maxsize=4)
def _cached_array(cached: frozenset[int]) -> np.ndarray:
    return np.array(sorted(cached), dtype=np.uint64)


def pool_chunk(
    walk: Walk, address: int, backing: Backing, allocated: bool, heap_block: int, size: int | None = None
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
        state = State.CACHED_FREE if is_cached(walk.cached, heap_block, address, body) else State.ALLOCATED
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


def whole_range(walk: Walk, page_range: PageRange) -> Chunk:
    """A range allocated as one block: no pool header (its tag and size live in the big page table)."""
    start = page_range.address
    state = State.CACHED_FREE if is_cached(walk.cached, start) else State.ALLOCATED
    return Chunk(start, page_range.size, 0, b"", state, Backing.LARGE, walk.pool, body=start)
