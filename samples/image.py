"""One synthetic image under construction: memory, kernel layout, ground truth."""

from __future__ import annotations

import random

from .flavors import Flavor
from .isf import KernelTypes
from .manifest import Manifest
from .memory import AddressSpace


class Image:
    """Shared state of the builders: they write structures, the manifest records what they placed."""

    def __init__(self, flavor: Flavor, seed: int, physical_size: int):
        self.flavor = flavor
        self.seed = seed
        self.rng = random.Random(seed)
        self.types = KernelTypes(flavor.isf_path)
        self.space = AddressSpace(physical_size, flavor.self_map_index)
        self.kernel_base = flavor.kernel_base
        self.manifest = Manifest(flavor=flavor.name, seed=seed)

    def symbol(self, name: str) -> int:
        """Virtual address of a kernel variable."""
        return self.kernel_base + self.types.symbol(name)

    def put(self, address: int, type_name: str, values: dict[str, int]) -> None:
        """Set fields of the ``type_name`` structure at ``address``, keeping its other bytes."""
        size = self.types.size(type_name)
        buffer = bytearray(self.space.read(address, size))
        self.types.pack(buffer, 0, type_name, values)
        self.space.write(address, bytes(buffer))

    def put_symbol(self, name: str, type_name: str, values: dict[str, int]) -> None:
        self.put(self.symbol(name), type_name, values)

    def offset(self, type_name: str, path: str) -> int:
        return self.types.offset(type_name, path)
