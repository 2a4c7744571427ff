"""Pool bookkeeping tables every build keeps: big page table and tag trackers.

Builders report what they allocate (:meth:`PoolTables.add_big`,
:meth:`PoolTables.track`); :meth:`PoolTables.write` lays the tables out in the
kernel's own structures at the end of the build, with the hashes, probing and
per-processor split the kernel uses, so a reader that follows Windows' rules
finds every entry where Windows would have put it.

What Windows does, and this module reproduces:

* ``PoolBigPageTable`` is an array of ``_POOL_TRACKER_BIG_PAGES`` whose entry
  count ``PoolBigPageTableSize`` is a power of two.  Unused entries hold
  ``Va = 1`` (the free bit); an allocation goes to the first free entry probing
  linearly from ``hash(Va)``; freeing sets the free bit and leaves the stale
  tag and size behind.
* Tag counters live in ``_POOL_TRACKER_TABLE`` rows.  ``PoolTrackTable`` is
  also processor 0's table (``ExPoolTagTables[0]``); every other processor
  counts in its own table ``ExPoolTagTables[n]``, whose rows sit at the index
  the global table reserved for the tag.  A tag's totals are the sums over the
  distinct tables; one processor's bytes can be "negative" (freed there,
  allocated elsewhere).  ``PoolTrackTableSize`` is the power of two plus one
  spare row, ``PoolTrackTableMask`` the power of two minus one.  Tags that find
  the hashed table full go to ``PoolTrackTableExpansion``, a page-granular
  array searched linearly.  Session pool counts in ``ExpSessionPoolTrackTable``
  on builds that have it (Windows 11 has none).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

from .manifest import Manifest, tag_text

PAGE_SIZE = 0x1000
BIG_ENTRY_FREE = 1
BIG_HASH_MULTIPLIER = 0x9E5F
TAG_HASH_MULTIPLIER = 40543
U64 = (1 << 64) - 1
# Windows sizes the tag table at 512 rows on machines with at most this many physical pages.
SMALL_MACHINE_PAGES = 0x10000
# The smallest PoolTrackTableSize Windows accepts from the registry.
MINIMUM_TRACK_TABLE = 64
POOL_TAG = b"Pool"  # the tag Windows charges its own tracking tables to

# Allocator pool name -> tracker column.  Session pool has a table of its own.
TRACKER_COLUMN = {"NonPaged": "Nonp", "NonPagedNx": "Nonp", "Paged": "Paged", "Session": "Paged"}
COUNTER_FIELDS = {
    "Nonp": ("NonPagedAllocs", "NonPagedFrees", "NonPagedBytes"),
    "Paged": ("PagedAllocs", "PagedFrees", "PagedBytes"),
}
TRACKER_TYPE = "_POOL_TRACKER_TABLE"
BIG_TYPE = "_POOL_TRACKER_BIG_PAGES"
_ESCAPE = re.compile(r"\\x([0-9a-fA-F]{2})")


def big_page_index(va: int, table_size: int) -> int:
    """Home slot of a big allocation: the page number's low 32 bits times 0x9E5F, folded."""
    value = ((va >> 12) & 0xFFFF_FFFF) * BIG_HASH_MULTIPLIER
    value ^= value >> 32
    return value & (table_size - 1)


def tag_hash_index(key: int, mask: int) -> int:
    """Home slot of a tag in a tracker table: mask & ((40543 * tag) ^ ((40543 * tag) >> 32))."""
    value = TAG_HASH_MULTIPLIER * (key & 0xFFFF_FFFF)
    return (value ^ (value >> 32)) & mask


def tag_key(tag: bytes) -> int:
    return int.from_bytes(tag[:4].ljust(4, b"\0"), "little")


def tag_bytes(text: str) -> bytes:
    """Inverse of :func:`samples.manifest.tag_text`."""
    out = bytearray()
    position = 0
    while position < len(text):
        match = _ESCAPE.match(text, position)
        if match:
            out.append(int(match.group(1), 16))
            position = match.end()
        else:
            out.append(ord(text[position]))
            position += 1
    return bytes(out)


def _page_round(size: int) -> int:
    return (size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)


@dataclass
class BigAllocation:
    va: int
    size: int
    tag: bytes
    pool_type: int
    free: bool = False


@dataclass
class TagCounters:
    allocs: int = 0
    frees: int = 0
    bytes: int = 0

    def add(self, allocs: int, frees: int, bytes_: int) -> None:
        self.allocs += allocs
        self.frees += frees
        self.bytes += bytes_


