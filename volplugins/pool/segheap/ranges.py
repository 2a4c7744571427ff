"""The range walk: every chunk of one busy page range, whatever backs it."""

from __future__ import annotations

from collections.abc import Iterator

from ..columns import Columns
from ..kernel import Kernel
from ..model import Chunk, Finding
from .chunks import Walk, whole_range
from .decoders import RangeKind
from .heaps import HeapKeys
from .layout import reports_missing_symbols
from .lfh import LfhSubsegment, lfh_decode, lfh_subsegment
from .segments import PageRange
from .vs import VsLinks, vs_follow_many, vs_list


Read = tuple[PageRange, bytes | None, frozenset[int]]  # a range, its bytes, and its pages that could not be read


@reports_missing_symbols
def range_chunks(
    kernel: Kernel,
    page_range: PageRange,
    keys: HeapKeys,
    cached: frozenset[int] = frozenset(),
    data: bytes | None = None,
    holes: frozenset[int] = frozenset(),
) -> Iterator[Chunk | Finding | Columns]:
    """Every chunk of one busy page range: its VS chunks, its LFH blocks, or the range itself; the chunks a
    plain header describes come as :class:`Columns` (a census counts them without a record each), the rest as
    records, then the findings.

    ``data`` is all of the range's bytes when the caller already read them in bulk (zeros on the pages in
    ``holes``, which could not be read), so a whole-heap walk reads each range once instead of page by page.
    Headerless blocks (page-aligned VS blocks, whole ranges) come back with an empty tag and no PoolType: the
    big page table names them.
    """
    yield from ranges_chunks(kernel, [(page_range, data, holes)], keys, cached)


@reports_missing_symbols
def ranges_chunks(kernel: Kernel, ranges: list[Read | Finding], keys: HeapKeys,
                  cached: frozenset[int] = frozenset()) -> Iterator[Chunk | Finding | Columns]:
    """:func:`range_chunks` of many busy page ranges of one heap, their VS chunks and LFH blocks decoded in one
    pass each at the end; findings (``ranges`` may hold some, met while finding the ranges) keep their order."""
    lfh: list[LfhSubsegment] = []
    walks: list[Walk | Finding] = []
    for entry in ranges:
        if entry.__class__ is Finding:
            walks.append(entry)
            continue
        page_range, data, holes = entry
        walk = Walk.of(kernel, page_range.segment.context.heap.pool, cached)
        if data is not None:
            walk.pages.preload_span(page_range.address, data, holes)
        walks.append(walk)
    vs_ranges = [(walk, entry[0].address) for entry, walk in zip(ranges, walks)
                 if walk.__class__ is not Finding and entry[0].kind is RangeKind.VS]
    followed_all = iter(vs_follow_many(vs_ranges, keys.heap_key))
    vs: list[VsLinks] = []
    for entry, walk in zip(ranges, walks):
        if walk.__class__ is Finding:
            yield walk
            continue
        page_range = entry[0]
        if page_range.kind is RangeKind.VS:
            followed = next(followed_all)
            if followed.__class__ is Finding:
                yield followed
            else:
                vs.append(followed)
                if followed.stop is not None:
                    yield followed.stop
        elif page_range.kind is RangeKind.LFH:
            found = lfh_subsegment(walk, page_range.address, keys.lfh_key, page_range.size)
            if found.__class__ is Finding:
                yield found
            else:
                lfh.append(found)
                yield from found.findings
        else:
            yield whole_range(walk, page_range)
    plain, chains = vs_list(vs)
    if plain is not None:
        yield plain
    yield from (item for chain in chains for item, _, _ in chain.general)
    decoded = lfh_decode(lfh)
    if decoded.plain is not None:
        yield decoded.plain
    yield from decoded.others
