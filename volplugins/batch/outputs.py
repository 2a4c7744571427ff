"""The output directory: ``<machine>/<run>.jsonl`` (one JSON object per row) and ``<machine>/image.json``.

``image.json`` is written last, after every JSON Lines file of the image is
in place (each written to a temporary name and renamed), so its presence with
``"status": "ok"`` and the same image and runs means the image's outputs are
complete: ``--resume`` skips exactly those.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path

from volplugins.batch.jobs import ImageJob
from volplugins.batch.worker import ImageResult

RECORD = "image.json"
SUMMARY = "summary.json"


def json_value(value):
    """Values as ``vol -r json`` writes them: times in ISO 8601, bytes as spaced hex."""
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray)):
        return value.hex(" ")
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".partial")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def _identity(job: ImageJob) -> dict:
    """What the outputs were computed from: the image file as it was, the baseline, every run and option."""
    stat = Path(job.image).stat() if Path(job.image).exists() else None
    identity = {
        "image": job.image,
        "image_size": stat.st_size if stat else None,
        "image_mtime_ns": stat.st_mtime_ns if stat else None,
        "baseline": job.baseline,
        "runs": {run.slug: run.describe() for run in job.all_runs},
    }
    return json.loads(json.dumps(identity, default=json_value))  # tuples as lists, as read back


def write_result(out_dir: Path, job: ImageJob, result: ImageResult) -> dict:
    """Each run's rows to its JSON Lines file, then the image record; returns the record."""
    folder = out_dir / job.machine
    folder.mkdir(parents=True, exist_ok=True)
    runs = {}
    for slug, output in result.runs.items():
        lines = "".join(json.dumps(row, default=json_value) + "\n" for row in output.rows)
        _write_atomic(folder / f"{slug}.jsonl", lines)
        runs[slug] = {"file": f"{slug}.jsonl", "rows": len(output.rows), "seconds": round(output.seconds, 3),
                      "error": output.error, "messages": output.messages}
    record = _identity(job) | {
        "machine": job.machine,
        "status": "ok" if result.ok else "failed",
        "error": result.error,
        "seconds": round(result.seconds, 3),
        "outputs": runs,
    }
    _write_atomic(folder / RECORD, json.dumps(record, indent=2, default=json_value) + "\n")
    return record


def read_record(out_dir: Path, machine: str) -> dict | None:
    try:
        return json.loads((out_dir / machine / RECORD).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def is_complete(out_dir: Path, job: ImageJob) -> bool:
    """The image's outputs are all there and were computed from this very image, baseline and runs."""
    record = read_record(out_dir, job.machine)
    if record is None or record.get("status") != "ok":
        return False
    identity = _identity(job)
    if any(record.get(key) != value for key, value in identity.items()):
        return False
    return all((out_dir / job.machine / output["file"]).is_file() for output in record["outputs"].values())


def read_rows(out_dir: Path, machine: str, slug: str) -> list[dict]:
    """The rows of one run of one image (none when the file is missing or damaged)."""
    try:
        text = (out_dir / machine / f"{slug}.jsonl").read_text(encoding="utf-8")
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return []


def machines_in(out_dir: Path) -> list[str]:
    """Machines with an image record in the directory, by name."""
    return sorted(folder.name for folder in Path(out_dir).iterdir() if (folder / RECORD).is_file())
