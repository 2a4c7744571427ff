"""The image written as a 64-bit Windows kernel crash dump (``MEMORY.DMP``), as the kernel writes it at a bug check.

A crash dump is the physical memory behind a header of two pages.  The
header (``_DUMP_HEADER64``) starts with ``PAGE`` ``DU64``; the kernel first
fills the whole header with the ``PAGE`` pattern, then sets the fields a
debugger reads: the page-table base, the kernel's list heads and debugger
data block, the processor count, the bug check code and its four
parameters, the dump type, the time and the size of the file.  Layouts are
the public ones of the debugger SDK (``dbghelp.h``), the same on every x64
build:

* ``full`` (complete memory dump, DumpType 1): every page of physical memory
  in the order of the physical memory runs listed in the header
  (``PhysicalMemoryBlockBuffer``), here the firmware's usual map: all of RAM
  but page 0 and the legacy hole 0xA0000-0x100000.
* ``kernel`` (kernel memory dump, DumpType 5): only the pages the system
  uses, chosen by a bitmap with one bit per physical page that follows a
  ``_SUMMARY_DUMP`` header (``SDMP`` ``DU64``) in the third page; the pages
  follow in physical order from ``HeaderSize``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from .kernel import PROCESSORS, SYSTEM_TIME
from .memory import FIRST_FREE_FRAME, PAGE_SIZE

KINDS = ("full", "kernel")
HEADER_SIZE = 0x2000  # _DUMP_HEADER64: two pages
HEADER_PATTERN = b"PAGE"
SIGNATURE = b"PAGE"
VALID_DUMP = b"DU64"
SUMMARY_SIGNATURE = b"SDMP"
FREE_BUILD = 0xF  # MajorVersion of a retail kernel
MACHINE_AMD64 = 0x8664
DUMP_TYPE = {"full": 1, "kernel": 5}
STATUS_BREAKPOINT = 0x80000003  # the exception record of a bug check
EXCEPTION_NONCONTINUABLE = 1
PRODUCT_WIN_NT = 1
UPTIME = 3 * 3600 * 10_000_000  # the system ran three hours before it crashed (100 ns units)
LEGACY_HOLE = (0xA0000, 0x100000)  # VGA and option ROMs: never RAM

# _DUMP_HEADER64 field offsets (dbghelp.h; Volatility 3's crash64 symbol table describes the same).
DIRECTORY_TABLE_BASE = 0x10
PFN_DATABASE = 0x18
PS_LOADED_MODULE_LIST = 0x20
PS_ACTIVE_PROCESS_HEAD = 0x28
MACHINE_IMAGE_TYPE = 0x30
NUMBER_PROCESSORS = 0x34
BUGCHECK_CODE = 0x38
BUGCHECK_PARAMETERS = 0x40
KD_DEBUGGER_DATA_BLOCK = 0x80
PHYSICAL_MEMORY_BLOCK = 0x88
PHYSICAL_MEMORY_RUNS = PHYSICAL_MEMORY_BLOCK + 0x10
CONTEXT_RECORD = 0x348
EXCEPTION_RECORD = 0xF00
DUMP_TYPE_FIELD = 0xF98
REQUIRED_DUMP_SPACE = 0xFA0
SYSTEM_TIME_FIELD = 0xFA8
COMMENT = 0xFB0
SYSTEM_UP_TIME = 0x1030
PRODUCT_TYPE = 0x1040
MAX_RUNS = (CONTEXT_RECORD - PHYSICAL_MEMORY_RUNS) // 0x10
# _SUMMARY_DUMP (kernel dumps): signature, valid-dump, options, then sizes and the bitmap.
SUMMARY_HEADER_SIZE = 0x20
SUMMARY_PAGES = 0x28
SUMMARY_BITMAP_SIZE = 0x30
SUMMARY_BITMAP = 0x38


@dataclass(frozen=True)
class BugCheckRecord:
    """What the header says stopped the system."""

    code: int
    parameters: tuple[int, int, int, int]


def parse_kind(text: str) -> str:
    if text not in KINDS:
        raise ValueError(f"unknown crash dump kind {text!r}; choose from {', '.join(KINDS)}")
    return text


def write_crash_dump(image, path: Path, kind: str, bugcheck: BugCheckRecord) -> Path:
    """Write ``image`` as a crash dump of ``kind`` (full or kernel) at ``path``; return the path."""
    physical = image.space.physical
    total_pages = len(physical) // PAGE_SIZE
    ram = _ram_runs(total_pages)
    if kind == "full":
        pages, prefix = ram, b""
    else:
        used = _used_pages(image.space)
        pages, prefix = _runs(used), _summary(used, total_pages)
    size = HEADER_SIZE + len(prefix) + sum(count for _, count in pages) * PAGE_SIZE
    header = _header(image, kind, bugcheck, ram, size)
    with open(path, "wb") as handle:
        handle.write(header)
        handle.write(prefix)
        for start, count in pages:
            handle.write(physical[start * PAGE_SIZE : (start + count) * PAGE_SIZE])
    return path


def _header(image, kind: str, bugcheck: BugCheckRecord, runs: list[tuple[int, int]], file_size: int) -> bytes:
    """The two header pages; ``runs`` is physical memory (RAM) as (first page, page count)."""
    header = bytearray(HEADER_PATTERN * (HEADER_SIZE // len(HEADER_PATTERN)))
    header[0:8] = SIGNATURE + VALID_DUMP
    struct.pack_into("<II", header, 8, FREE_BUILD, image.flavor.build)
    struct.pack_into("<QQQQ", header, DIRECTORY_TABLE_BASE, image.space.dtb, _pfn_database(image),
                     image.symbol("PsLoadedModuleList"), image.symbol("PsActiveProcessHead"))
    struct.pack_into("<III", header, MACHINE_IMAGE_TYPE, MACHINE_AMD64, PROCESSORS, bugcheck.code)
    struct.pack_into("<4Q", header, BUGCHECK_PARAMETERS, *bugcheck.parameters)
    struct.pack_into("<Q", header, KD_DEBUGGER_DATA_BLOCK, image.symbol("KdDebuggerDataBlock"))
    if len(runs) > MAX_RUNS:
        raise ValueError(f"{len(runs)} physical memory runs do not fit the dump header")
    struct.pack_into("<II", header, PHYSICAL_MEMORY_BLOCK, len(runs), sum(count for _, count in runs))
    for index, (start, count) in enumerate(runs):
        struct.pack_into("<QQ", header, PHYSICAL_MEMORY_RUNS + index * 0x10, start, count)
    struct.pack_into("<iIQQI", header, EXCEPTION_RECORD, STATUS_BREAKPOINT - (1 << 32), EXCEPTION_NONCONTINUABLE,
                     0, image.symbol("KeBugCheckEx"), 0)
    struct.pack_into("<I", header, DUMP_TYPE_FIELD, DUMP_TYPE[kind])
    struct.pack_into("<QQ", header, REQUIRED_DUMP_SPACE, file_size, SYSTEM_TIME)
    struct.pack_into("<Q", header, SYSTEM_UP_TIME, UPTIME)
    struct.pack_into("<I", header, PRODUCT_TYPE, PRODUCT_WIN_NT)
    return bytes(header)


def _pfn_database(image) -> int:
    base, _ = image.flavor.regions.get("PfnDatabase", (0, 0))
    return base


def _ram_runs(total_pages: int) -> list[tuple[int, int]]:
    """All of RAM as the firmware reports it: page 0 and the legacy hole are not RAM."""
    hole_start, hole_end = LEGACY_HOLE[0] // PAGE_SIZE, LEGACY_HOLE[1] // PAGE_SIZE
    return [(1, hole_start - 1), (hole_end, total_pages - hole_end)]


def _used_pages(space) -> list[int]:
    """The page-table root and every frame handed out since (page tables, kernel data, pool)."""
    first = FIRST_FREE_FRAME // PAGE_SIZE
    return sorted({space.dtb // PAGE_SIZE, *range(first, first + space.frames_used)})


def _runs(pages: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for page in pages:
        if runs and runs[-1][0] + runs[-1][1] == page:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((page, 1))
    return runs


def _summary(pages: list[int], total_pages: int) -> bytes:
    """The ``_SUMMARY_DUMP`` page(s) of a kernel dump: header, then one bit per physical page."""
    bitmap = bytearray((total_pages + 31) // 32 * 4)
    for page in pages:
        bitmap[page // 8] |= 1 << (page % 8)
    length = -(-(SUMMARY_BITMAP + len(bitmap)) // PAGE_SIZE) * PAGE_SIZE
    summary = bytearray(length)
    summary[0:8] = SUMMARY_SIGNATURE + VALID_DUMP
    struct.pack_into("<QQQ", summary, SUMMARY_HEADER_SIZE, HEADER_SIZE + length, len(pages), total_pages)
    summary[SUMMARY_BITMAP : SUMMARY_BITMAP + len(bitmap)] = bitmap
    return bytes(summary)
