"""Shared fixtures: one sample image per flavor, built once per test run, and a Volatility session on it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from samples.build import build_image  # noqa: E402
from samples.flavors import FLAVORS as FLAVOR_SPECS  # noqa: E402
from volrun import VolSession  # noqa: E402

FLAVORS = ("win10-19041", "win7-sp1", "win11-22000", "win10-1809", "win81-9600", "win10-18362", "srv2022-20348")
SAMPLE_SIZE = 64 << 20


class Sample:
    def __init__(self, flavor: str, image: Path, manifest: Path, cache: Path, extra_symbols: tuple[Path, ...] = ()):
        self.flavor = flavor
        self.segment_heap = FLAVOR_SPECS[flavor].segment_heap
        self.image = image
        self.manifest = json.loads(manifest.read_text())
        self.cache = cache
        self.extra_symbols = extra_symbols
        self._session: VolSession | None = None
        self._kernel = None

    @property
    def session(self) -> VolSession:
        if self._session is None:
            self._session = VolSession(self.image, self.cache, self.extra_symbols)
            self._session.rows("windows.info.Info")
        return self._session

    @property
    def kernel(self):
        """One kernel per sample: what the library learns of a kernel is kept on it."""
        from volplugins.pool.kernel import Kernel

        if self._kernel is None:
            self._kernel = Kernel.from_module(self.session.context, self.session.kernel_module)
        return self._kernel


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("volcache")


@pytest.fixture(scope="session")
def samples(tmp_path_factory, cache_dir) -> dict[str, Sample]:
    out = tmp_path_factory.mktemp("images")
    built = {}
    for flavor in FLAVORS:
        result = build_image(flavor, seed=1, size=SAMPLE_SIZE, out_dir=out)
        built[flavor] = Sample(flavor, result.image_path, result.manifest_path, cache_dir)
    return built


@pytest.fixture(scope="session", params=FLAVORS)
def sample(request, samples) -> Sample:
    return samples[request.param]
