"""The image's kernel as the pool library sees it: layer, symbols, types.

Every offset the library uses comes from the kernel's symbol table (ISF);
this wrapper keeps the Volatility 3 calls for that in one place.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field, replace
from functools import cached_property

import numpy as np
from volatility3.framework import constants, exceptions, interfaces, objects
from volatility3.framework.objects import templates

from . import translate


vollog = logging.getLogger(__name__)

PAGE_SIZE = 0x1000  # the small page of x86 and x64: the unit both pool allocators carve
MASK64 = (1 << 64) - 1  # an x64 machine word: addresses and keys wrap to it
# What Volatility 3 raises when the ISF lacks a symbol, a type or a member (IndexError: a member a template lacks).
SYMBOLS_MISSING = (KeyError, AttributeError, IndexError, exceptions.SymbolError)


@dataclass(frozen=True)
class FieldLayout:
    """Where one structure field lives: byte offset, storage size, bit range of a bitfield.

    A plain record so decoders can run over raw bytes (a page, a whole table)
    without going back to the layer for every field.  Bitfields are read
    unsigned; ``signed`` applies to whole fields read from bytes only.
    """

    offset: int
    size: int
    bit_position: int = 0
    bit_length: int | None = None
    signed: bool = False

    @property
    def is_bitfield(self) -> bool:
        return self.bit_length is not None

    @cached_property
    def mask(self) -> int:
        return (1 << (self.bit_length if self.bit_length is not None else self.size * 8)) - 1

    @cached_property
    def shift(self) -> int:
        """Where the field starts in an integer holding the whole structure."""
        return self.offset * 8 + self.bit_position

    @property
    def alone(self) -> "FieldLayout":
        """The same bits, for a buffer that starts at the field's storage unit."""
        return replace(self, offset=0)

    def of(self, value: int) -> int:
        """The field taken from an integer that holds the whole structure (e.g. a header read as one word)."""
        return (value >> self.shift) & self.mask

    def extract(self, data: bytes, base: int = 0) -> int:
        """The field of the structure that starts at ``data[base]``."""
        start = base + self.offset
        value = int.from_bytes(data[start : start + self.size], "little", signed=self.signed and not self.is_bitfield)
        if self.bit_length is None:
            return value
        return (value >> self.bit_position) & self.mask

    def column(self, data: bytes, count: int, stride: int) -> np.ndarray:
        """The field of ``count`` consecutive entries ``stride`` bytes apart (uint64, int64 if signed)."""
        signed = self.signed and not self.is_bitfield
        raw = np.ndarray(
            (count,),
            dtype=np.dtype(f"<{'i' if signed else 'u'}{self.size}"),
            buffer=data,
            offset=self.offset,
            strides=(stride,),
        )
        values = raw.astype(np.int64 if signed else np.uint64)
        if self.bit_length is not None:
            values = (values >> np.uint64(self.bit_position)) & np.uint64(self.mask)
        return values


