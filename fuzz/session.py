"""The library's in-process runner over an image whose bytes the fuzzer swaps between runs.

The kernel is found once (automagic on the undamaged image); afterwards every
damaged copy is served from memory by a data layer standing in for the image
file, under the file layer's name, and the translation layers above it are
rebuilt so no cached page-table walk of an earlier copy survives; what the
pool library memoised about the kernel's memory is dropped as well.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from volatility3.framework import exceptions, interfaces
from volatility3.framework.layers import physical

from volplugins.pool import runner

SYMBOLS = Path(__file__).resolve().parent.parent / "symbols"
FIRST_PLUGIN = "windows.poolcensus.PoolCensus"


class Hang(BaseException):
    """A run went past its time bound (a BaseException, so no ``except Exception`` in a plugin swallows it)."""


@contextmanager
def time_bound(seconds: float) -> Iterator[None]:
    def expire(signum, frame):
        raise Hang(f"no answer within {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class ImageBuffer(interfaces.layers.DataLayerInterface):
    """Physical memory held in this process: the undamaged bytes or a damaged copy, possibly cut short."""

    def __init__(self, context, config_path: str, name: str, data: bytes | bytearray):
        super().__init__(context, config_path, name)
        self.data = data

    @property
    def maximum_address(self) -> int:
        return len(self.data) - 1

    @property
    def minimum_address(self) -> int:
        return 0

    def is_valid(self, offset: int, length: int = 1) -> bool:
        return 0 <= offset and offset + length <= len(self.data)

    def read(self, offset: int, length: int, pad: bool = False) -> bytes:
        if not self.is_valid(offset, length):
            if not pad:
                raise exceptions.InvalidAddressException(self.name, max(offset, len(self.data)),
                                                         "offset outside of the image")
            inside = bytes(self.data[max(offset, 0) : max(offset, 0) + length])
            return inside + bytes(length - len(inside))
        return bytes(self.data[offset : offset + length])

    def write(self, offset: int, data: bytes) -> None:
        raise exceptions.LayerException(self.name, "the fuzzed image is read-only")

    @classmethod
    def get_requirements(cls) -> list:
        return []


class Session(runner.VolSession):
    """One image, plugins run in turn on whatever bytes :meth:`load` put under them."""

    def __init__(self, image: Path, cache: Path):
        super().__init__(image, cache, symbol_dirs=[SYMBOLS], offline=True)
        self.construct(FIRST_PLUGIN)
        self._file = next(name for name in self.context.layers
                          if isinstance(self.context.layers[name], physical.FileLayer))
        # Each layer above the file, with what it publishes flattened once: passing a layer's own (chained)
        # metadata to its successor would nest one more level on every load.
        self._above = [(name, self.context.layers[name], dict(self.context.layers[name].metadata))
                       for name in self.context.layers if self._file in self.context.layers[name].dependencies]

    def load(self, data: bytes | bytearray) -> None:
        """Serve ``data`` as the image from now on, with fresh translation layers above it."""
        layers = self.context.layers
        for name, _, _ in self._above:
            layers.del_layer(name)
        file_config = layers[self._file].config_path
        layers.del_layer(self._file)
        layers.add_layer(ImageBuffer(self.context, file_config, self._file, data))
        self._above = [(name, type(layer)(self.context, layer.config_path, name, metadata=metadata), metadata)
                       for name, layer, metadata in self._above]
        for _, layer, _ in self._above:
            layers.add_layer(layer)
        _forget_library_memos()


def _forget_library_memos() -> None:
    """Clear every memoised function of the pool library (their keys name the kernel, not the bytes read)."""
    for name, module in list(sys.modules.items()):
        if name.startswith("volplugins.pool") and module is not None:
            for value in vars(module).values():
                if callable(getattr(value, "cache_clear", None)):
                    value.cache_clear()
