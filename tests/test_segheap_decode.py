"""Pure segment heap decoders, checked against hand-computed encodings and the layouts of real kernel ISFs."""

from __future__ import annotations

import json
import lzma
from pathlib import Path

import pytest

from volplugins.pool.kernel import FieldLayout
from volplugins.pool.poolheader import decode
from volplugins.pool.segheap import (
    RangeKind,
    SegHeapLayout,
    classify_range,
    decode_lfh_offsets,
    decode_vs_header,
    lfh_block_allocated,
    segment_context_of,
    segment_signature_ok,
    vs_block_has_pool_header,
    vs_free_tag,
    vs_pool_header_address,
    vs_subsegment_signature_ok,
)
from volplugins.pool.segheap.lfh import plausible_lfh_offsets

REPO = Path(__file__).resolve().parent.parent
ISF_19041 = REPO / "symbols/windows/ntkrnlmp.pdb/606FF669409B00F7FC8C61A9C1670129-1.json.xz"
ISF_22000 = REPO / "symbols/windows/ntkrnlmp.pdb/0CE4A95C0CD782A7596B034D8648E585-1.json.xz"


def _load(path: Path) -> dict:
    with lzma.open(path) as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def layout() -> SegHeapLayout:
    return SegHeapLayout.from_isf(_load(ISF_19041))


@pytest.mark.parametrize("path", [ISF_19041, ISF_22000], ids=["19041", "22000"])
def test_layout_from_real_isf(path: Path) -> None:
    got = SegHeapLayout.from_isf(_load(path))
    assert got.unit == 0x10
    assert got.vs_header_size == 0x10
    assert got.vs_header_bits == FieldLayout(0, 8)
    # UnsafeSize is bits 16..31 of the first ULONG; UnsafePrevSize and Allocated live in the second one.
    assert got.vs_unsafe_size == FieldLayout(0, 4, 16, 16)
    assert got.vs_memory_cost == FieldLayout(0, 4, 0, 16)
    assert got.vs_unsafe_prev_size == FieldLayout(4, 4, 0, 16)
    assert got.vs_allocated == FieldLayout(4, 4, 16, 8)
    assert got.vs_subsegment_size == 0x28
    assert got.vs_sub_size == FieldLayout(0x20, 2)
    assert got.vs_sub_signature == FieldLayout(0x22, 2, 0, 15)
    assert got.lfh_block_size == FieldLayout(0, 2)
    assert got.lfh_first_block_offset == FieldLayout(2, 2)
    assert got.pool.block_size == FieldLayout(2, 2, 0, 8)
    assert got.pool.pool_type == FieldLayout(2, 2, 8, 8)
    assert got.pool.pool_tag == FieldLayout(4, 4)
    assert got.pool.process_billed == FieldLayout(8, 8)


def test_bitfield_of_whole_word_matches_read_of_bytes() -> None:
    field = FieldLayout(4, 4, 16, 8)
    word = 0x00AB_1234_5678_9ABC
    assert field.of(word) == 0xAB
    assert field.extract(word.to_bytes(8, "little")) == 0xAB


def test_vs_header_decodes_what_was_encoded(layout: SegHeapLayout) -> None:
    chunk = 0xFFFF_A50F_1234_5670
    key = 0x1122_3344_5566_7788
    plain = 0x0001_0010_0025_0003  # Allocated 1, UnsafePrevSize 0x10, UnsafeSize 0x25, MemoryCost 3
    header = decode_vs_header(plain ^ chunk ^ key, chunk, key, layout)
    assert header.size == 0x250
    assert header.previous_size == 0x100
    assert header.allocated is True
    assert header.memory_cost == 3


def test_vs_header_needs_the_right_address(layout: SegHeapLayout) -> None:
    chunk, key = 0xFFFF_A50F_1234_5670, 0x1122_3344_5566_7788
    encoded = 0x0000_0010_0025_0000 ^ chunk ^ key  # a free chunk
    assert decode_vs_header(encoded, chunk, key, layout).allocated is False
    elsewhere = decode_vs_header(encoded, chunk + 0x1_0000, key, layout)
    assert elsewhere.size == 0x240  # address bit 16 flips UnsafeSize bit 0


def test_vs_free_tag_is_the_encoded_bytes(layout: SegHeapLayout) -> None:
    raw = bytes.fromhex("0102030437 2b 9f 23 0000000000000000".replace(" ", ""))
    assert vs_free_tag(raw, layout) == b"7+\x9f#"


def test_lfh_offsets_pre_26100(layout: SegHeapLayout) -> None:
    subsegment = 0xFFFF_C08A_2D45_6000
    key = 0xDEAD_BEEF_0123_4567
    # 0x00900040 ^ 0x01234567 ^ (0x2D456000 >> 12 = 0x2D456)
    assert decode_lfh_offsets(0x01B1_9171, key, subsegment, layout) == (0x40, 0x90)


