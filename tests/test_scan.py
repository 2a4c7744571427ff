"""The bulk pool scan lists exactly the manifest's allocations on both pool designs, and survives bad memory."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from volplugins.pool import owner, scan, segheap
from volplugins.pool.segheap import vs
from volplugins.pool.columns import Columns
from volplugins.pool.model import Backing, Chunk, State
from volplugins.pool.tags import tag_text

PAGE = 0x1000
_SCANS: dict[str, scan.PoolScan] = {}


def scanned(sample) -> scan.PoolScan:
    """One scan per flavor for the whole module (the scan is what is under test, not its repetition)."""
    if sample.flavor not in _SCANS:
        _SCANS[sample.flavor] = scan.scan_pools(sample.kernel)
    return _SCANS[sample.flavor]


def expected_tag(kernel, allocation) -> str:
    """A never-allocated LFH slot on a page the image does not hold has no tag to read: the scan says ''."""
    if allocation["backing"] == "LFH" and allocation["state"] == "Free" \
            and not kernel.is_valid(allocation["address"] & ~(PAGE - 1)):
        return ""
    return allocation["tag"]


def manifest_keys(sample) -> collections.Counter:
    kernel = sample.kernel
    return collections.Counter(
        (a["address"], a["size"], expected_tag(kernel, a), a["state"], a["backing"], a["pool"])
        for a in sample.manifest["allocations"]
    )


def test_scan_lists_exactly_the_manifest(sample):
    result = scanned(sample)
    got = collections.Counter(
        (c.address, c.size, tag_text(c.tag), c.state.value, c.backing.value, c.pool) for c in result.chunks
    )
    want = manifest_keys(sample)
    assert sorted(want - got)[:20] == [] and sorted(got - want)[:20] == []
    assert result.findings == []


def test_chunks_are_in_address_order_without_duplicates(sample):
    addresses = [chunk.address for chunk in scanned(sample).chunks]
    assert addresses == sorted(set(addresses))


def test_census_matches_the_manifest_per_tag_pool_and_state(sample):
    want: dict[tuple[str, str], dict[str, int]] = collections.defaultdict(lambda: collections.Counter())
    column = {"Allocated": "allocated", "Free": "free", "Cached-free": "cached_free"}
    kernel = sample.kernel
    for allocation in sample.manifest["allocations"]:
        counts = want[(expected_tag(kernel, allocation), allocation["pool"])]
        counts[column[allocation["state"]]] += 1
        counts[column[allocation["state"]] + "_bytes"] += allocation["size"]
    rows = scan.census(scanned(sample).chunks)
    got = {(tag_text(row.tag), row.pool): {name: value for name, value in vars(row).items()
                                           if name not in ("tag", "pool") and value} for row in rows}
    assert got == {key: dict(counts) for key, counts in want.items()}
    assert [(row.tag, row.pool) for row in rows] == sorted((row.tag, row.pool) for row in rows)


def test_streamed_census_counts_what_the_scan_lists(sample):
    """The census the PoolMon view takes, counted batch by batch without keeping chunks, is the listing's."""
    listed = scanned(sample)
    watched = [listed.chunks[0].address, listed.chunks[-1].end - 1, listed.chunks[-1].end, 0]
    walked = scan.census_of(sample.kernel, watched=watched)
    assert walked.rows == scan.census(listed.chunks, group_untagged=True)
    assert walked.findings == listed.findings
    assert walked.holders == [listed.chunks[0], listed.chunks[-1]]


def test_column_tally_counts_what_the_listing_lists_with_pages_missing(sample, monkeypatch):
    """The census counts plain chunks straight from the decoders' columns, the listing makes records of the same
    columns; with runs of pages unreadable (chunks then decoded one by one beside the columns) both agree."""
    real = scan._fill

    def holed(fill, offset, view):
        return (offset >> 12) % 5 != 2 and real(fill, offset, view)

    monkeypatch.setattr(scan, "_fill", holed)
    listed = scan.scan_pools(sample.kernel)
    assert 0 < len(listed.chunks) < len(scanned(sample).chunks)
    walked = scan.census_of(sample.kernel, watched=[chunk.address for chunk in listed.chunks[::97]])
    assert walked.rows == scan.census(listed.chunks, group_untagged=True)
    assert walked.findings == listed.findings
    assert walked.holders == listed.chunks[::97]


