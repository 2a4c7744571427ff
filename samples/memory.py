"""Physical memory and x64 four-level page tables of a synthetic image.

The image is a raw dump of physical memory.  Virtual pages are mapped on
first use to physical pages taken in address order from a pool of free frames,
so a seed always produces the same bytes.  The PML4 lives where Volatility 3's
DTB scan looks for it and maps itself at a chosen PML4 index, as Windows does.
"""

from __future__ import annotations

import struct

PAGE_SIZE = 0x1000
PRESENT_RW = 0x3  # present | writable
PRESENT_RW_NX = PRESENT_RW | (1 << 63)
ADDRESS_MASK = 0x000F_FFFF_FFFF_F000

# Volatility 3 scans [0x150000, 0x2A0000) (among others) for a self-referencing PML4.
DTB_PHYSICAL = 0x1AA000
# Low frames kept free of page tables: real firmware and boot data sit there.
FIRST_FREE_FRAME = 0x200000


def canonical(address: int) -> int:
    """Sign-extend a 48-bit virtual address to its canonical 64-bit form."""
    address &= (1 << 48) - 1
    return address | 0xFFFF_0000_0000_0000 if address & (1 << 47) else address


class AddressSpace:
    """A physical memory image with one kernel address space mapped into it."""

    def __init__(self, physical_size: int, self_map_index: int):
        if physical_size % PAGE_SIZE:
            raise ValueError("image size must be a multiple of the page size")
        self.physical = bytearray(physical_size)
        self.dtb = DTB_PHYSICAL
        self.self_map_index = self_map_index
        self._next_frame = FIRST_FREE_FRAME
        self._mapped: dict[int, int] = {}  # virtual page -> physical frame
        self._write_entry(self.dtb, self_map_index, self.dtb | PRESENT_RW_NX)

    # -- physical frames ---------------------------------------------------
    def allocate_frame(self) -> int:
        frame = self._next_frame
        if frame == self.dtb:
            frame += PAGE_SIZE
        if frame + PAGE_SIZE > len(self.physical):
            raise MemoryError("synthetic image is full: choose a larger --size")
        self._next_frame = frame + PAGE_SIZE
        return frame

    @property
    def frames_used(self) -> int:
        return (self._next_frame - FIRST_FREE_FRAME) // PAGE_SIZE

    def _write_entry(self, table: int, index: int, value: int) -> None:
        struct.pack_into("<Q", self.physical, table + index * 8, value)

    def _read_entry(self, table: int, index: int) -> int:
        return struct.unpack_from("<Q", self.physical, table + index * 8)[0]

    # -- mapping -----------------------------------------------------------
    def map_page(self, virtual: int, frame: int | None = None) -> int:
        """Map the page holding ``virtual`` (to ``frame`` or a new frame); return its frame."""
        page = canonical(virtual) & ~(PAGE_SIZE - 1)
        if page in self._mapped:
            if frame is not None and self._mapped[page] != frame:
                raise ValueError(f"page {page:#x} is already mapped elsewhere")
            return self._mapped[page]
        table = self.dtb
        for shift in (39, 30, 21):
            index = (page >> shift) & 0x1FF
            entry = self._read_entry(table, index)
            if not entry & 1:
                entry = self.allocate_frame() | PRESENT_RW
                self._write_entry(table, index, entry)
            table = entry & ADDRESS_MASK
        if frame is None:
            frame = self.allocate_frame()
        self._write_entry(table, (page >> 12) & 0x1FF, frame | PRESENT_RW)
        self._mapped[page] = frame
        return frame

    def map_range(self, virtual: int, size: int) -> None:
        page = virtual & ~(PAGE_SIZE - 1)
        while page < virtual + size:
            self.map_page(page)
            page += PAGE_SIZE

    def is_mapped(self, virtual: int) -> bool:
        return canonical(virtual) & ~(PAGE_SIZE - 1) in self._mapped

    def translate(self, virtual: int) -> int:
        page = canonical(virtual) & ~(PAGE_SIZE - 1)
        return self._mapped[page] + (virtual & (PAGE_SIZE - 1))

    # -- access ------------------------------------------------------------
    def write(self, virtual: int, data: bytes) -> None:
        """Write ``data`` at ``virtual``, mapping any page it touches."""
        position = 0
        while position < len(data):
            address = virtual + position
            self.map_page(address)
            room = PAGE_SIZE - (address & (PAGE_SIZE - 1))
            piece = data[position : position + room]
            physical = self.translate(address)
            self.physical[physical : physical + len(piece)] = piece
            position += len(piece)

    def read(self, virtual: int, size: int) -> bytes:
        out = bytearray()
        while len(out) < size:
            address = virtual + len(out)
            room = min(PAGE_SIZE - (address & (PAGE_SIZE - 1)), size - len(out))
            if self.is_mapped(address):
                physical = self.translate(address)
                out += self.physical[physical : physical + room]
            else:
                out += bytes(room)
        return bytes(out)

    def write_u64(self, virtual: int, value: int) -> None:
        self.write(virtual, struct.pack("<Q", value & 0xFFFF_FFFF_FFFF_FFFF))

    def write_u32(self, virtual: int, value: int) -> None:
        self.write(virtual, struct.pack("<I", value & 0xFFFF_FFFF))

    def save(self, path) -> None:
        with open(path, "wb") as handle:
            handle.write(self.physical)
