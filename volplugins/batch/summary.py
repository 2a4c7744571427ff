"""``summary.json``: per image its build, kernel base, biggest tags, leak candidates, validation findings and
carved processes, read back from the JSON Lines files by column name."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from volplugins.batch import outputs
from volplugins.batch.jobs import INFO_SLUG, LEAK_SLUG, POOLTAGS
from volplugins.pool.poolmon import TOTAL_TAG

POOLCENSUS = "windows.poolcensus.PoolCensus"
TOTAL_LABEL = TOTAL_TAG.decode()
TOP_TAGS = 10


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


def _tag_rows(rows: list[dict]) -> list[dict]:
    return [row for row in rows if row.get("Tag") != TOTAL_LABEL]


def _top_tags(rows: list[dict] | None, top: int) -> list[dict] | None:
    if rows is None:
        return None
    ranked = sorted(_tag_rows(rows), key=lambda row: row.get("Bytes") or 0, reverse=True)[:top]
    return [{"tag": row.get("Tag"), "pool": row.get("Type"), "bytes": row.get("Bytes"),
             "allocations": row.get("Diff")} for row in ranked]


def _leaks(rows: list[dict] | None, top: int) -> list[dict] | None:
    """Tags whose live bytes grew since the baseline, most grown first."""
    if rows is None:
        return None
    grown = [row for row in _tag_rows(rows) if (row.get("DiffBytes") or 0) > 0]
    grown.sort(key=lambda row: row["DiffBytes"], reverse=True)
    return [{"tag": row.get("Tag"), "pool": row.get("Type"), "baseline_bytes": row.get("BaselineBytes"),
             "bytes": row.get("Bytes"), "grown_allocations": row.get("DiffAllocs"),
             "grown_bytes": row.get("DiffBytes")} for row in grown[:top]]


def _findings(rows: list[dict] | None) -> list[dict] | None:
    if rows is None:
        return None
    return [{"address": row.get("Address"), "region": row.get("Region"), "reason": row.get("Reason")}
            for row in rows]


def _carved(rows: list[dict] | None) -> list[dict] | None:
    if rows is None:
        return None
    return [{"name": row.get("Name"), "pid": row.get("PID"), "ppid": row.get("PPID"),
             "create_time": row.get("CreateTime"), "exit_time": row.get("ExitTime"), "chunk": row.get("Chunk")}
            for row in rows if row.get("Type") == "Process"]
