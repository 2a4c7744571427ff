"""The big page table: allocations too large for a pool page carry no ``_POOL_HEADER``.

Such allocations are page aligned and recorded in ``PoolBigPageTable`` (a
pointer to an array of ``PoolBigPageTableSize`` ``_POOL_TRACKER_BIG_PAGES``
entries).  An entry is in use when its Key (the tag) is not 0; bit 0 of Va
set marks an entry whose allocation was freed (the tag and size linger, so
a reader that ignores the bit reports freed memory as live).

The entry layout moves between builds (0x18 bytes up to 19041, 0x20 from
20348 with ProcessBilled; PoolType a whole ULONG on Windows 7/8.1, a
bitfield later, absent from some ISFs), so every field comes from the ISF
and the table is decoded column-wise from one bulk read.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from functools import cached_property
from typing import Iterator

import numpy as np
from volatility3.framework import exceptions

from . import regions
from .kernel import PAGE_SIZE, FieldLayout, Kernel, per_kernel
from .model import Finding

_ENTRY = "_POOL_TRACKER_BIG_PAGES"
MAX_ENTRIES = 1 << 24  # far above any real table; a larger count means a bad read
MAX_BYTES = 1 << 40  # one allocation of a terabyte is beyond any pool; a larger NumberOfBytes is a bad entry


@dataclass(frozen=True)
class BigAllocation:
    """One in-use entry of the big page table."""

    va: int  # first byte of the allocation (free bit cleared)
    size: int  # NumberOfBytes
    tag: bytes
    pool_type: int | None  # None when this build's entry has no PoolType
    free: bool  # Va bit 0: the allocation was freed, the entry is stale
    index: int  # position in the table

    @property
    def end(self) -> int:
        return self.va + self.size

    def contains(self, address: int) -> bool:
        return self.va <= address < self.end


@dataclass(frozen=True)
class EntryLayout:
    """Where a build keeps the ``_POOL_TRACKER_BIG_PAGES`` fields."""

    size: int
    va: FieldLayout
    key: FieldLayout
    number_of_bytes: FieldLayout
    pool_type: FieldLayout | None


@dataclass(frozen=True)
class BigPageTable:
    """The decoded table, with a sorted index of live allocations for address lookups."""

    address: int = 0
    entries: int = 0
    allocations: tuple[BigAllocation, ...] = ()
    findings: tuple[Finding, ...] = ()

    @cached_property
    def _live(self) -> list[BigAllocation]:
        return sorted((a for a in self.allocations if not a.free and a.size > 0), key=lambda a: a.va)

    @cached_property
    def _starts(self) -> list[int]:
        return [a.va for a in self._live]

    @cached_property
    def _largest(self) -> int:
        return max((a.size for a in self._live), default=0)

    def find(self, address: int) -> BigAllocation | None:
        """The live allocation whose [va, va + size) holds ``address``.

        The kernel's own hash lookup only finds an allocation by its first
        page; a range search answers for any byte inside it.  Walking back
        stops once no allocation starting further down could reach ``address``.
        """
        position = bisect.bisect_right(self._starts, address) - 1
        while position >= 0 and self._starts[position] + self._largest > address:
            if self._live[position].contains(address):
                return self._live[position]
            position -= 1
        return None


    @cached_property
    def _freed(self) -> list[tuple[int, BigAllocation]]:
        """Freed entries with their place in table order, sorted by address."""
        return sorted(((order, a) for order, a in enumerate(self.allocations) if a.free and a.size > 0),
                      key=lambda pair: pair[1].va)

    @cached_property
    def _freed_starts(self) -> list[int]:
        return [a.va for _, a in self._freed]

    @cached_property
    def _freed_reach(self) -> list[int]:
        """The furthest end of the freed entries up to each one (they may overlap one another)."""
        return list(itertools.accumulate((a.end for _, a in self._freed), max))

    def find_freed(self, address: int) -> BigAllocation | None:
        """The stale (freed) entry whose range held ``address``; the latest in table order wins."""
        position = bisect.bisect_right(self._freed_starts, address) - 1
        found: tuple[int, BigAllocation] | None = None
        while position >= 0 and self._freed_reach[position] > address:
            order, entry = self._freed[position]
            if entry.contains(address) and (found is None or order > found[0]):
                found = (order, entry)
            position -= 1
        return found[1] if found else None


def entry_layout(kernel: Kernel) -> EntryLayout:
    """The ``_POOL_TRACKER_BIG_PAGES`` layout of this kernel, from its ISF."""
    pool_type = None
    if kernel.has_field(_ENTRY, "PoolType"):
        pool_type = kernel.field_layout(_ENTRY, "PoolType")
    else:
        kernel.lacks(f"{_ENTRY}.PoolType", "big allocations are given the pool of the region they lie in")
    return EntryLayout(
        size=kernel.type_size(_ENTRY),
        va=kernel.field_layout(_ENTRY, "Va"),
        key=kernel.field_layout(_ENTRY, "Key"),
        number_of_bytes=kernel.field_layout(_ENTRY, "NumberOfBytes"),
        pool_type=pool_type,
    )


def parse_table(data: bytes, layout: EntryLayout,
                kernel_half: int = regions.kernel_half_start()) -> tuple[list[BigAllocation], int]:
    """The plausible in-use entries (Key != 0, Va != 0) of a table given its bytes, and how many in-use
    entries were not plausible.

    A real entry's Va is page aligned in the kernel half and its allocation
    ends inside the address space; a smeared or overread table gives entries
    such as Va 8 with a size of half the address space, which would otherwise
    own every address above them.
    """
    count = len(data) // layout.size
    keys = layout.key.column(data, count, layout.size)
    raw_va = layout.va.column(data, count, layout.size)
    sizes = layout.number_of_bytes.column(data, count, layout.size)
    types = layout.pool_type.column(data, count, layout.size) if layout.pool_type else None
    va = raw_va & ~np.uint64(1)
    in_use = (keys != 0) & (va != 0)
    plausible = ((va % np.uint64(PAGE_SIZE) == 0) & (va >= np.uint64(kernel_half))
                 & (sizes <= np.uint64(MAX_BYTES)) & (sizes <= ~va + np.uint64(1)))
    used = np.flatnonzero(in_use & plausible)
    allocations = [
        BigAllocation(
            va=int(va[i]),
            size=int(sizes[i]),
            tag=int(keys[i]).to_bytes(layout.key.size, "little"),
            pool_type=None if types is None else int(types[i]),
            free=bool(raw_va[i] & np.uint64(1)),
            index=int(i),
        )
        for i in used
    ]
    return allocations, int(np.count_nonzero(in_use & ~plausible))


@per_kernel
def read_big_page_table(kernel: Kernel) -> BigPageTable:
    """Read and decode the whole big page table (once per kernel)."""
    for symbol in ("PoolBigPageTable", "PoolBigPageTableSize"):
        if not kernel.has_symbol(symbol):
            kernel.lacks(symbol, "big allocations (page-sized and larger) are not listed")
            return BigPageTable(findings=(Finding(0, f"kernel symbols lack {symbol}"),))
    try:
        table = kernel.read_pointer(kernel.symbol_address("PoolBigPageTable"))
        count = kernel.read_pointer(kernel.symbol_address("PoolBigPageTableSize"))
    except exceptions.InvalidAddressException:
        where = kernel.symbol_address("PoolBigPageTable")
        return BigPageTable(findings=(Finding(where, "PoolBigPageTable/PoolBigPageTableSize not readable"),))
    problem = _size_problem(count)
    if problem or table == 0:
        return BigPageTable(table, count, findings=(Finding(table, problem or "PoolBigPageTable is NULL"),))
    layout = entry_layout(kernel)
    data, missing = kernel.read_table(table, count * layout.size)
    if missing == len(data):
        return BigPageTable(table, count, findings=(Finding(table, "big page table is not readable"),))
    allocations, implausible = parse_table(data, layout, regions.kernel_half_start(kernel))
    pools = [region for region in regions.kernel_regions(kernel) if region.pool is not None]
    inside = [a for a in allocations if _fits(a, pools)]
    findings = []
    if missing:
        findings.append(Finding(table, f"{missing:#x} of {len(data):#x} bytes of the big page table are unreadable"))
    if implausible:
        findings.append(Finding(table, f"{implausible} big page table entries are implausible (Va not page aligned "
                                       f"or outside the kernel half, or size past the address space) and are skipped"))
    if len(inside) < len(allocations):
        findings.append(Finding(table, f"{len(allocations) - len(inside)} big page table entries run past the end of "
                                       f"their pool region and are skipped"))
    return BigPageTable(table, count, tuple(inside), tuple(findings))


def _fits(allocation: BigAllocation, pools: list[regions.Region]) -> bool:
    """Whether the allocation ends inside the pool region it starts in: big pool comes out of a pool's own VA
    region, so an entry running past its region's end (a smeared size, say) would otherwise claim other memory
    as its own.  An entry starting in no known region is left alone: the region list may be incomplete."""
    start = next((region for region in pools if region.contains(allocation.va)), None)
    return start is None or allocation.end <= start.end


def _size_problem(count: int) -> str:
    if count <= 0 or count & (count - 1):
        return f"PoolBigPageTableSize {count:#x} is not a power of two"
    if count > MAX_ENTRIES:
        return f"PoolBigPageTableSize {count:#x} exceeds {MAX_ENTRIES:#x} entries"
    return ""


def big_allocations(kernel: Kernel) -> Iterator[BigAllocation]:
    """Every in-use entry of the big page table, freed ones included (``free`` tells)."""
    yield from read_big_page_table(kernel).allocations


def find_big(kernel: Kernel, address: int) -> BigAllocation | None:
    """The live big allocation holding ``address``, if any."""
    return read_big_page_table(kernel).find(address)


def find_freed_big(kernel: Kernel, address: int) -> BigAllocation | None:
    """A freed big allocation that held ``address`` (its entry keeps tag and size after the free)."""
    return read_big_page_table(kernel).find_freed(address)
