"""windows.poolusage: pools against the limits the kernel enforces, checked against the manifest's tracker rows."""

from __future__ import annotations

import json

import pytest

from samples.build import build_image
from samples.poolfill import parse_fill
from volplugins.pool import exhaustion
from volrun import cli_json

FILL_FLAVOR = "win10-19041"


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    out = tmp_path_factory.mktemp("filled")
    result = build_image(FILL_FLAVOR, 1, 32 << 20, out, chunks=1500, fill=parse_fill("NonPaged:NfkR:95"))
    return result.image_path, json.loads(result.manifest_path.read_text()), tmp_path_factory.mktemp("cache-filled")


def tracked_bytes(manifest: dict, pool: str) -> int:
    return sum(row["bytes"] for row in manifest["tracker"] if row["pool"] == pool and row["bytes"] > 0)


def test_filled_pool_warns_and_names_the_filling_tag(filled):
    image, manifest, cache = filled
    fill = manifest["extras"]["pool_fill"]
    rows = cli_json("-f", str(image), "windows.poolusage", "--top", "3", cache_dir=cache)
    (nonpaged,) = [row for row in rows if row["Pool"] == "Nonp"]
    in_use = tracked_bytes(manifest, "Nonp")
    assert nonpaged["Bytes"] == in_use
    assert nonpaged["Limit"] == fill["limit"] == manifest["extras"]["pool_limits"]["Nonp"]
    assert nonpaged["Percent"] == round(100 * in_use / fill["limit"], 2)
    assert nonpaged["Percent"] >= fill["percent"] and nonpaged["Warning"] == "above 90% of its limit"
    first, *others = nonpaged["__children"]
    assert len(others) == 2
    assert (first["Tag"], first["Binary"]) == (fill["tag"], "netfake.sys")
    assert first["Warning"] == "holds more than a third of the pool's limit"
    assert not any(row["Warning"] for row in others)
    (paged,) = [row for row in rows if row["Pool"] == "Paged"]
    assert paged["Limit"] == manifest["extras"]["pool_limits"]["Paged"] and paged["Warning"] == ""


def test_clean_classic_image_limits_are_its_regions(samples):
    sample = samples["win7-sp1"]
    usage, findings = exhaustion.pool_usage(sample.kernel)
    assert not findings
    sizes = {region["pool"]: region["end"] - region["start"] for region in sample.manifest["regions"]}
    by_pool = {pool.pool: pool for pool in usage}
    assert by_pool["Nonp"].limit == exhaustion.PoolLimit(sizes["NonPaged"], "MmMaximumNonPagedPoolInBytes")
    assert by_pool["Paged"].limit == exhaustion.PoolLimit(sizes["Paged"], "MmSizeOfPagedPoolInBytes")
    assert by_pool["Nonp"].in_use == tracked_bytes(sample.manifest, "Nonp")
    assert not any(pool.warning for pool in usage)


def test_fill_that_cannot_fit_is_refused(tmp_path):
    with pytest.raises(ValueError, match="cannot be filled in this image"):
        build_image("win7-sp1", 1, 32 << 20, tmp_path, chunks=500, fill=parse_fill("NonPaged:NfkR:95"))
