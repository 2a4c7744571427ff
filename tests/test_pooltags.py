"""windows.pooltags: PoolMon rows equal the manifest's tracker, views filter and sort as asked, the census
matches the chunks placed, and comparing with an earlier snapshot puts the leaking tag first."""

from __future__ import annotations

import fnmatch
import json
import logging
import shutil
from collections import Counter

import pytest

from samples.build import build_image
from samples.snapshots import Leak, parse_leak
from volplugins.pool import exits, poolmon, tags
from volplugins.pool.census import UNTAGGED_LABEL
from volplugins.pool.census import CensusRow
from volplugins.pool.tracker import TagCounters
from volrun import VolSession, cli_json, raw_tag_text, run_cli

PLUGIN = "windows.pooltags.PoolTags"
COLUMN = {"NonPaged": "Nonp", "NonPagedNx": "Nonp", "Paged": "Paged", "Session": "Session"}
LEAK = Leak(b"NfkR", 400)
U64 = 1 << 64
# Every option of the plugin: the in-process session keeps options between runs, so each run sets all.
DEFAULTS = {"sort": "bytes", "tag": [], "exclude": [], "pool": [], "top": None, "unknown": False,
            "driver-scan": False, "scan": False, "baseline": None, "any-kernel": False, "pooltag-file": []}


def pooltags(session: VolSession, **options) -> list[dict]:
    return session.rows(PLUGIN, **(DEFAULTS | {key.replace("_", "-"): value for key, value in options.items()}))


def tracker_view(rows) -> set[tuple]:
    return {(r["tag"], r["pool"], r["allocs"], r["frees"], r["bytes"]) for r in rows}


def plugin_view(rows) -> set[tuple]:
    """The rows as the manifest writes them: raw tag text (the protected bit set again), pool, counters."""
    return {(raw_tag_text(r), r["Type"], r["Allocs"], r["Frees"], r["Bytes"]) for r in rows if r["Type"] != "Total"}


def row(tag: bytes, pool: str = "Nonp", allocs: int = 0, frees: int = 0, size: int = 0, **extra) -> poolmon.PoolRow:
    return poolmon.PoolRow(tag, pool, allocs, frees, size, **extra)


# -- the library's views ---------------------------------------------------------------------------
ROWS = [
    row(b"Ntfx", "Nonp", 10, 4, 600),  # diff 6, per alloc 100
    row(b"NtFs", "Paged", 50, 48, 900),  # diff 2, per alloc 450
    row(b"Irp ", "Nonp", 99, 90, 900),  # diff 9, per alloc 100
    row(b"Proc", "Nonp", 5, 0, 5000, description="Process objects", binary="nt!ps"),
    row(b"Gh\x05\xff", "Session", 7, 7, 0),
]


@pytest.mark.parametrize("key, expected", [
    ("bytes", [b"Proc", b"Irp ", b"NtFs", b"Ntfx", b"Gh\x05\xff"]),  # Irp and NtFs tie: tag order
    ("diff", [b"Irp ", b"Ntfx", b"Proc", b"NtFs", b"Gh\x05\xff"]),
    ("allocs", [b"Irp ", b"NtFs", b"Ntfx", b"Gh\x05\xff", b"Proc"]),
    ("frees", [b"Irp ", b"NtFs", b"Gh\x05\xff", b"Ntfx", b"Proc"]),
    ("per-alloc", [b"Proc", b"NtFs", b"Irp ", b"Ntfx", b"Gh\x05\xff"]),
    ("tag", [b"Gh\x05\xff", b"Irp ", b"NtFs", b"Ntfx", b"Proc"]),
])
def test_sort_keys(key, expected):
    assert [r.tag for r in poolmon.sort_rows(ROWS, key)] == expected


def test_sort_rows_refuses_unknown_keys():
    with pytest.raises(ValueError, match="per-alloc"):
        poolmon.sort_rows(ROWS, "size")


@pytest.mark.parametrize("pattern, matched", [
    ("Nt*", [b"Ntfx", b"NtFs"]),
    ("nt*", []),  # case sensitive
    ("Nt?x", [b"Ntfx"]),
    ("Irp", [b"Irp "]),  # short tags are space padded, as the kernel pads them
    ("Ir", []),
    ("*s", [b"NtFs"]),
    ("Gh\\x05\\xff", [b"Gh\x05\xff"]),
    ("Gh??", [b"Gh\x05\xff"]),
    ("*", [r.tag for r in ROWS]),
    ("[Nn]tfx", []),  # only * and ? are wildcards
])
def test_wildcard_patterns(pattern, matched):
    compiled = tags.compile_pattern(pattern)
    assert [r.tag for r in ROWS if compiled.matches(r.tag)] == matched


