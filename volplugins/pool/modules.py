"""Loaded kernel modules and their images as mapped: the loader's list, the image read page by page from
memory, and what its PE headers say (sections, import slots) as ``pefile`` reads them."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
from volatility3.framework import exceptions

from .kernel import MASK64, PAGE_SIZE, Kernel
from .model import Finding

MAX_MODULES = 4096
MAX_IMAGE_SIZE = 64 << 20  # larger than any driver; a bigger SizeOfImage is a bad entry
MAX_NAME_BYTES = 1024
IMAGE_SCN_CNT_CODE = 0x20
IMAGE_SCN_MEM_EXECUTE = 0x20000000


@dataclass(frozen=True)
class LoadedModule:
    name: str
    full_name: str
    base: int
    size: int
    entry: int  # the loader entry's address


@dataclass(frozen=True)
class SectionHeader:
    name: str
    rva: int
    size: int
    characteristics: int

    @property
    def executable(self) -> bool:
        return bool(self.characteristics & (IMAGE_SCN_CNT_CODE | IMAGE_SCN_MEM_EXECUTE))


def section_headers(image: bytes) -> list[SectionHeader]:
    """The section table of a PE image (empty when the headers are not a PE)."""
    pe = _pe(image)
    if pe is None:
        return []
    return [SectionHeader(section.Name.rstrip(b"\0").decode("latin-1"), section.VirtualAddress,
                          section.Misc_VirtualSize or section.SizeOfRawData, section.Characteristics)
            for section in pe.sections]


def _pe(image: bytes):
    """``pefile``'s view of a PE image's headers, or None when they are not a PE."""
    import pefile  # imported lazily: the rest of the library does not need it

    try:
        return pefile.PE(data=image, fast_load=True)
    except (pefile.PEFormatError, struct.error, ValueError, IndexError):
        return None


def _as_file(image: bytes):
    """``pefile``'s view of an image in memory layout, for reading what its sections hold (None: not a PE).

    pefile reads files, where sections sit at their raw offsets; in memory they sit at their RVAs, so the
    section table is rewritten (raw offset = RVA, raw size = virtual size) and read again.
    """
    import pefile

    pe = _pe(image)
    if pe is None:
        return None
    for section in pe.sections:
        section.PointerToRawData, section.SizeOfRawData = section.VirtualAddress, section.Misc_VirtualSize
    try:
        return pefile.PE(data=bytes(pe.write()), fast_load=True)
    except (pefile.PEFormatError, struct.error, ValueError, IndexError):
        return None


def import_slots(image: bytes, image_base: int) -> dict[int, str]:
    """IAT slot address -> routine name, from the import name table (needs the import directory's pages).

    """
    import pefile

    pe = _as_file(image)
    if pe is None:
        return {}
    try:
        pe.OPTIONAL_HEADER.ImageBase = image_base
        pe.parse_data_directories(directories=[pefile.DIRECTORY_ENTRY["IMAGE_DIRECTORY_ENTRY_IMPORT"]])
    except (pefile.PEFormatError, struct.error, ValueError, IndexError):
        return {}
    slots: dict[int, str] = {}
    for descriptor in getattr(pe, "DIRECTORY_ENTRY_IMPORT", []):
        for entry in descriptor.imports:
            if entry.name and entry.address:
                slots[entry.address & MASK64] = entry.name.decode("latin-1")
    return slots


def bound_slots(image: bytes, image_base: int, routines: Mapping[int, str]) -> dict[int, str]:
    """Slot address -> routine name for every aligned pointer in ``image`` equal to a routine's address.

    Bound IAT entries hold the routine's address; this finds them when the
    import name table is gone (a pointer stored in a global and called
    through is found too, and is a call to that routine all the same).
    """
    if not routines:
        return {}
    words = np.frombuffer(image, dtype="<u8", count=len(image) // 8)
    wanted = np.array(sorted(routines), dtype=np.uint64)
    hits = np.flatnonzero(np.isin(words, wanted))
    return {image_base + 8 * int(index): routines[int(words[index])] for index in hits}


def loader_entry_type(kernel: Kernel) -> str:
    return "_KLDR_DATA_TABLE_ENTRY" if kernel.has_type("_KLDR_DATA_TABLE_ENTRY") else "_LDR_DATA_TABLE_ENTRY"


def loaded_modules(kernel: Kernel) -> tuple[list[LoadedModule], list[Finding]]:
    """``PsLoadedModuleList`` in load order; a broken link ends the walk with a finding."""
    type_name = loader_entry_type(kernel)
    layouts = {name: kernel.field_layout(type_name, name) for name in (
        "InLoadOrderLinks", "InLoadOrderLinks.Flink", "DllBase", "SizeOfImage", "BaseDllName.Length", "BaseDllName.Buffer",
        "FullDllName.Length", "FullDllName.Buffer")}
    entry_size = kernel.type_size(type_name)
    mask = kernel.layer.address_mask  # pointers read are canonical, symbol addresses may be masked
    head = kernel.symbol_address("PsLoadedModuleList")
    modules: list[LoadedModule] = []
    findings: list[Finding] = []
    seen = {head & mask}
    try:
        link = kernel.read_pointer(head)
    except exceptions.InvalidAddressException:
        return [], [Finding(head, "PsLoadedModuleList unreadable")]
    while link & mask != head & mask:
        if link & mask in seen or len(modules) >= MAX_MODULES:
            findings.append(Finding(link, "loaded module list loops or is too long"))
            break
        seen.add(link & mask)
        entry = link - layouts["InLoadOrderLinks"].offset
        try:
            raw = kernel.read(entry, entry_size)
        except exceptions.InvalidAddressException:
            findings.append(Finding(entry, "loader entry unreadable"))
            break
        modules.append(LoadedModule(
            name=_unicode(kernel, raw, layouts, "BaseDllName"),
            full_name=_unicode(kernel, raw, layouts, "FullDllName"),
            base=layouts["DllBase"].extract(raw),
            size=layouts["SizeOfImage"].extract(raw),
            entry=entry,
        ))
        link = layouts["InLoadOrderLinks.Flink"].extract(raw)
    return modules, findings


def _unicode(kernel: Kernel, raw: bytes, layouts: dict, field_name: str) -> str:
    length = min(layouts[f"{field_name}.Length"].extract(raw), MAX_NAME_BYTES)
    buffer = layouts[f"{field_name}.Buffer"].extract(raw)
    try:
        return kernel.read(buffer, length).decode("utf-16-le", errors="replace")
    except exceptions.InvalidAddressException:
        return ""


@dataclass
class ModuleImage:
    data: bytes  # memory layout; unreadable pages are zeros
    readable: list[tuple[int, int]]  # (rva, size) runs that were read
    findings: list[Finding] = field(default_factory=list)


def read_module_image(kernel: Kernel, module: LoadedModule) -> ModuleImage:
    """The module's image as mapped, with a finding for each section that is (partly) paged out."""
    if not 0 < module.size <= MAX_IMAGE_SIZE:
        return ModuleImage(b"", [], [Finding(module.entry, f"{module.name}: implausible SizeOfImage {module.size:#x}")])
    data = bytearray(module.size)
    readable: list[tuple[int, int]] = []
    for offset, length, _, _, _ in kernel.layer.mapping(module.base, module.size, ignore_errors=True):
        try:
            chunk = kernel.read(offset, length)
        except exceptions.InvalidAddressException:
            continue
        rva = offset - module.base
        data[rva : rva + length] = chunk
        readable.append((rva, length))
    readable = _merge(readable)
    image = ModuleImage(bytes(data), readable)
    if not covers(readable, 0, PAGE_SIZE):
        image.findings.append(Finding(module.base, f"{module.name}: headers paged out"))
        return image
    for section in section_headers(image.data):
        missing = _missing_pages(readable, section.rva, section.size)
        if missing:
            image.findings.append(Finding(module.base + section.rva,
                                          f"{module.name}: {missing} page(s) of section {section.name} paged out"))
    return image


def _merge(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, size in sorted(runs):
        if out and out[-1][0] + out[-1][1] >= start:
            last_start, last_size = out[-1]
            out[-1] = (last_start, max(last_size, start + size - last_start))
        else:
            out.append((start, size))
    return out


def covers(runs: list[tuple[int, int]], start: int, size: int) -> bool:
    return any(run_start <= start and start + size <= run_start + run_size for run_start, run_size in runs)


def _missing_pages(runs: list[tuple[int, int]], start: int, size: int) -> int:
    first = start // PAGE_SIZE
    last = (start + max(size, 1) - 1) // PAGE_SIZE
    return sum(1 for page in range(first, last + 1) if not covers(runs, page * PAGE_SIZE, PAGE_SIZE))
