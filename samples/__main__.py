"""Command line: ``python -m samples --flavor win10-19041 --seed 1 --size 64M --out samples/out``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .bugchecks import BugCheckRequest, check_flavor, parse_bugcheck
from .build import build_image
from .crashdump import KINDS as DUMP_KINDS
from .corruption import KINDS, SEGMENT_HEAP_ONLY, parse_kinds
from .flavors import FLAVORS
from .poolfill import Fill, parse_fill
from .snapshots import Leak, parse_leak

UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    multiplier = UNITS.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in UNITS else text
    try:
        size = int(float(number) * multiplier)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 64M, 1G)") from None
    if size < 32 << 20 or size % 0x1000:
        raise argparse.ArgumentTypeError("size must be at least 32M and a multiple of 4K")
    return size


def leak_argument(text: str) -> Leak:
    try:
        return parse_leak(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def corrupt_argument(text: str) -> list[str]:
    try:
        return parse_kinds(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def bugcheck_argument(text: str) -> BugCheckRequest:
    try:
        return parse_bugcheck(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def fill_argument(text: str) -> Fill:
    try:
        return parse_fill(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m samples",
        description="Build a synthetic Windows x64 memory image and its ground-truth manifest.",
    )
    parser.add_argument("--flavor", choices=sorted(FLAVORS), default="win10-19041",
                        help="Windows build to model (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=1, help="random seed; same seed, same bytes (default: %(default)s)")
    parser.add_argument("--size", type=parse_size, default="64M",
                        help="physical memory size of the image, e.g. 64M or 1G (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("samples/out"),
                        help="directory for <flavor>-seed<N>.raw and .json (default: %(default)s)")
    parser.add_argument("--chunks", type=int, default=None,
                        help="small pool chunks to place (default: 6000 per 64 MiB of image)")
    parser.add_argument("--leak", type=leak_argument, action="append", default=[], metavar="TAG:COUNT[:SIZE]",
                        help="a later snapshot of the same image in which TAG leaked COUNT more live nonpaged "
                             "allocations of SIZE bytes (default 0x60), e.g. NfkR:400; repeatable")
    parser.add_argument("--corrupt", type=corrupt_argument, default=[], metavar="KIND[,KIND...]",
                        help="damage chunks after the build, recorded in the manifest: "
                             f"{', '.join(KINDS)} ({' and '.join(SEGMENT_HEAP_ONLY)} need a segment heap flavor)")
    parser.add_argument("--crash-dump", choices=DUMP_KINDS, default=None,
                        help="also write the image as a 64-bit crash dump <name>.dmp: full (complete memory dump, "
                             "physical memory runs) or kernel (kernel memory dump, page bitmap)")
    parser.add_argument("--bugcheck", type=bugcheck_argument, default=None, metavar="CODE[:P1[:P2[:P3[:P4]]]]",
                        help="the system stopped with this bug check (hex; '-' or nothing for a parameter the damage "
                             "decides): plant the damage the code describes (0x19, 0xC1, 0xC2, 0xC5, 0xCD, 0xD5, "
                             "0xD6, 0x13A), record it in KiBugCheckData and the manifest; implies --crash-dump full")
    parser.add_argument("--fill-pool", type=fill_argument, default=None, metavar="POOL:TAG[:PERCENT]",
                        help="a driver exhausted POOL (NonPaged or Paged): TAG's allocations fill it to PERCENT "
                             "(default 95) of the limit the kernel enforces, e.g. NonPaged:NfkR:95")
    parser.add_argument("--big-pool-tails", action="store_true",
                        help="classic pool: big allocations below 64 KiB end on a 16-byte boundary and return the "
                             "rest of their last page behind a 'Frag' chunk, whatever the flavor's build does "
                             "(win10-1809 does it by default)")
    args = parser.parse_args(argv)
    for kind in set(args.corrupt) & set(SEGMENT_HEAP_ONLY):
        if not FLAVORS[args.flavor].segment_heap:
            parser.error(f"--corrupt {kind} needs a segment heap flavor; {args.flavor} has classic pool")
    if args.bugcheck:
        try:
            check_flavor(args.bugcheck, FLAVORS[args.flavor].segment_heap)
        except ValueError as error:
            parser.error(str(error))
    crash_dump = args.crash_dump or ("full" if args.bugcheck else None)
    try:
        result = build_image(args.flavor, args.seed, args.size, args.out, chunks=args.chunks, leaks=args.leak,
                             corrupt=args.corrupt, bugcheck=args.bugcheck, crash_dump=crash_dump, fill=args.fill_pool,
                             big_pool_tails=args.big_pool_tails)
    except ValueError as error:
        parser.error(str(error))
    print(f"image    {result.image_path}")
    if result.dump_path:
        print(f"dump     {result.dump_path}")
    print(f"manifest {result.manifest_path}")
    print(f"built in {result.seconds:.2f}s: {result.allocations} allocations, {result.frames_used} pages mapped",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
