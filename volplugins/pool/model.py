"""The small records every pool walker yields and every plugin consumes."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class State(str, enum.Enum):
    ALLOCATED = "Allocated"
    FREE = "Free"
    CACHED_FREE = "Cached-free"  # freed into a lookaside/delay-free list; the heap still marks it busy
    UNREADABLE = "Unreadable"


FREED_STATES = (State.FREE, State.CACHED_FREE)  # given back by their caller
BUSY_STATES = (State.ALLOCATED, State.CACHED_FREE)  # in use as far as the heap can tell


class Backing(str, enum.Enum):
    PAGE = "Page"  # classic pool page
    VS = "VS"  # segment heap variable-size subsegment
    LFH = "LFH"  # segment heap low-fragmentation subsegment
    BIG = "Big"  # page-aligned allocation in the big page table
    LARGE = "Large"  # segment heap large allocation (also in the big page table)


@dataclass(frozen=True)
class Chunk:
    """One pool chunk as ``!pool`` lists it.

    ``address`` is the pool header (for big/large allocations the first byte,
    for free VS chunks the chunk header); ``size`` is what ``!pool`` prints:
    BlockSize * 16, the VS chunk size, or the big allocation's byte count.
    """

    address: int
    size: int
    previous_size: int
    tag: bytes
    state: State
    backing: Backing
    pool: str = ""  # NonPaged, NonPagedNx, Paged, Session, or "" when unknown
    pool_type: int | None = None  # header or table PoolType, when the backing keeps one
    body: int | None = None  # first byte handed to the caller (after headers)
    quota_process: int | None = None  # decoded ProcessBilled (_EPROCESS address)

    @property
    def end(self) -> int:
        return self.address + self.size

    def contains(self, address: int) -> bool:
        return self.address <= address < self.end


def new_chunk(address: int, size: int, previous_size: int, tag: bytes, state: State, backing: Backing, pool: str,
              pool_type: int | None, body: int | None = None, quota_process: int | None = None) -> Chunk:
    """``Chunk(...)`` with every field given, for bulk walkers: a third of the cost, the same object.

    A frozen dataclass sets each field through ``object.__setattr__`` (about 3 us per chunk, and a census
    makes one per pool chunk), so this fills the instance dictionary directly.
    """
    chunk = object.__new__(Chunk)
    chunk.__dict__.update(address=address, size=size, previous_size=previous_size, tag=tag, state=state,
                          backing=backing, pool=pool, pool_type=pool_type, body=body, quota_process=quota_process)
    return chunk


@dataclass(frozen=True)
class Finding:
    """Something wrong or unreadable in the image, reported instead of raised."""

    address: int
    reason: str

