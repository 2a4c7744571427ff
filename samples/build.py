"""Build one synthetic image: kernel, objects, pools, bookkeeping; then save it with its manifest."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .flavors import FLAVORS
from .image import Image
from .kernel import build_kernel


@dataclass(frozen=True)
class BuildResult:
    image_path: Path
    manifest_path: Path
    seconds: float
    frames_used: int


def build_image(flavor_name: str, seed: int, size: int, out_dir: Path) -> BuildResult:
    started = time.perf_counter()
    image = Image(FLAVORS[flavor_name], seed, size)
    build_kernel(image)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{flavor_name}-seed{seed}"
    image_path = out_dir / f"{stem}.raw"
    manifest_path = out_dir / f"{stem}.json"
    image.space.save(image_path)
    manifest_path.write_text(image.manifest.to_json())
    return BuildResult(image_path, manifest_path, time.perf_counter() - started, image.space.frames_used)
