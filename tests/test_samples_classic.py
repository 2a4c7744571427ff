"""The classic pool model (Windows 7, Windows 10 1809) and the bookkeeping tables, checked by re-reading written bytes.

Every check decodes memory with the ISF's own offsets and bit positions and
compares it with the manifest and with the counts given to the builders.
"""

from __future__ import annotations

import struct
import time
from collections import defaultdict

import pytest

from samples.classic import ClassicPools
from samples.flavors import FLAVORS
from samples.image import Image
from samples.kernel import build_kernel
from samples.pooltables import PoolTables, tag_bytes

PAGE = 0x1000
EPROCESS = 0xFFFFFA8000CD4040
TAGS = [bytes(f"T{i:02d}", "ascii") + b" " for i in range(40)]
HISTORIC_TAGS = [bytes(f"H{i:03d}", "ascii") for i in range(40)]


def big_page_index(va: int, count: int) -> int:
    """Windows' big page hash, written out here independently of the generator."""
    h = ((va >> 12) & 0xFFFFFFFF) * 0x9E5F
    return (h ^ (h >> 32)) & (count - 1)


def tag_hash_index(key: int, mask: int) -> int:
    h = 40543 * key
    return (h ^ (h >> 32)) & mask


def _u64(image: Image, address: int) -> int:
    return struct.unpack("<Q", image.space.read(address, 8))[0]


def _field(image: Image, type_name: str, raw: bytes, offset: int, path: str) -> int:
    layout = image.types.field(type_name, path)
    value = int.from_bytes(raw[offset + layout.offset : offset + layout.offset + layout.size], "little")
    if layout.bit_position is not None:
        value = (value >> layout.bit_position) & ((1 << layout.bit_length) - 1)
    return value


def _populate(image: Image, tables: PoolTables, count: int) -> ClassicPools:
    pools = ClassicPools(image, tables)
    rng = image.rng
    for _ in range(count):
        tag = rng.choice(TAGS)
        pool = rng.choice(("NonPaged", "NonPagedNx", "Paged", "Paged", "Session"))
        size = rng.randint(0x1000, 0x9000) if rng.random() < 0.006 else rng.randint(1, 0xA00)
        pools.allocate(
            size,
            tag,
            pool,
            state="Free" if rng.random() < 0.15 else "Allocated",
            quota_process=EPROCESS if rng.random() < 0.05 else None,
            cache_aligned=rng.random() < 0.05,
        )
    pools.finish()
    return pools


@pytest.fixture(scope="module")
def win7():
    image = Image(FLAVORS["win7-sp1"], seed=1, physical_size=64 << 20)
    tables = PoolTables()
    _populate(image, tables, 6000)
    tables.track_from_manifest(image.manifest, image.rng)
    for tag in HISTORIC_TAGS:
        tables.track(tag, "Paged", 7, 7, 0)
    tables.write(image)
    return image, tables


def _pages(image: Image) -> dict[int, list]:
    pages = defaultdict(list)
    for allocation in image.manifest.allocations:
        if allocation.backing == "Page":
            pages[allocation.address & ~(PAGE - 1)].append(allocation)
    return pages


def test_pages_are_complete_chains_that_match_the_manifest(win7):
    image, _ = win7
    pages = _pages(image)
    assert len(image.manifest.allocations) >= 6000
    header = image.types.size("_POOL_HEADER")
    for base, recorded in pages.items():
        raw = image.space.read(base, PAGE)
        offset, previous, previous_free, decoded = 0, 0, False, []
        while offset < PAGE:
            blocks = _field(image, "_POOL_HEADER", raw, offset, "BlockSize")
            pool_type = _field(image, "_POOL_HEADER", raw, offset, "PoolType")
            assert blocks > 0
            assert _field(image, "_POOL_HEADER", raw, offset, "PreviousSize") == previous
            free = pool_type == 0
            assert not (free and previous_free), f"adjacent free chunks at {base + offset:#x}"
            tag = raw[offset + 4 : offset + 8]
            decoded.append((base + offset, blocks * 16, previous * 16, tag, "Free" if free else "Allocated", pool_type))
            previous, previous_free = blocks, free
            offset += blocks * 16
        assert offset == PAGE
        expected = sorted(
            (a.address, a.size, a.previous_size, tag_bytes(a.tag), a.state) for a in recorded
        )
        assert sorted(d[:5] for d in decoded) == expected
        by_address = {a.address: a for a in recorded}
        for address, size, _, _, state, pool_type in decoded:
            allocation = by_address[address]
            assert allocation.body == address + header
            if state == "Allocated":
                assert pool_type & 2
                assert pool_type & 1 == (allocation.pool in ("Paged", "Session"))
                assert pool_type & ~2 == allocation.pool_type & 0xFF


