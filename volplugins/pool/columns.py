"""Many plain chunks as parallel arrays: what the bulk decoders produce, read by a tally as they are and turned
into :class:`~.model.Chunk` records only for a listing.

A whole-pool census meets a hundred thousand chunks; building a record for each costs more than decoding it,
and a per-tag tally needs only four of its fields.  Chunks that need more than a header decode (cache-aligned
bodies, unreadable headers) stay records beside the columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .model import Backing, Chunk, State, new_chunk

STATES = (State.ALLOCATED, State.FREE, State.CACHED_FREE)  # the states a column can hold, by code
ALLOCATED, FREE, CACHED_FREE = (np.uint8(code) for code in range(len(STATES)))
NO_POOL_TYPE = -1  # pool_type column: the chunk keeps none (a free VS chunk)
NO_BODY = 0  # body column: no body (free chunks)
_FEW_ROWS = 16  # rows from which records are made column by column


@dataclass(frozen=True)
class Columns:
    """Chunks of one backing, field by field; ``pool`` indexes ``pools``.  Tags are the header's tag bytes read
    as a little-endian integer of ``tag_size`` bytes."""

    address: np.ndarray  # uint64
    size: np.ndarray  # int64
    previous_size: np.ndarray  # int64
    tag: np.ndarray  # uint64
    state: np.ndarray  # uint8, codes into STATES
    pool_type: np.ndarray  # int64, NO_POOL_TYPE when none
    body: np.ndarray  # uint64, NO_BODY when none
    pool: np.ndarray  # uint8, index into pools
    quota: np.ndarray  # uint64, the _EPROCESS charged (see poolheader.decode_quota), 0 when none
    pools: tuple[str, ...]
    backing: Backing
    tag_size: int = 4

    def __len__(self) -> int:
        return len(self.address)

    def chunks(self, rows: np.ndarray | None = None) -> list[Chunk]:
        """The records of every chunk (or of the chunks at ``rows``), in column order."""
        fields = [getattr(self, name) for name in _ARRAYS]
        if rows is None:
            values = [column.tolist() for column in fields]
        elif len(rows) <= _FEW_ROWS:  # an owner lookup's page: value by value is cheaper than slicing each column
            values = [[column.item(row) for row in rows.tolist()] for column in fields]
        else:
            values = [column[rows].tolist() for column in fields]
        width, backing, pools = self.tag_size, self.backing, self.pools
        return [
            new_chunk(address, size, previous_size, tag.to_bytes(width, "little"), STATES[state], backing,
                      pools[pool], None if pool_type == NO_POOL_TYPE else pool_type, body or None, quota or None)
            for address, size, previous_size, tag, state, pool_type, body, pool, quota in zip(*values)
        ]

    def holding(self, marks: np.ndarray) -> list[Chunk]:
        """The chunks that hold any of the sorted addresses ``marks`` (uint64)."""
        if not len(marks) or not len(self):
            return []
        index = np.searchsorted(marks, self.address, side="left")
        inside = index < len(marks)
        ends = self.address + self.size.astype(np.uint64)
        hold = np.zeros(len(self), dtype=bool)
        hold[inside] = marks[index[inside]] < ends[inside]
        return self.chunks(np.flatnonzero(hold)) if hold.any() else []


def columns(address: np.ndarray, size: np.ndarray, previous_size: np.ndarray, tag: np.ndarray, state: np.ndarray,
            pool_type: np.ndarray, body: np.ndarray, backing: Backing, pool: str,
            tag_size: int = 4, quota: np.ndarray | None = None) -> Columns:
    """Columns of chunks that all come from one pool (``quota``: None when none is charged)."""
    return Columns(address.astype(np.uint64), size.astype(np.int64), previous_size.astype(np.int64),
                   tag.astype(np.uint64), state.astype(np.uint8), pool_type.astype(np.int64),
                   body.astype(np.uint64), np.zeros(len(address), dtype=np.uint8),
                   np.zeros(len(address), dtype=np.uint64) if quota is None else quota.astype(np.uint64), (pool,),
                   backing, tag_size)


def joined(*parts: Columns) -> Columns:
    """Columns of one backing and one pool, one after the other."""
    first = parts[0]
    return Columns(*(np.concatenate([getattr(part, name) for part in parts]) for name in _ARRAYS),
                   first.pools, first.backing, first.tag_size)


_ARRAYS = ("address", "size", "previous_size", "tag", "state", "pool_type", "body", "pool", "quota")
