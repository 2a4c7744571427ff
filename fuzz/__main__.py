"""``python -m fuzz``: a seeded fuzz campaign over every flavor; exit status 1 if anything failed."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from samples.__main__ import parse_size
from samples.flavors import FLAVORS

from .campaign import run
from .mutants import KINDS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__)
    parser.add_argument("--flavors", nargs="+", choices=sorted(FLAVORS), default=sorted(FLAVORS))
    parser.add_argument("--mutants", type=int, default=1000, help="mutants per flavor (default: %(default)s)")
    parser.add_argument("--addresses", type=int, default=2500,
                        help="random addresses per flavor on the undamaged image (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1, help="same seed, same mutants (default: %(default)s)")
    parser.add_argument("--size", type=parse_size, default="32M", help="image size (default: 32M)")
    parser.add_argument("--chunks", type=int, default=1500, help="small chunks per image (default: %(default)s)")
    parser.add_argument("--bound", type=float, default=60.0,
                        help="seconds one plugin run may take before it counts as a hang (default: %(default)s)")
    parser.add_argument("--work", type=Path, default=None, help="keep images and caches here")
    args = parser.parse_args(argv)
    report = run(args.flavors, args.mutants, args.addresses, args.seed, args.size, args.chunks, args.bound, args.work,
                 progress=lambda line: print(line, file=sys.stderr, flush=True))
    for flavor in args.flavors:
        kinds = {kind: count for (name, kind), count in report.mutants.items() if name == flavor}
        print(f"{flavor}: {sum(kinds.values())} mutants ({', '.join(f'{k} {kinds[k]}' for k in KINDS if k in kinds)})")
    print(f"plugin runs {report.runs}, addresses looked up {report.addresses}, untouched allocations checked "
          f"{report.checked_allocations}, {report.seconds:.0f} s, peak memory {report.peak_rss_mib:.0f} MiB")
    for what in ("traceback", "hang", "lost", "phantom", "owner"):
        print(f"{what}: {report.failed(what)}")
    for failure in report.failures[:50]:
        print(f"\n[{failure.what}] {failure.flavor} / {failure.mutation}\n{failure.detail}")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
