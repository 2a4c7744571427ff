"""PoolMon's table over a memory image: per-tag rows, filters, sorting, totals and snapshot growth.

Plain functions over :class:`PoolRow` records; the plugin feeds them tracker
counters (:func:`volplugins.pool.tracker.tracker_rows`), optionally a census
of walked chunks, and tag descriptions.  Nothing here reads memory, so every
view can be checked without an image.

Tags are four raw bytes, case sensitive; rows are chosen with the user's tag
patterns (:mod:`volplugins.pool.tags`).

Leak hunting compares two snapshots by outstanding allocations (PoolMon's
Diff) and outstanding bytes per tag and pool: a tag that leaks grows in
both, while cumulative allocation counts grow with any busy tag.  A snapshot
can be a JSON file of an earlier ``vol -r json windows.pooltags`` run; rows
are read from the renderer's nested ``__children`` lists as well.
"""

from __future__ import annotations

import bisect
import codecs
import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

from .census import CensusRow
from .kernel import Kernel
from .model import Chunk
from .tagdb import UNKNOWN_BINARY
from .filters import matches_any
from .tags import TAG_LENGTH, TagPattern, protected, tag_from_text
from .tracker import TagCounters

OWN_TABLES = (b"Pool", "Nonp")  # the tag and pool Windows charges its big page table and tag tables to
TOTAL_TAG = b"TOTAL"  # five bytes: no pool tag can be mistaken for the totals row
TOTAL_TYPE = "Total"  # the totals row's Type, so that a pipeline reading rows can tell it from a tag's
EVERY_TAG = "every tag"  # what a full snapshot's totals row says it sums
JSON_SNIFF = 64  # leading bytes read to tell a saved JSON run from a memory image
POOL_COLUMNS = ("Nonp", "Paged", "Session")
# Allocator pool (chunk walkers) -> tracker column (PoolMon's Type).
ALLOCATOR_COLUMN = {"NonPaged": "Nonp", "NonPagedNx": "Nonp", "Paged": "Paged", "Session": "Session"}
# What a user may type for --pool -> tracker column.
POOL_NAMES = {"nonpaged": "Nonp", "nonp": "Nonp", "paged": "Paged", "session": "Session"}
SORT_KEYS = ("bytes", "diff", "allocs", "frees", "per-alloc", "tag")


@dataclass(frozen=True)
class ScanCounts:
    """Chunks of one tag and pool found by walking the pools (free includes cached-free)."""

    allocated: int = 0
    allocated_bytes: int = 0
    free: int = 0
    free_bytes: int = 0
    bookkeeping: int = 0  # live allocations charged to the tag that are no pool chunk (see OWN_TABLES)

    def __add__(self, other: ScanCounts) -> ScanCounts:
        return ScanCounts(self.allocated + other.allocated, self.allocated_bytes + other.allocated_bytes,
                          self.free + other.free, self.free_bytes + other.free_bytes,
                          self.bookkeeping + other.bookkeeping)


@dataclass(frozen=True)
class PoolRow(TagCounters):
    """One PoolMon line: a tag's tracker counters in one pool ('' on the totals row), what a scan found,
    who owns the tag."""

    scan: ScanCounts | None = None
    description: str = ""
    binary: str = ""

    @property
    def mismatch(self) -> bool:
        """The tracker's outstanding count disagrees with the allocated chunks a scan found."""
        return self.scan is not None and self.scan.allocated + self.scan.bookkeeping != self.diff


@dataclass(frozen=True)
class GrowthRow:
    """One tag and pool in two snapshots: outstanding allocations and bytes before and now."""

    tag: bytes
    pool: str
    baseline_allocs: int = 0
    baseline_bytes: int = 0
    allocs: int = 0
    bytes: int = 0
    description: str = ""
    binary: str = ""

    @property
    def diff_allocs(self) -> int:
        return self.allocs - self.baseline_allocs

    @property
    def diff_bytes(self) -> int:
        return self.bytes - self.baseline_bytes


Row = TypeVar("Row", PoolRow, GrowthRow)


# -- building rows -------------------------------------------------------------
def from_tracker(counters: Iterable[TagCounters]) -> list[PoolRow]:
    """PoolMon rows from tracker counters (one per tag and pool)."""
    return [PoolRow(c.tag, c.pool, c.allocs, c.frees, c.bytes) for c in counters]


