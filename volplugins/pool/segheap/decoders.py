"""Pure decoders of the segment heap's encoded words and flags: bytes and integers in, values out.

They take a :class:`SegHeapLayout` so they can be checked against hand-made encodings without an image.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from ..kernel import MASK64, PAGE_SIZE
from .layout import SegHeapLayout

PAGE_SEGMENT_KEY = 0xA2E64EADA2E64EAD  # mixed into _HEAP_PAGE_SEGMENT.Signature; zero from build 26100
VS_SUBSEGMENT_KEY = 0x2BED  # _HEAP_VS_SUBSEGMENT.Signature ^ key == Size

# _HEAP_PAGE_RANGE_DESCRIPTOR.RangeFlags bits: 3 = range allocated as a whole, 0xB = LFH, 0xF = VS,
# 1 = a later unit of a busy range (points back with UnitOffset), 0 / 2 = free.
RANGE_ALLOCATED = 0x1
RANGE_FIRST = 0x2
RANGE_VS = 0x4
RANGE_SUBSEGMENT = 0x8


class VsHeader(NamedTuple):
    """A decoded ``_HEAP_VS_CHUNK_HEADER.Sizes``; sizes in bytes, including the chunk header."""

    memory_cost: int
    size: int
    previous_size: int
    allocated: bool


def decode_vs_header(header_bits: int, chunk_address: int, heap_key: int, layout: SegHeapLayout) -> VsHeader:
    """``HeaderBits`` is stored XORed with the chunk header's own address and ``RtlpHpHeapGlobals.HeapKey``."""
    bits = (header_bits ^ chunk_address ^ heap_key) & MASK64
    return VsHeader(
        memory_cost=layout.vs_memory_cost.of(bits),
        size=layout.vs_unsafe_size.of(bits) * layout.unit,
        previous_size=layout.vs_unsafe_prev_size.of(bits) * layout.unit,
        allocated=layout.vs_allocated.of(bits) != 0,
    )


def decode_lfh_offsets(
    encoded: int, lfh_key: int, subsegment_address: int, layout: SegHeapLayout, shift_full_address: bool = False
) -> tuple[int, int]:
    """``BlockOffsets.EncodedData`` -> (BlockSize, FirstBlockOffset) in bytes.

    The key is ``(u32)LfhKey ^ ((u32)subsegment >> 12)``; from build 26100 the address is shifted
    before it is truncated (``shift_full_address``).
    """
    shifted = (subsegment_address >> 12) if shift_full_address else ((subsegment_address & 0xFFFFFFFF) >> 12)
    value = (encoded ^ lfh_key ^ shifted) & 0xFFFFFFFF
    return layout.lfh_block_size.of(value), layout.lfh_first_block_offset.of(value)


def segment_context_of(signature: int, segment: int, heap_key: int, key_constant: int = PAGE_SEGMENT_KEY) -> int:
    """The ``_HEAP_SEG_CONTEXT`` address a segment's signature names: how any address leads to its heap."""
    return (signature ^ segment ^ heap_key ^ key_constant) & MASK64


def segment_signature_ok(
    signature: int, segment: int, seg_context: int, heap_key: int, key_constant: int = PAGE_SEGMENT_KEY
) -> bool:
    return segment_context_of(signature, segment, heap_key, key_constant) == seg_context


def vs_subsegment_signature_ok(size: int, signature: int) -> bool:
    return (signature ^ VS_SUBSEGMENT_KEY) == size


def lfh_block_allocated(bitmap: bytes, index: int) -> bool:
    """``BlockBitmap`` keeps two bits per block; a block is handed out iff they read 01."""
    bit = index * 2
    if bit // 8 >= len(bitmap):
        return False
    return (bitmap[bit // 8] >> (bit % 8)) & 3 == 1


class RangeKind(str, enum.Enum):
    VS = "VS"
    LFH = "LFH"
    LARGE = "Large"  # a page range allocated as one block (no pool header; tracked in the big page table)


def classify_range(flags: int) -> RangeKind | None:
    """The backend behind the first descriptor of a busy page range, or None for free/continuation units."""
    if flags & (RANGE_ALLOCATED | RANGE_FIRST) != RANGE_ALLOCATED | RANGE_FIRST:
        return None
    if flags & RANGE_SUBSEGMENT:
        return RangeKind.VS if flags & RANGE_VS else RangeKind.LFH
    return RangeKind.LARGE


def vs_free_tag(raw_header: bytes, layout: SegHeapLayout) -> bytes:
    """What WinDbg shows as the tag of a free VS chunk: bytes 4..8 of the still-encoded header."""
    start = layout.vs_header_bits.offset + 4
    return bytes(raw_header[start : start + 4])


def vs_pool_header_address(heap_block: int, unit: int) -> int:
    """Where the pool puts its header in a VS block: right at the block, except in a page's last unit.

    A header there would leave the body page aligned, which the free path reads as a big-page
    allocation, so the pool moves the header to the start of the next page.
    """
    return heap_block + unit if heap_block % PAGE_SIZE == PAGE_SIZE - unit else heap_block


def vs_block_has_pool_header(heap_block: int, block_size: int, unit: int) -> bool:
    """Requests above a page minus a header get no pool header (they are big-page-table allocations)."""
    if vs_pool_header_address(heap_block, unit) != heap_block:
        return block_size <= PAGE_SIZE
    return block_size <= PAGE_SIZE - unit
