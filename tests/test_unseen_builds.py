"""Builds no flavor models: the same system under another build number and PDB GUID, with structure members
no modeled build has, or with build 26100's segment heap constants, gets the same answers from every plugin as
the flavor it came from; constants no known build uses are reported, not guessed.

Nothing in the library may key on build numbers or PDB identities; sizes and offsets of every structure come
from the image's own ISF, so an appended big page or tag tracker field, or a member inserted before the
segment heap's ``SegContexts``, moves nothing the plugins report.
"""

from __future__ import annotations

import random

import pytest

from conftest import SAMPLE_SIZE, Sample
from samples.build import build_image
from samples.flavors import FLAVORS as FLAVOR_SPECS
from samples.unseen import unseen_flavor
from test_pooltags import plugin_view, pooltags, tracker_view
from volplugins.pool import owner, regions, scan
from volplugins.pool.model import Backing
from volplugins.pool.tags import tag_text

# Build 26100's segment heap: no constant in the page segment signature, the LFH key shifts the whole address.
BUILD_26100_KEYS = {"page_segment_key": 0, "lfh_full_address_shift": True}
# (flavor, build number its kernel reports, whether its ISF declares members no modeled build has, other facts)
UNSEEN = (
    ("win10-19041", 19045, False, {}),
    ("srv2022-20348", 20350, True, {}),
    ("win81-9600", 9700, True, {}),
    ("win11-22000", 26100, False, BUILD_26100_KEYS),
)
PROBES = 60


def build_unseen(name: str, build: int, root, extra_members: bool = False, **facts) -> Sample:
    """The system of flavor ``name`` (seed 1) as build ``build``, its ISF and cache under ``root``."""
    flavor = unseen_flavor(FLAVOR_SPECS[name], build, root / "symbols", extra_members, **facts)
    result = build_image(flavor, seed=1, size=SAMPLE_SIZE, out_dir=root / "image")
    return Sample(name, result.image_path, result.manifest_path, root / "cache", (root / "symbols",))


@pytest.fixture(scope="module", params=UNSEEN, ids=lambda case: f"{case[0]}-as-{case[1]}{'-members' if case[2] else ''}")
def pair(request, samples, tmp_path_factory) -> tuple[Sample, Sample]:
    """(the flavor's sample, the same system built as the unseen build), both of seed 1."""
    name, build, extra_members, facts = request.param
    root = tmp_path_factory.mktemp(f"unseen-{name}-{build}")
    return samples[name], build_unseen(name, build, root, extra_members, **facts)


def test_the_kernel_reports_the_unseen_build(pair):
    seen, unseen = pair
    assert unseen.kernel.build_number == unseen.manifest["build"]["build"] != seen.manifest["build"]["build"]
    assert unseen.manifest["build"]["pdb_guid"] != seen.manifest["build"]["pdb_guid"]
    assert unseen.manifest["allocations"] == seen.manifest["allocations"]


def test_scan_answers_are_unchanged(pair):
    seen, unseen = pair
    results = [scan.scan_pools(sample.kernel) for sample in pair]
    views = [[(c.address, c.size, c.tag, c.state, c.backing, c.pool, c.quota_process) for c in result.chunks]
             for result in results]
    assert views[0] == views[1] and views[0]
    assert results[1].findings == results[0].findings == []


def test_tracker_rows_equal_the_unseen_builds_tracker(pair):
    _, unseen = pair
    assert plugin_view(pooltags(unseen.session, sort="tag")) == tracker_view(unseen.manifest["tracker"])


def test_owner_answers_are_unchanged(pair):
    seen, unseen = pair
    allocations = [a for a in seen.manifest["allocations"] if a["size"]]
    chosen = random.Random(3).sample(allocations, PROBES)
    chosen += [a for a in allocations if a["backing"] in ("Big", "Large")][:10]
    chosen += [{"address": o["body"], "size": 1} for o in seen.manifest["objects"] if o["type"] == "Process"][:5]
    for allocation in chosen:
        address = allocation["address"] + allocation["size"] // 2
        answers = [owner.find_owner(sample.kernel, address) for sample in pair]
        described = [(a.region, a.reason, a.owner and (a.owner.address, a.owner.size, tag_text(a.owner.tag)),
                      a.object and a.object.describe(), a.quota_process_name) for a in answers]
        assert described[1] == described[0], hex(address)
    assert regions.kernel_regions(unseen.kernel) == regions.kernel_regions(seen.kernel)


def test_unknown_heap_constants_are_reported_not_guessed(tmp_path):
    """Signature constants no known build uses: no VS or LFH chunk is guessed, every answer says why."""
    unseen = build_unseen("win10-19041", 27000, tmp_path, page_segment_key=0x5A5A0F0F3C3C9696, vs_subsegment_key=0x1357)
    message = "layout of build 27000 not recognised"
    result = scan.scan_pools(unseen.kernel)
    assert any(message in finding.reason for finding in result.findings)
    assert [c for c in result.chunks if c.backing in (Backing.VS, Backing.LFH)] == []
    listed = {(c.address, c.size) for c in result.chunks}
    big = [a for a in unseen.manifest["allocations"] if a["backing"] in ("Big", "Large") and a["state"] == "Allocated"]
    assert big and all((a["address"], a["size"]) in listed for a in big)
    small = [a for a in unseen.manifest["allocations"] if a["backing"] in ("VS", "LFH") and a["state"] == "Allocated"]
    for allocation in random.Random(5).sample(small, 20):
        answer = owner.find_owner(unseen.kernel, allocation["address"] + allocation["size"] // 2)
        assert answer.owner is None and message in answer.reason
