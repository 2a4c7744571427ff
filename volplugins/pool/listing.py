"""The census listing's labels: each chunk's region, the file a dumped chunk is written to, and free chunks
grouped under the free-space summary of their region and backing."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from . import classic, freespace, regions
from .filters import ChunkFilter
from .kernel import Kernel
from .model import FREED_STATES, Backing, Chunk, State
from .tags import is_protected, tag_text, unprotected

_FILENAME_SAFE = re.compile(rb"[A-Za-z0-9_-]")
SUMMARY = "Listed"  # how the listing's closing rows (no Address: counts per state and backing) start


def region_names(kernel: Kernel, chunks: Iterable[Chunk],
                 found_by_validation: Callable[[int], bool] = lambda address: False) -> dict[int, str]:
    """Region name per chunk address (one lookup per page: chunks of a page share their region).

    Chunks the scan found by page validation (no usable bookkeeping led to them) say so instead of naming
    their region."""
    by_page: dict[int, str] = {}
    names = {}
    page_mask = ~(kernel.page_size - 1)
    for chunk in chunks:
        if found_by_validation(chunk.address):
            names[chunk.address] = classic.FOUND_BY_VALIDATION
            continue
        page = chunk.address & page_mask
        if page not in by_page:
            by_page[page] = regions.classify(kernel, chunk.address).name
        names[chunk.address] = by_page[page]
    return names


def shown_tag(chunk: Chunk) -> tuple[str, bool]:
    """A chunk's tag as PoolMon and ``!pool`` show it, and whether the protected bit was set.

    The bytes a free VS chunk shows in place of a tag belong to its encoded header, not to a tag: they are
    shown as they are (``7+\\x80#``), with no protected bit read into them.
    """
    if chunk.backing is Backing.VS and chunk.state is State.FREE:
        return tag_text(chunk.tag), False
    return tag_text(unprotected(chunk.tag)), is_protected(chunk.tag)


def counts(chunks: Iterable[Chunk]) -> dict[tuple[State, Backing], tuple[int, int]]:
    """Chunks and bytes per (state, backing), in the order of the two enumerations."""
    totals: dict[tuple[State, Backing], tuple[int, int]] = {}
    for chunk in chunks:
        count, size = totals.get((chunk.state, chunk.backing), (0, 0))
        totals[(chunk.state, chunk.backing)] = (count + 1, size + chunk.size)
    order = {member: position for position, member in enumerate([*State, *Backing])}
    return dict(sorted(totals.items(), key=lambda item: (order[item[0][0]], order[item[0][1]])))


def dump_file_name(chunk: Chunk) -> str:
    """``<address>.<tag>.pool`` with the tag as the listing shows it (no protected bit), bytes other than
    letters, digits, '-' and '_' written as %XX."""
    tag = "".join(chr(byte) if _FILENAME_SAFE.fullmatch(bytes([byte])) else f"%{byte:02X}"
                  for byte in unprotected(chunk.tag))
    return f"{chunk.address:#x}.{tag or 'notag'}.pool"


@dataclass(frozen=True)
class FreeChunk:
    """A free chunk of a summary's group, with the tag of what was freed there."""

    chunk: Chunk
    region: str
    stale: freespace.StaleTag


def free_space(kernel: Kernel, chunks: Iterable[Chunk], names: dict[int, str],
               wanted: ChunkFilter) -> Iterator[tuple[freespace.FreeSummary, list[FreeChunk]]]:
    """Each free-space summary of the regions ``wanted`` selects, with its free chunks whose stale tag, size
    and state pass the other filters."""
    pairs = [(chunk, names[chunk.address]) for chunk in chunks
             if chunk.state in FREED_STATES and wanted.region_matches(names[chunk.address])]
    for summary in freespace.summarize(pairs):
        members = []
        for chunk, region in pairs:
            if region != summary.region or chunk.backing.value != summary.backing:
                continue
            stale = freespace.stale_tag(kernel, chunk)
            if wanted.matches(chunk, region, stale.tag):
                members.append(FreeChunk(chunk, region, stale))
        yield summary, members


def selected_stale_tag(kernel: Kernel, wanted: ChunkFilter, chunk: Chunk, region: str) -> bytes | None:
    """The stale tag of a chunk the filters select, None for one they do not.

    ``--tag`` selects a freed chunk by what it held, too: a freed classic chunk keeps its tag in its header,
    a freed segment-heap chunk only in the stale pool header the search recovers, and the same question
    (what was freed here with this tag) should find both."""
    if wanted.matches(chunk, region):
        return freespace.freed_tag(kernel, chunk)
    if not wanted.tags or chunk.state not in FREED_STATES:
        return None
    stale = freespace.freed_tag(kernel, chunk)
    return stale if stale and wanted.matches(chunk, region, stale) else None
