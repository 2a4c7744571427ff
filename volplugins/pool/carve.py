"""Carve executive objects out of the stale bytes of free pool chunks.

Freeing an object leaves its bytes in the chunk until the memory is reused,
but the pool bookkeeping no longer helps find it: a freed VS chunk's pool
header is overwritten by the free-tree node, neighbouring free chunks are
coalesced (one free chunk can hold several dead objects), and a classic
free chunk's body starts with free-list links.  So instead of trusting the
chunk's tag, every pointer-aligned offset of a free chunk is tried as an
``_OBJECT_HEADER``: its ``TypeIndex`` (decoded with ``ObHeaderCookie`` and the
header address where the build encodes it) must name a type this module can
rebuild, the optional headers its ``InfoMask`` declares must fit in the
chunk before it, and the body must pass the type's sanity checks (process
ids are multiples of 4, image names printable, times plausible, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from volatility3.framework import exceptions

from .kernel import SYMBOLS_MISSING, FieldLayout, Kernel, per_kernel
from .model import FREED_STATES, Chunk
from .objects import MAX_TYPE_INDEX, ObjectLayout, object_layout, object_type, optional_headers_size

CARVE_LIMIT = 0x100000  # bytes of one free chunk searched (freed big allocations can be megabytes)
MAX_ID = 1 << 24  # process and thread ids are small multiples of 4
IO_TYPE_FILE = 5  # _FILE_OBJECT.Type
MAX_FILE_NAME = 0x1000  # bytes of a file name read
FILETIME_1990 = 0x01B41E6D6C3C8000  # 1990-01-01 in 100 ns units since 1601
FILETIME_2100 = 0x0310C1A6DE6D0000  # 2100-01-01


@dataclass(frozen=True)
class CarvedObject:
    """An object rebuilt from a free chunk; every value was read from the chunk's stale bytes."""

    chunk: Chunk
    type_name: str
    header: int
    body: int
    name: str
    pid: int | None = None  # the process's id, or the id of a thread's process
    ppid: int | None = None
    tid: int | None = None
    create_time: int | None = None  # FILETIME
    exit_time: int | None = None  # FILETIME, 0 when the process had not exited

    def describe(self) -> str:
        if self.type_name == "Process":
            return f"Process {self.name} pid {self.pid} ppid {self.ppid}"
        return f"{self.type_name} {self.name}".strip()


def _fields(kernel: Kernel, type_name: str, *paths: str) -> tuple[FieldLayout, ...]:
    return tuple(kernel.field_layout(type_name, path) for path in paths)


@dataclass(frozen=True)
class _Body:
    """Field layouts of one rebuildable type, and the function that rebuilds it from body bytes."""

    fields: tuple[FieldLayout, ...]
    rebuild: Callable[["_Carver", bytes, int], dict | None]  # (carver, chunk bytes, body offset) -> fields

    @property
    def extent(self) -> int:
        """Bytes of the body the checks read: the chunk must hold them all."""
        return max(field.offset + field.size for field in self.fields)


def plausible_time(value: int) -> bool:
    return FILETIME_1990 <= value < FILETIME_2100


def image_name(raw: bytes) -> str | None:
    """``ImageFileName`` up to its NUL, when it is 1-15 printable ASCII characters."""
    name = raw.split(b"\0", 1)[0]
    if not name or any(not 32 <= byte < 127 for byte in name):
        return None
    return name.decode("ascii")


def _valid_id(value: int, allow_zero: bool = False) -> bool:
    return (allow_zero or value != 0) and value % 4 == 0 and value < MAX_ID


