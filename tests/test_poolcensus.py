"""windows.poolcensus lists exactly the manifest's chunks, carves freed processes, and validates corruption precisely."""

from __future__ import annotations

import io
import json
import logging
import re
from collections import Counter
from pathlib import Path

import pytest
from volatility3.framework import interfaces

from samples.build import build_image
from samples.flavors import FLAVORS as FLAVOR_SPECS
from volplugins.pool import freespace, validate
from volplugins.pool.bigpages import BigAllocation
from volplugins.pool.model import Backing, Chunk, State
from conftest import FLAVORS
from volrun import VolSession, cli_json, raw_tag_text

PLUGIN = "windows.poolcensus.PoolCensus"
CLASSIC_CORRUPTIONS = ("overflow", "bad-size", "bad-tag")
SEGMENT_HEAP_CORRUPTIONS = ("overflow", "bad-size", "bad-vs-header", "bad-tag")


def corruptions_of(flavor: str) -> tuple[str, ...]:
    return SEGMENT_HEAP_CORRUPTIONS if FLAVOR_SPECS[flavor].segment_heap else CLASSIC_CORRUPTIONS


DEFAULTS = {"tag": [], "free": False, "allocated": False, "min-size": None, "max-size": None, "big": False,
            "region": None, "bigpages": False, "free-analysis": False, "carve": False, "validate": False,
            "coverage": False, "dump": False}


def scan_rows(sample, **options) -> list[dict]:
    """Rows of one run; every option is set, since a session keeps the options of earlier runs."""
    return sample.session.rows(PLUGIN, **(DEFAULTS | options))


class FilesIn(io.BytesIO, interfaces.plugins.FileHandlerInterface):
    """Files a plugin writes, saved under ``directory`` with their preferred names."""

    directory = Path()

    def __init__(self, filename: str):
        io.BytesIO.__init__(self)
        interfaces.plugins.FileHandlerInterface.__init__(self, filename)

    def close(self):
        if not self.closed:
            Path(self.directory, self.preferred_filename).write_bytes(self.getvalue())
        super().close()


def canonical(address: int) -> int:
    return address | 0xFFFF_0000_0000_0000 if address & (1 << 47) else address


def raw_tag(text: str) -> bytes:
    """Manifest tag text (``\\xNN`` escapes) back to bytes."""
    return re.sub(rb"\\x([0-9a-f]{2})", lambda m: bytes([int(m.group(1), 16)]), text.encode("latin-1"))


def vol3_tag(text: str) -> str:
    """What Volatility 3's bigpools prints for a tag: bytes outside 33..126 dropped."""
    return "".join(chr(b) for b in raw_tag(text) if 32 < b < 127)


def chunk_key(row: dict) -> tuple:
    return row["Address"], row["Size"], raw_tag_text(row), row["State"], row["Backing"], row["Pool"], row["Region"]


def allocation_key(allocation: dict) -> tuple:
    return (allocation["address"], allocation["size"], allocation["tag"], allocation["state"],
            allocation["backing"], allocation["pool"], allocation["region"])


@pytest.fixture(scope="module")
def listings(samples) -> dict[str, list[dict]]:
    return {flavor: scan_rows(sample) for flavor, sample in samples.items()}


def chunk_rows(rows: list[dict]) -> list[dict]:
    """The listing's chunks, without its closing counts (the rows without an Address)."""
    return [row for row in rows if row["Address"] is not None]


def test_listing_equals_the_manifest(sample, listings):
    listed = Counter(chunk_key(row) for row in chunk_rows(listings[sample.flavor]))
    expected = Counter(allocation_key(a) for a in sample.manifest["allocations"])
    assert listed - expected == Counter() and expected - listed == Counter()


def test_listing_ends_with_counts_per_state_and_backing(sample, listings):
    rows = listings[sample.flavor]
    closing = rows[len(chunk_rows(rows)):]
    assert chunk_rows(closing) == [] and closing
    counted = {(row["State"], row["Backing"]): (int(row["Description"].split()[1]), row["Size"]) for row in closing}
    expected: dict[tuple, tuple] = {}
    for allocation in sample.manifest["allocations"]:
        count, size = expected.get((allocation["state"], allocation["backing"]), (0, 0))
        expected[(allocation["state"], allocation["backing"])] = (count + 1, size + allocation["size"])
    assert counted == expected


def test_rows_describe_their_tags(sample, listings):
    listed = chunk_rows(listings[sample.flavor])
    described = {row["Tag"]: row["Description"] for row in listed if row["State"] == "Allocated"}
    assert described["Irp "] and described["MmCi"]
    addresses = [row["Address"] for row in listed]
    assert addresses == sorted(addresses)