def with_census(rows: Iterable[PoolRow], census: Iterable[CensusRow], own_tables: int = 0) -> list[PoolRow]:
    """Rows with the scanned chunks beside the tracker counters.

    Allocator pools fold into the tracker's columns (NonPaged and NonPagedNx
    are both 'Nonp').  Every row gets scan counts (zero when nothing was
    found); a tag found only by the scan gets a row with zero tracker counters.
    ``own_tables`` (see :func:`unwalked_tables`) counts as found on the row that is charged for them.
    """
    scanned: dict[tuple[bytes, str], ScanCounts] = {}
    for item in census:
        key = (item.tag, ALLOCATOR_COLUMN.get(item.pool, item.pool or "?"))
        counts = ScanCounts(item.allocated, item.allocated_bytes, item.free + item.cached_free,
                            item.free_bytes + item.cached_free_bytes)
        scanned[key] = scanned.get(key, ScanCounts()) + counts
    if own_tables:
        scanned[OWN_TABLES] = scanned.get(OWN_TABLES, ScanCounts()) + ScanCounts(bookkeeping=own_tables)
    out = [replace(row, scan=scanned.pop((row.tag, row.pool), ScanCounts())) for row in rows]
    out += [PoolRow(tag, pool, scan=counts) for (tag, pool), counts in sorted(scanned.items())]
    return out


def unwalked_tables(addresses: Iterable[int], chunks: Sequence[Chunk]) -> int:
    """How many of the allocator's own tables (at ``addresses``; 0 for a table that does not exist) lie in no
    walked chunk: Windows charges them to tag Pool although no pool walk meets them as chunks, so a scan
    that does not find them is no mismatch.  ``chunks`` in address order, as the scan returns them."""
    starts = [chunk.address for chunk in chunks]
    unwalked = 0
    for address in addresses:
        index = bisect.bisect_right(starts, address) - 1
        if address and not (index >= 0 and chunks[index].contains(address)):
            unwalked += 1
    return unwalked


def describe(rows: Iterable[Row], lookup: Callable[[bytes], tuple[str, str]]) -> list[Row]:
    """Rows with ``(description, binary)`` from ``lookup`` (e.g. ``TagDatabase.describe``)."""
    out = []
    for row in rows:
        description, binary = lookup(row.tag)
        out.append(replace(row, description=description, binary="" if binary == UNKNOWN_BINARY else binary))
    return out


# -- filters -------------------------------------------------------------------
def pool_columns(names: Iterable[str]) -> tuple[set[str], list[str]]:
    """Tracker columns for ``--pool`` values (case-insensitive, comma lists allowed), and unknown names."""
    wanted: set[str] = set()
    unknown: list[str] = []
    for name in names:
        for part in filter(None, (piece.strip() for piece in name.split(","))):
            column = POOL_NAMES.get(part.lower())
            if column is None:
                unknown.append(part)
            else:
                wanted.add(column)
    return wanted, unknown


def is_known(row: PoolRow | GrowthRow) -> bool:
    """Whether anything (description file or driver scan) says what the tag is; the census's row of
    untagged free space is no lead either."""
    return bool(row.description or row.binary or not row.tag)


def select(
    rows: Iterable[Row],
    include: Sequence[TagPattern] = (),
    exclude: Sequence[TagPattern] = (),
    pools: Iterable[str] | None = None,
    unknown_only: bool = False,
) -> list[Row]:
    """Rows whose tag matches an ``include`` pattern (all when none), no ``exclude`` pattern, whose
    pool is in ``pools`` (all when None) and, with ``unknown_only``, whose tag nothing describes."""
    wanted = None if pools is None else set(pools)
    out = []
    for row in rows:
        if include and not matches_any(include, row.tag):
            continue
        if matches_any(exclude, row.tag):
            continue
        if wanted is not None and row.pool not in wanted:
            continue
        if unknown_only and is_known(row):
            continue
        out.append(row)
    return out


# -- order and totals ----------------------------------------------------------
_SORT_VALUE: dict[str, Callable[[PoolRow], int]] = {
    "bytes": lambda row: row.bytes,
    "diff": lambda row: row.diff,
    "allocs": lambda row: row.allocs,
    "frees": lambda row: row.frees,
    "per-alloc": lambda row: row.per_alloc,
}


