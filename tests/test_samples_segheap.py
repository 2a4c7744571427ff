"""The segment-heap pool generator, checked by decoding what it wrote.

The decoder here is independent of the generator: it uses the published
Windows 10 19041 x64 layouts as literals (offsets, bit positions, constants)
and walks the image from ``ExPoolState`` the way a debugger would.
"""

from __future__ import annotations

import random
import struct

import pytest

from samples.flavors import FLAVORS
from samples.image import Image
from samples.pooltables import PoolTables
from samples.segheap import SegmentHeapPools

PAGE = 0x1000
SEED_PAGE = 0xFFFFDC0155E94000
EPROCESS = 0xFFFFDC0150001080

# 19041 x64 layout facts (offsets in bytes)
HEAP_SEGCONTEXTS, SEGCONTEXT_SIZE = 0x100, 0xC0
SEGCTX_MASK, SEGCTX_SHIFT, SEGCTX_FIRST, SEGCTX_LIST = 0x0, 0x8, 0xA, 0x48
HEAP_VSCONTEXT, VSCTX_FREETREE, VSCTX_SUBSEGMENTS = 0x280, 0x10, 0x20
POOLNODE, LOOKASIDES, DYNAMIC_LOOKASIDE_SIZE = 0x3900, 0x40, 0x1040


class Reader:
    def __init__(self, image: Image):
        self.space = image.space

    def u8(self, a: int) -> int:
        return self.space.read(a, 1)[0]

    def u16(self, a: int) -> int:
        return struct.unpack("<H", self.space.read(a, 2))[0]

    def u32(self, a: int) -> int:
        return struct.unpack("<I", self.space.read(a, 4))[0]

    def u64(self, a: int) -> int:
        return struct.unpack("<Q", self.space.read(a, 8))[0]

    def ring(self, head: int) -> list[int]:
        entries, entry = [], self.u64(head)
        while entry != head:
            assert self.u64(self.u64(entry) + 8) == entry, "Flink/Blink disagree"
            entries.append(entry)
            entry = self.u64(entry)
            assert len(entries) < 100000
        assert self.u64(head + 8) == (entries[-1] if entries else head)
        return entries


def build(seed: int, count: int, physical: int = 64 << 20) -> tuple[Image, PoolTables, SegmentHeapPools]:
    image = Image(FLAVORS["win10-19041"], seed=seed, physical_size=physical)
    tables = PoolTables()
    pools = SegmentHeapPools(image, tables)
    pools.seed_page()
    rng = random.Random(seed)
    alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
    tags = [bytes(rng.choice(alphabet) for _ in range(4)) for _ in range(40)]
    for _ in range(count):
        pool = rng.choice(["NonPaged", "NonPagedNx", "NonPagedNx", "Paged", "Paged"])
        roll = rng.random()
        if roll < 0.55:
            size = rng.randrange(1, 0x1F0)
        elif roll < 0.95:
            size = rng.randrange(0x1F0, 0xFE0)
        elif roll < 0.99:
            size = rng.randrange(0xFE1, 0x90000)
        else:
            size = rng.randrange(0x90000, 0x900000)
        block = 0x10 + ((size + 15) & ~15)
        state = rng.choices(["Allocated", "Free", "Cached-free"], [8, 2, 1])[0]
        if state == "Cached-free" and (pool == "NonPaged" or size > 0xFE0 or not 0x200 <= block <= 0xF80):
            state = "Allocated"
        quota = EPROCESS if rng.random() < 0.1 else None
        pools.allocate(size, rng.choice(tags), pool, state, quota_process=quota, cache_aligned=rng.random() < 0.05)
    pools.finish()
    return image, tables, pools


@pytest.fixture(scope="module")
def built():
    return build(seed=1, count=3000)


def keys(image: Image, reader: Reader) -> tuple[int, int]:
    globals_address = reader.u64(image.symbol("ExPoolState"))
    assert globals_address == image.symbol("RtlpHpHeapGlobals")
    return reader.u64(globals_address), reader.u64(globals_address + 8)


