"""Volatility 3's own plugins read the samples as the manifest says."""

from __future__ import annotations

from collections import Counter

from volrun import cli_json

MASK_48 = (1 << 48) - 1


def canonical(address: int) -> int:
    return address | 0xFFFF_0000_0000_0000 if address & (1 << 47) else address


def printable_tag(text: str) -> str:
    """vol3's bigpools drops tag bytes outside 33..126; the manifest escapes them as \\xNN."""
    raw = text.encode("latin-1").decode("unicode_escape").encode("latin-1")
    return "".join(chr(b) for b in raw if 32 < b < 127)


def test_manifest_has_the_promised_variety(sample):
    allocations = sample.manifest["allocations"]
    assert len(allocations) >= 5000
    assert len({a["tag"] for a in allocations if a["state"] == "Allocated"}) >= 40
    pools = {a["pool"] for a in allocations}
    assert {"Paged"} <= pools and pools & {"NonPaged", "NonPagedNx"}
    states = Counter(a["state"] for a in allocations)
    assert states["Free"] > 100 and states["Allocated"] > 1000
    assert any(a["backing"] in ("Big", "Large") for a in allocations)
    assert sample.manifest["tracker"] and sample.manifest["big_pages"] and sample.manifest["regions"]


def test_info_finds_kernel_base_and_dtb(sample):
    values = {row["Variable"]: row["Value"] for row in sample.session.rows("windows.info.Info")}
    assert int(values["Kernel Base"], 16) == sample.manifest["kernel_base"] & MASK_48
    assert int(values["DTB"], 16) == sample.manifest["dtb"]
    assert int(values["KeNumberProcessors"]) == sample.manifest["build"]["processors"]


def test_pslist_lists_the_live_processes(sample):
    rows = sample.session.rows("windows.pslist.PsList")
    listed = {(row["PID"], row["ImageFileName"], canonical(row["Offset(V)"])) for row in rows}
    expected = {
        (o["pid"], o["name"], o["body"])
        for o in sample.manifest["objects"]
        if o["type"] == "Process" and not o["freed"]
    }
    assert listed == expected


def test_bigpools_lists_exactly_the_live_big_entries(sample):
    rows = sample.session.rows("windows.bigpools.BigPools")
    listed = Counter((canonical(row["Allocation"]), row["Tag"], row["NumberOfBytes"]) for row in rows)
    expected = Counter(
        (entry["va"], printable_tag(entry["tag"]), entry["size"])
        for entry in sample.manifest["big_pages"]
        if not entry["free"]
    )
    assert listed == expected


def test_poolscanner_finds_the_objects_placed(sample):
    rows = cli_json("-f", str(sample.image), "windows.poolscanner", cache_dir=sample.cache)
    found = Counter((row["Tag"].split("!")[-1], row["Name"]) for row in rows)
    objects = sample.manifest["objects"]
    processes = Counter(("_EPROCESS", o["name"]) for o in objects if o["type"] == "Process" and not o["freed"])
    files = Counter(("_FILE_OBJECT", o["name"]) for o in objects if o["type"] == "File")
    assert processes - found == Counter()
    assert files - found == Counter()
    threads = sum(1 for o in objects if o["type"] == "Thread")
    assert sum(count for (kind, _), count in found.items() if kind == "_ETHREAD") == threads