class _Carver:
    """What carving one kernel's free chunks needs, read once from its ISF."""

    def __init__(self, kernel: Kernel):
        self.kernel = kernel
        self.layout: ObjectLayout = object_layout(kernel)
        self.bodies = self._bodies(kernel)
        self.types = self._type_indices(kernel)

    @staticmethod
    def _bodies(kernel: Kernel) -> dict[str, _Body]:
        """The rebuildable types this kernel's ISF describes."""
        wanted = {
            "Process": ("_EPROCESS", ("UniqueProcessId", "InheritedFromUniqueProcessId", "ImageFileName",
                                      "CreateTime.QuadPart", "ExitTime.QuadPart"), _Carver._process),
            "Thread": ("_ETHREAD", ("Cid.UniqueProcess", "Cid.UniqueThread", "CreateTime.QuadPart"), _Carver._thread),
            "File": ("_FILE_OBJECT", ("Type", "Size", "FileName.Length", "FileName.MaximumLength", "FileName.Buffer"),
                     _Carver._file),
        }
        bodies = {}
        for name, (type_name, paths, rebuild) in wanted.items():
            try:
                bodies[name] = _Body(_fields(kernel, type_name, *paths), rebuild)
            except SYMBOLS_MISSING:
                continue
        return bodies

    def _type_indices(self, kernel: Kernel) -> dict[int, str]:
        """Type index -> name for the rebuildable types (the index table is dense up to its first hole)."""
        found = {}
        for index in range(2, MAX_TYPE_INDEX):
            described = object_type(kernel, index)
            if described is None:
                break
            if described.name in self.bodies:
                found[index] = described.name
        return found

    # -- search ------------------------------------------------------------
    def carve(self, chunk: Chunk) -> list[CarvedObject]:
        if not self.types:
            return []
        length = min(chunk.size, CARVE_LIMIT)
        try:
            data = self.kernel.read(chunk.address, length, pad=True)
        except exceptions.InvalidAddressException:
            return []
        return [found for offset in self._candidates(chunk.address, data)
                if (found := self._object_at(chunk, data, offset)) is not None]

    def _candidates(self, base: int, data: bytes) -> list[int]:
        """Pointer-aligned offsets whose TypeIndex byte decodes to a rebuildable type."""
        step = 8
        index_offset = self.layout.type_index_offset
        last = len(data) - self.layout.header_body_offset
        if last <= 0:
            return []
        offsets = np.arange(0, last, step, dtype=np.int64)
        indices = np.frombuffer(data, dtype=np.uint8)[offsets + index_offset].astype(np.int64)
        if self.layout.cookie is not None:
            headers = (base & 0xFFFF) + offsets  # only bits 8..15 of the header address matter
            indices ^= self.layout.cookie ^ ((headers >> 8) & 0xFF)
        return offsets[np.isin(indices, list(self.types))].tolist()

    def _object_at(self, chunk: Chunk, data: bytes, offset: int) -> CarvedObject | None:
        header = chunk.address + offset
        index = data[offset + self.layout.type_index_offset]
        if self.layout.cookie is not None:
            index ^= self.layout.cookie ^ ((header >> 8) & 0xFF)
        type_name = self.types[index]
        info_mask = data[offset + self.layout.info_mask_offset]
        if optional_headers_size(self.layout, info_mask) > offset:
            return None
        body_offset = offset + self.layout.header_body_offset
        body = self.bodies[type_name]
        if body_offset + body.extent > len(data):
            return None
        rebuilt = body.rebuild(self, data, body_offset)
        if rebuilt is None:
            return None
        return CarvedObject(chunk, type_name, header, chunk.address + body_offset, **rebuilt)

    # -- per-type rebuilders ---------------------------------------------------
    def _process(self, data: bytes, base: int) -> dict | None:
        pid, ppid, name_field, created, exited = self.bodies["Process"].fields
        values = {
            "pid": pid.extract(data, base),
            "ppid": ppid.extract(data, base),
            "create_time": created.extract(data, base),
            "exit_time": exited.extract(data, base),
        }
        name = image_name(data[base + name_field.offset : base + name_field.offset + name_field.size])
        if (name is None or not _valid_id(values["pid"]) or not _valid_id(values["ppid"], allow_zero=True)
                or not plausible_time(values["create_time"])):
            return None
        if values["exit_time"] and not values["create_time"] <= values["exit_time"] < FILETIME_2100:
            return None
        return {"name": name, **values}

    def _thread(self, data: bytes, base: int) -> dict | None:
        process, thread, created = self.bodies["Thread"].fields
        pid, tid, when = process.extract(data, base), thread.extract(data, base), created.extract(data, base)
        if not (_valid_id(pid) and _valid_id(tid) and plausible_time(when)):
            return None
        return {"name": f"tid {tid}", "pid": pid, "tid": tid, "create_time": when}

    def _file(self, data: bytes, base: int) -> dict | None:
        kind, size, length, maximum, buffer = self.bodies["File"].fields
        name_length, name_buffer = length.extract(data, base), buffer.extract(data, base)
        if (kind.extract(data, base) != IO_TYPE_FILE or size.extract(data, base) != self.kernel.type_size("_FILE_OBJECT")
                or name_length % 2 or name_length > maximum.extract(data, base)):
            return None
        return {"name": self._file_name(name_buffer, name_length)}

    def _file_name(self, buffer: int, length: int) -> str:
        """The name buffer is a separate allocation, possibly freed or paged out too: '' when unreadable."""
        if not buffer or not length:
            return ""
        try:
            raw = self.kernel.read(buffer, min(length, MAX_FILE_NAME))
        except exceptions.InvalidAddressException:
            return ""
        return raw.decode("utf-16-le", errors="replace")


@per_kernel
def _carver(kernel: Kernel) -> _Carver:
    return _Carver(kernel)


def carve_chunk(kernel: Kernel, chunk: Chunk) -> list[CarvedObject]:
    """Objects whose headers and bodies lie inside ``chunk``'s bytes (any state; callers choose free ones);
    none, and one warning, when the symbol table lacks what carving needs."""
    try:
        return _carver(kernel).carve(chunk)
    except SYMBOLS_MISSING as error:
        kernel.lacks(error, "freed objects are not carved")
        return []


def carve(kernel: Kernel, chunks: Iterable[Chunk],
          progress: Callable[[float, str], None] | None = None) -> Iterator[CarvedObject]:
    """Objects left in free and cached-free chunks, in chunk order."""
    freed = [chunk for chunk in chunks if chunk.state in FREED_STATES]
    for number, chunk in enumerate(freed):
        if progress is not None and number % 256 == 0:
            progress(100.0 * number / max(len(freed), 1), "Carving objects from free chunks")
        yield from carve_chunk(kernel, chunk)
