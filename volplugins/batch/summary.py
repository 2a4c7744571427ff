"""``summary.json``: per image its build, kernel base, biggest tags, leak candidates, validation findings and
carved processes, read back from the JSON Lines files by column name."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from volplugins.batch import outputs
from volplugins.batch.jobs import INFO_SLUG, LEAK_SLUG, POOLTAGS
from volplugins.pool.census import UNTAGGED_LABEL
from volplugins.pool.poolmon import TOTAL_TAG

POOLCENSUS = "windows.poolcensus.PoolCensus"
TOP_TAGS = 10
# windows.pooltags' columns read here and by the fleet view (snapshot rows, then growth rows)
TAG, POOL, BYTES, LIVE = "Tag", "Type", "Bytes", "Diff"
BASELINE_BYTES, GROWN_LIVE, GROWN_BYTES = "BaselineBytes", "GrowthLive", "GrowthBytes"
NOT_TAGS = {TOTAL_TAG.decode(), UNTAGGED_LABEL}  # the totals row; free space that names no allocation


def build_summary(out_dir: Path, machines: Iterable[str], top: int = TOP_TAGS) -> dict:
    images = [image_summary(out_dir, machine, top) for machine in machines]
    return {
        "images": len(images),
        "ok": sum(image["status"] == "ok" for image in images),
        "failed": [image["machine"] for image in images if image["status"] != "ok"],
        "machines": images,
    }


def image_summary(out_dir: Path, machine: str, top: int = TOP_TAGS) -> dict:
    record = outputs.read_record(out_dir, machine) or {"status": "failed", "error": "no image record"}
    runs = record.get("runs", {})
    produced = record.get("outputs", {})
    failed_runs = {slug: output["error"] for slug, output in produced.items() if output["error"]}
    summary = {"machine": machine, "image": record.get("image"), "status": record["status"],
               "error": record.get("error"), "run_errors": failed_runs, "baseline": record.get("baseline")}
    info = {row.get("Variable"): row.get("Value") for row in outputs.read_rows(out_dir, machine, INFO_SLUG)}
    summary |= {"build": build_of(info), "kernel_base": _int(info.get("Kernel Base"))}

    def rows_of(slug: str | None) -> list[dict] | None:
        """None when the run was not chosen or did not complete."""
        if slug not in produced or produced[slug]["error"]:
            return None
        return outputs.read_rows(out_dir, machine, slug)

    summary["top_tags"] = _top_tags(rows_of(run_slug(runs, POOLTAGS, None)), top)
    summary["leak_candidates"] = _leaks(rows_of(LEAK_SLUG), top)
    summary["validation_findings"] = _findings(rows_of(run_slug(runs, POOLCENSUS, "validate")))
    summary["carved_processes"] = _carved(rows_of(run_slug(runs, POOLCENSUS, "carve")))
    return summary


def build_of(info: dict) -> str | None:
    """``10.0.19041`` from the kernel's version numbers; None when the image's kernel was not found."""
    major, minor, build = info.get("NtMajorVersion"), info.get("NtMinorVersion"), info.get("Major/Minor")
    if major is None or build is None:
        return None
    return f"{major}.{minor}.{str(build).rsplit('.', 1)[-1]}"


def run_slug(runs: dict, plugin: str, option: str | None) -> str | None:
    """The first run of ``plugin`` with ``option`` set (with no baseline when no option is named)."""
    for slug, run in runs.items():
        if slug == LEAK_SLUG or run["plugin"] != plugin:
            continue
        if (run["options"].get(option) if option else not run["options"].get("baseline")):
            return slug
    return None


def _int(text) -> int | None:
    try:
        return int(str(text), 0)
    except ValueError:
        return None


def tag_rows(rows: list[dict]) -> list[dict]:
    """The rows that count one tag (not the totals, not untagged free space)."""
    return [row for row in rows if row.get(TAG) not in NOT_TAGS]


def _top_tags(rows: list[dict] | None, top: int) -> list[dict] | None:
    if rows is None:
        return None
    ranked = sorted(tag_rows(rows), key=lambda row: row.get(BYTES) or 0, reverse=True)[:top]
    return [{"tag": row.get(TAG), "pool": row.get(POOL), "bytes": row.get(BYTES), "allocations": row.get(LIVE)}
            for row in ranked]


def _leaks(rows: list[dict] | None, top: int) -> list[dict] | None:
    """Tags whose live bytes grew since the baseline, most grown first."""
    if rows is None:
        return None
    grown = [row for row in tag_rows(rows) if (row.get(GROWN_BYTES) or 0) > 0]
    grown.sort(key=lambda row: row[GROWN_BYTES], reverse=True)
    return [{"tag": row.get(TAG), "pool": row.get(POOL), "baseline_bytes": row.get(BASELINE_BYTES),
             "bytes": row.get(BYTES), "grown_allocations": row.get(GROWN_LIVE), "grown_bytes": row.get(GROWN_BYTES)}
            for row in grown[:top]]


def _findings(rows: list[dict] | None) -> list[dict] | None:
    if rows is None:
        return None
    return [{"address": row["Address"], "region": row.get("Region"), "reason": row.get("Reason")}
            for row in rows if row.get("Address") is not None]  # a clean image's one row has no address


def _carved(rows: list[dict] | None) -> list[dict] | None:
    if rows is None:
        return None
    return [{"name": row.get("Name"), "pid": row.get("PID"), "ppid": row.get("PPID"),
             "create_time": row.get("CreateTime"), "exit_time": row.get("ExitTime"), "chunk": row.get("Chunk")}
            for row in rows if row.get("Type") == "Process"]
