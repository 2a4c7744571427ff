"""Builds no flavor models: the same system under another build number and PDB GUID, and with structure members
no modeled build has, gets the same answers from every plugin as the flavor it came from.

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
from volplugins.pool.tags import tag_text

# (flavor, build number its kernel reports, whether its ISF declares members no modeled build has)
UNSEEN = (
    ("win10-19041", 19045, False),
    ("srv2022-20348", 20350, True),
    ("win81-9600", 9700, True),
)
PROBES = 60


@pytest.fixture(scope="module", params=UNSEEN, ids=lambda case: f"{case[0]}-as-{case[1]}{'-members' if case[2] else ''}")
def pair(request, samples, tmp_path_factory) -> tuple[Sample, Sample]:
    """(the flavor's sample, the same system built as the unseen build), both of seed 1."""
    name, build, extra_members = request.param
    root = tmp_path_factory.mktemp(f"unseen-{name}-{build}")
    flavor = unseen_flavor(FLAVOR_SPECS[name], build, root / "symbols", extra_members)
    result = build_image(flavor, seed=1, size=SAMPLE_SIZE, out_dir=root / "image")
    unseen = Sample(name, result.image_path, result.manifest_path, root / "cache", (root / "symbols",))
    return samples[name], unseen


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
