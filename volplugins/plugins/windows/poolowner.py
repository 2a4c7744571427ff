"""windows.poolowner: which pool allocation owns an address (WinDbg's ``!pool`` for memory images)."""

from __future__ import annotations

import functools
import logging
from typing import Iterator

from volatility3.framework import interfaces, renderers
from volatility3.framework.configuration import requirements
from volatility3.framework.renderers import format_hints

from volplugins.pool import addresses, collector, exits, freespace, hexdump, listing, owner, plugin_options
from volplugins.pool.attribution import DriverScan, TagAttribution, load_attribution
from volplugins.pool.kernel import Kernel
from volplugins.pool.model import FREED_STATES, Backing, Chunk
from volplugins.pool.tags import is_protected, tag_text, unprotected

vollog = logging.getLogger(__name__)

CONTENTS_LIMIT = 0x1000  # bytes of the owner shown by --contents

_COLUMNS = [
    ("Address", format_hints.Hex),
    ("Region", str),
    ("Owner", str),
    ("Chunk", format_hints.Hex),
    ("Size", format_hints.Hex),
    ("PreviousSize", format_hints.Hex),
    ("State", str),
    ("Tag", str),
    ("Protected", bool),
    ("StaleTag", str),
    ("Backing", str),
    ("Pool", str),
    ("Object", str),
    ("Description", str),
    ("Binary", str),
    ("Note", str),
]
_CONTENTS_COLUMN = ("Contents", str)


class PoolOwner(interfaces.plugins.PluginInterface):
    """Names the pool allocation (page chunk, VS/LFH block, big or large allocation) holding each address.

    Example: vol -f mem.raw windows.poolowner --address ffffdc01`55e94340 --contents
    """

    _required_framework_version = (2, 0, 0)
    _version = (1, 0, 0)

    @classmethod
    def get_requirements(cls) -> list[interfaces.configuration.RequirementInterface]:
        return [
            plugin_options.kernel(),
            requirements.ListRequirement(
                name="address",
                element_type=str,
                description="Address(es) to look up: hex, with or without 0x (WinDbg's ffffdc01`55e94340 works too; "
                            "default: none, give this or --address-file)",
                optional=True,
            ),
            requirements.StringRequirement(
                name="address-file",
                description="File with addresses to look up (UTF-8 or UTF-16 text), one or more per line, "
                            "'#' starts a comment (default: none)",
                optional=True,
            ),
            plugin_options.flag("contents", "Also dump the owning allocation's first 4 KiB as hex and text "
                                "(like !pool flag 1)"),
            plugin_options.flag("owner-only", "One row per address: the owning allocation, or why there is none "
                                "(default: the chunks of the address's page and the findings, like !pool)"),
            plugin_options.pooltag_files(),
            plugin_options.driver_scan(DriverScan.AUTO),
        ]

    def _addresses(self) -> list[addresses.ParsedAddress]:
        """Every address asked for, in order; refuses the run when there is none to look up."""
        parsed = [addresses.parse_address(text) for text in self.config.get("address") or []]
        if self.config.get("address-file"):
            try:
                parsed.extend(addresses.addresses_from_file(self.config["address-file"]))
            except addresses.AddressFileError as error:
                exits.refuse(self, str(error))
        if not parsed:
            exits.refuse(self, "no address given: use --address ADDRESS [ADDRESS ...] or --address-file FILE")
        bad = [item for item in parsed if item.value is None]
        if len(bad) == len(parsed):
            exits.refuse(self, "no address to look up: " + "; ".join(item.error for item in bad))
        if bad:
            exits.finish_partial(self, len(bad), "address(es)")
        return parsed

    def _generator(self, requested: list[addresses.ParsedAddress]) -> Iterator[tuple[int, tuple]]:
        kernel = Kernel.from_module(self.context, self.config["kernel"])
        tags = load_attribution(kernel, self.config.get("pooltag-file") or [], self.config.get("driver-scan"))
        answers = owner.find_owners(kernel, [parsed.value for parsed in requested if parsed.value is not None],
                                    listing=not self.config.get("owner-only"))
        for parsed in requested:
            if parsed.value is None:
                yield 0, self._note_row(None, "", parsed.error)
            else:
                yield from self._answer_rows(kernel, next(answers), tags)
        if tags.findings:
            vollog.info("driver scan: %d part(s) of modules unreadable (windows.pooldrivers lists them)",
                        len(tags.findings))

    def _answer_rows(self, kernel: Kernel, answer: owner.OwnerAnswer, tags: TagAttribution):
        """The chunks around the address as ``!pool`` lists them (the owner starred), or why there is none."""
        if answer.owner is None:
            yield 0, self._note_row(answer.address, answer.region, answer.headline())
        owner_only = self.config.get("owner-only")
        for chunk in answer.chunks:
            is_owner = answer.owner is not None and chunk.address == answer.owner.address and chunk == answer.owner
            if owner_only and not is_owner:
                continue
            stale = _stale_tag(kernel, chunk, is_owner)
            description, binary = tags.describe(stale or chunk.tag) if is_owner else ("", "")
            tag, protected = listing.shown_tag(chunk)
            values = (
                format_hints.Hex(answer.address),
                answer.region,
                "*" if is_owner else "",
                format_hints.Hex(chunk.address),
                format_hints.Hex(chunk.size),
                format_hints.Hex(chunk.previous_size),
                chunk.state.value,
                tag,
                protected,
                tag_text(unprotected(stale)),
                chunk.backing.value,
                chunk.pool or renderers.NotAvailableValue(),
                answer.object.describe() if is_owner and answer.object else "",
                description,
                binary,
                _owner_note(answer, chunk, stale, description, binary) if is_owner else "",
            )
            yield 0, values + self._contents(kernel, chunk if is_owner else None)
        if owner_only:
            return
        for finding in answer.findings:
            yield 0, self._note_row(finding.address, answer.region, finding.reason)

    def _contents(self, kernel: Kernel, chunk: Chunk | None) -> tuple:
        """The Contents cell when --contents is on: the owner's bytes as a hex dump, empty on other rows."""
        if not self._with_contents:
            return ()
        if chunk is None:
            return ("",)
        length = min(chunk.size, CONTENTS_LIMIT)
        return (hexdump.lines(chunk.address, kernel.read(chunk.address, length, pad=True)),)

    @functools.cached_property
    def _with_contents(self) -> bool:
        """--contents, read once: a listing asks for every row."""
        return bool(self.config.get("contents"))

    def _note_row(self, address: int | None, region: str, note: str) -> tuple:
        absent = renderers.NotApplicableValue()
        where = absent if address is None else format_hints.Hex(address)
        return ((where, region, "", absent, absent, absent, "", "", absent, "", "", "", "", "", "", note)
                + self._contents(None, None))

    def run(self) -> renderers.TreeGrid:
        requested = self._addresses()
        columns = _COLUMNS + ([_CONTENTS_COLUMN] if self.config.get("contents") else [])
        return renderers.TreeGrid(columns, collector.fewer_collections(self._generator(requested)))


