"""Classic pool pages: the PreviousSize/BlockSize chain of ``_POOL_HEADER`` s.

A classic pool page (Windows 7 to 10 1809, and session pool) is a chain of
chunks from the page start: each header's BlockSize (in pool blocks, one
block being the size of ``_POOL_HEADER``) leads to the next header, whose
PreviousSize must repeat it; the first PreviousSize is 0 and the sizes add up
to the page.  A broken link is corruption: like ``!pool``, the walk reports
it and lists only what precedes it, since nothing after it can be trusted.

``parse_page`` is pure (bytes in, chunks out) so the bulk scanner can run it
over pages it has already read; ``walk_page`` reads one page through the layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from volatility3.framework import exceptions

from . import poolheader
from .kernel import Kernel
from .model import Backing, Chunk, Finding, State
from .poolheader import HeaderLayout


@dataclass(frozen=True)
class PageWalk:
    """The chunks of one classic pool page, in address order, and what broke the chain."""

    page: int
    chunks: tuple[Chunk, ...]
    findings: tuple[Finding, ...]

    @property
    def complete(self) -> bool:
        """True when the chain covered the whole page without a broken link."""
        return not self.findings

    def owner(self, address: int) -> Chunk | None:
        """The chunk whose [header, header + size) holds ``address``."""
        return next((chunk for chunk in self.chunks if chunk.contains(address)), None)


def parse_page(data: bytes, page_address: int, layout: HeaderLayout, cookie: int | None = None,
               region_pool: str = "") -> PageWalk:
    """Walk the chunk chain of one pool page given its bytes (the page is ``len(data)`` long).

    Stops at the first broken link (first PreviousSize not 0, PreviousSize not
    the previous BlockSize, BlockSize 0, chunk running past the page end) with
    exactly one finding at that header; the chunks before it are returned.
    ``cookie`` is ``ExpPoolQuotaCookie`` for decoding quota pointers; ``region_pool`` the pool of the
    region holding the page, which names free chunks (their header keeps no PoolType).
    """
    page_size = len(data)
    unit = layout.unit
    chunks: list[Chunk] = []
    offset = 0
    expected_previous = 0
    while offset < page_size:
        address = page_address + offset
        previous = layout.previous_size.extract(data, offset)
        blocks = layout.block_size.extract(data, offset)
        problem = _link_problem(offset, previous, expected_previous, blocks, unit, page_size)
        if problem:
            return PageWalk(page_address, tuple(chunks), (Finding(address, problem),))
        chunks.append(_chunk(data, offset, address, layout, cookie, region_pool))
        expected_previous = blocks
        offset += blocks * unit
    return PageWalk(page_address, tuple(chunks), ())


def _link_problem(offset: int, previous: int, expected: int, blocks: int, unit: int, page_size: int) -> str:
    """Why the header at ``offset`` breaks the chain, or '' when it fits."""
    if offset == 0 and previous != 0:
        return f"first chunk has PreviousSize {previous * unit:#x}, expected 0"
    if previous != expected:
        return f"PreviousSize {previous * unit:#x} does not match the previous chunk's size {expected * unit:#x}"
    if blocks == 0:
        return "BlockSize is 0"
    overrun = offset + blocks * unit - page_size
    if overrun > 0:
        return (
            f"chunk of size {blocks * unit:#x} runs {overrun:#x} bytes past the page end;"
            f" chunk sizes do not add up to the page size {page_size:#x}"
        )
    return ""


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


def walk_page(kernel: Kernel, page_address: int, region_pool: str = "") -> PageWalk:
    """Walk the classic pool page holding ``page_address`` (any address inside it); see :func:`parse_page`."""
    size = kernel.page_size
    page = page_address - page_address % size
    try:
        data = kernel.read(page, size)
    except exceptions.InvalidAddressException:
        return PageWalk(page, (), (Finding(page, "pool page is not readable"),))
    return parse_page(data, page, poolheader.header_layout(kernel), poolheader.quota_cookie(kernel), region_pool)
