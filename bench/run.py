"""Side-by-side timings of the suite against Volatility 3's own scanner and a plain read of the image.

    python bench/run.py                      # 256 MiB, 1 GiB and 4 GiB images of every flavor
    python bench/run.py --sizes 1G --flavors win7-sp1 --repeat 3

For each flavor and size it builds a sample image (unless present, in a child process), then runs, one
after the other on the same image: Volatility 3's ``windows.poolscanner``, the suite's full census
(``windows.pooltags --scan``), a plain sequential read of the image file, ``windows.info``, a
``windows.poolowner --address`` lookup and two ``windows.poolowner --address-file`` runs over 10,000
addresses taken from the image's manifest: the full listing (every chunk of each address's page, as ``!pool``
shows it) and ``--owner-only`` (one row per address, what a pipeline takes).  Each Volatility run is a
separate process (JSON renderer, output discarded), timed from start to exit, with its own peak resident
memory; ``--repeat N`` measures N rounds (each round runs every tool once, so that a slower spell of the
machine touches them all alike) and keeps each tool's fastest run.  "Net" times subtract what every
Volatility process pays before a plugin runs (startup, automagic, symbol loading: what ``windows.info``
costs, since that plugin itself does almost nothing): the median, over the rounds, of a run's time less the
same round's ``windows.info``.  Last, once per image, the full listing's rows are fed again to Volatility's
TreeGrid and JSON renderer with no pool work: the part of that listing's time that is Volatility's own.

It prints one table row per image and then the targets the project tracks, each marked met or missed:

* census >= 20x faster than poolscanner net of startup and >= 5x whole-process, on 1 GiB images;
  >= 10x whole-process on the largest images (4 GiB);
* census net of startup <= 2x a plain sequential read of the image;
* census time (net of startup) linear or better in image size; census peak memory < 300 MiB at every size;
* poolowner over 10,000 addresses <= 3 s beyond startup on 1 GiB images (full listing and ``--owner-only``).

The figures go to a JSON file and a PNG chart (time against image size, one line per tool and one panel
per flavor; the chart needs matplotlib, the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from samples.__main__ import parse_size  # noqa: E402
from samples.flavors import FLAVORS  # noqa: E402

SEED = 1
READ_BLOCK = 16 << 20
ADDRESSES = 10_000
TOOLS = ("poolscanner", "census", "read", "info", "poolowner", "owner-file", "owner-only")
RENDER = "render"  # Volatility's TreeGrid and JSON renderer alone, fed the full listing's rows
GIB = 1 << 30


@dataclass(frozen=True)
class Measure:
    seconds: float
    peak_mib: float | None  # None: not measured (the plain read runs here; the renderer's child makes rows too)
    net: float | None = None  # beyond Volatility's startup: the median of the rounds' (this run - windows.info)
    rows: int | None = None  # rows rendered, for the renderer alone


@dataclass(frozen=True)
class Target:
    name: str
    value: float
    limit: float
    at_most: bool  # the value must stay at or below the limit (else at or above it)

    @property
    def met(self) -> bool:
        return self.value <= self.limit if self.at_most else self.value >= self.limit

    def line(self) -> str:
        verdict = "met" if self.met else f"MISSED by {abs(self.value - self.limit) / self.limit:.0%}"
        return f"  {self.name:<58} {self.value:8.2f}  {'<=' if self.at_most else '>='} {self.limit:<6g} {verdict}"


def run_vol(image: Path, cache: Path, *arguments: str) -> Measure:
    """Run one Volatility 3 command to completion; time it and take its peak RSS.

    The benchmark process stays small (images are built in a child): Linux carries a parent's peak RSS
    into a forked child's, so a large parent would hide the child's own figure.
    """
    command = [
        str(Path(sys.executable).with_name("vol")), "-q", "--offline", "-s", str(ROOT / "symbols"),
        "--cache-path", str(cache), "-p", str(ROOT / "volplugins" / "plugins"), "-r", "json", "-f", str(image), *arguments,
    ]
    # As an installed tool runs: Python keeps the bytecode it compiles, so only the first run pays for it
    # (a shell that sets PYTHONDONTWRITEBYTECODE would make every run recompile Volatility and the plugins).
    environment = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
    environment["PYTHONPATH"] = str(ROOT)
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


def fastest(taken: list[Measure], startup: list[Measure]) -> Measure:
    """The fastest of a tool's measurements (the one least disturbed by other load), with the largest peak, and
    its time beyond startup from each round's pair: a tool run and ``windows.info`` a moment apart.

    The median of the pairs' differences, not the difference of the fastest runs: a tenth of a second of
    startup noise would otherwise swing a census that takes a few tenths.
    """
    peaks = [m.peak_mib for m in taken if m.peak_mib is not None]
    beyond = sorted(m.seconds - start.seconds for m, start in zip(taken, startup))
    middle = len(beyond) // 2
    net = (beyond[middle] if len(beyond) % 2 else (beyond[middle - 1] + beyond[middle]) / 2) if beyond else None
    return Measure(min(m.seconds for m in taken), max(peaks) if peaks else None, net)


_RENDER_ALONE = """
import contextlib, os, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from volatility3.cli import text_renderer
from volatility3.framework import renderers
from volplugins.pool.runner import VolSession
root, image, cache, batch = sys.argv[1:5]
session = VolSession(Path(image), Path(cache), [Path(root) / 'symbols'])
grid = session.construct('windows.poolowner', **{'address-file': batch}).run()
rows = []
grid.populate(lambda node, _: rows.append((node.path_depth - 1, tuple(node.values))))
replay = renderers.TreeGrid([(column.name, column.type) for column in grid.columns], iter(rows))
with open(os.devnull, 'w') as sink, contextlib.redirect_stdout(sink):
    started = time.perf_counter()
    text_renderer.JsonRenderer().render(replay)
    taken = time.perf_counter() - started
