"""Minimal but well-formed PE32+ images: the kernel and the drivers of a sample.

Only what loaders and analysts read is filled in: DOS and NT headers, a
section table, a CodeView debug record (``RSDS`` + GUID + age + PDB name, the
record Volatility 3 matches symbols by) and, for drivers, an import directory
naming their ``ntoskrnl.exe`` imports.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass, field

FILE_ALIGNMENT = 0x200
SECTION_ALIGNMENT = 0x1000
HEADERS_SIZE = 0x1000
NT_HEADERS_OFFSET = 0x80
IMAGE_FILE_MACHINE_AMD64 = 0x8664
IMAGE_DEBUG_TYPE_CODEVIEW = 2
CODE_CHARACTERISTICS = 0x60000020  # code | execute | read
DATA_CHARACTERISTICS = 0xC0000040  # initialized data | read | write
RDATA_CHARACTERISTICS = 0x40000040  # initialized data | read


@dataclass
class Section:
    name: bytes
    rva: int
    data: bytes
    characteristics: int

    @property
    def virtual_size(self) -> int:
        return max(len(self.data), 1)


@dataclass
class PeImage:
    """A PE image as it sits in memory once loaded (sections at their RVAs)."""

    base: int
    sections: list[Section] = field(default_factory=list)
    directories: dict[int, tuple[int, int]] = field(default_factory=dict)  # index -> (rva, size)
    entry_rva: int = 0
    os_version: tuple[int, int] = (10, 0)

    @property
    def size_of_image(self) -> int:
        end = HEADERS_SIZE
        for section in self.sections:
            end = max(end, section.rva + _align(section.virtual_size, SECTION_ALIGNMENT))
        return end

    def next_rva(self) -> int:
        return self.size_of_image

    def add_section(self, name: bytes, data: bytes, characteristics: int) -> Section:
        section = Section(name, self.next_rva(), data, characteristics)
        self.sections.append(section)
        return section

    def headers(self) -> bytes:
        out = bytearray(HEADERS_SIZE)
        out[0:2] = b"MZ"
        struct.pack_into("<I", out, 0x3C, NT_HEADERS_OFFSET)
        position = NT_HEADERS_OFFSET
        out[position : position + 4] = b"PE\0\0"
        optional_size = 0xF0
        struct.pack_into(
            "<HHIIIHH", out, position + 4, IMAGE_FILE_MACHINE_AMD64, len(self.sections), 0x5E000000, 0, 0,
            optional_size, 0x22,
        )
        optional = position + 24
        code_size = sum(s.virtual_size for s in self.sections if s.characteristics & 0x20)
        struct.pack_into("<HBBIII", out, optional, 0x20B, 14, 0, code_size, 0, 0)
        struct.pack_into("<II", out, optional + 16, self.entry_rva, self.sections[0].rva if self.sections else 0)
        struct.pack_into("<QII", out, optional + 24, self.base, SECTION_ALIGNMENT, FILE_ALIGNMENT)
        struct.pack_into("<HHHHHH", out, optional + 40, self.os_version[0], self.os_version[1], self.os_version[0], self.os_version[1], self.os_version[0], self.os_version[1])
        struct.pack_into("<IIII", out, optional + 56, self.size_of_image, HEADERS_SIZE, 0, 1)  # subsystem native
        struct.pack_into("<H", out, optional + 70, 0x160)
        struct.pack_into("<QQQQII", out, optional + 72, 0x80000, 0x1000, 0x100000, 0x1000, 0, 16)
        for index, (rva, size) in self.directories.items():
            struct.pack_into("<II", out, optional + 112 + 8 * index, rva, size)
        table = optional + optional_size
        file_offset = HEADERS_SIZE
        for number, section in enumerate(self.sections):
            raw_size = _align(len(section.data), FILE_ALIGNMENT)
            struct.pack_into(
                "<8sIIIIIIHHI", out, table + 40 * number, section.name, section.virtual_size, section.rva,
                raw_size, file_offset, 0, 0, 0, 0, section.characteristics,
            )
            file_offset += raw_size
        return bytes(out)

    def write_to(self, space) -> None:
        """Map and write the headers and every section at their virtual addresses."""
        space.write(self.base, self.headers())
        for section in self.sections:
            space.write(self.base + section.rva, section.data)


def codeview_section(image: PeImage, guid: str, age: int, pdb_name: str) -> None:
    """Add a read-only section holding a CodeView debug directory entry and its RSDS record."""
    rva = image.next_rva()
    record = b"RSDS" + uuid.UUID(guid).bytes_le + struct.pack("<I", age) + pdb_name.encode() + b"\0"
    directory = struct.pack("<IIHHIIII", 0, 0x5E000000, 0, 0, IMAGE_DEBUG_TYPE_CODEVIEW, len(record), rva + 28, 0)
    image.add_section(b".rdata", directory + record, RDATA_CHARACTERISTICS)
    image.directories[6] = (rva, len(directory))


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment
