"""A segment-heap segment list with a broken link loses only what lies behind both of its directions.

The census reaches segments through each segment context's circular list; a
smeared or unmapped Flink in the middle used to cost every segment after it.
"""

from __future__ import annotations

import shutil
import struct

import pytest

from conftest import FLAVORS
from samples.flavors import FLAVORS as FLAVOR_SPECS
from test_poolcensus import DEFAULTS
from volplugins.pool import segheap
from volplugins.pool.model import Finding
from volrun import VolSession, raw_tag_text

CENSUS = "windows.poolcensus.PoolCensus"
SEGMENT_HEAP = [flavor for flavor in FLAVORS if FLAVOR_SPECS[flavor].segment_heap]
UNMAPPED = 0xFFFF_F6FB_7DBE_D000  # canonical kernel-half address no sample maps


def _longest_list(kernel) -> list[segheap.Segment]:
    """The segments of the context with the most of them (at least three, so one sits in the middle)."""
    by_context: dict[int, list[segheap.Segment]] = {}
    for heap in segheap.pool_heaps(kernel):
        if isinstance(heap, Finding):
            continue
        for segment in segheap.segments(kernel, heap):
            if not isinstance(segment, Finding):
                by_context.setdefault(segment.context.address, []).append(segment)
    return max(by_context.values(), key=len)


@pytest.mark.parametrize("flavor", SEGMENT_HEAP)
def test_a_broken_forward_link_is_walked_around(samples, tmp_path, flavor):
    sample = samples[flavor]
    kernel = sample.kernel
    listed = _longest_list(kernel)
    assert len(listed) >= 3
    middle = listed[len(listed) // 2]
    link = middle.address + kernel.field_offset("_HEAP_PAGE_SEGMENT", "ListEntry.Flink")
    (_, _, offset, _, _), = list(kernel.layer.mapping(link, 8))
    image = tmp_path / "broken-link.raw"
    shutil.copyfile(sample.image, image)
    with open(image, "r+b") as handle:
        handle.seek(offset)
        handle.write(struct.pack("<Q", UNMAPPED))
    session = VolSession(image, tmp_path / "cache")
    rows = session.rows(CENSUS, **DEFAULTS)
    chunks = {(r["Address"], r["Size"], raw_tag_text(r), r["State"]) for r in rows if r["Address"] is not None}
    segment_size = {segment.address: segment.size for segment in listed}
    inside = [a for a in sample.manifest["allocations"]
              if any(start <= a["address"] < start + size for start, size in segment_size.items())]
    assert len(inside) > 100
    lost = [a for a in inside if (a["address"], a["size"], a["tag"], a["state"]) not in chunks]
    assert lost == []
    problems = " ".join(str(value) for row in session.rows(CENSUS, **(DEFAULTS | {"validate": True}))
                        for value in row.values())
    assert "segment list broken going forward" in problems