def test_quota_cache_aligned_and_pools(win7):
    image, _ = win7
    billed_offset = image.types.offset("_POOL_HEADER", "ProcessBilled")
    regions = image.flavor.regions
    quota = aligned = 0
    for allocation in image.manifest.allocations:
        if allocation.backing != "Page":
            continue
        name = {"NonPaged": "NonPagedPool", "Paged": "PagedPool", "Session": "Session"}[allocation.pool]
        start, size = regions[name]
        assert start <= allocation.address < start + size
        if allocation.state != "Allocated":
            continue
        if allocation.quota_process is not None:
            quota += 1
            assert allocation.pool_type & 8
            assert _u64(image, allocation.address + billed_offset) == EPROCESS
        if allocation.pool_type & 4:
            aligned += 1
            assert allocation.body % 64 == 0
    assert quota > 50 and aligned > 50
    assert not any(a.pool == "NonPagedNx" for a in image.manifest.allocations)


def test_free_lists_run_through_free_chunks(win7):
    image, _ = win7
    descriptor = image.symbol("NonPagedPoolDescriptor")
    heads = descriptor + image.types.offset("_POOL_DESCRIPTOR", "ListHeads")
    free = {
        a.body: a.size // 16
        for a in image.manifest.allocations
        if a.backing == "Page" and a.pool == "NonPaged" and a.state == "Free" and a.size > 16
    }
    seen = 0
    for slot in range(256):
        head = heads + 16 * slot
        node, previous = _u64(image, head), head
        while node != head:
            assert free.pop(node) == slot + 1
            assert _u64(image, node + 8) == previous
            previous, node = node, _u64(image, node)
            seen += 1
        assert _u64(image, head + 8) == previous
    assert seen > 100 and not free
    assert _u64(image, image.symbol("PoolVector")) == descriptor


def test_region_variables(win7):
    image, _ = win7
    nonpaged = image.flavor.regions["NonPagedPool"]
    paged = image.flavor.regions["PagedPool"]
    assert _u64(image, image.symbol("MmNonPagedPoolStart")) == nonpaged[0]
    assert _u64(image, image.symbol("MmMaximumNonPagedPoolInBytes")) == nonpaged[1]
    assert _u64(image, image.symbol("MmPagedPoolEnd")) == paged[0] + paged[1] - 1
    assert _u64(image, image.symbol("MmSizeOfPagedPoolInBytes")) == paged[1]


def _big_table(image: Image) -> list[tuple[int, int, int, int]]:
    address = _u64(image, image.symbol("PoolBigPageTable"))
    count = _u64(image, image.symbol("PoolBigPageTableSize"))
    size = image.types.size("_POOL_TRACKER_BIG_PAGES")
    raw = image.space.read(address, count * size)
    return [
        tuple(_field(image, "_POOL_TRACKER_BIG_PAGES", raw, i * size, f) for f in ("Va", "Key", "PoolType", "NumberOfBytes"))
        for i in range(count)
    ]


def _check_big_table(image: Image, tables: PoolTables) -> None:
    entries = _big_table(image)
    count = len(entries)
    assert count & (count - 1) == 0
    for allocation in tables.big:
        index = big_page_index(allocation.va, count)
        while entries[index][0] & ~1 != allocation.va:
            assert entries[index][1], "probe passed a never-used entry"
            index = (index + 1) % count
        va, key, pool_type, size = entries[index]
        assert va & 1 == allocation.free
        assert key == int.from_bytes(allocation.tag, "little")
        assert pool_type == allocation.pool_type and size == allocation.size
    # What a listing of in-use big allocations shows: entries with a tag and no free bit.
    listed = sorted((va, size) for va, key, _, size in entries if key and not va & 1)
    assert listed == sorted((a.va, a.size) for a in tables.big if not a.free)
    unused = [e for e in entries if not e[1]]
    assert all(va == 1 for va, *_ in unused)


def test_big_page_table(win7):
    image, tables = win7
    assert sum(a.free for a in tables.big) >= 3 and sum(not a.free for a in tables.big) >= 10
    _check_big_table(image, tables)
    live = sorted((a.address, a.size) for a in image.manifest.allocations if a.backing == "Big" and a.state == "Allocated")
    assert live == sorted((a.va, a.size) for a in tables.big if not a.free)
    for address, _ in live:
        assert image.space.is_mapped(address)
    recorded = {(b["va"], b["index"], b["free"]) for b in image.manifest.big_pages}
    assert len(recorded) == len(tables.big)


