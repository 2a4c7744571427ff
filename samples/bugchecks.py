"""A system that stopped with a bug check: the damage the code describes, the code in memory and in the manifest.

``--bugcheck CODE[:P1[:P2[:P3[:P4]]]]`` (hex, ``-`` or nothing for a
parameter the damage decides) builds the image of a machine that crashed
the way that code says.  One loaded driver (the last one placed, whose
first tag is the suspect) owns the chunks involved:

* overrun (0x19 BAD_POOL_HEADER subcodes 0x20 and 0x5, 0xC1
  SPECIAL_POOL_DETECTED_MEMORY_CORRUPTION subcode 0x24, 0xC5
  DRIVER_CORRUPTED_EXPOOL, 0x13A KERNEL_MODE_HEAP_CORRUPTION subcodes 0x3 and
  0x6 on the segment heap): the driver wrote past one of its chunks over the
  next header (a ``_POOL_HEADER``, or a VS chunk header on the segment heap),
  as ``--corrupt overflow`` does;
* freed (0xC2 BAD_POOL_CALLER subcode 0x7, a double free; 0xD5
  DRIVER_PAGE_FAULT_IN_FREED_SPECIAL_POOL): one of its chunks is free (with
  its stale header, an LFH block on the segment heap) and the driver freed
  or touched it again;
* beyond (0xD6 DRIVER_PAGE_FAULT_BEYOND_END_OF_ALLOCATION, 0xCD
  PAGE_FAULT_BEYOND_END_OF_ALLOCATION): the driver read the first byte past
  one of its chunks;
* exhausted (0x41 MUST_SUCCEED_POOL_EMPTY): the driver's allocations fill
  nonpaged pool to 99 % of its limit (as ``--fill-pool`` does) and the next
  request failed.

Parameters follow the codes' documented meaning (``!analyze`` prints the
same): entry addresses, the heap, the faulting address, the code address
(inside the driver, or the kernel for 0xC5).  Any other code is recorded
with the parameters given and no damage.  The kernel keeps the code and
parameters in ``KiBugCheckData`` (five pointer-sized values), so a raw image
of the crashed machine says why it stopped, as the dump header does.  The
manifest's ``extras["bugcheck"]`` holds the code, parameters, the chunk each
address parameter lies in, the damaged neighbour, and the suspect chunk,
tag and driver.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

from . import corruption, poolfill, segheap
from .crashdump import BugCheckRecord
from .image import Image
from .manifest import Allocation

OVERRUN, FREED, BEYOND, EXHAUSTED, OTHER = "overrun", "freed", "beyond", "exhausted", "other"
# code -> (family, default P1 subcode or None, accepted subcodes)
CODES: dict[int, tuple[str, int | None, tuple[int, ...]]] = {
    0x19: (OVERRUN, 0x20, (0x20, 0x5)),
    0xC1: (OVERRUN, None, ()),
    0xC5: (OVERRUN, None, ()),
    0x13A: (OVERRUN, 0x3, (0x3, 0x6)),
    0xC2: (FREED, 0x7, (0x7,)),
    0xD5: (FREED, None, ()),
    0xD6: (BEYOND, None, ()),
    0xCD: (BEYOND, None, ()),
    0x41: (EXHAUSTED, None, ()),
}
SEGMENT_HEAP_ONLY = (0x13A,)
MANUALLY_INITIATED_CRASH = 0xE2
SPECIAL_POOL_OVERRUN = 0x24  # 0xC1 P4: bytes after the end of the allocation were overwritten
DISPATCH_LEVEL = 2
READ, WRITE = 0, 1
OVERRUN_REQUEST = 0x2F0  # bytes: a VS block on the segment heap (above the LFH sizes), a page chunk otherwise
OVERRUN_CHUNKS = 8
FREED_REQUEST = 0x70  # bytes: an LFH block once its bucket is active
FREED_LIVE = 20  # live chunks of the freed size first, so the segment heap serves that size from the LFH
EXHAUSTED_PERCENT = 99  # of the nonpaged pool limit the driver's allocations fill before the failed request
CODE_OFFSET = 0x1042  # where in the driver's (or kernel's) first code page the faulting instruction is
POINTER = 8  # KiBugCheckData holds the code and four parameters as ULONG_PTR
_SPEC = re.compile(r"^(?:0x)?([0-9a-fA-F]+)((?::(?:(?:0x)?[0-9a-fA-F]+|-)?){0,4})$")


@dataclass(frozen=True)
class BugCheckRequest:
    code: int
    parameters: tuple[int | None, int | None, int | None, int | None]  # None: the damage decides


MANUAL_CRASH = BugCheckRequest(MANUALLY_INITIATED_CRASH, (0, 0, 0, 0))  # a dump taken on purpose


def parse_bugcheck(text: str) -> BugCheckRequest:
    """``19``, ``0x19:0x20`` or ``C2:7:-:-:-`` (hex); unknown subcodes of a planted code raise ValueError."""
    match = _SPEC.match(text.strip())
    if match is None:
        raise ValueError(f"not a bug check: {text!r} (expected CODE[:P1[:P2[:P3[:P4]]]] in hex, e.g. 0x19:0x20)")
    given = match[2].split(":")[1:]
    values = [int(part, 16) if part not in ("", "-") else None for part in given] + [None] * (4 - len(given))
    request = BugCheckRequest(int(match[1], 16), tuple(values))
    subcodes = CODES.get(request.code, (OTHER, None, ()))[2]
    if subcodes and request.parameters[0] is not None and request.parameters[0] not in subcodes:
        raise ValueError(f"bug check {request.code:#x}: subcode {request.parameters[0]:#x} is not planted; "
                         f"choose from {', '.join(hex(code) for code in subcodes)}")
    return request


def file_suffix(request: BugCheckRequest | None) -> str:
    return f"-bugcheck-{request.code:x}" if request else ""


def check_flavor(request: BugCheckRequest, segment_heap: bool) -> None:
    if request.code in SEGMENT_HEAP_ONLY and not segment_heap:
        raise ValueError(f"bug check {request.code:#x} is raised by the segment heap; choose a segment heap flavor")


class Crash:
    """Plants one bug check: ``allocate`` before the pools are finished, ``damage`` once they are written."""

    def __init__(self, image: Image, request: BugCheckRequest):
        check_flavor(request, image.flavor.segment_heap)
        self.image = image
        self.request = request
        self.family = CODES.get(request.code, (OTHER, None, ()))[0]
        self.driver = image.manifest.drivers[-1] if image.manifest.drivers else None
        self.tag = self.driver["tags"][0].encode("ascii") if self.driver else b""
        self.chunks: list[Allocation] = []
        self.heap = 0

    def allocate(self, pools, pool: str) -> None:
        """The suspect driver's chunks, drawing from a stream of their own."""
        if self.family == OTHER or self.driver is None:
            return
        saved, pools.rng = pools.rng, random.Random(f"{self.image.seed}:bugcheck")
        try:
            if self.family == EXHAUSTED:
                poolfill.fill(self.image, pools, poolfill.Fill("NonPaged", self.tag, EXHAUSTED_PERCENT))
            elif self.family == FREED:
                for _ in range(FREED_LIVE):
                    pools.allocate(FREED_REQUEST, self.tag, pool)
                self.chunks = [pools.allocate(FREED_REQUEST, self.tag, pool, state="Free")]
            else:
                self.chunks = [pools.allocate(OVERRUN_REQUEST, self.tag, pool) for _ in range(OVERRUN_CHUNKS)]
        finally:
            pools.rng = saved
        if self.image.flavor.segment_heap:
            self.heap = pools.heaps[segheap.POOLS[pool].heap_index].address

    def damage(self) -> BugCheckRecord:
        """Damage the finished image, write ``KiBugCheckData`` and the manifest record."""
        planters = {OVERRUN: self._overrun, FREED: self._freed, BEYOND: self._beyond, EXHAUSTED: self._exhausted}
        planted = planters[self.family]() if self.family in planters and self.driver else _Planted({})
        defaults = self._defaults()
        parameters = tuple(
            given if given is not None else planted.parameters.get(index, defaults.get(index, 0))
            for index, given in enumerate(self.request.parameters, start=1)
        )
        record = BugCheckRecord(self.request.code, parameters)
        self._write_bugcheck_data(record)
        self.image.manifest.extras["bugcheck"] = {
            "code": record.code,
            "parameters": list(record.parameters),
            "family": self.family,
            "owners": {f"P{index}": owner for index, owner in planted.owners.items()},
            "damaged": planted.damaged,
            "suspect": planted.suspect_record(self.tag, self.driver),
        }
        return record

    def _defaults(self) -> dict[int, int]:
        subcode = CODES.get(self.request.code, (OTHER, None, ()))[1]
        return {1: subcode} if subcode is not None else {}

    def _subcode(self) -> int | None:
        return self.request.parameters[0] if self.request.parameters[0] is not None else self._defaults().get(1)

    def _code_address(self) -> int:
        return self.driver["base"] + CODE_OFFSET

    def _overrun(self) -> _Planted:
        done = corruption.overflow_from(self.image, self.chunks)
        source = next(a for a in self.chunks if a.address == done.target)
        victim = done.address
        code, subcode = self.request.code, self._subcode()
        if code == 0x19:
            parameters = {2: source.address, 3: victim} if subcode == 0x20 else {2: source.address, 4: victim}
        elif code == 0xC1:
            parameters = {1: source.body, 3: victim, 4: SPECIAL_POOL_OVERRUN}
        elif code == 0x13A:
            parameters = {2: self.heap, 3: victim}
        else:  # 0xC5: the kernel followed a pointer the overrun wrote
            referenced = int.from_bytes(self.image.space.read(victim, 8), "little")
            parameters = {1: referenced, 2: DISPATCH_LEVEL, 3: READ, 4: self.image.kernel_base + CODE_OFFSET}
        owners = {index: source.address for index, value in parameters.items()
                  if value in (source.address, source.body)}
        return _Planted(parameters, owners, victim, source, f"overran into the header at {victim:#x}")

    def _freed(self) -> _Planted:
        freed = self.chunks[0]
        body = freed.address + self.image.types.size("_POOL_HEADER")
        if self.request.code == 0xC2:
            tag_offset = self.image.types.offset("_POOL_HEADER", "PoolTag")
            header_tag = int.from_bytes(self.image.space.read(freed.address + tag_offset, 4), "little")
            header = int.from_bytes(self.image.space.read(freed.address, 4), "little")
            parameters = {2: header_tag, 3: header, 4: body}
            owners = {4: freed.address}
        else:
            parameters = {1: body + 0x10, 2: WRITE, 3: self._code_address()}
            owners = {1: freed.address}
        return _Planted(parameters, owners, None, freed, "freed, then freed or touched again")

    def _beyond(self) -> _Planted:
        source, after = corruption.header_after(self.image, self.chunks)[0]
        parameters = {1: after, 2: READ, 3: self._code_address()}
        return _Planted(parameters, {}, None, source, f"read past its end at {after:#x}")

    def _exhausted(self) -> _Planted:
        filled = self.image.manifest.extras["pool_fill"]
        large = sum(1 for a in self.image.manifest.allocations if a.state == "Allocated" and a.size > poolfill.PAGE
                    and poolfill.TRACKER_POOLS.get(a.pool) == filled["tracker_pool"])
        parameters = {1: poolfill.FILL_REQUEST, 2: filled["live_bytes"] // poolfill.PAGE, 3: large,
                      4: max(0, filled["limit"] - filled["live_bytes"]) // poolfill.PAGE}
        return _Planted(parameters, how=f"filled nonpaged pool to {filled['live_bytes'] * 100 // filled['limit']}% "
                                        "of its limit", blamed=True)

    def _write_bugcheck_data(self, record: BugCheckRecord) -> None:
        if not self.image.types.has_symbol("KiBugCheckData"):
            return
        data = b"".join(value.to_bytes(POINTER, "little") for value in (record.code, *record.parameters))
        self.image.space.write(self.image.symbol("KiBugCheckData"), data)


@dataclass
class _Planted:
    parameters: dict[int, int]
    owners: dict[int, int] = field(default_factory=dict)  # parameter index -> the chunk (manifest) it lies in
    damaged: int | None = None  # the neighbouring header the damage hit
    suspect: Allocation | None = None
    how: str = ""
    blamed: bool = False  # the driver's tag as a whole is the suspect, no one chunk

    def suspect_record(self, tag: bytes, driver: dict | None) -> dict | None:
        if self.suspect is None and not self.blamed:
            return None
        return {"allocation": self.suspect.address if self.suspect else None,
                "tag": self.suspect.tag if self.suspect else tag.decode("latin-1"),
                "driver": driver["name"] if driver else "", "how": self.how}
