"""Who a pool tag belongs to: description files first, the loaded drivers' code for what they leave open.

Description files name the binary of well-known tags only.  For any other
tag the driver scan (``driverscan.py``) can tell which loaded module passes
it to the pool routines.  Scanning disassembles every loaded driver: fast on
small images, seconds on a real system with hundreds of modules.  So by
default (``auto``) it runs only when a tag that is looked up has no binary in
the descriptions, and then once for all later lookups.
"""

from __future__ import annotations

import enum
from dataclasses import replace
from pathlib import Path
from typing import Iterable

from .driverscan import DriverScanResult, scan_drivers
from .kernel import Kernel
from .model import Finding
from .tagdb import DRIVER_SCAN_SOURCE, UNKNOWN_BINARY, TagDatabase, TagInfo, TagWarning


class DriverScan(str, enum.Enum):
    """When to scan the loaded drivers for the tags their code uses."""

    NEVER = "never"
    AUTO = "auto"  # when a looked-up tag has no binary in the descriptions
    ALWAYS = "always"

    @classmethod
    def parse(cls, value: DriverScan | str | bool | None) -> DriverScan:
        """``True``/``False`` (a plugin's yes/no option) mean always/never; ``None`` or an unknown word, auto."""
        if isinstance(value, cls):
            return value
        if isinstance(value, bool):
            return cls.ALWAYS if value else cls.NEVER
        return next((mode for mode in cls if mode.value == str(value).lower()), cls.AUTO)


class TagAttribution:
    """A tag database whose missing binaries are filled from a driver scan of the image.

    Offers the lookups of :class:`TagDatabase` (``lookup``, ``describe``,
    ``warnings``), so code written for a database can take an attribution.
    """

    def __init__(self, database: TagDatabase, kernel: Kernel | None, mode: DriverScan = DriverScan.AUTO,
                 include_kernel: bool = False) -> None:
        self.database = database
        self.kernel = kernel
        self.mode = mode if kernel is not None else DriverScan.NEVER
        self.include_kernel = include_kernel
        self._scan: DriverScanResult | None = None

    @property
    def warnings(self) -> list[TagWarning]:
        return self.database.warnings

    @property
    def scanned(self) -> DriverScanResult | None:
        """The driver scan's result, or None while it has not run."""
        return self._scan

    @property
    def findings(self) -> tuple[Finding, ...]:
        """What the driver scan could not read (paged-out sections, broken module list)."""
        return self._scan.findings if self._scan is not None else ()

    def scan(self) -> DriverScanResult | None:
        """Run the driver scan now (once) unless scanning is off; its tags become binary hints."""
        if self._scan is None and self.mode is not DriverScan.NEVER:
            self._scan = scan_drivers(self.kernel, include_kernel=self.include_kernel)
            for tag, modules in self._scan.tags.items():
                for module in sorted(modules):
                    self.database.add_binary_hint(tag, module, DRIVER_SCAN_SOURCE)
        return self._scan

    def lookup(self, tag: bytes) -> TagInfo | None:
        """The best description of ``tag``, its binary completed by the driver scan when needed."""
        info = self.database.lookup(tag)
        if self._scan is None and self.mode is DriverScan.AUTO and not has_binary(info):
            self.scan()
            info = self.database.lookup(tag)
        if info is not None and not info.description and DRIVER_SCAN_SOURCE in info.source:
            info = replace(info, description=scanned_description(info.binary))
        return info

    def describe(self, tag: bytes) -> tuple[str, str]:
        """``(description, binary)``, ``""`` for whatever stays unknown."""
        info = self.lookup(tag)
        return (info.description, info.binary) if info is not None else ("", "")


def scanned_description(binary: str) -> str:
    """What is known of a tag that only the driver scan names: whose code uses it."""
    return f"Passed to pool routines by {binary} (found by driver scan)"


def has_binary(info: TagInfo | None) -> bool:
    return info is not None and bool(info.binary) and info.binary != UNKNOWN_BINARY


def load_attribution(
    kernel: Kernel | None,
    pooltag_files: Iterable[str | Path] = (),
    driver_scan: DriverScan | str | bool | None = DriverScan.AUTO,
    include_kernel: bool = False,
) -> TagAttribution:
    """Descriptions (built-in, ``$VOLPOOL_POOLTAG_FILE``, ``pooltag_files``) plus the driver scan.

    ``driver_scan``: ``always`` (or True) scans right away, ``never`` (or
    False) not at all, ``auto`` (or None) at the first lookup of a tag
    without a binary.  Bad description lines are logged and kept in
    ``warnings``; scan problems are in ``findings``; nothing raises.
    """
    attribution = TagAttribution(TagDatabase.load(pooltag_files), kernel, DriverScan.parse(driver_scan),
                                 include_kernel)
    if attribution.mode is DriverScan.ALWAYS:
        attribution.scan()
    return attribution
