"""Identify the executive object a pool chunk holds, through its object header.

After the pool header an object allocation holds the optional headers its
``InfoMask`` selects, then ``_OBJECT_HEADER``, then the body.  The header's
``TypeIndex`` indexes ``ObTypeIndexTable``; Windows 10 stores it XORed with
``ObHeaderCookie`` and the second byte of the header's address.  A candidate
header is accepted only when the optional headers it declares fill exactly the
gap back to the pool header, so random bytes are not mistaken for objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from volatility3.framework import exceptions

from .kernel import SYMBOLS_MISSING, Kernel, per_kernel
from .tags import same_tag

# InfoMask bits and the optional header each one adds, in bit order.
OPTIONAL_HEADER_TYPES = (
    (0x01, "_OBJECT_HEADER_CREATOR_INFO"),
    (0x02, "_OBJECT_HEADER_NAME_INFO"),
    (0x04, "_OBJECT_HEADER_HANDLE_INFO"),
    (0x08, "_OBJECT_HEADER_QUOTA_INFO"),
    (0x10, "_OBJECT_HEADER_PROCESS_INFO"),
    (0x20, "_OBJECT_HEADER_AUDIT_INFO"),
    (0x40, "_OBJECT_HEADER_EXTENDED_INFO"),
    (0x80, "_OBJECT_HEADER_PADDING_INFO"),
)
MAX_TYPE_INDEX = 0x100
NO_OBJECTS = "objects in pool chunks are not identified"
MAX_NAME_BYTES = 0x1000  # longest name read from a UNICODE_STRING (a full path is far shorter)


@dataclass(frozen=True)
class ObjectInfo:
    """What an allocation holds: type name, a readable name and details."""

    type_name: str
    name: str
    header: int
    body: int
    pid: int | None = None

    def describe(self) -> str:
        text = f"{self.type_name} {self.name}".strip()
        return f"{text} pid {self.pid}" if self.pid is not None and self.type_name == "Process" else text


@dataclass(frozen=True)
class ObjectLayout:
    """Sizes the search needs, read once per kernel from its ISF."""

    header_body_offset: int
    type_index_offset: int
    info_mask_offset: int
    optional_sizes: tuple[tuple[int, int], ...]  # (bit, size) for the headers this build has
    cookie: int | None
    type_table: int

    @cached_property
    def sizes_by_mask(self) -> tuple[int, ...]:
        """The optional headers' size for every InfoMask byte: a search tries one candidate header per 8 bytes."""
        return tuple(sum(size for bit, size in self.optional_sizes if mask & bit) for mask in range(256))


@per_kernel
def object_layout(kernel: Kernel) -> ObjectLayout:
    cookie = None
    if kernel.has_symbol("ObHeaderCookie"):
        cookie = kernel.read(kernel.symbol_address("ObHeaderCookie"), 1, pad=True)[0]
    return ObjectLayout(
        header_body_offset=kernel.field_offset("_OBJECT_HEADER", "Body"),
        type_index_offset=kernel.field_offset("_OBJECT_HEADER", "TypeIndex"),
        info_mask_offset=kernel.field_offset("_OBJECT_HEADER", "InfoMask"),
        optional_sizes=tuple(
            (bit, kernel.type_size(name)) for bit, name in OPTIONAL_HEADER_TYPES if kernel.has_type(name)
        ),
        cookie=cookie,
        type_table=kernel.symbol_address("ObTypeIndexTable"),
    )


@dataclass(frozen=True)
class ObjectType:
    name: str
    key: bytes  # the pool tag objects of this type are allocated with


@per_kernel
def object_type(kernel: Kernel, index: int) -> ObjectType | None:
    """Object type ``index`` read from ``ObTypeIndexTable`` (None when unreadable)."""
    layout = object_layout(kernel)
    try:
        address = kernel.read_pointer(layout.type_table + kernel.type_size("pointer") * index)
        name, _ = _object_type(kernel, address)
        key = kernel.read(address + kernel.field_offset("_OBJECT_TYPE", "Key"), 4)
    except (exceptions.InvalidAddressException, UnicodeDecodeError, ValueError):
        return None
    return ObjectType(name, key) if name and name.isprintable() and len(name) < 64 else None


def optional_headers_size(layout: ObjectLayout, info_mask: int) -> int:
    return layout.sizes_by_mask[info_mask & 0xFF]


