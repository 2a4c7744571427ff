"""Per-tag tally of pool chunks: what ``!poolused`` and the census plugins print, from walked chunks."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .model import Chunk, State


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


_COLUMNS = {
    State.ALLOCATED: ("allocated", "allocated_bytes"),
    State.FREE: ("free", "free_bytes"),
    State.CACHED_FREE: ("cached_free", "cached_free_bytes"),
}


def census(chunks: Iterable[Chunk]) -> list[CensusRow]:
    """One row per (tag, pool), sorted by tag then pool; unreadable chunks have no tag to count under."""
    tally: dict[tuple[bytes, str], dict[str, int]] = {}
    for chunk in chunks:
        columns = _COLUMNS.get(chunk.state)
        if columns is None:
            continue
        counts = tally.setdefault((chunk.tag, chunk.pool), {})
        count, size = columns
        counts[count] = counts.get(count, 0) + 1
        counts[size] = counts.get(size, 0) + chunk.size
    return [CensusRow(tag, pool, **counts) for (tag, pool), counts in sorted(tally.items())]
