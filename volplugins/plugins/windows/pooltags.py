"""windows.pooltags: PoolMon for memory images, with a chunk census beside it and leak hunting across snapshots."""

from __future__ import annotations

import logging
from typing import Iterator

from volatility3.framework import automagic, contexts, exceptions, interfaces, plugins, renderers
from volatility3.framework.configuration import requirements

from volplugins.pool import bigpages, census, collector, exits, filters, plugin_options, poolmon, scan
from volplugins.pool.attribution import DriverScan, TagAttribution, load_attribution
from volplugins.pool.kernel import Kernel
from volplugins.pool.tags import is_protected, tag_text, unprotected
from volplugins.pool.tracker import tracker_rows

vollog = logging.getLogger(__name__)

FINDINGS_SHOWN = 10  # scan findings logged one by one; the rest are counted
OWN_TRACKING_TABLES = ("PoolTrackTable", "PoolTrackTableExpansion")  # allocated by the allocator for itself
SELECTING_OPTIONS = ("tag", "exclude", "pool", "top", "unknown")  # options that leave tags out of a snapshot

_COLUMNS = [("Tag", str), ("Protected", bool), ("Type", str), ("Allocs", int), ("Frees", int), ("Diff", int),
            ("Bytes", int), ("PerAlloc", int)]
_SCAN_COLUMNS = [("ScanAllocs", int), ("ScanBytes", int), ("ScanFree", int), ("ScanFreeBytes", int),
                 ("Mismatch", str)]
# Live counts (PoolMon's Diff) on both sides: cumulative Allocs would grow with any busy tag, not only leaks.
_GROWTH_COLUMNS = [("Tag", str), ("Protected", bool), ("Type", str), ("BaselineLive", int), ("BaselineBytes", int),
                   ("Live", int), ("Bytes", int), ("GrowthLive", int), ("GrowthBytes", int)]
_OWNER_COLUMNS = [("Description", str), ("Binary", str)]


