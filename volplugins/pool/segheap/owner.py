"""Owner lookup on the segment heap: from any address to its segment, page range and the chunks of its page."""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from volatility3.framework import exceptions

from ..columns import Columns
from ..kernel import PAGE_SIZE, Kernel, page_base, per_kernel
from ..model import Chunk, Finding
from .chunks import Walk, whole_range
from .decoders import RangeKind
from .heaps import HeapKeys, PoolHeap, cached_free_addresses, heap_keys
from .layout import SYMBOLS_MISSING
from .lfh import LfhSubsegment, lfh_decode, lfh_subsegment
from .reads import read_field
from .segments import Descriptors, PageRange, Segment, range_of, read_descriptors, signature_owner
from .validation import listed, listed_contexts, segment_holding
from .vs import Extent, vs_follow_many, vs_list, vs_stopped


@dataclass(frozen=True)
class OwnerResult:
    """What ``!pool <address>`` shows on the segment heap: the page's chunks and the one holding the address."""

    address: int
    heap: PoolHeap | None = None
    segment: Segment | None = None
    page_range: PageRange | None = None
    chunks: tuple[Chunk, ...] = ()
    owner: Chunk | None = None
    findings: tuple[Finding, ...] = ()
    validated: bool = False  # the segment is on no heap list: found by its own signature


@per_kernel
def _masks(kernel: Kernel) -> tuple[int, ...]:
    return tuple(sorted({context.segment_mask for context in listed_contexts(kernel).values()}))


def _owning_segment(kernel: Kernel, address: int, heap_key: int) -> Segment | None:
    """The segment holding ``address`` whose signature names one of the listed contexts, else a segment found by
    its signature alone when the heap lists are incomplete."""
    for mask in _masks(kernel):
        found = _segment_at(kernel, address & mask, mask, heap_key)
        if found is not None:
            return found
    return segment_holding(kernel, address)


@per_kernel
def _segment_at(kernel: Kernel, segment: int, mask: int, heap_key: int) -> Segment | None:
    """The segment at ``segment`` when its signature names a pool heap context of that segment size; the answer
    is the same for every address of the segment."""
    signature = read_field(kernel, segment, "_HEAP_PAGE_SEGMENT", "Signature")
    if signature is None:
        return None
    context = signature_owner(signature, segment, heap_key, listed_contexts(kernel))
    if context is not None and context.segment_mask == mask:
        return Segment(segment, context)
    return None


@per_kernel
def _descriptors(kernel: Kernel, segment: Segment) -> Descriptors | Finding:
    """A segment's page range descriptors, kept for the next lookup in the same segment."""
    return read_descriptors(kernel, segment)


class _RangeItems:
    """Every chunk of a VS or LFH range with its extent, in address order, and the range's findings; indexed so
    that a lookup finds its page's chunks and its holder by bisection.  Chunks decoded as columns become
    records only when a lookup lands in the range."""

    def __init__(self, plain: Columns | None, rows: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                 others: list[Extent], findings: list[Finding]):
        self._plain, self._rows = plain, rows
        self._made: list[Chunk] | None = None
        self._others = [item for item, _, _ in others]
        addresses = plain.address[rows] if plain is not None else np.zeros(0, dtype=np.uint64)
        addresses = np.concatenate([addresses, np.array([item.address for item in self._others], dtype=np.uint64)])
        starts = np.concatenate([starts, np.array([start for _, start, _ in others], dtype=np.uint64)])
        ends = np.concatenate([ends, np.array([end for _, _, end in others], dtype=np.uint64)])
        order = np.argsort(starts, kind="stable")
        self._order = order.tolist()
        self.addresses, self.starts, self.ends = addresses[order].tolist(), starts[order].tolist(), ends[order].tolist()
        self.findings = findings

    def around(self, address: int) -> tuple[list[Chunk], Chunk | None]:
        """The chunks listed in ``address``'s page, plus the one whose extent holds it (which it also returns),
        in address order."""
        listed = self._listed()
        page = page_base(address)
        first = bisect.bisect_left(self.addresses, page)
        last = bisect.bisect_left(self.addresses, page + PAGE_SIZE)
        holder = bisect.bisect_right(self.starts, address) - 1
        if holder < 0 or address >= self.ends[holder]:
            return listed[first:last], None
        if holder < first:
            return [listed[holder], *listed[first:last]], listed[holder]
        if holder >= last:
            return [*listed[first:last], listed[holder]], listed[holder]
        return listed[first:last], listed[holder]

    def holder(self, address: int) -> Chunk | None:
        """The chunk whose extent holds ``address``, made alone when the range's chunks are not made yet."""
        position = bisect.bisect_right(self.starts, address) - 1
        if position < 0 or address >= self.ends[position]:
            return None
        if self._made is not None:
            return self._made[position]
        source = self._order[position]
        if source >= len(self._rows):
            return self._others[source - len(self._rows)]
        return self._plain.chunks(self._rows[source : source + 1])[0]

    def _listed(self) -> list[Chunk]:
        """The chunks in address order, made at the first lookup that lands in the range."""
        if self._made is None:
            plain = self._plain.chunks(self._rows) if self._plain is not None else []
            self._made = [plain[source] if source < len(plain) else self._others[source - len(plain)]
                          for source in self._order]
        return self._made