def sort_rows(rows: Iterable[PoolRow], key: str = "bytes") -> list[PoolRow]:
    """Largest first by ``key`` (one of :data:`SORT_KEYS`), ties by tag and pool; ``tag`` sorts ascending."""
    ordered = sorted(rows, key=lambda row: (row.tag, _pool_order(row.pool)))
    if key == "tag":
        return ordered
    if key not in _SORT_VALUE:
        raise ValueError(f"unknown sort key {key!r}; choose from {', '.join(SORT_KEYS)}")
    return sorted(ordered, key=_SORT_VALUE[key], reverse=True)


def rank_growth(rows: Iterable[GrowthRow]) -> list[GrowthRow]:
    """Most bytes grown first, then most allocations grown, then tag and pool."""
    ordered = sorted(rows, key=lambda row: (row.tag, _pool_order(row.pool)))
    return sorted(ordered, key=lambda row: (row.diff_bytes, row.diff_allocs), reverse=True)


def top(rows: Sequence[Row], count: int | None) -> list[Row]:
    """The first ``count`` rows (all when ``count`` is None)."""
    return list(rows) if count is None else list(rows[: max(count, 0)])


def total(rows: Iterable[PoolRow]) -> PoolRow:
    """The totals row: sums of every counter (scan sums when any row carries scan counts)."""
    rows = list(rows)
    scans = [row.scan for row in rows if row.scan is not None]
    scan = sum(scans, ScanCounts()) if scans else None
    return PoolRow(TOTAL_TAG, TOTAL_TYPE, sum(r.allocs for r in rows), sum(r.frees for r in rows),
                   sum(r.bytes for r in rows), scan)


def growth_total(rows: Iterable[GrowthRow]) -> GrowthRow:
    rows = list(rows)
    return GrowthRow(TOTAL_TAG, TOTAL_TYPE, sum(r.baseline_allocs for r in rows), sum(r.baseline_bytes for r in rows),
                     sum(r.allocs for r in rows), sum(r.bytes for r in rows))


def _pool_order(pool: str) -> int:
    return POOL_COLUMNS.index(pool) if pool in POOL_COLUMNS else len(POOL_COLUMNS)


# -- snapshots -----------------------------------------------------------------
def growth(baseline: Iterable[PoolRow], current: Iterable[PoolRow]) -> list[GrowthRow]:
    """Per tag and pool: outstanding allocations and bytes in ``baseline`` and ``current``, ranked.

    A tag present on one side only counts zero on the other.
    """
    before = {(row.tag, row.pool): row for row in baseline}
    now = {(row.tag, row.pool): row for row in current}
    out = []
    for key in before.keys() | now.keys():
        old, new = before.get(key), now.get(key)
        out.append(GrowthRow(key[0], key[1], old.diff if old else 0, old.bytes if old else 0,
                             new.diff if new else 0, new.bytes if new else 0))
    return rank_growth(out)


@dataclass(frozen=True)
class SnapshotFile:
    """Rows read from a saved ``windows.pooltags`` JSON run, or why none could be read.

    ``kernel`` and ``selection`` come from the run's totals row (see :func:`snapshot_note`): the kernel it
    was taken of, and :data:`EVERY_TAG` unless options left rows out. Both are None for a file without them.
    """

    rows: list[PoolRow] = field(default_factory=list)
    error: str | None = None
    kernel: str | None = None
    selection: str | None = None


_SNAPSHOT_NOTE = re.compile(r"kernel (?P<kernel>[^;]+); (?P<selection>.+)")


def snapshot_note(kernel: str, selection: Sequence[str]) -> str:
    """The totals row's description: which kernel the rows are of and which options chose them, so that a
    saved run used as a baseline can be checked (another build compares apples with pears, a run saved with
    --top or --tag lacks the tags that grew from nothing)."""
    return f"kernel {kernel}; {'only ' + ' '.join(selection) if selection else EVERY_TAG}"


def kernel_identity(kernel: Kernel) -> str:
    """The kernel build a snapshot is of: the GUID and age of its PDB (``PDB 8CFB49428DC86A330CE257778E0C2F93-1``),
    which change with every build and update of the kernel."""
    metadata = kernel.context.symbol_space[kernel.symbol_table].metadata
    guid, age = getattr(metadata, "pdb_guid", None), getattr(metadata, "pdb_age", None)
    return f"PDB {guid}-{age}" if guid else "unknown build"