def _tracker_rows(image: Image, address: int, count: int) -> list[dict]:
    size = image.types.size("_POOL_TRACKER_TABLE")
    raw = image.space.read(address, count * size)
    names = ("Key", "NonPagedAllocs", "NonPagedFrees", "NonPagedBytes", "PagedAllocs", "PagedFrees", "PagedBytes")
    return [{n: _field(image, "_POOL_TRACKER_TABLE", raw, i * size, n) for n in names} for i in range(count)]


def _tracker_totals(image: Image, processors: int = 2) -> tuple[dict, dict]:
    """Totals per (tag, column) over the distinct system tables, and the session table's rows."""
    mask64 = (1 << 64) - 1
    size = _u64(image, image.symbol("PoolTrackTableSize"))
    mask = _u64(image, image.symbol("PoolTrackTableMask"))
    glob = _u64(image, image.symbol("PoolTrackTable"))
    pointers = [_u64(image, image.symbol("ExPoolTagTables") + 8 * cpu) for cpu in range(processors + 1)]
    assert pointers[0] == glob and pointers[processors] == 0 and len(set(pointers[:processors])) == processors
    assert mask + 2 == size and size - 1 & mask == 0
    global_rows = _tracker_rows(image, glob, size)
    tables = [global_rows] + [_tracker_rows(image, p, size) for p in pointers[1:processors]]
    for index, row in enumerate(global_rows):
        if row["Key"]:
            # Linear probing from the home slot reaches the row without passing an empty slot.
            probe = tag_hash_index(row["Key"], mask)
            while global_rows[probe]["Key"] != row["Key"]:
                assert global_rows[probe]["Key"]
                probe = (probe + 1) & mask
            assert probe == index
    for table in tables[1:]:
        for index, row in enumerate(table):
            assert row["Key"] in (0, global_rows[index]["Key"])
    expansion = _u64(image, image.symbol("PoolTrackTableExpansion"))
    expansion_size = _u64(image, image.symbol("PoolTrackTableExpansionSize"))
    if expansion:
        tables.append(_tracker_rows(image, expansion, expansion_size))
    totals: dict = defaultdict(lambda: [0, 0, 0])
    for table in tables:
        for row in table:
            if not row["Key"]:
                continue
            for column, prefix in (("Nonp", "NonPaged"), ("Paged", "Paged")):
                total = totals[(row["Key"], column)]
                total[0] += row[prefix + "Allocs"]
                total[1] += row[prefix + "Frees"]
                total[2] = (total[2] + row[prefix + "Bytes"]) & mask64
    session_size = _u64(image, image.symbol("ExpSessionPoolTrackTableSize"))
    session = _tracker_rows(image, _u64(image, image.symbol("ExpSessionPoolTrackTable")), session_size)
    return totals, {row["Key"]: row for row in session if row["Key"]}


def _key(text: str) -> int:
    return int.from_bytes(tag_bytes(text), "little")


def test_tracker_tables_sum_to_the_counts(win7):
    image, tables = win7
    totals, session = _tracker_totals(image)
    rows = image.manifest.tracker
    assert {r["pool"] for r in rows} == {"Nonp", "Paged", "Session"}
    for row in rows:
        if row["pool"] == "Session":
            written = session[_key(row["tag"])]
            assert (written["PagedAllocs"], written["PagedFrees"], written["PagedBytes"]) == (row["allocs"], row["frees"], row["bytes"])
        else:
            assert totals[(_key(row["tag"]), row["pool"])] == [row["allocs"], row["frees"], row["bytes"]]
    # The manifest rows are the counts handed in: live bytes and chunk states per tag and pool.
    live = defaultdict(lambda: [0, 0])
    for allocation in image.manifest.allocations:
        pool = {"NonPaged": "Nonp", "Paged": "Paged", "Session": "Session"}[allocation.pool]
        entry = live[(allocation.tag, pool)]
        if allocation.state == "Allocated":
            entry[0] += allocation.size
        else:
            entry[1] += 1
    by_key = {(r["tag"], r["pool"]): r for r in rows}
    for (tag, pool), (bytes_, freed) in live.items():
        row = by_key[(tag, pool)]
        if tag != "Pool":
            assert row["bytes"] == bytes_
        assert row["frees"] >= freed and row["allocs"] - row["frees"] >= 0
    for tag in HISTORIC_TAGS:
        assert totals[(int.from_bytes(tag, "little"), "Paged")] == [7, 7, 0]


