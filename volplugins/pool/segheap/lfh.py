"""LFH subsegments: BlockCount slots of one size, their state in a two-bit-per-block bitmap."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from .. import poolheader
from ..kernel import PAGE_SIZE, Fields, Kernel
from ..model import Backing, Chunk, Finding, State, new_chunk
from .chunks import Walk, pool_chunk
from .decoders import decode_lfh_offsets
from .layout import SegHeapLayout, reports_missing_symbols


def lfh_walk(
    walk: Walk, subsegment: int, lfh_key: int, range_size: int | None = None, page: int | None = None
) -> Iterator[Chunk | Finding]:
    sub_type = "_HEAP_LFH_SUBSEGMENT"
    encoded = walk.field(subsegment, sub_type, "BlockOffsets.EncodedData")
    count = walk.field(subsegment, sub_type, "BlockCount")
    if encoded is None or count is None:
        yield Finding(subsegment, "LFH subsegment header unreadable")
        return
    bitmap_offset = walk.kernel.field_offset(sub_type, "BlockBitmap")
    decoded = plausible_lfh_offsets(encoded, lfh_key, subsegment, walk.layout, bitmap_offset, count, range_size)
    if decoded is None:
        yield Finding(subsegment, "LFH BlockOffsets do not decode to a usable block size and first offset")
        return
    block_size, first = decoded
    bitmap = walk.pages.read(subsegment + bitmap_offset, (count * 2 + 7) // 8)
    if bitmap is None:
        yield Finding(subsegment + bitmap_offset, "LFH block bitmap unreadable")
        return
    usable = count
    if range_size:
        usable = min(count, max(0, (range_size - first) // block_size))  # slots that end inside the range
    offsets, allocated = _lfh_slots(subsegment, first, block_size, usable, bitmap, page)
    yield from _lfh_blocks_at(walk, subsegment, offsets, allocated, block_size)
    if usable < count:
        end = subsegment + range_size
        yield Finding(subsegment + first + usable * block_size, f"LFH BlockCount {count} runs past the page range end {end:#x}")


def _lfh_slots(
    subsegment: int, first: int, block_size: int, count: int, bitmap: bytes, page: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Offsets (from the subsegment) and bitmap state of the slots that can hold blocks, for all slots at once.

    Slots that would straddle a page are never handed out; ``page`` keeps only the slots starting in that page.
    """
    index = np.arange(count, dtype=np.int64)
    offsets = first + index * block_size
    start_in_page = (subsegment % PAGE_SIZE + offsets) % PAGE_SIZE
    keep = start_in_page + block_size <= PAGE_SIZE
    if page is not None:
        wanted = page - subsegment  # offset of the page from the subsegment
        keep &= (offsets - start_in_page == wanted) if abs(wanted) < 1 << 62 else False
    bits = np.frombuffer(bitmap, dtype=np.uint8)
    byte = index // 4
    inside = byte < len(bits)
    pair = (bits[np.minimum(byte, max(len(bits) - 1, 0))] >> ((index % 4) * 2).astype(np.uint8)) & 3 if len(bits) \
        else np.zeros(count, dtype=np.uint8)
    allocated = inside & (pair == 1)  # two bits per block: 01 is handed out (see lfh_block_allocated)
    return offsets[keep], allocated[keep]


def _lfh_blocks_at(
    walk: Walk, subsegment: int, offsets: np.ndarray, allocated: np.ndarray, block_size: int
) -> Iterator[Chunk]:
    """LFH blocks decoded from one buffer of the subsegment's pages, every header at once; per-block reads
    when a page is missing."""
    layout, unit = walk.layout, walk.layout.unit
    lead = subsegment % PAGE_SIZE
    buffer = walk.pages.read(subsegment - lead, lead + int(offsets[-1]) + unit) if len(offsets) else None
    if buffer is None:
        for offset, busy in zip(offsets.tolist(), allocated.tolist()):
            yield pool_chunk(walk, subsegment + offset, Backing.LFH, busy, subsegment + offset, block_size)
        return
    pool_layout = layout.pool
    positions = offsets + lead
    fields = Fields(buffer)
    kinds = fields.field(positions, pool_layout.pool_type)
    previous = fields.field(positions, pool_layout.previous_size) * np.uint64(unit)
    special = pool_layout.cache_aligned_bit | poolheader.QUOTA_BIT  # bodies and charges that need the full decode
    cached, pool = walk.cached, walk.pool
    free, lfh = State.FREE, Backing.LFH
    tag_at, tag_end = pool_layout.pool_tag.offset, pool_layout.pool_tag.offset + pool_layout.pool_tag.size
    for at, busy, kind, previous_size in zip(positions.tolist(), allocated.tolist(), kinds.tolist(),
                                             previous.tolist()):
        address = subsegment - lead + at
        if busy and kind & special:
            yield pool_chunk(walk, address, Backing.LFH, True, address, block_size)
            continue
        tag = buffer[at + tag_at : at + tag_end]
        if not busy:
            yield new_chunk(address, block_size, previous_size, tag, free, lfh, pool, kind)
            continue
        body = address + unit
        state = State.CACHED_FREE if cached and (address in cached or body in cached) else State.ALLOCATED
        yield new_chunk(address, block_size, previous_size, tag, state, lfh, pool, kind, body)


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