def is_json_file(path: str | Path) -> bool:
    """Whether ``path`` holds a saved JSON run rather than a memory image (raises OSError if unreadable)."""
    with open(path, "rb") as handle:
        head = handle.read(JSON_SNIFF)
    return head.removeprefix(codecs.BOM_UTF8).lstrip()[:1] in (b"[", b"{")


def read_snapshot_file(path: str | Path) -> SnapshotFile:
    """:func:`parse_snapshot` of a UTF-8 file (with or without BOM); a read problem is an error, not a raise."""
    try:
        text = Path(path).read_bytes().removeprefix(codecs.BOM_UTF8).decode("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        return SnapshotFile(error=f"cannot read as UTF-8 JSON: {error}")
    return parse_snapshot(text)


_GROWTH_COLUMNS = {"BaselineLive", "BaselineBytes", "BaselineAllocs"}  # any of them marks a growth table


def parse_snapshot(text: str) -> SnapshotFile:
    """Rows of a ``vol -r json`` (or ``-r jsonl``) output of ``windows.pooltags``.

    Needs Tag, Type, Bytes and either Allocs and Frees or Diff in each row;
    the totals row and rows of unknown pools are skipped.  Any problem yields
    an error message and no rows, never an exception.
    """
    try:
        data = _load_json(text)
    except ValueError as error:
        return SnapshotFile(error=f"not JSON: {error}")
    records = list(_flatten(data))
    if not records:
        return SnapshotFile(error="no rows (expected the list of rows `vol -r json windows.pooltags` writes)")
    if _GROWTH_COLUMNS & records[0].keys():
        return SnapshotFile(error="this is a growth table from a --baseline run, not a snapshot; "
                                  "save a run without --baseline")
    rows = []
    for number, record in enumerate(records, start=1):
        row = _row_from_record(record)
        if isinstance(row, str):
            return SnapshotFile(error=f"row {number}: {row}")
        if row is not None:
            rows.append(row)
    note = next((_SNAPSHOT_NOTE.fullmatch(str(record.get("Description", ""))) for record in records
                 if record.get("Type") == TOTAL_TYPE), None)
    if note is None:
        return SnapshotFile(rows)
    return SnapshotFile(rows, kernel=note["kernel"], selection=note["selection"])


def _load_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as whole:
        lines = [line for line in text.splitlines() if line.strip()]
        if len(lines) < 2:
            raise ValueError(str(whole)) from None
        try:
            return [json.loads(line) for line in lines]
        except json.JSONDecodeError:
            raise ValueError(str(whole)) from None


def _flatten(data: Any) -> Iterable[dict]:
    """Every row dict, depth first, through the renderer's ``__children`` lists."""
    stack = list(reversed(data)) if isinstance(data, list) else [data]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            yield item
            children = item.get("__children")
            if isinstance(children, list):
                stack.extend(reversed(children))
        elif isinstance(item, list):
            stack.extend(reversed(item))


def _row_from_record(record: dict) -> PoolRow | None | str:
    """A row, None for rows that are not tag rows (totals, unknown pools), or what is wrong."""
    tag, pool = record.get("Tag"), record.get("Type")
    if not isinstance(tag, str) or not isinstance(pool, str):
        return "no Tag/Type text (is this windows.pooltags output?)"
    if pool not in POOL_COLUMNS:
        return None
    raw = tag_from_text(tag)
    if len(raw) != TAG_LENGTH:
        return f"tag {tag!r} is not four bytes"
    if record.get("Protected") is True:
        raw = protected(raw)
    numbers = {name: record.get(name) for name in ("Allocs", "Frees", "Diff", "Bytes")}
    present = {name: value for name, value in numbers.items() if value is not None}
    if any(not isinstance(value, int) or isinstance(value, bool) for value in present.values()):
        return f"tag {tag!r}: counters are not integers"
    if "Bytes" not in present or not ({"Allocs", "Frees"} <= present.keys() or "Diff" in present):
        return f"tag {tag!r}: needs Bytes and Allocs/Frees or Diff"
    allocs = present.get("Allocs", present.get("Diff", 0) + present.get("Frees", 0))
    frees = present.get("Frees", allocs - present.get("Diff", 0))
    return PoolRow(raw, pool, allocs, frees, present["Bytes"])
