"""Classic pool pages as Windows 7 SP1 x64 and Windows 10 before the segment heap lay them out.

A small allocation is a chunk inside a 4 KiB pool page: a ``_POOL_HEADER``
(PreviousSize, PoolIndex, BlockSize, PoolType, PoolTag, ProcessBilled) and the
caller's bytes, BlockSize 16-byte blocks in all.  Chunks tile the page from
its first byte: each PreviousSize repeats the BlockSize before it (0 for the
first chunk) and the sizes add up to exactly one page, so the page is a chain
a reader can walk.  Windows coalesces neighbouring free chunks, so no two free
chunks touch; a free chunk keeps its stale tag and gets PoolType 0, and the
free lists of its pool descriptor run through its body.  Allocations that do
not fit in a page minus a header get whole pages without a header and an
entry in the big page table; Windows charges no quota for those.

From Windows 8 on, a big request below 64 KiB whose last page would keep at
least 0x40 bytes free is rounded to 16 bytes only, and ExpAllocateBigPool
returns the rest of that page to the pool: right after the big block's end
a 'Frag' chunk (BlockSize 2, PreviousSize 0, the QWORD at +0x10 holding the
big block's rounded size), then a free chunk tagged 'Free' up to the page
end.  That page's chain starts at the big block's end, not at the page
start.  Later small requests split the free chunk; as the free chunk is not
the first of its page, each split takes the end of it, so carved chunks pile
up from the page end downwards while the 'Free' header stays in place.

Windows 7 has no no-execute pool: NonPagedNx requests are nonpaged.  The
header's PoolType is the requested type's low bits with the in-use bit 2 set
(nonpaged even, paged odd); quota allocations (|8) keep the charged
``_EPROCESS`` in ProcessBilled, as is on Windows 7 and XORed with the header's
address and ``ExpPoolQuotaCookie`` on builds that have that cookie;
cache-aligned ones (|4) start their body on a cache line.  Which bookkeeping
variables exist (Windows 7's ``Mm*`` pool bounds, the cookie) is read from the
build's ISF; Windows 10 records its region bounds in ``MiState`` instead
(see regions.py).  NonPagedNx requests are modeled as nonpaged on every
classic build.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .manifest import Allocation, tag_text
from .pooltables import PoolTables

PAGE_SIZE = 0x1000
BLOCK = 16  # x64 pool block: BlockSize and PreviousSize count these
CACHE_LINE = 64  # ExpCacheLineSize on x64 processors
PAGED = 0x1
IN_USE = 0x2
CACHE_ALIGNED = 0x4
QUOTA = 0x8
SESSION = 0x20
# Windows 7 x64 session pool starts 3 GiB into session space (0xFFFFF900C0000000).
SESSION_POOL_OFFSET = 0xC000_0000
# Pool pages are not all contiguous: released pages leave holes in the pool's VA range.
GAP_CHANCE = 0.03
OPEN_PAGES = 4
HEADER_FIELDS = ("PreviousSize", "PoolIndex", "BlockSize", "PoolType")
# ExpAllocateBigPool keeps 16-byte granularity below this size when the last page keeps this much free.
BIG_TAIL_LIMIT = 0x10000
BIG_TAIL_MINIMUM = 0x40
FRAG_TAG, FRAG_BLOCKS, TAIL_FREE_TAG = b"Frag", 2, b"Free"
NEVER_ALLOCATED = "never allocated"
# Share of small live requests served by splitting a big allocation's returned tail when one fits.
TAIL_SHARE = 0.3
POOL_DESCRIPTOR = "_POOL_DESCRIPTOR"
QUOTA_COOKIE = "ExpPoolQuotaCookie"
# One node, two processors: one nonpaged pool (index 0) and one paged pool (index 1;
# ExpPagedPoolDescriptor[0] is the descriptor PoolVector names).
PAGED_POOLS = 1


@dataclass(frozen=True)
class PoolKind:
    """One Windows 7 pool: what callers call it, its POOL_TYPE, descriptor index, region name."""

    name: str
    pool_type: int
    pool_index: int
    region: str


POOLS = {
    "NonPaged": PoolKind("NonPaged", 0, 0, "Nonpaged pool"),
    "Paged": PoolKind("Paged", PAGED, PAGED_POOLS, "Paged pool"),
    "Session": PoolKind("Session", SESSION | PAGED, 0, "Session pool"),
}
ALIASES = {"NonPagedNx": "NonPaged"}


@dataclass
class _Page:
    """A pool page being filled: chunks so far and the last of them."""

    base: int
    used: int = 0
    last: Allocation | None = None
    allocated: int = 0

    @property
    def room(self) -> int:
        return PAGE_SIZE - self.used

    @property
    def ends_free(self) -> bool:
        return self.last is not None and self.last.state != "Allocated"


@dataclass
class _Tail:
    """The free chunk a big allocation's last page returned to the pool, and the lowest chunk split off it."""

    free: Allocation
    lowest: Allocation | None = None

    def fits(self, blocks: int) -> bool:
        """Splitting keeps a free chunk big enough for its free-list links."""
        return self.free.size // BLOCK - blocks >= FRAG_BLOCKS