_Walked = dict[tuple[PageRange, HeapKeys, frozenset[int]], _RangeItems]


@per_kernel
def _walked(kernel: Kernel) -> _Walked:
    """The VS and LFH ranges walked so far: lookups of many addresses (an address file) mostly land in ranges
    an earlier one walked."""
    return {}


def _range_walk(kernel: Kernel, page_range: PageRange, keys: HeapKeys, cached: frozenset[int]) -> _RangeItems:
    walked = _walked(kernel)
    if (page_range, keys, cached) not in walked:
        walked.update(_walk_ranges(kernel, [page_range], keys, cached))
    return walked[(page_range, keys, cached)]


def _walk_ranges(kernel: Kernel, ranges: list[PageRange], keys: HeapKeys, cached: frozenset[int]) -> _Walked:
    """The items of VS and LFH ranges of one heap, each range read in bulk, the LFH blocks of all decoded in
    one pass."""
    walked: _Walked = {}
    lfh: list[tuple[PageRange, LfhSubsegment | Finding]] = []
    vs_walks: list[tuple[PageRange, Walk]] = []
    for page_range in sorted(ranges, key=lambda found: found.address):
        walk = Walk.of(kernel, page_range.segment.context.heap.pool, cached)
        data, missing = kernel.read_table(page_range.address, page_range.size)
        if not missing:
            walk.pages.preload_span(page_range.address, data)
        if page_range.kind is RangeKind.VS:
            vs_walks.append((page_range, walk))
        else:
            lfh.append((page_range, lfh_subsegment(walk, page_range.address, keys.lfh_key, page_range.size)))
    followed_all = vs_follow_many([(walk, page_range.address) for page_range, walk in vs_walks], keys.heap_key)
    vs = [(page_range, followed) for (page_range, _), followed in zip(vs_walks, followed_all)]
    _, chains = vs_list([followed for _, followed in vs if followed.__class__ is not Finding])
    chains.reverse()
    for page_range, followed in vs:
        chain = vs_stopped(followed) if followed.__class__ is Finding else chains.pop()
        walked[(page_range, keys, cached)] = _RangeItems(chain.plain, chain.rows, chain.starts[chain.rows],
                                                         chain.ends[chain.rows], chain.general,
                                                         [chain.stop] if chain.stop else [])
    decoded = lfh_decode([found for _, found in lfh if found.__class__ is LfhSubsegment])
    addresses = decoded.plain.address if decoded.plain is not None else np.zeros(0, dtype=np.uint64)
    for page_range, found in lfh:
        start, end = page_range.address, page_range.address + page_range.size
        rows = np.arange(*np.searchsorted(addresses, np.array([start, end], dtype=np.uint64)))
        others = [(block, block.address, block.end) for block in decoded.others if start <= block.address < end]
        findings = [found] if found.__class__ is Finding else list(found.findings)
        walked[(page_range, keys, cached)] = _RangeItems(decoded.plain, rows, addresses[rows],
                                                         addresses[rows] + decoded.plain.size[rows].astype(np.uint64)
                                                         if decoded.plain is not None else addresses[rows],
                                                         others, findings)
    return walked