def test_select_combines_include_exclude_pool_and_unknown():
    include = [tags.compile_pattern("Nt*"), tags.compile_pattern("Pro?")]
    exclude = [tags.compile_pattern("*fx")]
    assert [r.tag for r in poolmon.select(ROWS, include, exclude)] == [b"NtFs", b"Proc"]
    assert [r.tag for r in poolmon.select(ROWS, include, exclude, pools={"Nonp"})] == [b"Proc"]
    assert [r.tag for r in poolmon.select(ROWS, pools={"Session", "Paged"})] == [b"NtFs", b"Gh\x05\xff"]
    assert b"Proc" not in [r.tag for r in poolmon.select(ROWS, unknown_only=True)]
    assert len(poolmon.select(ROWS, unknown_only=True)) == 4


def test_pool_names_accept_lists_and_report_unknown_ones():
    assert poolmon.pool_columns(["nonpaged,Paged", "SESSION"]) == ({"Nonp", "Paged", "Session"}, [])
    assert poolmon.pool_columns(["paged", "nonpagednx", "huge"]) == ({"Paged"}, ["nonpagednx", "huge"])


def test_top_and_totals():
    ordered = poolmon.sort_rows(ROWS, "bytes")
    assert [r.tag for r in poolmon.top(ordered, 2)] == [b"Proc", b"Irp "]
    assert poolmon.top(ordered, None) == ordered and poolmon.top(ordered, 0) == []
    total = poolmon.total(poolmon.top(ordered, 2))
    assert (total.tag, total.allocs, total.frees, total.bytes, total.diff, total.per_alloc) == \
        (b"TOTAL", 104, 90, 5900, 14, 421)
    assert total.scan is None


def test_census_folds_allocator_pools_into_tracker_columns():
    tracked = poolmon.from_tracker([TagCounters(b"Ntfx", "Nonp", 10, 4, 600), TagCounters(b"Ntfx", "Paged", 3, 3, 0)])
    census = [
        CensusRow(b"Ntfx", "NonPaged", allocated=2, allocated_bytes=200, free=1, free_bytes=50),
        CensusRow(b"Ntfx", "NonPagedNx", allocated=4, allocated_bytes=400, cached_free=2, cached_free_bytes=80),
        CensusRow(b"Vad ", "Paged", allocated=1, allocated_bytes=64),
    ]
    merged = {(r.tag, r.pool): r for r in poolmon.with_census(tracked, census)}
    assert merged[(b"Ntfx", "Nonp")].scan == poolmon.ScanCounts(6, 600, 3, 130)
    assert not merged[(b"Ntfx", "Nonp")].mismatch  # 10 - 4 == 6
    assert merged[(b"Ntfx", "Paged")].scan == poolmon.ScanCounts() and not merged[(b"Ntfx", "Paged")].mismatch
    scanned_only = merged[(b"Vad ", "Paged")]
    assert (scanned_only.allocs, scanned_only.diff, scanned_only.mismatch) == (0, 0, True)
    assert poolmon.total(merged.values()).scan == poolmon.ScanCounts(7, 664, 3, 130)


def test_growth_ranks_by_bytes_grown():
    before = [row(b"Ntfx", allocs=10, frees=4, size=600), row(b"Gone", allocs=3, frees=1, size=64)]
    after = [row(b"Ntfx", allocs=20, frees=4, size=1600), row(b"Leak", allocs=500, frees=0, size=48000)]
    ranked = poolmon.growth(before, after)
    assert [(r.tag, r.baseline_allocs, r.baseline_bytes, r.allocs, r.bytes, r.diff_allocs, r.diff_bytes)
            for r in ranked] == [
        (b"Leak", 0, 0, 500, 48000, 500, 48000),
        (b"Ntfx", 6, 600, 16, 1600, 10, 1000),
        (b"Gone", 2, 64, 0, 0, -2, -64),
    ]
    assert poolmon.growth_total(ranked).diff_bytes == 48000 + 1000 - 64


