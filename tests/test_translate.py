"""The bulk page-table translator gives exactly what Volatility 3's own layer gives, page by page and range by range.

Two kinds of page tables are checked: every sample flavor's own tables, with entries rewritten into every
kind Windows keeps (transition, prototype, pagefile, large pages, high flag bits), and a small hand-made
hierarchy with what no sample holds (1 GiB pages, filler tables, tables outside memory, a layer below
with holes).  Volatility's layer is the reference in both: nothing here states what a translation should be.
"""

from __future__ import annotations

import random
import struct

import pytest
from volatility3.framework import contexts, exceptions, interfaces
from volatility3.framework.layers import intel, physical, segmented

from volplugins.pool import regions, translate

PAGE = 0x1000
LARGE = 0x200000
PRESENT, LARGE_BIT, PAT_LARGE, PROTOTYPE, TRANSITION = 0x1, 0x80, 0x1000, 0x400, 0x800
FRAME = 0x0000_0FFF_FFFF_F000
KERNEL_HALF = 0xFFFF_0000_0000_0000


class _Holes(segmented.SegmentedLayer):
    """A physical layer with a hole, as a crash dump's runs or a LiME file's ranges leave."""

    HOLE = (0x500000, 0x600000)

    def _load_segments(self) -> None:
        size = self.context.layers[self._base_layer].maximum_address + 1
        low, high = self.HOLE
        self._segments = [(0, 0, low, low), (high, high, size - high, size - high)]


def stack(buffer: bytes, dtb: int, holes: bool = False, layer_class=intel.WindowsIntel32e):
    """A fresh context holding ``buffer`` as physical memory (optionally with a hole) and a kernel layer on it."""
    context = contexts.Context()
    context.add_layer(physical.BufferDataLayer(context, "config.buffer", "buffer", buffer))
    below = "buffer"
    if holes:
        context.config["config.holes.base_layer"] = "buffer"
        context.add_layer(_Holes(context, "config.holes", "holes"))
        below = "holes"
    context.config["config.kernel.memory_layer"] = below
    context.config["config.kernel.page_map_offset"] = dtb
    context.add_layer(layer_class(context, "config.kernel", "kernel"))
    return context


def layer_mapping(context, start: int, size: int) -> list:
    return list(context.layers["kernel"].mapping(start, size, ignore_errors=True))


def assert_same(context, pages: list[int], ranges: list[tuple[int, int]]) -> None:
    tables = translate.page_tables(context, "kernel")
    assert tables is not None
    differing = [page for page in pages if tables.mapping(page, PAGE) != layer_mapping(context, page, PAGE)]
    assert differing[:10] == []
    for start, size in ranges:
        assert tables.mapping(start, size) == layer_mapping(context, start, size), hex(start)


def assert_same_absence(context, ranges: list[tuple[int, int]], monkeypatch) -> None:
    """The bulk count of missing pages by cause equals the layer's own refusals, page by page (a range over a
    large page the layer below holds only part of differs: its mapping leaves the whole page out)."""
    tables = translate.page_tables(context, "kernel")
    bulk = [tables.absence(start, size) for start, size in ranges]
    monkeypatch.setattr(translate, "page_tables", lambda context, layer_name: None)
    assert [translate.absence(context, "kernel", start, size) for start, size in ranges] == bulk
    assert any(found.paged_out for found in bulk) and any(found.unmapped for found in bulk)


def entry_at(memory: bytearray, table: int, index: int) -> int:
    return struct.unpack_from("<Q", memory, table + 8 * index)[0]


def put(memory: bytearray, table: int, index: int, value: int) -> None:
    struct.pack_into("<Q", memory, table + 8 * index, value)


# --------------------------------------------------------------------------- every sample flavor


def page_tables_under(memory: bytearray, dtb: int, start: int, end: int):
    """(page-table address, first address it maps) of every PD entry pointing to a table in [start, end)."""
    found = []
    for level4 in range((start >> 39) & 0x1FF, (((end - 1) >> 39) & 0x1FF) + 1):
        pdpt = entry_at(memory, dtb, level4)
        if not pdpt & PRESENT:
            continue
        for level3 in range(512):
            pd = entry_at(memory, pdpt & FRAME, level3)
            base3 = KERNEL_HALF | level4 << 39 | level3 << 30
            if not pd & PRESENT or not (start < base3 + (1 << 30) and base3 < end):
                continue
            for level2 in range(512):
                pt = entry_at(memory, pd & FRAME, level2)
                base2 = base3 | level2 << 21
                if pt & PRESENT and not pt & LARGE_BIT and start <= base2 < end:
                    found.append((pt & FRAME, pd & FRAME, level2, base2))
    return found


