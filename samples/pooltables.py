"""Pool bookkeeping tables every build keeps: big page table and tag trackers.

Builders report what they allocate; :meth:`PoolTables.write` lays the
tables out in the kernel's own structures at the end of the build.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BigAllocation:
    va: int
    size: int
    tag: bytes
    pool_type: int
    free: bool = False


class PoolTables:
    def __init__(self):
        self.big: list[BigAllocation] = []

    def add_big(self, va: int, size: int, tag: bytes, pool_type: int, free: bool = False) -> None:
        self.big.append(BigAllocation(va, size, tag, pool_type, free))
