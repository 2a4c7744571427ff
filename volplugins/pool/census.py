"""Per-tag tally of pool chunks: what ``!poolused`` and the census plugins print, from walked chunks."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .columns import FREE, STATES, Columns
from .model import Backing, Chunk, State

UNTAGGED = b""  # the tally's tag for free space whose bytes name no freed allocation
UNTAGGED_LABEL = "(free, no tag)"


@dataclass(frozen=True)
class CensusRow:
    """How many chunks (and bytes) of one tag one pool holds, by state."""

    tag: bytes
    pool: str
    allocated: int = 0
    allocated_bytes: int = 0
    free: int = 0
    free_bytes: int = 0
    cached_free: int = 0
    cached_free_bytes: int = 0


_COLUMNS = (State.ALLOCATED, State.FREE, State.CACHED_FREE)  # in CensusRow's column order


def names_no_allocation(chunk: Chunk) -> bool:
    """Free space whose "tag" is not one: a free VS chunk shows its still-encoded chunk header where a tag
    would be, and an LFH slot never handed out holds zeros."""
    return chunk.state is State.FREE and (chunk.backing is Backing.VS or chunk.tag == bytes(4))


class Tally:
    """Chunk counts per (tag, pool, state), added a batch at a time: a census never has to keep the chunks."""

    def __init__(self, group_untagged: bool = False):
        self.group_untagged = group_untagged
        self._counts: dict[tuple[bytes, str, State], list[int]] = {}

    def add(self, chunks: Iterable[Chunk]) -> None:
        counts, grouped = self._counts, self.group_untagged
        for chunk in chunks:
            tag = UNTAGGED if grouped and names_no_allocation(chunk) else chunk.tag
            key = (tag, chunk.pool, chunk.state)
            tally = counts.get(key)
            if tally is None:
                counts[key] = [1, chunk.size]
            else:
                tally[0] += 1
                tally[1] += chunk.size

    def add_columns(self, chunks: Columns) -> None:
        """The same count as :meth:`add` over ``chunks.chunks()``, without a record per chunk: the rows are
        grouped by (tag, pool, state) key with numpy, and each group is added once."""
        if not len(chunks):
            return
        tags = chunks.tag.astype(np.int64)
        if self.group_untagged:
            untagged = chunks.state == FREE
            if chunks.backing is not Backing.VS:
                untagged &= tags == 0
            tags[untagged] = -1  # UNTAGGED
        keys = ((tags + 1) << 16) | (chunks.pool.astype(np.int64) << 8) | chunks.state
        order = np.argsort(keys, kind="stable")
        keys, sizes = keys[order], chunks.size[order]
        starts = np.flatnonzero(np.diff(keys, prepend=-1))
        totals = np.add.reduceat(sizes, starts)
        counts = np.diff(np.append(starts, len(keys)))
        width, pools, tallied = chunks.tag_size, chunks.pools, self._counts
        for key, count, size in zip(keys[starts].tolist(), counts.tolist(), totals.tolist()):
            tag = (key >> 16) - 1
            entry = (UNTAGGED if tag < 0 else tag.to_bytes(width, "little"), pools[(key >> 8) & 0xFF],
                     STATES[key & 0xFF])
            tally = tallied.get(entry)
            if tally is None:
                tallied[entry] = [count, size]
            else:
                tally[0] += count
                tally[1] += size

    def rows(self) -> list[CensusRow]:
        """One row per (tag, pool), sorted by tag then pool; unreadable chunks have no tag to count under."""
        rows: dict[tuple[bytes, str], list[int]] = {}
        for (tag, pool, state), (count, size) in self._counts.items():
            if state not in _COLUMNS:
                continue
            column = 2 * _COLUMNS.index(state)
            values = rows.setdefault((tag, pool), [0] * (2 * len(_COLUMNS)))
            values[column] += count
            values[column + 1] += size
        return [CensusRow(tag, pool, *values) for (tag, pool), values in sorted(rows.items())]


def census(chunks: Iterable[Chunk], group_untagged: bool = False) -> list[CensusRow]:
    """One row per (tag, pool), sorted by tag then pool; unreadable chunks have no tag to count under.

    ``group_untagged`` counts free space that names no allocation under :data:`UNTAGGED`, one row per pool,
    instead of a row per meaningless byte pattern (what a PoolMon-style view wants).
    """
    tally = Tally(group_untagged)
    tally.add(chunks)
    return tally.rows()
