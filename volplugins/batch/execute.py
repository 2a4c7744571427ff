"""Where the images are analysed: a local pool of worker processes (one fresh process per image), or an existing
Dask distributed cluster; both report the same progress and hand back the same results."""

from __future__ import annotations

import multiprocessing
import pickle
import queue
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable

from tqdm import tqdm

from volplugins.batch.jobs import ImageJob
from volplugins.batch.worker import ImageResult, ProgressReport, analyse_image

Done = Callable[[ImageJob, ImageResult], None]
POLL_SECONDS = 0.5
PROGRESS_TOPIC = "poolbatch-progress"
CONNECT_TIMEOUT = "20s"


class Progress:
    """A bar over images; its text names each running image's current plugin run (runs done / runs)."""

    def __init__(self, total: int, quiet: bool):
        self.quiet = quiet
        self.bar = tqdm(total=total, unit="image", file=sys.stderr, disable=True if quiet else None,
                        dynamic_ncols=True)
        self.running: dict[str, str] = {}

    def run_started(self, machine: str, done: int, total: int, starting: str) -> None:
        self.running[machine] = f"{machine} {done + 1}/{total} {starting}"
        self.bar.set_postfix_str(", ".join(self.running.values()), refresh=True)

    def image_done(self, machine: str, line: str) -> None:
        self.running.pop(machine, None)
        if not self.quiet:
            self.bar.write(line, file=sys.stderr)
        self.bar.set_postfix_str(", ".join(self.running.values()), refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def run_local(jobs: Iterable[ImageJob], workers: int, report: ProgressReport, done: Done,
              timeout: float | None = None) -> None:
    """Each image in a fresh process (at most ``workers`` at once); a process that dies or overruns ``timeout``
    seconds fails its image only."""
    context = multiprocessing.get_context("spawn")
    events = context.Queue()
    pending = deque(jobs)
    running: dict[str, tuple[multiprocessing.Process, ImageJob, float]] = {}
    try:
        while pending or running:
            while pending and len(running) < workers:
                job = pending.popleft()
                process = context.Process(target=_local_worker, args=(job, events), daemon=True,
                                          name=f"poolbatch {job.machine}")
                process.start()
                running[job.machine] = (process, job, time.monotonic())
            try:
                _handle(events.get(timeout=POLL_SECONDS), running, report, done)
            except queue.Empty:
                _reap(events, running, report, done, timeout)
    finally:
        for process, _job, _started in running.values():
            process.kill()


def _local_worker(job: ImageJob, events) -> None:
    def report(machine: str, done: int, total: int, starting: str) -> None:
        events.put(("progress", machine, (machine, done, total, starting)))

    result = analyse_image(job, report)
    try:
        pickle.dumps(result)
    except Exception as error:  # noqa: BLE001 - the parent must hear of it, or it waits for nothing
        result = ImageResult(job.machine, job.image, error=f"result cannot be sent back: {error}")
    events.put(("done", job.machine, result))


def _handle(event: tuple, running: dict, report: ProgressReport, done: Done) -> None:
    kind, machine, payload = event
    if kind == "progress":
        report(*payload)
        return
    process, job, _started = running.pop(machine)
    process.join()
    done(job, payload)


def _reap(events, running: dict, report: ProgressReport, done: Done, timeout: float | None) -> None:
    """Fail the images whose process died without a result, or ran past the timeout."""
    now = time.monotonic()
    for machine, (process, job, started) in list(running.items()):
        if process.is_alive() and (timeout is None or now - started <= timeout):
            continue
        if process.is_alive():
            process.kill()
            reason = f"timed out after {timeout:g} s"
        else:
            reason = f"worker process ended with exit code {process.exitcode} before finishing"
        while machine in running:  # a result may still be in the queue: it wins
            try:
                _handle(events.get_nowait(), running, report, done)
            except queue.Empty:
                running.pop(machine)
                process.join()
                done(job, ImageResult(job.machine, job.image, error=reason))


def run_dask(jobs: Iterable[ImageJob], scheduler: str, report: ProgressReport, done: Done) -> None:
    """Submit each image as one task to the cluster at ``scheduler``; the workers must see the image paths.

    OSError when the scheduler cannot be reached."""
    from distributed import Client, as_completed

    jobs = list(jobs)
    with Client(scheduler, timeout=CONNECT_TIMEOUT) as client:
        client.subscribe_topic(PROGRESS_TOPIC, lambda event: report(*event[1]))
        batch = uuid.uuid4().hex[:8]
        futures = {client.submit(_dask_task, job, key=f"poolbatch-{batch}-{job.machine}", pure=False): job
                   for job in jobs}
        for future in as_completed(futures):
            job = futures[future]
            try:
                result = future.result()
            except Exception as error:  # noqa: BLE001 - a lost worker fails its image, not the batch
                result = ImageResult(job.machine, job.image, error=f"cluster: {type(error).__name__}: {error}")
            done(job, result)
        client.unsubscribe_topic(PROGRESS_TOPIC)


def _dask_task(job: ImageJob) -> ImageResult:
    from distributed import get_worker

    worker = get_worker()
    return analyse_image(job, lambda *progress: worker.log_event(PROGRESS_TOPIC, list(progress)))
