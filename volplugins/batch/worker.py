"""One image: open it once, run each chosen plugin, keep rows, times, warnings and errors; never raise.

Runs in a process of its own (a local worker process, or a Dask worker);
Volatility 3 keeps its settings in module globals, so images that share a
process take turns.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from volatility3.framework import exceptions

from volplugins.batch.jobs import INFO_SLUG, ImageJob
from volplugins.pool.runner import VolSession

ProgressReport = Callable[[str, int, int, str], None]  # machine, runs done, runs in all, the run starting now
MESSAGES_KEPT = 20  # warnings kept per plugin run

_one_image_at_a_time = threading.Lock()


@dataclass
class RunOutput:
    rows: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None
    messages: list[str] = field(default_factory=list)


@dataclass
class ImageResult:
    machine: str
    image: str
    error: str | None = None  # why the image could not be analysed at all
    runs: dict[str, RunOutput] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None and all(output.error is None for output in self.runs.values())


def analyse_image(job: ImageJob, report: ProgressReport | None = None) -> ImageResult:
    with _one_image_at_a_time:
        started = time.monotonic()
        result = ImageResult(job.machine, job.image)
        result.error = _unreadable(Path(job.image))
        if result.error is None:
            _run_all(job, result, report or _silent)
        result.seconds = time.monotonic() - started
        return result


def _run_all(job: ImageJob, result: ImageResult, report: ProgressReport) -> None:
    _seed_cache(job)
    session = VolSession(Path(job.image), Path(job.cache_dir), [Path(path) for path in job.symbol_dirs],
                         job.offline)
    runs = job.all_runs
    for done, run in enumerate(runs):
        report(job.machine, done, len(runs), run.slug)
        output = _run(session, run.plugin, dict(run.options))
        result.runs[run.slug] = output
        if run.slug == INFO_SLUG and output.error is not None:
            result.error = output.error
            return


def _run(session: VolSession, plugin: str, options: dict) -> RunOutput:
    output = RunOutput()
    started = time.monotonic()
    with _CollectWarnings() as collected:
        try:
            output.rows = session.rows(plugin, **options)
        except exceptions.UnsatisfiedException as error:
            missing = sorted(name.split(".", 3)[-1] for name in error.unsatisfied)  # without plugins.runN.Class.
            output.error = f"no Windows kernel found (unsatisfied: {', '.join(missing)})"
        except exceptions.InvalidAddressException as error:
            output.error = f"unreadable memory at {error.invalid_address:#x} in layer {error.layer_name}"
        except SystemExit as error:  # a plugin refusing the request (windows.poolcensus --carve --validate)
            output.error = str(error) or f"plugin ended with exit code {error.code}"
        except Exception as error:  # noqa: BLE001 - one failing plugin must not end the batch
            output.error = f"{type(error).__name__}: {error}"
    if output.error is None and collected.errors:
        output.error = "; ".join(collected.errors)
    output.messages = collected.messages[:MESSAGES_KEPT]
    output.seconds = time.monotonic() - started
    return output


def _seed_cache(job: ImageJob) -> None:
    """Start the image's own cache from the batch's symbol index when this worker sees it (else automagic
    builds one)."""
    if not job.symbol_index or not Path(job.symbol_index).is_file():
        return
    target = Path(job.cache_dir) / Path(job.symbol_index).name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(job.symbol_index, target)


def _unreadable(image: Path) -> str | None:
    try:
        with image.open("rb") as handle:
            if not handle.read(1):
                return "empty file"
    except OSError as error:
        return f"cannot read: {error.strerror or error}"
    return None


def _silent(machine: str, done: int, total: int, starting: str) -> None:
    pass


class _CollectWarnings(logging.Handler):
    """Volatility's and the plugins' warnings during one run, as text; a logged error (a plugin that goes on
    without what was asked, e.g. a baseline it could not open) makes the run an error."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self.errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        self.messages.append(f"{record.levelname.lower()}: {text}")
        if record.levelno >= logging.ERROR:
            self.errors.append(text)

    def __enter__(self) -> "_CollectWarnings":
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger().removeHandler(self)
