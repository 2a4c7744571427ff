"""A fixed subset of the fuzz campaign (``python -m fuzz`` runs the full one on every flavor): every kind of damage
once on a classic pool build with big allocation tails and on a segment heap build.

Each gets a small image of its own, every plugin runs on each mutant, and the answers outside the damage must
equal the manifest.  The last test shows the check is not vacuous: the same damage, declared to reach nothing,
is reported.
"""

from __future__ import annotations

import dataclasses

import pytest

from fuzz.campaign import Campaign, Report
from fuzz.image import Pristine
from fuzz.mutants import kinds_for, mutations
from fuzz.session import Session
from samples.build import build_image

SIZE = 32 << 20
CHUNKS = 800
ADDRESSES = 150
SEED = 11
FLAVORS = ("win10-1809", "win10-19041")


@pytest.fixture(scope="module")
def campaigns(tmp_path_factory) -> dict[str, Campaign]:
    built = {}
    for flavor in FLAVORS:
        out = tmp_path_factory.mktemp(f"fuzz-{flavor}")
        result = build_image(flavor, seed=SEED, size=SIZE, out_dir=out, chunks=CHUNKS)
        cache = out / "cache"
        cache.mkdir()
        pristine = Pristine(result.image_path, result.manifest_path)
        built[flavor] = Campaign(pristine, Session(result.image_path, cache), Report(), SEED, bound=120.0)
    return built


@pytest.mark.parametrize("flavor", FLAVORS)
def test_every_kind_of_damage_once(campaigns, flavor):
    campaign = campaigns[flavor]
    campaign.addresses(ADDRESSES)
    campaign.mutants(len(kinds_for(campaign.pristine)))
    report = campaign.report
    assert {kind for (_, kind) in report.mutants} == set(kinds_for(campaign.pristine))
    assert report.checked_allocations > 0 and report.addresses >= ADDRESSES
    assert report.failures == []


def test_damage_declared_harmless_is_reported(campaigns):
    campaign = campaigns["win10-1809"]
    header = next(m for m in mutations(campaign.pristine, SEED, 8) if m.kind == "header-size-zero")
    report = Report()
    strict = Campaign(campaign.pristine, campaign.session, report, SEED, bound=120.0)
    strict.check(dataclasses.replace(header, reach=()), 0)
    assert "lost" in {failure.what for failure in report.failures}
