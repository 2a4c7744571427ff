"""The kernel's own image and the variables every analysis starts from.

Writes the kernel PE (with the CodeView record of the modeled build's PDB),
the debugger data block, the version block, KUSER_SHARED_DATA mapped at both
its kernel and user addresses, the processor count and the build string.
"""

from __future__ import annotations

import datetime
import struct

from .image import Image
from .pe import CODE_CHARACTERISTICS, PeImage, codeview_section

KUSER_KERNEL = 0xFFFFF78000000000
KUSER_USER = 0x7FFE0000
PROCESSORS = 2
CACHE_LINE = 64  # bytes; cache-aligned pool allocations align their body to this
# The moment the synthetic system is "captured", as a FILETIME (100 ns since 1601).
CAPTURE_TIME = datetime.datetime(2026, 1, 15, 8, 0, tzinfo=datetime.timezone.utc)
FILETIME_EPOCH = datetime.datetime(1601, 1, 1, tzinfo=datetime.timezone.utc)
NT_PRODUCT_WIN_NT = 1


def filetime(moment: datetime.datetime) -> int:
    return int((moment - FILETIME_EPOCH).total_seconds()) * 10_000_000


SYSTEM_TIME = filetime(CAPTURE_TIME)

# _KDDEBUGGER_DATA64 is not in the kernel's PDB; its layout is the public one of
# the debugger SDK (wdbgexts.h), identical on every x64 build.
KDBG_OWNER_TAG = 0x10
KDBG_SIZE_FIELD = 0x14
KDBG_KERN_BASE = 0x18
KDBG_PS_LOADED_MODULE_LIST = 0x48
KDBG_PS_ACTIVE_PROCESS_HEAD = 0x50
KDBG_NT_BUILD_LAB = 0x208
KDBG_CM_NT_CSD_VERSION = 0x268
KDBG_BLOCK_SIZE = 0x368

# What follows the build number in each flavor's NtBuildLab.
BUILD_LABS = {
    "win10-19041": "1.amd64fre.vb_release.191206-1406",
    "win7-sp1": "24540.amd64fre.win7sp1_ldr_escrow.191127-1706",
    "win11-22000": "1.amd64fre.co_release.210604-1628",
    "win10-1809": "1.amd64fre.rs5_release.180914-1434",
    "win81-9600": "16384.amd64fre.winblue_rtm.130821-1623",
    "win10-18362": "1.amd64fre.19h1_release.190318-1202",
    "srv2022-20348": "1.amd64fre.fe_release.210507-1500",
}


def build_kernel(image: Image) -> None:
    """Lay out the kernel image and its identification data."""
    _write_pe(image)
    _write_debugger_data(image)
    _write_version_block(image)
    _write_kuser_shared_data(image)
    image.space.write_u32(image.symbol("KeNumberProcessors"), PROCESSORS)
    if image.types.has_symbol("ExpCacheLineSize"):
        image.space.write_u32(image.symbol("ExpCacheLineSize"), CACHE_LINE)
    image.manifest.kernel_base = image.kernel_base
    image.manifest.dtb = image.space.dtb
    image.manifest.build = {
        "major": image.flavor.major,
        "minor": image.flavor.minor,
        "build": image.flavor.build,
        "processors": PROCESSORS,
        "pdb_guid": image.types.pdb["GUID"],
        "pdb_age": image.types.pdb["age"],
    }


def _write_pe(image: Image) -> None:
    pe = PeImage(base=image.kernel_base, os_version=(image.flavor.major, image.flavor.minor))
    pe.add_section(b".text", b"\xcc" * 0x1000, CODE_CHARACTERISTICS)
    pdb = image.types.pdb
    guid = pdb["GUID"]
    codeview_section(pe, f"{guid[:8]}-{guid[8:12]}-{guid[12:16]}-{guid[16:20]}-{guid[20:]}", pdb["age"], pdb["database"])
    pe.write_to(image.space)


def _write_debugger_data(image: Image) -> None:
    block = bytearray(KDBG_BLOCK_SIZE)
    block[KDBG_OWNER_TAG : KDBG_OWNER_TAG + 4] = b"KDBG"
    struct.pack_into("<I", block, KDBG_SIZE_FIELD, KDBG_BLOCK_SIZE)
    struct.pack_into("<Q", block, KDBG_KERN_BASE, image.kernel_base)
    struct.pack_into("<Q", block, KDBG_PS_LOADED_MODULE_LIST, image.symbol("PsLoadedModuleList"))
    struct.pack_into("<Q", block, KDBG_PS_ACTIVE_PROCESS_HEAD, image.symbol("PsActiveProcessHead"))
    struct.pack_into("<Q", block, KDBG_NT_BUILD_LAB, image.symbol("NtBuildLab"))
    struct.pack_into("<Q", block, KDBG_CM_NT_CSD_VERSION, image.symbol("CmNtCSDVersion"))
    image.space.write(image.symbol("KdDebuggerDataBlock"), bytes(block))
    lab = f"{image.flavor.build}.{BUILD_LABS[image.flavor.name]}"
    image.space.write(image.symbol("NtBuildLab"), lab.encode() + b"\0")
    service_pack = 1 if image.flavor.build == 7601 else 0
    image.space.write_u32(image.symbol("CmNtCSDVersion"), service_pack << 8)


def _write_version_block(image: Image) -> None:
    image.put_symbol(
        "KdVersionBlock",
        "_DBGKD_GET_VERSION64",
        {
            "MajorVersion": 0xF,  # free (retail) build
            "MinorVersion": image.flavor.build,
            "ProtocolVersion": 6,
            "MachineType": 0x8664,
            "KernBase": image.kernel_base,
            "PsLoadedModuleList": image.symbol("PsLoadedModuleList"),
            "DebuggerDataList": image.symbol("KdDebuggerDataBlock"),
        },
    )


def _write_kuser_shared_data(image: Image) -> None:
    frame = image.space.map_page(KUSER_KERNEL)
    image.space.map_page(KUSER_USER, frame)
    values = {
        "NtMajorVersion": image.flavor.nt_major,
        "NtMinorVersion": image.flavor.nt_minor,
        "NtProductType": NT_PRODUCT_WIN_NT,
        "SystemTime.LowPart": SYSTEM_TIME & 0xFFFFFFFF,
        "SystemTime.High1Time": SYSTEM_TIME >> 32,
        "SystemTime.High2Time": SYSTEM_TIME >> 32,
    }
    if image.types.has_field("_KUSER_SHARED_DATA", "NtBuildNumber"):
        values["NtBuildNumber"] = image.flavor.build
    image.put(KUSER_KERNEL, "_KUSER_SHARED_DATA", values)
    root_offset = image.offset("_KUSER_SHARED_DATA", "NtSystemRoot")
    image.space.write(KUSER_KERNEL + root_offset, "C:\\Windows".encode("utf-16-le") + b"\0\0")
