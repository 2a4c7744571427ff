"""What a running system's pools hold: tags, sizes and pool types to allocate.

Each profile is a tag with the pool it comes from, a size range of requests
and a relative weight; a share of every tag's chunks is freed so free chunks
carry stale tags, as on a live system.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TagProfile:
    tag: bytes
    pool: str  # NonPaged, NonPagedNx, Paged, Session
    min_size: int
    max_size: int
    weight: int


PROFILES = (
    TagProfile(b"MmCi", "NonPagedNx", 0x40, 0x600, 6),
    TagProfile(b"MmSt", "Paged", 0x60, 0x300, 8),
    TagProfile(b"MmCa", "NonPagedNx", 0x40, 0x180, 5),
    TagProfile(b"Ntfx", "NonPagedNx", 0x60, 0x200, 6),
    TagProfile(b"NtFs", "Paged", 0x20, 0x400, 7),
    TagProfile(b"Ntff", "Paged", 0x100, 0x400, 4),
    TagProfile(b"FMfn", "Paged", 0x80, 0x300, 5),
    TagProfile(b"FMsl", "NonPagedNx", 0x40, 0x100, 3),
    TagProfile(b"CM31", "Paged", 0x20, 0x800, 8),
    TagProfile(b"CM25", "Paged", 0x200, 0xF00, 3),
    TagProfile(b"CMNb", "Paged", 0x20, 0x100, 4),
    TagProfile(b"ObNm", "Paged", 0x20, 0x100, 4),
    TagProfile(b"ObSq", "Paged", 0x20, 0x80, 3),
    TagProfile(b"SeAt", "Paged", 0x40, 0x100, 4),
    TagProfile(b"Toke", "Paged", 0x300, 0x800, 3),
    TagProfile(b"Sect", "Paged", 0x30, 0x80, 3),
    TagProfile(b"Vad ", "NonPagedNx", 0x40, 0x80, 6),
    TagProfile(b"VadS", "NonPagedNx", 0x40, 0x60, 4),
    TagProfile(b"VadF", "NonPagedNx", 0x50, 0x80, 2),
    TagProfile(b"Even", "NonPagedNx", 0x40, 0x60, 6),
    TagProfile(b"Muta", "NonPagedNx", 0x50, 0x70, 2),
    TagProfile(b"Sema", "NonPagedNx", 0x48, 0x60, 2),
    TagProfile(b"Irp ", "NonPagedNx", 0x100, 0x400, 4),
    TagProfile(b"Mdl ", "NonPagedNx", 0x30, 0x200, 3),
    TagProfile(b"ALPC", "NonPagedNx", 0x80, 0x200, 3),
    TagProfile(b"AlMs", "Paged", 0x100, 0x300, 2),
    TagProfile(b"Wait", "NonPagedNx", 0x20, 0x40, 2),
    TagProfile(b"Key ", "Paged", 0x60, 0xC0, 3),
    TagProfile(b"Ntf0", "NonPagedNx", 0x30, 0x100, 2),
    TagProfile(b"TcpE", "NonPagedNx", 0x200, 0x600, 2),
    TagProfile(b"TcpL", "NonPagedNx", 0x100, 0x300, 1),
    TagProfile(b"UdpA", "NonPagedNx", 0x100, 0x200, 1),
    TagProfile(b"AfdE", "NonPagedNx", 0x80, 0x200, 2),
    TagProfile(b"NDnb", "NonPagedNx", 0x200, 0x800, 1),
    TagProfile(b"Dma ", "NonPaged", 0x200, 0x300, 1),
    TagProfile(b"IoNm", "Paged", 0x40, 0x200, 3),
    TagProfile(b"Io  ", "NonPagedNx", 0x20, 0x100, 2),
    TagProfile(b"Gla5", "Session", 0x40, 0x200, 2),
    TagProfile(b"Gh15", "Session", 0x60, 0x300, 2),
    TagProfile(b"Usqm", "Session", 0x20, 0x100, 1),
    TagProfile(b"PfTt", "Paged", 0x200, 0x900, 1),
    TagProfile(b"EtwB", "NonPagedNx", 0x400, 0xF00, 1),
    TagProfile(b"smBt", "NonPagedNx", 0x30, 0x100, 1),
    TagProfile(b"Wdf0", "NonPagedNx", 0x80, 0x400, 2),
    TagProfile(b"Cont", "NonPaged", 0x800, 0xF00, 1),
)

# Requests above a page minus a header leave the small-chunk allocators.
BIG_PROFILES = (
    TagProfile(b"MmRe", "Paged", 0x1000, 0x10000, 2),
    TagProfile(b"CM16", "Paged", 0x1000, 0x8000, 2),
    TagProfile(b"EtwB", "NonPagedNx", 0x2000, 0x20000, 1),
    TagProfile(b"ConT", "NonPagedNx", 0x1000, 0x6000, 1),
    TagProfile(b"Ntfr", "NonPagedNx", 0x1000, 0x3000, 1),
)

FREE_SHARE = 0.18
