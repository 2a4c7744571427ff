"""Python's cyclic garbage collector during a plugin's rows.

A census or a batch of lookups makes hundreds of thousands of small objects (records, rows, cells) that all
live until the renderer is done with them.  With the collector's default thresholds every 700 new objects start
a collection, and every tenth or hundredth of those scans everything alive: the symbol tables Volatility loaded
and every row made so far.  A 10,000-address listing spent a quarter of its time there.  While rows are made,
the objects that existed before are set aside (``gc.freeze``) and collections come less often; cycles are still
collected, and everything is put back when the rows end.
"""

from __future__ import annotations

import gc
from collections.abc import Iterable, Iterator
from typing import TypeVar

ROWS_THRESHOLDS = (50_000, 20, 20)  # new objects before a young collection; young, then middle, ones per older

Row = TypeVar("Row")


class _Policy:
    """The collector's settings while any rows are being made: set when the first rows start, put back when the
    last end (rows of two plugins may be drawn in turns)."""

    def __init__(self):
        self.active = 0
        self.thresholds = gc.get_threshold()
        self.froze = False

    def enter(self) -> None:
        if not self.active:
            self.thresholds = gc.get_threshold()
            self.froze = gc.get_freeze_count() == 0
            if self.froze:
                gc.freeze()
            gc.set_threshold(*ROWS_THRESHOLDS)
        self.active += 1

    def leave(self) -> None:
        self.active -= 1
        if not self.active:
            gc.set_threshold(*self.thresholds)
            if self.froze:
                gc.unfreeze()


_POLICY = _Policy()


def fewer_collections(rows: Iterable[Row]) -> Iterator[Row]:
    """``rows`` as they are, made while the collector runs rarely and leaves older objects alone; as it was once
    the rows end or are abandoned."""
    _POLICY.enter()
    try:
        yield from rows
    finally:
        _POLICY.leave()
