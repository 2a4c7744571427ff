"""The pool limits the kernel enforces, and a pool filled close to its limit by one driver's tag.

Windows 7 keeps the limits in bytes in ``MmMaximumNonPagedPoolInBytes`` and
``MmSizeOfPagedPoolInBytes`` (the classic pool builder writes them with the
region bounds: the regions are as large as the pools may grow).  Windows 10
and 11 keep them in pages in ``MiState.Vs`` (``MaximumNonPagedPoolInPages``,
``SizeOfPagedPoolInPages``): nonpaged pool may grow to the size of physical
memory, paged pool to its region.

``--fill-pool POOL:TAG[:PERCENT]`` models a driver that exhausts a pool:
after the ordinary population it allocates TAG in pieces of
``FILL_REQUEST`` bytes until the pool's live bytes reach PERCENT (default
95) of the limit.  The segment heap commits a large allocation page by page,
so only the first page of each is resident and a 32 MiB image can hold a
nonpaged pool filled to its 32 MiB limit; classic pool maps its big
allocations whole and needs the memory itself.  Recorded in
``manifest.extras["pool_fill"]``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .image import Image
from .pooltables import tag_bytes

PAGE = 0x1000
FILL_REQUEST = 0x40000  # bytes per filling allocation: a segment page range, or 64 classic pages
DEFAULT_PERCENT = 95
TRACKER_POOLS = {"NonPaged": "Nonp", "NonPagedNx": "Nonp", "Paged": "Paged", "Session": "Session"}
_SPEC = re.compile(r"^(?P<pool>NonPaged|Paged):(?P<tag>[^:]+)(?::(?P<percent>\d+))?$")


@dataclass(frozen=True)
class Fill:
    pool: str  # NonPaged or Paged
    tag: bytes
    percent: int = DEFAULT_PERCENT


def parse_fill(text: str) -> Fill:
    """``NonPaged:NfkR`` or ``NonPaged:NfkR:97``."""
    match = _SPEC.match(text)
    if match is None:
        raise ValueError(f"not a pool fill: {text!r} (expected NonPaged|Paged:TAG[:PERCENT], e.g. NonPaged:NfkR:95)")
    tag = tag_bytes(match["tag"])
    percent = int(match["percent"] or DEFAULT_PERCENT)
    if len(tag) > 4 or not 0 < percent < 100:
        raise ValueError("the tag has at most 4 bytes and the percentage is between 1 and 99")
    return Fill(match["pool"], tag.ljust(4, b" "), percent)


def file_suffix(fill: Fill | None) -> str:
    return f"-fill-{fill.pool}-{fill.percent}" if fill else ""


def limits(image: Image) -> dict[str, int]:
    """Bytes each pool may hold (tracker pool name -> limit), as the kernel's variables record them."""
    nonpaged = image.flavor.regions["NonPagedPool"][1]
    paged = image.flavor.regions["PagedPool"][1]
    if _has_visible_limits(image):
        nonpaged = min(nonpaged, len(image.space.physical))
    return {"Nonp": nonpaged, "Paged": paged}


def write_limits(image: Image) -> None:
    """Windows 10 and later: the limits in ``MiState.Vs`` (Windows 7's are written with its regions)."""
    if not _has_visible_limits(image):
        return
    pool_limits = limits(image)
    state = image.symbol("MiState")
    for field, pool in (("Vs.MaximumNonPagedPoolInPages", "Nonp"), ("Vs.SizeOfPagedPoolInPages", "Paged")):
        image.space.write_u64(state + image.offset("_MI_SYSTEM_INFORMATION", field), pool_limits[pool] // PAGE)
    image.manifest.extras["pool_limits"] = pool_limits


def _has_visible_limits(image: Image) -> bool:
    return image.types.has_symbol("MiState") and image.types.has_field(
        "_MI_SYSTEM_INFORMATION", "Vs.MaximumNonPagedPoolInPages")


def fill(image: Image, pools, request: Fill) -> None:
    """Allocate ``request.tag`` until the pool's live bytes reach the percentage of its limit (before finish)."""
    group = TRACKER_POOLS[request.pool]
    limit = limits(image)[group]
    live = sum(a.size for a in image.manifest.allocations
               if a.state == "Allocated" and TRACKER_POOLS.get(a.pool) == group)
    target = limit * request.percent // 100
    saved, pools.rng = pools.rng, random.Random(f"{image.seed}:fill")
    placed = 0
    try:
        while live < target:
            live += pools.allocate(min(FILL_REQUEST, max(PAGE, target - live)), request.tag, request.pool).size
            placed += 1
    except MemoryError:
        raise ValueError(f"a {request.pool} pool limit of {limit:#x} bytes cannot be filled in this image: "
                         "choose a segment heap flavor or a larger --size") from None
    finally:
        pools.rng = saved
    image.manifest.extras["pool_fill"] = {
        "pool": request.pool, "tracker_pool": group, "tag": request.tag.decode("latin-1"), "percent": request.percent,
        "limit": limit, "allocations": placed, "live_bytes": live,
    }
