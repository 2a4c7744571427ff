"""windows.pooldrivers: which loaded driver uses which pool tag, read from the drivers' code in memory."""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Iterator

from volatility3.framework import interfaces, renderers
from volatility3.framework.renderers import format_hints

from volplugins.pool import collector, filters, plugin_options
from volplugins.pool.driverscan import DriverScanResult, TagUse, scan_drivers
from volplugins.pool.kernel import Kernel
from volplugins.pool.tagdb import TagDatabase
from volplugins.pool.tags import TagPattern, is_protected, tag_text, unprotected

vollog = logging.getLogger(__name__)

# File names in a description's binary field; "nt!mm"-style names stand for the kernel itself.
_FILE_SUFFIXES = (".sys", ".dll", ".exe")


class PoolDrivers(interfaces.plugins.PluginInterface):
    """Lists the pool tags each loaded module passes to the pool routines (allocate, free, lookaside setup).

    Example: vol -f mem.raw windows.pooldrivers --tag 'Nfk?' --call-sites
    """

    _required_framework_version = (2, 0, 0)
    _version = (1, 0, 0)

    @classmethod
    def get_requirements(cls) -> list[interfaces.configuration.RequirementInterface]:
        return [
            plugin_options.kernel(),
            plugin_options.tag_patterns("Only tags matching one of these patterns: which drivers use them"),
            plugin_options.flag("include-kernel", "Also scan the kernel's own code (slower; it calls the pool "
                                "routines directly)"),
            plugin_options.flag("call-sites", "List every call site under its tag"),
            plugin_options.pooltag_files(),
        ]

    def _generator(self) -> Iterator[tuple[int, tuple]]:
        kernel = Kernel.from_module(self.context, self.config["kernel"])
        tags = TagDatabase.load(self.config.get("pooltag-file") or [])  # logs each bad line once
        patterns = filters.parse_patterns(self.config.get("tag"))
        result = scan_drivers(kernel, include_kernel=bool(self.config.get("include-kernel")))
        vollog.info("driver scan: %d module(s) scanned, %d tag(s) found", result.modules_scanned, len(result.tags))
        by_tag = _uses_by_tag(result, patterns)
        for tag in sorted(by_tag):
            yield from self._tag_rows(tag, by_tag[tag], tags)
        for pattern in patterns:
            if not any(filters.matches_any([pattern], tag) for tag in by_tag):
                yield 0, _note_row(f"no scanned module passes a tag matching '{pattern.text}' to a pool routine")
        if result.findings:
            vollog.warning("driver scan: %d part(s) of modules unreadable, listed at the end", len(result.findings))
        for finding in result.findings:
            yield 0, _note_row(finding.reason, finding.address)

    def _tag_rows(self, tag: bytes, uses: list[TagUse], tags: TagDatabase) -> Iterator[tuple[int, tuple]]:
        modules = sorted({use.module for use in uses}, key=str.lower)
        routines = sorted({use.routine for use in uses})
        description, binary = tags.describe(tag)
        yield 0, (
            tag_text(unprotected(tag)),
            is_protected(tag),
            ", ".join(modules),
            ", ".join(routines),
            len({(use.module, use.call_site) for use in uses}),
            renderers.NotApplicableValue(),
            description,
            binary,
            _ownership_note(binary, modules),
        )
        if self.config.get("call-sites"):
            for use in sorted(uses, key=lambda use: (use.module.lower(), use.call_site, use.routine)):
                yield 1, (tag_text(unprotected(tag)), is_protected(tag), use.module, use.routine, 1,
                          format_hints.Hex(use.call_site), "", "", "")

    def run(self) -> renderers.TreeGrid:
        return renderers.TreeGrid(
            [
                ("Tag", str),
                ("Protected", bool),
                ("Modules", str),
                ("Routines", str),
                ("CallSites", int),
                ("CallSite", format_hints.Hex),
                ("Description", str),
                ("Binary", str),
                ("Note", str),
            ],
            collector.fewer_collections(self._generator()),
        )


def _uses_by_tag(result: DriverScanResult, patterns: tuple[TagPattern, ...]) -> dict[bytes, list[TagUse]]:
    """The scan's call sites grouped by tag, keeping only tags matching a pattern when there are patterns."""
    grouped: dict[bytes, list[TagUse]] = defaultdict(list)
    for use in result.uses:
        if not patterns or filters.matches_any(patterns, use.tag):
            grouped[use.tag].append(use)
    return dict(grouped)


def _ownership_note(binary: str, modules: list[str]) -> str:
    """Flags a tag the descriptions give to one driver file while other modules' code uses it.

    Drivers normally keep their own tags, so a module using a tag described
    as another file's can be a component of that driver, a shared library, or
    a driver disguising its allocations.
    """
    if not binary.lower().endswith(_FILE_SUFFIXES):
        return ""
    others = [module for module in modules if module.lower() != binary.lower()]
    if not others:
        return ""
    return f"descriptions name {binary}; also used by {', '.join(others)}"


def _note_row(note: str, address: int | None = None) -> tuple:
    where = format_hints.Hex(address) if address is not None else renderers.NotApplicableValue()
    absent = renderers.NotApplicableValue()
    return ("", absent, "", "", absent, where, "", "", note)
