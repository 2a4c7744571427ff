"""The undamaged sample image as the fuzzer reads it: bytes, page tables, kernel types, manifest.

Mutations are patches of physical bytes, so the fuzzer translates virtual
addresses itself (x64 four-level walk from the manifest's DTB) and takes
structure layouts from the samples' own ISF reader.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from samples.flavors import FLAVORS, Flavor
from samples.isf import FieldLayout, KernelTypes

PAGE = 0x1000
SEGMENT = 0x10_0000  # a segment heap segment of SegContexts[0]: VS and LFH subsegments live in these
LARGE_SEGMENT = 0x100_0000  # a segment of SegContexts[1]
DESCRIPTOR_PAGES = 2  # 256 page range descriptors of 0x20 bytes at the start of every segment
ADDRESS_MASK = 0x000F_FFFF_FFFF_F000
LEVEL_SHIFTS = (39, 30, 21, 12)


def canonical(address: int) -> int:
    address &= (1 << 48) - 1
    return address | 0xFFFF_0000_0000_0000 if address & (1 << 47) else address


@dataclass(frozen=True)
class Step:
    """One page-table entry met translating an address: where it is (physical) and what it holds."""

    shift: int  # 39 PML4, 30 PDPT, 21 PD, 12 PT
    where: int
    value: int


class Pristine:
    """One built sample image, never modified: what mutations are cut from and checked against."""

    def __init__(self, image: Path, manifest: Path):
        self.path = image
        self.raw = image.read_bytes()
        self.manifest = json.loads(manifest.read_text())
        self.flavor: Flavor = FLAVORS[self.manifest["flavor"]]
        self.types = KernelTypes(self.flavor.isf_path)
        self.dtb = self.manifest["dtb"]

    # -- translation -----------------------------------------------------------
    def walk(self, address: int) -> list[Step]:
        """The page-table entries translating ``address``, top down, as far as they are present."""
        steps = []
        table = self.dtb
        for shift in LEVEL_SHIFTS:
            where = table + ((address >> shift) & 0x1FF) * 8
            value = struct.unpack_from("<Q", self.raw, where)[0]
            steps.append(Step(shift, where, value))
            if not value & 1:
                break
            table = value & ADDRESS_MASK
        return steps

    def physical(self, address: int) -> int | None:
        steps = self.walk(address)
        if len(steps) < len(LEVEL_SHIFTS) or not steps[-1].value & 1:
            return None
        return (steps[-1].value & ADDRESS_MASK) + address % PAGE

    def frames(self, address: int) -> list[int]:
        """Physical frames reading ``address`` depends on: its page tables and its own frame."""
        steps = self.walk(address)
        frames = [self.dtb] + [step.value & ADDRESS_MASK for step in steps if step.value & 1]
        return frames

    def read(self, address: int, size: int) -> bytes:
        """Bytes of a mapped range that does not cross a page."""
        where = self.physical(address)
        return b"" if where is None else self.raw[where : where + size]

    def u64(self, address: int) -> int:
        data = self.read(address, 8)
        return struct.unpack("<Q", data)[0] if len(data) == 8 else 0

    # -- kernel ------------------------------------------------------------------
    def symbol(self, name: str) -> int | None:
        return self.manifest["kernel_base"] + self.types.symbol(name) if self.types.has_symbol(name) else None

    def field(self, type_name: str, path: str) -> FieldLayout | None:
        return self.types.field(type_name, path) if self.types.has_field(type_name, path) else None

    @property
    def segment_heap(self) -> bool:
        return self.flavor.segment_heap

    # -- allocations ---------------------------------------------------------------
    @cached_property
    def allocations(self) -> list[dict]:
        return [a for a in self.manifest["allocations"] if a["size"] > 0]

    @cached_property
    def data_pages(self) -> frozenset[int]:
        """Mapped pages that hold pool allocations (big bodies included)."""
        pages = set()
        for allocation in self.allocations:
            if allocation["state"] == "Free" and allocation["backing"] in ("Big", "Large"):
                continue
            first = allocation["address"] - allocation["address"] % PAGE
            pages.update(range(first, allocation["address"] + allocation["size"], PAGE))
        return frozenset(page for page in pages if self.physical(page) is not None)

    def reach(self, address: int) -> tuple[int, int]:
        """What damage at ``address`` can take with it: its page (classic), its segment (segment heap)
        or, on the first pages of a large segment, that whole segment (its descriptors)."""
        if not self.segment_heap:
            start = address - address % PAGE
            return start, start + PAGE
        large = address - address % LARGE_SEGMENT
        if address - large < DESCRIPTOR_PAGES * PAGE:
            return large, large + LARGE_SEGMENT
        start = address - address % SEGMENT
        return start, start + SEGMENT
