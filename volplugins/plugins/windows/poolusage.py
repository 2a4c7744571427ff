"""windows.poolusage: each pool's bytes in use against the kernel's limit, and the tags holding most of it."""

from __future__ import annotations

from typing import Iterator

from volatility3.framework import interfaces, renderers
from volatility3.framework.configuration import requirements
from volatility3.framework.renderers import format_hints

from volplugins.pool import collector, exhaustion, plugin_options
from volplugins.pool.attribution import DriverScan, TagAttribution, load_attribution
from volplugins.pool.kernel import Kernel
from volplugins.pool.tags import tag_text, unprotected

DEFAULT_TOP = 5


class PoolUsage(interfaces.plugins.PluginInterface):
    """Per pool (nonpaged, paged, session): bytes in use, the limit the kernel enforces, percent used, the top
    tags, and a warning when a pool is above 90% of its limit or one tag holds more than a third of it."""

    _required_framework_version = (2, 0, 0)
    _version = (1, 0, 0)

    @classmethod
    def get_requirements(cls) -> list[interfaces.configuration.RequirementInterface]:
        return [
            plugin_options.kernel(),
            requirements.IntRequirement(name="top", description=f"Tags listed per pool (default {DEFAULT_TOP})",
                                        default=DEFAULT_TOP, optional=True),
            plugin_options.pooltag_files(),
            plugin_options.driver_scan(DriverScan.AUTO),
        ]

    def _generator(self) -> Iterator[tuple[int, tuple]]:
        kernel = Kernel.from_module(self.context, self.config["kernel"])
        tags = load_attribution(kernel, self.config.get("pooltag-file") or [], self.config.get("driver-scan"))
        usage, findings = exhaustion.pool_usage(kernel, max(0, self.config.get("top") or DEFAULT_TOP))
        yield from _usage_rows(usage, tags)
        for finding in findings:
            yield 0, _row("", note=f"{finding.address:#x}: {finding.reason}")

    def run(self) -> renderers.TreeGrid:
        return renderers.TreeGrid(COLUMNS, collector.fewer_collections(self._generator()))


COLUMNS = [
    ("Pool", str),
    ("Tag", str),
    ("Bytes", int),
    ("Limit", format_hints.Hex),
    ("Percent", float),
    ("Allocs", int),
    ("Binary", str),
    ("Warning", str),
    ("Note", str),
]


def _usage_rows(usage: list[exhaustion.PoolUsage], tags: TagAttribution) -> Iterator[tuple[int, tuple]]:
    """A pool row (in use, limit, percent) and under it one row per top tag."""
    for pool in usage:
        yield 0, _row(pool.pool, "", pool.in_use, pool.limit.limit, pool.percent, None, "", pool.warning,
                      pool.limit.describe())
        for row in pool.top:
            description, binary = tags.describe(row.tag)
            yield 1, _row(pool.pool, tag_text(unprotected(row.tag)), row.bytes, pool.limit.limit,
                          100.0 * pool.share(row), row.diff, binary, pool.tag_warning(row), description)


def _row(pool: str, tag: str = "", size: int | None = None, limit: int | None = None, percent: float | None = None,
         allocs: int | None = None, binary: str = "", warning: str = "", note: str = "") -> tuple:
    absent = renderers.NotAvailableValue()
    return (
        pool,
        tag,
        size if size is not None else absent,
        format_hints.Hex(limit) if limit else absent,
        round(percent, 2) if percent is not None else absent,
        allocs if allocs is not None else absent,
        binary,
        warning,
        note,
    )