def identify(kernel: Kernel, data_start: int, data_size: int, tag: bytes) -> ObjectInfo | None:
    """The object inside ``[data_start, data_start + data_size)`` (the bytes after the pool header), if any.

    A candidate header must declare optional headers that fill the gap back to ``data_start`` exactly, and
    its type's pool tag (``_OBJECT_TYPE.Key``) must be the chunk's ``tag``.  A symbol table without what
    object headers need costs only this: None, and one warning.
    """
    try:
        return _identify(kernel, data_start, data_size, tag)
    except SYMBOLS_MISSING as error:
        kernel.lacks(error, NO_OBJECTS)
        return None


def _identify(kernel: Kernel, data_start: int, data_size: int, tag: bytes) -> ObjectInfo | None:
    layout = object_layout(kernel)
    window = min(data_size, 0x100 + layout.header_body_offset)
    data = kernel.read(data_start, window, pad=True)
    for gap in range(0, window - layout.header_body_offset + 1, 8):
        info_mask = data[gap + layout.info_mask_offset]
        if optional_headers_size(layout, info_mask) != gap:
            continue
        header = data_start + gap
        index = data[gap + layout.type_index_offset]
        if layout.cookie is not None:
            index ^= layout.cookie ^ ((header >> 8) & 0xFF)
        if not 2 <= index < MAX_TYPE_INDEX:
            continue
        found = object_type(kernel, index)
        if found is None or not same_tag(found.key, tag):
            continue
        body = header + layout.header_body_offset
        return _describe_body(kernel, found.name, header, body)
    return None


def _describe_body(kernel: Kernel, type_name: str, header: int, body: int) -> ObjectInfo:
    describers = {
        "Process": _process,
        "Thread": _thread,
        "File": _file,
        "Driver": _driver,
        "Type": _object_type,
    }
    try:
        name, pid = describers.get(type_name, _no_name)(kernel, body)
    except (exceptions.InvalidAddressException, AttributeError, UnicodeDecodeError, ValueError):
        name, pid = "", None
    return ObjectInfo(type_name, name, header, body, pid)


# Fields are read through their ISF offsets rather than as Volatility objects: building the
# template of _EPROCESS or _ETHREAD resolves most of the kernel's types, which costs more than the lookup.

def _unicode_string(kernel: Kernel, address: int) -> str:
    """The text of the ``_UNICODE_STRING`` at ``address``."""
    length = int.from_bytes(kernel.read(address + kernel.field_offset("_UNICODE_STRING", "Length"), 2), "little")
    buffer = kernel.read_pointer(address + kernel.field_offset("_UNICODE_STRING", "Buffer"))
    return kernel.read(buffer, min(length, MAX_NAME_BYTES)).decode("utf-16-le", "replace") if length else ""


def _member(kernel: Kernel, body: int, type_name: str, field: str) -> int:
    layout = kernel.field_layout(type_name, field)
    return layout.extract(kernel.read(body, layout.offset + layout.size))


def _process(kernel: Kernel, body: int) -> tuple[str, int | None]:
    name_field = kernel.field_layout("_EPROCESS", "ImageFileName")
    raw = kernel.read(body + name_field.offset, name_field.size)
    name = raw.split(b"\0", 1)[0].decode("latin-1")
    return name, _member(kernel, body, "_EPROCESS", "UniqueProcessId")


def _thread(kernel: Kernel, body: int) -> tuple[str, int | None]:
    tid = _member(kernel, body, "_ETHREAD", "Cid.UniqueThread")
    return f"tid {tid}", _member(kernel, body, "_ETHREAD", "Cid.UniqueProcess")


def _file(kernel: Kernel, body: int) -> tuple[str, int | None]:
    return _unicode_string(kernel, body + kernel.field_offset("_FILE_OBJECT", "FileName")), None


def _driver(kernel: Kernel, body: int) -> tuple[str, int | None]:
    return _unicode_string(kernel, body + kernel.field_offset("_DRIVER_OBJECT", "DriverName")), None


def _object_type(kernel: Kernel, body: int) -> tuple[str, int | None]:
    return _unicode_string(kernel, body + kernel.field_offset("_OBJECT_TYPE", "Name")), None


def _no_name(kernel: Kernel, body: int) -> tuple[str, int | None]:
    return "", None


def process_name(kernel: Kernel, eprocess: int) -> str:
    """``name pid N`` of the process at ``eprocess`` (empty when it cannot be read)."""
    try:
        name, pid = _process(kernel, eprocess)
    except SYMBOLS_MISSING as error:
        kernel.lacks(error, NO_OBJECTS)
        return ""
    except (exceptions.InvalidAddressException, UnicodeDecodeError, ValueError):
        return ""
    return f"{name} pid {pid}"