@dataclass
class _Row:
    """One tracker row as it will be written: a key and counters per column."""

    key: int
    counters: dict[str, TagCounters] = field(default_factory=dict)


class PoolTables:
    """Collects big allocations and tag counts; writes the kernel's tables at the end.

    ``track_table_size`` is the power of two of hashed rows.  The default is the
    smallest size Windows accepts from the registry, so that an image with more
    tags than that exercises the expansion table, as a busy machine does;
    ``None`` picks what Windows chooses by itself for the image's memory size.
    """

    def __init__(
        self,
        big_table_size: int = 4096,
        track_table_size: int | None = MINIMUM_TRACK_TABLE,
        session_table_size: int = 256,
        processors: int = 2,
    ):
        for name, value in (("big_table_size", big_table_size), ("session_table_size", session_table_size)):
            if value & (value - 1) or value < 2:
                raise ValueError(f"{name} must be a power of two")
        if track_table_size is not None and (track_table_size & (track_table_size - 1) or track_table_size < 2):
            raise ValueError("track_table_size must be a power of two")
        self.big: list[BigAllocation] = []
        self.big_table_size = big_table_size
        self.track_table_size = track_table_size
        self.session_table_size = session_table_size
        self.processors = processors
        # (tag, table) -> column -> counters; table is "system" or "session".  Insertion order is
        # the order tags first appear, which is the order Windows reserves their rows.
        self.counters: dict[tuple[bytes, str], dict[str, TagCounters]] = {}

    # -- what builders report ----------------------------------------------
    def add_big(self, va: int, size: int, tag: bytes, pool_type: int, free: bool = False) -> None:
        self.big.append(BigAllocation(va, size, tag, pool_type, free))

    def track(self, tag: bytes, pool: str, allocs: int, frees: int, bytes_: int) -> None:
        """Add counts for ``tag`` in ``pool`` (NonPaged, NonPagedNx, Paged, Session)."""
        table = "session" if pool == "Session" else "system"
        columns = self.counters.setdefault((bytes(tag), table), {})
        columns.setdefault(TRACKER_COLUMN[pool], TagCounters()).add(allocs, frees, bytes_)

    def track_from_manifest(self, manifest: Manifest, rng) -> None:
        """Derive counters from the manifest's allocations.

        Live chunks are outstanding allocations and their bytes; free and
        cached-free chunks were freed; each tag also gets a random number of
        earlier allocations that were freed long ago, as any running system has.
        """
        live: dict[tuple[str, str], list[int]] = {}
        for allocation in manifest.allocations:
            if allocation.state == "Allocated":
                counts = live.setdefault((allocation.tag, allocation.pool), [0, 0, 0])
                counts[0] += 1
                counts[2] += allocation.size
                continue
            for tag in _freed_tags(allocation):
                live.setdefault((tag, allocation.pool), [0, 0, 0])[1] += 1
        for (text, pool), (outstanding, freed, bytes_) in live.items():
            frees = freed + rng.randint(0, 2 * outstanding + 4)
            self.track(tag_bytes(text), pool, outstanding + frees, frees, bytes_)

    # -- layout ------------------------------------------------------------
    def write(
        self,
        image,
        base: int | None = None,
        independent_base: int | None = None,
        session_base: int | None = None,
    ) -> None:
        """Write the big page table and the tracker tables into ``image`` and its manifest (once).

        ``base`` is where the nonpaged tables go (big page table, global tag
        table, expansion), ``independent_base`` where the other processors'
        tables go (Windows takes them from system PTEs), ``session_base`` where
        the session table goes.  Defaults: the last 16 MiB of the nonpaged pool
        and system PTE regions and the last MiB of session space.
        """
        regions = image.flavor.regions
        if base is None:
            base = _region_tail(regions["NonPagedPool"], 0x100_0000)
        if independent_base is None:
            independent_base = _region_tail(regions["SystemPtes"], 0x100_0000)
        if session_base is None:
            session_base = _region_tail(regions["Session"], 0x10_0000)
        writer = _TableWriter(image, self)
        writer.write(base, independent_base, session_base)


def _freed_tags(allocation) -> list[str]:
    """Tags of the allocations a free chunk once held.

    A free VS chunk shows its encoded header where a tag would be and may
    span several freed (coalesced) allocations: the segment heap builder
    notes them as ``freed <tag>; ...``.  Never-allocated LFH slots and VS
    padding held nothing.  Other free chunks keep the freed allocation's tag.
    """
    parts = [part for part in allocation.note.split("; ") if part]
    freed = [part.removeprefix("freed ").removeprefix("big ").split(" at ")[0] for part in parts
             if part.startswith("freed ")]
    if freed:
        return freed
    if allocation.note.startswith("never allocated") or (allocation.backing == "VS" and not parts):
        return []
    return [allocation.tag]


