"""A later snapshot of the same system in which a driver leaks pool.

``--leak NfkR:400`` builds the image of the same seed and adds 400 live
allocations of tag ``NfkR`` once the ordinary population is placed.  Leak
hunting compares the two snapshots tag by tag, so everything except the
leaked tag must come out the same:

* the leak draws its randomness from a stream of its own, so the pool
  builders and the tracker draw exactly what they draw without it;
* on Windows 7 the leaked chunks fill pages of their own (the pages the
  population left open are set aside and given back afterwards), so no
  other chunk, and no free tail of another page, moves or changes tag;
* the tracker counts the population as before and then the leak on top:
  the leaked tag gains ``count`` allocations and their bytes, its frees
  stay what they were.

What does differ: physical frames (mapped later, in another order), free
space the leaked chunks took (never-allocated LFH slots, tails of VS
subsegments, which hold no tag), the free tails of the leak's own pages on
Windows 7 (which keep a stale tag, as every page's tail does), and how each
tag's counters are split over the processors' tables (sums are unchanged).
"""

from __future__ import annotations

import contextlib
import random
import re
from dataclasses import asdict, dataclass, replace
from typing import Iterator, Sequence

from .classic import ClassicPools
from .manifest import Allocation, Manifest, tag_text
from .pooltables import PoolTables, tag_bytes

DEFAULT_LEAK_SIZE = 0x60  # bytes per leaked allocation, a typical small driver structure
TAG_LENGTH = 4
MAX_LEAK_COUNT = 1 << 20
_SPEC = re.compile(r"^(?P<tag>.+):(?P<count>\d+)(?::(?P<size>0x[0-9a-fA-F]+|\d+))?$")


@dataclass(frozen=True)
class Leak:
    """``count`` live allocations of ``size`` bytes and tag ``tag`` (nonpaged pool)."""

    tag: bytes
    count: int
    size: int = DEFAULT_LEAK_SIZE


def parse_leak(text: str) -> Leak:
    """``TAG:COUNT[:SIZE]``; the tag may use ``\\xNN`` escapes and is space-padded to 4 bytes."""
    match = _SPEC.match(text)
    if match is None:
        raise ValueError(f"not a leak: {text!r} (expected TAG:COUNT[:SIZE], e.g. NfkR:400 or NfkR:400:0x80)")
    tag = tag_bytes(match["tag"])
    if len(tag) > TAG_LENGTH:
        raise ValueError(f"tag {match['tag']!r} is longer than {TAG_LENGTH} bytes")
    count = int(match["count"])
    size = int(match["size"], 0) if match["size"] else DEFAULT_LEAK_SIZE
    if not 0 < count <= MAX_LEAK_COUNT:
        raise ValueError(f"leak count must be between 1 and {MAX_LEAK_COUNT}")
    if size <= 0:
        raise ValueError("leak size must be positive")
    return Leak(tag.ljust(TAG_LENGTH, b" "), count, size)


def file_suffix(leaks: Sequence[Leak]) -> str:
    """Name suffix of a leaked snapshot (``-leak-NfkR-400``) so it does not overwrite the base image."""
    parts = [f"-leak-{re.sub(r'[^0-9A-Za-z]', '_', tag_text(leak.tag))}-{leak.count}" for leak in leaks]
    return "".join(parts)


def leak(image, pools, pool: str, leaks: Sequence[Leak]) -> list[Allocation]:
    """Place the leaked allocations (after the population, before ``pools.finish()``).

    Returns every chunk placed meanwhile: the leaked allocations and, on
    Windows 7, the free tails that close the leak's last pages.
    """
    if not leaks:
        return []
    first = len(image.manifest.allocations)
    stream = random.Random(f"{image.seed}:leak")  # its own stream: the population's draws stay as they were
    with _isolated(pools, stream):
        for item in leaks:
            for _ in range(item.count):
                pools.allocate(item.size, item.tag, pool)
    placed = image.manifest.allocations[first:]
    image.manifest.extras["leak"] = [_record(item, pool, placed) for item in leaks]
    return placed


def _record(item: Leak, pool: str, placed: Sequence[Allocation]) -> dict:
    mine = [a for a in placed if a.state == "Allocated" and a.tag == tag_text(item.tag)]
    return asdict(item) | {
        "tag": tag_text(item.tag),
        "pool": pool,
        "bytes": sum(a.size for a in mine),
        "addresses": [a.address for a in mine],
    }


def track(tables: PoolTables, manifest: Manifest, placed: Sequence[Allocation], rng: random.Random) -> None:
    """Tracker counters: the population exactly as without the leak, then the leaked allocations on top.

    Free tails of the leak's pages are free space, not freed allocations:
    they are left out so that no other tag's counters change.
    """
    if not placed:
        tables.track_from_manifest(manifest, rng)
        return
    ids = {id(allocation) for allocation in placed}
    population = [a for a in manifest.allocations if id(a) not in ids]
    tables.track_from_manifest(replace(manifest, allocations=population), rng)
    for allocation in placed:
        if allocation.state == "Allocated":
            tables.track(tag_bytes(allocation.tag), allocation.pool, 1, 0, allocation.size)


@contextlib.contextmanager
def _isolated(pools, stream: random.Random) -> Iterator[None]:
    """Let the pool builder draw from ``stream`` and, for classic pools, fill pages of its own."""
    saved_rng = pools.rng
    pools.rng = stream
    try:
        if isinstance(pools, ClassicPools):
            with _own_pages(pools):
                yield
        else:
            yield
    finally:
        pools.rng = saved_rng


@contextlib.contextmanager
def _own_pages(pools: ClassicPools) -> Iterator[None]:
    """Set aside the pages the population left open and the tags it left behind; close the leak's
    pages before giving them back, so closing the population's pages draws what it draws without
    the leak."""
    saved = {name: (pool.open, list(pool.stale_tags)) for name, pool in pools.pools.items()}
    for pool in pools.pools.values():
        pool.open = []
    try:
        yield
        for pool in pools.pools.values():
            for page in list(pool.open):
                pools._close(pool, page)
    finally:
        for name, (pages, stale) in saved.items():
            pools.pools[name].open = pages
            pools.pools[name].stale_tags = stale
