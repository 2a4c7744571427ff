"""Tag attribution: built-in descriptions, the driver scan, windows.pooldrivers and poolowner's Binary column."""

from __future__ import annotations

import logging

import pytest

from samples.build import SEED_PAGE_FILLERS
from samples.drivers import LOADER_TAG
from samples.objects import OBJECT_TAGS, TYPE_NAMES
from samples.pooltables import POOL_TAG
from samples.population import BIG_PROFILES, PROFILES
from volplugins.pool.attribution import DriverScan, load_attribution
from volplugins.pool.driverscan import scan_drivers
from volplugins.pool.tags import tag_text
from volplugins.pool.tagdb import builtin_database

POOLDRIVERS = "windows.pooldrivers.PoolDrivers"
POOLOWNER = "windows.poolowner.PoolOwner"
# Name buffers the object writer allocates beside its objects.
NAME_BUFFER_TAGS = (b"ObNm", b"IoNm")
TOP, CALL_SITE = 1, 2  # tree depth of a tag row and of its call-site rows


def windows_tags() -> set[bytes]:
    """Every tag the sample generator gives Windows' own allocations (its fake drivers' tags excluded)."""
    tags = {profile.tag for profile in (*PROFILES, *BIG_PROFILES)}
    tags |= set(OBJECT_TAGS.values()) | set(SEED_PAGE_FILLERS) | set(NAME_BUFFER_TAGS) | {LOADER_TAG, POOL_TAG}
    tags |= {name[:4].ljust(4).encode() for names in TYPE_NAMES.values() for name in names if name not in OBJECT_TAGS}
    return tags


def manifest_driver_tags(sample) -> dict[str, list[str]]:
    return {tag: [driver["name"]] for driver in sample.manifest["drivers"] for tag in driver["tags"]}


def driver_chunk(sample, tag: str) -> dict:
    return next(a for a in sample.manifest["allocations"] if a["tag"] == tag and a["state"] == "Allocated")


def owner_row(rows: list[dict]) -> dict:
    (row,) = [row for row in rows if row["Owner"] == "*"]
    return row


def pooldrivers_rows(sample, **options) -> list[dict]:
    defaults = {"tag": [], "include-kernel": False, "call-sites": False, "pooltag-file": []}
    return sample.session.rows(POOLDRIVERS, **(defaults | options))


def poolowner_rows(sample, address: int, **options) -> list[dict]:
    defaults = {"address": [hex(address)], "pooltag-file": [], "driver-scan": "auto", "contents": False}
    return sample.session.rows(POOLOWNER, **(defaults | options))


# -- built-in descriptions ------------------------------------------------------


def test_builtin_set_has_at_least_200_exact_tags():
    exact = [entry for entry in builtin_database().entries() if not entry.is_pattern]
    assert len(exact) >= 200


def test_every_windows_tag_of_the_samples_has_a_description_and_binary():
    database = builtin_database()
    protected = {tag[:3] + bytes([tag[3] | 0x80]) for tag in windows_tags()}  # Windows 7 object tags
    missing = sorted(tag_text(tag) for tag in windows_tags() | protected if not all(database.describe(tag)))
    assert missing == []


def test_fake_driver_tags_are_left_to_the_driver_scan(samples):
    database = builtin_database()
    tags = {tag for sample in samples.values() for tag in manifest_driver_tags(sample)}
    assert tags and all(database.lookup(tag.encode()) is None for tag in tags)


# -- the driver scan through Volatility 3 ---------------------------------------------


def test_driver_scan_finds_exactly_the_manifest_tags(sample):
    result = scan_drivers(sample.kernel)
    found = {tag_text(tag): sorted(modules) for tag, modules in result.tags.items()}
    assert found == manifest_driver_tags(sample)
    decoys = {decoy for driver in sample.manifest["drivers"] for decoy in driver["decoys"]}
    assert decoys and not decoys & set(found)
    assert result.modules_scanned == len(sample.manifest["drivers"])


def test_driver_scan_reports_the_discarded_init_section(sample):
    result = scan_drivers(sample.kernel)
    discarded = [driver for driver in sample.manifest["drivers"] if driver["init_discarded"]]
    assert discarded
    assert {finding.address for finding in result.findings} == {driver["init"] for driver in discarded}


# -- windows.pooldrivers -----------------------------------------------------------


def test_pooldrivers_lists_every_driver_tag_with_its_module(sample):
    rows = pooldrivers_rows(sample)
    tag_rows = {row["Tag"]: row for row in rows if row["Tag"]}
    assert {tag: [row["Modules"]] for tag, row in tag_rows.items()} == manifest_driver_tags(sample)
    assert all(row["Routines"] and row["CallSites"] >= 1 and row["_depth"] == TOP for row in tag_rows.values())
    assert "ExFreePoolWithTag" in tag_rows["NfkR"]["Routines"] and tag_rows["NfkR"]["CallSites"] == 2
    assert tag_rows["NfkL"]["Routines"] == "ExInitializeLookasideListEx"
    notes = [row for row in rows if not row["Tag"]]
    netfake = next(driver for driver in sample.manifest["drivers"] if driver["name"] == "netfake.sys")
    assert [(row["CallSite"], "INIT" in row["Note"]) for row in notes] == [(netfake["init"], True)]