@dataclass
class _Pool:
    kind: PoolKind
    cursor: int
    end: int
    open: list[_Page] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    big_pages: int = 0
    tails: list[_Tail] = field(default_factory=list)
    chunks: list[Allocation] = field(default_factory=list)
    stale_tags: list[bytes] = field(default_factory=list)


class _HeaderLayout:
    """Packs a ``_POOL_HEADER`` with the bit positions of the image's ISF, fast."""

    def __init__(self, types):
        self.size = types.size("_POOL_HEADER")
        self.words: dict[str, tuple[int, int, int, int]] = {}
        for name in HEADER_FIELDS:
            layout = types.field("_POOL_HEADER", name)
            position = layout.bit_position or 0
            length = layout.bit_length if layout.bit_length is not None else layout.size * 8
            self.words[name] = (layout.offset, layout.size, position, (1 << length) - 1)
        self.tag_offset = types.offset("_POOL_HEADER", "PoolTag")
        self.billed_offset = types.offset("_POOL_HEADER", "ProcessBilled")

    def pack(self, values: dict[str, int], tag: bytes, billed: int | None) -> bytes:
        header = bytearray(self.size)
        words: dict[tuple[int, int], int] = {}
        for name, value in values.items():
            offset, size, position, mask = self.words[name]
            words[(offset, size)] = words.get((offset, size), 0) | ((value & mask) << position)
        for (offset, size), word in words.items():
            header[offset : offset + size] = word.to_bytes(size, "little")
        header[self.tag_offset : self.tag_offset + 4] = tag[:4].ljust(4, b"\0")
        if billed is not None:
            header[self.billed_offset : self.billed_offset + 8] = billed.to_bytes(8, "little")
        return bytes(header)

    def patch(self, name: str, value: int, current: bytes) -> bytes:
        """``current`` header bytes with the field ``name`` (BlockSize, PreviousSize, ...) replaced."""
        offset, size, position, mask = self.words[name]
        word = int.from_bytes(current[offset : offset + size], "little")
        word = (word & ~(mask << position)) | ((value & mask) << position)
        return current[:offset] + word.to_bytes(size, "little") + current[offset + size :]


