"""The image's kernel as the pool library sees it: layer, symbols, types.

Every offset the library uses comes from the kernel's symbol table (ISF);
this wrapper keeps the Volatility 3 calls for that in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from volatility3.framework import exceptions, interfaces


@dataclass(frozen=True)
class Kernel:
    context: interfaces.context.ContextInterface
    layer_name: str
    symbol_table: str
    base: int

    @classmethod
    def from_module(cls, context: interfaces.context.ContextInterface, module_name: str) -> "Kernel":
        module = context.modules[module_name]
        return cls(context, module.layer_name, module.symbol_table_name, module.offset)

    @property
    def layer(self) -> interfaces.layers.DataLayerInterface:
        return self.context.layers[self.layer_name]

    @cached_property
    def module(self):
        return self.context.module(self.symbol_table, layer_name=self.layer_name, offset=self.base)

    # -- symbols -----------------------------------------------------------
    def has_symbol(self, name: str) -> bool:
        return self.module.has_symbol(name)

    def symbol_address(self, name: str) -> int:
        return self.base + self.module.get_symbol(name).address

    def has_type(self, name: str) -> bool:
        return self.module.has_type(name)

    def type_size(self, name: str) -> int:
        return self.module.get_type(name).size

    def field_offset(self, type_name: str, field: str) -> int:
        """Offset of a (dotted) field inside ``type_name``."""
        offset = 0
        template = self.module.get_type(type_name)
        for part in field.split("."):
            offset += template.relative_child_offset(part)
            template = template.vol.members[part][1]
        return offset

    def has_field(self, type_name: str, field: str) -> bool:
        try:
            self.field_offset(type_name, field)
        except (KeyError, AttributeError, exceptions.SymbolError):
            return False
        return True

    def object(self, type_name: str, offset: int, **kwargs):
        return self.module.object(object_type=type_name, offset=offset, absolute=True, **kwargs)

    def object_from_symbol(self, name: str):
        return self.module.object_from_symbol(name)

    # -- memory ------------------------------------------------------------
    def read(self, address: int, size: int, pad: bool = False) -> bytes:
        return self.layer.read(address, size, pad=pad)

    def read_u64(self, address: int) -> int:
        return int.from_bytes(self.read(address, 8), "little")

    def read_u32(self, address: int) -> int:
        return int.from_bytes(self.read(address, 4), "little")

    def is_valid(self, address: int, size: int = 1) -> bool:
        return self.layer.is_valid(address, size)

    @property
    def uses_segment_heap(self) -> bool:
        """Windows 10 19H1+ and 11 allocate pool from the segment heap; the ISF tells which."""
        return self.has_symbol("ExPoolState") and self.has_type("_EX_POOL_HEAP_MANAGER_STATE")