def test_lfh_offsets_full_address_shift(layout: SegHeapLayout) -> None:
    subsegment = 0xFFFF_C08A_2D45_6000
    key = 0xDEAD_BEEF_0123_4567
    # 0x00900040 ^ 0x01234567 ^ (u32)(0xFFFFC08A2D456000 >> 12 = 0x...08A2D456)
    assert decode_lfh_offsets(0x0911_9171, key, subsegment, layout, shift_full_address=True) == (0x40, 0x90)
    assert decode_lfh_offsets(0x0911_9171, key, subsegment, layout) != (0x40, 0x90)


def test_lfh_offsets_take_the_form_whose_blocks_fit_the_range(layout: SegHeapLayout) -> None:
    """Both forms decode to a sane-looking layout here; only the 26100 form fits 60 blocks in one page."""
    subsegment = 0xFFFF_C08A_2D45_6000
    key = 0xDEAD_BEEF_0123_4567
    wrong = decode_lfh_offsets(0x0911_9171, key, subsegment, layout)
    assert wrong[0] == 0x40 and wrong[1] % 0x10 == 0 and wrong[1] > 0x38
    assert plausible_lfh_offsets(0x0911_9171, key, subsegment, layout, 0x38, 60, 0x1000) == (0x40, 0x90)
    assert plausible_lfh_offsets(0x01B1_9171, key, subsegment, layout, 0x38, 60, 0x1000) == (0x40, 0x90)
    assert plausible_lfh_offsets(0x0911_9171, key, subsegment, layout, 0x38, 60) == wrong


def test_segment_signature() -> None:
    segment, context, key = 0xFFFF_B000_0010_0000, 0xFFFF_B000_0000_0100, 0x0BAD_F00D_CAFE_1234
    signature = segment ^ context ^ key ^ 0xA2E6_4EAD_A2E6_4EAD
    assert segment_signature_ok(signature, segment, context, key)
    assert segment_context_of(signature, segment, key) == context
    assert not segment_signature_ok(signature, segment, context + 0xC0, key)
    assert not segment_signature_ok(signature, segment + 0x10_0000, context, key)
    assert segment_signature_ok(segment ^ context ^ key, segment, context, key, key_constant=0)


def test_vs_subsegment_signature() -> None:
    assert vs_subsegment_signature_ok(0x1000, 0x3BED)
    assert vs_subsegment_signature_ok(0x2BED, 0)
    assert not vs_subsegment_signature_ok(0x1000, 0x3BEC)


def test_lfh_bitmap_states() -> None:
    bitmap = bytes([0b0100_0001, 0b0000_1101])
    states = [lfh_block_allocated(bitmap, index) for index in range(9)]
    assert states == [True, False, False, True, True, False, False, False, False]


@pytest.mark.parametrize(
    "flags, kind",
    [(0xF, RangeKind.VS), (0xB, RangeKind.LFH), (0x3, RangeKind.LARGE), (0x1, None), (0x2, None), (0x0, None)],
)
def test_range_flags(flags: int, kind: RangeKind | None) -> None:
    assert classify_range(flags) is kind


def test_pool_header_moves_off_the_last_unit_of_a_page() -> None:
    assert vs_pool_header_address(0xFFFF_A000_0000_1FF0, 0x10) == 0xFFFF_A000_0000_2000
    assert vs_pool_header_address(0xFFFF_A000_0000_1FE0, 0x10) == 0xFFFF_A000_0000_1FE0
    assert vs_pool_header_address(0xFFFF_A000_0000_2000, 0x10) == 0xFFFF_A000_0000_2000


def test_big_vs_blocks_have_no_pool_header() -> None:
    assert vs_block_has_pool_header(0xFFFF_A000_0000_0040, 0xFF0, 0x10)
    assert not vs_block_has_pool_header(0xFFFF_A000_0000_1000, 0x1000, 0x10)
    assert vs_block_has_pool_header(0xFFFF_A000_0000_0FF0, 0x1000, 0x10)
    assert not vs_block_has_pool_header(0xFFFF_A000_0000_0FF0, 0x1010, 0x10)


def test_pool_header_decode(layout: SegHeapLayout) -> None:
    billed = 0xFFFF_9D0C_1122_3340
    data = bytes([0x00, 0x03, 0x25, 0x02]) + b"Proc" + billed.to_bytes(8, "little")
    header = decode(data, layout.pool)
    assert header.previous_size == 0
    assert header.pool_index == 3
    assert header.block_size == 0x250
    assert header.pool_type == 2
    assert header.tag == b"Proc"
    assert header.process_billed == billed
    shifted = decode(b"\xff" * 16 + data, layout.pool, base=16)
    assert shifted == header
