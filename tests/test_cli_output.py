"""What the plugins print through ``vol``: tags as PoolMon shows them, notes instead of silent empty tables."""

from __future__ import annotations

import json
import re

import pytest

from samples.flavors import FLAVORS
from volplugins.pool import tags
from volrun import cli_json, run_cli

CLASSIC = ("win7-sp1", "win10-1809")


def tag_name(text: str) -> bytes:
    """A manifest tag's name without the protected bit."""
    return tags.unprotected(tags.tag_from_text(text))


@pytest.mark.parametrize("flavor", CLASSIC)
def test_protected_tags_show_and_match_without_the_bit(samples, flavor):
    sample = samples[flavor]
    protected = FLAVORS[flavor].protected_object_tags
    manifest = sample.manifest
    run = lambda *arguments: cli_json("-f", str(sample.image), *arguments, cache_dir=sample.cache)  # noqa: E731

    (tracked,) = [r for r in manifest["tracker"] if tag_name(r["tag"]) == b"Proc"]
    rows = [r for r in run("windows.pooltags", "--tag", "Proc") if r["Type"] != "Total"]
    assert [(r["Tag"], r["Protected"], r["Type"], r["Allocs"], r["Frees"], r["Bytes"]) for r in rows] == \
        [("Proc", protected, tracked["pool"], tracked["allocs"], tracked["frees"], tracked["bytes"])]

    placed = {a["address"] for a in manifest["allocations"]
              if tag_name(a["tag"]) in (b"Proc", b"Thre") and a["state"] == "Allocated"}
    listed = [r for r in run("windows.poolcensus", "--tag", "Proc,Thre", "--allocated") if r["Address"] is not None]
    assert {r["Address"] for r in listed} == placed
    assert {(r["Tag"], r["Protected"]) for r in listed} == {("Proc", protected), ("Thre", protected)}

    process = next(o for o in manifest["objects"] if o["type"] == "Process" and not o["freed"])
    (owner,) = [r for r in run("windows.poolowner", "--address", hex(process["body"])) if r["Owner"] == "*"]
    assert (owner["Chunk"], owner["Tag"], owner["Protected"]) == (process["allocation"], "Proc", protected)
    assert owner["Note"].startswith("Pooltag Proc (Protected) : " if protected else "Pooltag Proc : ")


def test_empty_results_say_why(samples):
    sample = samples["win11-22000"]
    result = run_cli("-f", str(sample.image), "windows.pooltags", "--pool", "session", "--tag", "Process",
                     cache_dir=sample.cache, renderer="quick")
    assert result.returncode == 0
    assert "tag pattern 'Process' is longer than a 4-byte tag and matches nothing" in result.stderr
    assert "no rows to show: the image's tag tables hold no Session rows" in result.stderr
    result = run_cli("-f", str(sample.image), "windows.pooltags", "--top", "0", cache_dir=sample.cache,
                     renderer="quick")
    assert "no rows to show: --top 0 leaves none" in result.stderr


@pytest.mark.parametrize("plugin", ["poolowner", "pooltags", "poolcensus", "pooldrivers"])
def test_help_shows_every_default_and_an_example(plugin, cache_dir):
    result = run_cli(f"windows.{plugin}", "-h", cache_dir=cache_dir, renderer="quick")
    assert result.returncode == 0, result.stderr
    options = result.stdout.split("options:", 1)[1].split("\nExample: ", 1)
    assert len(options) == 2 and f"windows.{plugin}" in options[1]
    blocks = re.split(r"\n  (?=--)", options[0])[1:]
    assert blocks and all("default" in block for block in blocks), [b for b in blocks if "default" not in b]


def owner_row(sample, address: int) -> dict:
    rows = cli_json("-f", str(sample.image), "windows.poolowner", "--address", hex(address), cache_dir=sample.cache)
    (row,) = [row for row in rows if row["Owner"] == "*"]
    return row


