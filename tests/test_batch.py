"""poolbatch over a small fleet: two builds, two machines leaking a driver tag, one corrupt pool, one image that is
no memory image and one path that does not exist; checked against the manifests and against the plugins run one
by one, locally and on a Dask cluster on loopback."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from samples.build import build_image
from samples.snapshots import Leak
from volplugins.batch import cli, jobs, outputs
from volplugins.batch.fleet import load_fleet
from volplugins.batch.outputs import json_value
from volplugins.pool import tags
from volrun import ROOT, SYMBOLS, VolSession, cli_json

SIZE = 32 << 20
LEAK = Leak(b"NfkR", 400)
# (flavor, seed, leaking, corruptions): four machines of each build
FLEET = [(flavor, seed, (flavor, seed) in {("win10-19041", 2), ("win7-sp1", 3)},
          ("bad-tag",) if (flavor, seed) == ("win7-sp1", 4) else ())
         for flavor in ("win10-19041", "win7-sp1") for seed in (1, 2, 3, 4)]
POOLTAGS = "windows.pooltags.PoolTags"
POOLCENSUS = "windows.poolcensus.PoolCensus"
# What each output file must hold: the plugin run by itself with these options.
ONE_BY_ONE = {
    "info": ("windows.info.Info", {}),
    "pooltags-scan": (POOLTAGS, {"scan": True}),
    "poolcensus-validate": (POOLCENSUS, {"validate": True}),
    "poolcensus-carve": (POOLCENSUS, {"carve": True}),
}


class Batch:
    def __init__(self, root: Path):
        self.images_dir = root / "images"
        self.baselines_dir = root / "baselines"
        self.manifests: dict[str, dict] = {}
        self.baselines: dict[str, Path] = {}
        for flavor, seed, leaking, corrupt in FLEET:
            built = build_image(flavor, seed, SIZE, self.images_dir, leaks=[LEAK] if leaking else [], corrupt=corrupt)
            machine = built.image_path.stem
            self.manifests[machine] = json.loads(built.manifest_path.read_text())
            if leaking:
                self.baselines[machine] = build_image(flavor, seed, SIZE, self.baselines_dir).image_path
        (self.images_dir / "garbage.raw").write_bytes(bytes(range(256)) * 4096)
        self.cache = root / "cache"  # one Volatility cache root for every run of the module
        self.mapping = root / "baselines.json"
        self.mapping.write_text(json.dumps({machine: str(path.relative_to(root))
                                            for machine, path in self.baselines.items()}))

    @property
    def leakers(self) -> set[str]:
        return set(self.baselines)

    def arguments(self, out: Path, *extra: str) -> list[str]:
        return [str(self.images_dir / "*.raw"), str(self.images_dir / "missing.raw"), "-o", str(out), "--offline",
                "-s", str(SYMBOLS), "--baselines", str(self.mapping), "--cache-path", str(self.cache), "-j", "2",
                *extra]


def run_batch(arguments: list[str]) -> tuple[int, str]:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = cli.main(arguments)
    return status, stderr.getvalue()


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> Batch:
    return Batch(tmp_path_factory.mktemp("fleet"))


@pytest.fixture(scope="module")
def local(batch, tmp_path_factory):
    out = tmp_path_factory.mktemp("local-out")
    status, log = run_batch(batch.arguments(out))
    return out, status, log, json.loads((out / outputs.SUMMARY).read_text())


def plain(rows: list[dict]) -> list[dict]:
    return json.loads(json.dumps(rows, default=json_value))


def test_every_image_reported_and_a_bad_one_fails_alone(batch, local):
    out, status, log, summary = local
    assert status == 1  # some images failed, the others are complete
    assert summary["images"] == len(FLEET) + 2 and summary["ok"] == len(FLEET)
    assert sorted(summary["failed"]) == ["garbage", "missing"]
    by_machine = {image["machine"]: image for image in summary["machines"]}
    assert by_machine["garbage"]["error"].startswith("no Windows kernel found")
    assert by_machine["missing"]["error"].startswith("cannot read")
    assert "FAIL garbage: no Windows kernel found" in log
    assert all(f"ok   {machine} " in log for machine in batch.manifests)


def test_summary_matches_the_manifests(batch, local):
    out, _status, _log, summary = local
    by_machine = {image["machine"]: image for image in summary["machines"]}
    for machine, manifest in batch.manifests.items():
        image = by_machine[machine]
        version = manifest["build"]
        assert image["build"] == f"{version['major']}.{version['minor']}.{version['build']}"
        assert image["kernel_base"] == manifest["kernel_base"] & 0xFFFF_FFFF_FFFF
        tracked = {key: counts[0] for key, counts in tracked_by_tag(manifest).items()}
        largest = sorted(tracked.values(), reverse=True)[:len(image["top_tags"])]
        assert [tag["bytes"] for tag in image["top_tags"]] == largest and len(largest) == 10
        assert all(tracked[(tag["tag"], tag["pool"])] == tag["bytes"] for tag in image["top_tags"])
        freed = sorted((o["name"], o["pid"]) for o in manifest["objects"] if o["type"] == "Process" and o["freed"])
        assert sorted((p["name"], p["pid"]) for p in image["carved_processes"]) == freed
        corruptions = manifest["extras"]["corruptions"]
        assert sorted(f["address"] for f in image["validation_findings"]) == sorted(c["address"] for c in corruptions)
        if machine in batch.leakers:
            leak = image["leak_candidates"][0]
            assert (leak["tag"], leak["grown_allocations"], leak["grown_bytes"]) == \
                   (LEAK.tag.decode(), LEAK.count, manifest["extras"]["leak"][0]["bytes"])
            assert image["baseline"] == str(batch.baselines[machine])
        else:
            assert image["leak_candidates"] is None
    assert any(image["validation_findings"] for image in by_machine.values())


def test_results_equal_the_plugins_run_one_by_one(batch, local, cache_dir):
    out = local[0]
    for machine in batch.manifests:
        session = VolSession(batch.images_dir / f"{machine}.raw", cache_dir)
        expected = dict(ONE_BY_ONE)
        if machine in batch.leakers:
            expected["pooltags-baseline"] = (POOLTAGS, {"baseline": str(batch.baselines[machine])})
        record = outputs.read_record(out, machine)
        assert set(record["outputs"]) == set(expected)
        for slug, (plugin, options) in expected.items():
            assert outputs.read_rows(out, machine, slug) == plain(session.rows(plugin, **options)), (machine, slug)


def test_results_equal_the_vol_command(batch, local, cache_dir):
    out = local[0]
    machine = next(iter(batch.leakers))
    image = batch.images_dir / f"{machine}.raw"
    for slug, arguments in (("pooltags-scan", ["windows.pooltags", "--scan"]),
                            ("pooltags-baseline", ["windows.pooltags", "--baseline", str(batch.baselines[machine])])):
        rows = cli_json("-f", str(image), *arguments, cache_dir=cache_dir)
        from_vol = [{key: value for key, value in row.items() if key != "__children"} for row in rows]
        from_batch = [{key: value for key, value in row.items() if key != "_depth"}
                      for row in outputs.read_rows(out, machine, slug)]
        assert from_batch == from_vol and from_vol


def test_fleet_names_exactly_the_leaking_machines(batch, local, tmp_path):
    out = local[0]
    page = tmp_path / "fleet.html"
    environment = dict(os.environ, PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "volplugins.batch", "fleet", str(out)]
    shown = subprocess.run(command + ["--json"], capture_output=True, text=True, env=environment, timeout=300)
    assert shown.returncode == 0, shown.stderr
    view = json.loads(shown.stdout)
    assert set(view["outlier_machines"]) == batch.leakers
    assert sorted(view["skipped"]) == ["garbage", "missing"]
    first = view["tags"][0]
    assert first["tag"] == LEAK.tag.decode() and {o["machine"] for o in first["outliers"]} == batch.leakers
    for machine, manifest in batch.manifests.items():
        tracked = tracked_by_tag(manifest)[(first["tag"], first["pool"])]
        assert [first["bytes"][machine], first["allocations"][machine]] == tracked

    table = subprocess.run(command + ["--html", str(page), "--top", "5"], capture_output=True, text=True,
                           env=environment, timeout=300)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["Tag", "Pool", "Spread"] and lines[1].startswith(LEAK.tag.decode())
    assert lines[1].split()[-1].rstrip(",") in batch.leakers and len(lines) == 1 + 5 + 2
    html = page.read_text()
    assert html.startswith("<!DOCTYPE html>") and "<script" not in html and "http" not in html
    assert all(machine in html for machine in batch.manifests) and html.count("class='out'") == len(batch.leakers)


def tracked_by_tag(manifest: dict) -> dict[tuple[str, str], list[int]]:
    """The manifest's tracker rows: (tag without the protected bit, pool) -> [live bytes, live allocations]."""
    tracked: dict[tuple[str, str], list[int]] = {}
    for row in manifest["tracker"]:
        key = (tags.tag_text(tags.unprotected(tags.tag_from_text(row["tag"]))), row["pool"])
        counts = tracked.setdefault(key, [0, 0])
        counts[0] += row["bytes"]
        counts[1] += row["allocs"] - row["frees"]
    return tracked