class Fields:
    """One field of many structures of a buffer at once (uint64 columns), through typed views of its bytes."""

    def __init__(self, data: bytes):
        self._data = data
        self._views: dict[int, np.ndarray] = {1: np.frombuffer(data, dtype=np.uint8)}

    def field(self, positions: np.ndarray, where: FieldLayout) -> np.ndarray:
        """The field of the structures that start at byte ``positions`` of the buffer."""
        if where.size in (2, 4, 8) and where.offset % where.size == 0 and not (positions % where.size).any():
            if where.size not in self._views:
                usable = len(self._data) - len(self._data) % where.size
                self._views[where.size] = np.frombuffer(self._data, dtype=np.dtype(f"<u{where.size}"),
                                                        count=usable // where.size)
            value = self._views[where.size][(positions + where.offset) // where.size].astype(np.uint64)
        else:
            value = np.zeros(len(positions), dtype=np.uint64)
            for byte in range(where.size):
                value |= self._views[1][positions + (where.offset + byte)].astype(np.uint64) << np.uint64(8 * byte)
        if where.bit_length is not None:
            value = (value >> np.uint64(where.bit_position)) & np.uint64(where.mask)
        return value


class IsfTypes:
    """The symbol lookups of :class:`Kernel` over a loaded ISF JSON dict: decoders checked without an image."""

    def __init__(self, isf: dict):
        self._isf = isf

    def _size(self, ref: dict) -> int:
        kind = ref["kind"]
        if kind in ("base", "pointer"):
            return self._isf["base_types"][ref.get("name", "pointer")]["size"]
        if kind == "array":
            return ref["count"] * self._size(ref["subtype"])
        if kind == "enum":
            return self._isf["enums"][ref["name"]]["size"]
        return self._isf["user_types"][ref["name"]]["size"]

    def field_layout(self, type_name: str, field: str) -> FieldLayout:
        offset, ref = 0, {"kind": "struct", "name": type_name}
        for part in field.split("."):
            member = self._isf["user_types"][ref["name"]]["fields"][part]
            offset += member["offset"]
            ref = member["type"]
        if ref["kind"] == "bitfield":
            return FieldLayout(offset, self._size(ref["type"]), ref["bit_position"], ref["bit_length"])
        signed = ref["kind"] == "base" and bool(self._isf["base_types"][ref["name"]].get("signed"))
        return FieldLayout(offset, self._size(ref), signed=signed)

    def type_size(self, name: str) -> int:
        if name == "pointer":
            return self._isf["base_types"]["pointer"]["size"]
        return self._isf["user_types"][name]["size"]

    def has_symbol(self, name: str) -> bool:
        return name in self._isf.get("symbols", {})

    def enumeration(self, name: str) -> dict[str, int]:
        return dict(self._isf.get("enums", {}).get(name, {}).get("constants", {}))


def page_base(address: int) -> int:
    """The first byte of the page holding ``address``."""
    return address & ~(PAGE_SIZE - 1)


def per_kernel(function):
    """Remember ``function(kernel, *args)`` on the kernel object itself.

    What is decided once per kernel (layouts, tables read once) then lives exactly as long as the kernel:
    a module-level cache would keep every image's Volatility context alive for the life of the process.
    """

    @functools.wraps(function)
    def remembered(kernel, *args):
        key = (remembered, *args)
        try:
            return kernel.memo[key]
        except KeyError:
            value = kernel.memo[key] = function(kernel, *args)
            return value

    return remembered


def canonical(address: int, bits: int = 48) -> int:
    """Sign-extend an address Volatility 3 keeps masked to ``bits`` (kernel offsets) to its canonical form."""
    if address >> (bits - 1) & 1 and address < (1 << bits):
        return address | ((1 << 64) - (1 << bits))
    return address


@dataclass(frozen=True)
class Kernel:
    context: interfaces.context.ContextInterface
    layer_name: str
    symbol_table: str
    base: int
    memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # see per_kernel

    @classmethod
    def from_module(cls, context: interfaces.context.ContextInterface, module_name: str) -> "Kernel":
        module = context.modules[module_name]
        return cls(context, module.layer_name, module.symbol_table_name, canonical(module.offset))

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

    @per_kernel
    def type_size(self, name: str) -> int:
        return self._type(name).size

    def field_offset(self, type_name: str, field: str) -> int:
        """Offset of a (dotted) field inside ``type_name``."""
        return self.field_layout(type_name, field).offset

    @per_kernel
    def field_layout(self, type_name: str, field: str) -> FieldLayout:
        """Offset, size and bit range of a (dotted) field inside ``type_name``.

        Builds differ in how they declare the same bytes (one bitfield ULONG on
        Windows 7, USHORT bitfields later), so callers decode through this.
        Field layouts are asked for thousands of times per walk: decided once per kernel.
        """
        return self._template_layout(type_name, field)

    def enumeration(self, name: str) -> dict[str, int]:
        """The constants of an enumeration of the kernel's ISF (empty when the ISF lacks it)."""
        try:
            return dict(self.module.get_enumeration(name).choices)
        except exceptions.SymbolError:
            return {}

    @per_kernel
    def array_count(self, type_name: str, field: str) -> int:
        """Element count of an array field (a top-level member of ``type_name``)."""
        return self._type(type_name).vol.members[field][1].vol.count

    def _template_layout(self, type_name: str, field: str) -> FieldLayout:
        offset, template = self._field(type_name, field)
        template = self._resolved(template)
        if issubclass(template.vol.object_class, objects.BitField):
            start, end = template.vol.start_bit, template.vol.end_bit
            return FieldLayout(offset, template.vol.base_type.size, start, end - start)
        data_format = template.vol.get("data_format")
        return FieldLayout(offset, self._size_of(template), signed=bool(data_format and data_format.signed))

    def _size_of(self, template) -> int:
        """A member's size; arrays of structures hold references to look up first."""
        if isinstance(template, templates.ReferenceTemplate):
            return self._type(template.vol.type_name).size
        if issubclass(template.vol.object_class, objects.Array):
            return template.vol.count * self._size_of(template.vol.subtype)
        return template.size

    def _type(self, name: str):
        """A type's template from the kernel's own symbol table.

        The symbol space would first resolve every type the template refers to (for the
        system information structures, half the kernel: most of a second); members that are
        themselves structures stay references here and are looked up only when a path enters them.
        """
        return self.context.symbol_space[self.symbol_table].get_type(name.split(constants.BANG)[-1])

    def _field(self, type_name: str, field: str):
        """Offset and template of a (dotted) field, following nested structures."""
        offset = 0
        template = self._type(type_name)
        for part in field.split("."):
            template = self._resolved(template)
            offset += template.relative_child_offset(part)
            template = template.vol.members[part][1]
        return offset, template

    def _resolved(self, template):
        """Nested structures come back as references; look the real template up by name."""
        if isinstance(template, templates.ReferenceTemplate):
            return self._type(template.vol.type_name)
        return template

    def lacks(self, what: str | BaseException, feature: str) -> None:
        """Say once per kernel, in one line, that its symbol table lacks ``what`` (a name, or the error a
        lookup raised) and which ``feature`` goes without it; the rest of the answer stands."""
        name = what if isinstance(what, str) else missing_name(what)
        if ("lacks", name) not in self.memo:
            self.memo[("lacks", name)] = feature
            vollog.warning("kernel symbols lack %s: %s", name, feature)

    def has_field(self, type_name: str, field: str) -> bool:
        try:
            self.field_offset(type_name, field)
        except SYMBOLS_MISSING:
            return False
        return True

    def object(self, type_name: str, offset: int, **kwargs):
        return self.module.object(object_type=type_name, offset=offset, absolute=True, **kwargs)

    def object_from_symbol(self, name: str):
        return self.module.object_from_symbol(name)

    # -- memory ------------------------------------------------------------
    def read(self, address: int, size: int, pad: bool = False) -> bytes:
        """``layer.read``, translated by the layer, its bytes read from a raw image file directly (see
        :func:`.translate.layer_read`)."""
        return translate.layer_read(self.context, self.layer_name, address, size, pad)

    def read_u64(self, address: int) -> int:
        return int.from_bytes(self.read(address, 8), "little")

    def read_u32(self, address: int) -> int:
        return int.from_bytes(self.read(address, 4), "little")

    def read_pointer(self, address: int) -> int:
        """A pointer-sized kernel variable (size from the ISF)."""
        return int.from_bytes(self.read(address, self.type_size("pointer")), "little")

    def read_table(self, address: int, size: int) -> tuple[bytes, int]:
        """``size`` bytes translated in bulk (:mod:`.translate`), and how many of them could not be read.

        Kernel tables can have paged-out pages; those come back as zeros so
        callers decode what is there and report the gap instead of failing.
        """
        return translate.read(self.context, self.layer_name, address, size)

    @property
    def page_size(self) -> int:
        """The layer's page size (4 KiB on x86/x64)."""
        return getattr(self.layer, "page_size", PAGE_SIZE)

    def is_valid(self, address: int, size: int = 1) -> bool:
        return self.layer.is_valid(address, size)

    @cached_property
    def build_number(self) -> int | None:
        """The build the kernel reports (``KdVersionBlock.MinorVersion``), to name it in messages; None if unreadable."""
        try:
            offset = self.field_offset("_DBGKD_GET_VERSION64", "MinorVersion")
            return int.from_bytes(self.read(self.symbol_address("KdVersionBlock") + offset, 2), "little")
        except (exceptions.SymbolError, exceptions.InvalidAddressException):
            return None

    @cached_property
    def uses_segment_heap(self) -> bool:
        """Windows 10 19H1+ and 11 allocate pool from the segment heap; the ISF tells which."""
        # 1809 already has ExPoolState but still allocates from classic pages;
        # the heap-backed free routine only exists once pool sits on the segment heap.
        return self.has_symbol("ExPoolState") and self.has_symbol("ExFreeHeapPool")


def missing_name(error: BaseException) -> str:
    """The symbol, type or member a :data:`SYMBOLS_MISSING` error is about."""
    name = getattr(error, "symbol_name", None)
    if name:
        return str(name)
    text = str(error.args[0]) if error.args else str(error)
    return text.rsplit(": ", 1)[-1]