def test_census_skips_unreadable_chunks():
    chunks = [
        Chunk(0x1000, 0x40, 0, b"Abcd", State.ALLOCATED, Backing.PAGE, "Paged"),
        Chunk(0x1040, 0x20, 0, b"Abcd", State.FREE, Backing.PAGE, "Paged"),
        Chunk(0x1060, 0x20, 0, b"Abcd", State.CACHED_FREE, Backing.VS, "Paged"),
        Chunk(0x1080, 0x20, 0, b"", State.UNREADABLE, Backing.VS, "Paged"),
    ]
    assert scan.census(chunks) == [scan.CensusRow(b"Abcd", "Paged", 1, 0x40, 1, 0x20, 1, 0x20)]


def test_coverage_counts_what_was_walked(sample):
    coverage = scanned(sample).coverage
    allocations = sample.manifest["allocations"]
    assert coverage.big_entries == len(sample.manifest["big_pages"])
    assert coverage.bytes_read >= coverage.pages_walked * PAGE > 0
    assert coverage.seconds > 0
    if sample.segment_heap:
        assert coverage.heaps == 4  # the four heaps of pool node 0
        assert coverage.segments > 0 and coverage.vs_subsegments > 0 and coverage.lfh_subsegments > 0
        assert coverage.subsegments == coverage.vs_subsegments + coverage.lfh_subsegments
        assert coverage.pages_unreadable > 0  # decommitted pages inside large free VS chunks
        assert coverage.classic_pages == 0
    else:
        pool_pages = {a["address"] & ~(PAGE - 1) for a in allocations if a["backing"] == "Page"}
        assert coverage.classic_pages == len(pool_pages)
        assert coverage.pages_walked == coverage.classic_pages + coverage.pages_not_pool
        assert coverage.pages_not_pool > 0  # big allocation bodies and the kernel's pool tables
        assert coverage.heaps == coverage.segments == 0


def test_streaming_form_reports_progress_and_yields_the_same_chunks(sample):
    calls = []
    streamed = [item for item in scan.iter_chunks(sample.kernel, lambda percent, text: calls.append(percent))]
    assert sorted(c.address for c in streamed) == [c.address for c in scanned(sample).chunks]
    assert calls and calls[-1] == 100.0
    assert calls == sorted(calls) and all(0 <= value <= 100 for value in calls)


def test_large_threshold_comes_from_the_heaps(samples):
    win10 = samples["win10-19041"].kernel
    assert segheap.large_allocation_threshold(win10) == 0x7F0000  # SegContexts[1].MaxAllocationSize
    assert segheap.big_backing(win10, 0x7F0000) is Backing.BIG
    assert segheap.big_backing(win10, 0x7F1000) is Backing.LARGE
    assert segheap.big_backing(samples["win7-sp1"].kernel, 0x1000000) is Backing.BIG


def _corrupting(monkeypatch, kernel, address: int, garbage: bytes):
    """Make the scan's bulk reads see ``garbage`` at virtual ``address`` (the image itself is untouched)."""
    physical = kernel.layer.translate(address)[0]
    real = scan._fill

    def read(fill, offset, view):
        done = real(fill, offset, view)
        if done and offset <= physical < offset + len(view):
            at = physical - offset
            view[at : at + len(garbage)] = garbage
        return done

    monkeypatch.setattr(scan, "_fill", read)


def test_corrupted_classic_page_is_a_finding_and_the_scan_goes_on(samples, monkeypatch):
    sample = samples["win7-sp1"]
    page_chunks = [a for a in sample.manifest["allocations"] if a["backing"] == "Page"]
    victim = next(a for a in page_chunks if a["address"] % PAGE and a["size"] < 0x400 and a["address"] % PAGE > 0x100)
    page = victim["address"] & ~(PAGE - 1)
    _corrupting(monkeypatch, sample.kernel, victim["address"], b"\xff")  # PreviousSize 0xff blocks: no chunk before it is that big
    result = scan.scan_pools(sample.kernel)
    assert [f.address for f in result.findings] == [victim["address"]]
    assert "PreviousSize" in result.findings[0].reason
    listed = {c.address for c in result.chunks}
    on_page = {a["address"] for a in page_chunks if a["address"] & ~(PAGE - 1) == page}
    assert not listed & on_page  # a broken page lists nothing
    assert len(listed) == len(sample.manifest["allocations"]) - len(on_page)


