"""Free space in the pools: how much, in how many pieces, and what the pieces held before.

Per region and backing the summary counts free chunks and bytes, cached-free
chunks (freed by their caller but parked in a lookaside list, so the heap
cannot hand them to other sizes) separately, and the largest free run:
free chunks that touch are merged, since an allocator could serve one
request from them once coalesced (LFH slots side by side, say).

Fragmentation is ``1 - largest_free_run / free_bytes``: 0 when all free
memory of the group is one run, approaching 1 when it is scattered in many
small pieces (a request the size of the free total could not be served).
A group with no free bytes has fragmentation 0.

A free chunk's stale tag is the tag of the allocation that last used it.
Classic and LFH free chunks keep it in their own pool header, big page table
entries in the entry.  A free VS chunk's header is encoded and its first
pool header is overwritten by the free-tree node, so the stale tag is taken
from the first intact pool header left inside the chunk, if any.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from volatility3.framework import exceptions

from .kernel import Fields, Kernel
from .model import FREED_STATES, Backing, Chunk, State
from .poolheader import IN_USE_BIT, HeaderLayout, decode, header_layout
from .tags import printable_tag

STALE_SEARCH_LIMIT = 0x10000  # bytes of a free VS chunk searched for a stale pool header


@dataclass(frozen=True)
class FreeSummary:
    """Free space of one (region, backing) group."""

    region: str
    backing: str
    free_chunks: int
    free_bytes: int
    cached_free_chunks: int
    cached_free_bytes: int
    largest_free_run: int
    free_runs: int

    @property
    def fragmentation(self) -> float:
        """``1 - largest_free_run / free_bytes``; 0 for one contiguous run or no free bytes."""
        return 1.0 - self.largest_free_run / self.free_bytes if self.free_bytes else 0.0


@dataclass(frozen=True)
class StaleTag:
    """The tag a free chunk's last user left, and the header it was read from (None: nothing left)."""

    tag: bytes
    header: int | None


def free_runs(chunks: Iterable[Chunk]) -> list[tuple[int, int]]:
    """(start, size) of runs of free chunks that touch, merged, in address order."""
    runs: list[list[int]] = []
    for chunk in sorted((c for c in chunks if c.state is State.FREE), key=lambda c: c.address):
        if runs and runs[-1][0] + runs[-1][1] == chunk.address:
            runs[-1][1] += chunk.size
        else:
            runs.append([chunk.address, chunk.size])
    return [(start, size) for start, size in runs]


def summarize(chunks: Iterable[tuple[Chunk, str]]) -> list[FreeSummary]:
    """One summary per (region, backing) that holds free or cached-free chunks, sorted by region then backing."""
    groups: dict[tuple[str, str], list[Chunk]] = {}
    for chunk, region in chunks:
        if chunk.state in FREED_STATES:
            groups.setdefault((region, chunk.backing.value), []).append(chunk)
    summaries = []
    for (region, backing), members in sorted(groups.items()):
        free = [c for c in members if c.state is State.FREE]
        cached = [c for c in members if c.state is State.CACHED_FREE]
        runs = free_runs(free)
        summaries.append(FreeSummary(
            region=region,
            backing=backing,
            free_chunks=len(free),
            free_bytes=sum(c.size for c in free),
            cached_free_chunks=len(cached),
            cached_free_bytes=sum(c.size for c in cached),
            largest_free_run=max((size for _, size in runs), default=0),
            free_runs=len(runs),
        ))
    return summaries


def stale_tag(kernel: Kernel, chunk: Chunk) -> StaleTag:
    """The tag of the allocation that last used a free chunk (see the module notes); an LFH slot never handed
    out holds zeros, which name nothing."""
    if chunk.backing is not Backing.VS or chunk.state is not State.FREE:
        return StaleTag(chunk.tag, chunk.address) if any(chunk.tag) else StaleTag(b"", None)
    layout = header_layout(kernel)
    try:
        data = kernel.read(chunk.address, min(chunk.size, STALE_SEARCH_LIMIT), pad=True)
    except exceptions.InvalidAddressException:
        return StaleTag(b"", None)
    offset = stale_header_offset(data, layout, kernel.type_size("_HEAP_VS_CHUNK_FREE_HEADER"))
    if offset is None:
        return StaleTag(b"", None)
    return StaleTag(decode(data, layout, offset).tag, chunk.address + offset)


def freed_tag(kernel: Kernel, chunk: Chunk) -> bytes:
    """What a chunk its caller gave back held before (:func:`stale_tag`); empty for a chunk in use, or when
    nothing left in it names what was freed."""
    return stale_tag(kernel, chunk).tag if chunk.state in FREED_STATES else b""


def stale_header_offset(data: bytes, layout: HeaderLayout, free_header_size: int) -> int | None:
    """Offset of the first intact-looking pool header of a VS free chunk's bytes, or None.

    A pool header in a VS block has PreviousSize 0 (cache-aligned second headers aside), the in-use bit
    in its PoolType, a printable tag and a BlockSize that ends inside the chunk.  The chunk's free header
    (``sizeof(_HEAP_VS_CHUNK_FREE_HEADER)``: its chunk header and the free-tree node) is skipped.
    """
    unit = layout.unit
    offsets = np.arange(free_header_size, len(data) - unit + 1, unit, dtype=np.int64)
    fields = Fields(data)
    ends = offsets + (fields.field(offsets, layout.block_size) * np.uint64(unit)).astype(np.int64)
    plausible = ((fields.field(offsets, layout.previous_size) == 0) & (ends > offsets) & (ends <= len(data))
                 & ((fields.field(offsets, layout.pool_type) & np.uint64(IN_USE_BIT)) != 0))
    for offset in offsets[plausible].tolist():  # in order: the first whose tag is printable
        if printable_tag(decode(data, layout, offset).tag):
            return offset
    return None
