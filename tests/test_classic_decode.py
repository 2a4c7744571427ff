"""Decoders of classic pool pages, big page and tag tracking tables, and kernel regions.

Structures are handcrafted here from the documented x64 byte layouts (not
from the library's layout records), then decoded with layouts the library
builds from the real Windows 7, 8.1 and 10 ISFs in ``symbols/``.
"""

from __future__ import annotations

import gc
import random
import struct
import weakref
from pathlib import Path

import numpy as np
import pytest
from volatility3.framework import contexts, exceptions, interfaces
from volatility3.framework.symbols.windows import WindowsKernelIntermedSymbols

from volplugins.pool import bigpages, classic, poolheader, regions, tracker
from volplugins.pool.kernel import Kernel
from volplugins.pool.model import Backing, State

SYMBOLS = Path(__file__).resolve().parent.parent / "symbols" / "windows" / "ntkrnlmp.pdb"
WIN7 = "339E74133576439CBCDF7E0229DA3773-1"
WIN10 = "606FF669409B00F7FC8C61A9C1670129-1"
WIN81 = "22597D0B40394E23936F6A24C6C52D5B-1"
KERNEL_BASE = 0xFFFFF80002A0F000
PAGE = 0xFFFFFA8001234000
EPROCESS = 0xFFFFFA8000C5E060
COOKIE = 0x5A5A_1234_DEAD_BEEF


class SparseLayer(interfaces.layers.DataLayerInterface):
    """Kernel virtual memory made of the 4 KiB pages a test writes; everything else is invalid."""

    page_size = 0x1000

    def __init__(self, context, config_path: str, name: str):
        super().__init__(context, config_path, name)
        self.pages: dict[int, bytearray] = {}

    @property
    def maximum_address(self) -> int:
        return (1 << 64) - 1

    @property
    def minimum_address(self) -> int:
        return 0

    @property
    def dependencies(self) -> list[str]:
        return []

    def put(self, address: int, data: bytes) -> None:
        for i, byte in enumerate(data):
            page = (address + i) & ~0xFFF
            self.pages.setdefault(page, bytearray(0x1000))[(address + i) & 0xFFF] = byte

    def is_valid(self, offset: int, length: int = 1) -> bool:
        return all(page in self.pages for page in range(offset & ~0xFFF, offset + length, 0x1000))

    def mapping(self, offset: int, length: int, ignore_errors: bool = False):
        for page in range(offset & ~0xFFF, offset + length, 0x1000):
            start, end = max(offset, page), min(offset + length, page + 0x1000)
            if page in self.pages:
                yield start, end - start, start, end - start, self.name

    def read(self, offset: int, length: int, pad: bool = False) -> bytes:
        out = bytearray()
        for address in range(offset, offset + length):
            page = self.pages.get(address & ~0xFFF)
            if page is None and not pad:
                raise exceptions.InvalidAddressException(self.name, address, "not mapped")
            out.append(page[address & 0xFFF] if page is not None else 0)
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        self.put(offset, data)


def make_kernel(isf: str) -> tuple[Kernel, SparseLayer]:
    context = contexts.Context()
    table = WindowsKernelIntermedSymbols.create(context, "symbols", str(SYMBOLS), isf)
    layer = SparseLayer(context, "layer", "memory")
    context.add_layer(layer)
    return Kernel(context, layer.name, table, KERNEL_BASE), layer


@pytest.fixture(scope="module")
def win7() -> tuple[Kernel, SparseLayer]:
    return make_kernel(WIN7)


@pytest.fixture(scope="module")
def win10() -> tuple[Kernel, SparseLayer]:
    return make_kernel(WIN10)


def test_what_is_learnt_of_a_kernel_goes_with_it():
    """Layouts and values read once per kernel are kept on the kernel: dropping it frees the image's context."""
    kernel, layer = make_kernel(WIN10)
    layer.put(kernel.symbol_address("ExpPoolQuotaCookie"), COOKIE.to_bytes(8, "little"))
    assert poolheader.header_layout(kernel).unit == 16 and poolheader.quota_cookie(kernel) == COOKIE
    context = weakref.ref(kernel.context)
    del kernel, layer
    gc.collect()
    assert context() is None


