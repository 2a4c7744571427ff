"""The kernel's record of its virtual-address regions, and the manifest's copy of it.

Windows 10 assigns system VA regions at boot and records each in
``MiState.Vs.SystemVaRegions[AssignedRegion<kind>]``; Windows 7 keeps pool
bounds in ``Mm*`` variables (written by the classic pool builder) and fixes the
rest of the x64 layout.
"""

from __future__ import annotations

from .image import Image

# How WinDbg and users name each region.
DISPLAY_NAMES = {
    "NonPagedPool": "Nonpaged pool",
    "PagedPool": "Paged pool",
    "Session": "Session pool",
    "SystemPtes": "System PTEs",
    "KernelStacks": "Kernel stacks",
    "SystemImages": "System images",
    "PfnDatabase": "PFN database",
}
POOL_OF_REGION = {"NonPagedPool": "NonPaged", "PagedPool": "Paged", "Session": "Session"}


def write_regions(image: Image) -> None:
    if image.types.has_symbol("MiState") and image.types.has_type("_MI_VISIBLE_STATE"):
        _write_system_va_regions(image)
    image.manifest.regions = [
        {"kind": kind, "name": DISPLAY_NAMES[kind], "start": base, "end": base + size,
         "pool": POOL_OF_REGION.get(kind)}
        for kind, (base, size) in sorted(image.flavor.regions.items(), key=lambda item: item[1][0])
    ]


def _write_system_va_regions(image: Image) -> None:
    stride = image.types.size("_MI_SYSTEM_VA_ASSIGNMENT")
    array = image.symbol("MiState") + image.offset("_MI_SYSTEM_INFORMATION", "Vs.SystemVaRegions")
    for kind, (base, size) in image.flavor.regions.items():
        index = image.types.enum("_MI_ASSIGNED_REGION_TYPES", f"AssignedRegion{kind}")
        image.put(array + index * stride, "_MI_SYSTEM_VA_ASSIGNMENT", {"BaseAddress": base, "NumberOfBytes": size})
