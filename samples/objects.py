"""Executive objects inside pool chunks: types, processes, threads, files, drivers.

An object allocation holds, after the pool header, the optional object
headers selected by ``InfoMask``, the ``_OBJECT_HEADER`` and the body.  On
Windows 10 the header's ``TypeIndex`` is stored XORed with ``ObHeaderCookie``
and the second byte of the header's address; Windows 7 stores it plainly.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

from .image import Image
from .kernel import CAPTURE_TIME, filetime

# Optional object headers in InfoMask bit order; the lowest bit sits nearest the object header.
OPTIONAL_HEADERS = (
    (0x01, "_OBJECT_HEADER_CREATOR_INFO"),
    (0x02, "_OBJECT_HEADER_NAME_INFO"),
    (0x04, "_OBJECT_HEADER_HANDLE_INFO"),
    (0x08, "_OBJECT_HEADER_QUOTA_INFO"),
    (0x10, "_OBJECT_HEADER_PROCESS_INFO"),
)
CREATOR_AND_QUOTA = 0x09
CREATOR_AND_NAME = 0x03

# Object types in index order from 2 (0 and 1 are never types), as the modeled builds number them.
# Readers walk ObTypeIndexTable up to the first empty slot, so the table is dense as on a real system.
WIN10_TYPES = (
    "Type", "Directory", "SymbolicLink", "Token", "Job", "Process", "Thread", "Partition", "UserApcReserve",
    "IoCompletionReserve", "ActivityReference", "PsSiloContextPaged", "PsSiloContextNonPaged", "DebugObject",
    "Event", "Mutant", "Callback", "Semaphore", "Timer", "IRTimer", "Profile", "KeyedEvent", "WindowStation",
    "Desktop", "Composition", "RawInputManager", "CoreMessaging", "ActivationObject", "TpWorkerFactory",
    "Adapter", "Controller", "Device", "Driver", "IoCompletion", "WaitCompletionPacket", "File",
)
# Windows Server 2022 and Windows 11 add the process and thread state change types.
STATE_CHANGE_TYPES = (
    "Type", "Directory", "SymbolicLink", "Token", "Job", "Process", "Thread", "Partition", "UserApcReserve",
    "IoCompletionReserve", "ActivityReference", "ProcessStateChange", "ThreadStateChange", "PsSiloContextPaged",
    "PsSiloContextNonPaged", "DebugObject", "Event", "Mutant", "Callback", "Semaphore", "Timer", "IRTimer",
    "Profile", "KeyedEvent", "WindowStation", "Desktop", "Composition", "RawInputManager", "CoreMessaging",
    "ActivationObject", "TpWorkerFactory", "Adapter", "Controller", "Device", "Driver", "IoCompletion",
    "WaitCompletionPacket", "File",
)
TYPE_NAMES = {
    "win10-19041": WIN10_TYPES,
    "win10-18362": WIN10_TYPES,
    "win11-22000": STATE_CHANGE_TYPES,
    "srv2022-20348": STATE_CHANGE_TYPES,
    "win81-9600": (
        "Type", "Directory", "SymbolicLink", "Token", "Job", "Process", "Thread", "UserApcReserve",
        "IoCompletionReserve", "DebugObject", "Event", "Mutant", "Callback", "Semaphore", "Timer", "IRTimer",
        "Profile", "KeyedEvent", "WindowStation", "Desktop", "Composition", "TpWorkerFactory", "Adapter",
        "Controller", "Device", "Driver", "IoCompletion", "WaitCompletionPacket", "File",
    ),
    "win10-1809": (
        "Type", "Directory", "SymbolicLink", "Token", "Job", "Process", "Thread", "Partition", "UserApcReserve",
        "IoCompletionReserve", "ActivityReference", "PsSiloContextPaged", "PsSiloContextNonPaged", "DebugObject",
        "Event", "Mutant", "Callback", "Semaphore", "Timer", "IRTimer", "Profile", "KeyedEvent", "WindowStation",
        "Desktop", "Composition", "RawInputManager", "CoreMessaging", "TpWorkerFactory", "Adapter", "Controller",
        "Device", "Driver", "IoCompletion", "WaitCompletionPacket", "File",
    ),
    "win7-sp1": (
        "Type", "Directory", "SymbolicLink", "Token", "Job", "Process", "Thread", "UserApcReserve",
        "IoCompletionReserve", "DebugObject", "Event", "EventPair", "Mutant", "Callback", "Semaphore", "Timer",
        "Profile", "KeyedEvent", "WindowStation", "Desktop", "TpWorkerFactory", "Adapter", "Controller", "Device",
        "Driver", "IoCompletion", "File",
    ),
}
FIRST_TYPE_INDEX = 2
# Windows 7 marks object tags as protected (high bit of the last byte); later builds do not.
OBJECT_TAGS = {"Type": b"ObjT", "Directory": b"Dire", "Process": b"Proc", "Thread": b"Thre", "Device": b"Devi",
               "Driver": b"Driv", "File": b"File"}  # other types' objects are tagged with their name's first 4 bytes
PROTECTED_TAG_BIT = 0x80
# Process objects are charged a fixed-size allocation on segment-heap builds (the 19041 seed transcript's
# 0xd00-byte Proc chunk); a larger _EPROCESS takes what it needs.
WIN10_PROCESS_ALLOCATION = 0xCF0


@dataclass(frozen=True)
class PlacedObject:
    kind: str
    name: str
    header: int
    body: int
    allocation: int
    pid: int | None = None


class ObjectWriter:
    """Writes objects into allocations obtained from a pool builder."""

    def __init__(self, image: Image, pools):
        self.image = image
        self.pools = pools
        self.types = image.types
        names = TYPE_NAMES[image.flavor.name]
        self.indices = {name: FIRST_TYPE_INDEX + position for position, name in enumerate(names)}
        self.cookie = image.rng.randrange(1, 256) if image.types.has_symbol("ObHeaderCookie") else None
        self.header_body_offset = self.types.offset("_OBJECT_HEADER", "Body")
        self.nonpaged = "NonPagedNx" if image.flavor.segment_heap else "NonPaged"

    # -- generic object layout ---------------------------------------------
    def tag_for(self, kind: str) -> bytes:
        tag = OBJECT_TAGS.get(kind) or kind[:4].ljust(4).encode()
        if self.image.flavor.protected_object_tags:
            tag = tag[:3] + bytes([tag[3] | PROTECTED_TAG_BIT])
        return tag

    def optional_size(self, info_mask: int) -> int:
        return sum(self.types.size(name) for bit, name in OPTIONAL_HEADERS if info_mask & bit)

    def allocate_object(self, kind: str, body_type: str, info_mask: int, *, state="Allocated",
                        request: int | None = None, allocation=None):
        """Allocate and lay out headers for one object; return (allocation, header address, body address)."""
        optional = self.optional_size(info_mask)
        body_size = self.types.size(body_type)
        needed = optional + self.header_body_offset + body_size
        if allocation is None:
            allocation = self.pools.allocate(max(needed, request or 0), self.tag_for(kind), self.nonpaged, state=state)
        header = allocation.body + optional
        body = header + self.header_body_offset
        stored_index = self.indices[kind]
        if self.cookie is not None:
            stored_index ^= self.cookie ^ ((header >> 8) & 0xFF)
        self.image.put(header, "_OBJECT_HEADER", {
            "PointerCount": 1 + self.image.rng.randrange(1, 30),
            "HandleCount": self.image.rng.randrange(0, 8),
            "TypeIndex": stored_index,
            "InfoMask": info_mask,
        })
        return allocation, header, body

    def write_unicode(self, address: int, type_name: str, field: str, text: str, tag: bytes) -> None:
        """Point a UNICODE_STRING at a buffer of its own, allocated separately as Windows does."""
        encoded = text.encode("utf-16-le")
        buffer = self.pools.allocate(len(encoded) + 2, tag, "Paged").body
        self.image.put(address, type_name, {
            f"{field}.Length": len(encoded),
            f"{field}.MaximumLength": len(encoded) + 2,
            f"{field}.Buffer": buffer,
        })
        self.image.space.write(buffer, encoded + b"\0\0")

    # -- object types ------------------------------------------------------
    def write_type_table(self) -> None:
        table = self.image.symbol("ObTypeIndexTable")
        self.image.space.write_u64(table + 8, 0xBAD0B0B0)  # index 1 is a poison value on real systems
        for name, index in sorted(self.indices.items(), key=lambda item: item[1]):
            allocation, header, body = self.allocate_object("Type", "_OBJECT_TYPE", CREATOR_AND_NAME)
            self.write_unicode(body, "_OBJECT_TYPE", "Name", name, b"ObNm")
            key = int.from_bytes(self.tag_for(name), "little")
            self.image.put(body, "_OBJECT_TYPE", {"Index": index, "Key": key,
                                                  "TypeList.Flink": body, "TypeList.Blink": body})
            self.image.space.write_u64(table + 8 * index, body)
            self._record("Type", name, allocation, header, body)
        if self.cookie is not None:
            self.image.space.write(self.image.symbol("ObHeaderCookie"), bytes([self.cookie]))

    # -- processes and threads ---------------------------------------------
    def write_process(self, name: str, pid: int, ppid: int, created: datetime.datetime,
                      exited: datetime.datetime | None = None, *, state="Allocated", allocation=None) -> PlacedObject:
        request = WIN10_PROCESS_ALLOCATION if self.image.flavor.segment_heap else None
        allocation, header, body = self.allocate_object(
            "Process", "_EPROCESS", CREATOR_AND_QUOTA, state=state, request=request, allocation=allocation)
        dtb = self.image.space.dtb if pid == 4 else 0x10000000 + pid * 0x1000
        thread_head = body + self.types.offset("_EPROCESS", "ThreadListHead")
        values = {
            "Pcb.DirectoryTableBase": dtb,
            "UniqueProcessId": pid,
            "InheritedFromUniqueProcessId": ppid,
            "CreateTime.QuadPart": 0 if pid == 4 else filetime(created),
            "ExitTime.QuadPart": filetime(exited) if exited else 0,
            "ThreadListHead.Flink": thread_head,
            "ThreadListHead.Blink": thread_head,
        }
        self.image.put(body, "_EPROCESS", values)
        image_name = self.types.offset("_EPROCESS", "ImageFileName")
        self.image.space.write(body + image_name, name.encode()[:14] + b"\0")
        return self._record("Process", name, allocation, header, body, pid=pid, ppid=ppid,
                            exited=exited is not None, freed=state != "Allocated")

    def link_processes(self, bodies: list[int]) -> None:
        """Chain live processes into PsActiveProcessHead's ring through ActiveProcessLinks."""
        links = self.types.offset("_EPROCESS", "ActiveProcessLinks")
        self._link_ring(self.image.symbol("PsActiveProcessHead"), [body + links for body in bodies])

    def write_thread(self, process: PlacedObject, tid: int) -> PlacedObject:
        allocation, header, body = self.allocate_object("Thread", "_ETHREAD", 0)
        created = filetime(CAPTURE_TIME) - self.image.rng.randrange(1, 3600) * 10_000_000
        self.image.put(body, "_ETHREAD", {
            "CreateTime.QuadPart": created,
            "Cid.UniqueProcess": process.pid,
            "Cid.UniqueThread": tid,
            "Tcb.Process": process.body,
        })
        head = process.body + self.types.offset("_EPROCESS", "ThreadListHead")
        entry = body + self.types.offset("_ETHREAD", "ThreadListEntry")
        self._insert_tail(head, entry)
        count_offset = self.types.offset("_EPROCESS", "ActiveThreads")
        count = int.from_bytes(self.image.space.read(process.body + count_offset, 4), "little")
        self.image.space.write_u32(process.body + count_offset, count + 1)
        return self._record("Thread", f"tid {tid}", allocation, header, body, pid=process.pid, tid=tid)

    # -- files and drivers -------------------------------------------------
    def write_file(self, path: str) -> PlacedObject:
        allocation, header, body = self.allocate_object("File", "_FILE_OBJECT", 0)
        self.image.put(body, "_FILE_OBJECT", {"Type": 5, "Size": self.types.size("_FILE_OBJECT")})
        self.write_unicode(body, "_FILE_OBJECT", "FileName", path, b"IoNm")
        return self._record("File", path, allocation, header, body)

    def write_driver(self, name: str, start: int, size: int) -> PlacedObject:
        full_name = f"\\Driver\\{name}"
        allocation, header, body = self.allocate_object("Driver", "_DRIVER_OBJECT", 0)
        self.image.put(body, "_DRIVER_OBJECT", {"Type": 4, "Size": self.types.size("_DRIVER_OBJECT"),
                                                "DriverStart": start, "DriverSize": size})
        self.write_unicode(body, "_DRIVER_OBJECT", "DriverName", full_name, b"IoNm")
        return self._record("Driver", full_name, allocation, header, body)

    # -- helpers -----------------------------------------------------------
    def _record(self, kind: str, name: str, allocation, header: int, body: int, **details) -> PlacedObject:
        self.image.manifest.objects.append({
            "type": kind, "name": name, "header": header, "body": body,
            "allocation": allocation.address, "tag": allocation.tag, **details,
        })
        return PlacedObject(kind, name, header, body, allocation.address, details.get("pid"))

    def _link_ring(self, head: int, entries: list[int]) -> None:
        ring = [head, *entries]
        for position, entry in enumerate(ring):
            self.image.space.write_u64(entry, ring[(position + 1) % len(ring)])
            self.image.space.write_u64(entry + 8, ring[position - 1])

    def _insert_tail(self, head: int, entry: int) -> None:
        last = int.from_bytes(self.image.space.read(head + 8, 8), "little")
        self.image.space.write_u64(entry, head)
        self.image.space.write_u64(entry + 8, last)
        self.image.space.write_u64(last, entry)
        self.image.space.write_u64(head + 8, entry)


def process_times(rng, count: int) -> list[datetime.datetime]:
    """Creation times spread over the system's uptime, oldest first."""
    boot = CAPTURE_TIME - datetime.timedelta(hours=6)
    return sorted(boot + datetime.timedelta(seconds=rng.randrange(1, 6 * 3600)) for _ in range(count))
