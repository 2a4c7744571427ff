"""Per-tag pool counters, summed over every tracking table the kernel keeps.

The kernel counts allocations per tag in ``_POOL_TRACKER_TABLE`` hash tables:
the global ``PoolTrackTable``, its overflow ``PoolTrackTableExpansion``, one
table per processor in ``ExPoolTagTables[cpu]`` (each ``PoolTrackTableSize``
entries, filled by the processor doing the allocation or free), and
``ExpSessionPoolTrackTable`` for session pool.  A tag's totals are the sum
over all of them: an allocation counted on one processor may be freed on
another, so single tables hold partial (even wrapped-negative) counts and
reading only the global table undercounts.  A table's last entry is the
overflow bucket (tag ``Ovfl``) for tags that found no free slot.

Counter widths differ (u32 counters in 0x28-byte entries on Windows 7 and
8.1, u64 in 0x38 bytes on later Windows 10, 0x50 bytes with limits from
20348), so each column is read with the ISF's offset and size, from one bulk
read per table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from volatility3.framework import exceptions

from .kernel import FieldLayout, Kernel
from .model import Finding

_ENTRY = "_POOL_TRACKER_TABLE"
MAX_ENTRIES = 1 << 20  # real tables hold a few thousand tags; larger means a bad read
MAX_PROCESSORS = 2048  # the most logical processors any Windows build supports

_COUNTERS = ("Allocs", "Frees", "Bytes")
_INT64 = 1 << 63
_UINT64 = 1 << 64


@dataclass(frozen=True)
class TagCounters:
    """One PoolMon row: a tag's counters in one pool."""

    tag: bytes
    pool: str  # 'Nonp', 'Paged' or 'Session'
    allocs: int = 0
    frees: int = 0
    bytes: int = 0  # outstanding bytes

    @property
    def diff(self) -> int:
        """Allocations not yet freed."""
        return self.allocs - self.frees

    @property
    def per_alloc(self) -> int:
        """Average outstanding bytes per live allocation (0 when none are live)."""
        return self.bytes // self.diff if self.diff > 0 else 0


@dataclass(frozen=True)
class TableInfo:
    """One tracking table that was read (or found missing)."""

    name: str  # e.g. 'PoolTrackTable', 'ExPoolTagTables[3]'
    address: int
    entries: int
    used: int  # entries with a tag
    readable: bool = True


@dataclass
class TrackerResult:
    """Rows sorted by tag and pool, the tables they were summed from, and what could not be read."""

    rows: list[TagCounters] = field(default_factory=list)
    tables: list[TableInfo] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)


@dataclass(frozen=True)
class EntryLayout:
    """Where a build keeps the ``_POOL_TRACKER_TABLE`` fields."""

    size: int
    key: FieldLayout
    nonpaged: tuple[FieldLayout, FieldLayout, FieldLayout]  # allocs, frees, bytes
    paged: tuple[FieldLayout, FieldLayout, FieldLayout]


def entry_layout(kernel: Kernel) -> EntryLayout:
    """The ``_POOL_TRACKER_TABLE`` layout of this kernel, from its ISF."""

    def columns(pool: str) -> tuple[FieldLayout, FieldLayout, FieldLayout]:
        allocs, frees, size = (_unsigned(kernel.field_layout(_ENTRY, pool + name)) for name in _COUNTERS)
        return allocs, frees, size

    return EntryLayout(
        size=kernel.type_size(_ENTRY),
        key=_unsigned(kernel.field_layout(_ENTRY, "Key")),
        nonpaged=columns("NonPaged"),
        paged=columns("Paged"),
    )


def _unsigned(layout: FieldLayout) -> FieldLayout:
    """Counters are declared LONG on some builds; they are counts and tags, read unsigned."""
    return FieldLayout(layout.offset, layout.size, layout.bit_position, layout.bit_length, signed=False)


@dataclass(frozen=True)
class TableCounts:
    """The used entries of one table, column-wise (uint64 arrays, wrapping like the kernel's counters)."""

    keys: np.ndarray
    nonpaged: tuple[np.ndarray, np.ndarray, np.ndarray]
    paged: tuple[np.ndarray, np.ndarray, np.ndarray]


def parse_table(data: bytes, layout: EntryLayout) -> TableCounts:
    """The entries with a tag (Key != 0) of a table given its bytes. Pure."""
    count = len(data) // layout.size

    def column(spec: FieldLayout) -> np.ndarray:
        return spec.column(data, count, layout.size)

    keys = column(layout.key)
    used = keys != 0
    return TableCounts(
        keys=keys[used],
        nonpaged=tuple(column(spec)[used] for spec in layout.nonpaged),
        paged=tuple(column(spec)[used] for spec in layout.paged),
    )


def sum_rows(tables: list[tuple[TableCounts, bool]], key_size: int = 4) -> list[TagCounters]:
    """Sum counters of the same tag across tables into PoolMon rows, sorted by tag and pool. Pure.

    Each item is a table and whether it is a session table (whose paged and
    nonpaged columns are reported together as pool 'Session').  Sums wrap
    at 2**64 like the kernel's SIZE_T counters, so partial per-processor
    counts that went "negative" add up correctly; an outstanding byte count
    that is still negative after summing is shown as such.  Rows with all
    counters 0 (a tag never used in that pool) are left out.
    """
    groups: dict[str, list[tuple[np.ndarray, ...]]] = {}
    for counts, session in tables:
        for pool, columns in (("Nonp", counts.nonpaged), ("Paged", counts.paged)):
            groups.setdefault("Session" if session else pool, []).append((counts.keys, *columns))
    rows = []
    for pool, parts in groups.items():
        keys, inverse = np.unique(np.concatenate([part[0] for part in parts]), return_inverse=True)
        totals = []
        for column in range(1, 4):
            total = np.zeros(len(keys), dtype=np.uint64)
            np.add.at(total, inverse, np.concatenate([part[column] for part in parts]))
            totals.append(total.tolist())
        for key, allocs, frees, size in zip(keys.tolist(), *totals):
            if allocs or frees or size:
                rows.append(TagCounters(key.to_bytes(key_size, "little"), pool, allocs, frees, _signed64(size)))
    return sorted(rows, key=lambda row: (row.tag, row.pool))


