"""Which kernel region an address lies in, from the kernel's own bookkeeping.

Windows 10 and later assign system VA regions dynamically and record them in
``MiState.Vs.SystemVaRegions[]`` (``_MI_SYSTEM_VA_ASSIGNMENT`` {BaseAddress,
NumberOfBytes}), indexed by the ``_MI_ASSIGNED_REGION_TYPES`` enum, whose
values differ between builds: both come from the ISF.  Windows 7 keeps pool
bounds in variables (``MmNonPagedPoolStart``, ``MmMaximumNonPagedPoolInBytes``,
``MmPagedPoolEnd``, ``MmSizeOfPagedPoolInBytes``) and has a fixed x64 layout
for the rest.  Windows 8.1 keeps the same variables except the nonpaged pool
start, which is fixed: that start is checked against the image (the first
process object lives in nonpaged pool) before it is used.  Other kernel
addresses are reported as unknown rather than guessed.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

from volatility3.framework import exceptions

from .kernel import PAGE_SIZE, Kernel, per_kernel

# Before Windows 10, x64 session space sits in a fixed PML4 slot (512 GiB at
# 0xFFFFF900`00000000); no variable records it.
FIXED_X64_SESSION_SPACE = (0xFFFFF90000000000, 0xFFFFF98000000000)
# Windows 8.1 x64 starts nonpaged pool at a fixed address (its 16 TiB slot);
# only the size, MmMaximumNonPagedPoolInBytes, is a variable.
FIXED_X64_NONPAGED_POOL_START = 0xFFFFE00000000000
# One PML4 entry maps 512 GiB on x64; the slot holding the kernel image is
# where the loader maps the kernel, HAL and boot drivers before Windows 10.
PML4_SLOT_SIZE = 1 << 39
DEFAULT_HIGHEST_USER_ADDRESS = 0x7FFFFFFEFFFF
DEFAULT_VA_BITS = 48

logger = logging.getLogger(__name__)

_ENUM = "_MI_ASSIGNED_REGION_TYPES"
_PREFIX = "AssignedRegion"

# Region names as users read them (``!pool``: "region is Nonpaged pool"), and the pool they hold.
_NAMES: dict[str, tuple[str, str | None]] = {
    "NonPagedPool": ("Nonpaged pool", "NonPaged"),
    "PagedPool": ("Paged pool", "Paged"),
    "Session": ("Session pool", "Session"),
    "SystemCache": ("System cache", None),
    "SystemPtes": ("System PTEs", None),
    "UltraZero": ("Ultra zero", None),
    "PfnDatabase": ("PFN database", None),
    "Cfg": ("CFG bitmap", None),
    "HyperSpace": ("Hyper space", None),
    "KernelStacks": ("Kernel stacks", None),
    "PageTables": ("Page tables", None),
    "SystemImages": ("System images", None),
    "SecureNonPagedPool": ("Secure nonpaged pool", None),
    "SpecialPoolPaged": ("Special pool (paged)", "Paged"),
    "SpecialPoolNonPaged": ("Special pool (nonpaged)", "NonPaged"),
    "KernelShadowStacks": ("Kernel shadow stacks", None),
}

USER_SPACE = "User space"
USER_GUARD = "User space (no-access guard above the highest user address)"
NON_CANONICAL = "Non-canonical"
UNKNOWN_KERNEL = "Unmapped/unknown kernel address"


@dataclass(frozen=True)
class Region:
    """A kernel VA range with the name users read and the pool it holds (None: not pool)."""

    name: str
    start: int
    end: int  # exclusive
    pool: str | None
    source: str = ""  # where the bounds came from: a symbol, or an architectural constant

    @property
    def size(self) -> int:
        return self.end - self.start

    def contains(self, address: int) -> bool:
        return self.start <= address < self.end


@dataclass(frozen=True)
class RegionAnswer:
    """What ``classify`` says about one address."""

    address: int
    name: str
    region: Region | None = None

    @property
    def pool(self) -> str | None:
        return self.region.pool if self.region else None


def kernel_regions(kernel: Kernel) -> list[Region]:
    """The kernel's VA regions, sorted by start (read once per kernel)."""
    return list(_regions(kernel))


@per_kernel
def _regions(kernel: Kernel) -> tuple[Region, ...]:
    if not _has_va_assignments(kernel) and kernel.has_type("_MI_SYSTEM_INFORMATION"):
        kernel.lacks("MiState", "kernel regions are unknown; pool pages are found by page validation")
    try:
        regions = _from_mi_state(kernel) if _has_va_assignments(kernel) else _from_variables(kernel)
    except exceptions.InvalidAddressException:
        regions = []
    usable = [region for region in regions if _usable(region, kernel_half_start(kernel))]
    return tuple(sorted(usable, key=lambda region: (region.start, region.end)))


def _usable(region: Region, kernel_half: int) -> bool:
    """Bounds a kernel can have: page aligned, inside the kernel half of the address space.  Smeared or
    half-paged-out bookkeeping gives others; such a region is as good as unknown."""
    return (kernel_half <= region.start < region.end <= 1 << 64 and region.start % PAGE_SIZE == 0
            and region.end % PAGE_SIZE == 0)


def _has_va_assignments(kernel: Kernel) -> bool:
    return (
        kernel.has_symbol("MiState")
        and kernel.has_field("_MI_SYSTEM_INFORMATION", "Vs.SystemVaRegions")
        and kernel.module.has_enumeration(_ENUM)
    )


def region_name(constant: str) -> tuple[str, str | None]:
    """The user-facing name and pool of an ``_MI_ASSIGNED_REGION_TYPES`` constant."""
    short = constant.removeprefix(_PREFIX)
    if short in _NAMES:
        return _NAMES[short]
    words = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", short)
    return words[:1].upper() + words[1:].lower(), None