class ClassicPools:
    """Classic nonpaged, paged and session pool (Windows 7 SP1, Windows 10 1809), filled chunk by chunk.

    Call :meth:`allocate` for every chunk, then :meth:`finish` once (closes the
    pages still being filled, links free lists, writes the pool descriptors
    and region variables).  Big allocations go to ``tables``.
    """

    def __init__(self, image, tables: PoolTables, open_pages: int = OPEN_PAGES):
        self.image = image
        self.tables = tables
        self.rng = image.rng
        self.open_pages = open_pages
        self.header = _HeaderLayout(image.types)
        # Windows 8 and later encode quota pointers with a boot-time random cookie.
        self.quota_cookie = self.rng.getrandbits(64) if image.types.has_symbol(QUOTA_COOKIE) else None
        regions = image.flavor.regions
        nonpaged, paged, session = regions["NonPagedPool"], regions["PagedPool"], regions["Session"]
        self.pools = {
            "NonPaged": _Pool(POOLS["NonPaged"], nonpaged[0], nonpaged[0] + nonpaged[1]),
            "Paged": _Pool(POOLS["Paged"], paged[0], paged[0] + paged[1]),
            "Session": _Pool(POOLS["Session"], session[0] + SESSION_POOL_OFFSET, session[0] + session[1]),
        }
        self.finished = False
        # Windows allocates the paged pool descriptors from nonpaged pool at boot, tag Pool.
        descriptor_bytes = (PAGED_POOLS + 1) * image.types.size(POOL_DESCRIPTOR)
        self.paged_descriptors = self.allocate(descriptor_bytes, b"Pool", "NonPaged").body

    # -- allocation ----------------------------------------------------------
    def allocate(
        self,
        size: int,
        tag: bytes,
        pool: str,
        state: str = "Allocated",
        quota_process: int | None = None,
        cache_aligned: bool = False,
    ) -> Allocation:
        """Place one allocation as Windows 7 would and record it in the manifest."""
        if state not in ("Allocated", "Free"):
            raise ValueError(f"classic pool chunks are Allocated or Free, not {state}")
        target = self.pools[ALIASES.get(pool, pool)]
        pool_type = target.kind.pool_type
        if cache_aligned:
            pool_type |= CACHE_ALIGNED
        if quota_process is not None:
            pool_type |= QUOTA
        overhead = CACHE_LINE if cache_aligned else 0
        if size + self.header.size + overhead > PAGE_SIZE:
            # Windows charges no quota for page-sized and larger allocations.
            return self._allocate_big(target, size, tag, pool_type & ~QUOTA, state)
        blocks = max(1, (size + self.header.size + BLOCK - 1) // BLOCK)
        free = state == "Free"
        tail = None if free or cache_aligned else self._tail_for(target, blocks)
        if tail is not None:
            return self._split_tail(target, tail, blocks, tag, pool_type, quota_process)
        # A freed cache-aligned chunk has been coalesced with its leading fragment.
        aligned = cache_aligned and not free
        page = self._choose_page(target, blocks, free, aligned)
        padding = self._alignment_padding(page) if aligned else 0
        if padding:
            self._pad(target, page, padding)
        allocation = self._chunk(target, page, blocks, tag, pool_type, state, quota_process)
        if not free:
            self._remember_tag(target, tag)
        return allocation

    def _choose_page(self, pool: _Pool, blocks: int, free: bool, aligned: bool) -> _Page:
        def fits(page: _Page) -> bool:
            if free and page.ends_free:
                return False
            padding = self._alignment_padding(page) if aligned else 0
            return page.room >= padding + blocks * BLOCK

        candidates = [page for page in pool.open if fits(page)]
        if not free:
            # A page holding only a free chunk takes the next allocation that fits.
            candidates = [page for page in candidates if not page.allocated] or candidates
        if candidates:
            return self.rng.choice(candidates)
        if len(pool.open) >= self.open_pages:
            fullest = min(pool.open, key=lambda page: (not page.allocated, page.room))
            self._close(pool, fullest)
        page = _Page(self._take_pages(pool, 1))
        pool.open.append(page)
        pool.pages.append(page.base)
        return page

    def _alignment_padding(self, page: _Page) -> int:
        """Bytes before the next header so that the body after it starts a cache line."""
        body = page.base + page.used + self.header.size
        return (-body) % CACHE_LINE

    def _pad(self, pool: _Pool, page: _Page, padding: int) -> None:
        if page.ends_free:
            self._grow(page, padding)
        else:
            self._chunk(pool, page, padding // BLOCK, self._stale_tag(pool), 0, "Free", None)

    def _chunk(
        self,
        pool: _Pool,
        page: _Page,
        blocks: int,
        tag: bytes,
        pool_type: int,
        state: str,
        quota_process: int | None,
    ) -> Allocation:
        previous = page.last.size // BLOCK if page.last else 0
        allocation = self._place(pool, page.base + page.used, previous, blocks, tag, pool_type, state, quota_process)
        page.used += blocks * BLOCK
        page.last = allocation
        page.allocated += state == "Allocated"
        return allocation

    def _place(self, pool: _Pool, address: int, previous: int, blocks: int, tag: bytes, pool_type: int, state: str,
               quota_process: int | None, note: str = "") -> Allocation:
        """Write one chunk's header and record the chunk (sizes in blocks)."""
        header_type = (pool_type & 0xFF) | IN_USE if state == "Allocated" else 0
        values = {"PreviousSize": previous, "PoolIndex": pool.kind.pool_index, "BlockSize": blocks, "PoolType": header_type}
        self.image.space.write(address, self.header.pack(values, tag, self._billed(address, quota_process)))
        allocation = Allocation(
            address=address,
            size=blocks * BLOCK,
            tag=tag_text(tag),
            pool_type=pool_type,
            pool=pool.kind.name,
            state=state,
            backing="Page",
            region=pool.kind.region,
            previous_size=previous * BLOCK,
            body=address + self.header.size,
            quota_process=quota_process,
            note=note,
        )
        pool.chunks.append(allocation)
        return self.image.manifest.add(allocation)

    def _patch(self, allocation: Allocation, name: str, blocks: int) -> None:
        """Change one size field of a written chunk, in memory and in the manifest."""
        current = self.image.space.read(allocation.address, self.header.size)
        self.image.space.write(allocation.address, self.header.patch(name, blocks, current))
        if name == "BlockSize":
            allocation.size = blocks * BLOCK
        else:
            allocation.previous_size = blocks * BLOCK

    def _billed(self, header: int, process: int | None) -> int | None:
        """ProcessBilled as stored: the process itself, or encoded with the header address and cookie."""
        if process is None or self.quota_cookie is None:
            return process
        return process ^ header ^ self.quota_cookie

    def _grow(self, page: _Page, extra: int) -> None:
        """Coalesce ``extra`` bytes into the page's last chunk, which is free."""
        self._patch(page.last, "BlockSize", (page.last.size + extra) // BLOCK)
        page.used += extra

    def _close(self, pool: _Pool, page: _Page) -> None:
        """The rest of a page is one free chunk (joined to a free last chunk).

        Windows releases a page once all of it is free, so a page whose only
        chunk is free ends with an allocation from the page's pool instead.
        """
        if not page.allocated:
            tag = self._stale_tag(pool)
            self._chunk(pool, page, page.room // BLOCK, tag, pool.kind.pool_type, "Allocated", None)
        elif page.room:
            if page.ends_free:
                self._grow(page, page.room)
            else:
                self._chunk(pool, page, page.room // BLOCK, self._stale_tag(pool), 0, "Free", None)
        pool.open.remove(page)

    def _remember_tag(self, pool: _Pool, tag: bytes) -> None:
        if tag not in pool.stale_tags:
            pool.stale_tags.append(tag)

    def _stale_tag(self, pool: _Pool) -> bytes:
        """Whatever tag an earlier chunk at that spot left behind."""
        return self.rng.choice(pool.stale_tags) if pool.stale_tags else b"Pool"

    def _take_pages(self, pool: _Pool, count: int) -> int:
        if self.rng.random() < GAP_CHANCE:
            pool.cursor += PAGE_SIZE * self.rng.randint(1, 4)
        address = pool.cursor
        if address + count * PAGE_SIZE > pool.end:
            raise MemoryError(f"{pool.kind.region} region is full")
        pool.cursor += count * PAGE_SIZE
        return address

    def _allocate_big(self, pool: _Pool, size: int, tag: bytes, pool_type: int, state: str) -> Allocation:
        """Pages without a header and an entry in the big page table; freed ones leave their VA unmapped.

        A live allocation whose size is not a page multiple returns the rest of its last page to the pool.
        """
        length = self._big_length(size)
        pages = (length + PAGE_SIZE - 1) // PAGE_SIZE
        address = self._take_pages(pool, pages)
        free = state == "Free"
        if not free:
            self.image.space.map_range(address, pages * PAGE_SIZE)
            pool.big_pages += pages
        self.tables.add_big(address, length, tag, pool_type, free)
        if length % PAGE_SIZE and not free:
            self._return_tail(pool, address, length, pool_type)
        allocation = Allocation(
            address=address,
            size=length,
            tag=tag_text(tag),
            pool_type=pool_type,
            pool=pool.kind.name,
            state=state,
            backing="Big",
            region=pool.kind.region,
            body=address,
        )
        return self.image.manifest.add(allocation)

    def _big_length(self, size: int) -> int:
        """The bytes ExpAllocateBigPool takes: 16-byte granular when its kernel returns page tails, else pages."""
        rounded = (size + BLOCK - 1) & ~(BLOCK - 1)
        spare = PAGE_SIZE - size % PAGE_SIZE
        if self.image.flavor.big_pool_tails and BIG_TAIL_MINIMUM <= spare < PAGE_SIZE and rounded < BIG_TAIL_LIMIT:
            return rounded
        return (size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)

    def _return_tail(self, pool: _Pool, big: int, length: int, pool_type: int) -> None:
        """The 'Frag' chunk after a big block's end and the free chunk up to its page end."""
        end = big + length
        frag_type = pool_type & (PAGED | SESSION)
        note = f"tail of the big allocation at {big:#x}"
        self._place(pool, end, 0, FRAG_BLOCKS, FRAG_TAG, frag_type, "Allocated", None, note)
        self.image.space.write_u64(end + self.header.size, length)
        free_at = end + FRAG_BLOCKS * BLOCK
        blocks = (PAGE_SIZE - free_at % PAGE_SIZE) // BLOCK
        free = self._place(pool, free_at, FRAG_BLOCKS, blocks, TAIL_FREE_TAG, 0, "Free", None,
                           f"{NEVER_ALLOCATED}: {note}")
        pool.tails.append(_Tail(free))

    def _tail_for(self, pool: _Pool, blocks: int) -> _Tail | None:
        fitting = [tail for tail in pool.tails if tail.fits(blocks)]
        if fitting and self.rng.random() < TAIL_SHARE:
            return self.rng.choice(fitting)
        return None

    def _split_tail(self, pool: _Pool, tail: _Tail, blocks: int, tag: bytes, pool_type: int,
                    quota_process: int | None) -> Allocation:
        """Serve a request from the end of a returned tail's free chunk."""
        remaining = tail.free.size // BLOCK - blocks
        self._patch(tail.free, "BlockSize", remaining)
        address = tail.free.address + remaining * BLOCK
        allocation = self._place(pool, address, remaining, blocks, tag, pool_type, "Allocated", quota_process)
        if tail.lowest is not None:
            self._patch(tail.lowest, "PreviousSize", blocks)
        tail.lowest = allocation
        self._remember_tag(pool, tag)
        return allocation

    # -- bookkeeping -----------------------------------------------------------
    def finish(self) -> None:
        """Close open pages, link free lists, write descriptors and region variables."""
        if self.finished:
            return
        self.finished = True
        for pool in self.pools.values():
            for page in list(pool.open):
                self._close(pool, page)
        nonpaged_descriptor = self.image.symbol("NonPagedPoolDescriptor")
        descriptor_size = self.image.types.size(POOL_DESCRIPTOR)
        paged = [self.paged_descriptors + index * descriptor_size for index in range(PAGED_POOLS + 1)]
        self._write_descriptor(nonpaged_descriptor, self.pools["NonPaged"], 0)
        self._write_descriptor(paged[0], None, 0)
        self._write_descriptor(paged[PAGED_POOLS], self.pools["Paged"], PAGED_POOLS)
        self._write_globals(nonpaged_descriptor, paged)

    def _write_descriptor(self, address: int, pool: _Pool | None, index: int) -> None:
        """A _POOL_DESCRIPTOR with its statistics and free lists (ListHeads[BlockSize - 1])."""
        types = self.image.types
        size = types.size(POOL_DESCRIPTOR)
        buffer = bytearray(size)
        heads = types.offset(POOL_DESCRIPTOR, "ListHeads")
        entry_size = types.size("_LIST_ENTRY")
        count = types.field(POOL_DESCRIPTOR, "ListHeads").size // entry_size
        flink = types.offset("_LIST_ENTRY", "Flink")
        blink = types.offset("_LIST_ENTRY", "Blink")
        lists: dict[int, list[int]] = {}
        values = {"PoolType": PAGED if pool is None else pool.kind.pool_type, "PoolIndex": index}
        if pool is not None:
            allocated = [chunk for chunk in pool.chunks if chunk.state == "Allocated"]
            free = [chunk for chunk in pool.chunks if chunk.state != "Allocated"]
            freed = [chunk for chunk in free if not chunk.note.startswith(NEVER_ALLOCATED)]
            values.update(self._statistics(allocated, freed, pool))
            for chunk in free:
                blocks = chunk.size // BLOCK
                if 2 <= blocks <= count:
                    lists.setdefault(blocks - 1, []).append(chunk.body)
        types.pack(buffer, 0, POOL_DESCRIPTOR, values)
        for slot in range(count):
            head = address + heads + slot * entry_size
            members = lists.get(slot, [])
            ring = [head, *members]
            for position, node in enumerate(ring):
                following = ring[(position + 1) % len(ring)]
                preceding = ring[position - 1]
                if node == head:
                    base = heads + slot * entry_size
                    buffer[base + flink : base + flink + 8] = following.to_bytes(8, "little")
                    buffer[base + blink : base + blink + 8] = preceding.to_bytes(8, "little")
                else:
                    links = bytearray(entry_size)
                    links[flink : flink + 8] = following.to_bytes(8, "little")
                    links[blink : blink + 8] = preceding.to_bytes(8, "little")
                    self.image.space.write(node, bytes(links))
        self.image.space.write(address, bytes(buffer))

    def _statistics(self, allocated: list[Allocation], freed: list[Allocation], pool: _Pool) -> dict[str, int]:
        """Descriptor counters: Windows 7 keeps outstanding totals, Windows 8 and later running sums each way."""
        live_bytes = sum(chunk.size for chunk in allocated) + pool.big_pages * PAGE_SIZE
        freed_bytes = sum(chunk.size for chunk in freed)
        if self.image.types.has_field(POOL_DESCRIPTOR, "RunningDeAllocs"):
            return {"RunningAllocs": len(allocated) + len(freed), "RunningDeAllocs": len(freed),
                    "TotalPages": len(pool.pages), "TotalBigPages": pool.big_pages, "TotalBytes": live_bytes}
        return {"RunningAllocs": len(allocated) + len(freed), "RunningDeallocs": len(freed),
                "PagesAllocated": len(pool.pages), "BigPagesAllocated": pool.big_pages,
                "BytesAllocated": live_bytes + freed_bytes, "BytesDeallocated": freed_bytes}

    def _write_globals(self, nonpaged_descriptor: int, paged: list[int]) -> None:
        """Region bounds, descriptor pointers and the quota cookie, in the kernel variables this build has."""
        regions = self.image.flavor.regions
        nonpaged_start, nonpaged_size = regions["NonPagedPool"]
        paged_start, paged_size = regions["PagedPool"]
        values = {
            "MmNonPagedPoolStart": nonpaged_start,
            "MiNonPagedPoolStartAligned": nonpaged_start,
            "MiNonPagedPoolEnd": nonpaged_start + nonpaged_size,
            "MmMaximumNonPagedPoolInBytes": nonpaged_size,
            "MmMaximumNonPagedPoolInPages": nonpaged_size // PAGE_SIZE,
            "MmPagedPoolEnd": paged_start + paged_size - 1,
            "MmSizeOfPagedPoolInBytes": paged_size,
            "MmSizeOfPagedPoolInPages": paged_size // PAGE_SIZE,
        }
        space = self.image.space
        for name, value in values.items():
            if self.image.types.has_symbol(name):
                space.write_u64(self.image.symbol(name), value)
        for name, value in (("ExpNumberOfNonPagedPools", 1), ("ExpNumberOfPagedPools", PAGED_POOLS)):
            if self.image.types.has_symbol(name):
                space.write_u32(self.image.symbol(name), value)
        if self.quota_cookie is not None:
            space.write_u64(self.image.symbol(QUOTA_COOKIE), self.quota_cookie)
        if self.image.types.has_symbol("ExpNonPagedPoolDescriptor"):
            space.write_u64(self.image.symbol("ExpNonPagedPoolDescriptor"), nonpaged_descriptor)
        space.write_u64(self.image.symbol("PoolVector"), nonpaged_descriptor)
        space.write_u64(self.image.symbol("PoolVector") + 8, paged[0])
        for index, address in enumerate(paged):
            space.write_u64(self.image.symbol("ExpPagedPoolDescriptor") + 8 * index, address)
