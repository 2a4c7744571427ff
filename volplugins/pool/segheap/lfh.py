"""LFH subsegments: BlockCount slots of one size, their state in a two-bit-per-block bitmap."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from .. import poolheader
from ..columns import ALLOCATED, CACHED_FREE, FREE, NO_BODY, Columns, columns
from ..kernel import PAGE_SIZE, Fields, Kernel
from ..model import Backing, Chunk, Finding
from .chunks import Decoded, Walk, cached_rows, pool_chunk
from .decoders import decode_lfh_offsets
from .layout import SegHeapLayout, reports_missing_symbols


def lfh_walk(walk: Walk, subsegment: int, lfh_key: int, range_size: int | None = None) -> Iterator[Chunk | Finding]:
    """The blocks of the LFH subsegment at ``subsegment`` in address order, then the findings."""
    found = lfh_subsegment(walk, subsegment, lfh_key, range_size)
    if found.__class__ is Finding:
        yield found
        return
    yield from lfh_decode([found]).items()
    yield from found.findings


@dataclass(frozen=True)
class LfhSubsegment:
    """What the header of one LFH subsegment says, and the bytes its blocks are decoded from."""

    walk: Walk
    address: int
    block_size: int
    first: int  # FirstBlockOffset
    usable: int  # slots that end inside the page range
    bitmap: bytes
    findings: tuple[Finding, ...]


def lfh_subsegment(walk: Walk, subsegment: int, lfh_key: int, range_size: int | None = None) -> LfhSubsegment | Finding:
    """The header of the LFH subsegment at ``subsegment``: block size, first block, block bitmap."""
    sub_type = "_HEAP_LFH_SUBSEGMENT"
    encoded = walk.field(subsegment, sub_type, "BlockOffsets.EncodedData")
    count = walk.field(subsegment, sub_type, "BlockCount")
    if encoded is None or count is None:
        return Finding(subsegment, "LFH subsegment header unreadable")
    bitmap_offset = walk.kernel.field_offset(sub_type, "BlockBitmap")
    decoded = plausible_lfh_offsets(encoded, lfh_key, subsegment, walk.layout, bitmap_offset, count, range_size)
    if decoded is None:
        return Finding(subsegment, "LFH BlockOffsets do not decode to a usable block size and first offset")
    block_size, first = decoded
    bitmap = walk.pages.read(subsegment + bitmap_offset, (count * 2 + 7) // 8)
    if bitmap is None:
        return Finding(subsegment + bitmap_offset, "LFH block bitmap unreadable")
    usable = count
    findings: tuple[Finding, ...] = ()
    if range_size:
        usable = min(count, max(0, (range_size - first) // block_size))  # slots that end inside the range
        if usable < count:
            end = subsegment + range_size
            findings = (Finding(subsegment + first + usable * block_size,
                                f"LFH BlockCount {count} runs past the page range end {end:#x}"),)
    return LfhSubsegment(walk, subsegment, block_size, first, usable, bitmap, findings)


def lfh_decode(subsegments: list[LfhSubsegment]) -> Decoded:
    """The blocks of many LFH subsegments of one heap at once, the plain ones as columns: a heap's LFH
    subsegments hold a few dozen blocks each, too few to pay for a pass of their own.  (Their findings are
    the subsegments' own: see :class:`LfhSubsegment`.)"""
    if not subsegments:
        return Decoded(None, [])
    owner, offsets, allocated = _lfh_slots(subsegments)
    plain, others = _lfh_blocks_at(subsegments, owner, offsets, allocated)
    return Decoded(plain, others)


def _lfh_slots(subsegments: list[LfhSubsegment]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every slot that can hold a block: its subsegment (index), its offset from the subsegment and its bitmap
    state, for all slots of all subsegments at once.

    Slots keep a uniform stride (their index is their bitmap index); slots that would straddle a page are
    never handed out.
    """
    usable = np.array([item.usable for item in subsegments], dtype=np.int64)
    owner = np.repeat(np.arange(len(subsegments)), usable)
    index = np.arange(len(owner), dtype=np.int64) - np.repeat(np.cumsum(usable) - usable, usable)
    block_size = np.array([item.block_size for item in subsegments], dtype=np.int64)[owner]
    offsets = np.array([item.first for item in subsegments], dtype=np.int64)[owner] + index * block_size
    lead = np.array([item.address % PAGE_SIZE for item in subsegments], dtype=np.int64)[owner]
    keep = (lead + offsets) % PAGE_SIZE + block_size <= PAGE_SIZE
    bitmaps = [item.bitmap for item in subsegments]
    lengths = np.array([len(bitmap) for bitmap in bitmaps], dtype=np.int64)
    bits = np.frombuffer(b"".join(bitmaps) + b"\0", dtype=np.uint8)
    byte = index // 4
    inside = byte < lengths[owner]
    pair = (bits[np.where(inside, (np.cumsum(lengths) - lengths)[owner] + byte, -1)]
            >> ((index % 4) * 2).astype(np.uint8)) & 3
    allocated = inside & (pair == 1)  # two bits per block: 01 is handed out (see lfh_block_allocated)
    return owner[keep], offsets[keep], allocated[keep]


def _lfh_blocks_at(subsegments: list[LfhSubsegment], owner: np.ndarray, offsets: np.ndarray,
                   allocated: np.ndarray) -> tuple[Columns | None, list[Chunk]]:
    """LFH blocks decoded from one buffer of their subsegments' pages, every header at once; blocks whose header
    needs the full decode, or whose subsegment's pages cannot all be read, as records read block by block."""
    walk = subsegments[0].walk
    layout = walk.layout
    unit, pool_layout = layout.unit, layout.pool
    ends = np.zeros(len(subsegments), dtype=np.int64)
    np.maximum.at(ends, owner, offsets + unit)
    buffers = [item.walk.pages.read(item.address - item.address % PAGE_SIZE, item.address % PAGE_SIZE + int(end))
               if end else b"" for item, end in zip(subsegments, ends.tolist())]
    readable = np.array([data is not None for data in buffers])[owner]
    others = [_block(subsegments[at], offset, busy)
              for at, offset, busy in zip(owner[~readable].tolist(), offsets[~readable].tolist(),
                                          allocated[~readable].tolist())]
    owner, offsets, allocated = owner[readable], offsets[readable], allocated[readable]
    lengths = np.array([len(data or b"") for data in buffers], dtype=np.int64)
    starts = np.array([item.address - item.address % PAGE_SIZE for item in subsegments], dtype=np.uint64)
    leads = np.array([item.address % PAGE_SIZE for item in subsegments], dtype=np.int64)
    positions = (np.cumsum(lengths) - lengths + leads)[owner] + offsets
    fields = Fields(b"".join(data or b"" for data in buffers))
    kinds = fields.field(positions, pool_layout.pool_type)
    special = allocated & ((kinds & np.uint64(pool_layout.cache_aligned_bit)) != 0)
    others += [_block(subsegments[at], offset, True) for at, offset in zip(owner[special].tolist(),
                                                                           offsets[special].tolist())]
    plain = ~special
    owner, offsets, positions, allocated, kinds = owner[plain], offsets[plain], positions[plain], allocated[plain], \
        kinds[plain]
    if not len(owner):
        return None, others
    addresses = (starts + leads.astype(np.uint64))[owner] + offsets.astype(np.uint64)
    bodies = np.where(allocated, addresses + np.uint64(unit), np.uint64(NO_BODY))
    cached = allocated & cached_rows(walk.cached, addresses, bodies)
    states = np.where(allocated, np.where(cached, CACHED_FREE, ALLOCATED), FREE)
    previous = fields.field(positions, pool_layout.previous_size) * np.uint64(unit)
    block_sizes = np.array([item.block_size for item in subsegments], dtype=np.int64)[owner]
    quota = poolheader.charged_processes(fields, positions, addresses, np.where(allocated, kinds, 0), pool_layout,
                                         walk.cookie)
    return columns(addresses, block_sizes, previous, fields.field(positions, pool_layout.pool_tag), states, kinds,
                   bodies, Backing.LFH, walk.pool, quota=quota), others


def _block(subsegment: LfhSubsegment, offset: int, allocated: bool) -> Chunk:
    address = subsegment.address + offset
    return pool_chunk(subsegment.walk, address, Backing.LFH, allocated, address, subsegment.block_size)


def plausible_lfh_offsets(
    encoded: int, lfh_key: int, subsegment: int, layout: SegHeapLayout, bitmap_offset: int, count: int,
    range_size: int | None = None,
) -> tuple[int, int] | None:
    """Decode BlockOffsets the pre-26100 way and the 26100 way; keep a form that gives a sane layout.

    The two forms differ only in the high bits of FirstBlockOffset, so both can look sane: the form under
    which all ``count`` blocks fit between the block bitmap and the end of the page range wins; with none
    (a damaged BlockCount, or no range size known) the first sane form is kept.
    """
    sane: list[tuple[int, int]] = []
    for full in (False, True):
        block_size, first = decode_lfh_offsets(encoded, lfh_key, subsegment, layout, full)
        sizes_ok = layout.unit <= block_size <= PAGE_SIZE and block_size % layout.unit == 0
        if sizes_ok and bitmap_offset < first and first % layout.unit == 0:
            sane.append((block_size, first))
    bitmap_end = bitmap_offset + (count * 2 + 7) // 8
    for block_size, first in sane:
        if range_size is not None and bitmap_end <= first and first + count * block_size <= range_size:
            return block_size, first
    return sane[0] if sane else None


@reports_missing_symbols
def lfh_blocks(
    kernel: Kernel,
    subsegment_address: int,
    lfh_key: int,
    pool: str = "",
    cached: frozenset[int] = frozenset(),
    range_size: int | None = None,
) -> Iterator[Chunk | Finding]:
    """Blocks of one LFH subsegment: BlockCount slots of BlockSize from FirstBlockOffset, state from BlockBitmap.

    Slots keep a uniform stride (their index is their bitmap index); the ones that would cross a page
    boundary are skipped. Each block starts with a ``_POOL_HEADER``; the size reported is the block size.
    ``range_size`` (the page range's size), when given, bounds the walk.
    """
    yield from lfh_walk(Walk.of(kernel, pool, cached), subsegment_address, lfh_key, range_size)
