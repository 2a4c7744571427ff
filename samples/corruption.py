"""Deliberate pool corruption applied to a finished image, recorded with the address a validator must name.

Each kind damages one chunk the way a driver bug would, after every pool
structure has been written:

* ``overflow``: a buffer overrun out of an allocated chunk into the header
  after it.  Classic pool: the next chunk's ``_POOL_HEADER`` is overwritten,
  so the page chain breaks there.  Segment heap: the next VS chunk header is
  overwritten, so it no longer decodes.  Reported at the overwritten header.
* ``bad-size``: an allocated chunk's ``_POOL_HEADER.BlockSize`` set to its
  maximum, so the chunk runs past its page.  Reported at that pool header.
* ``bad-vs-header`` (segment heap only): one bit of an encoded VS chunk
  header flipped (the top bit of ``UnsafeSize``), so the decoded size runs
  past its subsegment.  Reported at the VS chunk header.
* ``bad-tag``: an allocated chunk's tag overwritten with unprintable bytes.
  Reported at that pool header.
* ``smeared-regions``: the kernel's pool region bookkeeping (Windows 7's
  ``Mm*`` pool bounds, Windows 10's ``MiState`` VA region table) overwritten
  with random bytes, as a smeared or half-paged-out image has it.  No chunk
  is damaged; a reader must find the pool pages without the bookkeeping.
* ``smeared-heaps`` (segment heap only): the heap table of ``ExPoolState``
  (every ``PoolNode[n].Heaps`` and ``SpecialHeaps`` slot, and its pointer to
  ``RtlpHpHeapGlobals``) overwritten with random bytes, all but one heap's
  slot; that heap keeps its slot and loses its segment lists instead (the
  ``SegmentListHead`` of each ``SegContexts[k]``).  The heaps, their segments
  and the lookaside lists stay intact: a reader must find the segments
  without the lists that lead to them.

Targets are chosen far apart (different pages, different VS subsegments) so
one corruption cannot hide another, and with a random generator of their own
so the clean part of the image is the same bytes as without corruption.
Every corruption is appended to ``manifest.extras["corruptions"]``.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

from .image import Image
from .manifest import Allocation

KINDS = ("overflow", "bad-size", "bad-vs-header", "bad-tag", "smeared-regions", "smeared-heaps")
SEGMENT_HEAP_ONLY = ("bad-vs-header", "smeared-heaps")
# Variables that bound the pools on builds without MiState's VA region table.
REGION_VARIABLES = ("MmNonPagedPoolStart", "MiNonPagedPoolStartAligned", "MiNonPagedPoolEnd",
                    "MmMaximumNonPagedPoolInBytes", "MmPagedPoolStart", "MmPagedPoolEnd", "MmSizeOfPagedPoolInBytes")
VA_REGIONS = ("_MI_SYSTEM_INFORMATION", "Vs.SystemVaRegions")
POOL_STATE = "_EX_POOL_HEAP_MANAGER_STATE"
PAGE = 0x1000
UNIT = 0x10  # x64 pool block and VS granule
VS_HEADER = 0x10
# A VS subsegment never spans more than this; targets further apart are in different subsegments.
SUBSEGMENT_SPAN = 0x20000
OVERFLOW_BYTES = b"A" * 0x18  # the tail of a string copied one header too far
BAD_TAG = b"\x01Z\x7f\xff"
CACHE_ALIGNED_OR_QUOTA = 0xC


@dataclass(frozen=True)
class Corruption:
    kind: str
    address: int  # where a validator must report it
    target: int  # the manifest allocation that was damaged or overflowed from
    detail: str


def parse_kinds(text: str) -> list[str]:
    """``overflow,bad-size`` -> ['overflow', 'bad-size']; unknown names raise ValueError."""
    kinds = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown:
        raise ValueError(f"unknown corruption kind(s) {', '.join(unknown)}; choose from {', '.join(KINDS)}")
    return kinds


def file_suffix(kinds: Sequence[str]) -> str:
    """``-corrupt-overflow-bad-size`` for a corrupted build, so it never overwrites the clean image."""
    return "".join(f"-{kind}" for kind in ["corrupt", *kinds]) if kinds else ""


def corrupt(image: Image, kinds: Sequence[str]) -> list[Corruption]:
    """Apply ``kinds`` (in order) to the finished ``image`` and record them in its manifest."""
    chooser = _Chooser(image, random.Random(image.seed))
    appliers: dict[str, Callable[[_Chooser], Corruption]] = {
        "overflow": _overflow,
        "bad-size": _bad_size,
        "bad-vs-header": _bad_vs_header,
        "bad-tag": _bad_tag,
        "smeared-regions": _smeared_regions,
        "smeared-heaps": _smeared_heaps,
    }
    done = []
    for kind in parse_kinds(",".join(kinds)):
        if kind in SEGMENT_HEAP_ONLY and not image.flavor.segment_heap:
            raise ValueError(f"{kind} needs a segment heap flavor; {image.flavor.name} has classic pool")
        done.append(appliers[kind](chooser))
    image.manifest.extras.setdefault("corruptions", []).extend(asdict(item) for item in done)
    return done


class _Chooser:
    """Picks targets from the manifest, never two in the same page or VS subsegment."""

    def __init__(self, image: Image, rng: random.Random):
        self.image = image
        self.rng = rng
        self.used: list[int] = []
        self.by_address = {a.address: a for a in image.manifest.allocations}
        self.objects = {placed["allocation"] for placed in image.manifest.objects}

    def pick(self, candidates: list[Allocation]) -> Allocation:
        spacing = SUBSEGMENT_SPAN if self.image.flavor.segment_heap else PAGE
        free = [a for a in candidates if all(abs(a.address - used) >= spacing for used in self.used)]
        if not free:
            raise ValueError("the image has no chunk left to corrupt this way; build a larger image")
        chosen = self.rng.choice(free)
        self.used.append(chosen.address)
        return chosen

    def small_allocated(self) -> list[Allocation]:
        """Allocated chunks with a plain pool header: not cache aligned, not quota charged, holding no object."""
        backing = "VS" if self.image.flavor.segment_heap else "Page"
        return [
            a for a in self.image.manifest.allocations
            if a.state == "Allocated" and a.backing == backing and a.tag
            and not a.pool_type & CACHE_ALIGNED_OR_QUOTA and a.address not in self.objects
        ]

    def header_after(self, allocation: Allocation) -> int | None:
        """The header right after a chunk: the next ``_POOL_HEADER`` of its page (classic), or the next VS
        chunk header when an allocated VS chunk follows (segment heap); None at a page's or subsegment's end."""
        end = allocation.address + allocation.size
        if not self.image.flavor.segment_heap:
            return end if end % PAGE and end in self.by_address else None
        following = self.by_address.get(end + VS_HEADER)
        if following is None or following.backing != "VS" or following.state != "Allocated":
            return None
        return end


def overflow_from(image: Image, among: Sequence[Allocation]) -> Corruption:
    """An overflow (as ``overflow`` does it) out of one of ``among``, recorded like the other kinds."""
    chooser = _Chooser(image, random.Random(image.seed))
    done = _overflow(chooser, {id(allocation) for allocation in among})
    image.manifest.extras.setdefault("corruptions", []).append(asdict(done))
    return done


def header_after(image: Image, allocations: Sequence[Allocation]) -> list[tuple[Allocation, int]]:
    """Those of ``allocations`` another chunk follows, each with the header right after it."""
    chooser = _Chooser(image, random.Random(image.seed))
    pairs = [(a, chooser.header_after(a)) for a in allocations]
    return [(a, header) for a, header in pairs if header is not None]


def _overflow(chooser: _Chooser, among: set[int] | None = None) -> Corruption:
    image = chooser.image
    candidates = [a for a in chooser.small_allocated() if among is None or id(a) in among]
    source = chooser.pick([a for a in candidates if chooser.header_after(a) is not None])
    victim = chooser.header_after(source)
    what = "VS chunk header" if image.flavor.segment_heap else "pool header"
    spill = len(OVERFLOW_BYTES) - VS_HEADER
    image.space.write(victim - spill, OVERFLOW_BYTES)
    return Corruption("overflow", victim, source.address,
                      f"{len(OVERFLOW_BYTES):#x} bytes written from {victim - spill:#x} over the next {what}")


def _bad_size(chooser: _Chooser) -> Corruption:
    image = chooser.image
    block_size = image.types.field("_POOL_HEADER", "BlockSize")
    largest = (1 << (block_size.bit_length or block_size.size * 8)) - 1
    candidates = [a for a in chooser.small_allocated() if a.address % PAGE >= 2 * UNIT]
    target = chooser.pick(candidates)
    image.put(target.address, "_POOL_HEADER", {"BlockSize": largest})
    return Corruption("bad-size", target.address, target.address,
                      f"BlockSize {target.size // UNIT:#x} -> {largest:#x}: runs past the page")


def _bad_vs_header(chooser: _Chooser) -> Corruption:
    image = chooser.image
    size_field = image.types.field("_HEAP_VS_CHUNK_HEADER_SIZE", "UnsafeSize")
    sizes = image.types.offset("_HEAP_VS_CHUNK_HEADER", "Sizes")
    bit = size_field.bit_position + size_field.bit_length - 1
    # A pool header that is not at a page start sits right after its VS chunk header.
    candidates = [a for a in chooser.small_allocated() if a.address % PAGE >= VS_HEADER]
    target = chooser.pick(candidates)
    header = target.address - VS_HEADER
    where = header + sizes + size_field.offset + bit // 8
    value = image.space.read(where, 1)[0] ^ (1 << (bit % 8))
    image.space.write(where, bytes([value]))
    return Corruption("bad-vs-header", header, target.address, f"bit {bit} of the encoded HeaderBits flipped")


def _bad_tag(chooser: _Chooser) -> Corruption:
    image = chooser.image
    target = chooser.pick(chooser.small_allocated())
    image.space.write(target.address + image.types.offset("_POOL_HEADER", "PoolTag"), BAD_TAG)
    return Corruption("bad-tag", target.address, target.address, f"tag {target.tag} -> {BAD_TAG!r}")


def _smeared_regions(chooser: _Chooser) -> Corruption:
    image = chooser.image
    smeared: list[tuple[str, int, int]] = [(name, image.symbol(name), 8) for name in REGION_VARIABLES
                                           if image.types.has_symbol(name)]
    if image.types.has_symbol("MiState") and image.types.has_field(*VA_REGIONS):
        table = image.types.field(*VA_REGIONS)
        smeared.append(("MiState." + VA_REGIONS[1], image.symbol("MiState") + table.offset, table.size))
    return _smear(chooser, "smeared-regions", smeared)


def _smeared_heaps(chooser: _Chooser) -> Corruption:
    image, types = chooser.image, chooser.image.types
    state = image.symbol("ExPoolState")
    slots = [("ExPoolState.HeapManager.Globals", state + types.offset(POOL_STATE, "HeapManager.Globals"), 8)]
    nodes = types.field(POOL_STATE, "PoolNode").size // types.size("_EX_HEAP_POOL_NODE")
    per_node = types.field("_EX_HEAP_POOL_NODE", "Heaps").size // 8
    specials = types.field(POOL_STATE, "SpecialHeaps").size // 8
    heap_slots = [(f"ExPoolState.PoolNode[{node}].Heaps[{index}]",
                   state + types.offset(POOL_STATE, f"PoolNode[{node}].Heaps[{index}]"), 8)
                  for node in range(nodes) for index in range(per_node)]
    heap_slots += [(f"ExPoolState.SpecialHeaps[{index}]", state + types.offset(POOL_STATE, f"SpecialHeaps[{index}]"),
                    8) for index in range(specials)]
    heaps = [(name, address, int.from_bytes(image.space.read(address, 8), "little"))
             for name, address, _ in heap_slots]
    kept_name, _, kept = chooser.rng.choice([slot for slot in heaps if slot[2]])
    contexts = types.field("_SEGMENT_HEAP", "SegContexts").size // types.size("_HEAP_SEG_CONTEXT")
    lists = [(f"{kept_name}->SegContexts[{index}].SegmentListHead",
              kept + types.offset("_SEGMENT_HEAP", f"SegContexts[{index}].SegmentListHead"),
              types.field("_SEGMENT_HEAP", f"SegContexts[{index}].SegmentListHead").size) for index in range(contexts)]
    smeared = slots + [slot for slot in heap_slots if slot[0] != kept_name] + lists
    return _smear(chooser, "smeared-heaps", smeared)


def _smear(chooser: _Chooser, kind: str, smeared: list[tuple[str, int, int]]) -> Corruption:
    """Random bytes over each (name, address, size); named as a list, or by count for a long one."""
    for _, address, size in smeared:
        chooser.image.space.write(address, bytes(chooser.rng.getrandbits(8) for _ in range(size)))
    where = min(address for _, address, _ in smeared)
    names = [name for name, _, _ in smeared]
    shown = ", ".join(names) if len(names) <= 8 else f"{', '.join(names[:4])} and {len(names) - 4} more"
    return Corruption(kind, where, 0, "random bytes over " + shown)