def test_snapshot_json_reads_the_renderer_format():
    saved = [
        {"Tag": "Ntfx", "Type": "Nonp", "Allocs": 10, "Frees": 4, "Diff": 6, "Bytes": 600, "__children": [
            {"Tag": "Gh\\x05\\xff", "Type": "Session", "Allocs": 7, "Frees": 2, "Bytes": 90, "__children": []},
        ]},
        {"Tag": "Irp ", "Type": "Paged", "Diff": 3, "Bytes": 30, "__children": []},
        {"Tag": "TOTAL", "Type": "", "Allocs": 17, "Frees": 6, "Bytes": 720, "__children": []},
    ]
    expected = [row(b"Ntfx", "Nonp", 10, 4, 600), row(b"Gh\x05\xff", "Session", 7, 2, 90),
                row(b"Irp ", "Paged", 3, 0, 30)]
    assert poolmon.parse_snapshot(json.dumps(saved)) == poolmon.SnapshotFile(expected)
    lines = "\n".join(json.dumps(item) for item in saved)  # -r jsonl
    assert poolmon.parse_snapshot(lines).rows == expected


@pytest.mark.parametrize("text, message", [
    ("[{\"Tag\": ", "not JSON"),
    ("[]", "no rows"),
    ("[{\"Tag\": \"Ntfx\", \"Type\": \"Nonp\", \"Allocs\": \"ten\", \"Frees\": 1, \"Bytes\": 2}]", "not integers"),
    ("[{\"Tag\": \"Ntfx\", \"Type\": \"Nonp\", \"Allocs\": 3}]", "needs Bytes"),
    ("[{\"PID\": 4, \"ImageFileName\": \"System\"}]", "is this windows.pooltags output"),
    ("[{\"Tag\": \"Ntfxx\", \"Type\": \"Nonp\", \"Allocs\": 1, \"Frees\": 0, \"Bytes\": 2}]", "not four bytes"),
    ("[{\"Tag\": \"Ntfx\", \"Type\": \"Nonp\", \"BaselineAllocs\": 1, \"DiffAllocs\": 0, \"DiffBytes\": 0}]",
     "growth table"),
])
def test_bad_snapshot_json_is_an_error_not_an_exception(text, message):
    loaded = poolmon.parse_snapshot(text)
    assert loaded.rows == [] and message in loaded.error


# -- the plugin on the samples ---------------------------------------------------------------------
def test_rows_equal_the_manifest_tracker(sample):
    rows = pooltags(sample.session, sort="tag")
    assert plugin_view(rows) == tracker_view(sample.manifest["tracker"])
    assert len(rows) == len(sample.manifest["tracker"]) + 1
    total = rows[-1]
    assert total["Tag"] == "TOTAL"
    assert total["Bytes"] == sum(r["bytes"] for r in sample.manifest["tracker"])
    assert total["Diff"] == sum(r["allocs"] - r["frees"] for r in sample.manifest["tracker"])
    described = {(r["Tag"], r["Type"]): (r["Description"], r["Binary"]) for r in rows}
    assert described[("MmSt", "Paged")] == ("Prototype PTE tables of mapped sections", "nt!mm")


def test_unknown_sort_key_is_refused(samples, caplog):
    sample = samples["win10-19041"]
    refused = run_cli("-f", str(sample.image), "windows.pooltags", "--sort", "size", cache_dir=sample.cache)
    assert refused.returncode != 0 and "invalid choice: 'size'" in refused.stderr
    with pytest.raises(exits.Refused, match="unknown sort key 'size'"):
        pooltags(sample.session, sort="size", top=3)


def test_plugin_filters_sorts_and_cuts(samples):
    sample = samples["win10-19041"]
    rows = pooltags(sample.session, tag=["Nt*", "CM?1", "CM?5", "MmS?"], exclude=["Ntff"], pool=["paged"],
                    sort="diff", top=3)
    candidates = [r for r in sample.manifest["tracker"]
                  if r["pool"] == "Paged" and r["tag"] != "Ntff"
                  and any(fnmatch.fnmatchcase(r["tag"], pattern) for pattern in ("Nt*", "CM?1", "CM?5", "MmS?"))]
    assert len(candidates) > 3
    assert any(r["tag"] == "Ntff" and r["pool"] == "Paged" for r in sample.manifest["tracker"])
    candidates.sort(key=lambda r: (-(r["allocs"] - r["frees"]), r["tag"]))
    assert [(r["Tag"], r["Type"]) for r in rows[:-1]] == [(r["tag"], r["pool"]) for r in candidates[:3]]
    assert rows[-1]["Diff"] == sum(r["allocs"] - r["frees"] for r in candidates[:3])