def test_small_tag_table_overflows_into_expansion(win7):
    image, _ = win7
    layout = image.manifest.extras["tracker_tables"]
    names = [table["name"] for table in layout["tables"]]
    assert names == ["cpu0", "cpu1", "expansion", "session"]
    expansion = layout["tables"][2]
    system_tags = {r["tag"] for r in image.manifest.tracker if r["pool"] != "Session"}
    assert len(expansion["entries"]) == len(system_tags) - 64
    entries = _u64(image, image.symbol("PoolTrackTableExpansionSize"))
    pages = -(-entries * 0x28 // PAGE)
    assert entries == pages * PAGE // 0x28


def test_win10_tables_use_their_own_layout():
    image = Image(FLAVORS["win10-19041"], seed=3, physical_size=16 << 20)
    tables = PoolTables(big_table_size=1024, track_table_size=None)
    base = image.flavor.regions["NonPagedPool"][0]
    rng = image.rng
    for index in range(300):
        tag = rng.choice(TAGS)
        tables.add_big(base + index * 0x3000, 0x2000, tag, 0x200 if index % 3 else 1, free=index % 7 == 0)
    for index, tag in enumerate(TAGS):
        tables.track(tag, ("NonPagedNx", "Paged", "Session")[index % 3], 100 + index, 40, 0x1000 * index)
    tables.write(image)
    assert image.types.size("_POOL_TRACKER_TABLE") == 0x38
    _check_big_table(image, tables)
    totals, session = _tracker_totals(image)
    assert _u64(image, image.symbol("PoolTrackTableSize")) == 513
    for index, tag in enumerate(TAGS):
        key = int.from_bytes(tag, "little")
        if index % 3 == 2:
            assert session[key]["PagedAllocs"] == 100 + index and session[key]["PagedBytes"] == 0x1000 * index
        else:
            column = "Nonp" if index % 3 == 0 else "Paged"
            assert totals[(key, column)] == [100 + index, 40, 0x1000 * index]
    assert _u64(image, image.symbol("PoolTrackTableExpansion")) == 0


def test_classic_pool_is_fast():
    image = Image(FLAVORS["win7-sp1"], seed=2, physical_size=64 << 20)
    started = time.perf_counter()
    _populate(image, PoolTables(), 5000)
    assert time.perf_counter() - started < 1.5


def test_volatility_lists_exactly_the_live_big_allocations(tmp_path):
    from volrun import VolSession

    image = Image(FLAVORS["win7-sp1"], seed=4, physical_size=32 << 20)
    build_kernel(image)
    tables = PoolTables()
    _populate(image, tables, 2500)
    tables.write(image)
    image.space.save(tmp_path / "win7.raw")
    rows = VolSession(tmp_path / "win7.raw", tmp_path).rows("windows.bigpools.BigPools")
    listed = sorted((row["Allocation"] & 0xFFFF_FFFF_FFFF, row["NumberOfBytes"], row["Tag"]) for row in rows)
    live = sorted((a.va & 0xFFFF_FFFF_FFFF, a.size, a.tag.decode().strip()) for a in tables.big if not a.free)
    assert listed == live and any(a.free for a in tables.big)


def test_windows_10_classic_pool_encodes_quota_and_keeps_running_counters():
    """1809 pages: ProcessBilled is XORed with the header address and ExpPoolQuotaCookie (written once);
    descriptors carry Windows 8+ running counters; no Windows 7 Mm* pool bounds are needed."""
    image = Image(FLAVORS["win10-1809"], seed=5, physical_size=32 << 20)
    build_kernel(image)
    pools = _populate(image, PoolTables(), 1500)
    cookie = _u64(image, image.symbol("ExpPoolQuotaCookie"))
    assert cookie == pools.quota_cookie != 0
    billed_offset = image.types.offset("_POOL_HEADER", "ProcessBilled")
    charged = [a for a in image.manifest.allocations if a.quota_process is not None and a.state == "Allocated"]
    assert len(charged) > 10
    for allocation in charged:
        assert _u64(image, allocation.address + billed_offset) == EPROCESS ^ allocation.address ^ cookie
    assert not image.types.has_symbol("MmNonPagedPoolStart")
    descriptor = image.space.read(image.symbol("NonPagedPoolDescriptor"), image.types.size("_POOL_DESCRIPTOR"))
    # The free rest of a big allocation's last page was never allocated: the descriptor does not count it.
    nonpaged = [a for a in image.manifest.allocations if a.pool == "NonPaged" and a.backing == "Page"
                and not a.note.startswith("never allocated")]
    freed = sum(1 for a in nonpaged if a.state != "Allocated")
    assert _field(image, "_POOL_DESCRIPTOR", descriptor, 0, "RunningAllocs") == len(nonpaged)
    assert _field(image, "_POOL_DESCRIPTOR", descriptor, 0, "RunningDeallocs") == freed
    assert _field(image, "_POOL_DESCRIPTOR", descriptor, 0, "BytesDeallocated") == \
        sum(a.size for a in nonpaged if a.state != "Allocated")


def _win1809_with_big_tails() -> tuple[Image, PoolTables]:
    image = Image(FLAVORS["win10-1809"], seed=6, physical_size=32 << 20)
    build_kernel(image)
    tables = PoolTables()
    pools = ClassicPools(image, tables)
    rng = image.rng
    for index in range(2500):
        pool = rng.choice(("NonPaged", "Paged", "Session"))
        if index % 25 == 0:
            size = rng.choice((rng.randrange(0x1000, 0x12000, 0x10), rng.randrange(1, 5) * PAGE - rng.randrange(0, 0x40)))
            pools.allocate(size, rng.choice(TAGS), pool, state="Free" if index % 100 == 0 else "Allocated")
        else:
            pools.allocate(rng.randrange(0x10, 0x300), rng.choice(TAGS), pool,
                           quota_process=EPROCESS if rng.random() < 0.05 else None)
    pools.finish()
    tables.write(image)
    return image, tables


def test_big_allocations_hand_the_rest_of_their_last_page_back_to_the_pool():
    """Windows 8 and later: below 64 KiB a big block ends on a 16-byte boundary, then a 'Frag' chunk holding the
    block's size and a free chunk to the page end, which later requests split from its end."""
    image, tables = _win1809_with_big_tails()
    _check_big_table(image, tables)
    manifest = image.manifest.allocations
    pages = _pages(image)
    header = image.types.size("_POOL_HEADER")
    tails = split = 0
    for big in (a for a in manifest if a.backing == "Big" and a.state == "Allocated"):
        spare = PAGE - big.size % PAGE
        if big.size % PAGE == 0:
            assert big.size >= 0x10000 or all(a.address != big.address + big.size for a in manifest if a.tag == "Frag")
            continue
        assert big.size < 0x10000 and spare >= 0x40 and big.size % 16 == 0
        end = big.address + big.size
        raw = image.space.read(end & ~(PAGE - 1), PAGE)
        offset, previous, decoded = end % PAGE, 0, []
        while offset < PAGE:
            blocks = _field(image, "_POOL_HEADER", raw, offset, "BlockSize")
            assert blocks > 0 and _field(image, "_POOL_HEADER", raw, offset, "PreviousSize") == previous
            decoded.append((end - end % PAGE + offset, blocks * 16, previous * 16, raw[offset + 4 : offset + 8]))
            previous, offset = blocks, offset + blocks * 16
        assert offset == PAGE
        frag_type = _field(image, "_POOL_HEADER", raw, end % PAGE, "PoolType")
        assert decoded[0][1:] == (0x20, 0, b"Frag") and frag_type == 2 | (big.pool_type & 0x21)
        assert _u64(image, end + 0x10) == big.size
        assert decoded[1][3] == b"Free" and _field(image, "_POOL_HEADER", raw, end % PAGE + 0x20, "PoolType") == 0
        free_body = decoded[1][0] + header
        if big.pool != "Session":  # the model writes no session pool descriptor
            assert _u64(image, _u64(image, free_body) + 8) == free_body  # linked into a descriptor's free list
        recorded = sorted((a.address, a.size, a.previous_size, tag_bytes(a.tag)) for a in pages[end & ~(PAGE - 1)])
        assert sorted(decoded) == recorded
        tails += 1
        split += len(decoded) - 2
    assert tails >= 20 and split >= 20


def test_windows_7_big_allocations_take_whole_pages(win7):
    image, _ = win7
    big = [a for a in image.manifest.allocations if a.backing == "Big"]
    assert big and all(a.size % PAGE == 0 for a in big)
    assert not any(a.tag == "Frag" for a in image.manifest.allocations)
