"""--coverage tells why pool pages could not be read: paged out, not in the image, or unmapped.

Each cause is planted in a copy of a sample, in the page table entries of pages that hold allocated chunks
(found by a walk of the image's own tables written here, from the manifest's DTB): a pagefile entry, a present
entry whose frame lies past the end of the image, an empty entry.
"""

from __future__ import annotations

import struct

import pytest

from volplugins.pool import scan, translate
from volplugins.pool.kernel import Kernel
from volrun import VolSession, cli_json

PAGE = 0x1000
PRESENT, LARGE_BIT = 0x1, 0x80
FRAME = 0x0000_0FFF_FFFF_F000
PAGEFILE_ENTRY = 0x5 << 32 | 0x4 << 5 | 0x1 << 1  # offset 5 in pagefile 1, read-write protection, not present
PLANTED = 3  # pages of each cause


def leaf_entry(memory: bytearray, dtb: int, address: int) -> int:
    """File offset of the page table entry that maps ``address`` (a raw image: physical is file offset)."""
    table = dtb
    for shift in (39, 30, 21):
        entry = struct.unpack_from("<Q", memory, table + 8 * ((address >> shift) & 0x1FF))[0]
        assert entry & PRESENT and not entry & LARGE_BIT
        table = entry & FRAME
    return table + 8 * ((address >> 12) & 0x1FF)


def chunk_pages(manifest: dict, backings: tuple[str, ...]) -> list[int]:
    """Pages holding allocated chunks of these backings, one per 64 KiB so that no two share a heap structure."""
    pages = sorted({a["address"] & ~(PAGE - 1) for a in manifest["allocations"]
                    if a["state"] == "Allocated" and a["backing"] in backings})
    spread = {page >> 16: page for page in pages}
    return sorted(spread.values())[1 : 1 + 3 * PLANTED]


def plant(sample, folder):
    """A copy of the sample with PLANTED pages of each cause; returns the image path."""
    memory = bytearray(sample.image.read_bytes())
    backings = ("VS", "LFH") if sample.segment_heap else ("Page",)
    pages = chunk_pages(sample.manifest, backings)
    assert len(pages) == 3 * PLANTED
    for number, page in enumerate(pages):
        slot = leaf_entry(memory, sample.manifest["dtb"], page)
        entry = {0: PAGEFILE_ENTRY, 1: len(memory) + number * PAGE | 0x63, 2: 0}[number % 3]
        struct.pack_into("<Q", memory, slot, entry)
    image = folder / sample.image.name
    image.write_bytes(memory)
    return image


def coverage(image, cache) -> dict:
    rows = cli_json("-f", str(image), "windows.poolcensus", "--coverage", cache_dir=cache)
    return {row["Measure"]: row["Value"] for row in rows}


@pytest.fixture(scope="module")
def planted(samples, tmp_path_factory) -> dict:
    """flavor -> (planted image, its own cache directory)"""
    made = {}
    for flavor in ("win7-sp1", "win10-19041"):
        folder = tmp_path_factory.mktemp(f"planted-{flavor}")
        (folder / "cache").mkdir()
        made[flavor] = (plant(samples[flavor], folder), folder / "cache")
    return made


@pytest.mark.parametrize("flavor", ["win7-sp1", "win10-19041"])
def test_coverage_counts_unreadable_pages_by_cause(samples, planted, flavor):
    sample = samples[flavor]
    before = coverage(sample.image, sample.cache)
    after = coverage(*planted[flavor])
    assert (before["pages_paged_out"], before["pages_not_in_image"]) == (0, 0)
    assert (after["pages_paged_out"], after["pages_not_in_image"]) == (PLANTED, PLANTED)
    if sample.segment_heap:
        assert after["pages_unmapped"] == before["pages_unmapped"] + PLANTED
    else:
        assert before["pages_unmapped"] is after["pages_unmapped"] is None
    for measures in (before, after):
        causes = measures["pages_paged_out"] + measures["pages_not_in_image"] + (measures["pages_unmapped"] or 0)
        assert measures["pages_unreadable"] == causes


def test_layer_translating_itself_tells_the_same_causes(planted, monkeypatch):
    """Where the kernel layer is not read in bulk, its own refusals tell the causes of a segment heap's missing
    pages alike."""
    session = VolSession(*planted["win10-19041"])
    session.rows("windows.info.Info")
    kernel = Kernel.from_module(session.context, session.kernel_module)
    bulk = scan.scan_pools(kernel).coverage
    monkeypatch.setattr(translate, "page_tables", lambda context, layer_name: None)
    own = scan.scan_pools(kernel).coverage
    causes = lambda found: (found.pages_paged_out, found.pages_not_in_image, found.pages_unmapped)  # noqa: E731
    assert causes(own) == causes(bulk) and bulk.pages_paged_out == bulk.pages_not_in_image == PLANTED
