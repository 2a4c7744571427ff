"""Build one synthetic image: kernel, objects, pools, bookkeeping; then save it with its manifest."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from . import bugchecks, corruption, crashdump, poolfill, snapshots
from .classic import ClassicPools
from .drivers import write_modules
from .flavors import FLAVORS, Flavor
from .image import Image
from .kernel import build_kernel
from .objects import ObjectWriter, process_times
from .pooltables import PoolTables
from .population import BIG_PROFILES, FREE_SHARE, PROFILES, TagProfile
from .regions import write_regions
from .segheap import SegmentHeapPools
from .snapshots import Leak

CHUNKS_PER_64_MIB = 6000  # small pool chunks placed per 64 MiB of image, so larger images hold more pool
BIG_PER_64_MIB = 60
SEED_PAGE_FILLERS = (b"Ntfx", b"FMfn", b"Irp ", b"Vad ", b"Even")
CACHED_FREE_RANGE = (0x200, 0xF60)  # requests whose block (with its header) fits the dynamic lookaside
QUOTA_SHARE = 0.05
CACHE_ALIGNED_SHARE = 0.02
DRIVER_TAG_ALLOCATIONS = 3  # live chunks per tag of each fake driver, so its tags appear in pool

LIVE_PROCESSES = (
    ("System", 4, 0),
    ("Registry", 92, 4),
    ("smss.exe", 340, 4),
    ("csrss.exe", 444, 432),
    ("wininit.exe", 516, 432),
    ("services.exe", 640, 516),
    ("lsass.exe", 660, 516),
    ("svchost.exe", 788, 640),
    ("svchost.exe", 812, 640),
    ("svchost.exe", 1020, 640),
    ("spoolsv.exe", 1776, 640),
    ("MsMpEng.exe", 3476, 640),
    ("explorer.exe", 4220, 4180),
    ("cmd.exe", 5012, 4220),
    ("conhost.exe", 5020, 5012),
)
# Processes that exited and whose objects were freed: their bytes linger in free chunks.
EXITED_PROCESSES = (("notepad.exe", 6144, 4220), ("mimikatz.exe", 6660, 5012), ("setup.exe", 7120, 4220))
FILES = (
    "\\Windows\\System32\\config\\SYSTEM",
    "\\Windows\\System32\\config\\SOFTWARE",
    "\\Windows\\System32\\ntdll.dll",
    "\\Windows\\System32\\kernel32.dll",
    "\\Users\\analyst\\Documents\\report.docx",
    "\\ProgramData\\Microsoft\\Windows Defender\\Scans\\mpcache.bin",
    "\\pagefile.sys",
    "\\$Mft",
)
SEED_PROCESS = "MsMpEng.exe"
REGISTRY_PROCESS_BUILD = 17134  # Windows 10 1803 moved the registry hives into a Registry process


@dataclass(frozen=True)
class BuildResult:
    image_path: Path
    manifest_path: Path
    seconds: float
    frames_used: int
    allocations: int
    dump_path: Path | None = None


def default_chunks(size: int) -> int:
    return max(CHUNKS_PER_64_MIB, CHUNKS_PER_64_MIB * size // (64 << 20))


def build_image(flavor: str | Flavor, seed: int, size: int, out_dir: Path, chunks: int | None = None,
                leaks: Sequence[Leak] = (), corrupt: Sequence[str] = (),
                bugcheck: bugchecks.BugCheckRequest | None = None, crash_dump: str | None = None,
                fill: poolfill.Fill | None = None, big_pool_tails: bool = False) -> BuildResult:
    """Build ``<flavor>-seed<seed>.raw`` and its manifest in ``out_dir``; ``chunks`` defaults to scale with ``size``.

    ``flavor`` is a flavor's name or a :class:`Flavor` (such as a build no flavor models, see unseen.py).

    ``leaks`` makes a later snapshot of the same system with those allocations added (see snapshots.py),
    saved as ``<flavor>-seed<seed>-leak-<tag>-<count>.raw``.  ``corrupt`` damages chunks after the build
    (kinds of corruption.py, recorded in the manifest), saved as ``...-corrupt-<kind>-<kind>.raw``.
    ``bugcheck`` plants the damage of a bug check and records it in memory and manifest (bugchecks.py),
    saved as ``...-bugcheck-<code>.raw``; ``crash_dump`` (full or kernel) also writes the image as the
    crash dump ``<stem>.dmp`` (crashdump.py), of a manually initiated crash unless ``bugcheck`` says.
    ``fill`` fills a pool close to its limit with one tag (poolfill.py), saved as ``...-fill-<pool>-<percent>``.
    ``big_pool_tails`` makes a classic pool build return the rest of a big allocation's last page to the pool
    as later builds do (whatever the flavor's own kernel does), saved as ``...-big-pool-tails``.
    """
    started = time.perf_counter()
    image = Image(_with_tails(FLAVORS[flavor] if isinstance(flavor, str) else flavor, big_pool_tails), seed, size)
    build_kernel(image)
    write_regions(image)
    poolfill.write_limits(image)
    tables = PoolTables(processors=2)
    _map_resident_kernel_data(image)
    pools = SegmentHeapPools(image, tables) if image.flavor.segment_heap else ClassicPools(image, tables)
    writer = ObjectWriter(image, pools)
    writer.write_type_table()
    processes = _place_processes(image, pools, writer)
    for path in FILES:
        writer.write_file(path)
    for driver in write_modules(image, lambda size, tag: pools.allocate(size, tag, writer.nonpaged)):
        writer.write_driver(driver["service"], driver["base"], driver["size"])
    _populate(image, pools, chunks or default_chunks(size), [process.body for process in processes])
    leaked = snapshots.leak(image, pools, writer.nonpaged, leaks)
    if fill:
        poolfill.fill(image, pools, fill)
    crash = bugchecks.Crash(image, bugcheck or bugchecks.MANUAL_CRASH) if bugcheck or crash_dump else None
    if crash:
        crash.allocate(pools, writer.nonpaged)
    pools.finish()
    snapshots.track(tables, image.manifest, leaked, image.rng)
    tables.write(image)
    corruption.corrupt(image, corrupt)
    suffix = snapshots.file_suffix(leaks) + poolfill.file_suffix(fill) + corruption.file_suffix(corrupt)
    suffix += "-big-pool-tails" if big_pool_tails else ""
    stem = _stem(image, suffix + bugchecks.file_suffix(bugcheck))
    dump_path = None
    if crash:
        record = crash.damage()
        if crash_dump:
            dump_path = _write_dump(image, out_dir, stem, crash_dump, record)
    return _save(image, out_dir, started, stem, dump_path)


def _with_tails(flavor: Flavor, big_pool_tails: bool) -> Flavor:
    """The flavor, made to return big allocations' page tails when asked (classic pool only)."""
    if not big_pool_tails:
        return flavor
    if flavor.segment_heap:
        raise ValueError(f"big pool tails are a classic pool behaviour; {flavor.name} has the segment heap")
    return dataclasses.replace(flavor, big_pool_tails=True)


def _map_resident_kernel_data(image: Image) -> None:
    """The kernel's data section is resident in full; map the large pool variables readers scan whole."""
    for symbol, type_name in (("ExPoolState", "_EX_POOL_HEAP_MANAGER_STATE"),):
        if image.types.has_symbol(symbol) and image.types.has_type(type_name):
            image.space.map_range(image.symbol(symbol), image.types.size(type_name))


def _place_processes(image: Image, pools, writer: ObjectWriter):
    times = process_times(image.rng, len(LIVE_PROCESSES) + len(EXITED_PROCESSES))
    live = []
    with_registry = image.flavor.build >= REGISTRY_PROCESS_BUILD
    names = [entry for entry in LIVE_PROCESSES if with_registry or entry[0] != "Registry"]
    for (name, pid, ppid), created in zip(names, times):
        allocation = None
        if name == SEED_PROCESS and image.flavor.seed_page:
            allocation = pools.seed_page(filler_tags=SEED_PAGE_FILLERS).proc
        process = writer.write_process(name, pid, ppid, created, allocation=allocation)
        for number in range(1 + pid % 3):
            writer.write_thread(process, pid + 4 * (number + 1))
        live.append(process)
    writer.link_processes([process.body for process in live])
    for (name, pid, ppid), created in zip(EXITED_PROCESSES, times[len(names):]):
        exited = created + (times[-1] - created) / 2
        writer.write_process(name, pid, ppid, created, exited, state="Free")
    return live


def _populate(image: Image, pools, count: int, process_bodies: list[int]) -> None:
    """Fill the pools with ``count`` small chunks over the tag profiles, plus big allocations."""
    rng = image.rng
    weights = [profile.weight for profile in PROFILES]
    for profile in rng.choices(PROFILES, weights=weights, k=count):
        size = rng.randrange(profile.min_size, profile.max_size + 1, 8)
        pool = _pool_for(image, profile)
        state = "Free" if rng.random() < FREE_SHARE else "Allocated"
        if state == "Free" and image.flavor.segment_heap and pool != "NonPaged" \
                and CACHED_FREE_RANGE[0] <= size <= CACHED_FREE_RANGE[1] and rng.random() < 0.4:
            state = "Cached-free"
        quota = rng.choice(process_bodies) if state == "Allocated" and rng.random() < QUOTA_SHARE else None
        aligned = state == "Allocated" and quota is None and rng.random() < CACHE_ALIGNED_SHARE
        pools.allocate(size, profile.tag, pool, state=state, quota_process=quota, cache_aligned=aligned)
    big_weights = [profile.weight for profile in BIG_PROFILES]
    for profile in rng.choices(BIG_PROFILES, weights=big_weights, k=count * BIG_PER_64_MIB // CHUNKS_PER_64_MIB):
        size = rng.randrange(profile.min_size, profile.max_size + 1, 0x10)
        state = "Free" if rng.random() < 0.15 else "Allocated"
        pools.allocate(size, profile.tag, _pool_for(image, profile), state=state)
    for driver in image.manifest.drivers:
        for text in driver["tags"]:
            for _ in range(DRIVER_TAG_ALLOCATIONS):
                pools.allocate(rng.randrange(0x40, 0x201, 8), text.encode("ascii"), "NonPaged")


def _pool_for(image: Image, profile: TagProfile) -> str:
    """The segment heap model keeps no session pool: session tags come from paged pool there."""
    if profile.pool == "Session" and image.flavor.segment_heap:
        return "Paged"
    return profile.pool


def _stem(image: Image, suffix: str) -> str:
    return f"{image.flavor.name}-seed{image.seed}{suffix}"


def _write_dump(image: Image, out_dir: Path, stem: str, kind: str, record: crashdump.BugCheckRecord) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = crashdump.write_crash_dump(image, out_dir / f"{stem}.dmp", kind, record)
    image.manifest.extras["crash_dump"] = {"kind": kind, "file": path.name}
    return path


def _save(image: Image, out_dir: Path, started: float, stem: str, dump_path: Path | None = None) -> BuildResult:
    out_dir.mkdir(parents=True, exist_ok=True)
    image_path = out_dir / f"{stem}.raw"
    manifest_path = out_dir / f"{stem}.json"
    image.space.save(image_path)
    manifest_path.write_text(image.manifest.to_json())
    return BuildResult(image_path, manifest_path, time.perf_counter() - started, image.space.frames_used,
                       len(image.manifest.allocations), dump_path)