@pytest.mark.parametrize("options, tag_wanted", [
    ({"tag": ["Nt*", "Irp"], "allocated": True, "min-size": 0x100, "max-size": 0x400, "region": "nonpaged"},
     lambda tag: tag.startswith(b"Nt") or tag == b"Irp "),
    ({"free": True, "region": "Paged pool"}, lambda tag: True),
    ({"big": True, "tag": ["?m*", "CM16"]}, lambda tag: tag[1:2] == b"m" or tag == b"CM16"),
])
def test_filters_select_what_the_manifest_says(sample, options, tag_wanted):
    rows = chunk_rows(scan_rows(sample, **options))

    def wanted(allocation: dict) -> bool:
        return all([
            not options.get("allocated") or allocation["state"] == "Allocated",
            not options.get("free") or allocation["state"] in ("Free", "Cached-free"),
            allocation["size"] >= options.get("min-size", 0),
            allocation["size"] <= options.get("max-size", 1 << 64),
            not options.get("big") or allocation["backing"] in ("Big", "Large"),
            allocation["region"].lower().startswith(options.get("region", "").lower()),
            tag_wanted(raw_tag(allocation["tag"])),
        ])

    expected = Counter(allocation_key(a) for a in sample.manifest["allocations"] if wanted(a))
    assert expected, "the filter should select something"
    assert Counter(chunk_key(row) for row in rows) == expected


def test_bigpages_view_matches_volatility3_bigpools(sample):
    ours = scan_rows(sample, bigpages=True)
    theirs = sample.session.rows("windows.bigpools.BigPools")
    live = Counter((row["Address"], vol3_tag(raw_tag_text(row)), row["Size"]) for row in ours if row["State"] == "Allocated")
    assert live == Counter((canonical(row["Allocation"]), row["Tag"], row["NumberOfBytes"]) for row in theirs)
    freed = {(row["Address"], row["Size"]) for row in ours if row["State"] == "Free"}
    assert freed == {(entry["va"], entry["size"]) for entry in sample.manifest["big_pages"] if entry["free"]}
    assert all(row["End"] == row["Address"] + row["Size"] for row in ours)


def test_carve_rebuilds_the_freed_processes(sample):
    rows = scan_rows(sample, carve=True)
    processes = {(row["Name"], row["PID"], row["PPID"]) for row in rows if row["Type"] == "Process"}
    freed = [o for o in sample.manifest["objects"] if o["type"] == "Process" and o.get("freed")]
    assert freed, "the generator places exited processes in free chunks"
    assert processes == {(o["name"], o["pid"], o["ppid"]) for o in freed}
    by_name = {row["Name"]: row for row in rows if row["Type"] == "Process"}
    for placed in freed:
        row = by_name[placed["name"]]
        assert row["Body"] == placed["body"] and row["Freed"] is True
        assert row["ChunkState"] in ("Free", "Cached-free")
        assert row["Chunk"] <= row["ObjectHeader"] < row["Chunk"] + row["ChunkSize"]
        assert row["CreateTime"] is not None and row["ExitTime"] >= row["CreateTime"]


def test_free_analysis_counts_the_manifests_free_chunks(sample):
    rows = scan_rows(sample, **{"free-analysis": True})
    top = min(row["_depth"] for row in rows)
    summaries = {(row["Region"], row["Backing"]): row for row in rows if row["_depth"] == top}
    expected: dict[tuple[str, str], list[int]] = {}
    for allocation in sample.manifest["allocations"]:
        if allocation["state"] == "Free":
            expected.setdefault((allocation["region"], allocation["backing"]), []).append(allocation["size"])
    assert {key: (row["FreeChunks"], row["FreeBytes"]) for key, row in summaries.items() if row["FreeChunks"]} == {
        key: (len(sizes), sum(sizes)) for key, sizes in expected.items()}
    for row in summaries.values():
        assert row["LargestFreeRun"] <= row["FreeBytes"]
        if row["FreeBytes"]:
            assert row["Fragmentation"] == pytest.approx(1 - row["LargestFreeRun"] / row["FreeBytes"], abs=1e-4)
    listed = [row for row in rows if row["_depth"] > top]
    assert len(listed) == sum(row["FreeChunks"] + row["CachedFreeChunks"] for row in summaries.values())


def test_free_analysis_tag_filter_uses_stale_tags(sample):
    rows = scan_rows(sample, **{"free-analysis": True, "tag": ["Proc"]})
    listed = [row for row in rows if row["Address"] is not None]
    assert listed and all(row["StaleTag"][:3] == "Pro" for row in listed)
    freed_at = {o["allocation"] for o in sample.manifest["objects"] if o["type"] == "Process" and o.get("freed")}
    assert freed_at <= {row["Address"] for row in listed}


def test_a_clean_image_validates_clean(sample):
    (clean,) = scan_rows(sample, validate=True)
    chunks = len(sample.manifest["allocations"])
    assert clean["Address"] is None and clean["Reason"] == f"no problems found in {chunks} chunks"