def test_free_chunks_say_what_was_freed(samples):
    """A classic free chunk keeps its tag, a free VS chunk the pool header of what it held, a freed big page
    table entry its tag: the owner line names it, not the encoded header bytes."""
    classic = samples["win7-sp1"]
    freed = next(a for a in classic.manifest["allocations"]
                 if a["state"] == "Free" and a["backing"] == "Page" and tag_name(a["tag"]) == b"Proc")
    row = owner_row(classic, freed["address"] + 0x10)
    assert (row["Chunk"], row["State"], row["Tag"], row["StaleTag"]) == (freed["address"], "Free", "Proc", "Proc")
    assert row["Note"] == "Free (was: Proc : Process objects, Binary : nt!ps)"

    segment_heap = samples["win10-19041"]
    listed = cli_json("-f", str(segment_heap.image), "windows.poolcensus", "--free-analysis", "--tag", "Proc",
                      cache_dir=segment_heap.cache)
    vs_free = next(child for row in listed for child in row["__children"] if child["Backing"] == "VS")
    row = owner_row(segment_heap, vs_free["Address"] + 0x20)
    assert (row["Chunk"], row["State"], row["StaleTag"]) == (vs_free["Address"], "Free", "Proc")
    assert row["Tag"] != "Proc"  # the encoded header bytes, as !pool prints them
    assert row["Note"] == "Free (was: Proc : Process objects, Binary : nt!ps)"

    big = next(entry for entry in segment_heap.manifest["big_pages"] if entry["free"])
    row = owner_row(segment_heap, big["va"] + 0x100)
    assert row["State"] == "Free"
    assert f"{big['tag']}" in row["Note"] and (f"{big['size']:#x} bytes at {big['va']:x}" in row["Note"]
                                               or row["Note"].startswith(f"Free (was: {big['tag']} :"))


def manifest_stale_tag(allocation: dict) -> str:
    """What a freed chunk's bytes still name, from the manifest: a free VS chunk's first intact pool header, or
    the tag a classic or LFH free chunk keeps in its own header (zeros: a slot never handed out names nothing)."""
    if allocation["stale_tag"] is not None:
        return allocation["stale_tag"]
    name = tag_name(allocation["tag"])
    return tags.tag_text(name) if any(name) else ""


@pytest.mark.parametrize("flavor", ["win7-sp1", "win10-19041"])
def test_census_listing_names_what_free_chunks_held(samples, flavor):
    sample = samples[flavor]
    rows = [row for row in cli_json("-f", str(sample.image), "windows.poolcensus", cache_dir=sample.cache)
            if row["Address"] is not None]
    freed = {a["address"]: a for a in sample.manifest["allocations"] if a["state"] in ("Free", "Cached-free")}
    listed = [row for row in rows if row["Address"] in freed]
    assert len(listed) == len(freed)
    assert [row["StaleTag"] for row in listed] == [manifest_stale_tag(freed[row["Address"]]) for row in listed]
    assert all(row["StaleTag"] == "" for row in rows if row["State"] == "Allocated")
    named = [row for row in listed if row["StaleTag"]]
    assert named and any(row["StaleTag"] != row["Tag"] for row in named) == sample.segment_heap
    described = {row["Tag"]: row["Description"] for row in rows if row["State"] == "Allocated"}
    assert all(row["Description"] == described.get(row["StaleTag"], row["Description"]) for row in named)
    assert all(row["Description"] == "" for row in listed if not row["StaleTag"])


@pytest.mark.parametrize("flavor", ["win7-sp1", "win10-19041"])
def test_census_tag_filter_finds_freed_chunks_by_what_they_held(samples, flavor):
    """``--free --tag T`` lists the freed chunks whose stale tag is T, whatever their header bytes show now."""
    sample = samples[flavor]
    freed = [a for a in sample.manifest["allocations"] if a["state"] in ("Free", "Cached-free")]
    stale = [manifest_stale_tag(a) for a in freed]
    wanted = max((name for name in set(stale) if name), key=stale.count)
    rows = [row for row in cli_json("-f", str(sample.image), "windows.poolcensus", "--free", "--tag", wanted,
                                    cache_dir=sample.cache) if row["Address"] is not None]
    assert sorted(row["Address"] for row in rows) == sorted(a["address"] for a, name in zip(freed, stale)
                                                            if name == wanted)
    assert all(row["StaleTag"] == wanted for row in rows)


def test_census_says_what_it_did_not_list(samples):
    sample = samples["win10-19041"]
    chunks = len(sample.manifest["allocations"])

    def run(*arguments: str):
        result = run_cli("-f", str(sample.image), "windows.poolcensus", *arguments, cache_dir=sample.cache)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout), result.stderr

    rows, notes = run("--validate", "--dump")
    assert [(row["Address"], row["Reason"]) for row in rows] == [(None, f"no problems found in {chunks} chunks")]
    assert "--validate has nothing to dump, so nothing is written" in notes
    rows, notes = run("--tag", "Process")
    assert rows == []
    assert "tag pattern 'Process' is longer than a 4-byte tag and matches nothing" in notes
    assert f"no chunk matches the filters (--tag Process) among {chunks} chunks" in notes
    rows, _ = run("--coverage")
    measures = {row["Measure"]: row for row in rows}
    assert measures["chunks"]["Value"] == chunks and all(row["Meaning"] for row in rows)
    assert "milliseconds" in measures and not any(name.endswith("_ms") for name in measures)
    assert "paged out" in measures["pages_unreadable"]["Meaning"]