def _region_tail(region: tuple[int, int], size: int) -> int:
    start, length = region
    return start + length - size


class _TableWriter:
    """Lays one :class:`PoolTables` out in one image."""

    def __init__(self, image, tables: PoolTables):
        self.image = image
        self.tables = tables
        self.types = image.types
        self.rng = image.rng
        self.entry_size = self.types.size(TRACKER_TYPE)
        self.big_entry_size = self.types.size(BIG_TYPE)

    def write(self, base: int, independent_base: int, session_base: int) -> None:
        hashed = self.tables.track_table_size or self._default_track_table_size()
        big_bytes = _page_round(self.tables.big_table_size * self.big_entry_size)
        track_bytes = _page_round((hashed + 1) * self.entry_size)
        big_va = base
        track_va = big_va + big_bytes
        expansion_va = track_va + track_bytes

        system_rows = self._system_rows()
        self._charge_pool(system_rows, big_bytes, track_bytes)
        placed, overflow = self._place_hashed(system_rows, hashed)
        expansion_entries, growths = self._expansion_shape(len(overflow))
        if growths:
            # The expansion table's own pages are charged when it is (re)allocated; Pool
            # already has a row, so this only changes its counters.
            pool_row = next(row for row in system_rows if row.key == tag_key(POOL_TAG))
            pool_row.counters["Nonp"].add(growths, growths - 1, expansion_entries * self.entry_size)

        self._write_big_table(big_va)
        tables = self._write_tag_tables(track_va, independent_base, hashed, placed)
        self._write_expansion(expansion_va if overflow else 0, expansion_entries, overflow, tables)
        if self.types.has_symbol("ExpSessionPoolTrackTable"):
            self._write_session(session_base, tables)
        elif any(table == "session" for _, table in self.tables.counters):
            raise ValueError("this build keeps no session tag table: session pool counts have nowhere to go")
        self._record(system_rows, tables, big_va, track_va, hashed)

    def _default_track_table_size(self) -> int:
        if len(self.image.space.physical) // PAGE_SIZE <= SMALL_MACHINE_PAGES:
            return 512
        return 2048 if self.entry_size == 0x28 else 4096

    # -- tag rows ------------------------------------------------------------
    def _system_rows(self) -> list[_Row]:
        rows: dict[int, _Row] = {tag_key(POOL_TAG): _Row(tag_key(POOL_TAG))}
        for (tag, table), columns in self.tables.counters.items():
            if table != "system":
                continue
            row = rows.setdefault(tag_key(tag), _Row(tag_key(tag)))
            for column, counters in columns.items():
                row.counters.setdefault(column, TagCounters()).add(counters.allocs, counters.frees, counters.bytes)
        return list(rows.values())

    def _charge_pool(self, rows: list[_Row], big_bytes: int, track_bytes: int) -> None:
        """Windows charges its big page table and global tag table to tag Pool, nonpaged."""
        rows[0].counters.setdefault("Nonp", TagCounters()).add(2, 0, big_bytes + track_bytes)

    def _place_hashed(self, rows: list[_Row], hashed: int) -> tuple[dict[int, _Row], list[_Row]]:
        """Reserve each tag's slot in the global table in first-use order; the rest overflow."""
        mask = hashed - 1
        placed: dict[int, _Row] = {}
        overflow: list[_Row] = []
        for row in rows:
            index = tag_hash_index(row.key, mask)
            for _ in range(hashed):
                if index not in placed:
                    placed[index] = row
                    break
                index = (index + 1) & mask
            else:
                overflow.append(row)
        return placed, overflow

    def _expansion_shape(self, overflow: int) -> tuple[int, int]:
        """Entries and number of one-page growths of the expansion table holding ``overflow`` rows."""
        if not overflow:
            return 0, 0
        pages = 1
        while (pages * PAGE_SIZE) // self.entry_size < overflow:
            pages += 1
        return (pages * PAGE_SIZE) // self.entry_size, pages

    def _split(self, counters: TagCounters, parts: int) -> list[TagCounters]:
        """Spread one tag's counters over processors; bytes follow a per-allocation average."""
        if parts == 1:
            return [TagCounters(counters.allocs, counters.frees, counters.bytes)]
        allocs = _random_split(self.rng, counters.allocs, parts)
        frees = _random_split(self.rng, counters.frees, parts)
        outstanding = counters.allocs - counters.frees
        average = counters.bytes // outstanding if outstanding > 0 else 0
        shares = [TagCounters(a, f, (a - f) * average) for a, f in zip(allocs, frees)]
        shares[-1].bytes = counters.bytes - sum(share.bytes for share in shares[:-1])
        return shares

    def _write_tag_tables(self, track_va: int, independent_base: int, hashed: int, placed: dict[int, _Row]) -> list[dict]:
        processors = self.tables.processors
        mask = hashed - 1
        rows_per_cpu: list[dict[int, dict[str, TagCounters]]] = [dict() for _ in range(processors)]
        for index, row in placed.items():
            split = {column: self._split(counters, processors) for column, counters in row.counters.items()}
            for cpu in range(processors):
                columns = {column: shares[cpu] for column, shares in split.items()}
                if cpu == 0 or any(c.allocs or c.frees or c.bytes for c in columns.values()):
                    rows_per_cpu[cpu][index] = columns
        key_of = {index: row.key for index, row in placed.items()}
        tables = []
        table_bytes = _page_round((hashed + 1) * self.entry_size)
        for cpu in range(processors):
            address = track_va if cpu == 0 else independent_base + (cpu - 1) * table_bytes
            keys = self._processor_keys(rows_per_cpu[cpu], key_of, mask) if cpu else dict(key_of)
            buffer = bytearray((hashed + 1) * self.entry_size)
            entries = []
            for index, key in sorted(keys.items()):
                columns = rows_per_cpu[cpu].get(index, {})
                self._pack_row(buffer, index, key, columns)
                entries.append(_entry_record(f"cpu{cpu}", index, key, columns))
            self.image.space.write(address, bytes(buffer))
            tables.append({"name": f"cpu{cpu}", "address": address, "rows": hashed + 1, "entries": entries})
        self._write_pointer("PoolTrackTable", track_va)
        self._write_pointer("PoolTrackTableSize", hashed + 1)
        self._write_pointer("PoolTrackTableMask", mask)
        pointers = self.image.symbol("ExPoolTagTables")
        for cpu, table in enumerate(tables):
            self.image.space.write_u64(pointers + 8 * cpu, table["address"])
        return tables

    def _processor_keys(self, used: dict[int, dict], key_of: dict[int, int], mask: int) -> dict[int, int]:
        """Keys a processor's table holds: its tags' rows plus every global key copied on the probe path."""
        keys: dict[int, int] = {}
        for index in used:
            key = key_of[index]
            probe = tag_hash_index(key, mask)
            while True:
                keys[probe] = key_of[probe]
                if probe == index:
                    break
                probe = (probe + 1) & mask
        return keys

    def _pack_row(self, buffer: bytearray, index: int, key: int, columns: dict[str, TagCounters]) -> None:
        values = {"Key": key}
        for column, counters in columns.items():
            allocs, frees, bytes_ = COUNTER_FIELDS[column]
            values[allocs] = counters.allocs
            values[frees] = counters.frees
            values[bytes_] = counters.bytes & U64
        self.types.pack(buffer, index * self.entry_size, TRACKER_TYPE, values)

    def _write_expansion(self, address: int, entries: int, overflow: list[_Row], tables: list[dict]) -> None:
        self._write_pointer("PoolTrackTableExpansion", address)
        self._write_pointer("PoolTrackTableExpansionSize", entries)
        if not overflow:
            return
        buffer = bytearray(entries * self.entry_size)
        records = []
        for index, row in enumerate(overflow):
            self._pack_row(buffer, index, row.key, row.counters)
            records.append(_entry_record("expansion", index, row.key, row.counters))
        self.image.space.write(address, bytes(buffer))
        tables.append({"name": "expansion", "address": address, "rows": entries, "entries": records})

    def _write_session(self, address: int, tables: list[dict]) -> None:
        size = self.tables.session_table_size
        mask = size - 1
        buffer = bytearray((size + 1) * self.entry_size)
        used: dict[int, int] = {}
        records = []
        for (tag, table), columns in self.tables.counters.items():
            if table != "session":
                continue
            key = tag_key(tag)
            index = tag_hash_index(key, mask)
            for _ in range(size):
                if index not in used:
                    break
                index = (index + 1) & mask
            else:
                raise ValueError("session tag table is full: choose a larger session_table_size")
            used[index] = key
            self._pack_row(buffer, index, key, columns)
            records.append(_entry_record("session", index, key, columns))
        self.image.space.write(address, bytes(buffer))
        self._write_pointer("ExpSessionPoolTrackTable", address)
        self._write_pointer("ExpSessionPoolTrackTableSize", size + 1)
        self._write_pointer("ExpSessionPoolTrackTableMask", mask)
        tables.append({"name": "session", "address": address, "rows": size + 1, "entries": sorted(records, key=lambda r: r["index"])})

    # -- big page table ------------------------------------------------------
    def _write_big_table(self, address: int) -> None:
        size = self.tables.big_table_size
        mask = size - 1
        entry = self.big_entry_size
        va_offset = self.types.offset(BIG_TYPE, "Va")
        buffer = bytearray(size * entry)
        for index in range(size):
            struct.pack_into("<Q", buffer, index * entry + va_offset, BIG_ENTRY_FREE)
        slots: list[tuple[int, BigAllocation]] = []
        taken: set[int] = set()
        for allocation in self.tables.big:
            index = big_page_index(allocation.va, size)
            for _ in range(size):
                if index not in taken:
                    break
                index = (index + 1) & mask
            else:
                raise ValueError("big page table is full: choose a larger big_table_size")
            taken.add(index)
            slots.append((index, allocation))
            values = {
                "Va": allocation.va,
                "Key": tag_key(allocation.tag),
                "PoolType": allocation.pool_type,
                "NumberOfBytes": allocation.size,
            }
            self.types.pack(buffer, index * entry, BIG_TYPE, values)
        # Frees come after the allocations that followed them took their slots: a freed
        # entry keeps its tag and size and only gains the free bit.
        for index, allocation in slots:
            if allocation.free:
                self.types.pack_path(buffer, index * entry, BIG_TYPE, "Va", allocation.va | BIG_ENTRY_FREE)
        self.image.space.write(address, bytes(buffer))
        self._write_pointer("PoolBigPageTable", address)
        self._write_pointer("PoolBigPageTableSize", size)
        if self.types.has_symbol("ExpPoolBigEntriesInUse"):
            self._write_pointer("ExpPoolBigEntriesInUse", sum(1 for _, a in slots if not a.free))
        self.image.manifest.big_pages.extend(
            {
                "index": index,
                "va": allocation.va,
                "size": allocation.size,
                "tag": tag_text(allocation.tag),
                "pool_type": allocation.pool_type,
                "free": allocation.free,
            }
            for index, allocation in sorted(slots, key=lambda slot: slot[0])
        )

    # -- manifest ------------------------------------------------------------
    def _record(self, system_rows: list[_Row], tables: list[dict], big_va: int, track_va: int, hashed: int) -> None:
        rows = []
        for row in system_rows:
            for column, counters in row.counters.items():
                rows.append(_tracker_record(row.key, column, counters))
        for (tag, table), columns in self.tables.counters.items():
            if table == "session":
                for counters in columns.values():
                    rows.append(_tracker_record(tag_key(tag), "Session", counters))
        self.image.manifest.tracker.extend(sorted(rows, key=lambda r: (r["tag"], r["pool"])))
        self.image.manifest.extras["tracker_tables"] = {
            "PoolTrackTable": track_va,
            "PoolTrackTableSize": hashed + 1,
            "PoolTrackTableMask": hashed - 1,
            "entry_size": self.entry_size,
            "tables": tables,
        }
        self.image.manifest.extras["big_page_table"] = {
            "address": big_va,
            "entries": self.tables.big_table_size,
            "bytes": _page_round(self.tables.big_table_size * self.big_entry_size),
        }

    def _write_pointer(self, symbol: str, value: int) -> None:
        self.image.space.write_u64(self.image.symbol(symbol), value)


def _random_split(rng, total: int, parts: int) -> list[int]:
    cuts = sorted(rng.randint(0, total) for _ in range(parts - 1))
    bounds = [0, *cuts, total]
    return [bounds[i + 1] - bounds[i] for i in range(parts)]


def _key_text(key: int) -> str:
    return tag_text(key.to_bytes(4, "little"))


def _tracker_record(key: int, pool: str, counters: TagCounters) -> dict:
    return {"tag": _key_text(key), "pool": pool, "allocs": counters.allocs, "frees": counters.frees, "bytes": counters.bytes}


def _entry_record(table: str, index: int, key: int, columns: dict[str, TagCounters]) -> dict:
    record = {"table": table, "index": index, "tag": _key_text(key)}
    for column, counters in columns.items():
        record[column] = {"allocs": counters.allocs, "frees": counters.frees, "bytes": counters.bytes & U64}
    return record