def _from_mi_state(kernel: Kernel) -> list[Region]:
    array = kernel.field_layout("_MI_SYSTEM_INFORMATION", "Vs.SystemVaRegions")
    stride = kernel.type_size("_MI_SYSTEM_VA_ASSIGNMENT")
    base = kernel.field_layout("_MI_SYSTEM_VA_ASSIGNMENT", "BaseAddress")
    length = kernel.field_layout("_MI_SYSTEM_VA_ASSIGNMENT", "NumberOfBytes")
    count = array.size // stride
    data = kernel.read(kernel.symbol_address("MiState") + array.offset, count * stride)
    regions = []
    for constant, index in kernel.module.get_enumeration(_ENUM).choices.items():
        if not 0 <= index < count:  # AssignedRegionMaximum and anything past the array
            continue
        start = base.extract(data, index * stride)
        size = length.extract(data, index * stride)
        if start and size:
            name, pool = region_name(constant)
            regions.append(Region(name, start, start + size, pool, f"MiState.Vs.SystemVaRegions[{constant}]"))
    return regions


def _from_variables(kernel: Kernel) -> list[Region]:
    """Pre-Windows 10 kernels: pool bounds from Mm variables, the rest from the fixed x64 layout."""
    regions = []
    nonpaged = _nonpaged_bounds(kernel)
    if nonpaged:
        start, size, source = nonpaged
        regions.append(Region("Nonpaged pool", start, start + size, "NonPaged", source))
    paged = _pair(kernel, "MmPagedPoolEnd", "MmSizeOfPagedPoolInBytes")
    if paged:
        last, size = paged
        regions.append(Region("Paged pool", last + 1 - size, last + 1, "Paged", "MmPagedPoolEnd"))
    start, end = FIXED_X64_SESSION_SPACE
    regions.append(Region("Session pool", start, end, "Session", "fixed x64 session space"))
    slot = kernel.base - kernel.base % PML4_SLOT_SIZE
    regions.append(Region("System images", slot, slot + PML4_SLOT_SIZE, None, "PML4 slot of the kernel image"))
    return regions


def _nonpaged_bounds(kernel: Kernel) -> tuple[int, int, str] | None:
    """(start, size, source) of nonpaged pool: from MmNonPagedPoolStart, else the fixed start once the image agrees."""
    if kernel.has_symbol("MmNonPagedPoolStart"):
        pair = _pair(kernel, "MmNonPagedPoolStart", "MmMaximumNonPagedPoolInBytes")
        return (*pair, "MmNonPagedPoolStart") if pair else None
    size = _variable(kernel, "MmMaximumNonPagedPoolInBytes")
    if not size:
        return None
    start = FIXED_X64_NONPAGED_POOL_START
    first_process = _variable(kernel, "PsActiveProcessHead")
    if first_process is None or not start <= first_process < start + size:
        shown = "unreadable" if first_process is None else f"{first_process:#x}"
        logger.warning("layout of build %s not recognised: the first process (%s) is not in nonpaged pool at "
                       "%#x..%#x; nonpaged pool addresses are not named", kernel.build_number or "?", shown,
                       start, start + size)
        return None
    return start, size, "fixed x64 nonpaged pool start, MmMaximumNonPagedPoolInBytes"


def _variable(kernel: Kernel, name: str) -> int | None:
    """A pointer-sized variable, None when the build lacks it or it is unreadable."""
    if not kernel.has_symbol(name):
        return None
    try:
        return kernel.read_pointer(kernel.symbol_address(name))
    except exceptions.InvalidAddressException:
        return None


def _pair(kernel: Kernel, first: str, second: str) -> tuple[int, int] | None:
    """Two pointer-sized variables, None unless both exist, are readable and non-zero."""
    values = (_variable(kernel, first), _variable(kernel, second))
    return values if all(values) else None


@per_kernel
def highest_user_address(kernel: Kernel) -> int:
    """``MmHighestUserAddress`` when readable, else the x64 default (read once per kernel)."""
    value = _variable(kernel, "MmHighestUserAddress")
    if value:
        return value
    return DEFAULT_HIGHEST_USER_ADDRESS


def _va_bits(kernel: Kernel) -> int:
    """Implemented virtual-address bits of the kernel's layer (48 for 4-level paging)."""
    return getattr(kernel.layer, "_maxvirtaddr", DEFAULT_VA_BITS)


def kernel_half_start(kernel: Kernel | None = None) -> int:
    """The lowest canonical kernel-half address: bit ``va_bits - 1`` and all above it set."""
    va_bits = _va_bits(kernel) if kernel is not None else DEFAULT_VA_BITS
    return (1 << 64) - (1 << (va_bits - 1))


def is_canonical(address: int, va_bits: int = DEFAULT_VA_BITS) -> bool:
    """True when the bits above ``va_bits - 1`` all repeat bit ``va_bits - 1``."""
    top = address >> (va_bits - 1)
    return top == 0 or top == (1 << (64 - va_bits + 1)) - 1


def classify(kernel: Kernel, address: int) -> RegionAnswer:
    """Name the region holding ``address``: a kernel region, user space, or why there is none."""
    va_bits = _va_bits(kernel)
    if not is_canonical(address, va_bits):
        return RegionAnswer(address, NON_CANONICAL)
    if address >> (va_bits - 1) == 0:
        return RegionAnswer(address, USER_SPACE if address <= highest_user_address(kernel) else USER_GUARD)
    holders = [region for region in _regions(kernel) if region.contains(address)]
    if not holders:
        return RegionAnswer(address, UNKNOWN_KERNEL)
    region = min(holders, key=lambda candidate: candidate.size)
    return RegionAnswer(address, region.name, region)
