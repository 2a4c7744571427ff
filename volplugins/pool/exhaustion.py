"""How full each pool is against the limit the kernel enforces: ``!vm``'s pool lines and ``!poolused`` in one view.

Bytes in use are the tag trackers' outstanding bytes summed per pool
(nonpaged, paged, session).  The limit comes from the kernel's own
variables: ``MmMaximumNonPagedPoolInBytes`` and ``MmSizeOfPagedPoolInBytes``
before Windows 10, ``MiState.Vs.MaximumNonPagedPoolInPages`` and
``SizeOfPagedPoolInPages`` from Windows 10 on (pages of the layer's size).
A pool gets a warning above ``FULL_SHARE`` of its limit, a tag when it
holds more than ``TAG_SHARE`` of its pool's limit: the signs of an
exhausted pool and of the driver that exhausted it.  Without a known limit
a tag's share is of the pool's bytes in use, and no warning is given.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from volatility3.framework import exceptions

from .kernel import Kernel
from .model import Finding
from .tracker import TagCounters, tracker_rows

FULL_SHARE = 0.9
TAG_SHARE = 1 / 3
POOL_ORDER = ("Nonp", "Paged", "Session")
# tracker pool -> (variable in bytes, MiState.Vs field in pages)
_LIMITS = {
    "Nonp": ("MmMaximumNonPagedPoolInBytes", "Vs.MaximumNonPagedPoolInPages"),
    "Paged": ("MmSizeOfPagedPoolInBytes", "Vs.SizeOfPagedPoolInPages"),
}


@dataclass(frozen=True)
class PoolLimit:
    limit: int | None  # bytes; None when the kernel's variables do not say
    source: str  # the variable read, or why there is no limit

    def describe(self) -> str:
        return f"limit from {self.source}" if self.limit else self.source


@dataclass(frozen=True)
class PoolUsage:
    pool: str  # 'Nonp', 'Paged' or 'Session', as the tracker names them
    in_use: int
    limit: PoolLimit
    top: tuple[TagCounters, ...]  # the tags holding most, largest first

    @property
    def percent(self) -> float | None:
        return 100.0 * self.in_use / self.limit.limit if self.limit.limit else None

    @property
    def warning(self) -> str:
        if self.percent is not None and self.percent > 100 * FULL_SHARE:
            return f"above {FULL_SHARE:.0%} of its limit"
        return ""

    @property
    def share_basis(self) -> str:
        """What a tag's share is of: the pool's limit, or its bytes in use when no limit is known."""
        return "limit" if self.limit.limit else "bytes in use"

    def share(self, row: TagCounters) -> float:
        whole = self.limit.limit or self.in_use
        return row.bytes / whole if whole else 0.0

    def tag_warning(self, row: TagCounters) -> str:
        if self.limit.limit and self.share(row) > TAG_SHARE:
            return "holds more than a third of the pool's limit"
        return ""


def pool_limit(kernel: Kernel, pool: str) -> PoolLimit:
    """The kernel's limit for ``pool``, read from whichever variable this build keeps."""
    if pool not in _LIMITS:
        return PoolLimit(None, "no limit variable for this pool")
    variable, field = _LIMITS[pool]
    try:
        if kernel.has_symbol(variable):
            value = kernel.read_pointer(kernel.symbol_address(variable))
            if value:
                return PoolLimit(value, variable)
        if kernel.has_symbol("MiState") and kernel.has_field("_MI_SYSTEM_INFORMATION", field):
            where = kernel.symbol_address("MiState") + kernel.field_offset("_MI_SYSTEM_INFORMATION", field)
            pages = kernel.read_u64(where)
            if pages:
                return PoolLimit(pages * kernel.page_size, f"MiState.{field}")
    except exceptions.InvalidAddressException:
        return PoolLimit(None, "the limit variables are unreadable")
    return PoolLimit(None, "the kernel's limit variables are missing or zero")


def pool_usage(kernel: Kernel, top: int = 5) -> tuple[list[PoolUsage], list[Finding]]:
    """One entry per pool the trackers count, in nonpaged, paged, session order, with its ``top`` tags."""
    tracked = tracker_rows(kernel)
    by_pool: dict[str, list[TagCounters]] = defaultdict(list)
    for row in tracked.rows:
        if row.bytes > 0:
            by_pool[row.pool].append(row)
    usage = []
    for pool in sorted(by_pool, key=lambda name: POOL_ORDER.index(name) if name in POOL_ORDER else len(POOL_ORDER)):
        rows = sorted(by_pool[pool], key=lambda row: (-row.bytes, row.tag))
        usage.append(PoolUsage(pool, sum(row.bytes for row in rows), pool_limit(kernel, pool), tuple(rows[:top])))
    return usage, list(tracked.findings)
