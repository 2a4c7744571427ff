"""Where pool pages may lie: the pool regions the kernel's bookkeeping names, cut so that no address is walked
twice, and, when that bookkeeping is unusable, the rest of the kernel half of the address space, where only
pages that validate on their own are taken for pool."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from volatility3.framework import exceptions

from . import classic, regions
from .kernel import Kernel

_SKIPPED_REGIONS = ("Special pool",)  # one allocation per page at the page's end: no chunk chain to walk


@dataclass(frozen=True)
class Span:
    start: int
    end: int
    pool: str
    name: str

    @property
    def validating(self) -> bool:
        """Outside every known pool region: what is found here is found by page validation."""
        return self.name == classic.FOUND_BY_VALIDATION


def pool_spans(kernel: Kernel) -> list[Span]:
    """Pool regions cut so that no VA is walked twice; a VA in nested regions goes to the smallest."""
    chosen: list[Span] = []
    candidates = [r for r in regions.kernel_regions(kernel)
                  if r.pool is not None and not r.name.startswith(_SKIPPED_REGIONS)]
    for region in sorted(candidates, key=lambda r: r.size):
        pieces = [(region.start, region.end)]
        for taken in chosen:
            pieces = [part for lo, hi in pieces for part in subtract(lo, hi, taken.start, taken.end)]
        chosen += [Span(lo, hi, region.pool, region.name) for lo, hi in pieces]
    return sorted(chosen, key=lambda span: span.start)


def with_validation(kernel: Kernel) -> list[Span]:
    """The pool regions and, when they do not name both the nonpaged and the paged pool, the validation spans."""
    known = pool_spans(kernel)
    return sorted(known + validation_spans(kernel, known), key=lambda span: span.start)


def subtract(lo: int, hi: int, cut_lo: int, cut_hi: int) -> list[tuple[int, int]]:
    if cut_hi <= lo or cut_lo >= hi:
        return [(lo, hi)]
    return [(a, b) for a, b in ((lo, cut_lo), (cut_hi, hi)) if a < b]


def validation_spans(kernel: Kernel, known: list[Span]) -> list[Span]:
    """Where pool may be when the region bookkeeping does not name both the nonpaged and the paged pool (its
    variables paged out, smeared or missing from the symbols): the rest of the kernel half of the address
    space, less the page tables' own window.  Only mapped pages are read, and only those that validate on
    their own are taken for pool."""
    if {"NonPaged", "Paged"} <= {span.pool for span in known}:
        return []
    pieces = [(regions.kernel_half_start(kernel), 1 << 64)]
    for start, end in [(span.start, span.end) for span in known] + _self_map(kernel):
        pieces = [part for lo, hi in pieces for part in subtract(lo, hi, start, end)]
    return [Span(lo, hi, "", classic.FOUND_BY_VALIDATION) for lo, hi in pieces]


def _self_map(kernel: Kernel) -> list[tuple[int, int]]:
    """The window where a four-level x64 kernel maps its own page tables: the top-level slot whose entry
    points back at the top-level table; nothing for other layers."""
    config = kernel.layer.config
    table, below = config.get("page_map_offset"), config.get("memory_layer")
    slot_bits = regions.DEFAULT_VA_BITS - 9
    try:
        entries = np.frombuffer(kernel.context.layers[below].read(table, 8 * 512), dtype="<u8")
    except (KeyError, TypeError, exceptions.InvalidAddressException):
        return []
    frames = entries & np.uint64(0x000F_FFFF_FFFF_F000)
    slots = np.flatnonzero((entries & np.uint64(1)).astype(bool) & (frames == np.uint64(table)))
    top = (1 << 64) - (1 << regions.DEFAULT_VA_BITS)
    return [(top + (int(slot) << slot_bits), top + ((int(slot) + 1) << slot_bits)) for slot in slots if slot >= 256]
