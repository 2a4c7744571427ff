"""Big page table entries as chunks: the pool and backing of a big allocation, and the entries no walk met.

A whole-pool listing walks pool pages and segment heap ranges, then completes the answer from the big page
table: live allocations the walks did not list (the VA manager's "large" allocations, classic big pages) and
freed entries whose memory no listed chunk occupies now.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

import numpy as np

from . import poolheader, regions, segheap
from .bigpages import BigAllocation, BigPageTable
from .kernel import Kernel
from .model import Chunk, Finding, State, new_chunk

_REGION_POOLS = {"Paged pool": "Paged", "Session pool": "Session"}


def _big_pool(kernel: Kernel, pool_type: int | None, region: str) -> str:
    """The pool a big allocation came from: its entry's PoolType, else the region it lies in."""
    if pool_type is None:
        return _REGION_POOLS.get(region, "NonPaged")
    layout = poolheader.header_layout(kernel)
    if pool_type & layout.session_bit:
        return "Session"
    if pool_type & layout.paged_bit:
        return "Paged"
    return "NonPagedNx" if pool_type & layout.nx_bit else "NonPaged"


def big_chunk(kernel: Kernel, big: BigAllocation, region: str = "", walked: Chunk | None = None) -> Chunk:
    """A big page table entry as a chunk: freed entries are Free, Large/Big as the segment heap decides.

    ``region`` (the region name holding the address) names the pool when the entry keeps no PoolType; a block a
    heap walk found without a header (``walked``) keeps the pool and state the walk gave it.
    """
    if walked is not None:
        state, pool = walked.state, walked.pool
    else:
        state, pool = State.FREE if big.free else State.ALLOCATED, _big_pool(kernel, big.pool_type, region)
    return new_chunk(big.va, big.size, 0, big.tag, state, segheap.big_backing(kernel, big.size), pool,
                     big.pool_type, big.va)


class Extents:
    """Address ranges of listed chunks, to keep stale big page table entries off memory a chunk holds now."""

    def __init__(self, starts: np.ndarray | list[int], sizes: np.ndarray | list[int]):
        starts = np.asarray(starts, dtype=np.uint64)
        order = np.argsort(starts, kind="stable")
        self._starts = starts[order]
        ends = self._starts + np.maximum(np.asarray(sizes, dtype=np.uint64)[order], np.uint64(1))
        self._reach = np.maximum.accumulate(ends) if len(ends) else ends

    def lists(self, start: int) -> bool:
        """Whether a listed chunk starts at ``start``."""
        position = int(np.searchsorted(self._starts, np.uint64(start), side="left"))
        return position < len(self._starts) and int(self._starts[position]) == start

    def overlaps(self, start: int, end: int) -> bool:
        position = int(np.searchsorted(self._starts, np.uint64(end), side="left")) - 1
        return position >= 0 and int(self._reach[position]) > start


def unwalked(kernel: Kernel, table: BigPageTable, extents: Extents) -> Iterator[Chunk | Finding]:
    """Big allocations no walk listed: live ones, and freed ones whose memory no listed chunk holds now.

    Of freed entries over the same memory the latest in table order is kept, as the owner lookup does.
    """
    live = sorted((a for a in table.allocations if not a.free and a.size > 0), key=lambda a: a.va)
    for entry in live:
        if extents.lists(entry.va):
            continue
        if extents.overlaps(entry.va, entry.end):
            yield Finding(entry.va, f"big page table entry {entry.index} ({entry.size:#x} bytes) overlaps pool chunks")
            continue
        yield big_chunk(kernel, entry, regions.classify(kernel, entry.va).name)
    live_extents = Extents([entry.va for entry in live], [entry.size for entry in live])
    freed = sorted((a for a in table.allocations if a.free and a.size > 0), key=lambda a: -a.index)
    kept_starts: list[int] = []  # freed entries kept so far: disjoint, so sorted starts have sorted ends
    kept: list[Chunk] = []
    for entry in freed:
        if extents.lists(entry.va) or extents.overlaps(entry.va, entry.end) \
                or live_extents.overlaps(entry.va, entry.end):
            continue
        position = bisect.bisect_left(kept_starts, entry.end) - 1
        if position >= 0 and kept[position].end > entry.va:
            continue
        chunk = big_chunk(kernel, entry, regions.classify(kernel, entry.va).name)
        where = bisect.bisect_left(kept_starts, entry.va)
        kept_starts.insert(where, entry.va)
        kept.insert(where, chunk)
    yield from kept
