"""The ``_POOL_HEADER`` in front of every small pool block, on classic pool pages and on the segment heap.

Its fields come from the kernel's ISF: builds declare the same bytes differently (one bitfield ULONG on
Windows 7, USHORT bitfields later), so :class:`HeaderLayout` keeps where each field lives and
:func:`decode` reads a header from bytes with it.  Sizes are kept in pool blocks (one block being the size
of the header: 16 bytes on x64) and decoded to bytes.

PoolType is the requested ``POOL_TYPE``'s low bits with the in-use bit set (0 meaning free).  A quota
charge keeps the charged process in ProcessBilled: as it is on Windows 7, XORed with the header's
address and ``ExpPoolQuotaCookie`` from Windows 8 on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np
from volatility3.framework import exceptions

from .kernel import MASK64, SYMBOLS_MISSING, FieldLayout, Fields, Kernel, per_kernel

# The quota bit (POOL_QUOTA_FAIL_INSTEAD_OF_RAISE) and the in-use bit are wdm.h / pool defines no ISF
# carries; the other bits come from the ISF's _POOL_TYPE enum, with these wdm.h values when it lacks them.
QUOTA_BIT = 0x8
IN_USE_BIT = 0x2
_POOL_TYPE_DEFAULTS = {"PagedPool": 0x1, "NonPagedPoolCacheAligned": 0x4, "NonPagedPoolSession": 0x20,
                       "NonPagedPoolNx": 0x200}


class Symbols(Protocol):
    """What a layout is built from: a :class:`Kernel`, or :class:`kernel.IsfTypes` over an ISF file."""

    def field_layout(self, type_name: str, field: str) -> FieldLayout: ...

    def type_size(self, name: str) -> int: ...

    def has_symbol(self, name: str) -> bool: ...

    def enumeration(self, name: str) -> dict[str, int]: ...


@dataclass(frozen=True)
class HeaderLayout:
    """Where a build keeps the ``_POOL_HEADER`` fields, and how it encodes quota pointers.

    ``size`` is both the header size and the pool block unit (16 on x64, 8 on x86).
    ``quota_encoded`` is true when the kernel has ``ExpPoolQuotaCookie`` (Windows 8 and later).
    ``process_billed`` is None where the header has no such field (x86 keeps quota elsewhere).
    """

    size: int
    previous_size: FieldLayout
    pool_index: FieldLayout
    block_size: FieldLayout
    pool_type: FieldLayout
    pool_tag: FieldLayout
    process_billed: FieldLayout | None
    quota_encoded: bool
    paged_bit: int = _POOL_TYPE_DEFAULTS["PagedPool"]
    session_bit: int = _POOL_TYPE_DEFAULTS["NonPagedPoolSession"]
    cache_aligned_bit: int = _POOL_TYPE_DEFAULTS["NonPagedPoolCacheAligned"]
    nx_bit: int = _POOL_TYPE_DEFAULTS["NonPagedPoolNx"]

    @classmethod
    def from_symbols(cls, symbols: Symbols) -> "HeaderLayout":
        def field(name: str) -> FieldLayout:
            return symbols.field_layout("_POOL_HEADER", name)

        try:
            billed: FieldLayout | None = field("ProcessBilled")
        except SYMBOLS_MISSING:
            billed = None
        bits = {**_POOL_TYPE_DEFAULTS, **symbols.enumeration("_POOL_TYPE")}
        return cls(
            size=symbols.type_size("_POOL_HEADER"),
            previous_size=field("PreviousSize"),
            pool_index=field("PoolIndex"),
            block_size=field("BlockSize"),
            pool_type=field("PoolType"),
            pool_tag=field("PoolTag"),
            process_billed=billed,
            quota_encoded=symbols.has_symbol("ExpPoolQuotaCookie"),
            paged_bit=bits["PagedPool"],
            session_bit=bits["NonPagedPoolSession"],
            cache_aligned_bit=bits["NonPagedPoolCacheAligned"],
            nx_bit=bits["NonPagedPoolNx"],
        )

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


class PoolHeader(NamedTuple):
    """A decoded ``_POOL_HEADER``; sizes in bytes, ProcessBilled as stored (see :func:`decode_quota`)."""

    previous_size: int
    pool_index: int
    block_size: int
    pool_type: int
    tag: bytes
    process_billed: int | None


def decode(data: bytes, layout: HeaderLayout, base: int = 0) -> PoolHeader:
    """The header at ``data[base]``: one integer conversion, every field taken from it."""
    unit, tag, billed = layout.size, layout.pool_tag, layout.process_billed
    header = int.from_bytes(data[base : base + unit], "little")
    return PoolHeader(
        layout.previous_size.of(header) * unit,
        layout.pool_index.of(header),
        layout.block_size.of(header) * unit,
        layout.pool_type.of(header),
        bytes(data[base + tag.offset : base + tag.offset + tag.size]),
        billed.of(header) if billed is not None else None,
    )


def decode_quota(raw: int | None, header_address: int, layout: HeaderLayout, cookie: int | None) -> int | None:
    """The EPROCESS a quota chunk's ProcessBilled ``raw`` stands for, or None when it cannot be told.

    Pure: ``cookie`` is the value of ``ExpPoolQuotaCookie`` (ignored when the build stores plain pointers).
    A result that is not an aligned kernel-half address is treated as undecodable rather than reported
    as a process.
    """
    if not raw or layout.process_billed is None:
        return None
    if layout.quota_encoded:
        if cookie is None:
            return None
        raw ^= cookie ^ header_address
    bits = layout.process_billed.size * 8
    value = raw & ((1 << bits) - 1)
    return value if value >> (bits - 1) and value % 8 == 0 else None


def quota_column(raw: np.ndarray, header_addresses: np.ndarray, pool_types: np.ndarray, layout: HeaderLayout,
                 cookie: int | None) -> np.ndarray:
    """:func:`charged_process` of many headers at once (``raw``: their ProcessBilled as stored), 0 where none is
    charged or it cannot be told."""
    raw, none = raw.astype(np.uint64), np.zeros(len(raw), dtype=np.uint64)
    if layout.process_billed is None or (layout.quota_encoded and cookie is None):
        return none
    value = raw ^ np.uint64(cookie & MASK64) ^ header_addresses.astype(np.uint64) if layout.quota_encoded else raw
    bits = layout.process_billed.size * 8
    value &= np.uint64((1 << bits) - 1)
    told = (raw != 0) & ((pool_types.astype(np.uint64) & np.uint64(QUOTA_BIT)) != 0)
    told &= ((value >> np.uint64(bits - 1)) != 0) & (value % np.uint64(8) == 0)
    return np.where(told, value, none)


def charged_processes(fields: Fields, positions: np.ndarray, addresses: np.ndarray, pool_types: np.ndarray,
                      layout: HeaderLayout, cookie: int | None) -> np.ndarray | None:
    """:func:`quota_column` of the pool headers at ``positions`` of ``fields`` (at ``addresses``; ``pool_types``:
    0 for a free chunk); None when no header has the quota bit."""
    if layout.process_billed is None or not (pool_types.astype(np.uint64) & np.uint64(QUOTA_BIT)).any():
        return None
    return quota_column(fields.field(positions, layout.process_billed), addresses, pool_types, layout, cookie)


def charged_process(header: PoolHeader, header_address: int, layout: HeaderLayout, cookie: int | None) -> int | None:
    """The EPROCESS an allocation's quota was charged to, when its PoolType has the quota bit."""
    if not header.pool_type & QUOTA_BIT:
        return None
    return decode_quota(header.process_billed, header_address, layout, cookie)


@per_kernel
def header_layout(kernel: Kernel) -> HeaderLayout:
    """The ``_POOL_HEADER`` layout of this kernel, from its ISF (built once per kernel)."""
    layout = HeaderLayout.from_symbols(kernel)
    if layout.process_billed is None:
        kernel.lacks("_POOL_HEADER.ProcessBilled", "quota charges are not decoded")
    return layout


@per_kernel
def quota_cookie(kernel: Kernel) -> int | None:
    """``ExpPoolQuotaCookie`` when the build has one and it is readable (read once per kernel)."""
    if not kernel.has_symbol("ExpPoolQuotaCookie"):
        return None
    try:
        return kernel.read_pointer(kernel.symbol_address("ExpPoolQuotaCookie"))
    except exceptions.InvalidAddressException:
        return None
