"""The range walk: every chunk of one busy page range, whatever backs it."""

from __future__ import annotations

from collections.abc import Iterator

from ..kernel import Kernel
from ..model import Chunk, Finding
from .chunks import Walk, whole_range
from .decoders import RangeKind
from .heaps import HeapKeys
from .layout import reports_missing_symbols
from .lfh import lfh_walk
from .segments import PageRange
from .vs import vs_walk


@reports_missing_symbols
def range_chunks(
    kernel: Kernel,
    page_range: PageRange,
    keys: HeapKeys,
    cached: frozenset[int] = frozenset(),
    pages: dict[int, bytes | None] | None = None,
    data: bytes | None = None,
) -> Iterator[Chunk | Finding]:
    """Every chunk of one busy page range in address order: its VS chunks, its LFH blocks, or the range itself.

    ``pages`` are the range's pages when the caller already read them in bulk (None for an unreadable page),
    or ``data`` all of its bytes when it read them in one piece, so a whole-heap walk reads each range once
    instead of page by page.  Headerless blocks (page-aligned VS blocks, whole ranges) come back with an
    empty tag and no PoolType: the big page table names them.
    """
    walk = Walk.of(kernel, page_range.segment.context.heap.pool, cached)
    if pages:
        walk.pages.preload(pages)
    if data:
        walk.pages.preload_span(page_range.address, data)
    if page_range.kind is RangeKind.VS:
        for item, _, _ in vs_walk(walk, page_range.address, keys.heap_key):
            yield item
    elif page_range.kind is RangeKind.LFH:
        yield from lfh_walk(walk, page_range.address, keys.lfh_key, page_range.size)
    else:
        yield whole_range(walk, page_range)
