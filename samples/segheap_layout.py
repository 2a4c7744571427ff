"""Arithmetic of the Windows 10 kernel segment heap, shared by the pool builder.

Everything here is pure: encodings of the heap's self-protecting fields, the
field packer (offsets and bit positions come from the kernel ISF, looked up
once per field) and the layout of the red-black trees the heap keeps its free
chunks, free page ranges and large allocations in.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .isf import FieldLayout, KernelTypes

SEGMENT_HEAP_SIGNATURE = 0xDDEEDDEE
RANGE_TREE_SIGNATURE = 0xCCDDCCDD

# _HEAP_PAGE_RANGE_DESCRIPTOR.RangeFlags as the kernel leaves them.
RANGE_UNCOMMITTED_FREE = 0x0
RANGE_CONTINUATION = 0x1  # allocated, not the first unit: UnitOffset points back
RANGE_COMMITTED_FREE = 0x2
RANGE_ALLOCATED = 0x3  # a page range handed out whole (big allocation)
RANGE_LFH_SUBSEGMENT = 0xB
RANGE_VS_SUBSEGMENT = 0xF

MASK64 = (1 << 64) - 1


class Fields:
    """ISF field layouts looked up once, packed fast into local buffers."""

    def __init__(self, types: KernelTypes):
        self.types = types
        self._cache: dict[tuple[str, str], FieldLayout] = {}

    def layout(self, type_name: str, path: str) -> FieldLayout:
        key = (type_name, path)
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = self.types.field(type_name, path)
        return found

    def offset(self, type_name: str, path: str) -> int:
        return self.layout(type_name, path).offset

    def size(self, type_name: str) -> int:
        return self.types.size(type_name)

    def bit(self, type_name: str, path: str) -> tuple[int, int]:
        """(first bit counted from the structure start, bit length) of a bitfield or integer."""
        layout = self.layout(type_name, path)
        if layout.bit_position is None:
            return layout.offset * 8, layout.size * 8
        return layout.offset * 8 + layout.bit_position, layout.bit_length

    def pack(self, buffer: bytearray, base: int, type_name: str, values: dict[str, int]) -> None:
        for path, value in values.items():
            layout = self.layout(type_name, path)
            start = base + layout.offset
            end = start + layout.size
            if layout.bit_position is None:
                buffer[start:end] = (value & ((1 << (8 * layout.size)) - 1)).to_bytes(layout.size, "little")
                continue
            current = int.from_bytes(buffer[start:end], "little")
            mask = ((1 << layout.bit_length) - 1) << layout.bit_position
            current = (current & ~mask) | ((value << layout.bit_position) & mask)
            buffer[start:end] = current.to_bytes(layout.size, "little")

    def compose(self, type_name: str, values: dict[str, int]) -> int:
        """Integer value of a small union/struct (up to 8 bytes) from its named bitfields."""
        word = 0
        for path, value in values.items():
            first, length = self.bit(type_name, path)
            word |= (value & ((1 << length) - 1)) << first
        return word

    def extract(self, type_name: str, path: str, word: int) -> int:
        first, length = self.bit(type_name, path)
        return (word >> first) & ((1 << length) - 1)


def segment_signature(segment: int, seg_context: int, heap_key: int, key: int) -> int:
    """``_HEAP_PAGE_SEGMENT.Signature``; ``key`` is the build's constant (see ``Flavor.page_segment_key``)."""
    return (segment ^ seg_context ^ heap_key ^ key) & MASK64


def vs_encode(decoded: int, chunk: int, heap_key: int) -> int:
    """Stored ``_HEAP_VS_CHUNK_HEADER.Sizes.HeaderBits`` of the chunk header at ``chunk``."""
    return (decoded ^ chunk ^ heap_key) & MASK64


def lfh_encoded_offsets(block_size: int, first_block_offset: int, lfh_key: int, subsegment: int,
                        full_address_shift: bool = False) -> int:
    """Stored ``BlockOffsets.EncodedData``: the subsegment address is truncated to 32 bits before the shift,
    or (``full_address_shift``, build 26100) shifted whole first."""
    plain = (block_size & 0xFFFF) | (first_block_offset & 0xFFFF) << 16
    shifted = subsegment >> 12 if full_address_shift else (subsegment & 0xFFFF_FFFF) >> 12
    return (plain ^ (lfh_key & 0xFFFF_FFFF) ^ shifted) & 0xFFFF_FFFF


def vs_page_offset_bits(chunk: int, subsegment: int, heap_key: int) -> int:
    """``AllocatedChunkBits.EncodedSegmentPageOffset``: the chunk's page within its subsegment,
    xored with the low bytes of the chunk address and of the heap key so that it is not a plain
    small integer (the free path recovers the subsegment from it)."""
    return (((chunk - subsegment) >> 12) ^ chunk ^ heap_key) & 0xFF


@dataclass(frozen=True)
class TreeLinks:
    left: int
    right: int
    parent: int
    red: bool


def balanced_rb_tree(nodes: list[int]) -> tuple[int, dict[int, TreeLinks]]:
    """Links of a valid red-black tree over ``nodes`` (already in key order).

    The tree is built by median split, so all leaves sit on the last two levels;
    colouring the (incomplete) last level red keeps every root-to-leaf path at
    the same black height, as a real ``RtlRbInsertNodeEx`` tree would.
    Returns (root, links per node)."""
    links: dict[int, TreeLinks] = {}
    if not nodes:
        return 0, links
    depth_of: dict[int, int] = {}
    shape: dict[int, tuple[int, int, int]] = {}

    def build(low: int, high: int, parent: int, depth: int) -> int:
        if low > high:
            return 0
        middle = (low + high) // 2
        node = nodes[middle]
        depth_of[node] = depth
        left = build(low, middle - 1, node, depth + 1)
        right = build(middle + 1, high, node, depth + 1)
        shape[node] = (left, right, parent)
        return node

    root = build(0, len(nodes) - 1, 0, 0)
    deepest = max(depth_of.values())
    perfect = len(nodes) == (1 << (deepest + 1)) - 1
    for node, (left, right, parent) in shape.items():
        red = not perfect and deepest > 0 and depth_of[node] == deepest
        links[node] = TreeLinks(left, right, parent, red)
    return root, links


def u64(value: int) -> bytes:
    return struct.pack("<Q", value & MASK64)
