"""What real images do that clean samples rarely show: big allocations' last pages, smeared bookkeeping, broken
chains.

* Windows 8+ classic pool hands the rest of a big allocation's last page back to the pool behind a 'Frag'
  chunk: those pages start mid-page, and every chunk on them is named exactly, on whichever classic build.
* With the pool region bookkeeping smeared, the pages themselves say which are pool: every allocation is
  still listed and named, marked as found by page validation, and ``--coverage`` counts the pages.
* With the segment heap's lists smeared (``ExPoolState``'s heap table, a heap's segment lists), segments are
  found by their own signatures: every allocation is still listed and named, marked, and counted.
* A PreviousSize that breaks a page's chain hides nothing after it: owners past the break are named, marked.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
import shutil
import struct
from pathlib import Path

import pytest

from conftest import FLAVORS, Sample
from volrun import raw_tag_text
from samples.build import build_image
from samples.flavors import FLAVORS as FLAVOR_SPECS
from test_poolcensus import DEFAULTS
from test_partial_symbols import _module_without
from volplugins.pool import classic, owner, segheap
from volplugins.pool.kernel import Kernel
from volplugins.pool.tags import tag_text
from volrun import VolSession, raw_tag_text

CENSUS = "windows.poolcensus.PoolCensus"
OWNER = "windows.poolowner.PoolOwner"
CLASSIC = [flavor for flavor in FLAVORS if not FLAVOR_SPECS[flavor].segment_heap]
SEGMENT_HEAP = [flavor for flavor in FLAVORS if FLAVOR_SPECS[flavor].segment_heap]
WITH_TAILS = [flavor for flavor in CLASSIC if FLAVOR_SPECS[flavor].big_pool_tails]
PAGE = 0x1000
WINDOWS_10 = 10240  # the first Windows 10 build


def _tail_pages(manifest: dict) -> set[int]:
    return {a["address"] & ~(PAGE - 1) for a in manifest["allocations"] if a["tag"] == "Frag"}


def _named(kernel: Kernel, address: int) -> tuple | None:
    answer = owner.find_owner(kernel, address)
    found = answer.owner
    return None if found is None else (found.address, found.size, tag_text(found.tag), found.state.value)


@pytest.mark.parametrize("flavor", WITH_TAILS)
def test_every_chunk_of_a_big_allocations_last_page_is_named(samples, flavor):
    sample = samples[flavor]
    tails, chunks = _tail_chunks(sample.manifest)
    assert len(tails) >= 20 and len(chunks) > 2 * len(tails)
    assert _misnamed(sample.kernel, chunks) == []


def _tail_chunks(manifest: dict) -> tuple[set[int], list[dict]]:
    """The pages big allocations' tails start mid-page, and the chunks on them."""
    tails = _tail_pages(manifest)
    return tails, [a for a in manifest["allocations"] if a["backing"] == "Page" and a["address"] & ~(PAGE - 1) in tails]


def _misnamed(kernel: Kernel, chunks: list[dict]) -> list[tuple]:
    """The chunks the owner of their last byte is not, with what was named instead."""
    named = [(a, _named(kernel, a["address"] + a["size"] - 1)) for a in chunks]
    expected = [(a["address"], a["size"], a["tag"], a["state"]) for a in chunks]
    return [(hex(a["address"]), found) for (a, found), wanted in zip(named, expected) if found != wanted]


@pytest.mark.parametrize("flavor", [flavor for flavor in CLASSIC if not FLAVOR_SPECS[flavor].big_pool_tails])
def test_big_allocation_tails_are_walked_whatever_the_build(tmp_path, flavor):
    """Nothing in the walk depends on which build returns tails: made to, Windows 7 and 8.1 samples are exact."""
    built = build_image(flavor, seed=3, size=32 << 20, out_dir=tmp_path, chunks=1500, big_pool_tails=True)
    sample = Sample(flavor, built.image_path, built.manifest_path, tmp_path / "cache")
    tails, chunks = _tail_chunks(sample.manifest)
    assert len(tails) >= 10 and len(chunks) > 2 * len(tails)
    rows = [r for r in sample.session.rows(CENSUS, **DEFAULTS) if r["Address"] is not None]
    listed = Counter((r["Address"], r["Size"], raw_tag_text(r), r["State"], r["Backing"]) for r in rows)
    assert listed == Counter((a["address"], a["size"], a["tag"], a["state"], a["backing"])
                             for a in sample.manifest["allocations"])
    (clean,) = sample.session.rows(CENSUS, **(DEFAULTS | {"validate": True}))
    assert clean["Address"] is None and clean["Reason"].startswith("no problems found")
    assert _misnamed(sample.kernel, chunks) == []


