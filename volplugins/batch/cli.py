"""``poolbatch IMAGE... -o OUT`` runs plugins over many images; ``poolbatch fleet OUT`` compares the machines.

Exit status: 0 when every image was analysed, 1 when some failed (the others
are complete), 2 for a command line that cannot run at all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from volplugins.batch import fleet, jobs, outputs, summary

USAGE_ERROR = 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["fleet"]:
        return fleet_main(argv[1:])
    return batch_main(argv)


# -- poolbatch IMAGE... --------------------------------------------------------------------------------------------
def batch_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="poolbatch",
        description="Run pool plugins over many memory images, each in its own worker process: JSON Lines per "
                    "image and plugin run, summary.json. `poolbatch fleet OUT` compares the machines.",
    )
    parser.add_argument("images", nargs="*", metavar="IMAGE",
                        help="memory images: paths or globs (quote globs, '**' recurses)")
    parser.add_argument("-o", "--output", type=Path, required=True, metavar="DIR",
                        help="output directory: DIR/<machine>/<run>.jsonl, DIR/<machine>/image.json, "
                             "DIR/summary.json")
    parser.add_argument("-l", "--list", type=Path, action="append", default=[], metavar="FILE",
                        help="file of image paths or globs, one a line, relative to the file's folder; '#' comments")
    parser.add_argument("-p", "--plugin", action="append", metavar="'PLUGIN [OPTIONS]'",
                        help="a plugin run as on the vol command line, e.g. 'pooltags --scan'; repeatable "
                             f"(default: {'; '.join(jobs.DEFAULT_PLUGINS)})")
    parser.add_argument("--baseline", type=Path, metavar="IMAGE",
                        help="earlier snapshot every image is compared with (windows.pooltags --baseline): "
                             "leak candidates")
    parser.add_argument("--baselines", type=Path, metavar="FILE",
                        help="JSON object: image (machine name, file name or absolute path) -> its baseline image")
    parser.add_argument("-s", "--symbol-dirs", type=Path, action="append", default=[], metavar="DIR",
                        help="extra symbol (ISF) directory; repeatable")
    parser.add_argument("--offline", action="store_true", help="never download symbols")
    parser.add_argument("--cache-path", type=Path, metavar="DIR",
                        help="Volatility cache root, one folder per image inside (default: OUT/.cache)")
    parser.add_argument("-j", "--workers", type=int, default=os.cpu_count() or 1,
                        help="images analysed at once on this machine (default: %(default)s)")
    parser.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                        help="run on this Dask distributed scheduler instead; its workers must see the image paths")
    parser.add_argument("--timeout", type=float, metavar="SECONDS",
                        help="fail an image whose local worker runs longer than this")
    parser.add_argument("--resume", action="store_true",
                        help="skip images whose outputs in OUT are complete for the same image, baseline and runs")
    parser.add_argument("--top", type=int, default=summary.TOP_TAGS,
                        help="tags per image in summary.json (default: %(default)s)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no per-image lines")
    return parser


def batch_main(argv: list[str]) -> int:
    parser = batch_parser()
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    out_dir = args.output.resolve()
    cache_root = (args.cache_path or out_dir / ".cache").resolve()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        image_jobs = _jobs(args, cache_root)
    except (OSError, ValueError) as error:
        print(f"poolbatch: {error}", file=sys.stderr)
        return USAGE_ERROR
    if not image_jobs:
        print("poolbatch: no images to analyse", file=sys.stderr)
        return USAGE_ERROR
    failed = _execute(args, out_dir, image_jobs)
    summary_path = out_dir / outputs.SUMMARY
    built = summary.build_summary(out_dir, [job.machine for job in image_jobs], args.top)
    summary_path.write_text(json.dumps(built, indent=2) + "\n", encoding="utf-8")
    print(f"{len(image_jobs)} images: {built['ok']} ok, {len(built['failed'])} failed"
          f"{' (' + ', '.join(built['failed']) + ')' if built['failed'] else ''}; summary {summary_path}",
          file=sys.stderr)
    return 1 if failed or built["failed"] else 0


def _jobs(args: argparse.Namespace, cache_root: Path) -> list[jobs.ImageJob]:
    """ValueError for choices that cannot run; inputs that matched nothing are reported and left out."""
    from volplugins.pool import runner

    runner.configure(cache_root / "_main", args.symbol_dirs, args.offline)
    runs = jobs.parse_runs(args.plugin or jobs.DEFAULT_PLUGINS)
    inputs = jobs.expand_images(args.images, args.list)
    for problem in inputs.problems:
        print(f"poolbatch: {problem}", file=sys.stderr)
    mapping = jobs.load_baselines(args.baselines) if args.baselines else {}
    default = args.baseline.resolve() if args.baseline else None
    index = runner.build_symbol_cache(cache_root / "_main") if inputs.images else None
    return [
        jobs.ImageJob(machine=machine, image=str(image), runs=runs, cache_dir=str(cache_root / machine),
                      symbol_dirs=tuple(str(path.resolve()) for path in args.symbol_dirs), offline=args.offline,
                      baseline=str(baseline) if (baseline := jobs.baseline_for(machine, image, mapping, default))
                      else None, symbol_index=str(index))
        for machine, image in zip(jobs.machine_names(inputs.images), inputs.images)
    ]


def _execute(args: argparse.Namespace, out_dir: Path, image_jobs: list[jobs.ImageJob]) -> bool:
    """Runs every job not already complete (with --resume); True when the cluster could not be used."""
    from volplugins.batch import execute

    todo = [job for job in image_jobs if not (args.resume and outputs.is_complete(out_dir, job))]
    progress = execute.Progress(len(image_jobs), args.quiet)
    for job in image_jobs:
        if job not in todo:
            progress.image_done(job.machine, f"skip {job.machine}: outputs complete")

    def done(job: jobs.ImageJob, result) -> None:
        outputs.write_result(out_dir, job, result)
        progress.image_done(job.machine, _result_line(result))

    try:
        if not args.scheduler:
            execute.run_local(todo, args.workers, progress.run_started, done, args.timeout)
            return False
        try:
            execute.run_dask(todo, args.scheduler, progress.run_started, done)
        except OSError as error:  # unreachable or refusing scheduler
            print(f"poolbatch: scheduler {args.scheduler}: {error}", file=sys.stderr)
            return True
        return False
    finally:
        progress.close()


def _result_line(result) -> str:
    if result.error:
        return f"FAIL {result.machine}: {result.error}"
    failed = {slug: output.error for slug, output in result.runs.items() if output.error}
    if failed:
        return f"FAIL {result.machine}: " + "; ".join(f"{slug}: {error}" for slug, error in failed.items())
    return f"ok   {result.machine} ({len(result.runs)} runs, {result.seconds:.1f} s)"


# -- poolbatch fleet OUT ---------------------------------------------------------------------------------------------
def fleet_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="poolbatch fleet",
        description="Per pool tag, bytes and live allocations on each machine of a batch's output directory, tags "
                    "ranked by spread, outlier machines named.",
    )
    parser.add_argument("output", type=Path, metavar="OUTPUT_DIR", help="a poolbatch output directory")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--html", type=Path, metavar="PAGE", help="also write a self-contained heat map page")
    parser.add_argument("--top", type=int, default=fleet.TABLE_TAGS,
                        help="tags in the table and page (default: %(default)s; JSON has all)")
    args = parser.parse_args(argv)
    if not args.output.is_dir():
        print(f"poolbatch fleet: {args.output}: not a directory", file=sys.stderr)
        return USAGE_ERROR
    view = fleet.load_fleet(args.output)
    if not view.machines:
        print(f"poolbatch fleet: {args.output}: no machine with a windows.pooltags run", file=sys.stderr)
        return USAGE_ERROR
    print(json.dumps(view.as_json(), indent=2) if args.json else fleet.table(view, args.top), end="\n" if
          args.json else "")
    if args.html:
        args.html.write_text(fleet.html_page(view, args.top), encoding="utf-8")
        print(f"heat map: {args.html}", file=sys.stderr)
    return 0