@pytest.mark.parametrize("flavor", FLAVORS)
def test_validate_reports_each_corruption_and_nothing_else(flavor, tmp_path, cache_dir, caplog):
    kinds = corruptions_of(flavor)
    result = build_image(flavor, seed=3, size=32 << 20, out_dir=tmp_path, chunks=1500, corrupt=kinds)
    corruptions = json.loads(result.manifest_path.read_text())["extras"]["corruptions"]
    assert [c["kind"] for c in corruptions] == list(kinds)
    session = VolSession(result.image_path, cache_dir)
    rows = session.rows(PLUGIN, **(DEFAULTS | {"validate": True}))
    assert sorted(row["Address"] for row in rows) == sorted(c["address"] for c in corruptions)
    assert all(row["Reason"] and row["Region"].endswith("pool") for row in rows)
    with caplog.at_level(logging.WARNING):
        session.rows(PLUGIN, **(DEFAULTS | {"coverage": True}))
    announced = [record.getMessage() for record in caplog.records if "--validate lists them" in record.getMessage()]
    assert announced == [f"{len(rows)} problem(s) found in the pools; --validate lists them"]


def test_dump_writes_each_listed_chunks_bytes(sample, tmp_path):
    plugin = sample.session.construct(PLUGIN, **(DEFAULTS | {"dump": True, "tag": ["Proc"], "allocated": True}))
    plugin.set_open_method(type("Files", (FilesIn,), {"directory": tmp_path}))
    grid = plugin.run()
    rows: list[dict] = []
    grid.populate(lambda node, out: out.append(dict(zip([c.name for c in grid.columns], node.values))) or out, rows)
    rows = [row for row in rows if not isinstance(row["Address"], interfaces.renderers.BaseAbsentValue)]
    assert rows and len({row["File"] for row in rows}) == len(rows)
    kernel = sample.kernel
    for row in rows:
        address, size = int(row["Address"]), int(row["Size"])
        assert row["File"] == f"{address:#x}.Proc.pool"
        assert Path(tmp_path, row["File"]).read_bytes() == kernel.read(address, size)


def test_command_line_renders_json(samples):
    sample = samples["win7-sp1"]
    rows = cli_json("-f", str(sample.image), PLUGIN, "--bigpages", "--tag", "Mm*", cache_dir=sample.cache)
    assert rows and all(row["Tag"].startswith("Mm") and row["State"] in ("Allocated", "Free") for row in rows)


# -- library pieces on made-up records ----------------------------------------------


def test_overlapping_big_entries_are_reported_at_the_later_one():
    entries = [
        BigAllocation(0x10000, 0x3000, b"AAAA", 0, False, 5),
        BigAllocation(0x12000, 0x1000, b"BBBB", 0, False, 9),
        BigAllocation(0x13000, 0x1000, b"CCCC", 0, False, 2),
        BigAllocation(0x12000, 0x4000, b"DDDD", 0, True, 3),  # freed: stale, never an overlap
    ]
    found = validate.big_entry_overlaps(entries)
    assert [(f.address, "entry 9" in f.reason and "entry 5" in f.reason) for f in found] == [(0x12000, True)]


def test_header_checks_spare_headerless_and_protected_tags():
    page = 0xFFFF_F000_0010_0000
    chunks = [
        Chunk(page + 0x20, 0xFF0, 0, b"Toke", State.ALLOCATED, Backing.VS, "Paged", 3),
        Chunk(page + 0x1000, 0x3000, 0, b"", State.ALLOCATED, Backing.VS, "Paged"),  # no pool header
        Chunk(page + 0x4000, 0x580, 0, b"Pro\xe3", State.ALLOCATED, Backing.PAGE, "NonPaged", 2),
        Chunk(page + 0x5000, 0x40, 0, b"Ev\x00t", State.FREE, Backing.PAGE, "NonPaged", 0),
        Chunk(page + 0x6000, 0x40, 0, b"Ev\x00t", State.ALLOCATED, Backing.PAGE, "NonPaged", 2),
    ]
    assert [f.address for f in validate.header_overruns(chunks)] == [page + 0x20]
    assert [f.address for f in validate.unprintable_tags(chunks)] == [page + 0x6000]


def test_free_runs_merge_touching_free_chunks_only():
    def chunk(address, size, state=State.FREE):
        return Chunk(address, size, 0, b"Test", state, Backing.LFH, "Paged")

    chunks = [chunk(0x1000, 0x20), chunk(0x1020, 0x20), chunk(0x1040, 0x20, State.ALLOCATED), chunk(0x1060, 0x40),
              chunk(0x10A0, 0x20, State.CACHED_FREE)]
    assert freespace.free_runs(chunks) == [(0x1000, 0x40), (0x1060, 0x40)]
    (summary,) = freespace.summarize((c, "Paged pool") for c in chunks)
    assert (summary.free_chunks, summary.free_bytes, summary.largest_free_run, summary.cached_free_chunks) == (
        3, 0x80, 0x40, 1)
    assert summary.fragmentation == pytest.approx(0.5)