print(taken, len(rows))
"""


def render_alone(image: Path, cache: Path, batch: Path) -> Measure:
    """What Volatility's own TreeGrid and JSON renderer take, with no pool work, for the rows of the full listing
    of ``batch``: the rows are made first, then fed again to a fresh grid and rendered, and only that is timed.

    The part of the full listing's time the suite cannot take away; measured in a child process, like every
    Volatility run, so the benchmark process stays small.
    """
    found = subprocess.run([sys.executable, "-c", _RENDER_ALONE, str(ROOT), str(image), str(cache), str(batch)],
                           check=True, capture_output=True, text=True).stdout.split()
    return Measure(float(found[0]), None, rows=int(found[1]))


_PICK_ADDRESSES = """
import json, random, sys
manifest = json.load(open(sys.argv[1]))
lsass = next(o['body'] for o in manifest['objects'] if o['type'] == 'Process' and o['name'] == 'lsass.exe')
allocations = manifest['allocations']
chosen = random.Random(1).choices(allocations, k=int(sys.argv[3]))
with open(sys.argv[2], 'w') as out:
    out.writelines(f"{a['address'] + a['size'] // 2:#x}\\n" for a in chosen)
print(hex(lsass))
"""


def lookup_addresses(manifest: Path, file: Path) -> str:
    """The body of lsass.exe's process object (a typical single lookup, in every flavor's manifest), and
    ``file`` filled with the middles of 10,000 allocations drawn from the manifest (a pipeline's batch).

    Read in a child process: a 1 GiB image's manifest takes a hundred MiB once parsed, which would then
    show in every later child's peak memory.
    """
    return subprocess.run([sys.executable, "-c", _PICK_ADDRESSES, str(manifest), str(file), str(ADDRESSES)],
                          check=True, capture_output=True, text=True).stdout.strip()


def image_for(flavor: str, size: int, out: Path) -> tuple[Path, Path]:
    folder = out / f"{flavor}-{size >> 20}M"
    image = folder / f"{flavor}-seed{SEED}.raw"
    manifest = folder / f"{flavor}-seed{SEED}.json"
    if not image.exists() or image.stat().st_size != size or not manifest.exists():
        print(f"building {flavor} {size >> 20} MiB ...", flush=True)
        subprocess.run([sys.executable, "-m", "samples", "--flavor", flavor, "--seed", str(SEED),
                        "--size", str(size), "--out", str(folder)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return image, manifest


def bench_image(flavor: str, size: int, out: Path, repeat: int) -> dict[str, Measure]:
    image, manifest = image_for(flavor, size, out)
    cache = image.parent / "volcache"  # one per image (Volatility mixes up tables of one name in one cache)
    cache.mkdir(exist_ok=True)
    run_vol(image, cache, "windows.info")  # warm the symbol cache and the page cache
    batch = image.with_suffix(".addresses")
    address = lookup_addresses(manifest, batch)
    measures = {
        "poolscanner": lambda: run_vol(image, cache, "windows.poolscanner"),
        "census": lambda: run_vol(image, cache, "windows.pooltags", "--scan"),
        "read": lambda: plain_read(image),
        "info": lambda: run_vol(image, cache, "windows.info"),
        "poolowner": lambda: run_vol(image, cache, "windows.poolowner", "--address", address),
        "owner-file": lambda: run_vol(image, cache, "windows.poolowner", "--address-file", str(batch)),
        "owner-only": lambda: run_vol(image, cache, "windows.poolowner", "--address-file", str(batch), "--owner-only"),
    }
    taken: dict[str, list[Measure]] = {tool: [] for tool in measures}
    for _ in range(repeat):  # round by round: a slow spell of the machine touches every tool, not just one
        for tool, measure in measures.items():
            taken[tool].append(measure())
    results = {tool: fastest(found, [] if tool == "read" else taken["info"]) for tool, found in taken.items()}
    return results | {RENDER: render_alone(image, cache, batch)}


def net(results: dict[str, Measure], tool: str) -> float:
    """A tool's time beyond Volatility's startup (``windows.info``, see :func:`fastest`), never below a
    millisecond."""
    return max(results[tool].net, 1e-3)


def table(runs: dict[tuple[str, int], dict[str, Measure]]) -> list[str]:
    """One row per image: seconds per tool, census ratios and peak memory."""
    lines = [f"{'flavor':<12} {'size':>6} {'info':>6} {'poolscan':>8} {'census':>7} {'read':>6} {'owner':>6} "
             f"{'10k own':>7} {'10k 1row':>8} | {'vs poolscan':>11} {'net':>6} {'net/read':>8} {'10k net':>7} "
             f"{'render':>6} {'1row net':>8} {'peak MiB':>8}"]
    for (flavor, size), results in runs.items():
        seconds = {tool: results[tool].seconds for tool in TOOLS}
        lines.append(
            f"{flavor:<12} {_size(size):>6} {seconds['info']:6.2f} {seconds['poolscanner']:8.2f} "
            f"{seconds['census']:7.2f} {seconds['read']:6.2f} {seconds['poolowner']:6.2f} {seconds['owner-file']:7.2f} "
            f"{seconds['owner-only']:8.2f} | "
            f"{seconds['poolscanner'] / seconds['census']:10.1f}x {net(results, 'poolscanner') / net(results, 'census'):5.1f}x "
            f"{net(results, 'census') / seconds['read']:8.2f} {net(results, 'owner-file'):7.2f} "
            f"{results[RENDER].seconds:6.2f} {net(results, 'owner-only'):8.2f} {results['census'].peak_mib:8.0f}")
    return lines


def targets(runs: dict[tuple[str, int], dict[str, Measure]]) -> list[Target]:
    found: list[Target] = []
    largest = max(size for _, size in runs)
    for (flavor, size), results in runs.items():
        where = f"{flavor} {_size(size)}"
        whole = results["poolscanner"].seconds / results["census"].seconds
        if size == GIB:
            found.append(Target(f"{where}: census vs poolscanner, net of startup (x)",
                                net(results, "poolscanner") / net(results, "census"), 20, False))
            found.append(Target(f"{where}: census vs poolscanner, whole process (x)", whole, 5, False))
            found.append(Target(f"{where}: poolowner, 10,000 addresses beyond startup (s)",
                                net(results, "owner-file"), 3, True))
            found.append(Target(f"{where}: poolowner --owner-only, 10,000 addresses beyond startup (s)",
                                net(results, "owner-only"), 3, True))
        if size == largest and size > GIB:
            found.append(Target(f"{where}: census vs poolscanner, whole process (x)", whole, 10, False))
        found.append(Target(f"{where}: census net of startup / plain read",
                            net(results, "census") / results["read"].seconds, 2, True))
        found.append(Target(f"{where}: census peak memory (MiB)", results["census"].peak_mib, 300, True))
    for flavor in dict.fromkeys(flavor for flavor, _ in runs):
        sizes = sorted(size for name, size in runs if name == flavor)
        if len(sizes) > 1:
            small, large = runs[(flavor, sizes[0])], runs[(flavor, sizes[-1])]
            growth = net(large, "census") / net(small, "census")
            found.append(Target(f"{flavor}: census net time growth {_size(sizes[0])} -> {_size(sizes[-1])} (x)",
                                growth, sizes[-1] / sizes[0], True))
    return found


def _size(size: int) -> str:
    return f"{size >> 30}G" if size >= GIB and size % GIB == 0 else f"{size >> 20}M"


def write_json(path: Path, runs: dict[tuple[str, int], dict[str, Measure]], found: list[Target]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figures = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "system": platform.platform()},
        "runs": [{"flavor": flavor, "size": size, "tools": {tool: asdict(m) for tool, m in results.items()}}
                 for (flavor, size), results in runs.items()],
        "targets": [asdict(target) | {"met": target.met} for target in found],
    }
    path.write_text(json.dumps(figures, indent=1) + "\n")


def draw_chart(path: Path, runs: dict[tuple[str, int], dict[str, Measure]]) -> bool:
    """Time against image size, one line per tool, one panel per flavor; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    flavors = list(dict.fromkeys(flavor for flavor, _ in runs))
    columns = min(len(flavors), 2)
    rows = -(-len(flavors) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6 * columns, 4.2 * rows), squeeze=False)
    labels = {"poolscanner": "windows.poolscanner", "census": "pooltags --scan (census)", "read": "plain read",
              "info": "windows.info (startup)", "poolowner": "poolowner, 1 address",
              "owner-file": "poolowner, 10,000 addresses", "owner-only": "poolowner --owner-only, 10,000 addresses"}
    for panel, flavor in zip(axes.flat, flavors):
        sizes = sorted(size for name, size in runs if name == flavor)
        for tool in TOOLS:
            panel.plot([size >> 20 for size in sizes], [runs[(flavor, size)][tool].seconds for size in sizes],
                       marker="o", label=labels[tool])
        panel.set_xscale("log", base=2)
        panel.set_yscale("log")
        panel.set_xticks([size >> 20 for size in sizes], [_size(size) for size in sizes])
        panel.set_title(flavor)
        panel.set_xlabel("image size")
        panel.set_ylabel("seconds (whole process)")
        panel.grid(True, which="both", alpha=0.3)
    for panel in list(axes.flat)[len(flavors):]:
        panel.axis("off")
    axes.flat[0].legend(fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flavors", nargs="+", default=list(FLAVORS),
                        help="flavors to measure (default: every flavor the samples build)")
    parser.add_argument("--sizes", nargs="+", type=parse_size, default=[256 << 20, GIB, 4 * GIB],
                        help="image sizes (default: 256M 1G 4G)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "images", help="where images are built")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each measurement; the fastest is kept")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "benchmark.json",
                        help="where the figures are written")
    parser.add_argument("--chart", type=Path, default=ROOT / "bench" / "results" / "benchmark.png",
                        help="where the chart is drawn")
    args = parser.parse_args(argv)
    runs: dict[tuple[str, int], dict[str, Measure]] = {}
    for flavor in args.flavors:
        for size in sorted(args.sizes):
            runs[(flavor, size)] = bench_image(flavor, size, args.out, max(args.repeat, 1))
            print("\n".join(table({(flavor, size): runs[(flavor, size)]})[1:]), flush=True)
    found = targets(runs)
    print("\nSeconds per whole process; net = beyond windows.info (Volatility's startup); 10k = poolowner "
          "--address-file with 10,000 addresses (own: full listing, 1row: --owner-only); render = what "
          "Volatility's TreeGrid and JSON renderer alone take of the full listing (its rows fed again, no pool "
          "work)\n")
    print("\n".join(table(runs)))
    print("\nTargets")
    print("\n".join(target.line() for target in found))
    write_json(args.json, runs, found)
    drawn = draw_chart(args.chart, runs)
    print(f"\nfigures: {args.json}" + (f"; chart: {args.chart}" if drawn else "; no chart (matplotlib missing)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
