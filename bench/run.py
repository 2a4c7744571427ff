"""Side-by-side timings of the suite's census against Volatility 3's own scanner and a plain read.

    python bench/run.py                      # 256 MiB and 1 GiB images of both flavors
    python bench/run.py --sizes 1G --flavors win7-sp1

For each flavor and size it builds a sample image (unless present), then runs,
one after the other on the same image: Volatility 3's ``windows.poolscanner``,
the suite's full census (``windows.pooltags --scan``), a plain sequential read
of the image file, ``windows.info`` and a ``windows.poolowner`` lookup.  Each
Volatility run is a separate process, timed from start to exit, with its peak
resident memory.  It prints the ratios the project tracks:

* census / poolscanner   (target: <= 0.1, i.e. at least 10x faster)
* census / plain read    (target: <= 5)
* poolowner / info       (target: <= 1.2: the lookup itself costs almost nothing)
* census time growth from the smallest to the largest image (target: linear or better)
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from samples.__main__ import parse_size  # noqa: E402
from samples.build import build_image  # noqa: E402

SEED = 1
READ_BLOCK = 16 << 20
LOOKUP = {"win10-19041": "0xffffdc0155e94340"}


@dataclass(frozen=True)
class Measure:
    seconds: float
    peak_mib: float


def run_vol(image: Path, cache: Path, *arguments: str) -> Measure:
    """Run one Volatility 3 command to completion; time it and take its peak RSS."""
    command = [
        str(Path(sys.executable).with_name("vol")), "-q", "--offline", "-s", str(ROOT / "symbols"),
        "--cache-path", str(cache), "-p", str(ROOT / "volplugins"), "-r", "json", "-f", str(image), *arguments,
    ]
    environment = dict(os.environ, PYTHONPATH=str(ROOT))
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=environment)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        error = process.stderr.read().decode(errors="replace")[-2000:]
        raise SystemExit(f"vol {' '.join(arguments)} failed on {image}:\n{error}")
    return Measure(seconds, usage.ru_maxrss / 1024)


def plain_read(image: Path) -> Measure:
    started = time.perf_counter()
    with open(image, "rb", buffering=0) as handle:
        while handle.read(READ_BLOCK):
            pass
    return Measure(time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def lookup_address(flavor: str, manifest: Path) -> str:
    if flavor in LOOKUP:
        return LOOKUP[flavor]
    import json

    objects = json.loads(manifest.read_text())["objects"]
    return hex(next(o["body"] for o in objects if o["type"] == "Process" and o["name"] == "lsass.exe"))


def image_for(flavor: str, size: int, out: Path) -> tuple[Path, Path]:
    folder = out / f"{flavor}-{size >> 20}M"
    image = folder / f"{flavor}-seed{SEED}.raw"
    manifest = folder / f"{flavor}-seed{SEED}.json"
    if not image.exists() or image.stat().st_size != size:
        print(f"building {flavor} {size >> 20} MiB ...", flush=True)
        build_image(flavor, SEED, size, folder)
    return image, manifest


def bench_image(flavor: str, size: int, out: Path, cache: Path) -> dict[str, Measure]:
    image, manifest = image_for(flavor, size, out)
    run_vol(image, cache, "windows.info")  # warm the symbol cache and the page cache
    results = {
        "poolscanner": run_vol(image, cache, "windows.poolscanner"),
        "census": run_vol(image, cache, "windows.pooltags", "--scan"),
        "read": plain_read(image),
        "info": run_vol(image, cache, "windows.info"),
        "poolowner": run_vol(image, cache, "windows.poolowner", "--address", lookup_address(flavor, manifest)),
    }
    print(f"\n{flavor}, {size >> 20} MiB image")
    for name, measure in results.items():
        print(f"  {name:<12} {measure.seconds:8.2f} s   peak {measure.peak_mib:7.0f} MiB")
    census, scanner = results["census"].seconds, results["poolscanner"].seconds
    print(f"  census / poolscanner  {census / scanner:6.3f}   ({scanner / census:.1f}x faster; target >= 10x)")
    print(f"  census / plain read   {census / results['read'].seconds:6.2f}   (target <= 5)")
    print(f"  poolowner / info      {results['poolowner'].seconds / results['info'].seconds:6.2f}   (target <= 1.2)")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flavors", nargs="+", default=["win10-19041", "win7-sp1"], help="flavors to measure")
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[256 << 20, 1 << 30],
                        help="image sizes, smallest first (default: 256M 1G)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "images", help="where images are built")
    args = parser.parse_args(argv)
    cache = args.out / "volcache"
    cache.mkdir(parents=True, exist_ok=True)
    for flavor in args.flavors:
        runs = {size: bench_image(flavor, size, args.out, cache) for size in sorted(args.sizes)}
        small, large = min(runs), max(runs)
        if small != large:
            growth = runs[large]["census"].seconds / runs[small]["census"].seconds
            memory = runs[large]["census"].peak_mib / runs[small]["census"].peak_mib
            print(f"\n{flavor}: census time x{growth:.2f} and peak memory x{memory:.2f} for a "
                  f"x{large / small:.0f} larger image (linear or better: time factor <= {large / small:.0f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