class PoolTags(interfaces.plugins.PluginInterface):
    """Per-tag pool usage from the kernel's tag trackers, like PoolMon; optionally checked against a walk of
    every chunk, or compared with an earlier snapshot to find what leaks.

    Example: vol -f later.raw windows.pooltags --baseline earlier.json --top 10
    """

    _required_framework_version = (2, 0, 0)
    _version = (1, 0, 0)

    @classmethod
    def get_requirements(cls) -> list[interfaces.configuration.RequirementInterface]:
        return [
            plugin_options.kernel(),
            requirements.ChoiceRequirement(
                name="sort",
                choices=list(poolmon.SORT_KEYS),
                description="Order rows by this column, largest first (tag: alphabetical; default: bytes)",
                default="bytes",
                optional=True,
            ),
            plugin_options.tag_patterns("Only tags matching one of these patterns, e.g. Nt* Irp"),
            plugin_options.tag_patterns("Leave out tags matching one of these patterns", name="exclude"),
            requirements.ListRequirement(
                name="pool",
                element_type=str,
                description="Only these pools: nonpaged, paged, session (default: all)",
                optional=True,
            ),
            requirements.IntRequirement(
                name="top", description="Show only the first N rows (before the totals row; default: all)",
                optional=True,
            ),
            plugin_options.flag("unknown", "Only tags that no description file (nor, with --driver-scan, any "
                                "driver) accounts for"),
            plugin_options.driver_scan(DriverScan.NEVER),
            plugin_options.flag("scan", "Also walk every pool chunk and show what was found beside the tracker's "
                                "counts"),
            requirements.StringRequirement(
                name="baseline",
                description="Earlier snapshot to compare with: a memory image, or the JSON of a "
                            "`vol -r json windows.pooltags` run; rows show growth ranked by bytes (default: none)",
                optional=True,
            ),
            plugin_options.flag("any-kernel", "Compare with a --baseline of another kernel build (warn instead "
                                "of refusing)"),
            plugin_options.pooltag_files(),
        ]

    def run(self) -> renderers.TreeGrid:
        kernel = Kernel.from_module(self.context, self.config["kernel"])
        selection = self._filters()
        if self.config.get("baseline"):
            if self.config.get("scan"):
                exits.refuse(self, "--scan and --baseline are two views; give one of them")
            baseline = self._baseline(kernel)
            return renderers.TreeGrid(_GROWTH_COLUMNS + _OWNER_COLUMNS,
                                      collector.fewer_collections(self._growth_rows(kernel, baseline, selection)))
        columns = _COLUMNS + (_SCAN_COLUMNS if self.config.get("scan") else []) + _OWNER_COLUMNS
        rows = self._snapshot_rows(kernel, selection, self._sort_key())
        return renderers.TreeGrid(columns, collector.fewer_collections(rows))

    # -- the current image -----------------------------------------------------
    def _current(self, kernel: Kernel, with_scan: bool) -> list[poolmon.PoolRow]:
        """The tracker's rows, with the census beside them when asked (not yet described)."""
        tracked = tracker_rows(kernel)
        for finding in tracked.findings:
            vollog.warning("tag tracker: %s at %#x", finding.reason, finding.address)
        rows = poolmon.from_tracker(tracked.rows)
        if not with_scan:
            return rows
        tables = [table.address for table in tracked.tables if table.name in OWN_TRACKING_TABLES]
        tables.append(bigpages.read_big_page_table(kernel).address)
        walked = self._census(kernel, tables)
        own_tables = poolmon.unwalked_tables(tables, walked.holders)
        return poolmon.with_census(rows, walked.rows, own_tables)

    def _census(self, kernel: Kernel, tables: list[int]) -> scan.Census:
        """The census, counted as the walk goes (memory stays flat), noting the chunks holding ``tables``."""
        walked = scan.census_of(kernel, self._progress_callback, tables)
        for finding in walked.findings[:FINDINGS_SHOWN]:
            vollog.warning("pool scan: %s at %#x", finding.reason, finding.address)
        if len(walked.findings) > FINDINGS_SHOWN:
            vollog.warning("pool scan: %d more findings", len(walked.findings) - FINDINGS_SHOWN)
        return walked

    def _tags(self, kernel: Kernel) -> TagAttribution:
        """Descriptions (each bad line logged once by the loader), binaries completed by --driver-scan."""
        mode = DriverScan.parse(self.config.get("driver-scan") or DriverScan.NEVER.value)
        if mode is DriverScan.ALWAYS:
            self._progress_callback(0.0, "Scanning driver code for pool tags")
        tags = load_attribution(kernel, self.config.get("pooltag-file") or [], mode)
        for finding in tags.findings:
            vollog.info("driver scan: %s at %#x", finding.reason, finding.address)
        return tags

    def _filters(self) -> dict:
        """The row selection from the options; refuses the run for a pool name or count it cannot use."""
        include = filters.parse_patterns(self.config.get("tag"))
        exclude = filters.parse_patterns(self.config.get("exclude"))
        for text in filters.unmatchable(include + exclude):
            vollog.warning("tag pattern %r is longer than a 4-byte tag and matches nothing", text)
        pools = None
        if self.config.get("pool"):
            pools, unknown = poolmon.pool_columns(self.config["pool"])
            if unknown:
                exits.refuse(self, f"unknown pool(s) {', '.join(unknown)} for --pool: choose from nonpaged, paged, "
                             "session")
        top = self.config.get("top")
        if top is not None and top < 0:
            exits.refuse(self, f"--top {top}: give a count of rows, 0 or more")
        return {"include": include, "exclude": exclude, "pools": pools,
                "unknown_only": bool(self.config.get("unknown"))}

    def _sort_key(self) -> str:
        """The --sort column; the command line refuses others, a caller configuring the plugin may not."""
        key = self.config.get("sort") or "bytes"
        if key not in poolmon.SORT_KEYS:
            exits.refuse(self, f"unknown sort key {key!r}: choose from {', '.join(poolmon.SORT_KEYS)}")
        return key

    def _selected(self, rows: list, selection: dict) -> list:
        """The rows the options select, the first --top of them; a note says why when none are left."""
        chosen = poolmon.select(rows, **selection)
        shown = poolmon.top(chosen, self.config.get("top"))
        if rows and not shown:
            vollog.warning("no rows to show: %s", self._why_empty(rows, chosen, selection))
        return shown

    def _why_empty(self, rows: list, chosen: list, selection: dict) -> str:
        if chosen:
            return "--top 0 leaves none"
        if selection["pools"] is not None and not any(row.pool in selection["pools"] for row in rows):
            return (f"the image's tag tables hold no {' or '.join(sorted(selection['pools']))} rows"
                    + (" (this kernel keeps no session tag table)" if "Session" in selection["pools"] else ""))
        return f"no tag matches {' '.join(plugin_options.given(self.config, SELECTING_OPTIONS))}"

    def _snapshot_rows(self, kernel: Kernel, selection: dict, sort_key: str) -> Iterator[tuple[int, tuple]]:
        with_scan = bool(self.config.get("scan"))
        rows = poolmon.describe(self._current(kernel, with_scan), self._tags(kernel).describe)
        shown = self._selected(poolmon.sort_rows(rows, sort_key), selection)
        for row in shown:
            yield 0, _snapshot_values(row, with_scan)
        total = poolmon.total(shown)
        note = poolmon.snapshot_note(poolmon.kernel_identity(kernel), plugin_options.given(self.config, SELECTING_OPTIONS))
        yield 0, _snapshot_values(total, with_scan)[:-2] + (note, "")

    # -- comparison with an earlier snapshot -------------------------------------
    def _growth_rows(self, kernel: Kernel, baseline: list[poolmon.PoolRow],
                     selection: dict) -> Iterator[tuple[int, tuple]]:
        rows = poolmon.growth(baseline, self._current(kernel, with_scan=False))
        shown = self._selected(poolmon.describe(rows, self._tags(kernel).describe), selection)
        for row in [*shown, poolmon.growth_total(shown)]:
            yield 0, (_tag(row.tag), is_protected(row.tag), row.pool, row.baseline_allocs, row.baseline_bytes,
                      row.allocs, row.bytes, row.diff_allocs, row.diff_bytes, row.description, row.binary)

    def _baseline(self, kernel: Kernel) -> list[poolmon.PoolRow]:
        """The earlier snapshot's rows; refuses the run for a baseline that is missing, unreadable, partial or
        (unless --any-kernel) of another kernel build."""
        path = self.config["baseline"]
        try:
            is_json = poolmon.is_json_file(path)
        except OSError as error:
            exits.refuse(self, f"baseline {path}: {error.strerror or error}")
        if is_json:
            loaded = poolmon.read_snapshot_file(path)
            if loaded.error is not None:
                exits.refuse(self, f"baseline {path}: {loaded.error}")
            if loaded.selection not in (None, poolmon.EVERY_TAG):
                exits.refuse(self, f"baseline {path} is not a full snapshot: it was saved with {loaded.selection}; "
                             "save a run without --tag, --exclude, --pool, --top or --unknown")
            self._check_kernel(path, loaded.kernel, poolmon.kernel_identity(kernel))
            return loaded.rows
        other = self._baseline_kernel(path)
        self._check_kernel(path, poolmon.kernel_identity(other), poolmon.kernel_identity(kernel))
        tracked = tracker_rows(other)
        for finding in tracked.findings:
            vollog.warning("baseline tag tracker: %s at %#x", finding.reason, finding.address)
        return poolmon.from_tracker(tracked.rows)

    def _check_kernel(self, path: str, theirs: str | None, ours: str) -> None:
        if theirs is None:
            vollog.warning("baseline %s does not say which kernel it was taken of; comparing anyway", path)
        elif theirs != ours:
            message = f"baseline {path} is of another kernel build ({theirs}; this image: {ours})"
            if not self.config.get("any-kernel"):
                exits.refuse(self, message + "; give --any-kernel to compare anyway")
            vollog.warning("%s; comparing anyway", message)

    def _baseline_kernel(self, path: str) -> Kernel:
        """Open the other image in a context of its own, with the same automagic a fresh run would use."""
        self._progress_callback(0.0, f"Opening baseline image {path}")
        context = contexts.Context()
        context.config["automagic.LayerStacker.single_location"] = (
            requirements.URIRequirement.location_from_file(path)
        )
        try:
            chosen = automagic.choose_automagic(automagic.available(context), type(self))
            other = plugins.construct_plugin(context, chosen, type(self), "plugins", self._progress_callback,
                                             self.open)
        except exceptions.UnsatisfiedException as error:
            exits.refuse(self, f"baseline {path}: no Windows kernel found in it (unsatisfied: "
                         f"{', '.join(error.unsatisfied)})")
        except exceptions.VolatilityException as error:
            exits.refuse(self, f"baseline {path}: cannot open: {error}")
        return Kernel.from_module(context, other.config["kernel"])


def _tag(tag: bytes) -> str:
    """A tag as PoolMon shows it: without the protected bit (the Protected column says it was set)."""
    return tag_text(unprotected(tag)) or census.UNTAGGED_LABEL


def _snapshot_values(row: poolmon.PoolRow, with_scan: bool) -> tuple:
    values: tuple = (_tag(row.tag), is_protected(row.tag), row.pool, row.allocs, row.frees, row.diff, row.bytes,
                     row.per_alloc)
    if with_scan:
        counts = row.scan or poolmon.ScanCounts()
        values += (counts.allocated, counts.allocated_bytes, counts.free, counts.free_bytes,
                   "*" if row.mismatch and row.tag != poolmon.TOTAL_TAG else "")
    return values + (row.description, row.binary)
