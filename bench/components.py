"""Side-by-side timings of two pieces the suite leans on, each against the plain work it cannot beat.

    python bench/components.py            # best of 3 runs each

* The driver scan (which call sites allocate which tags) over a 300 KB synthetic driver, against a bare
  linear capstone disassembly of the same bytes: the scan disassembles, follows branches and tracks
  registers, so its ratio says what that analysis costs on top of decoding. Target: the scan itself under
  1 s on this driver.
* Building a 64 MiB segment-heap sample image with 5,000 allocations, against writing 64 MiB of zeros:
  what laying out the structures costs beyond the bytes. Target: under 4 s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from samples import drivers as gen  # noqa: E402
from samples.build import build_image  # noqa: E402
from volplugins.pool.driverscan import find_tag_uses  # noqa: E402

BASE = 0xFFFFF80564A00000
KERNEL_BASE = 0xFFFFF80563A00000
ROUTINES = ("ExAllocatePoolWithTag", "ExFreePoolWithTag")
IMAGE_BYTES = 64 << 20
CHUNKS = 5000


def large_driver() -> gen.Assembler:
    """2,000 short functions with a branch into every block; one in fifty allocates its own tag."""
    text = gen.Assembler()
    filler = (gen.MOV_RSP8_RBX + gen.SUB_RSP_28 + gen.mov_reg64(gen.RBX, gen.RCX) + gen.TEST_RAX_RAX
              + b"\x74\x00" + gen.LEA_EDX_RAX20 + gen.MOV_QWORD_RBX_RAX + gen.ADD_RBX_8 + gen.ADD_RSP_28
              + gen.MOV_RBX_RSP30)
    for number in range(2000):
        text.emit(filler * 5)
        if number % 50 == 0:
            tag = int.from_bytes(f"B{number // 50:03d}".encode(), "little")
            text.emit(gen.mov_imm32(gen.R8, tag), gen.mov_imm32(gen.RDX, 0x40), gen.xor_reg32(gen.RCX))
            text.call_import("ExAllocatePoolWithTag")
        text.emit(gen.RET).align()
    return text


def best(runs: int, work) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def driver_scan(runs: int) -> tuple[float, float, int]:
    import capstone

    text = large_driver()
    routines = {name: KERNEL_BASE + 0x10000 * (index + 1) for index, name in enumerate(ROUTINES)}
    linked = gen.link_driver(BASE, text, routines.__getitem__)
    memory = linked.memory()
    slots = {address: name for name, address in linked.slots.items()}
    disassembler = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    scan = best(runs, lambda: find_tag_uses(memory, BASE, slots))
    found = {use.tag for use in find_tag_uses(memory, BASE, slots)}
    if found != {f"B{number:03d}".encode() for number in range(40)}:
        raise SystemExit(f"the driver scan found {len(found)} tags instead of the 40 the driver allocates")
    sweep = best(runs, lambda: sum(1 for _ in disassembler.disasm_lite(bytes(text.code), BASE)))
    return scan, sweep, len(text.code)


def sample_build(runs: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory(prefix="bench-components-") as temporary:
        out = Path(temporary)
        build = best(runs, lambda: build_image("win10-19041", seed=7, size=IMAGE_BYTES, out_dir=out, chunks=CHUNKS))
        zeros = out / "zeros.raw"
        write = best(runs, lambda: zeros.write_bytes(bytes(IMAGE_BYTES)))
    return build, write


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement; the fastest is kept")
    args = parser.parse_args(argv)
    scan, sweep, size = driver_scan(args.repeat)
    build, write = sample_build(args.repeat)
    print(f"driver scan of {size // 1000} KB of code: {scan:.3f} s; linear disassembly {sweep:.3f} s; "
          f"ratio {scan / sweep:.1f}; target scan < 1 s: {'met' if scan < 1 else 'missed'}")
    print(f"sample build, {IMAGE_BYTES >> 20} MiB with {CHUNKS} allocations: {build:.3f} s; writing as many zeros "
          f"{write:.3f} s; ratio {build / write:.1f}; target build < 4 s: {'met' if build < 4 else 'missed'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
