"""windows.poolcensus: every pool chunk of an image (WinDbg's ``!poolfind`` and ``!poolval`` over a whole image).

One walk of every pool, several views chosen by option: the chunk listing
(filtered, optionally dumped to files), the big page table, free space
analysis, objects carved from free chunks, consistency findings, coverage.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from collections.abc import Callable, Iterable, Iterator

from volatility3.framework import interfaces, renderers
from volatility3.framework.configuration import requirements
from volatility3.framework.renderers import conversion, format_hints

from volplugins.pool import (bigpages, carve, collector, exits, filters, listing, plugin_options, regions, scan,
                             validate)
from volplugins.pool.filters import ChunkFilter
from volplugins.pool.kernel import Kernel
from volplugins.pool.model import FREED_STATES, Backing, Chunk, State
from volplugins.pool.tagdb import TagDatabase
from volplugins.pool.tags import is_protected, tag_text, unprotected

vollog = logging.getLogger(__name__)

FILTERS = ("tag", "free", "allocated", "min-size", "max-size", "big", "region")
VIEWS = ("bigpages", "free-analysis", "carve", "validate", "coverage")

_CHUNK_COLUMNS = [
    ("Address", format_hints.Hex),
    ("Size", format_hints.Hex),
    ("Tag", str),
    ("Protected", bool),
    ("StaleTag", str),
    ("Pool", str),
    ("PoolType", format_hints.Hex),
    ("State", str),
    ("Backing", str),
    ("Region", str),
    ("Description", str),
    ("Binary", str),
    ("File", str),
]
_BIG_COLUMNS = [
    ("Index", int),
    ("Address", format_hints.Hex),
    ("End", format_hints.Hex),
    ("Size", format_hints.Hex),
    ("Tag", str),
    ("Protected", bool),
    ("PoolType", format_hints.Hex),
    ("State", str),
    ("Region", str),
    ("Description", str),
]
_FREE_COLUMNS = [
    ("Region", str),
    ("Backing", str),
    ("FreeChunks", int),
    ("FreeBytes", format_hints.Hex),
    ("CachedFreeChunks", int),
    ("CachedFreeBytes", format_hints.Hex),
    ("LargestFreeRun", format_hints.Hex),
    ("FreeRuns", int),
    ("Fragmentation", float),
    ("Address", format_hints.Hex),
    ("Size", format_hints.Hex),
    ("State", str),
    ("Tag", str),
    ("StaleTag", str),
    ("StaleProtected", bool),
    ("StaleTagAt", format_hints.Hex),
    ("Description", str),
]
_CARVE_COLUMNS = [
    ("Chunk", format_hints.Hex),
    ("ChunkSize", format_hints.Hex),
    ("ChunkState", str),
    ("Region", str),
    ("Type", str),
    ("ObjectHeader", format_hints.Hex),
    ("Body", format_hints.Hex),
    ("Name", str),
    ("PID", int),
    ("PPID", int),
    ("TID", int),
    ("CreateTime", datetime.datetime),
    ("ExitTime", datetime.datetime),
    ("Freed", bool),
]
_VALIDATE_COLUMNS = [("Address", format_hints.Hex), ("Region", str), ("Reason", str)]
_COVERAGE_COLUMNS = [("Measure", str), ("Value", int), ("Meaning", str)]
_CLASSIC_CAUSES = ("; on classic pool, pages of the pool regions, N/A when Volatility translates the kernel "
                   "layer itself (not x64, or pagefiles given)")
_COVERAGE_MEANINGS = {
    "chunks": "pool chunks found (every view starts from these)",
    "findings": "problems the walk met (--validate lists them)",
    "heaps": "segment heap pool heaps walked",
    "segments": "segment heap segments walked",
    "subsegments": "VS and LFH subsegments walked",
    "pages_walked": "pages read: busy page ranges (segment heap), mapped pool-region pages (classic)",
    "pages_unreadable": "pool pages the walk could not read: paged out, not in the image or unmapped (the three "
                        "rows below); chunk headers on them could not be read",
    "pages_paged_out": "of those, pages whose page table entry says where they went: the pagefile (which "
                       "Volatility reads when given it), a prototype or a transition page" + _CLASSIC_CAUSES,
    "pages_not_in_image": "of those, pages mapped to physical memory the image does not hold (a truncated image, "
                          "or a dump that left them out)" + _CLASSIC_CAUSES,
    "pages_unmapped": "of those, pages of busy segment heap ranges with no page at all (decommitted or never "
                      "touched); N/A on classic pool, where nothing says which region pages should exist",
    "big_entries": "in-use big page table entries, live and freed",
    "vs_subsegments": "VS subsegments walked",
    "lfh_subsegments": "LFH subsegments walked",
    "whole_ranges": "segment page ranges allocated as one block",
    "classic_pages": "classic pool pages whose chunk chain covers the page exactly",
    "pages_validated": "of those, pages taken for pool on their own chain alone, with no usable region "
                       "bookkeeping to go by (their chunks say 'found by page validation')",
    "segments_validated": "segment heap segments no heap list leads to, taken for pool on their own signatures "
                          "(their chunks say 'found by page validation')",
    "pages_not_pool": "mapped pages of the pool regions that hold no chunk chain (other data, big allocations)",
    "bytes_read": "bytes read from the image",
    "milliseconds": "time the walk took",
}


def _hex_or_absent(value: int | None):
    return renderers.NotAvailableValue() if value is None else format_hints.Hex(value)


def _int_or_absent(value: int | None):
    return renderers.NotApplicableValue() if value is None else value


def _time_or_absent(value: int | None):
    return renderers.NotApplicableValue() if not value else conversion.wintime_to_datetime(value)


class PoolCensus(interfaces.plugins.PluginInterface):
    """Lists every pool chunk (filters: tag, state, size, big, region), or one of the other views: the big page
    table, free space, objects carved from free chunks, consistency findings, walk coverage.

    Example: vol -f mem.raw -o out windows.poolcensus --tag Proc,Thre --allocated --dump
    """

    _required_framework_version = (2, 0, 0)
    _version = (1, 0, 0)

    @classmethod
    def get_requirements(cls) -> list[interfaces.configuration.RequirementInterface]:
        return [
            plugin_options.kernel(),
            plugin_options.tag_patterns("Only chunks whose tag matches one of these patterns, e.g. Proc Nt* 'Irp '"),
            plugin_options.flag("free", "Only free and cached-free chunks"),
            plugin_options.flag("allocated", "Only allocated chunks"),
            requirements.IntRequirement(name="min-size", description="Only chunks of at least this many bytes (default: any size)",
                                        optional=True),
            requirements.IntRequirement(name="max-size", description="Only chunks of at most this many bytes (default: any size)",
                                        optional=True),
            plugin_options.flag("big", "Only big and large allocations (no pool header, tracked in the big page "
                                "table)"),
            requirements.StringRequirement(
                name="region",
                description="Only chunks in this kernel region (case insensitive, a prefix is enough), "
                            "e.g. 'Paged pool', nonpaged (default: every region)",
                optional=True,
            ),
            plugin_options.flag("bigpages", "View: every in-use PoolBigPageTable entry, freed ones flagged"),
            plugin_options.flag(
                "free-analysis",
                "View: free space per region and backing (count, bytes, largest free run, "
                "fragmentation = 1 - largest run / free bytes), then the free chunks with their stale tags",
            ),
            plugin_options.flag(
                "carve",
                "View: processes, threads and files rebuilt from the stale bytes of free chunks "
                "(--tag, --min-size, --max-size, --big and --region choose the chunks searched)",
            ),
            plugin_options.flag(
                "validate",
                "View: consistency findings over the whole image, like !poolval (broken chains, "
                "undecodable or oversized headers, bad tags, overlapping big page table entries)",
            ),
            plugin_options.flag(
                "coverage",
                "View: how much of the pools the walk covered (heaps, segments, pages walked, pages unreadable "
                "by cause: paged out, not in the image, unmapped)",
            ),
            plugin_options.flag(
                "dump", "Write each listed chunk's bytes to <address>.<tag>.pool in the output directory"
            ),
            plugin_options.pooltag_files(),
        ]

    # -- options -------------------------------------------------------------
    def _view(self) -> str:
        """The view asked for ('' for the chunk listing); refuses the run when several are."""
        chosen = [name for name in VIEWS if self.config.get(name)]
        if len(chosen) > 1:
            exits.refuse(self, "choose one view at a time; got " + ", ".join(f"--{name}" for name in chosen))
        if chosen and self.config.get("dump"):
            vollog.warning("--dump writes the chunks of the chunk listing; --%s has nothing to dump, so nothing "
                           "is written", chosen[0])
        return chosen[0] if chosen else ""

    def _filter(self) -> ChunkFilter:
        """The listing filters from the options; refuses the run when they contradict each other."""
        if self.config.get("free") and self.config.get("allocated"):
            exits.refuse(self, "--free and --allocated exclude each other; give at most one")
        low, high = self.config.get("min-size"), self.config.get("max-size")
        if low is not None and high is not None and low > high:
            exits.refuse(self, f"--min-size {low:#x} is larger than --max-size {high:#x}: nothing can match")
        patterns = filters.parse_patterns(self.config.get("tag"))
        for text in filters.unmatchable(patterns):
            vollog.warning("tag pattern %r is longer than a 4-byte tag and matches nothing", text)
        state = FREED_STATES if self.config.get("free") else (State.ALLOCATED,) if self.config.get("allocated") else None
        region = self.config.get("region")
        return ChunkFilter(
            tags=patterns,
            state=state,
            min_size=low,
            max_size=high,
            big_only=bool(self.config.get("big")),
            region=region.strip().lower() if region else None,
        )

    # -- shared pieces ---------------------------------------------------------
    def _kernel(self) -> Kernel:
        return Kernel.from_module(self.context, self.config["kernel"])

    def _tags(self) -> TagDatabase:
        tags = TagDatabase.load(self.config.get("pooltag-file") or [])
        for warning in tags.warnings:
            vollog.warning("tag file %s line %s: %s", *warning)
        return tags

    def _scan(self, kernel: Kernel, announce_problems: bool = True) -> scan.PoolScan:
        """Every chunk; when the walk met problems, a note counts them as --validate will list them."""
        result = scan.scan_pools(kernel, progress=self._progress_callback)
        coverage = result.coverage
        if coverage.pages_unreadable:
            vollog.info("%d pool pages could not be read (see --coverage for why): chunk headers on them could not "
                        "be read", coverage.pages_unreadable)
        if result.findings and announce_problems:
            vollog.warning("%d problem(s) found in the pools; --validate lists them",
                           len(validate.validate(kernel, result)))
        return result

    def _check_region(self, wanted: ChunkFilter, names: Iterable[str]) -> None:
        known = sorted(set(names))
        if wanted.region is not None and not any(wanted.region_matches(name) for name in known):
            vollog.warning("no region matches --region %r; regions holding pool: %s",
                           self.config.get("region"), ", ".join(known) or "none")

    # -- views -----------------------------------------------------------------
    def _chunk_rows(self, kernel: Kernel, wanted: ChunkFilter) -> Iterator[tuple[int, tuple]]:
        tags = self._tags()
        result = self._scan(kernel)
        regions_of = listing.region_names(kernel, result.chunks, result.found_by_validation)
        self._check_region(wanted, regions_of.values())
        dump = bool(self.config.get("dump"))
        listed: list[Chunk] = []
        for chunk in result.chunks:
            region = regions_of[chunk.address]
            stale = listing.selected_stale_tag(kernel, wanted, chunk, region)
            if stale is None:
                continue
            listed.append(chunk)
            description, binary = tags.describe(stale if chunk.state in FREED_STATES else chunk.tag)
            written = self._dump(kernel, chunk) if dump else ""
            yield 0, (
                format_hints.Hex(chunk.address),
                format_hints.Hex(chunk.size),
                *listing.shown_tag(chunk),
                tag_text(unprotected(stale)),
                chunk.pool or renderers.NotAvailableValue(),
                _hex_or_absent(chunk.pool_type),
                chunk.state.value,
                chunk.backing.value,
                region,
                description,
                binary,
                written,
            )
        if result.chunks and not listed:
            vollog.warning("no chunk matches the filters (%s) among %d chunks",
                           " ".join(plugin_options.given(self.config, FILTERS)), len(result.chunks))
        absent = renderers.NotApplicableValue()
        for (state, backing), (count, size) in listing.counts(listed).items():
            yield 0, (absent, format_hints.Hex(size), "", absent, "", "", absent, state.value, backing.value, "",
                      f"{listing.SUMMARY}: {count} chunk(s)", "", "")

    def _dump(self, kernel: Kernel, chunk: Chunk) -> str:
        """Write one chunk; the listing is built before any row is shown, so a failed write refuses the run."""
        data = kernel.read(chunk.address, chunk.size, pad=True)
        try:
            with self.open(listing.dump_file_name(chunk)) as handle:
                handle.write(data)
                return handle.preferred_filename
        except OSError as error:
            exits.refuse(self, f"--dump cannot write to the output directory (-o): {error}")

    def _bigpage_rows(self, kernel: Kernel, wanted: ChunkFilter) -> Iterator[tuple[int, tuple]]:
        tags = self._tags()
        table = bigpages.read_big_page_table(kernel)
        for finding in table.findings:
            vollog.warning("big page table at %#x: %s", finding.address, finding.reason)
        for entry in table.allocations:
            region = regions.classify(kernel, entry.va).name
            state = State.FREE if entry.free else State.ALLOCATED
            as_chunk = Chunk(entry.va, entry.size, 0, entry.tag, state, Backing.BIG)
            if not dataclasses.replace(wanted, big_only=False).matches(as_chunk, region):
                continue
            yield 0, (
                entry.index,
                format_hints.Hex(entry.va),
                format_hints.Hex(entry.end),
                format_hints.Hex(entry.size),
                *listing.shown_tag(as_chunk),
                _hex_or_absent(entry.pool_type),
                state.value,
                region,
                tags.describe(entry.tag)[0],
            )

    def _free_rows(self, kernel: Kernel, wanted: ChunkFilter) -> Iterator[tuple[int, tuple]]:
        tags = self._tags()
        result = self._scan(kernel)
        regions_of = listing.region_names(kernel, result.chunks, result.found_by_validation)
        self._check_region(wanted, regions_of.values())
        absent = renderers.NotApplicableValue()
        for summary, members in listing.free_space(kernel, result.chunks, regions_of, wanted):
            yield 0, (
                summary.region, summary.backing, summary.free_chunks, format_hints.Hex(summary.free_bytes),
                summary.cached_free_chunks, format_hints.Hex(summary.cached_free_bytes),
                format_hints.Hex(summary.largest_free_run), summary.free_runs, round(summary.fragmentation, 4),
                absent, absent, "", "", "", absent, absent, "",
            )
            for member in members:
                chunk, stale = member.chunk, member.stale
                yield 1, (
                    member.region, summary.backing, absent, absent, absent, absent, absent, absent, absent,
                    format_hints.Hex(chunk.address), format_hints.Hex(chunk.size), chunk.state.value,
                    listing.shown_tag(chunk)[0], tag_text(unprotected(stale.tag)), is_protected(stale.tag),
                    _hex_or_absent(stale.header), tags.describe(stale.tag)[0] if stale.tag else "",
                )

    def _carve_rows(self, kernel: Kernel, wanted: ChunkFilter) -> Iterator[tuple[int, tuple]]:
        result = self._scan(kernel)
        regions_of = listing.region_names(kernel, result.chunks, result.found_by_validation)
        self._check_region(wanted, regions_of.values())
        searched = dataclasses.replace(wanted, state=None)
        chosen = [chunk for chunk in result.chunks if searched.matches(chunk, regions_of[chunk.address])]
        for found in carve.carve(kernel, chosen, progress=self._progress_callback):
            yield 0, (
                format_hints.Hex(found.chunk.address),
                format_hints.Hex(found.chunk.size),
                found.chunk.state.value,
                regions_of[found.chunk.address],
                found.type_name,
                format_hints.Hex(found.header),
                format_hints.Hex(found.body),
                found.name,
                _int_or_absent(found.pid),
                _int_or_absent(found.ppid),
                _int_or_absent(found.tid),
                _time_or_absent(found.create_time),
                _time_or_absent(found.exit_time),
                True,
            )

    def _validate_rows(self, kernel: Kernel) -> Iterator[tuple[int, tuple]]:
        result = self._scan(kernel, announce_problems=False)
        findings = validate.validate(kernel, result)
        if not findings:
            yield 0, (renderers.NotApplicableValue(), "", f"no problems found in {len(result.chunks)} chunks")
        for finding in findings:
            yield 0, (format_hints.Hex(finding.address), regions.classify(kernel, finding.address).name,
                      finding.reason)

    def _coverage_rows(self, kernel: Kernel) -> Iterator[tuple[int, tuple]]:
        result = self._scan(kernel)
        measures = [("chunks", len(result.chunks)), ("findings", len(result.findings))]
        for item in dataclasses.fields(result.coverage):
            value = getattr(result.coverage, item.name)
            if item.name == "seconds":
                measures.append(("milliseconds", round(value * 1000)))
            else:
                measures.append((item.name, _int_or_absent(value)))
        for name, value in measures:
            yield 0, (name, value, _COVERAGE_MEANINGS.get(name, ""))

    def run(self) -> renderers.TreeGrid:
        view = self._view()
        wanted = self._filter()
        kernel = self._kernel()
        views: dict[str, tuple[list, Callable[[], Iterable[tuple[int, tuple]]]]] = {
            "": (_CHUNK_COLUMNS, lambda: self._listing(kernel, wanted)),
            "bigpages": (_BIG_COLUMNS, lambda: self._bigpage_rows(kernel, wanted)),
            "free-analysis": (_FREE_COLUMNS, lambda: self._free_rows(kernel, wanted)),
            "carve": (_CARVE_COLUMNS, lambda: self._carve_rows(kernel, wanted)),
            "validate": (_VALIDATE_COLUMNS, lambda: self._validate_rows(kernel)),
            "coverage": (_COVERAGE_COLUMNS, lambda: self._coverage_rows(kernel)),
        }
        columns, rows = views[view]
        return renderers.TreeGrid(columns, collector.fewer_collections(rows()))

    def _listing(self, kernel: Kernel, wanted: ChunkFilter) -> Iterable[tuple[int, tuple]]:
        """The chunk listing; with --dump every file is written before the table starts, so that an output
        directory that cannot be written refuses the run instead of failing row by row."""
        rows = self._chunk_rows(kernel, wanted)
        return list(rows) if self.config.get("dump") else rows