def heaps(image: Image, reader: Reader) -> list[int]:
    state = image.symbol("ExPoolState")
    assert reader.u32(state + 0x38D0) == 1
    found = [reader.u64(state + POOLNODE + 8 * i) for i in range(4)]
    for heap in found:
        assert reader.u32(heap + 0x10) == 0xDDEEDDEE
    return found


def vs_decode(reader: Reader, chunk: int, heap_key: int) -> tuple[int, int, int]:
    """(UnsafeSize*16, UnsafePrevSize*16, Allocated) of the VS chunk header at ``chunk``."""
    bits = reader.u64(chunk) ^ chunk ^ heap_key
    return ((bits >> 16) & 0xFFFF) * 16, ((bits >> 32) & 0xFFFF) * 16, (bits >> 48) & 0xFF


def pool_header(reader: Reader, address: int) -> tuple[int, int, int, bytes]:
    raw = reader.space.read(address, 8)
    return raw[0], raw[2], raw[3], raw[4:8]


def walk(image: Image, reader: Reader) -> dict:
    """Every chunk reachable from ExPoolState, decoded independently of the generator."""
    heap_key, lfh_key = keys(image, reader)
    seen = {"vs": {}, "vs_free": {}, "lfh": {}, "range": {}, "free_nodes": {}}
    for heap in heaps(image, reader):
        for context in (0, 1):
            ctx = heap + HEAP_SEGCONTEXTS + context * SEGCONTEXT_SIZE
            shift, first = reader.u8(ctx + SEGCTX_SHIFT), reader.u8(ctx + SEGCTX_FIRST)
            assert (shift, first) == ((12, 2) if context == 0 else (16, 1))
            assert reader.u64(ctx + SEGCTX_MASK) == (0xFFFFFFFFFFF00000 if context == 0 else 0xFFFFFFFFFF000000)
            for segment in reader.ring(ctx + SEGCTX_LIST):
                assert reader.u64(segment + 0x10) ^ segment ^ ctx ^ heap_key == 0xA2E64EADA2E64EAD
                index = first
                while index < 256:
                    descriptor = segment + 0x20 * index
                    flags, units = reader.u8(descriptor + 0x18), reader.u8(descriptor + 0x1F)
                    assert units, f"descriptor {descriptor:#x} without UnitSize"
                    start, end = segment + (index << shift), segment + ((index + units) << shift)
                    if flags in (3, 0xB, 0xF):
                        assert reader.u32(descriptor) == 0xCCDDCCDD
                        for k in range(1, units):
                            assert reader.u8(descriptor + 0x20 * k + 0x18) == 1
                            assert reader.u8(descriptor + 0x20 * k + 0x1F) == k
                    else:
                        assert flags in (0, 2)
                        seen["free_nodes"][descriptor] = ctx
                    if flags == 0xF:
                        walk_vs(reader, start, end, heap_key, heap, seen)
                    elif flags == 0xB:
                        walk_lfh(reader, start, end, lfh_key, seen)
                    elif flags == 3:
                        seen["range"][start] = end - start
                    index += units
    return seen