def test_fleet_of_the_output_equals_the_fleet_of_the_manifests(batch, local):
    """Every tag's bytes and live allocations per machine are the kernel tag tracker's: the manifest's rows."""
    view = load_fleet(local[0])
    for machine, manifest in batch.manifests.items():
        shown = {(row.tag, row.pool): [row.bytes[machine], row.allocations[machine]] for row in view.tags
                 if row.bytes[machine] or row.allocations[machine]}
        assert shown == tracked_by_tag(manifest), machine


def test_dask_cluster_run_equals_the_local_run(batch, local, tmp_path):
    from distributed import LocalCluster

    out = local[0]
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None) as cluster:
        status, log = run_batch(batch.arguments(tmp_path, "--scheduler", cluster.scheduler_address))
    assert status == local[1]
    assert (tmp_path / outputs.SUMMARY).read_text() == (out / outputs.SUMMARY).read_text()
    for machine in batch.manifests:
        files = sorted(path.name for path in (out / machine).glob("*.jsonl"))
        assert files == sorted(path.name for path in (tmp_path / machine).glob("*.jsonl"))
        for name in files:
            assert (tmp_path / machine / name).read_bytes() == (out / machine / name).read_bytes(), (machine, name)


def test_resume_redoes_nothing_that_is_complete(batch, local):
    out = local[0]
    written = {path: path.stat().st_mtime_ns for machine in batch.manifests for path in (out / machine).iterdir()}
    status, log = run_batch(batch.arguments(out, "--resume"))
    assert status == 1
    assert sorted(line.split()[1].rstrip(":") for line in log.splitlines() if line.startswith("skip ")) == \
           sorted(batch.manifests)
    assert {path: path.stat().st_mtime_ns for path in written} == written
    assert "FAIL garbage" in log  # incomplete images are tried again


