"""Classic pool pages: the PreviousSize/BlockSize chain of ``_POOL_HEADER`` s.

A classic pool page (Windows 7 to 10 1809, and session pool) is a chain of
chunks: each header's BlockSize (in pool blocks, one block being the size of
``_POOL_HEADER``) leads to the next header, whose PreviousSize must repeat
it; the first PreviousSize is 0 and the chain ends exactly at the page end.

The chain usually starts at the page start.  From Windows 8 on, a big
allocation below 64 KiB ends on a 16-byte boundary and ``ExpAllocateBigPool``
returns the rest of its last page to the pool: right after the big block's
end comes a 'Frag' chunk (BlockSize 2, PreviousSize 0, the QWORD after its
header holding the big block's size), then free space that later requests
split.  That page's chain starts at the big block's end, which the big page
table entry covering the page start tells; without the entry, a search for
the 'Frag' header whose recorded size ends the big block right there, and
whose chain ends exactly at the page end, finds it.

A broken link (PreviousSize not the previous BlockSize) is corruption: like
``!pool``, the walk reports it and walks on by BlockSize while the headers
stay plausible, so the chunks after it are still listed, marked as found
past the break.  A BlockSize of 0 or a chunk running past the page end ends
the walk.

``parse_page`` is pure (bytes in, chunks out) so the bulk scanner can run it
over pages it has already read; ``walk_page`` reads one page through the layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from volatility3.framework import exceptions

from . import bigpages, poolheader
from .kernel import Kernel
from .model import Backing, Chunk, Finding, State
from .poolheader import IN_USE_BIT, HeaderLayout
from .tags import printable_tag

FRAG_TAG = b"Frag"
FRAG_BLOCKS = 2
# What chunks of pages taken for pool on their own chain alone say (no region bookkeeping to go by).
FOUND_BY_VALIDATION = "found by page validation"


@dataclass(frozen=True)
class PageWalk:
    """The chunks of one classic pool page, in address order, and what broke the chain."""

    page: int
    chunks: tuple[Chunk, ...]
    findings: tuple[Finding, ...]
    broken_at: int | None = None  # the first header that broke the chain; chunks from there on lie past it

    @property
    def complete(self) -> bool:
        """True when the chain covered the page without a broken link."""
        return not self.findings

    def owner(self, address: int) -> Chunk | None:
        """The chunk whose [header, header + size) holds ``address``."""
        return next((chunk for chunk in self.chunks if chunk.contains(address)), None)

    def past_break(self, chunk: Chunk) -> bool:
        """Whether ``chunk`` was found by walking on after a broken link."""
        return self.broken_at is not None and chunk.address >= self.broken_at


def parse_page(data: bytes, page_address: int, layout: HeaderLayout, cookie: int | None = None,
               region_pool: str = "", start: int = 0) -> PageWalk:
    """Walk the chunk chain of one pool page given its bytes (the page is ``len(data)`` long).

    The chain starts at byte ``start`` of the page (see :func:`tail_start`).  A PreviousSize that breaks
    the chain is one finding at that header, and the walk goes on from it while headers are plausible; a
    BlockSize of 0 or a chunk running past the page end is a finding that ends it, and so does, silently,
    the first implausible header from the break on.
    ``cookie`` is ``ExpPoolQuotaCookie`` for decoding quota pointers; ``region_pool`` the pool of the
    region holding the page, which names free chunks (their header keeps no PoolType).
    """
    page_size = len(data)
    unit = layout.unit
    chunks: list[Chunk] = []
    findings: list[Finding] = []
    broken_at = None
    offset = start
    expected_previous = 0
    while offset < page_size:
        address = page_address + offset
        previous = layout.previous_size.extract(data, offset)
        blocks = layout.block_size.extract(data, offset)
        ending = _ending_problem(offset, blocks, unit, page_size)
        if ending:
            findings.append(Finding(address, ending))
            break
        if previous != expected_previous:
            findings.append(Finding(address, _link_problem(offset == start, previous, expected_previous, unit)))
            broken_at = address if broken_at is None else broken_at
            if not _plausible(data, offset, layout):
                break
        elif broken_at is not None and not _plausible(data, offset, layout):
            break
        chunks.append(_chunk(data, offset, address, layout, cookie, region_pool))
        expected_previous = blocks
        offset += blocks * unit
    return PageWalk(page_address, tuple(chunks), tuple(findings), broken_at)


def _ending_problem(offset: int, blocks: int, unit: int, page_size: int) -> str:
    """Why the walk cannot go past the header at ``offset``, or '' when it can."""
    if blocks == 0:
        return "BlockSize is 0"
    overrun = offset + blocks * unit - page_size
    if overrun > 0:
        return (
            f"chunk of size {blocks * unit:#x} runs {overrun:#x} bytes past the page end;"
            f" chunk sizes do not add up to the page size {page_size:#x}"
        )
    return ""


def _link_problem(first: bool, previous: int, expected: int, unit: int) -> str:
    if first:
        return f"first chunk has PreviousSize {previous * unit:#x}, expected 0"
    return f"PreviousSize {previous * unit:#x} does not match the previous chunk's size {expected * unit:#x}"


def _plausible(data: bytes, offset: int, layout: HeaderLayout) -> bool:
    """A header a walk past a break still trusts: free or marked in use, with a tag a driver could write."""
    pool_type = layout.pool_type.extract(data, offset)
    tag = data[offset + layout.pool_tag.offset : offset + layout.pool_tag.offset + layout.pool_tag.size]
    return (pool_type == 0 or bool(pool_type & IN_USE_BIT)) and printable_tag(tag)


def tail_start(data: bytes, layout: HeaderLayout, page_size: int, page_offset: int = 0) -> int | None:
    """Where the chain of a big allocation's last page starts, found from the page's bytes alone.

    Searches back from the page end for the 'Frag' header a big allocation leaves behind: PreviousSize 0,
    BlockSize 2, the recorded size of the big block ending exactly there, and a chain from it that ends
    exactly at the page end.  ``page_offset`` is where the page starts in ``data`` (a block of pages).
    """
    unit, tag = layout.unit, layout.pool_tag
    for offset in range(page_size - FRAG_BLOCKS * unit, 0, -unit):
        at = page_offset + offset
        if data[at + tag.offset : at + tag.offset + tag.size] != FRAG_TAG:
            continue
        if layout.previous_size.extract(data, at) or layout.block_size.extract(data, at) != FRAG_BLOCKS:
            continue
        recorded = int.from_bytes(data[at + unit : at + unit + 8], "little")
        if recorded % page_size != offset:
            continue
        walk = parse_page(data[page_offset : page_offset + page_size], 0, layout, start=offset)
        if walk.complete and walk.chunks and walk.chunks[-1].end == page_size:
            return offset
    return None


def _chunk(data: bytes, offset: int, address: int, layout: HeaderLayout, cookie: int | None,
           region_pool: str) -> Chunk:
    header = poolheader.decode(data, layout, offset)
    allocated = header.pool_type != 0
    return Chunk(
        address=address,
        size=header.block_size,
        previous_size=header.previous_size,
        tag=header.tag,
        state=State.ALLOCATED if allocated else State.FREE,
        backing=Backing.PAGE,
        pool=layout.pool_name(header.pool_type) if allocated else region_pool,
        pool_type=header.pool_type,
        body=address + layout.size if allocated else None,
        quota_process=poolheader.charged_process(header, address, layout, cookie) if allocated else None,
    )


def chain_start(kernel: Kernel, page: int) -> int:
    """Where the chain of ``page`` starts: past the end of a live big allocation covering the page start,
    when one ends inside the page, else at the page start."""
    big = bigpages.find_big(kernel, page)
    if big is not None and page < big.end < page + kernel.page_size:
        return big.end - page
    return 0


def walk_page(kernel: Kernel, page_address: int, region_pool: str = "") -> PageWalk:
    """Walk the classic pool page holding ``page_address`` (any address inside it); see :func:`parse_page`.

    A page whose chain does not start at the page start is a big allocation's last page: its chain starts
    where the big page table says the allocation ends, or where :func:`tail_start` finds it.
    """
    size = kernel.page_size
    page = page_address - page_address % size
    try:
        data = kernel.read(page, size)
    except exceptions.InvalidAddressException:
        return PageWalk(page, (), (Finding(page, "pool page is not readable"),))
    layout, cookie = poolheader.header_layout(kernel), poolheader.quota_cookie(kernel)
    walk = parse_page(data, page, layout, cookie, region_pool, chain_start(kernel, page))
    if walk.complete:
        return walk
    tail = tail_start(data, layout, size)
    if tail is None:
        return walk
    return parse_page(data, page, layout, cookie, region_pool, tail)
