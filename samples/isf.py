"""Read a kernel ISF (Volatility 3 symbol table) to lay out structures by name.

The generator writes the kernel's structures with the real offsets, sizes and
bit positions of the modeled build, taken from that build's ISF.  Field paths
are dotted and may index arrays: ``"PoolNode[1].Heaps[0]"``.
"""

from __future__ import annotations

import json
import lzma
import re
import struct
from dataclasses import dataclass
from pathlib import Path

_PATH_PART = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)")
_INDEX = re.compile(r"\[(\d+)\]")


@dataclass(frozen=True)
class FieldLayout:
    """Where a (possibly nested) field lives inside its outermost structure."""

    offset: int
    size: int
    bit_position: int | None = None
    bit_length: int | None = None
    signed: bool = False


class KernelTypes:
    """Type sizes, field offsets, symbol offsets and enums of one kernel ISF."""

    def __init__(self, isf_path: Path):
        self.path = Path(isf_path)
        opener = lzma.open if self.path.suffix == ".xz" else open
        with opener(self.path, "rt") as handle:
            data = json.load(handle)
        self._types = data["user_types"]
        self._base_types = data["base_types"]
        self._symbols = data["symbols"]
        self._enums = data["enums"]
        self.pdb = data["metadata"]["windows"]["pdb"]

    # -- symbols and enums -------------------------------------------------
    def symbol(self, name: str) -> int:
        """Offset of a kernel variable from the kernel base."""
        return self._symbols[name]["address"]

    def has_symbol(self, name: str) -> bool:
        return name in self._symbols

    def has_type(self, name: str) -> bool:
        return name in self._types

    def enum(self, enum_name: str, constant: str) -> int:
        return self._enums[enum_name]["constants"][constant]

    # -- layouts -----------------------------------------------------------
    def size(self, type_name: str) -> int:
        return self._types[type_name]["size"]

    def offset(self, type_name: str, path: str) -> int:
        return self.field(type_name, path).offset

    def has_field(self, type_name: str, path: str) -> bool:
        try:
            self.field(type_name, path)
        except KeyError:
            return False
        return True

    def field(self, type_name: str, path: str) -> FieldLayout:
        offset = 0
        current = {"kind": "struct", "name": type_name}
        for part in path.split("."):
            match = _PATH_PART.fullmatch(part)
            if not match:
                raise KeyError(f"bad field path {path!r}")
            name, indices = match.groups()
            struct_name = current["name"]
            fields = self._types[struct_name]["fields"]
            if name not in fields:
                raise KeyError(f"{struct_name} has no field {name}")
            offset += fields[name]["offset"]
            current = fields[name]["type"]
            for index in _INDEX.findall(indices):
                if current["kind"] != "array":
                    raise KeyError(f"{name} is not an array")
                current = current["subtype"]
                offset += int(index) * self._type_size(current)
        return self._leaf(offset, current)

    def _leaf(self, offset: int, description: dict) -> FieldLayout:
        kind = description["kind"]
        if kind == "bitfield":
            base = description["type"]
            base_info = self._base_types[base["name"]] if base["kind"] == "base" else {"size": 4, "signed": False}
            return FieldLayout(
                offset,
                base_info["size"],
                description["bit_position"],
                description["bit_length"],
                base_info.get("signed", False),
            )
        if kind == "base":
            info = self._base_types[description["name"]]
            return FieldLayout(offset, info["size"], signed=info.get("signed", False))
        return FieldLayout(offset, self._type_size(description))

    def _type_size(self, description: dict) -> int:
        kind = description["kind"]
        if kind == "pointer":
            return 8
        if kind == "base":
            return self._base_types[description["name"]]["size"]
        if kind in ("struct", "union", "class"):
            return self._types[description["name"]]["size"]
        if kind == "enum":
            return self._enums[description["name"]]["size"]
        if kind == "array":
            return description["count"] * self._type_size(description["subtype"])
        if kind == "bitfield":
            return self._leaf(0, description).size
        raise KeyError(f"no size for {description}")

    # -- encoding ----------------------------------------------------------
    def pack(self, buffer: bytearray, base: int, type_name: str, values: dict[str, int]) -> None:
        """Write integer fields (dotted, indexable paths) of ``type_name`` at ``buffer[base:]``."""
        for path, value in values.items():
            self.pack_path(buffer, base, type_name, path, value)

    def pack_path(self, buffer: bytearray, base: int, type_name: str, path: str, value: int) -> None:
        layout = self.field(type_name, path)
        start = base + layout.offset
        if layout.bit_position is None:
            buffer[start : start + layout.size] = _int_bytes(value, layout.size, layout.signed)
            return
        current = int.from_bytes(buffer[start : start + layout.size], "little")
        mask = ((1 << layout.bit_length) - 1) << layout.bit_position
        current = (current & ~mask) | ((value << layout.bit_position) & mask)
        buffer[start : start + layout.size] = current.to_bytes(layout.size, "little")


def _int_bytes(value: int, size: int, signed: bool) -> bytes:
    if size == 8 and value < 0:
        value &= (1 << 64) - 1
    mask = (1 << (size * 8)) - 1
    return (value & mask).to_bytes(size, "little")


def pack_u64(value: int) -> bytes:
    return struct.pack("<Q", value & 0xFFFFFFFFFFFFFFFF)
