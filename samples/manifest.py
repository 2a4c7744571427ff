"""Ground truth of a synthetic image, written next to it as JSON.

Addresses are canonical 64-bit integers in the JSON (pipelines compare them
numerically); tags are 4-character strings with non-ASCII bytes as ``\\xNN``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


def tag_text(tag: bytes) -> str:
    return "".join(chr(b) if 32 <= b < 127 and b != 0x5C else f"\\x{b:02x}" for b in tag)


@dataclass
class Allocation:
    address: int  # pool header (or first byte of a big/large allocation)
    size: int  # bytes as !pool prints them: BlockSize * 16, or the big allocation's size
    tag: str
    pool_type: int  # POOL_TYPE as requested (0 NonPaged, 1 Paged, 0x200 NonPagedNx, | 4 cache aligned, | 8 quota)
    pool: str  # NonPaged, NonPagedNx, Paged, Session
    state: str  # Allocated, Free, Cached-free
    backing: str  # Page, VS, LFH, Big, Large
    region: str
    previous_size: int = 0
    body: int = 0  # first byte the caller received
    quota_process: int | None = None  # _EPROCESS charged, when quota charged
    note: str = ""
    # A free VS chunk (its tag: the encoded chunk header's bytes): the tag of the first pool header its free header
    # left intact, "" when none; None for every other chunk (a classic or LFH free chunk keeps it as its tag)
    stale_tag: str | None = None


@dataclass
class Manifest:
    flavor: str
    seed: int
    kernel_base: int = 0
    dtb: int = 0
    build: dict = field(default_factory=dict)
    regions: list[dict] = field(default_factory=list)
    allocations: list[Allocation] = field(default_factory=list)
    big_pages: list[dict] = field(default_factory=list)
    tracker: list[dict] = field(default_factory=list)
    objects: list[dict] = field(default_factory=list)
    drivers: list[dict] = field(default_factory=list)
    extras: dict = field(default_factory=dict)

    def add(self, allocation: Allocation) -> Allocation:
        self.allocations.append(allocation)
        return allocation

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)