def test_unknown_tags_and_the_driver_scan(samples):
    sample = samples["win10-19041"]
    unknown = pooltags(sample.session, unknown=True)[:-1]
    assert unknown and all(r["Description"] == "" and r["Binary"] == "" for r in unknown)
    assert "NfkR" in {r["Tag"] for r in unknown}
    scanned = pooltags(sample.session, unknown=True, driver_scan=True)[:-1]
    assert "NfkR" not in {r["Tag"] for r in scanned}
    assert {r["Tag"] for r in scanned} < {r["Tag"] for r in unknown}
    named = pooltags(sample.session, tag=["NfkR"], driver_scan=True)
    assert named[0]["Binary"] == "netfake.sys"


def test_scan_counts_equal_the_manifest_chunks(sample):
    pytest.importorskip("volplugins.pool.scan", reason="the pool walker (volplugins.pool.scan) is not available")
    rows = [r for r in pooltags(sample.session, scan=True) if r["Tag"] != "TOTAL"]
    expected = Counter()
    for allocation in sample.manifest["allocations"]:
        state = "allocated" if allocation["state"] == "Allocated" else "free"
        # Free VS chunks (encoded header where a tag would be) and never-used LFH slots are free space
        # that names no allocation: PoolMon's view counts them on one row per pool.
        untagged = allocation["state"] == "Free" and (
            allocation["backing"] == "VS" or allocation["tag"] == "\\x00\\x00\\x00\\x00")
        key = (UNTAGGED_LABEL if untagged else allocation["tag"], COLUMN[allocation["pool"]], state)
        expected[key + ("count",)] += 1
        expected[key + ("bytes",)] += allocation["size"]
    found = Counter()
    for r in rows:
        tag = raw_tag_text(r)
        found[(tag, r["Type"], "allocated", "count")] += r["ScanAllocs"]
        found[(tag, r["Type"], "allocated", "bytes")] += r["ScanBytes"]
        found[(tag, r["Type"], "free", "count")] += r["ScanFree"]
        found[(tag, r["Type"], "free", "bytes")] += r["ScanFreeBytes"]
    assert +found == +expected
    tracked = {(r["tag"], r["pool"]): r["allocs"] - r["frees"] for r in sample.manifest["tracker"]}
    flagged = {(raw_tag_text(r), r["Type"]) for r in rows if r["Mismatch"]}
    differing = {(raw_tag_text(r), r["Type"]) for r in rows
                 if tracked.get((raw_tag_text(r), r["Type"]), 0) != r["ScanAllocs"]}
    assert ("Pool", "Nonp") in differing  # the allocator's own tables: charged to Pool, never walked as chunks
    assert flagged == differing - {("Pool", "Nonp")}


def test_unreadable_processor_table_leaves_the_other_tables(samples, tmp_path, cache_dir, caplog):
    sample = samples["win10-19041"]
    kernel = sample.kernel
    slot = kernel.symbol_address("ExPoolTagTables") + kernel.type_size("pointer")
    nowhere = 0xFFFFF6FB_00000000
    assert not kernel.is_valid(nowhere)
    offset, _ = kernel.layer.translate(slot)
    damaged = tmp_path / "damaged.raw"
    shutil.copyfile(sample.image, damaged)
    with damaged.open("r+b") as handle:
        handle.seek(offset)
        handle.write(nowhere.to_bytes(8, "little"))
    with caplog.at_level(logging.WARNING):
        rows = pooltags(VolSession(damaged, cache_dir))
    assert any("ExPoolTagTables[1] is not readable" in record.getMessage() for record in caplog.records)
    tables = sample.manifest["extras"]["tracker_tables"]["tables"]
    assert plugin_view(rows) == _summed([table for table in tables if table["name"] != "cpu1"])


