"""Pool consistency checks over a whole-image scan, as ``!poolval`` does for one page.

The walk itself reports what stops it: a classic page chain that breaks, a
VS chunk header that does not decode, a big page table entry over walked
chunks.  This module adds the checks a walk that keeps going cannot make on
its way: pool headers whose BlockSize runs past their page (a small block
never straddles a page on either allocator), unprintable tags on live
chunks, and big page table entries that overlap each other.  Every problem
is one ``Finding`` at the address a user should look at; problems met at
the same address are merged into one.
"""

from __future__ import annotations

from collections.abc import Iterable

from . import bigpages
from .kernel import PAGE_SIZE, Kernel
from .model import BUSY_STATES, Backing, Chunk, Finding
from .scan import PoolScan
from .tags import printable_tag

SMALL_BACKINGS = (Backing.PAGE, Backing.VS, Backing.LFH)


def has_pool_header(chunk: Chunk) -> bool:
    """Small live chunks carry a ``_POOL_HEADER``; headerless blocks come back with no tag and no PoolType."""
    return chunk.backing in SMALL_BACKINGS and chunk.state in BUSY_STATES and chunk.pool_type is not None


def header_overruns(chunks: Iterable[Chunk], page_size: int = PAGE_SIZE) -> list[Finding]:
    """Live chunks whose pool header claims a size that is zero or runs past the page holding the header."""
    findings = []
    for chunk in chunks:
        if not has_pool_header(chunk):
            continue
        if chunk.size == 0:
            findings.append(Finding(chunk.address, "pool header BlockSize is 0"))
            continue
        overrun = chunk.address % page_size + chunk.size - page_size
        if overrun > 0:
            findings.append(Finding(chunk.address, f"pool header size {chunk.size:#x} runs {overrun:#x} bytes"
                                                   " past the end of its page"))
    return findings


def unprintable_tags(chunks: Iterable[Chunk]) -> list[Finding]:
    """Live chunks (small or big) whose tag has bytes no driver would use: a sign of an overwritten header."""
    return [
        Finding(chunk.address, f"tag {chunk.tag.hex(' ')} of a live chunk has unprintable bytes")
        for chunk in chunks
        if chunk.state in BUSY_STATES and chunk.tag and not printable_tag(chunk.tag)
    ]


def big_entry_overlaps(allocations: Iterable[bigpages.BigAllocation]) -> list[Finding]:
    """Live big page table entries whose ranges overlap: each overlap is reported at the later entry's VA."""
    live = sorted((a for a in allocations if not a.free and a.size > 0), key=lambda a: (a.va, a.index))
    findings = []
    reach: bigpages.BigAllocation | None = None
    for entry in live:
        if reach is not None and entry.va < reach.end:
            findings.append(Finding(entry.va, f"big page table entry {entry.index} ({entry.va:#x}-{entry.end:#x})"
                                              f" overlaps entry {reach.index} ({reach.va:#x}-{reach.end:#x})"))
        if reach is None or entry.end > reach.end:
            reach = entry
    return findings


def merge(findings: Iterable[Finding]) -> list[Finding]:
    """One finding per address (reasons joined), in address order."""
    reasons: dict[int, list[str]] = {}
    for finding in findings:
        known = reasons.setdefault(finding.address, [])
        if finding.reason not in known:
            known.append(finding.reason)
    return [Finding(address, "; ".join(reasons[address])) for address in sorted(reasons)]


def validate(kernel: Kernel, scan: PoolScan) -> list[Finding]:
    """Everything wrong the scan met or these checks find, one finding per address, in address order."""
    return merge([
        *scan.findings,
        *header_overruns(scan.chunks, kernel.page_size),
        *unprintable_tags(scan.chunks),
        *big_entry_overlaps(bigpages.big_allocations(kernel)),
    ])