def pool_header(previous: int, blocks: int, pool_type: int, tag: bytes, billed: int = 0) -> bytes:
    """x64 _POOL_HEADER: PreviousSize u8, PoolIndex u8, BlockSize u8, PoolType u8, tag u32, ProcessBilled u64."""
    return struct.pack("<BBBB4sQ", previous, 0, blocks, pool_type, tag, billed)


def build_page(chunks: list[tuple[int, int, bytes]]) -> bytearray:
    """A page of chunks (size in bytes, header PoolType, tag) chained as the allocator does."""
    page = bytearray(0x1000)
    offset, previous = 0, 0
    for size, pool_type, tag in chunks:
        page[offset : offset + 16] = pool_header(previous, size // 16, pool_type, tag)
        offset, previous = offset + size, size // 16
    return page


GOOD = [(0x40, 0x02, b"Abcd"), (0x100, 0x00, b"Free"), (0x60, 0x03, b"Pgd "), (0x1000 - 0x1A0, 0x02, b"Last")]


# -- _POOL_HEADER layouts ----------------------------------------------------


def test_both_isf_layouts_decode_the_same_header(win7, win10):
    win7_layout = poolheader.header_layout(win7[0])
    win10_layout = poolheader.header_layout(win10[0])
    # Windows 7 declares one bitfield ULONG, Windows 10 bitfields of two USHORTs.
    block7, block10 = win7_layout.block_size, win10_layout.block_size
    assert (block7.offset, block7.size, block7.bit_position, block7.bit_length) == (0, 4, 16, 8)
    assert (block10.offset, block10.size, block10.bit_position, block10.bit_length) == (2, 2, 0, 8)
    header = pool_header(0x07, 0x2A, 0x23, b"TagX", 0x1122334455667788)
    for layout in (win7_layout, win10_layout):
        assert layout.size == layout.unit == 16
        assert layout.previous_size.extract(header) == 0x07
        assert layout.block_size.extract(header) == 0x2A
        assert layout.pool_type.extract(header) == 0x23
        assert layout.pool_tag.extract(header).to_bytes(4, "little") == b"TagX"
        assert layout.process_billed.extract(header) == 0x1122334455667788
    assert not win7_layout.quota_encoded and win10_layout.quota_encoded


def test_pool_name_from_header_type(win10):
    layout = poolheader.header_layout(win10[0])
    assert [layout.pool_name(t) for t in (0, 0x02, 0x03, 0x06, 0x0A, 0x22, 0x23)] == [
        "", "NonPaged", "Paged", "NonPaged", "NonPaged", "Session", "Session"
    ]


# -- classic page walk -------------------------------------------------------


@pytest.mark.parametrize("flavor", ["win7", "win10"])
def test_valid_chain_yields_every_chunk(flavor, request):
    layout = poolheader.header_layout(request.getfixturevalue(flavor)[0])
    walk = classic.parse_page(bytes(build_page(GOOD)), PAGE, layout)
    assert walk.complete and walk.findings == ()
    assert [(c.address - PAGE, c.size, c.previous_size, c.tag) for c in walk.chunks] == [
        (0x000, 0x40, 0x000, b"Abcd"),
        (0x040, 0x100, 0x040, b"Free"),
        (0x140, 0x60, 0x100, b"Pgd "),
        (0x1A0, 0xE60, 0x060, b"Last"),
    ]
    assert [c.state for c in walk.chunks] == [State.ALLOCATED, State.FREE, State.ALLOCATED, State.ALLOCATED]
    assert [c.pool for c in walk.chunks] == ["NonPaged", "", "Paged", "NonPaged"]
    assert all(c.backing is Backing.PAGE for c in walk.chunks)
    assert walk.chunks[0].body == PAGE + 0x10 and walk.chunks[1].body is None
    assert walk.owner(PAGE + 0x150).tag == b"Pgd " and walk.owner(PAGE + 0x1000) is None


def test_broken_previous_size_is_reported_and_the_walk_goes_on(win10):
    page = build_page(GOOD)
    page[0x140] = 0x05  # PreviousSize of the third chunk: 0x50 instead of 0x100
    walk = classic.parse_page(bytes(page), PAGE, poolheader.header_layout(win10[0]))
    assert len(walk.findings) == 1
    assert walk.findings[0].address == PAGE + 0x140
    assert "PreviousSize 0x50" in walk.findings[0].reason
    assert [c.tag for c in walk.chunks] == [b"Abcd", b"Free", b"Pgd ", b"Last"]
    assert [walk.past_break(c) for c in walk.chunks] == [False, False, True, True]
    assert walk.owner(PAGE + 0x1A8).tag == b"Last"


def test_walk_past_a_break_stops_at_an_implausible_header(win10):
    page = build_page(GOOD)
    page[0x140] = 0x05
    page[0x1A0 + 4 : 0x1A0 + 8] = b"\x01\x02\x03\x04"  # the header after the break has no tag a driver writes
    walk = classic.parse_page(bytes(page), PAGE, poolheader.header_layout(win10[0]))
    assert [c.tag for c in walk.chunks] == [b"Abcd", b"Free", b"Pgd "]
    assert [f.address for f in walk.findings] == [PAGE + 0x140]
    page[0x140 + 3] = 0x41  # and a broken header whose PoolType has no in-use bit is not trusted either
    walk = classic.parse_page(bytes(page), PAGE, poolheader.header_layout(win10[0]))
    assert [c.tag for c in walk.chunks] == [b"Abcd", b"Free"] and [f.address for f in walk.findings] == [PAGE + 0x140]


def test_block_size_zero_stops_the_walk(win7):
    page = build_page(GOOD)
    page[0x40 + 2] = 0  # BlockSize of the second chunk
    walk = classic.parse_page(bytes(page), PAGE, poolheader.header_layout(win7[0]))
    assert [(f.address, f.reason) for f in walk.findings] == [(PAGE + 0x40, "BlockSize is 0")]
    assert [c.tag for c in walk.chunks] == [b"Abcd"]


def test_first_previous_size_must_be_zero(win10):
    page = build_page(GOOD)
    page[0] = 1
    walk = classic.parse_page(bytes(page), PAGE, poolheader.header_layout(win10[0]))
    assert [f.address for f in walk.findings] == [PAGE] and "first chunk" in walk.findings[0].reason
    assert len(walk.chunks) == 4 and all(walk.past_break(c) for c in walk.chunks)


def big_tail_page(end: int, size: int) -> bytearray:
    """The last page of a big allocation of ``size`` bytes ending at page offset ``end``: the big block's data,
    then a 'Frag' chunk recording the size, the free rest, and a chunk split off the rest's end."""
    page = bytearray(bytes(range(256)) * 16)
    page[end : end + 16] = pool_header(0, 2, 0x02, b"Frag")
    page[end + 16 : end + 24] = size.to_bytes(8, "little")
    free = (0x1000 - end - 0x20 - 0x80) // 16
    page[end + 0x20 : end + 0x30] = pool_header(2, free, 0, b"Free")
    page[0xF80:0xF90] = pool_header(free, 8, 0x02, b"Late")
    return page


def test_a_big_allocations_last_page_starts_at_its_frag_chunk(win10):
    layout = poolheader.header_layout(win10[0])
    page = big_tail_page(0x230, 0x5230)
    assert classic.tail_start(bytes(page), layout, 0x1000) == 0x230
    walk = classic.parse_page(bytes(page), PAGE, layout, start=0x230)
    assert walk.complete
    assert [(c.address - PAGE, c.size, c.tag) for c in walk.chunks] == [
        (0x230, 0x20, b"Frag"), (0x250, 0xD30, b"Free"), (0xF80, 0x80, b"Late")]
    # Two pages of a block: the second one is found at its own offset.
    assert classic.tail_start(bytes(0x1000) + bytes(page), layout, 0x1000, 0x1000) == 0x230


def test_a_frag_header_must_record_the_size_that_ends_there(win10):
    layout = poolheader.header_layout(win10[0])
    assert classic.tail_start(bytes(big_tail_page(0x230, 0x5240)), layout, 0x1000) is None
    broken = big_tail_page(0x230, 0x5230)
    broken[0xF80] = 3  # the split-off chunk's PreviousSize no longer matches: the chain must end exactly
    assert classic.tail_start(bytes(broken), layout, 0x1000) is None


def test_chunk_running_past_the_page_end(win10):
    page = build_page(GOOD)
    page[0x1A0 + 2] = 0xF0  # last chunk claims 0xF00 bytes from offset 0x1A0
    walk = classic.parse_page(bytes(page), PAGE, poolheader.header_layout(win10[0]))
    assert len(walk.chunks) == 3 and [f.address for f in walk.findings] == [PAGE + 0x1A0]
    assert "past the page end" in walk.findings[0].reason


def test_quota_pointer_encoded_with_cookie_on_win10_plain_on_win7(win7, win10):
    encoded = poolheader.header_layout(win10[0])
    plain = poolheader.header_layout(win7[0])
    header = PAGE + 0x40
    assert poolheader.decode_quota(EPROCESS ^ COOKIE ^ header, header, encoded, COOKIE) == EPROCESS
    assert poolheader.decode_quota(EPROCESS ^ COOKIE ^ header, header, encoded, None) is None
    assert poolheader.decode_quota(EPROCESS, header, plain, None) == EPROCESS
    assert poolheader.decode_quota(0, header, plain, None) is None


def test_quota_column_decodes_as_one_header_at_a_time(win7, win10):
    """The bulk decoder of ProcessBilled gives what the one-header decoder gives, for charged and uncharged
    headers, good and garbage values, with and without the cookie."""
    chooser = random.Random(5)
    addresses = [PAGE + 0x10 * chooser.randrange(0x100) for _ in range(400)]
    raws = [chooser.choice([0, EPROCESS, EPROCESS ^ COOKIE ^ address, chooser.getrandbits(64),
                            (EPROCESS ^ COOKIE ^ address) | 1]) for address in addresses]
    types = [chooser.choice([0, 2, 2 | poolheader.QUOTA_BIT, 0x200 | poolheader.QUOTA_BIT]) for _ in addresses]
    for layout in (poolheader.header_layout(win7[0]), poolheader.header_layout(win10[0])):
        for cookie in (COOKIE, None):
            expected = [poolheader.decode_quota(raw, address, layout, cookie) if kind & poolheader.QUOTA_BIT else None
                        for raw, address, kind in zip(raws, addresses, types)]
            bulk = poolheader.quota_column(np.array(raws, dtype=np.uint64), np.array(addresses, dtype=np.uint64),
                                           np.array(types, dtype=np.uint64), layout, cookie)
            assert [value or None for value in bulk.tolist()] == expected
            assert None in expected and any(expected) == (cookie is not None or not layout.quota_encoded)


def test_walk_page_through_the_layer_decodes_quota(win10):
    kernel, layer = win10
    page = build_page([(0x40, 0x02 | poolheader.QUOTA_BIT, b"Quot"), (0xFC0, 0x00, b"Free")])
    page[8:16] = (EPROCESS ^ COOKIE ^ PAGE).to_bytes(8, "little")
    layer.put(PAGE, bytes(page))
    layer.put(kernel.symbol_address("ExpPoolQuotaCookie"), COOKIE.to_bytes(8, "little"))
    walk = classic.walk_page(kernel, PAGE + 0x123)
    assert walk.page == PAGE and walk.complete
    assert walk.chunks[0].quota_process == EPROCESS and walk.chunks[1].quota_process is None
    cookie = poolheader.quota_cookie(kernel)
    assert poolheader.decode_quota(EPROCESS ^ COOKIE ^ PAGE, PAGE, poolheader.header_layout(kernel), cookie) == EPROCESS
    unreadable = classic.walk_page(kernel, PAGE + 0x10000)
    assert unreadable.chunks == () and len(unreadable.findings) == 1


def test_walk_page_finds_a_tail_without_a_big_page_table(win10):
    kernel, layer = win10
    tail = PAGE + 0x40000
    layer.put(tail, bytes(big_tail_page(0x230, 0x5230)))
    walk = classic.walk_page(kernel, tail + 0xF90)
    assert walk.complete and walk.owner(tail + 0xF90).tag == b"Late"


# -- big page table ----------------------------------------------------------


def big_entry_0x18(va: int, tag: bytes, pool_type_word: int, size: int) -> bytes:
    """x64 _POOL_TRACKER_BIG_PAGES up to 19041: Va u64, Key u32, PoolType word u32, NumberOfBytes u64."""
    return struct.pack("<Q4sIQ", va, tag, pool_type_word, size)


BIG = 0xFFFFFA8003000000


def test_big_page_table_0x18_layouts(win7, win10):
    # Windows 10 keeps PoolType as bits 8-19 (after an 8-bit Pattern); Windows 7 as a whole ULONG.
    for (kernel, _), word in ((win10, (0x201 << 8) | 0x5A), (win7, 0x201)):
        layout = bigpages.entry_layout(kernel)
        assert layout.size == 0x18
        data = b"".join(
            [
                big_entry_0x18(BIG, b"Big1", word, 0x3000),
                big_entry_0x18(0, b"\0\0\0\0", 0, 0),
                big_entry_0x18(BIG + 0x10000 | 1, b"Fred", word, 0x2000),
                big_entry_0x18(BIG + 0x20000, b"\0\0\0\0", word, 0x1000),  # no Key: unused slot
            ]
        )
        found, implausible = bigpages.parse_table(data, layout)
        assert implausible == 0
        assert [(a.index, a.va, a.size, a.tag, a.pool_type, a.free) for a in found] == [
            (0, BIG, 0x3000, b"Big1", 0x201, False),
            (2, BIG + 0x10000, 0x2000, b"Fred", 0x201, True),
        ]


def test_big_page_lookup_by_any_address_of_live_allocations(win10):
    layout = bigpages.entry_layout(win10[0])
    no_pool_type = bigpages.EntryLayout(layout.size, layout.va, layout.key, layout.number_of_bytes, None)
    data = big_entry_0x18(BIG, b"Big1", 0, 0x3000) + big_entry_0x18(BIG + 0x10000 | 1, b"Fred", 0, 0x2000)
    table = bigpages.BigPageTable(0, 2, tuple(bigpages.parse_table(data, no_pool_type)[0]))
    assert table.allocations[0].pool_type is None
    assert table.find(BIG + 0x2FFF).tag == b"Big1"
    assert table.find(BIG + 0x3000) is None
    assert table.find(BIG + 0x10008) is None  # freed: the stale entry does not own it
    assert table.find(BIG - 1) is None


def test_big_allocations_through_the_layer(win7):
    kernel, layer = win7
    table = 0xFFFFF8A000100000
    layer.put(kernel.symbol_address("PoolBigPageTable"), table.to_bytes(8, "little"))
    layer.put(kernel.symbol_address("PoolBigPageTableSize"), (4).to_bytes(8, "little"))
    layer.put(table, big_entry_0x18(BIG, b"Big1", 1, 0x3000) + bytes(0x18 * 3))
    assert [a.tag for a in bigpages.big_allocations(kernel)] == [b"Big1"]
    assert bigpages.find_big(kernel, BIG + 0x1800).va == BIG


# -- tag tracking tables -----------------------------------------------------


def tracker_entry_win7(tag: bytes, np_: tuple[int, int, int], paged: tuple[int, int, int]) -> bytes:
    """0x28 bytes: Key, NonPaged Allocs/Frees u32, NonPagedBytes u64 @0x10, Paged Allocs/Frees u32, PagedBytes u64."""
    return struct.pack("<4sIIIQIIQ", tag, np_[0], np_[1], 0, np_[2] % (1 << 64), paged[0], paged[1], paged[2])


def tracker_entry_win10(tag: bytes, np_: tuple[int, int, int], paged: tuple[int, int, int]) -> bytes:
    """0x38 bytes: Key, then u64 NonPagedBytes, Allocs, Frees, PagedBytes, Allocs, Frees."""
    np_bytes, paged_bytes = np_[2] % (1 << 64), paged[2] % (1 << 64)
    return struct.pack("<4sIQQQQQQ", tag, 0, np_bytes, np_[0], np_[1], paged_bytes, paged[0], paged[1])


@pytest.mark.parametrize("flavor, entry", [("win7", tracker_entry_win7), ("win10", tracker_entry_win10)])
def test_tracker_sums_tags_across_tables(flavor, entry, request):
    layout = tracker.entry_layout(request.getfixturevalue(flavor)[0])
    global_table = entry(b"Abcd", (10, 4, 0x600), (0, 0, 0)) + entry(b"\0\0\0\0", (9, 9, 9), (9, 9, 9))
    cpu_table = entry(b"Abcd", (2, 5, -0x100), (3, 1, 0x40)) + entry(b"Solo", (1, 0, 0x20), (0, 0, 0))
    session_table = entry(b"Abcd", (1, 0, 0x10), (4, 2, 0x80))
    tables = ((global_table, False), (cpu_table, False), (session_table, True))
    rows = tracker.sum_rows([(tracker.parse_table(data, layout), session) for data, session in tables])
    assert [(r.tag, r.pool, r.allocs, r.frees, r.bytes) for r in rows] == [
        (b"Abcd", "Nonp", 12, 9, 0x500),
        (b"Abcd", "Paged", 3, 1, 0x40),
        (b"Abcd", "Session", 5, 2, 0x90),
        (b"Solo", "Nonp", 1, 0, 0x20),
    ]
    assert rows[0].diff == 3 and rows[0].per_alloc == 0x500 // 3


def test_tracker_rows_through_the_layer(win10):
    kernel, layer = win10
    global_table, cpu1 = 0xFFFFDC0000010000, 0xFFFFDC0000030000
    layer.put(kernel.symbol_address("PoolTrackTableSize"), (2).to_bytes(8, "little"))
    layer.put(kernel.symbol_address("PoolTrackTable"), global_table.to_bytes(8, "little"))
    layer.put(kernel.symbol_address("KeNumberProcessors"), (2).to_bytes(4, "little"))
    # Processor 0's table is the global one here: it must be counted once.
    layer.put(kernel.symbol_address("ExPoolTagTables"), global_table.to_bytes(8, "little") + cpu1.to_bytes(8, "little"))
    layer.put(global_table, tracker_entry_win10(b"Abcd", (5, 1, 0x400), (0, 0, 0)) + bytes(0x38))
    layer.put(cpu1, tracker_entry_win10(b"Abcd", (1, 2, -0x100), (0, 0, 0)) + bytes(0x38))
    result = tracker.tracker_rows(kernel)
    assert [(r.tag, r.pool, r.allocs, r.frees, r.bytes) for r in result.rows] == [(b"Abcd", "Nonp", 6, 3, 0x300)]
    assert [t.name for t in result.tables] == ["PoolTrackTable", "ExPoolTagTables[1]"]


# -- regions -----------------------------------------------------------------


def test_canonical_addresses_and_region_names():
    assert regions.is_canonical(0x7FFFFFFFFFFF) and regions.is_canonical(0xFFFF800000000000)
    assert not regions.is_canonical(0x0000800000000000) and not regions.is_canonical(0xFFFF7FFFFFFFFFFF)
    assert regions.region_name("AssignedRegionNonPagedPool") == ("Nonpaged pool", "NonPaged")
    assert regions.region_name("AssignedRegionSystemPtes") == ("System PTEs", None)
    assert regions.region_name("AssignedRegionSomethingNew") == ("Something new", None)


def test_win10_regions_come_from_mi_state():
    kernel, layer = make_kernel(WIN10)  # regions are read once per kernel: a kernel of its own
    enum = kernel.module.get_enumeration("_MI_ASSIGNED_REGION_TYPES").choices
    array = kernel.symbol_address("MiState") + kernel.field_offset("_MI_SYSTEM_INFORMATION", "Vs.SystemVaRegions")
    nonpaged, paged = 0xFFFFDC0000000000, 0xFFFFB90000000000
    layer.put(array + 16 * enum["AssignedRegionNonPagedPool"], struct.pack("<QQ", nonpaged, 1 << 40))
    layer.put(array + 16 * enum["AssignedRegionPagedPool"], struct.pack("<QQ", paged, 1 << 40))
    layer.put(kernel.symbol_address("MmHighestUserAddress"), (0x7FFFFFFEFFFF).to_bytes(8, "little"))
    assert [(r.name, r.start, r.pool) for r in regions.kernel_regions(kernel)] == [
        ("Paged pool", paged, "Paged"),
        ("Nonpaged pool", nonpaged, "NonPaged"),
    ]
    assert regions.classify(kernel, nonpaged + 0x1234).name == "Nonpaged pool"
    assert regions.classify(kernel, 0x1000).name == regions.USER_SPACE
    assert regions.classify(kernel, 0x7FFFFFFF0000).name == regions.USER_GUARD
    assert regions.classify(kernel, 0x0000900000000000).name == regions.NON_CANONICAL
    assert regions.classify(kernel, 0xFFFFF00000000000).name == regions.UNKNOWN_KERNEL


def test_win7_regions_come_from_mm_variables():
    kernel, layer = make_kernel(WIN7)  # regions are read once per kernel: a kernel of its own
    layer.put(kernel.symbol_address("MmNonPagedPoolStart"), (0xFFFFFA8000C00000).to_bytes(8, "little"))
    layer.put(kernel.symbol_address("MmMaximumNonPagedPoolInBytes"), (0x1000000).to_bytes(8, "little"))
    layer.put(kernel.symbol_address("MmPagedPoolEnd"), (0xFFFFF8BFFFFFFFFF).to_bytes(8, "little"))
    layer.put(kernel.symbol_address("MmSizeOfPagedPoolInBytes"), (0x2000000000).to_bytes(8, "little"))
    found = {r.name: (r.start, r.end, r.pool) for r in regions.kernel_regions(kernel)}
    assert found == {
        "Nonpaged pool": (0xFFFFFA8000C00000, 0xFFFFFA8001C00000, "NonPaged"),
        "Paged pool": (0xFFFFF8A000000000, 0xFFFFF8C000000000, "Paged"),
        "Session pool": (0xFFFFF90000000000, 0xFFFFF98000000000, "Session"),
        "System images": (0xFFFFF80000000000, 0xFFFFF88000000000, None),
    }
    assert regions.classify(kernel, 0xFFFFF90000100000).pool == "Session"


@pytest.mark.parametrize("first_process, named", [(0xFFFFE00000C5E060 + 0x2E8, True), (0xFFFFFA8000C5E348, False)])
def test_win81_fixed_nonpaged_start_holds_only_when_the_first_process_lies_there(first_process, named, caplog):
    kernel, layer = make_kernel(WIN81)
    layer.put(kernel.symbol_address("MmMaximumNonPagedPoolInBytes"), (0x4000_0000).to_bytes(8, "little"))
    layer.put(kernel.symbol_address("MmPagedPoolEnd"), (0xFFFFC0FFFFFFFFFF).to_bytes(8, "little"))
    layer.put(kernel.symbol_address("MmSizeOfPagedPoolInBytes"), (0x100_0000_0000).to_bytes(8, "little"))
    layer.put(kernel.symbol_address("PsActiveProcessHead"), first_process.to_bytes(8, "little"))
    version = kernel.symbol_address("KdVersionBlock") + kernel.field_offset("_DBGKD_GET_VERSION64", "MinorVersion")
    layer.put(version, (9600).to_bytes(2, "little"))
    found = {r.name: (r.start, r.end, r.pool) for r in regions.kernel_regions(kernel)}
    assert found["Paged pool"] == (0xFFFFC00000000000, 0xFFFFC10000000000, "Paged")
    assert found["Session pool"][2] == "Session"
    if named:
        assert found["Nonpaged pool"] == (0xFFFFE00000000000, 0xFFFFE00040000000, "NonPaged")
        assert not caplog.records
    else:
        assert "Nonpaged pool" not in found
        assert regions.classify(kernel, 0xFFFFE00000001000).name == regions.UNKNOWN_KERNEL
        assert "layout of build 9600 not recognised" in caplog.text


def test_implausible_big_entries_are_skipped_and_counted(win10):
    # An overread or smeared table yields entries no kernel writes; one of them must not own every address.
    layout = bigpages.entry_layout(win10[0])
    word = (0x201 << 8) | 0x5A
    data = b"".join(
        [
            big_entry_0x18(BIG, b"Big1", word, 0x3000),
            big_entry_0x18(8, b"Junk", word, 1 << 62),  # not page aligned, user half
            big_entry_0x18(BIG + 0x10, b"Junk", word, 0x1000),  # not page aligned
            big_entry_0x18(0x7FF0_0000_0000, b"Junk", word, 0x1000),  # user half
            big_entry_0x18(BIG + 0x10000, b"Junk", word, bigpages.MAX_BYTES + 0x1000),  # beyond any pool
            big_entry_0x18(0xFFFF_FFFF_FFFF_F000, b"Junk", word, 0x2000),  # runs past the address space
        ]
    )
    allocations, implausible = bigpages.parse_table(data, layout)
    assert [(a.va, a.tag) for a in allocations] == [(BIG, b"Big1")]
    assert implausible == 5
    table = bigpages.BigPageTable(0, 6, tuple(allocations))
    assert table.find(BIG + 0x20000) is None and table.find(BIG + 0x2FFF).tag == b"Big1"


def test_big_entries_running_past_their_pool_region_are_skipped():
    # Big pool is carved from a pool's own region: a smeared size must not make an entry own the memory beyond.
    kernel, layer = make_kernel(WIN7)
    start, size = 0xFFFFFA8000C00000, 0x1000000
    layer.put(kernel.symbol_address("MmNonPagedPoolStart"), start.to_bytes(8, "little"))
    layer.put(kernel.symbol_address("MmMaximumNonPagedPoolInBytes"), size.to_bytes(8, "little"))
    table = 0xFFFFF8A000100000
    layer.put(kernel.symbol_address("PoolBigPageTable"), table.to_bytes(8, "little"))
    layer.put(kernel.symbol_address("PoolBigPageTableSize"), (4).to_bytes(8, "little"))
    layer.put(table, big_entry_0x18(start + 0x10000, b"Fits", 0, 0x3000)
              + big_entry_0x18(start + 0x20000, b"Past", 0, size)  # ends 0x20000 beyond the region
              + big_entry_0x18(BIG + 0x8000_0000, b"Else", 0, 0x2000)  # in no known region: left alone
              + bytes(0x18))
    found = bigpages.read_big_page_table(kernel)
    assert [a.tag for a in found.allocations] == [b"Fits", b"Else"]
    assert any("1 big page table entries run past the end of their pool region" in f.reason for f in found.findings)
    assert bigpages.find_big(kernel, start + size + 0x100) is None