def _summed(tables: list[dict]) -> set[tuple]:
    """Per tag and column, the sums (wrapping at 2**64) of the given tables' entries."""
    sums: dict[tuple[str, str], list[int]] = {}
    for table in tables:
        for entry in table["entries"]:
            for column in ("Nonp", "Paged"):
                if column in entry:
                    pool = "Session" if table["name"] == "session" else column
                    counts = sums.setdefault((entry["tag"], pool), [0, 0, 0])
                    for index, name in enumerate(("allocs", "frees", "bytes")):
                        counts[index] = (counts[index] + entry[column][name]) % U64
    return {(tag, pool, allocs, frees, size - U64 if size >= U64 // 2 else size)
            for (tag, pool), (allocs, frees, size) in sums.items() if allocs or frees or size}


# -- leak snapshots --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def leaked(samples, tmp_path_factory) -> dict:
    """The session's images again, with NfkR leaking 400 more allocations (same seed, size and chunks)."""
    out = tmp_path_factory.mktemp("leaked")
    built = {}
    for flavor, base in samples.items():
        result = build_image(flavor, seed=1, size=base.image.stat().st_size, out_dir=out, leaks=[LEAK])
        built[flavor] = (result, json.loads(result.manifest_path.read_text()))
    return built


def test_leak_option_parsing():
    assert parse_leak("NfkR:400") == Leak(b"NfkR", 400, 0x60)
    assert parse_leak("Irp:5:0x80") == Leak(b"Irp ", 5, 0x80)
    assert parse_leak("A\\x01b:2") == Leak(b"A\x01b ", 2)
    for bad in ("NfkR", "NfkR:0", "NfkRR:3", "NfkR:x"):
        with pytest.raises(ValueError):
            parse_leak(bad)


def test_leaked_snapshot_differs_only_by_the_leak(samples, leaked, sample):
    result, manifest = leaked[sample.flavor]
    assert result.image_path.name == f"{sample.flavor}-seed1-leak-NfkR-400.raw"
    (record,) = manifest["extras"]["leak"]
    assert (record["tag"], record["count"], len(record["addresses"])) == ("NfkR", 400, 400)
    before = {(r["tag"], r["pool"]): r for r in sample.manifest["tracker"]}
    after = {(r["tag"], r["pool"]): r for r in manifest["tracker"]}
    changed = {key for key in before.keys() | after.keys() if before.get(key) != after.get(key)}
    assert changed == {("NfkR", "Nonp")}
    old, new = before[("NfkR", "Nonp")], after[("NfkR", "Nonp")]
    assert (new["allocs"] - old["allocs"], new["frees"], new["bytes"] - old["bytes"]) == \
        (400, old["frees"], record["bytes"])
    chunks = {_chunk(a) for a in sample.manifest["allocations"] if not a["note"].startswith("never allocated")}
    chunks_after = {_chunk(a) for a in manifest["allocations"]}
    assert chunks <= chunks_after  # free space the leak took held no tag; every other chunk stays as it was
    assert Counter(tag for _, _, tag, state in chunks_after - chunks if state == "Allocated") == Counter({"NfkR": 400})


def _chunk(allocation: dict) -> tuple:
    return allocation["address"], allocation["size"], allocation["tag"], allocation["state"]


def test_baseline_image_ranks_the_leak_first(samples, leaked, cache_dir):
    base = samples["win10-19041"]
    result, manifest = leaked["win10-19041"]
    rows = pooltags(VolSession(result.image_path, cache_dir), baseline=str(base.image))
    _assert_leak_first(rows, manifest)


def test_baseline_json_round_trip(samples, leaked, tmp_path, cache_dir, caplog):
    base = samples["win10-19041"]
    result, manifest = leaked["win10-19041"]
    saved = tmp_path / "base.json"
    saved.write_text(json.dumps(cli_json("-f", str(base.image), "windows.pooltags", cache_dir=base.cache)))
    session = VolSession(result.image_path, cache_dir)
    _assert_leak_first(pooltags(session, baseline=str(saved)), manifest)
    broken = tmp_path / "broken.json"
    broken.write_text(saved.read_text()[:-200])
    with pytest.raises(exits.Refused, match="broken.json: not JSON"):
        pooltags(session, baseline=str(broken), sort="tag")


def _assert_leak_first(rows: list[dict], manifest: dict) -> None:
    (record,) = manifest["extras"]["leak"]
    first, *others = rows[:-1]
    assert (first["Tag"], first["Type"], first["GrowthLive"], first["GrowthBytes"]) == \
        ("NfkR", "Nonp", 400, record["bytes"])
    assert first["Live"] - first["BaselineLive"] == 400
    assert all(r["GrowthLive"] == 0 and r["GrowthBytes"] == 0 for r in others)
    assert len(rows) - 1 == len(manifest["tracker"])
    assert rows[-1]["Tag"] == "TOTAL" and rows[-1]["GrowthBytes"] == record["bytes"]
