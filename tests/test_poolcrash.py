"""Crash dumps read like raw images, and windows.poolcrash explains every planted pool bug check from the manifest."""

from __future__ import annotations

import json

import pytest

from samples.bugchecks import check_flavor, parse_bugcheck
from samples.build import build_image
from volrun import VolSession, cli_json

CRASH_SIZE = 32 << 20
CRASH_CHUNKS = 1500
# Every planted code once, over one classic and one segment heap flavor; the first of each is also
# compared plugin by plugin with its raw image (a complete dump for classic, a kernel dump for segment heap).
CRASHES = {
    "win7-sp1": (("19", "full"), ("c2", "full"), ("d6", "full"), ("c5", "full")),
    "win10-19041": (("13a", "kernel"), ("d5", "full"), ("cd", "full"), ("c1", "full"), ("41", "full")),
}
SOURCES = ("crash dump header", "KiBugCheckData")


class Crashed:
    def __init__(self, result, cache):
        self.raw, self.dump, self.cache = result.image_path, result.dump_path, cache
        self.manifest = json.loads(result.manifest_path.read_text())
        self.bugcheck = self.manifest["extras"]["bugcheck"]
        self._rows: list[dict] | None = None

    def rows(self) -> list[dict]:
        """``vol -r json -f <dump> windows.poolcrash``, flattened (run once)."""
        if self._rows is None:
            self._rows = flatten(cli_json("-f", str(self.dump), "windows.poolcrash", cache_dir=self.cache))
        return self._rows


@pytest.fixture(scope="module")
def crashes(tmp_path_factory) -> dict[tuple[str, str], Crashed]:
    out = tmp_path_factory.mktemp("crashes")
    built = {}
    for flavor, planted in CRASHES.items():
        for code, kind in planted:
            result = build_image(flavor, 1, CRASH_SIZE, out, chunks=CRASH_CHUNKS, bugcheck=parse_bugcheck(code),
                                 crash_dump=kind)
            built[flavor, code] = Crashed(result, tmp_path_factory.mktemp(f"cache-{flavor}-{code}"))
    return built


def flatten(rows: list[dict]) -> list[dict]:
    out = []
    for row in rows:
        out.append({key: value for key, value in row.items() if key != "__children"})
        out.extend(flatten(row.get("__children", [])))
    return out


def rows_of(rows: list[dict], section: str, item: str) -> list[dict]:
    return [row for row in rows if row["Section"] == section and row["Item"] == item]


@pytest.mark.parametrize("flavor,code", [(flavor, code) for flavor, planted in CRASHES.items()
                                         for code, _ in planted])
def test_planted_bugcheck_through_the_command_line(crashes, flavor, code):
    crashed = crashes[flavor, code]
    planted = crashed.bugcheck
    rows = crashed.rows()
    (head,) = rows_of(rows, "Bug check", "Code")
    assert head["Value"] == planted["code"] and "(crash dump header)" in head["Note"]
    assert [rows_of(rows, "Bug check", f"P{i}")[0]["Value"] for i in range(1, 5)] == planted["parameters"]
    for parameter, chunk in planted["owners"].items():
        (owner,) = rows_of(rows, f"{parameter} pool", "Owner")
        assert owner["Chunk"] == chunk
    if planted["damaged"] is not None:
        assert planted["damaged"] in [row["Value"] for row in rows if row["Item"] in ("Validation", "Finding")]
        for parameter, value in enumerate(planted["parameters"], start=1):
            if value == planted["damaged"]:  # the chunk before the damaged header is the one that overran
                (previous,) = rows_of(rows, f"P{parameter} pool", "Previous")
                assert previous["Chunk"] == planted["suspect"]["allocation"]
    (suspect,) = rows_of(rows, "Suspect", "Chunk" if planted["suspect"]["allocation"] else "Tag")
    assert suspect["Chunk"] == planted["suspect"]["allocation"]
    assert suspect["Tag"] == planted["suspect"]["tag"]
    assert suspect["Binary"] == planted["suspect"]["driver"]


def test_code_address_names_the_driver(crashes):
    crashed = crashes["win7-sp1", "d6"]
    (site,) = rows_of(crashed.rows(), "P3 code", "Module")
    assert site["Binary"] == crashed.bugcheck["suspect"]["driver"]
    base = next(d["base"] for d in crashed.manifest["drivers"] if d["name"] == site["Binary"])
    assert site["Note"] == f"{site['Binary']}+{crashed.bugcheck['parameters'][2] - base:#x}"