def prepare_lookups(kernel: Kernel, addresses: Iterable[int]) -> None:
    """Walk the VS and LFH ranges holding any of ``addresses`` before they are looked up, the ranges of one
    segment together (their LFH blocks in one pass): many lookups then cost one walk of what they touch.

    Lookups answer the same with or without this; a segment whose walk fails here is left to them.
    """
    keys = heap_keys(kernel)
    if isinstance(keys, Finding):
        return
    cached = cached_free_addresses(kernel)
    walked = _walked(kernel)
    pending: dict[Segment, dict[int, PageRange]] = {}
    for address in sorted(set(addresses)):
        try:
            segment = _owning_segment(kernel, address, keys.heap_key)
            descriptors = None if segment is None else _descriptors(kernel, segment)
            if descriptors is None or isinstance(descriptors, Finding):
                continue
            page_range = range_of(segment, descriptors, address)
        except SYMBOLS_MISSING:
            return
        if isinstance(page_range, PageRange) and page_range.kind is not RangeKind.LARGE \
                and (page_range, keys, cached) not in walked:
            pending.setdefault(segment, {})[page_range.address] = page_range
    for ranges in pending.values():
        try:
            walked.update(_walk_ranges(kernel, list(ranges.values()), keys, cached))
        except (*SYMBOLS_MISSING, exceptions.InvalidAddressException):
            continue


def find_owner_chunks(kernel: Kernel, address: int, cached: frozenset[int] | None = None,
                      listing: bool = True) -> OwnerResult:
    """Segment -> page range -> the chunks listed in ``address``'s page, marking the one that holds it.

    VS: every chunk whose listed address is in the page, plus the chunk whose VS extent holds the address
    (its header may sit on an earlier page). LFH: the blocks of the page. A range allocated as a whole is one
    chunk with no header (its tag lives in the big page table). ``cached`` defaults to
    ``cached_free_addresses(kernel)``; without ``listing`` the chunks are the owner alone.
    """
    try:
        return _find_owner_chunks(kernel, address, cached, listing)
    except SYMBOLS_MISSING as error:
        return OwnerResult(address, findings=(Finding(address, f"segment heap owner: kernel symbols lack {error}"),))


def _find_owner_chunks(kernel: Kernel, address: int, cached: frozenset[int] | None, listing: bool) -> OwnerResult:
    keys = heap_keys(kernel)
    if isinstance(keys, Finding):
        return OwnerResult(address, findings=(keys,))
    segment = _owning_segment(kernel, address, keys.heap_key)
    if segment is None:
        return OwnerResult(address, findings=(Finding(address, "not inside a pool segment heap segment"),))
    heap = segment.context.heap
    validated = segment.address not in listed(kernel).segments
    descriptors = _descriptors(kernel, segment)
    if isinstance(descriptors, Finding):
        return OwnerResult(address, heap, segment, findings=(descriptors,), validated=validated)
    page_range = range_of(segment, descriptors, address)
    if isinstance(page_range, Finding):
        return OwnerResult(address, heap, segment, findings=(page_range,), validated=validated)
    cached = cached_free_addresses(kernel) if cached is None else cached
    if page_range.kind is RangeKind.LARGE:
        owner = whole_range(Walk.of(kernel, heap.pool, cached), page_range)
        return OwnerResult(address, heap, segment, page_range, (owner,), owner, validated=validated)
    items = _range_walk(kernel, page_range, keys, cached)
    if listing:
        chunks, owner = items.around(address)
    else:
        owner = items.holder(address)
        chunks = [owner] if owner is not None else []
    return OwnerResult(address, heap, segment, page_range, tuple(chunks), owner, tuple(items.findings), validated)