def _stale_tag(kernel: Kernel, chunk: Chunk, is_owner: bool) -> bytes:
    """What a free chunk held before: its own header's tag, or for a free VS chunk (whose header is encoded)
    a pool header left inside it, searched for the owner only since that reads the chunk's bytes."""
    if chunk.backing is Backing.VS and not is_owner:
        return b""
    return freespace.freed_tag(kernel, chunk)


def _owner_note(answer: owner.OwnerAnswer, chunk: Chunk, stale: bytes, description: str, binary: str) -> str:
    """The line ``!pool`` prints under the owner (``Pooltag Proc : Process objects, Binary : nt!ps``), and quota;
    for a free owner, what was freed there (``Free (was: CM16 : ...)``), from the tag its last user left; last,
    how the owner was found when not on an intact chain."""
    if chunk.state in FREED_STATES:
        was = (f"was: {tag_text(unprotected(stale))} : {description or 'unknown'}, Binary : {binary or 'unknown'}"
               if stale else "nothing left in it names what was freed here")
        big = answer.freed_big
        if big is not None and big.va != chunk.address:
            was += (f"; a freed big allocation held this address: {tag_text(unprotected(big.tag))}, "
                    f"{big.size:#x} bytes at {big.va:x}")
        return "; ".join([f"{chunk.state.value} ({was})", *filter(None, [answer.caveat])])
    protected = " (Protected)" if is_protected(chunk.tag) else ""
    parts = [f"Pooltag {tag_text(unprotected(chunk.tag))}{protected} : {description or 'unknown'}, "
             f"Binary : {binary or 'unknown'}"]
    if answer.quota_note(chunk):
        parts.append(answer.quota_note(chunk))
    if answer.caveat:
        parts.append(answer.caveat)
    return "; ".join(parts)