def test_pooldrivers_tag_pattern_answers_which_driver_uses_it(sample):
    netfake = next(driver for driver in sample.manifest["drivers"] if driver["name"] == "netfake.sys")
    rows = pooldrivers_rows(sample, tag=["Nfk?", "Zzzz"], **{"call-sites": True})
    tops = [row for row in rows if row["_depth"] == TOP and row["Tag"]]
    assert sorted(row["Tag"] for row in tops) == sorted(netfake["tags"])
    sites = [row for row in rows if row["_depth"] == CALL_SITE]
    assert len(sites) == sum(row["CallSites"] for row in tops)
    assert all(netfake["base"] <= row["CallSite"] < netfake["base"] + netfake["size"] for row in sites)
    assert any("'Zzzz'" in row["Note"] for row in rows if not row["Tag"])


def test_pooldrivers_flags_a_tag_described_as_another_drivers(sample, tmp_path):
    descriptions = tmp_path / "pooltag.txt"
    descriptions.write_text("PtsA - other.sys - a tag another driver claims\n")
    rows = pooldrivers_rows(sample, tag=["PtsA"], **{"pooltag-file": [str(descriptions)]})
    (row,) = [row for row in rows if row["Tag"] == "PtsA"]
    assert (row["Description"], row["Binary"]) == ("a tag another driver claims", "other.sys")
    assert row["Note"] == "descriptions name other.sys; also used by pooltst.sys"


# -- poolowner's Binary column ---------------------------------------------------------


@pytest.mark.parametrize("tag", ["NfkR", "PtsB"])
def test_poolowner_names_the_driver_of_a_driver_tag(sample, tag):
    chunk = driver_chunk(sample, tag)
    (driver,) = manifest_driver_tags(sample)[tag]
    row = owner_row(poolowner_rows(sample, chunk["address"] + chunk["size"] // 2))
    assert (row["Chunk"], row["Tag"], row["Binary"]) == (chunk["address"], tag, driver)
    assert driver in row["Description"]
    unscanned = owner_row(poolowner_rows(sample, chunk["address"], **{"driver-scan": "never"}))
    assert (unscanned["Description"], unscanned["Binary"]) == ("", "")


def test_auto_scan_runs_only_for_a_tag_without_binary(sample):
    attribution = load_attribution(sample.kernel, [], DriverScan.AUTO)
    assert attribution.describe(b"Proc")[1] == "nt!ps"
    assert attribution.scanned is None
    assert attribution.describe(b"NfkT")[1] == "netfake.sys"
    assert attribution.scanned is not None and attribution.findings


@pytest.mark.parametrize("value, mode", [(True, DriverScan.ALWAYS), (False, DriverScan.NEVER), (None, DriverScan.AUTO),
                                         ("Never", DriverScan.NEVER), ("sometimes", DriverScan.AUTO)])
def test_driver_scan_option_values(value, mode):
    assert DriverScan.parse(value) is mode


def test_never_scans_without_a_kernel():
    attribution = load_attribution(None, [], DriverScan.ALWAYS)
    assert attribution.describe(b"NfkR") == ("", "") and attribution.scanned is None


BAD_LINES = {5, 6, 7, 9}
POOLTAG_TEXT = "\n".join([
    "// descriptions of an investigation",  # 1
    "",  # 2
    "rem comment line",  # 3
    "NfkR - netuser.sys - first text",  # 4
    "no separator on this line",  # 5
    "TooLongTag - x.sys - longer than four",  # 6
    "   - x.sys - empty tag",  # 7
    "NfkQ - receive buffers, no binary named",  # 8
    "NfkR - netuser.sys - ring buffers of the capture driver",  # 9 (duplicate: wins, and warns)
    "Proc - nt!ps - user text for processes",  # 10
    "",  # 11
])


def test_pooltag_file_overrides_descriptions_and_warns_once_per_bad_line(sample, tmp_path, caplog):
    path = tmp_path / "pooltag.txt"
    path.write_text(POOLTAG_TEXT)
    with caplog.at_level(logging.WARNING):
        rows = {tag: owner_row(poolowner_rows(sample, driver_chunk(sample, tag)["address"],
                                              **{"pooltag-file": [str(path)]}))
                for tag in ("NfkR", "NfkQ")}
    assert (rows["NfkR"]["Description"], rows["NfkR"]["Binary"]) == ("ring buffers of the capture driver",
                                                                      "netuser.sys")
    assert (rows["NfkQ"]["Description"], rows["NfkQ"]["Binary"]) == ("receive buffers, no binary named",
                                                                      "netfake.sys")
    logged = [record.getMessage() for record in caplog.records if str(path) in record.getMessage()]
    per_run = sorted(int(message.split(":")[1]) for message in logged)
    assert per_run == sorted(list(BAD_LINES) * 2)  # two plugin runs, each logs every bad line exactly once
