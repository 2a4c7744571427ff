"""windows.poolowner: which pool allocation owns an address (WinDbg's ``!pool`` for memory images)."""

from __future__ import annotations

import logging
from typing import Iterable, Iterator

from volatility3.framework import interfaces, renderers
from volatility3.framework.configuration import requirements
from volatility3.framework.renderers import format_hints

from volplugins.pool import addresses, owner, plugin_options
from volplugins.pool.attribution import DriverScan, TagAttribution, load_attribution
from volplugins.pool.kernel import Kernel
from volplugins.pool.tags import tag_text

vollog = logging.getLogger(__name__)

CONTENTS_LIMIT = 0x1000  # bytes of the owner shown by --contents


class PoolOwner(interfaces.plugins.PluginInterface):
    """Names the pool allocation (page chunk, VS/LFH block, big or large allocation) holding each address."""

    _required_framework_version = (2, 0, 0)
    _version = (1, 0, 0)

    @classmethod
    def get_requirements(cls) -> list[interfaces.configuration.RequirementInterface]:
        return [
            plugin_options.kernel(),
            requirements.ListRequirement(
                name="address",
                element_type=str,
                description="Address(es) to look up: hex, with or without 0x (WinDbg's ffffdc01`55e94340 works too)",
                optional=True,
            ),
            requirements.StringRequirement(
                name="address-file",
                description="File with addresses to look up, one or more per line, '#' starts a comment",
                optional=True,
            ),
            plugin_options.flag("contents", "Also dump the owning allocation's bytes (like !pool flag 1)"),
            plugin_options.pooltag_files(),
            requirements.ChoiceRequirement(
                name="driver-scan",
                choices=[mode.value for mode in DriverScan],
                description="Name the binary of tags without one in the descriptions from the loaded drivers' code: "
                            "auto = only when such a tag is shown (default), always, never",
                default=DriverScan.AUTO.value,
                optional=True,
            ),
        ]

    def _addresses(self) -> list[addresses.ParsedAddress]:
        parsed = [addresses.parse_address(text) for text in self.config.get("address") or []]
        if self.config.get("address-file"):
            parsed.extend(addresses.addresses_from_file(self.config["address-file"]))
        return parsed

    def _generator(self) -> Iterator[tuple[int, tuple]]:
        kernel = Kernel.from_module(self.context, self.config["kernel"])
        tags = load_attribution(kernel, self.config.get("pooltag-file") or [], self.config.get("driver-scan"))
        requested = self._addresses()
        if not requested:
            vollog.error("no address given: use --address ADDRESS [ADDRESS ...] or --address-file FILE")
        for parsed in requested:
            if parsed.value is None:
                yield 0, _note_row(0, "", parsed.error)
                continue
            answer = owner.find_owner(kernel, parsed.value)
            yield from self._answer_rows(kernel, answer, tags)
        if tags.findings:
            vollog.info("driver scan: %d part(s) of modules unreadable (windows.pooldrivers lists them)",
                        len(tags.findings))

    def _answer_rows(self, kernel: Kernel, answer: owner.OwnerAnswer, tags: TagAttribution):
        yield 0, _note_row(answer.address, answer.region, answer.headline())
        for chunk in answer.chunks:
            is_owner = answer.owner is not None and chunk == answer.owner
            description, binary = tags.describe(chunk.tag) if is_owner else ("", "")
            identity = answer.object.describe() if is_owner and answer.object else ""
            yield 1, (
                format_hints.Hex(answer.address),
                answer.region,
                "*" if is_owner else "",
                format_hints.Hex(chunk.address),
                format_hints.Hex(chunk.size),
                format_hints.Hex(chunk.previous_size),
                chunk.state.value,
                tag_text(chunk.tag),
                chunk.backing.value,
                chunk.pool or renderers.NotAvailableValue(),
                identity,
                description,
                binary,
                _owner_note(answer, chunk, description, binary) if is_owner else "",
            )
            if is_owner and self.config.get("contents"):
                yield from _content_rows(kernel, answer)
        for finding in answer.findings:
            yield 1, _note_row(finding.address, answer.region, finding.reason)

    def run(self) -> renderers.TreeGrid:
        return renderers.TreeGrid(
            [
                ("Address", format_hints.Hex),
                ("Region", str),
                ("Owner", str),
                ("Chunk", format_hints.Hex),
                ("Size", format_hints.Hex),
                ("PreviousSize", format_hints.Hex),
                ("State", str),
                ("Tag", str),
                ("Backing", str),
                ("Pool", str),
                ("Object", str),
                ("Description", str),
                ("Binary", str),
                ("Note", str),
            ],
            self._generator(),
        )


def _owner_note(answer: owner.OwnerAnswer, chunk, description: str, binary: str) -> str:
    """The line ``!pool`` prints under the owner (``Pooltag Proc : Process objects, Binary : nt!ps``), and quota."""
    parts = [f"Pooltag {tag_text(chunk.tag)} : {description or 'unknown'}, Binary : {binary or 'unknown'}"]
    if answer.quota_note(chunk):
        parts.append(answer.quota_note(chunk))
    return "; ".join(parts)


def _note_row(address: int, region: str, note: str) -> tuple:
    absent = renderers.NotApplicableValue()
    return (format_hints.Hex(address), region, "", absent, absent, absent, "", "", "", absent, "", "", "", note)


def _content_rows(kernel: Kernel, answer: owner.OwnerAnswer) -> Iterable[tuple[int, tuple]]:
    chunk = answer.owner
    length = min(chunk.size, CONTENTS_LIMIT)
    data = kernel.read(chunk.address, length, pad=True)
    for offset in range(0, length, 16):
        line = data[offset : offset + 16]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in line)
        yield 2, _note_row(chunk.address + offset, answer.region, f"{line.hex(' ')}  {text}")