def test_corrupted_vs_header_is_a_finding_and_the_scan_goes_on(samples, monkeypatch):
    sample = samples["win10-19041"]
    vs = [a for a in sample.manifest["allocations"]
          if a["backing"] == "VS" and a["state"] == "Allocated" and a["address"] % PAGE]
    victim = vs[len(vs) // 2]
    header = victim["address"] - 0x10  # its VS chunk header (no padding: the pool header is not page aligned)
    _corrupting(monkeypatch, sample.kernel, header, b"\xff" * 8)
    result = scan.scan_pools(sample.kernel)
    assert [f.address for f in result.findings] == [header]
    listed = {c.address for c in result.chunks}
    assert victim["address"] not in listed
    assert len(listed) > 0.9 * len(sample.manifest["allocations"])


def test_unreadable_runs_are_counted_not_raised(sample, monkeypatch):
    real = scan._fill
    state = {"calls": 0}

    def flaky(fill, offset, view):
        state["calls"] += 1
        return state["calls"] % 3 != 0 and real(fill, offset, view)

    monkeypatch.setattr(scan, "_fill", flaky)
    result = scan.scan_pools(sample.kernel)
    assert result.coverage.pages_unreadable > scanned(sample).coverage.pages_unreadable
    assert 0 < len(result.chunks) < len(scanned(sample).chunks)


def test_big_chunks_take_the_big_page_table_entry(sample):
    by_address = {c.address: c for c in scanned(sample).chunks}
    for entry in sample.manifest["big_pages"]:
        chunk = by_address.get(entry["va"])
        if entry["free"] and (chunk is None or chunk.backing is not Backing.BIG):
            continue  # freed inside what is now a free VS chunk: the VS walk lists that chunk instead
        assert chunk is not None and (chunk.size, tag_text(chunk.tag)) == (entry["size"], entry["tag"])
        assert chunk.state is (State.FREE if entry["free"] else State.ALLOCATED)


def test_quota_charges_and_bodies_match_the_manifest(sample):
    by_address = {c.address: c for c in scanned(sample).chunks}
    charged = [a for a in sample.manifest["allocations"] if a["quota_process"] and a["state"] == "Allocated"]
    assert charged
    assert [by_address[a["address"]].quota_process for a in charged] == [a["quota_process"] for a in charged]
    if sample.segment_heap:  # classic chunks name the first byte after the header as body
        live = [a for a in sample.manifest["allocations"] if a["state"] != "Free" and a["backing"] in ("VS", "LFH")]
        assert [by_address[a["address"]].body for a in live] == [a["body"] for a in live]


def _walked(chunk: Chunk) -> bool:
    """A chunk both the census and the owner lookup take from the pool walk itself (not the big page table)."""
    headerless = chunk.pool_type is None and chunk.state is not State.FREE and not chunk.tag
    return chunk.backing in (Backing.PAGE, Backing.VS, Backing.LFH) and not headerless


def test_owner_lookup_and_census_agree_chunk_for_chunk(sample):
    """Every pool page the census walked lists, through the owner lookup, the very chunks the census has."""
    census: dict[int, list[Chunk]] = collections.defaultdict(list)
    for chunk in scanned(sample).chunks:
        if _walked(chunk):
            census[chunk.address & ~(PAGE - 1)].append(chunk)
    kernel, differing = sample.kernel, []
    for page, chunks in sorted(census.items()):
        answer = owner.find_owner(kernel, chunks[0].address)
        listed = [c for c in answer.chunks if c.address & ~(PAGE - 1) == page and _walked(c)]
        if listed != chunks:
            differing.append((hex(page), chunks, listed))
    assert len(census) > 50 and differing == []


def test_vs_chains_followed_side_by_side_or_one_by_one_give_the_same_scan(sample, monkeypatch):
    """Chains followed side by side (only the headers on them decoded) and one subsegment at a time (every
    candidate decoded) list the same chunks and findings."""
    if not sample.segment_heap:
        pytest.skip("classic pool has no VS subsegments")
    monkeypatch.setattr(vs, "SIDE_BY_SIDE", 1)
    side_by_side = scan.scan_pools(sample.kernel)
    monkeypatch.setattr(vs, "SIDE_BY_SIDE", 1 << 30)
    one_by_one = scan.scan_pools(sample.kernel)
    assert side_by_side.chunks == one_by_one.chunks and side_by_side.findings == one_by_one.findings
    assert len(side_by_side.chunks) > 1000


def test_records_of_a_few_rows_equal_those_of_all_rows(sample):
    """An owner lookup makes the records of a page's few rows field by field; they equal the records made from
    whole columns."""
    found = [item for batch in scan._batches(sample.kernel, None, scan.Coverage()) for item in batch
             if isinstance(item, Columns) and len(item) > 40]
    assert found
    for item in found[:20]:
        every = item.chunks()
        rows = np.arange(0, len(item), 3)[:12]
        assert item.chunks(rows) == [every[row] for row in rows.tolist()]
    assert any(chunk.quota_process for item in found for chunk in item.chunks())  # the quota column too
