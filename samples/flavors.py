"""The Windows builds the generator can model.

Each flavor names the real kernel ISF it lays structures out with and the
facts of that build that no ISF holds: version numbers, the PML4 self-map
index, where the kernel and each pool region sit in the address space.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SYMBOLS = Path(__file__).resolve().parent.parent / "symbols" / "windows" / "ntkrnlmp.pdb"


@dataclass(frozen=True)
class Flavor:
    name: str
    isf_file: str
    major: int
    minor: int
    build: int
    nt_major: int  # NtMajorVersion in KUSER_SHARED_DATA
    nt_minor: int
    segment_heap: bool
    self_map_index: int
    kernel_base: int
    # Whether the build reproduces the seed ``!pool`` transcript (a VS page at 0xffffdc0155e94000).
    seed_page: bool = False
    # Windows 7 sets the high bit of object tags ("protected" allocations); later builds do not.
    protected_object_tags: bool = False
    # Windows 8 and later (classic pool): ExpAllocateBigPool rounds a big request below 64 KiB to 16 bytes
    # and hands the rest of its last page back to the pool, behind a 'Frag' chunk.  Windows 7 takes whole pages.
    big_pool_tails: bool = False
    # Kernel virtual-address regions: name -> (base, size).  Pool allocations
    # are placed inside the pool regions; the rest exist so lookups of
    # non-pool addresses have something real to name.
    regions: dict[str, tuple[int, int]] = field(default_factory=dict)
    # Where the ISF lives: the bundled symbols, or a directory of a build no flavor models (unseen.py).
    isf_dir: Path = SYMBOLS
    # Segment heap constants no ISF holds: mixed into _HEAP_PAGE_SEGMENT.Signature (0 from build 26100),
    # into _HEAP_VS_SUBSEGMENT.Signature, and whether the LFH BlockOffsets key shifts the whole subsegment
    # address rather than its low 32 bits (build 26100).
    page_segment_key: int = 0xA2E64EADA2E64EAD
    vs_subsegment_key: int = 0x2BED
    lfh_full_address_shift: bool = False

    @property
    def isf_path(self) -> Path:
        return self.isf_dir / self.isf_file


WIN10_19041 = Flavor(
    name="win10-19041",
    isf_file="606FF669409B00F7FC8C61A9C1670129-1.json.xz",
    major=10,
    minor=0,
    build=19041,
    nt_major=10,
    nt_minor=0,
    segment_heap=True,
    self_map_index=0x1A3,
    kernel_base=0xFFFFF80563A00000,
    seed_page=True,
    regions={
        "NonPagedPool": (0xFFFFDC0000000000, 0x100_0000_0000),
        "PagedPool": (0xFFFFB90000000000, 0x100_0000_0000),
        "Session": (0xFFFFF98000000000, 0x8_0000_0000),
        "SystemPtes": (0xFFFFF08000000000, 0x10_0000_0000),
        "KernelStacks": (0xFFFFF28000000000, 0x10_0000_0000),
        "SystemImages": (0xFFFFF80000000000, 0x8_0000_0000),
        "PfnDatabase": (0xFFFFE50000000000, 0x10_0000_0000),
    },
)

WIN7_SP1 = Flavor(
    name="win7-sp1",
    isf_file="339E74133576439CBCDF7E0229DA3773-1.json.xz",
    major=6,
    minor=1,
    build=7601,
    nt_major=6,
    nt_minor=1,
    segment_heap=False,
    self_map_index=0x1ED,
    kernel_base=0xFFFFF80002A0F000,
    protected_object_tags=True,
    regions={
        # Nonpaged pool follows the PFN database (sized here for 1 GiB of RAM) and may
        # grow to 75% of RAM; paged pool and session space sit at fixed addresses.
        "NonPagedPool": (0xFFFFFA8000C00000, 0x3000_0000),
        "PagedPool": (0xFFFFF8A000000000, 0x20_0000_0000),
        "Session": (0xFFFFF90000000000, 0x8_0000_0000),
        "SystemPtes": (0xFFFFF88000000000, 0x20_0000_0000),
        "SystemImages": (0xFFFFF80000000000, 0x8_0000_0000),
        "PfnDatabase": (0xFFFFFA8000000000, 0xC0_0000),
    },
)

WIN11_22000 = Flavor(
    name="win11-22000",
    isf_file="0CE4A95C0CD782A7596B034D8648E585-1.json.xz",
    major=10,
    minor=0,
    build=22000,
    nt_major=10,
    nt_minor=0,
    segment_heap=True,
    self_map_index=0x12D,
    kernel_base=0xFFFFF8025C800000,
    regions={
        "NonPagedPool": (0xFFFFA10000000000, 0x100_0000_0000),
        "PagedPool": (0xFFFFC80000000000, 0x100_0000_0000),
        "Session": (0xFFFFF68000000000, 0x8_0000_0000),
        "SystemPtes": (0xFFFFD30000000000, 0x10_0000_0000),
        "KernelStacks": (0xFFFFD50000000000, 0x10_0000_0000),
        "SystemImages": (0xFFFFF80000000000, 0x8_0000_0000),
        "PfnDatabase": (0xFFFFB60000000000, 0x10_0000_0000),
    },
)

WIN10_1809 = Flavor(
    name="win10-1809",
    isf_file="8CFB49428DC86A330CE257778E0C2F93-1.json.xz",
    major=10,
    minor=0,
    build=17763,
    nt_major=10,
    nt_minor=0,
    segment_heap=False,
    self_map_index=0x1C4,
    kernel_base=0xFFFFF80174A00000,
    big_pool_tails=True,
    regions={
        # Classic pool on a Windows 10 kernel: regions are assigned at boot like later builds.
        "NonPagedPool": (0xFFFFB30000000000, 0x100_0000_0000),
        "PagedPool": (0xFFFFD78000000000, 0x100_0000_0000),
        "Session": (0xFFFFF18000000000, 0x8_0000_0000),
        "SystemPtes": (0xFFFFCE0000000000, 0x10_0000_0000),
        "KernelStacks": (0xFFFFCF0000000000, 0x10_0000_0000),
        "SystemImages": (0xFFFFF80000000000, 0x8_0000_0000),
        "PfnDatabase": (0xFFFFAA0000000000, 0x10_0000_0000),
    },
)

WIN81_9600 = Flavor(
    name="win81-9600",
    isf_file="22597D0B40394E23936F6A24C6C52D5B-1.json.xz",
    major=6,
    minor=3,
    build=9600,
    nt_major=6,
    nt_minor=3,
    segment_heap=False,
    self_map_index=0x1ED,
    kernel_base=0xFFFFF80231E7A000,
    big_pool_tails=True,
    regions={
        # Windows 8.1 x64 (128 TiB of kernel space) gives each pool a fixed 16 TiB slot; session
        # space, the PFN database and the loader's image slot stay where Windows 7 had them.
        "NonPagedPool": (0xFFFFE00000000000, 0x1000_0000_0000),
        "PagedPool": (0xFFFFC00000000000, 0x1000_0000_0000),
        "Session": (0xFFFFF90000000000, 0x8_0000_0000),
        "SystemPtes": (0xFFFFD00000000000, 0x1000_0000_0000),
        "SystemImages": (0xFFFFF80000000000, 0x8_0000_0000),
        "PfnDatabase": (0xFFFFFA8000000000, 0xC0_0000),
    },
)

WIN10_18362 = Flavor(
    name="win10-18362",
    isf_file="35A038B1F6E2E8CAF642111E6EC66F57-1.json.xz",
    major=10,
    minor=0,
    build=18362,
    nt_major=10,
    nt_minor=0,
    segment_heap=True,
    self_map_index=0x1B6,
    kernel_base=0xFFFFF8033C400000,
    regions={
        "NonPagedPool": (0xFFFF8C0000000000, 0x100_0000_0000),
        "PagedPool": (0xFFFFA48000000000, 0x100_0000_0000),
        "Session": (0xFFFFF48000000000, 0x8_0000_0000),
        "SystemPtes": (0xFFFF9A0000000000, 0x10_0000_0000),
        "KernelStacks": (0xFFFFB80000000000, 0x10_0000_0000),
        "SystemImages": (0xFFFFF80000000000, 0x8_0000_0000),
        "PfnDatabase": (0xFFFFC18000000000, 0x10_0000_0000),
    },
)

SRV2022_20348 = Flavor(
    name="srv2022-20348",
    isf_file="879AD95F3461091BB6318FA98072AD8E-1.json.xz",
    major=10,
    minor=0,
    build=20348,
    nt_major=10,
    nt_minor=0,
    segment_heap=True,
    self_map_index=0x14F,
    kernel_base=0xFFFFF80722200000,
    regions={
        "NonPagedPool": (0xFFFFC30000000000, 0x100_0000_0000),
        "PagedPool": (0xFFFFAE0000000000, 0x100_0000_0000),
        "Session": (0xFFFFF38000000000, 0x8_0000_0000),
        "SystemPtes": (0xFFFFBF0000000000, 0x10_0000_0000),
        "KernelStacks": (0xFFFF9F8000000000, 0x10_0000_0000),
        "SystemImages": (0xFFFFF80000000000, 0x8_0000_0000),
        "PfnDatabase": (0xFFFFE08000000000, 0x10_0000_0000),
    },
)

FLAVORS = {
    flavor.name: flavor
    for flavor in (WIN10_19041, WIN7_SP1, WIN11_22000, WIN10_1809, WIN81_9600, WIN10_18362, SRV2022_20348)
}