def test_resume_redoes_an_image_when_the_runs_change(batch, local, tmp_path):
    machine = next(iter(batch.manifests))
    image = batch.images_dir / f"{machine}.raw"
    job = jobs.ImageJob(machine, str(image), jobs.parse_runs(jobs.DEFAULT_PLUGINS), str(tmp_path), ())
    assert outputs.is_complete(local[0], job)
    fewer = jobs.ImageJob(machine, str(image), jobs.parse_runs(["pooltags --scan"]), str(tmp_path), ())
    assert not outputs.is_complete(local[0], fewer)


@pytest.mark.parametrize("choice, message", [
    ("nosuchplugin", "plugin 'windows.nosuchplugin' not found"),
    ("pooltags --no-such-option", "unrecognized arguments: --no-such-option"),
    ("pooltags --sort nowhere", "invalid choice"),
])
def test_bad_plugin_choice_is_refused_before_any_image(batch, tmp_path, choice, message):
    status, log = run_batch([str(batch.images_dir / "*.raw"), "-o", str(tmp_path), "--offline", "-s", str(SYMBOLS),
                             "-p", choice])
    assert status == cli.USAGE_ERROR and message in log and "Traceback" not in log
    assert not (tmp_path / outputs.SUMMARY).exists()


def test_images_from_globs_and_list_files(batch, tmp_path):
    listing = tmp_path / "images.txt"
    listing.write_text(f"# the fleet\n{batch.images_dir}/win7-*.raw\nnothing-here-*.raw\n")
    inputs = jobs.expand_images([str(batch.images_dir / "win10-*.raw")], [listing])
    assert [path.name for path in inputs.images] == sorted(p.name for p in batch.images_dir.glob("win10-*.raw")) + \
        sorted(p.name for p in batch.images_dir.glob("win7-*.raw"))
    assert inputs.problems == ("nothing-here-*.raw: no file matches",)
    assert jobs.machine_names([Path("a/x.raw"), Path("b/x.raw"), Path("c/x.vmem")]) == ["x", "x-2", "x-3"]


def test_a_refused_plugin_run_fails_its_image_and_the_other_runs_complete(batch, tmp_path):
    from volplugins.batch.worker import analyse_image

    machine = next(iter(batch.manifests))
    runs = jobs.parse_runs(["poolcensus --carve --validate", "pooltags"])
    result = analyse_image(jobs.ImageJob(machine, str(batch.images_dir / f"{machine}.raw"), runs, str(tmp_path),
                                         (str(SYMBOLS),), offline=True))
    assert not result.ok and result.error is None
    assert result.runs["poolcensus-carve-validate"].error == "choose one view at a time; got --carve, --validate"
    assert result.runs["pooltags"].error is None and result.runs["pooltags"].rows
