"""What the plugins print through ``vol``: tags as PoolMon shows them, notes instead of silent empty tables."""

from __future__ import annotations

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
    listed = run("windows.poolcensus", "--tag", "Proc,Thre", "--allocated")
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
