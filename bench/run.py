"""Side-by-side timings of the suite's census against Volatility 3's own scanner and a plain read.

    python bench/run.py                      # 256 MiB and 1 GiB images of both flavors
    python bench/run.py --sizes 1G --flavors win7-sp1 --repeat 3

For each flavor and size it builds a sample image (unless present, in a child process), then runs, one
after the other on the same image: Volatility 3's ``windows.poolscanner``, the suite's full census
(``windows.pooltags --scan``), a plain sequential read of the image file, ``windows.info`` and a
``windows.poolowner --address`` lookup.  Each Volatility run is a separate process (JSON renderer, output
discarded), timed from start to exit, with its own peak resident memory; ``--repeat N`` keeps the fastest
of N runs.  It prints the ratios the project tracks, on whole-process times and net of the cost every
Volatility process pays before a plugin runs (startup, automagic, symbol loading: what ``windows.info``
costs, since that plugin itself does almost nothing):

* census / poolscanner   (target: <= 0.1, i.e. at least 10x faster)
* census / plain read    (target: <= 5)
* poolowner / info       (target: <= 1.2: the lookup itself costs almost nothing)
* census peak memory     (target: < 600 MiB for 1 GiB, flat as images grow)
* census time growth from the smallest to the largest image (target: linear or better)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from samples.__main__ import parse_size  # noqa: E402

SEED = 1
READ_BLOCK = 16 << 20


@dataclass(frozen=True)
class Measure:
    seconds: float
    peak_mib: float | None  # None: measured in the benchmark's own process


def run_vol(image: Path, cache: Path, *arguments: str) -> Measure:
    """Run one Volatility 3 command to completion; time it and take its peak RSS.

    The benchmark process stays small (images are built in a child): Linux carries a parent's peak RSS
    into a forked child's, so a large parent would hide the child's own figure.
    """
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
    error = process.stderr.read().decode(errors="replace")
    process.stderr.close()
    if process.returncode != 0:
        raise SystemExit(f"vol {' '.join(arguments)} failed on {image}:\n{error[-2000:]}")
    return Measure(seconds, usage.ru_maxrss / 1024)


def plain_read(image: Path) -> Measure:
    started = time.perf_counter()
    with open(image, "rb", buffering=0) as handle:
        while handle.read(READ_BLOCK):
            pass
    return Measure(time.perf_counter() - started, None)


def best(runs: int, measure) -> Measure:
    """The fastest of ``runs`` measurements (the one least disturbed by other load), with the largest peak."""
    taken = [measure() for _ in range(runs)]
    peaks = [m.peak_mib for m in taken if m.peak_mib is not None]
    return Measure(min(m.seconds for m in taken), max(peaks) if peaks else None)


def lookup_address(manifest: Path) -> str:
    """The body of lsass.exe's process object: a typical lookup, found in every flavor's manifest.

    Read in a child process: a 1 GiB image's manifest takes a hundred MiB once parsed, which would then
    show in every later child's peak memory.
    """
    script = ("import json, sys; objects = json.load(open(sys.argv[1]))['objects']; "
              "print(hex(next(o['body'] for o in objects if o['type'] == 'Process' and o['name'] == 'lsass.exe')))")
    return subprocess.run([sys.executable, "-c", script, str(manifest)], check=True, capture_output=True,
                          text=True).stdout.strip()


def image_for(flavor: str, size: int, out: Path) -> tuple[Path, Path]:
    folder = out / f"{flavor}-{size >> 20}M"
    image = folder / f"{flavor}-seed{SEED}.raw"
    manifest = folder / f"{flavor}-seed{SEED}.json"
    if not image.exists() or image.stat().st_size != size or not manifest.exists():
        print(f"building {flavor} {size >> 20} MiB ...", flush=True)
        subprocess.run([sys.executable, "-m", "samples", "--flavor", flavor, "--seed", str(SEED),
                        "--size", str(size), "--out", str(folder)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return image, manifest


def bench_image(flavor: str, size: int, out: Path, cache: Path, repeat: int) -> dict[str, Measure]:
    image, manifest = image_for(flavor, size, out)
    run_vol(image, cache, "windows.info")  # warm the symbol cache and the page cache
    address = lookup_address(manifest)
    results = {
        "poolscanner": best(repeat, lambda: run_vol(image, cache, "windows.poolscanner")),
        "census": best(repeat, lambda: run_vol(image, cache, "windows.pooltags", "--scan")),
        "read": best(repeat, lambda: plain_read(image)),
        "info": best(repeat, lambda: run_vol(image, cache, "windows.info")),
        "poolowner": best(repeat, lambda: run_vol(image, cache, "windows.poolowner", "--address", address)),
    }
    report(flavor, size, results)
    return results


def report(flavor: str, size: int, results: dict[str, Measure]) -> None:
    print(f"\n{flavor}, {size >> 20} MiB image", flush=True)
    for name, measure in results.items():
        peak = f"peak {measure.peak_mib:7.0f} MiB" if measure.peak_mib is not None else "(in the benchmark process)"
        print(f"  {name:<12} {measure.seconds:8.2f} s   {peak}")
    seconds = {name: measure.seconds for name, measure in results.items()}
    startup = seconds["info"]
    net = {name: max(seconds[name] - startup, 1e-3) for name in ("poolscanner", "census", "poolowner")}
    census, scanner, read = seconds["census"], seconds["poolscanner"], seconds["read"]
    print("  ratio                  whole process         net of Volatility's startup (info)")
    print(f"  census / poolscanner   {census / scanner:6.3f} ({scanner / census:5.1f}x faster)   "
          f"{net['census'] / net['poolscanner']:6.3f} ({net['poolscanner'] / net['census']:5.1f}x faster)"
          "   target >= 10x")
    print(f"  census / plain read    {census / read:6.2f}                 {net['census'] / read:6.2f}"
          "                      target <= 5")
    print(f"  poolowner / info       {seconds['poolowner'] / startup:6.2f}                 "
          f"(lookup itself {net['poolowner']:.2f} s)        target <= 1.2")
    print(f"  census peak memory     {results['census'].peak_mib:6.0f} MiB"
          f"             (info: {results['info'].peak_mib:.0f} MiB)       target < 600 MiB at 1 GiB", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flavors", nargs="+", default=["win10-19041", "win7-sp1"], help="flavors to measure")
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[256 << 20, 1 << 30],
                        help="image sizes (default: 256M 1G)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "images", help="where images are built")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each measurement; the fastest is kept")
    args = parser.parse_args(argv)
    cache = args.out / "volcache"
    cache.mkdir(parents=True, exist_ok=True)
    for flavor in args.flavors:
        runs = {size: bench_image(flavor, size, args.out, cache, max(args.repeat, 1)) for size in sorted(args.sizes)}
        small, large = min(runs), max(runs)
        if small != large:
            factor = large / small
            census = {size: runs[size]["census"].seconds - runs[size]["info"].seconds for size in (small, large)}
            growth = runs[large]["census"].seconds / runs[small]["census"].seconds
            net_growth = max(census[large], 1e-3) / max(census[small], 1e-3)
            memory = runs[large]["census"].peak_mib / runs[small]["census"].peak_mib
            print(f"\n{flavor}: for a x{factor:.0f} larger image, census time x{growth:.2f} (net of startup "
                  f"x{net_growth:.2f}; linear or better: <= {factor:.0f}), peak memory x{memory:.2f} (flat: ~1)",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