def walk_vs(reader: Reader, start: int, end: int, heap_key: int, heap: int, seen: dict) -> None:
    size = reader.u16(start + 0x20)
    assert (reader.u16(start + 0x22) & 0x7FFF) ^ 0x2BED == size
    assert start + size * 16 == end
    chunk, previous, previous_free = start + 0x30, 0, False
    while chunk < end:
        length, prev_length, allocated = vs_decode(reader, chunk, heap_key)
        assert length >= 0x20 and prev_length == previous
        if not allocated:
            assert not previous_free, f"adjacent free VS chunks at {chunk:#x}"
            seen["vs_free"][chunk] = (length, heap)
        else:
            data = chunk + 0x10
            if data & 0xFFF == 0xFF0:
                data += 0x10  # the pool header never sits in a page's last 16 bytes
            if length - (data - chunk) <= 0xFF0 or pool_header(reader, data)[2] & 2:
                prev_size, blocks, pool_type, tag = pool_header(reader, data)
                block_end = data + blocks * 16
                slack = chunk + length - block_end  # a subsegment's last chunk may keep 16 unused bytes
                assert prev_size == 0 and pool_type & 2 and slack in (0, 0x10), hex(chunk)
                assert slack == 0 or chunk + length == end
                assert data // PAGE == (block_end - 1) // PAGE, f"small block at {data:#x} crosses a page"
                seen["vs"][data] = (blocks * 16, tag)
            else:
                seen["vs"][(chunk + 0x10 + 0xFFF) & ~0xFFF] = (None, None)
        previous, previous_free = length // 16, not allocated
        previous *= 16
        chunk += length
    assert chunk == end