@pytest.mark.parametrize("flavor", CLASSIC)
def test_without_region_bookkeeping_pages_are_validated(tmp_path, flavor):
    built = build_image(flavor, seed=3, size=32 << 20, out_dir=tmp_path, chunks=1500, corrupt=["smeared-regions"])
    manifest = _manifest(built.manifest_path)
    session = VolSession(built.image_path, tmp_path / "cache")
    rows = [r for r in session.rows(CENSUS, **DEFAULTS) if r["Address"] is not None]  # not the closing counts
    listed = {(r["Address"], r["Size"], raw_tag_text(r), r["State"], r["Backing"]): r for r in rows}
    for allocation in manifest["allocations"]:
        row = listed.get((allocation["address"], allocation["size"], allocation["tag"], allocation["state"],
                          allocation["backing"]))
        assert row is not None, allocation
        if allocation["state"] == "Allocated":
            assert row["Pool"] == allocation["pool"]
    assert len(rows) == len(manifest["allocations"])
    validated = {a["address"] & ~(PAGE - 1) for a in manifest["allocations"]
                 if a["backing"] == "Page" and not _fixed_region(flavor, a)}
    assert {r["Region"] for r in rows if r["Backing"] == "Page" and r["Address"] & ~(PAGE - 1) in validated} \
        == {classic.FOUND_BY_VALIDATION}
    coverage = {r["Measure"]: r["Value"] for r in session.rows(CENSUS, **(DEFAULTS | {"coverage": True}))}
    assert coverage["pages_validated"] == len(validated)
    sampled = random.Random(3).sample([a for a in manifest["allocations"] if a["backing"] == "Page"
                                       and a["address"] & ~(PAGE - 1) in validated], 25)
    answers = session.rows(OWNER, address=[hex(a["address"] + a["size"] // 2) for a in sampled])
    starred = [r for r in answers if r["Owner"] == "*"]
    assert [(r["Chunk"], r["Size"], raw_tag_text(r)) for r in starred] == \
        [(a["address"], a["size"], a["tag"]) for a in sampled]
    assert all(r["Note"].endswith(classic.FOUND_BY_VALIDATION) for r in starred)


def _fixed_region(flavor: str, allocation: dict) -> bool:
    """Session space before Windows 10 is architectural, not bookkeeping: smearing leaves it known."""
    return FLAVOR_SPECS[flavor].build < WINDOWS_10 and allocation["pool"] == "Session"


@pytest.mark.parametrize("flavor", SEGMENT_HEAP)
def test_without_heap_lists_segments_are_validated(tmp_path, flavor):
    built = build_image(flavor, seed=3, size=32 << 20, out_dir=tmp_path, chunks=1500, corrupt=["smeared-heaps"])
    manifest = _manifest(built.manifest_path)
    session = VolSession(built.image_path, tmp_path / "cache")
    rows = [r for r in session.rows(CENSUS, **DEFAULTS) if r["Address"] is not None]
    listed = Counter((r["Address"], r["Size"], raw_tag_text(r), r["State"], r["Backing"]) for r in rows)
    expected = Counter((a["address"], a["size"], a["tag"], a["state"], a["backing"]) for a in manifest["allocations"])
    assert listed == expected
    in_segments = {a["address"] for a in manifest["allocations"] if a["backing"] in ("VS", "LFH")}
    assert {r["Region"] for r in rows if r["Address"] in in_segments} == {classic.FOUND_BY_VALIDATION}
    assert all(r["Region"] == classic.FOUND_BY_VALIDATION or r["Backing"] in ("Big", "Large") for r in rows)
    coverage = {r["Measure"]: r["Value"] for r in session.rows(CENSUS, **(DEFAULTS | {"coverage": True}))}
    assert coverage["heaps"] == 1 and coverage["segments_validated"] == coverage["segments"] > 0
    sampled = random.Random(3).sample([a for a in manifest["allocations"] if a["address"] in in_segments
                                       and a["state"] == "Allocated"], 25)
    answers = session.rows(OWNER, address=[hex(a["address"] + a["size"] // 2) for a in sampled])
    starred = [r for r in answers if r["Owner"] == "*"]
    assert [(r["Chunk"], r["Size"], raw_tag_text(r)) for r in starred] \
        == [(a["address"], a["size"], a["tag"]) for a in sampled]
    assert all(r["Note"].endswith(classic.FOUND_BY_VALIDATION) for r in starred)


def test_without_heap_lists_or_heap_keys_the_segment_heap_is_given_up_with_one_warning(tmp_path, caplog):
    built = build_image("win10-19041", seed=3, size=32 << 20, out_dir=tmp_path, chunks=1500, corrupt=["smeared-heaps"])
    sample = Sample("win10-19041", built.image_path, built.manifest_path, tmp_path / "cache")
    module = _module_without(sample, tmp_path / "symbols", "symbols", "RtlpHpHeapGlobals")
    with caplog.at_level(logging.WARNING):
        rows = [r for r in sample.session.rows(CENSUS, **(DEFAULTS | {"kernel": module})) if r["Address"] is not None]
    assert rows and {r["Backing"] for r in rows} <= {"Big", "Large"}
    warned = [record.getMessage() for record in caplog.records if "segment heap keys" in record.getMessage()]
    assert len(warned) == 1 and "RtlpHpHeapGlobals" in warned[0]


def test_clean_images_need_no_page_validation(samples):
    for flavor in FLAVORS:
        rows = samples[flavor].session.rows(CENSUS, **(DEFAULTS | {"coverage": True}))
        measures = {r["Measure"]: r["Value"] for r in rows}
        assert measures["pages_validated"] == measures["segments_validated"] == 0


@pytest.mark.parametrize("flavor", CLASSIC)
def test_owners_past_a_broken_previous_size_are_named(samples, tmp_path, flavor):
    sample = samples[flavor]
    by_page: dict[int, list[dict]] = {}
    for allocation in sample.manifest["allocations"]:
        if allocation["backing"] == "Page":
            by_page.setdefault(allocation["address"] & ~(PAGE - 1), []).append(allocation)
    page, chunks = next((page, sorted(chunks, key=lambda a: a["address"])) for page, chunks in sorted(by_page.items())
                        if len(chunks) >= 4 and page not in _tail_pages(sample.manifest))
    broken, after = chunks[1], chunks[2:]
    image = tmp_path / "broken.raw"
    shutil.copyfile(sample.image, image)
    _patch_previous_size(sample, image, broken["address"], 0x3F if chunks[0]["size"] != 0x3F0 else 0x3E)
    session = VolSession(image, tmp_path / "cache")
    answers = session.rows(OWNER, address=[hex(a["address"] + 8) for a in [chunks[0], *after]])
    starred = [r for r in answers if r["Owner"] == "*"]
    assert [r["Chunk"] for r in starred] == [a["address"] for a in [chunks[0], *after]]
    assert not starred[0]["Note"].endswith(owner.PAST_BREAK)
    assert all(r["Note"].endswith(owner.PAST_BREAK) for r in starred[1:])
    findings = [r for r in answers if r["Chunk"] is None and "PreviousSize" in r["Note"]]
    assert {r["Address"] for r in findings} == {broken["address"]}


@pytest.mark.parametrize("flavor", SEGMENT_HEAP)
def test_a_smeared_vs_header_hides_nothing_after_it(samples, tmp_path, flavor):
    """A VS chunk header that no longer decodes breaks its subsegment's chain; the walk picks the chain up
    again at the next chunk, so every chunk after it is still listed, and named with the mark."""
    sample = samples[flavor]
    kernel = sample.kernel
    allocations = sorted(sample.manifest["allocations"], key=lambda a: a["address"])
    for broken in (a for a in allocations if a["backing"] == "VS" and a["state"] == "Free"):
        found = segheap.find_owner_chunks(kernel, broken["address"])
        start, end = found.page_range.address, found.page_range.address + found.page_range.size
        after = [a for a in allocations if broken["address"] + broken["size"] <= a["address"] < end
                 and a["backing"] == "VS"]
        if len(after) >= 3:
            break
    else:
        pytest.fail("no free VS chunk with three chunks after it in its subsegment")
    image = tmp_path / "smeared-vs.raw"
    shutil.copyfile(sample.image, image)
    (_, _, offset, _, _), = list(kernel.layer.mapping(broken["address"], 8))
    with open(image, "r+b") as handle:
        handle.seek(offset)
        handle.write(bytes(8))  # decodes to the heap key and the address: no chunk of sane size
    session = VolSession(image, tmp_path / "cache")
    rows = session.rows(CENSUS, **DEFAULTS)
    listed = {(r["Address"], r["Size"], raw_tag_text(r), r["State"]) for r in rows if r["Address"] is not None}
    assert [a for a in after if (a["address"], a["size"], a["tag"], a["state"]) not in listed] == []
    before = [a for a in allocations if start <= a["address"] < broken["address"]]
    assert [a for a in before if (a["address"], a["size"], a["tag"], a["state"]) not in listed] == []
    answers = session.rows(OWNER, address=[hex(a["address"] + a["size"] // 2) for a in after])
    starred = [r for r in answers if r["Owner"] == "*"]
    assert [r["Chunk"] for r in starred] == [a["address"] for a in after]
    assert all(r["Note"].endswith(owner.PAST_BREAK) for r in starred)


def _patch_previous_size(sample, image: Path, header: int, value: int) -> None:
    """Overwrite the PreviousSize byte of the pool header at ``header`` in the image file (x64: byte 0)."""
    kernel = sample.kernel
    physical = kernel.layer.mapping(header, 1)
    (_, _, offset, _, _), = list(physical)
    with open(image, "r+b") as handle:
        handle.seek(offset)
        handle.write(struct.pack("<B", value))


def _manifest(path: Path) -> dict:
    return json.loads(path.read_text())