def rewrite(memory: bytearray, tables, image_size: int) -> list[int]:
    """Turn the sample's entries into every kind Windows keeps; return the large pages made."""
    large = []
    for number, (pt, pd, index, base) in enumerate(tables):
        if number % 5 == 1:  # a 2 MiB page in place of the table, its PAT bit set
            put(memory, pd, index, 0x400000 | PAT_LARGE | LARGE_BIT | 0x63)
            large.append(base)
            continue
        if number % 5 == 3:  # a 2 MiB page half past the end of memory
            put(memory, pd, index, (image_size - LARGE // 2) & ~(LARGE - 1) | LARGE_BIT | 0x63)
            large.append(base)
            continue
        for slot in range(512):
            entry = entry_at(memory, pt, slot)
            if not entry:
                continue
            kind = slot % 6
            if kind == 1:  # standby or modified page: transition entry, frame kept
                entry = entry & ~PRESENT | TRANSITION
            elif kind == 2:  # prototype entry: the page is described elsewhere
                entry = entry & ~PRESENT | PROTOTYPE
            elif kind == 3:  # paged out: pagefile offset in the high half
                entry = (entry & FRAME) << 20 | 0x80
            elif kind == 4:  # flags above the frame (NX, software bits)
                entry |= 1 << 63 | 0x7 << 52
            put(memory, pt, slot, entry)
    return large


def test_sample_page_tables_of_every_kind(sample, monkeypatch):
    kernel = sample.kernel
    dtb = kernel.layer.config["page_map_offset"]
    memory = bytearray(sample.image.read_bytes())
    pool = [r for r in regions.kernel_regions(kernel)]
    tables = [t for region in pool for t in page_tables_under(memory, dtb, region.start, region.end)]
    assert tables, "the sample maps pool through page tables"
    large = rewrite(memory, tables, len(memory))
    assert large
    context = stack(bytes(memory[: len(memory) - LARGE // 4]), dtb)
    pages = sorted({base + n * PAGE for _, _, _, base in tables for n in range(512)})
    ranges = [(region.start, region.size) for region in pool]
    ranges += [(base + 0x10, LARGE - 0x20) for base in large] + [(base - 0x800, 3 * PAGE) for base in large]
    assert_same(context, pages, ranges)
    assert_same_absence(context, [(page, PAGE) for page in pages[: 10 * 512]], monkeypatch)


def test_census_ranges_of_the_sample_itself(sample):
    """On the image as Volatility stacked it (file layer below), every region maps the same either way."""
    kernel = sample.kernel
    tables = translate.page_tables(kernel.context, kernel.layer_name)
    assert tables is not None
    for region in regions.kernel_regions(kernel):
        assert tables.mapping(region.start, region.size) == \
            list(kernel.layer.mapping(region.start, region.size, ignore_errors=True)), region.name


def refusal(read, offset: int, length: int):
    """What a read gives: its bytes, or the layer and address of the error refusing it."""
    try:
        return read(offset, length)
    except exceptions.InvalidAddressException as error:
        return error.layer_name, error.invalid_address


def test_image_file_reads_equal_the_file_layer(sample):
    """Bulk walks read a raw image file directly, as bytes or into a buffer: the same bytes as the file layer, the
    same refusals past its end, and the layer itself for anything that is not a plain file."""
    kernel = sample.kernel
    below = kernel.layer.config["memory_layer"]
    layer = kernel.context.layers[below]
    read = translate.physical_reader(kernel.context, below)
    assert type(layer) is physical.FileLayer and read != layer.read
    size = layer.maximum_address + 1
    chooser = random.Random(3)
    pieces = [(chooser.randrange(size), chooser.choice([1, 8, 0x10, PAGE, 3 * PAGE])) for _ in range(300)]
    pieces += [(0, PAGE), (size - PAGE, PAGE), (size - 8, 16), (size, 8), (size + PAGE, 8), (-8, 16)]
    assert [refusal(read, *piece) for piece in pieces] == [refusal(layer.read, *piece) for piece in pieces]
    fill = translate.physical_filler(kernel.context, below)
    assert [refusal(filled(fill), *piece) for piece in pieces] == [refusal(layer.read, *piece) for piece in pieces]
    context = stack(bytes(range(256)) * 16, DTB)
    assert translate.physical_reader(context, "buffer") == context.layers["buffer"].read
    fill = translate.physical_filler(context, "buffer")
    pieces = [(0, PAGE), (0x10, 0x20), (PAGE - 8, 16), (-8, 16)]
    assert [refusal(filled(fill), *piece) for piece in pieces] == \
        [refusal(context.layers["buffer"].read, *piece) for piece in pieces]


def filled(fill):
    """A filler used as a reader: the bytes it puts into a buffer of the length asked for."""
    def read(offset: int, length: int) -> bytes:
        buffer = bytearray(length)
        fill(offset, memoryview(buffer))
        return bytes(buffer)
    return read


def _reads(context, name: str, pieces, pad: bool) -> tuple[list, list]:
    """What :func:`translate.layer_read` and the layer's own read give for each piece."""
    layer = context.layers[name]
    ours = [refusal(lambda at, size: translate.layer_read(context, name, at, size, pad), *piece) for piece in pieces]
    theirs = [refusal(lambda at, size: layer.read(at, size, pad=pad), *piece) for piece in pieces]
    return ours, theirs


def test_kernel_reads_equal_the_layer(sample, monkeypatch):
    """Single reads keep the layer's translation and take its bytes from the file: the same bytes and refusals
    as the layer's read, padded or not, in one page or across pages, mapped or not, on the sample as stacked
    and on its page tables rewritten into every kind of entry over a memory shorter than they map; many small
    reads at once give the same."""
    kernel = sample.kernel
    chooser = random.Random(5)
    allocations = sample.manifest["allocations"]
    starts = [chooser.choice(allocations)["address"] for _ in range(150)]
    starts += [region.start + chooser.randrange(region.size) for region in regions.kernel_regions(kernel)
               for _ in range(30)]
    pieces = [(start + chooser.choice([0, 8, PAGE - 8]), chooser.choice([1, 8, 0x130, PAGE, 2 * PAGE + 8]))
              for start in starts]
    for pad in (False, True):
        ours, theirs = _reads(kernel.context, kernel.layer_name, pieces, pad)
        assert ours == theirs
        assert sum(isinstance(found, bytes) for found in ours) > len(pieces) // 4
    memory = bytearray(sample.image.read_bytes())
    dtb = kernel.layer.config["page_map_offset"]
    pool = regions.kernel_regions(kernel)
    tables = [t for region in pool for t in page_tables_under(memory, dtb, region.start, region.end)]
    large = rewrite(memory, tables, len(memory))
    context = stack(bytes(memory[: len(memory) - LARGE // 4]), dtb)
    pages = [base + n * PAGE for _, _, _, base in tables for n in range(0, 512, 7)] + large
    pieces = [(page + chooser.choice([0, 0x10, PAGE - 4]), chooser.choice([4, 0x100, PAGE])) for page in pages]
    for pad in (False, True):
        ours, theirs = _reads(context, "kernel", pieces, pad)
        assert ours == theirs
    for found in (kernel.context, kernel.layer_name, starts), (context, "kernel", pages):
        _same_many(*found, chooser)


def _same_many(context, name: str, addresses: list[int], chooser: random.Random) -> None:
    """Reads of many small pieces at once give what the layer's read gives each, None where it refuses."""
    layer = context.layers[name]
    wanted = [address + chooser.choice([0, 8, PAGE - 8]) for address in addresses]
    wanted = [address - address % 8 for address in wanted]
    theirs = [refusal(layer.read, address, 8) for address in wanted]
    theirs = [found if isinstance(found, bytes) else None for found in theirs]
    assert translate.read_many(context, name, wanted, 8) == theirs
    assert any(theirs) and None in theirs


# --------------------------------------------------------------------------- a hand-made hierarchy

MEMORY = 0xE00000  # 14 MiB of physical memory
DTB = 0x1000


def handmade() -> bytearray:
    """PML4 at 0x1000; every kind of entry at every level, and a page table of random entries."""
    memory = bytearray(MEMORY)
    pdpt, pdpt_transition, filler_pdpt, kernel_pdpt = 0x2000, 0x3000, 0x4000, 0x5000
    pd, pt, zero_pt, filler_pt, random_pt = 0x6000, 0x7000, 0x8000, 0x9000, 0xA000
    put(memory, DTB, 0, pdpt | 0x63)
    put(memory, DTB, 1, pdpt_transition | TRANSITION | 0x62)  # transition at the top: still followed
    put(memory, DTB, 2, pdpt | TRANSITION | PROTOTYPE)  # refused
    put(memory, DTB, 3, filler_pdpt | 0x63)  # a table of identical entries: skipped
    put(memory, DTB, 4, (MEMORY + 0x5000) | 0x63)  # a table outside memory
    put(memory, DTB, 5, pdpt | LARGE_BIT | 0x63)  # PS means nothing at the top: followed
    put(memory, DTB, 0x1FF, kernel_pdpt | 0x63)
    for index in range(512):
        put(memory, filler_pdpt, index, pd | 0x63)
        put(memory, filler_pt, index, 0x100000 | 0x63)
    put(memory, pdpt, 0, pd | 0x63)
    put(memory, pdpt, 1, LARGE_BIT | 0x63)  # 1 GiB page over all of memory and beyond
    put(memory, pdpt, 2, 0x40000000 | LARGE_BIT | 0x62)  # 1 GiB page, not present
    put(memory, pdpt, 3, PAT_LARGE | LARGE_BIT | TRANSITION)  # 1 GiB page in transition, PAT bit set
    put(memory, pdpt_transition, 7, pd | 0x63)
    put(memory, kernel_pdpt, 0x1FE, pd | 0x63)
    put(memory, pd, 0, pt | 0x63)
    put(memory, pd, 1, 0x200000 | PAT_LARGE | LARGE_BIT | 0x63)
    put(memory, pd, 2, (MEMORY - LARGE // 2) & ~(LARGE - 1) | LARGE_BIT | 0x63)  # half past the end
    put(memory, pd, 3, 0x400000 | LARGE_BIT | TRANSITION)
    put(memory, pd, 4, 0x400000 | LARGE_BIT | TRANSITION | PROTOTYPE)
    put(memory, pd, 5, zero_pt | 0x63)
    put(memory, pd, 6, filler_pt | 0x63)
    put(memory, pd, 7, 0x600000 | LARGE_BIT | 0x62)  # large, not present
    put(memory, pd, 8, random_pt | 0x63)
    put(memory, pd, 9, 0x300000 | LARGE_BIT | 0x63 | 0x1E000)  # stray low bits in a large page's frame
    kinds = [0x100000 | 0x63, 0, 0x101000 | TRANSITION, 0x102000 | PROTOTYPE, 0x103000 | TRANSITION | PROTOTYPE,
             0x0000_0001_0000_0080, (MEMORY + PAGE) | 0x63, 0xFFF0_0000_0010_4063, (MEMORY - PAGE) | 0x63,
             0x105000 | 0x62]
    for index, value in enumerate(kinds):
        put(memory, pt, index, value)
    chooser = random.Random(14)
    for index in range(512):
        frame = chooser.randrange(0, MEMORY + 16 * PAGE) & FRAME
        flags = chooser.choice([0, PRESENT, TRANSITION, PROTOTYPE, TRANSITION | PROTOTYPE, LARGE_BIT, 0x63])
        high = chooser.choice([0, 1 << 63, chooser.getrandbits(12) << 52])
        put(memory, random_pt, index, high | frame | flags)
    return memory


HANDMADE_RANGES = [
    (0, 1 << 39),  # the whole lower PML4 entry
    (0, 6 << 39),
    (0x1000, 0x5000),
    (LARGE + 0x123, LARGE),  # across a large page boundary, unaligned
    (1 << 30, 2 << 30),  # the 1 GiB pages
    ((1 << 30) + 0x10, 0x3000),
    (7 << 30 | 1 << 39, 4 << 21),
    (KERNEL_HALF | 0x1FF << 39 | 0x1FE << 30, 10 << 21),
    (0xFFFF_FFFF_8000_0000, 1 << 30),
]


def handmade_pages() -> list[int]:
    low = [n * PAGE for n in range(10 * 512)]
    giant = [(1 << 30) + n * PAGE for n in range(0, 1 << 18, 97)] + [(3 << 30) + n * PAGE for n in range(64)]
    kernel = [KERNEL_HALF | 0x1FF << 39 | 0x1FE << 30 | n * PAGE for n in range(0, 10 * 512, 7)]
    other = [n << 39 | m * PAGE for n in (1, 2, 3, 4, 5) for m in range(0, 512 * 512 * 8, 4099)]
    return low + giant + kernel + other


ABSENCE_RANGES = [(0, 10 * LARGE), ((1 << 30) - 0x4000, 0x10000), (3 << 30, 128 * PAGE),
                  (KERNEL_HALF | 0x1FF << 39 | 0x1FE << 30, 4 * LARGE), (1 << 39, 2 * LARGE)]


def test_handmade_page_tables(monkeypatch):
    context = stack(bytes(handmade()), DTB)
    assert_same(context, handmade_pages(), HANDMADE_RANGES)
    assert_same_absence(context, ABSENCE_RANGES, monkeypatch)


def test_handmade_page_tables_over_a_physical_layer_with_a_hole(monkeypatch):
    context = stack(bytes(handmade()), DTB, holes=True)
    assert translate.page_tables(context, "kernel").physical_name == "holes"
    assert_same(context, handmade_pages(), HANDMADE_RANGES)
    assert_same_absence(context, [(page, PAGE) for page in range(0, 10 * LARGE, PAGE)], monkeypatch)


@pytest.mark.parametrize("layer_class", [intel.WindowsIntelPAE, intel.Intel32e, intel.LinuxIntel32e])
def test_other_layers_translate_themselves(layer_class):
    context = stack(bytes(handmade()), DTB, layer_class=layer_class)
    assert translate.page_tables(context, "kernel") is None
    for start, size in [(0, 1 << 31), (LARGE + 0x123, LARGE)]:
        assert list(translate.mapping(context, "kernel", start, size)) == layer_mapping(context, start, size)


def test_a_layer_with_a_swap_file_translates_itself():
    context = stack(bytes(handmade()), DTB)
    context.add_layer(physical.BufferDataLayer(context, "config.swap", "swap", bytes(MEMORY)))
    context.config[interfaces.configuration.path_join("config.kernel", "swap_layers", "swap_layers0")] = "swap"
    assert translate.page_tables(context, "kernel") is None


def test_table_reads_pad_what_no_page_maps():
    context = stack(bytes(handmade()), DTB)
    layer = context.layers["kernel"]
    for start, size in [(0, 10 * LARGE), (LARGE + 0x123, LARGE), ((1 << 30) + 0x10, 0x3000),
                        (KERNEL_HALF | 0x1FF << 39 | 0x1FE << 30, 4 * LARGE)]:
        mapped = sum(length for _, length, _, _, _ in layer.mapping(start, size, ignore_errors=True))
        assert translate.read(context, "kernel", start, size) == (layer.read(start, size, pad=True), size - mapped)


def test_table_reads_take_a_refused_piece_through_the_layer_below(monkeypatch):
    """A piece the direct read refuses (a lower layer whose mapping names more than it holds) is read by the
    layer below itself, padded, so the bytes still equal the layer's own read."""
    context = stack(bytes(handmade()), DTB)
    layer = context.layers["kernel"]

    def refusing(context, layer_name):
        def refuse(offset, view):
            raise exceptions.InvalidAddressException(layer_name, offset, "refused")

        return refuse

    monkeypatch.setattr(translate, "physical_filler", refusing)
    start, size = (1 << 30) + 0x10, 0x3000  # mapped, and not all zeros
    data = layer.read(start, size, pad=True)
    assert any(data)
    mapped = sum(length for _, length, _, _, _ in layer.mapping(start, size, ignore_errors=True))
    assert translate.read(context, "kernel", start, size) == (data, size - mapped)