def _signed64(value: int) -> int:
    return value - _UINT64 if value >= _INT64 else value


@dataclass(frozen=True)
class _TableRef:
    name: str
    address: int
    entries: int
    session: bool = False


def tracker_rows(kernel: Kernel) -> TrackerResult:
    """PoolMon-style per-tag counters of the whole image."""
    result = TrackerResult()
    if not kernel.has_type(_ENTRY):
        result.findings.append(Finding(0, f"kernel symbols lack {_ENTRY}"))
        return result
    layout = entry_layout(kernel)
    parsed: list[tuple[TableCounts, bool]] = []
    seen: set[int] = set()
    for ref in _table_refs(kernel, result.findings):
        if ref.address in seen:
            continue
        seen.add(ref.address)
        counts = _read_table(kernel, ref, layout, result)
        if counts is not None:
            parsed.append((counts, ref.session))
    result.rows = sum_rows(parsed, layout.key.size)
    return result


def _read_table(kernel: Kernel, ref: _TableRef, layout: EntryLayout, result: TrackerResult) -> TableCounts | None:
    if not 0 < ref.entries <= MAX_ENTRIES:
        result.findings.append(Finding(ref.address, f"{ref.name}: implausible size {ref.entries:#x} entries"))
        result.tables.append(TableInfo(ref.name, ref.address, ref.entries, 0, readable=False))
        return None
    data, missing = kernel.read_table(ref.address, ref.entries * layout.size)
    if missing == len(data):
        result.findings.append(Finding(ref.address, f"{ref.name} is not readable"))
        result.tables.append(TableInfo(ref.name, ref.address, ref.entries, 0, readable=False))
        return None
    if missing:
        result.findings.append(Finding(ref.address, f"{ref.name}: {missing:#x} of {len(data):#x} bytes unreadable"))
    counts = parse_table(data, layout)
    result.tables.append(TableInfo(ref.name, ref.address, ref.entries, len(counts.keys)))
    return counts


def _table_refs(kernel: Kernel, findings: list[Finding]) -> list[_TableRef]:
    """Every tracking table this build keeps, in the order they are reported."""
    refs: list[_TableRef] = []
    global_size = _variable(kernel, "PoolTrackTableSize", findings)
    if global_size is not None:
        refs += _pointed(kernel, "PoolTrackTable", global_size, findings)
        refs += _per_processor(kernel, global_size, findings)
    expansion_size = _variable(kernel, "PoolTrackTableExpansionSize", findings)
    if expansion_size:
        refs += _pointed(kernel, "PoolTrackTableExpansion", expansion_size, findings)
    session_size = _variable(kernel, "ExpSessionPoolTrackTableSize", findings)
    if session_size:
        refs += _pointed(kernel, "ExpSessionPoolTrackTable", session_size, findings, session=True)
    return refs


def _variable(kernel: Kernel, name: str, findings: list[Finding]) -> int | None:
    """A pointer-sized kernel variable, None when the build lacks it or it is unreadable."""
    if not kernel.has_symbol(name):
        return None
    try:
        return kernel.read_pointer(kernel.symbol_address(name))
    except exceptions.InvalidAddressException:
        findings.append(Finding(kernel.symbol_address(name), f"{name} is not readable"))
        return None


def _pointed(
    kernel: Kernel, name: str, entries: int, findings: list[Finding], session: bool = False
) -> list[_TableRef]:
    """The table a pointer variable points at; none when the pointer is NULL (e.g. no expansion yet)."""
    address = _variable(kernel, name, findings)
    return [_TableRef(name, address, entries, session)] if address else []


def _per_processor(kernel: Kernel, entries: int, findings: list[Finding]) -> list[_TableRef]:
    """``ExPoolTagTables[cpu]`` for each processor; each has as many entries as the global table."""
    if not (kernel.has_symbol("ExPoolTagTables") and kernel.has_symbol("KeNumberProcessors")):
        return []
    array = kernel.symbol_address("ExPoolTagTables")
    try:
        processors = kernel.read_u32(kernel.symbol_address("KeNumberProcessors"))
    except exceptions.InvalidAddressException:
        findings.append(Finding(kernel.symbol_address("KeNumberProcessors"), "KeNumberProcessors is not readable"))
        return []
    if not 0 < processors <= MAX_PROCESSORS:
        findings.append(Finding(array, f"KeNumberProcessors {processors} is implausible"))
        return []
    width = kernel.type_size("pointer")
    data, missing = kernel.read_table(array, processors * width)
    if missing:
        findings.append(Finding(array, f"ExPoolTagTables: {missing:#x} of {len(data):#x} bytes unreadable"))
    pointers = (int.from_bytes(data[i * width : (i + 1) * width], "little") for i in range(processors))
    return [_TableRef(f"ExPoolTagTables[{cpu}]", p, entries) for cpu, p in enumerate(pointers) if p]
