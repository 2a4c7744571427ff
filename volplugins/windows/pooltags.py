"""windows.pooltags: PoolMon for memory images, with a chunk census beside it and leak hunting across snapshots."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator

from volatility3.framework import automagic, contexts, exceptions, interfaces, plugins, renderers
from volatility3.framework.configuration import requirements

from volplugins.pool import census, plugin_options, poolmon, scan
from volplugins.pool.attribution import TagAttribution, load_attribution
from volplugins.pool.kernel import Kernel
from volplugins.pool.tags import compile_pattern, tag_text
from volplugins.pool.tracker import tracker_rows

vollog = logging.getLogger(__name__)

JSON_SNIFF = 64  # leading bytes read to tell a saved JSON run from a memory image
FINDINGS_SHOWN = 10  # scan findings logged one by one; the rest are counted
_UTF8_BOM = b"\xef\xbb\xbf"

_COLUMNS = [("Tag", str), ("Type", str), ("Allocs", int), ("Frees", int), ("Diff", int), ("Bytes", int),
            ("PerAlloc", int)]
_SCAN_COLUMNS = [("ScanAllocs", int), ("ScanBytes", int), ("ScanFree", int), ("ScanFreeBytes", int),
                 ("Mismatch", str)]
_GROWTH_COLUMNS = [("Tag", str), ("Type", str), ("BaselineAllocs", int), ("BaselineBytes", int), ("Allocs", int),
                   ("Bytes", int), ("DiffAllocs", int), ("DiffBytes", int)]
_OWNER_COLUMNS = [("Description", str), ("Binary", str)]


class PoolTags(interfaces.plugins.PluginInterface):
    """Per-tag pool usage from the kernel's tag trackers, like PoolMon; optionally checked against a walk of
    every chunk, or compared with an earlier snapshot to find what leaks."""

    _required_framework_version = (2, 0, 0)
    _version = (1, 0, 0)

    @classmethod
    def get_requirements(cls) -> list[interfaces.configuration.RequirementInterface]:
        return [
            plugin_options.kernel(),
            requirements.ChoiceRequirement(
                name="sort",
                choices=list(poolmon.SORT_KEYS),
                description="Order rows by this column, largest first (tag: alphabetical)",
                default="bytes",
                optional=True,
            ),
            plugin_options.tag_patterns("Only tags matching one of these patterns, e.g. Nt* Irp"),
            plugin_options.tag_patterns("Leave out tags matching one of these patterns", name="exclude"),
            requirements.ListRequirement(
                name="pool",
                element_type=str,
                description="Only these pools: nonpaged, paged, session",
                optional=True,
            ),
            requirements.IntRequirement(
                name="top", description="Show only the first N rows (before the totals row)", optional=True
            ),
            plugin_options.flag("unknown", "Only tags that no description file (nor, with --driver-scan, any "
                                "driver) accounts for"),
            plugin_options.flag("driver-scan", "Name binaries of tags by scanning loaded drivers' code for the "
                                "tags they allocate with"),
            plugin_options.flag("scan", "Also walk every pool chunk and show what was found beside the tracker's "
                                "counts"),
            requirements.StringRequirement(
                name="baseline",
                description="Earlier snapshot to compare with: a memory image, or the JSON of a "
                            "`vol -r json windows.pooltags` run; rows show growth ranked by bytes",
                optional=True,
            ),
            plugin_options.pooltag_files(),
        ]

    def run(self) -> renderers.TreeGrid:
        kernel = Kernel.from_module(self.context, self.config["kernel"])
        baseline = self._baseline() if self.config.get("baseline") else None
        if baseline is not None:
            if self.config.get("scan"):
                vollog.warning("--scan is not shown when comparing with --baseline")
            return renderers.TreeGrid(_GROWTH_COLUMNS + _OWNER_COLUMNS, self._growth_rows(kernel, baseline))
        columns = _COLUMNS + (_SCAN_COLUMNS if self.config.get("scan") else []) + _OWNER_COLUMNS
        return renderers.TreeGrid(columns, self._snapshot_rows(kernel))

    # -- the current image -----------------------------------------------------
    def _current(self, kernel: Kernel, with_scan: bool) -> list[poolmon.PoolRow]:
        """The tracker's rows, with the census beside them when asked (not yet described)."""
        tracked = tracker_rows(kernel)
        for finding in tracked.findings:
            vollog.warning("tag tracker: %s at %#x", finding.reason, finding.address)
        rows = poolmon.from_tracker(tracked.rows)
        if with_scan:
            rows = poolmon.with_census(rows, self._census(kernel))
        return rows

    def _census(self, kernel: Kernel) -> list[scan.CensusRow]:
        walked = scan.scan_pools(kernel, self._progress_callback)
        for finding in walked.findings[:FINDINGS_SHOWN]:
            vollog.warning("pool scan: %s at %#x", finding.reason, finding.address)
        if len(walked.findings) > FINDINGS_SHOWN:
            vollog.warning("pool scan: %d more findings", len(walked.findings) - FINDINGS_SHOWN)
        return scan.census(walked.chunks, group_untagged=True)

    def _tags(self, kernel: Kernel) -> TagAttribution:
        """Descriptions (each bad line logged once by the loader), binaries completed by --driver-scan."""
        driver_scan = bool(self.config.get("driver-scan"))
        if driver_scan:
            self._progress_callback(0.0, "Scanning driver code for pool tags")
        tags = load_attribution(kernel, self.config.get("pooltag-file") or [], driver_scan)
        for finding in tags.findings:
            vollog.info("driver scan: %s at %#x", finding.reason, finding.address)
        return tags

    def _filters(self) -> dict:
        include = [compile_pattern(text) for text in self.config.get("tag") or []]
        exclude = [compile_pattern(text) for text in self.config.get("exclude") or []]
        pools = None
        if self.config.get("pool"):
            pools, unknown = poolmon.pool_columns(self.config["pool"])
            if unknown:
                vollog.error("unknown pool(s) %s: choose from nonpaged, paged, session", ", ".join(unknown))
        return {"include": include, "exclude": exclude, "pools": pools,
                "unknown_only": bool(self.config.get("unknown"))}

    def _sort_key(self) -> str:
        """The --sort column; the command line refuses others, a caller configuring the plugin may not."""
        key = self.config.get("sort") or "bytes"
        if key not in poolmon.SORT_KEYS:
            vollog.error("unknown sort key %r: choose from %s; sorting by bytes", key, ", ".join(poolmon.SORT_KEYS))
            return "bytes"
        return key

    def _snapshot_rows(self, kernel: Kernel) -> Iterator[tuple[int, tuple]]:
        with_scan = bool(self.config.get("scan"))
        rows = poolmon.describe(self._current(kernel, with_scan), self._tags(kernel).describe)
        rows = poolmon.select(rows, **self._filters())
        shown = poolmon.top(poolmon.sort_rows(rows, self._sort_key()), self.config.get("top"))
        for row in [*shown, poolmon.total(shown)]:
            yield 0, _snapshot_values(row, with_scan)

    # -- comparison with an earlier snapshot -------------------------------------
    def _growth_rows(self, kernel: Kernel, baseline: list[poolmon.PoolRow]) -> Iterator[tuple[int, tuple]]:
        rows = poolmon.growth(baseline, self._current(kernel, with_scan=False))
        rows = poolmon.select(poolmon.describe(rows, self._tags(kernel).describe), **self._filters())
        shown = poolmon.top(rows, self.config.get("top"))
        for row in [*shown, poolmon.growth_total(shown)]:
            yield 0, (tag_text(row.tag), row.pool, row.baseline_allocs, row.baseline_bytes, row.allocs,
                      row.bytes, row.diff_allocs, row.diff_bytes, row.description, row.binary)

    def _baseline(self) -> list[poolmon.PoolRow] | None:
        """The earlier snapshot's rows, or None (with the reason logged) so the current rows still print."""
        path = Path(self.config["baseline"])
        try:
            with path.open("rb") as handle:
                head = handle.read(JSON_SNIFF)
        except OSError as error:
            vollog.error("baseline %s: cannot read: %s", path, error.strerror or error)
            return None
        if head.removeprefix(_UTF8_BOM).lstrip()[:1] in (b"[", b"{"):
            return self._baseline_from_json(path)
        return self._baseline_from_image(path)

    def _baseline_from_json(self, path: Path) -> list[poolmon.PoolRow] | None:
        try:
            text = path.read_bytes().removeprefix(_UTF8_BOM).decode("utf-8")
        except (OSError, UnicodeDecodeError) as error:
            vollog.error("baseline %s: cannot read as UTF-8 JSON: %s", path, error)
            return None
        loaded = poolmon.parse_snapshot(text)
        if loaded.error is not None:
            vollog.error("baseline %s: %s; showing the current image only", path, loaded.error)
            return None
        return loaded.rows

    def _baseline_from_image(self, path: Path) -> list[poolmon.PoolRow] | None:
        """Open the other image in a context of its own, with the same automagic a fresh run would use."""
        self._progress_callback(0.0, f"Opening baseline image {path.name}")
        context = contexts.Context()
        context.config["automagic.LayerStacker.single_location"] = (
            requirements.URIRequirement.location_from_file(str(path.resolve()))
        )
        try:
            chosen = automagic.choose_automagic(automagic.available(context), type(self))
            other = plugins.construct_plugin(context, chosen, type(self), "plugins", self._progress_callback,
                                             self.open)
        except exceptions.UnsatisfiedException as error:
            vollog.error("baseline %s: no Windows kernel found in it (unsatisfied: %s); showing the current image only",
                         path, ", ".join(error.unsatisfied))
            return None
        except exceptions.VolatilityException as error:
            vollog.error("baseline %s: cannot open: %s; showing the current image only", path, error)
            return None
        tracked = tracker_rows(Kernel.from_module(context, other.config["kernel"]))
        for finding in tracked.findings:
            vollog.warning("baseline tag tracker: %s at %#x", finding.reason, finding.address)
        return poolmon.from_tracker(tracked.rows)


def _snapshot_values(row: poolmon.PoolRow, with_scan: bool) -> tuple:
    tag = tag_text(row.tag) or census.UNTAGGED_LABEL
    values: tuple = (tag, row.pool, row.allocs, row.frees, row.diff, row.bytes, row.per_alloc)
    if with_scan:
        counts = row.scan or poolmon.ScanCounts()
        values += (counts.allocated, counts.allocated_bytes, counts.free, counts.free_bytes,
                   "*" if row.mismatch and row.tag != poolmon.TOTAL_TAG else "")
    return values + (row.description, row.binary)
