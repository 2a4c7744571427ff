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
from functools import lru_cache

from volatility3.framework import exceptions

from .kernel import FieldLayout, Kernel
from .model import Backing, Chunk, Finding, State

# POOL_TYPE bits as the header keeps them (the header holds the requested
# POOL_TYPE's low byte with the in-use bit set, 0 meaning free).  The paged
# and session bits are read from the ISF's _POOL_TYPE enum when it has them;
# these are the wdm.h values for the enum-less case.  The quota bit
# (POOL_QUOTA_FAIL_INSTEAD_OF_RAISE) is a wdm.h define that no ISF carries.
_PAGED_BIT = 1
_SESSION_BIT = 0x20
QUOTA_BIT = 8


@dataclass(frozen=True)
class HeaderLayout:
    """Where a build keeps the ``_POOL_HEADER`` fields, and how it encodes quota pointers.

    ``size`` is both the header size and the pool block unit (16 on x64, 8 on x86).
    ``quota_encoded`` is true when the kernel has ``ExpPoolQuotaCookie``
    (Windows 8 and later): ProcessBilled is then header ^ cookie ^ EPROCESS;
    Windows 7 stores the EPROCESS pointer as is.
    """

    size: int
    previous_size: FieldLayout
    block_size: FieldLayout
    pool_type: FieldLayout
    pool_tag: FieldLayout
    process_billed: FieldLayout
    quota_encoded: bool
    paged_bit: int = _PAGED_BIT
    session_bit: int = _SESSION_BIT

    @property
    def unit(self) -> int:
        return self.size

    def pool_name(self, pool_type: int) -> str:
        """The pool an allocated chunk came from, from its header PoolType ('' for free chunks)."""
        if pool_type == 0:
            return ""
        if pool_type & self.session_bit:
            return "Session"
        return "Paged" if pool_type & self.paged_bit else "NonPaged"


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


@lru_cache(maxsize=8)
def header_layout(kernel: Kernel) -> HeaderLayout:
    """The ``_POOL_HEADER`` layout of this kernel, from its ISF (built once per kernel)."""

    def field(name: str) -> FieldLayout:
        return kernel.field_layout("_POOL_HEADER", name)

    bits = _pool_type_bits(kernel)
    return HeaderLayout(
        size=kernel.type_size("_POOL_HEADER"),
        previous_size=field("PreviousSize"),
        block_size=field("BlockSize"),
        pool_type=field("PoolType"),
        pool_tag=field("PoolTag"),
        process_billed=field("ProcessBilled"),
        quota_encoded=kernel.has_symbol("ExpPoolQuotaCookie"),
        paged_bit=bits.get("PagedPool", _PAGED_BIT),
        session_bit=bits.get("NonPagedPoolSession", _SESSION_BIT),
    )


def _pool_type_bits(kernel: Kernel) -> dict[str, int]:
    try:
        return dict(kernel.module.get_enumeration("_POOL_TYPE").choices)
    except exceptions.SymbolError:
        return {}


def decode_quota(raw: int, header_address: int, layout: HeaderLayout, cookie: int | None) -> int | None:
    """The EPROCESS charged for a quota chunk, or None when it cannot be told.

    Pure: ``cookie`` is the value of ``ExpPoolQuotaCookie`` (ignored when the
    build stores plain pointers).  A result that is not an aligned kernel-half
    address is treated as undecodable rather than reported as a process.
    """
    if raw == 0:
        return None
    if layout.quota_encoded:
        if cookie is None:
            return None
        raw ^= cookie ^ header_address
    mask = (1 << (layout.process_billed.size * 8)) - 1
    value = raw & mask
    kernel_half = value >> (layout.process_billed.size * 8 - 1)
    return value if kernel_half and value % 8 == 0 else None


@lru_cache(maxsize=8)
def quota_cookie(kernel: Kernel) -> int | None:
    """``ExpPoolQuotaCookie`` when the build has one and it is readable (read once per kernel)."""
    if not kernel.has_symbol("ExpPoolQuotaCookie"):
        return None
    try:
        return kernel.read_pointer(kernel.symbol_address("ExpPoolQuotaCookie"))
    except exceptions.InvalidAddressException:
        return None


def decode_process_billed(kernel: Kernel, header_address: int, raw_value: int) -> int | None:
    """The EPROCESS address a quota-charged chunk's ProcessBilled stands for, or None."""
    return decode_quota(raw_value, header_address, header_layout(kernel), quota_cookie(kernel))


def parse_page(data: bytes, page_address: int, layout: HeaderLayout, cookie: int | None = None) -> PageWalk:
    """Walk the chunk chain of one pool page given its bytes (the page is ``len(data)`` long).

    Stops at the first broken link (first PreviousSize not 0, PreviousSize not
    the previous BlockSize, BlockSize 0, chunk running past the page end) with
    exactly one finding at that header; the chunks before it are returned.
    ``cookie`` is ``ExpPoolQuotaCookie`` for decoding quota pointers.
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
        chunks.append(_chunk(data, offset, address, layout, cookie))
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


def _chunk(data: bytes, offset: int, address: int, layout: HeaderLayout, cookie: int | None) -> Chunk:
    pool_type = layout.pool_type.extract(data, offset)
    allocated = pool_type != 0
    quota_process = None
    if allocated and pool_type & QUOTA_BIT:
        raw = layout.process_billed.extract(data, offset)
        quota_process = decode_quota(raw, address, layout, cookie)
    return Chunk(
        address=address,
        size=layout.block_size.extract(data, offset) * layout.unit,
        previous_size=layout.previous_size.extract(data, offset) * layout.unit,
        tag=layout.pool_tag.extract(data, offset).to_bytes(layout.pool_tag.size, "little"),
        state=State.ALLOCATED if allocated else State.FREE,
        backing=Backing.PAGE,
        pool=layout.pool_name(pool_type),
        pool_type=pool_type,
        body=address + layout.size if allocated else None,
        quota_process=quota_process,
    )


def walk_page(kernel: Kernel, page_address: int) -> PageWalk:
    """Walk the classic pool page holding ``page_address`` (any address inside it)."""
    size = kernel.page_size
    page = page_address - page_address % size
    try:
        data = kernel.read(page, size)
    except exceptions.InvalidAddressException:
        return PageWalk(page, (), (Finding(page, "pool page is not readable"),))
    return parse_page(data, page, header_layout(kernel), quota_cookie(kernel))