def _answers(session: VolSession, manifest: dict, bugcheck: dict) -> dict[str, list[dict]]:
    addresses = [hex(value) for value in bugcheck["parameters"] if value > 0xFFFF]
    addresses += [hex(a["address"] + a["size"] // 2) for a in manifest["allocations"][::400]]
    answers = {
        "poolowner": session.rows("windows.poolowner.PoolOwner", address=addresses),
        "pooltags": session.rows("windows.pooltags.PoolTags"),
        "poolcensus": session.rows("windows.poolcensus.PoolCensus"),
        "poolcensus --validate": session.rows("windows.poolcensus.PoolCensus", validate=True),
        "poolcensus --bigpages": session.rows("windows.poolcensus.PoolCensus", bigpages=True),
        "poolusage": session.rows("windows.poolusage.PoolUsage"),
        "pooldrivers": session.rows("windows.pooldrivers.PoolDrivers"),
        "poolcrash": session.rows("windows.poolcrash.PoolCrash"),
    }
    for row in answers["poolcrash"]:
        for source in SOURCES:
            row["Note"] = row["Note"].replace(f"({source})", "(source)")
    return answers


@pytest.mark.parametrize("flavor", list(CRASHES))
def test_every_plugin_answers_the_same_on_raw_image_and_crash_dump(crashes, tmp_path_factory, flavor):
    crashed = crashes[flavor, CRASHES[flavor][0][0]]
    raw = _answers(VolSession(crashed.raw, tmp_path_factory.mktemp("raw")), crashed.manifest, crashed.bugcheck)
    dump = _answers(VolSession(crashed.dump, tmp_path_factory.mktemp("dump")), crashed.manifest, crashed.bugcheck)
    for plugin, rows in raw.items():
        assert rows, plugin
        assert dump[plugin] == rows, plugin


def test_raw_image_of_a_crashed_system_reads_kibugcheckdata(crashes):
    crashed = crashes["win7-sp1", "19"]
    rows = flatten(cli_json("-f", str(crashed.raw), "windows.poolcrash", cache_dir=crashed.cache))
    (head,) = rows_of(rows, "Bug check", "Code")
    assert head["Value"] == 0x19 and "(KiBugCheckData)" in head["Note"]
    assert [rows_of(rows, "Bug check", f"P{i}")[0]["Value"] for i in range(1, 5)] == crashed.bugcheck["parameters"]


def test_clean_image_has_no_bugcheck(samples):
    sample = samples["win10-1809"]
    (row,) = sample.session.rows("windows.poolcrash.PoolCrash")
    assert row["Item"] == "None" and "no bug check" in row["Note"]


def test_bugcheck_option_refuses_what_it_cannot_plant():
    with pytest.raises(ValueError, match="subcode 0x99 is not planted"):
        parse_bugcheck("19:99")
    with pytest.raises(ValueError, match="not a bug check"):
        parse_bugcheck("0x19:1:2:3:4:5")
    with pytest.raises(ValueError, match="segment heap flavor"):
        check_flavor(parse_bugcheck("13a"), segment_heap=False)
    assert parse_bugcheck("C2:7:-::0x10").parameters == (7, None, None, 0x10)


def test_empty_pool_shows_the_pools_against_their_limits(crashes):
    crashed = crashes["win10-19041", "41"]
    rows = crashed.rows()
    filled = crashed.manifest["extras"]["pool_fill"]
    (nonpaged,) = rows_of(rows, "Pool usage", "Nonp")
    assert nonpaged["Value"] == sum(row["bytes"] for row in crashed.manifest["tracker"]
                                    if row["pool"] == "Nonp" and row["bytes"] > 0)
    percent = 100 * nonpaged["Value"] / filled["limit"]
    assert nonpaged["Note"].startswith(f"{percent:.1f}% of the limit {filled['limit']:#x}")
    assert nonpaged["Note"].endswith("above 90% of its limit")
    top = rows_of(rows, "Pool usage", "Nonp tag")[0]
    assert (top["Tag"], top["Binary"]) == (filled["tag"], crashed.bugcheck["suspect"]["driver"])
