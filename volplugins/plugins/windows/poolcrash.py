"""windows.poolcrash: why a system blue-screened, and the pool chunk and driver behind a pool bug check."""

from __future__ import annotations

from typing import Iterator

from volatility3.framework import interfaces, renderers
from volatility3.framework.renderers import format_hints

from volplugins.pool import bugcheck, collector, plugin_options
from volplugins.pool.attribution import DriverScan, TagAttribution, load_attribution
from volplugins.pool.kernel import Kernel
from volplugins.pool.model import Chunk
from volplugins.pool.tags import tag_text, unprotected

NO_BUGCHECK = "no bug check recorded: neither a crash dump header nor KiBugCheckData names one"


class PoolCrash(interfaces.plugins.PluginInterface):
    """The bug check (dump header or KiBugCheckData), its meaning, and for pool bug checks the chunk each
    address parameter lies in, its neighbours, what validation says of its page, and the suspect tag and driver."""

    _required_framework_version = (2, 0, 0)
    _version = (1, 0, 0)

    @classmethod
    def get_requirements(cls) -> list[interfaces.configuration.RequirementInterface]:
        return [plugin_options.kernel(), plugin_options.pooltag_files(), plugin_options.driver_scan(DriverScan.AUTO)]

    def _generator(self) -> Iterator[tuple[int, tuple]]:
        kernel = Kernel.from_module(self.context, self.config["kernel"])
        found = bugcheck.read_bugcheck(kernel)
        if found is None:
            yield 0, _row("Bug check", "None", note=NO_BUGCHECK)
            return
        analysis = bugcheck.analyze(kernel, found)
        tags = load_attribution(kernel, self.config.get("pooltag-file") or [], self.config.get("driver-scan"))
        yield from _bugcheck_rows(analysis)
        for item in analysis.addresses:
            yield from _address_rows(item, tags)
        for site in analysis.code_sites:
            where = f"{site.module}+{site.offset:#x}" if site.module else "in no loaded module"
            yield 0, _row(f"P{site.parameter} code", "Module", site.address, binary=site.module, note=where)
        for finding in analysis.pool_findings:
            yield 0, _row("Pool validation", "Finding", finding.address, note=finding.reason)
        yield from _usage_rows(analysis.usage, tags)
        if analysis.suspect is not None:
            suspect = analysis.suspect
            description, binary = tags.describe(suspect.tag)
            address = suspect.chunk.address if suspect.chunk else None
            yield 0, _row("Suspect", "Chunk" if suspect.chunk else "Tag", address, suspect.chunk, tag=suspect.tag,
                          binary=binary, note=f"{suspect.reason}; {description or 'tag not described'}")
        elif analysis.info.pool:
            yield 0, _row("Suspect", "None", note="no chunk of the pool answers for this bug check")

    def run(self) -> renderers.TreeGrid:
        return renderers.TreeGrid(
            [
                ("Section", str),
                ("Item", str),
                ("Value", format_hints.Hex),
                ("Chunk", format_hints.Hex),
                ("Size", format_hints.Hex),
                ("State", str),
                ("Tag", str),
                ("Binary", str),
                ("Note", str),
            ],
            collector.fewer_collections(self._generator()),
        )


def _bugcheck_rows(analysis: bugcheck.CrashAnalysis) -> Iterator[tuple[int, tuple]]:
    found, info = analysis.bugcheck, analysis.info
    scope = "" if info.pool else "; not a pool bug check, left alone"
    yield 0, _row("Bug check", "Code", found.code, note=f"{info.name} ({found.source}): {info.meaning}{scope}")
    for index, ((meaning, _), value) in enumerate(zip(info.parameters, found.parameters), start=1):
        yield 1, _row("Bug check", f"P{index}", value, note=meaning)


def _address_rows(item: bugcheck.AddressAnswer, tags: TagAttribution) -> Iterator[tuple[int, tuple]]:
    section = f"P{item.parameter} pool"
    answer = item.answer
    yield 0, _row(section, "Page", answer.address, note=answer.headline())
    if answer.owner is not None:
        description, binary = tags.describe(answer.owner.tag)
        yield 1, _row(section, "Owner", answer.address, answer.owner, tag=answer.owner.tag, binary=binary,
                      note=description)
    for name, chunk in (("Previous", item.previous), ("Next", item.next)):
        if chunk is not None:
            yield 1, _row(section, name, answer.address, chunk, tag=chunk.tag)
    for finding in item.validation:
        yield 1, _row(section, "Validation", finding.address, note=finding.reason)
    if answer.chunks and not item.validation:
        yield 1, _row(section, "Validation", answer.address, note="the page's chunks are consistent")


def _usage_rows(usage, tags: TagAttribution) -> Iterator[tuple[int, tuple]]:
    """Each pool's bytes in use against its limit, and its top tags (windows.poolusage shows the same)."""
    for pool in usage:
        limit = f"{pool.percent:.1f}% of the limit {pool.limit.limit:#x}, " if pool.percent is not None else ""
        warning = f"; {pool.warning}" if pool.warning else ""
        yield 0, _row("Pool usage", pool.pool, pool.in_use, note=f"{limit}{pool.limit.describe()}{warning}")
        for row in pool.top:
            _, binary = tags.describe(row.tag)
            warning = f"; {pool.tag_warning(row)}" if pool.tag_warning(row) else ""
            yield 1, _row("Pool usage", f"{pool.pool} tag", row.bytes, tag=row.tag, binary=binary,
                          note=f"{pool.share(row):.1%} of the pool's {pool.share_basis}{warning}")


def _row(section: str, item: str, value: int | None = None, chunk: Chunk | None = None, tag: bytes = b"",
         binary: str = "", note: str = "") -> tuple:
    absent = renderers.NotApplicableValue()
    return (
        section,
        item,
        format_hints.Hex(value) if value is not None else absent,
        format_hints.Hex(chunk.address) if chunk else absent,
        format_hints.Hex(chunk.size) if chunk else absent,
        chunk.state.value if chunk else "",
        tag_text(unprotected(tag)),
        binary,
        note,
    )
