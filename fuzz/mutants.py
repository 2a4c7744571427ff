"""Kinds of damage, each cut from the pristine image with a seeded generator.

A mutation is a list of physical byte patches (or a truncation) plus what it
can reach: the virtual ranges whose allocations may be lost or changed, or
``everything`` when the damage hits data every walk depends on.  Reach is
decided from the layout (a classic chunk chain lives in one page; segment heap
chains, subsegments and descriptors in one segment), never from what the
library under test happens to do.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from dataclasses import dataclass

from samples.isf import FieldLayout
from samples.segheap_layout import RANGE_CONTINUATION, RANGE_LFH_SUBSEGMENT, RANGE_VS_SUBSEGMENT

from .image import PAGE, SEGMENT, Pristine, canonical

BIG_ENTRY = "_POOL_TRACKER_BIG_PAGES"
POOL_HEADER = "_POOL_HEADER"
DESCRIPTOR = "_HEAP_PAGE_RANGE_DESCRIPTOR"
VS_HEADER = 0x10  # the VS chunk header before a VS block's pool header
NOTHING = ()


@dataclass(frozen=True)
class Mutation:
    kind: str
    note: str
    patches: tuple[tuple[int, bytes], ...] = ()  # (physical offset, bytes written there)
    truncate: int | None = None  # new image length
    reach: tuple[tuple[int, int], ...] = ()  # virtual ranges the damage can change
    everything: bool = False  # only robustness can be checked
    big_table: bool = False  # the big page table itself is damaged: big allocations may go


def _patch_field(pristine: Pristine, address: int, layout: FieldLayout, value: int) -> tuple[int, bytes] | None:
    """The patch that stores ``value`` in one (bit)field of the structure at ``address``."""
    where = pristine.physical(address + layout.offset)
    if where is None:
        return None
    word = int.from_bytes(pristine.raw[where : where + layout.size], "little")
    if layout.bit_position is None:
        word = value & ((1 << (8 * layout.size)) - 1)
    else:
        mask = ((1 << layout.bit_length) - 1) << layout.bit_position
        word = (word & ~mask) | ((value << layout.bit_position) & mask)
    return where, word.to_bytes(layout.size, "little")


def _random_bytes(pristine: Pristine, rng: random.Random, address: int, size: int) -> tuple[int, bytes] | None:
    where = pristine.physical(address)
    if where is None:
        return None
    size = min(size, PAGE - address % PAGE)
    return where, bytes(rng.getrandbits(8) for _ in range(size))


def _with_header(pristine: Pristine) -> list[dict]:
    """Live small allocations whose manifest address is their pool header."""
    backings = ("LFH", "VS") if pristine.segment_heap else ("Page",)
    return [a for a in pristine.allocations if a["backing"] in backings and a["state"] == "Allocated"]


def _made(kind: str, note: str, patch, reach: tuple[int, int], **extra) -> Mutation | None:
    if patch is None:
        return None
    return Mutation(kind, note, (patch,), reach=(reach,), **extra)


# -- pool headers ----------------------------------------------------------------------------------------------
def _header_field(kind: str, name: str, value: Callable[[random.Random], int]) -> Callable:
    def mutate(pristine: Pristine, rng: random.Random) -> Mutation | None:
        target = rng.choice(_with_header(pristine))
        layout = pristine.field(POOL_HEADER, name)
        chosen = value(rng)
        patch = _patch_field(pristine, target["address"], layout, chosen)
        return _made(kind, f"{name} {chosen:#x} at {target['address']:#x}", patch,
                     pristine.reach(target["address"]))
    return mutate


def header_random(pristine: Pristine, rng: random.Random) -> Mutation | None:
    target = rng.choice(_with_header(pristine))
    patch = _random_bytes(pristine, rng, target["address"], 16)
    return _made("header-random", f"random pool header at {target['address']:#x}", patch,
                 pristine.reach(target["address"]))


# -- segment heap ----------------------------------------------------------------------------------------------
def _heap_key(pristine: Pristine) -> int:
    globals_ = pristine.symbol("RtlpHpHeapGlobals")
    layout = pristine.field("_RTLP_HP_HEAP_GLOBALS", "HeapKey")
    return pristine.u64(globals_ + layout.offset) if globals_ is not None and layout else 0


def _vs_header_address(allocation: dict) -> int | None:
    """The VS chunk header of a VS allocation (free chunks are listed at it; a page-start pool header's
    chunk header may sit further back behind padding, so those are skipped)."""
    if allocation["state"] != "Allocated":
        return allocation["address"]
    return None if allocation["address"] % PAGE == 0 else allocation["address"] - VS_HEADER


def vs_size(pristine: Pristine, rng: random.Random) -> Mutation | None:
    """A VS chunk header that decodes to size 0, a huge size or a size pointing back at itself."""
    chunks = [(a, _vs_header_address(a)) for a in pristine.allocations if a["backing"] == "VS"]
    chunks = [(a, h) for a, h in chunks if h is not None]
    if not chunks:
        return None
    allocation, header = rng.choice(chunks)
    size = pristine.field("_HEAP_VS_CHUNK_HEADER_SIZE", "UnsafeSize")
    key = _heap_key(pristine)
    raw = pristine.u64(header)
    decoded = raw ^ header ^ key
    new_size = rng.choice((0, 1, 0xFFFF, rng.randrange(0x10000)))
    shift = 8 * size.offset + (size.bit_position or 0)
    decoded = (decoded & ~(0xFFFF << shift)) | (new_size << shift)
    where = pristine.physical(header)
    patch = (where, struct.pack("<Q", decoded ^ header ^ key)) if where is not None else None
    return _made("vs-size", f"VS chunk size {new_size:#x} at {header:#x}", patch, pristine.reach(header))


def vs_bits(pristine: Pristine, rng: random.Random) -> Mutation | None:
    chunks = [_vs_header_address(a) for a in pristine.allocations if a["backing"] == "VS"]
    chunks = [h for h in chunks if h is not None]
    if not chunks:
        return None
    header = rng.choice(chunks)
    where = pristine.physical(header)
    if where is None:
        return None
    raw = bytearray(pristine.raw[where : where + 8])
    for _ in range(rng.randint(1, 3)):
        raw[rng.randrange(8)] ^= 1 << rng.randrange(8)
    return _made("vs-bits", f"flipped bits of the VS chunk header at {header:#x}", (where, bytes(raw)),
                 pristine.reach(header))


def _subsegment(pristine: Pristine, address: int) -> tuple[int, int, int] | None:
    """(descriptor address, subsegment start, RangeFlags) of the page range holding ``address``."""
    segment = address - address % SEGMENT
    flags, offset = pristine.field(DESCRIPTOR, "RangeFlags"), pristine.field(DESCRIPTOR, "UnitOffset")
    stride = pristine.types.size(DESCRIPTOR)
    unit = (address - segment) // PAGE
    descriptor = segment + stride * unit
    data = pristine.read(descriptor, stride)
    if len(data) < stride:
        return None
    if data[flags.offset] == RANGE_CONTINUATION:
        unit -= data[offset.offset]
        data = pristine.read(segment + stride * unit, stride)
    return descriptor, segment + unit * PAGE, data[flags.offset] if data else 0


def _structure(kind: str, backing: str, flags: int, type_name: str) -> Callable:
    """Random bytes over the header of the LFH or VS subsegment holding a chosen allocation."""
    def mutate(pristine: Pristine, rng: random.Random) -> Mutation | None:
        candidates = [a for a in pristine.allocations if a["backing"] == backing]
        for allocation in rng.sample(candidates, min(16, len(candidates))):
            found = _subsegment(pristine, allocation["address"])
            if found and found[2] == flags:
                start = found[1]
                patch = _random_bytes(pristine, rng, start + rng.randrange(pristine.types.size(type_name)),
                                      rng.randint(1, 8))
                return _made(kind, f"{type_name} at {start:#x}", patch, pristine.reach(start))
        return None
    return mutate


def descriptor(pristine: Pristine, rng: random.Random) -> Mutation | None:
    candidates = [a for a in pristine.allocations if a["backing"] in ("LFH", "VS")]
    if not candidates:
        return None
    allocation = rng.choice(candidates)
    found = _subsegment(pristine, allocation["address"])
    if found is None:
        return None
    patch = _random_bytes(pristine, rng, found[0] + rng.randrange(0x20), rng.randint(1, 8))
    return _made("descriptor", f"page range descriptor at {found[0]:#x}", patch,
                 pristine.reach(allocation["address"]))


# -- big page table --------------------------------------------------------------------------------------------
def _big_reach(pristine: Pristine, va: int, size: int) -> list[tuple[int, int]]:
    """An allocation range and the pages or segments its edges lie in (classic tails, headerless VS blocks)."""
    size = min(size, 1 << 32)
    ranges = [(va, va + max(size, 1)), pristine.reach(va), pristine.reach(va + max(size, 1) - 1)]
    return ranges


def big_entry(pristine: Pristine, rng: random.Random) -> Mutation | None:
    entries = pristine.manifest["big_pages"]
    table = pristine.manifest["extras"].get("big_page_table")
    if not entries or not table:
        return None
    entry = rng.choice(entries)
    address = table["address"] + entry["index"] * pristine.types.size(BIG_ENTRY)
    name = rng.choice(("Va", "NumberOfBytes", "Key"))
    layout = pristine.field(BIG_ENTRY, name)
    other = rng.choice(pristine.allocations)["address"]
    value = {
        "Va": rng.choice((0, entry["va"] ^ 1, other, other + PAGE // 2, rng.getrandbits(64))),
        "NumberOfBytes": rng.choice((0, 1, 1 << 40, rng.getrandbits(32), entry["size"] * 64)),
        "Key": rng.getrandbits(32),
    }[name]
    patch = _patch_field(pristine, address, layout, value)
    reach = _big_reach(pristine, entry["va"], entry["size"])
    if name == "Va":  # as written, and as a reader that sign-extends it takes it
        reach += _big_reach(pristine, value & ~1, entry["size"]) + _big_reach(pristine, canonical(value & ~1),
                                                                             entry["size"])
    if name == "NumberOfBytes":
        reach += _big_reach(pristine, entry["va"], value)
    if patch is None:
        return None
    return Mutation("big-entry", f"{name} {value:#x} in big page table entry {entry['index']}", (patch,),
                    reach=tuple(reach))


def big_table(pristine: Pristine, rng: random.Random) -> Mutation | None:
    """The big page table's size or pointer: big allocations may all go, nothing else may change."""
    name = rng.choice(("PoolBigPageTableSize", "PoolBigPageTable"))
    symbol = pristine.symbol(name)
    where = pristine.physical(symbol)
    if where is None:
        return None
    current = pristine.u64(symbol)
    value = rng.choice((0, 1, 3, current // 2, current * 2, 1 << 40, rng.getrandbits(64), current + 0x18))
    return Mutation("big-table", f"{name} = {value:#x}", ((where, struct.pack("<Q", value & (2**64 - 1))),),
                    big_table=True)


# -- tag tracker, objects: nothing a census lists depends on them ---------------------------------------------------
def tracker(pristine: Pristine, rng: random.Random) -> Mutation | None:
    tables = pristine.manifest["extras"].get("tracker_tables")
    if not tables:
        return None
    if rng.random() < 0.3:
        name = rng.choice(("PoolTrackTableSize", "PoolTrackTableMask", "PoolTrackTable", "PoolTrackTableExpansionSize"))
        symbol = pristine.symbol(name)
        where = None if symbol is None else pristine.physical(symbol)
        if where is None:
            return None
        value = rng.choice((0, 1, 2**32 - 1, 2**63, rng.getrandbits(64)))
        return Mutation("tracker", f"{name} = {value:#x}", ((where, struct.pack("<Q", value)),))
    table = rng.choice(tables["tables"])
    row = rng.randrange(max(1, table["rows"]))
    patch = _random_bytes(pristine, rng, table["address"] + row * tables["entry_size"], tables["entry_size"])
    if patch is None:
        return None
    return Mutation("tracker", f"row {row} of tag table {table['name']}", (patch,))


def object_header(pristine: Pristine, rng: random.Random) -> Mutation | None:
    objects = pristine.manifest["objects"]
    if not objects:
        return None
    target = rng.choice(objects)
    size = pristine.types.size("_OBJECT_HEADER")
    start = target["header"] + rng.randrange(size)
    patch = _random_bytes(pristine, rng, start, rng.randint(1, 8))
    if patch is None:
        return None
    return Mutation("object-header", f"{target['type']} object header at {target['header']:#x}", (patch,))


# -- page tables and truncation --------------------------------------------------------------------------------------
def pte(pristine: Pristine, rng: random.Random) -> Mutation | None:
    """A page-table entry over pool data: cleared, pointing at another frame, at a page table, or at itself."""
    page = rng.choice(sorted(pristine.data_pages))
    steps = pristine.walk(page)
    step = steps[-1] if rng.random() < 0.8 else steps[-2]
    covered = 1 << step.shift
    start = page - page % covered
    choice = rng.randrange(4)
    frame = step.value & 0x000F_FFFF_FFFF_F000
    value = [
        step.value & ~1,
        (rng.randrange(len(pristine.raw) // PAGE) * PAGE) | (step.value & 0xFFF),
        (step.where - step.where % PAGE) | (step.value & 0xFFF),  # the table holding this entry: a loop
        (pristine.dtb) | (step.value & 0xFFF),
    ][choice]
    if value == step.value or frame == value & 0x000F_FFFF_FFFF_F000 and choice:
        value = step.value & ~1
    reach = [(start, start + covered), pristine.reach(start), pristine.reach(start + covered - 1)]
    if covered > PAGE and pristine.segment_heap:
        reach = [(start - start % (1 << 24), start + covered + (1 << 24))]
    return Mutation("pte", f"entry for {page:#x} (level {step.shift}) = {value:#x}",
                    ((step.where, struct.pack("<Q", value)),), reach=tuple(reach))


def truncate(pristine: Pristine, rng: random.Random) -> Mutation:
    """The image cut short: allocations whose data or page tables lie past the cut may go; if anything else
    (kernel image, pool bookkeeping, page tables above the pool) lies there, every answer may change."""
    length = len(pristine.raw)
    cut = rng.randrange(length // 8, length) & ~(PAGE - 1)
    return Mutation("truncate", f"image cut at {cut:#x} of {length:#x}", truncate=cut,
                    reach=tuple(_truncated_reach(pristine, cut)), everything=_bookkeeping_beyond(pristine, cut))


def _truncated_reach(pristine: Pristine, cut: int) -> list[tuple[int, int]]:
    reach = []
    for page in pristine.data_pages:
        if max(pristine.frames(page)) >= cut:
            reach.append(pristine.reach(page))
    return reach


def _bookkeeping_beyond(pristine: Pristine, cut: int) -> bool:
    """Whether a frame past the cut holds anything but pool data pages and their last-level tables."""
    return max(_bookkeeping_frames(pristine), default=0) >= cut


def _bookkeeping_frames(pristine: Pristine) -> list[int]:
    data = {pristine.physical(page) for page in pristine.data_pages}
    last_tables = {pristine.walk(page)[-1].where & ~(PAGE - 1) for page in pristine.data_pages}
    used = set(range(0, len(pristine.raw), PAGE)) - data - last_tables
    nonzero = [frame for frame in used if any(pristine.raw[frame : frame + PAGE])]
    return nonzero


KINDS: dict[str, Callable[[Pristine, random.Random], Mutation | None]] = {
    "header-size-zero": _header_field("header-size-zero", "BlockSize", lambda rng: 0),
    "header-past-page": _header_field("header-past-page", "BlockSize", lambda rng: rng.choice((0xFF, 0x101, 0x1FF))),
    "header-previous": _header_field("header-previous", "PreviousSize", lambda rng: rng.randint(1, 0xFF)),
    "header-random": header_random,
    "vs-size": vs_size,
    "vs-bits": vs_bits,
    "lfh-subsegment": _structure("lfh-subsegment", "LFH", RANGE_LFH_SUBSEGMENT, "_HEAP_LFH_SUBSEGMENT"),
    "vs-subsegment": _structure("vs-subsegment", "VS", RANGE_VS_SUBSEGMENT, "_HEAP_VS_SUBSEGMENT"),
    "descriptor": descriptor,
    "big-entry": big_entry,
    "big-table": big_table,
    "tracker": tracker,
    "object-header": object_header,
    "pte": pte,
    "truncate": truncate,
}
SEGMENT_HEAP_ONLY = ("vs-size", "vs-bits", "lfh-subsegment", "vs-subsegment", "descriptor")


def kinds_for(pristine: Pristine) -> list[str]:
    return [kind for kind in KINDS if pristine.segment_heap or kind not in SEGMENT_HEAP_ONLY]


def mutations(pristine: Pristine, seed: int, count: int) -> list[Mutation]:
    """``count`` mutations, kinds in turn, each drawn from its own seeded generator (same seed, same list)."""
    kinds = kinds_for(pristine)
    out: list[Mutation] = []
    attempt = 0
    while len(out) < count and attempt < 4 * count + 16:
        kind = kinds[attempt % len(kinds)]
        rng = random.Random(f"{seed}:{pristine.flavor.name}:{attempt}")
        attempt += 1
        mutation = KINDS[kind](pristine, rng)
        if mutation is not None:
            out.append(mutation)
    return out