def walk_lfh(reader: Reader, start: int, end: int, lfh_key: int, seen: dict) -> None:
    plain = reader.u32(start + 0x28) ^ (lfh_key & 0xFFFFFFFF) ^ ((start & 0xFFFFFFFF) >> 12)
    block, first = plain & 0xFFFF, plain >> 16
    count = reader.u16(start + 0x22)
    free_count, withheld = reader.u16(start + 0x20), reader.u8(start + 0x27)
    assert 0x20 <= block <= 0x200 and first >= 0x30 and start + first + count * block <= end
    allocated = crossing = 0
    for slot in range(count):
        address = start + first + slot * block
        bits = (reader.u8(start + 0x30 + slot // 4) >> (2 * (slot % 4))) & 3
        if address // PAGE != (address + block - 1) // PAGE:
            crossing += 1
            assert bits == 1  # withheld: marked busy, never handed out
            continue
        if bits == 1:
            allocated += 1
            _, blocks, pool_type, tag = pool_header(reader, address)
            assert blocks * 16 == block and pool_type & 2
        seen["lfh"][address] = (block, bits == 1)
    assert crossing == withheld and free_count == count - withheld - allocated


def test_seed_page_reproduces_the_transcript(built):
    image, _, pools = built
    reader = Reader(image)
    heap_key, _ = keys(image, reader)
    assert heap_key >> 32 == 0xDC7FF710
    expected = [  # chunk header, chunk bytes, allocated
        (0xFFFFDC0155E93FF0, 0x260, 1),
        (0xFFFFDC0155E94250, 0x60, 0),
        (0xFFFFDC0155E942B0, 0xD10, 1),
        (0xFFFFDC0155E94FC0, 0x20, 0),
    ]
    for (chunk, length, allocated), following in zip(expected, expected[1:] + [(0xFFFFDC0155E94FE0, 0, 1)]):
        got_length, _, got_allocated = vs_decode(reader, chunk, heap_key)
        assert (got_length, got_allocated) == (length, allocated)
        assert chunk + length == following[0]
    assert pool_header(reader, 0xFFFFDC0155E94000) == (0, 0x25, 2, b"MmCi")
    assert pool_header(reader, 0xFFFFDC0155E942C0) == (0, 0xD0, 2, b"Proc")
    # The next chunk (header at ...94fe0) keeps its pool header out of the page's last 16 bytes.
    length, prev_length, allocated = vs_decode(reader, 0xFFFFDC0155E94FE0, heap_key)
    assert allocated and prev_length == 0x20
    _, blocks, _, _ = pool_header(reader, 0xFFFFDC0155E95000)
    assert 0xFFFFDC0155E95000 + blocks * 16 == 0xFFFFDC0155E94FE0 + length
    # Free-chunk "tags" as WinDbg prints them: raw encoded header bytes 4..7.
    render = lambda raw: "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in raw)
    assert image.space.read(0xFFFFDC0155E94250 + 4, 4) == b"7+\x80#"
    assert render(image.space.read(0xFFFFDC0155E94FC0 + 4, 4)) == ".+.#"
    assert pools.seed.proc.address == 0xFFFFDC0155E942C0 and pools.seed.proc.size == 0xD00
    assert pools.seed.proc.body == 0xFFFFDC0155E942D0
    assert pools.seed.mmci.address == SEED_PAGE and pools.seed.mmci.size == 0x250
    assert pools.seed.free_after_mmci.address == 0xFFFFDC0155E94250 and pools.seed.free_after_mmci.size == 0x60
    # The owning heap of the seed page is NonPagedNx, found through the segment signature.
    segment = SEED_PAGE & 0xFFFFFFFFFFF00000
    nx_heap = heaps(image, reader)[1]
    assert reader.u64(segment + 0x10) ^ segment ^ (nx_heap + HEAP_SEGCONTEXTS) ^ heap_key == 0xA2E64EADA2E64EAD


def test_walk_matches_manifest(built):
    image, tables, _ = built
    seen = walk(image, Reader(image))
    manifest = image.manifest.allocations
    vs_live = {a.address: a for a in manifest if a.backing == "VS" and a.state != "Free"}
    assert {a: v[0] for a, v in seen["vs"].items() if v[0]} == {a: r.size for a, r in vs_live.items()}
    for address, record in vs_live.items():
        assert record.tag.encode("latin-1") == seen["vs"][address][1] or "\\x" in record.tag
    vs_free = {a.address: a.size for a in manifest if a.backing == "VS" and a.state == "Free"}
    assert {a: v[0] for a, v in seen["vs_free"].items()} == vs_free
    lfh = {a.address: (a.size, a.state == "Allocated") for a in manifest if a.backing == "LFH"}
    assert seen["lfh"] == lfh
    big = {b.va for b in tables.big if not b.free}
    live_big = {a.address for a in manifest if a.backing in ("Big", "Large") and a.state == "Allocated"}
    assert live_big == big
    in_ranges = {a for a in big if a in seen["range"]}
    in_vs = {a for a, v in seen["vs"].items() if v[0] is None}
    large = {a.address for a in manifest if a.backing == "Large" and a.state == "Allocated"}
    assert in_ranges | in_vs | large == big
    assert len(manifest) > 3000


def test_free_chunk_tree_orders_every_free_vs_chunk(built):
    image, _, _ = built
    reader = Reader(image)
    seen = walk(image, reader)
    for heap in heaps(image, reader):
        tree = heap + HEAP_VSCONTEXT + VSCTX_FREETREE
        order: list[int] = []

        def visit(node: int, parent: int) -> int:
            if not node:
                return 1
            assert reader.u64(node + 0x10) & ~1 == parent
            left = visit(reader.u64(node), node)
            order.append(node)
            right = visit(reader.u64(node + 8), node)
            assert left == right, "unequal black height"
            red = reader.u64(node + 0x10) & 1
            return left + (0 if red else 1)

        visit(reader.u64(tree), 0)
        chunks = [node - 8 for node in order]
        assert sorted(chunks) == sorted(a for a, (_, h) in seen["vs_free"].items() if h == heap)
        sizes = [seen["vs_free"][c][0] for c in chunks]
        assert sizes == sorted(sizes)


def test_lookaside_lists_hold_the_cached_free_blocks(built):
    image, _, _ = built
    reader = Reader(image)
    node = image.symbol("ExPoolState") + POOLNODE
    found = set()
    for index in (0, 1):
        lookaside = node + LOOKASIDES + index * DYNAMIC_LOOKASIDE_SIZE
        enabled = reader.u64(lookaside)
        for bucket in range(64):
            head = lookaside + 0x40 + bucket * 0x40
            depth = reader.u64(head) & 0xFFFF
            entry = (reader.u64(head + 8) >> 4) << 4
            assert bool(depth) == bool(enabled >> bucket & 1)
            walked = 0
            while entry:
                found.add(entry)
                walked += 1
                entry = reader.u64(entry)
            assert walked == depth
    cached = {a.body for a in image.manifest.allocations if a.state == "Cached-free"}
    assert cached and found == cached
    for record in image.manifest.allocations:
        if record.state == "Cached-free":
            _, blocks, pool_type, tag = pool_header(reader, record.address)
            assert blocks * 16 == record.size and pool_type & 2 and tag == record.tag.encode("latin-1")


def test_quota_and_cache_aligned_headers(built):
    image, _, pools = built
    reader = Reader(image)
    cookie = reader.u64(image.symbol("ExpPoolQuotaCookie"))
    assert cookie == pools.quota_cookie
    quota = [a for a in image.manifest.allocations if a.quota_process and a.backing in ("VS", "LFH")]
    aligned = [a for a in image.manifest.allocations if a.pool_type & 4 and a.state != "Free"
               and a.backing in ("VS", "LFH")]
    assert quota and aligned
    for record in quota:
        assert pool_header(reader, record.address)[2] & 8
        assert reader.u64(record.address + 8) ^ record.address ^ cookie == EPROCESS
    for record in aligned:
        assert record.body % 0x40 == 0
        second = record.body - 0x10
        if second != record.address:
            previous, blocks, _, tag = pool_header(reader, second)
            assert second - previous * 16 == record.address
            assert second + blocks * 16 == record.address + record.size
            assert tag == pool_header(reader, record.address)[3]


def test_free_page_ranges_are_tree_nodes(built):
    image, _, _ = built
    reader = Reader(image)
    seen = walk(image, reader)
    contexts = set(seen["free_nodes"].values())
    for ctx in contexts:
        expected = {d for d, c in seen["free_nodes"].items() if c == ctx}
        found, stack = set(), [reader.u64(ctx + 0x60)]
        while stack:
            node = stack.pop()
            if node:
                found.add(node)
                stack += [reader.u64(node), reader.u64(node + 8)]
        assert found == expected


def test_deterministic():
    first = build(seed=7, count=5000)[0]
    second = build(seed=7, count=200, physical=64 << 20)[0]
    assert first.space.physical != second.space.physical
    again = build(seed=7, count=5000)[0]
    assert again.space.physical == first.space.physical
    assert first.space.frames_used * PAGE < 48 << 20


def test_windows_11_pools_without_seed_page_or_session_tag_table():
    """22000 reproduces no 19041 transcript, keeps no session tag table and has 0x20-byte big page entries."""
    image = Image(FLAVORS["win11-22000"], seed=2, physical_size=16 << 20)
    tables = PoolTables()
    pools = SegmentHeapPools(image, tables)
    rng = random.Random(2)
    for _ in range(400):
        pools.allocate(rng.choice([0x30, 0x180, 0x600, 0x3000]), b"Tw11", rng.choice(["NonPagedNx", "Paged"]),
                       state=rng.choice(["Allocated", "Allocated", "Free"]))
    pools.finish()
    assert pools.seed is None
    assert not any(SEED_PAGE <= a.address < SEED_PAGE + PAGE for a in image.manifest.allocations)
    for allocation in image.manifest.allocations:
        start, size = image.flavor.regions["NonPagedPool" if allocation.pool == "NonPagedNx" else "PagedPool"]
        assert start <= allocation.address < start + size
    tables.track_from_manifest(image.manifest, image.rng)
    tables.write(image)
    assert "session" not in [table["name"] for table in image.manifest.extras["tracker_tables"]["tables"]]
    reader = Reader(image)
    table = reader.u64(image.symbol("PoolBigPageTable"))
    assert image.manifest.big_pages
    for entry in image.manifest.big_pages:
        record = table + entry["index"] * 0x20  # Va, Key, PoolType word, NumberOfBytes, ProcessBilled
        assert reader.u64(record) & ~1 == entry["va"] and reader.u64(record + 0x10) == entry["size"]
    with_session = PoolTables()
    with_session.track(b"Gla5", "Session", 1, 0, 0x40)
    with pytest.raises(ValueError):
        with_session.write(image)
