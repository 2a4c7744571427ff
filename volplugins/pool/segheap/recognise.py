"""Whether the image's segment heap uses the constants this library knows.

The kernel mixes constants that no symbol table holds into the words it protects: a key in the page segment
signature, a key in the VS subsegment signature, the shift applied to the LFH block-offset key.  Builds have
changed them (26100 dropped the page segment constant and shifts the whole LFH subsegment address), so the
walkers accept each form a known build uses.  When not one structure of a kind in the image matches a known
form, the build uses one this library does not know and every chunk of that kind would be a guess: the
plugins then say ``layout of build N not recognised: ...`` instead of naming owners.
"""

from __future__ import annotations

import itertools

from ..kernel import Kernel, per_kernel
from ..model import Finding
from .decoders import RangeKind, vs_subsegment_signature_ok
from .heaps import PoolHeap, heap_keys, pool_heaps
from .layout import SYMBOLS_MISSING, SegHeapLayout, layout_of
from .lfh import plausible_lfh_offsets
from .reads import read_field
from .segments import SIGNATURE_MISMATCH, PageRange, Segment, page_ranges, segments
from .validation import validated_segments

SAMPLED = 16  # structures of each kind looked at


@per_kernel
def layout_problem(kernel: Kernel) -> str | None:
    """``layout of build N not recognised: ...`` when a kind of structure matches no known form, else None."""
    try:
        problems = _problems(kernel)
    except SYMBOLS_MISSING:
        return None  # the walkers name the missing symbols themselves
    if not problems:
        return None
    return f"layout of build {kernel.build_number or 'unknown'} not recognised: {'; '.join(problems)}"


def _problems(kernel: Kernel) -> list[str]:
    keys = heap_keys(kernel)
    if isinstance(keys, Finding):
        return []
    found = pool_heaps(kernel)
    heaps = [heap for heap in found if isinstance(heap, PoolHeap)]
    good: list[Segment] = []
    mismatched = 0
    for heap in heaps:
        for item in itertools.islice(segments(kernel, heap, keys.heap_key), SAMPLED):
            if isinstance(item, Segment):
                good.append(item)
            mismatched += isinstance(item, Finding) and item.reason == SIGNATURE_MISMATCH
    if not good:
        good = list(validated_segments(kernel, keys.heap_key)[:SAMPLED])
    if not good and not heaps:
        return ["no heap under ExPoolState carries the _SEGMENT_HEAP signature"] if found else []
    if not good:
        return ["no _HEAP_PAGE_SEGMENT signature decodes with a known key"] if mismatched else []
    ranges = [r for segment in good[:SAMPLED] for r in page_ranges(kernel, segment) if isinstance(r, PageRange)]
    layout = layout_of(kernel)
    problems = []
    vs = [r for r in ranges if r.kind is RangeKind.VS][:SAMPLED]
    if vs and not any(_vs_signature_ok(kernel, r) for r in vs):
        problems.append("no _HEAP_VS_SUBSEGMENT signature matches its size with a known key")
    lfh = [r for r in ranges if r.kind is RangeKind.LFH][:SAMPLED]
    if lfh and not any(_lfh_offsets_ok(kernel, r, keys.lfh_key, layout) for r in lfh):
        problems.append("no LFH BlockOffsets decode with a known key")
    return problems


def _vs_signature_ok(kernel: Kernel, page_range: PageRange) -> bool:
    size = read_field(kernel, page_range.address, "_HEAP_VS_SUBSEGMENT", "Size")
    signature = read_field(kernel, page_range.address, "_HEAP_VS_SUBSEGMENT", "Signature")
    return size is not None and signature is not None and vs_subsegment_signature_ok(size, signature)


def _lfh_offsets_ok(kernel: Kernel, page_range: PageRange, lfh_key: int, layout: SegHeapLayout) -> bool:
    sub_type = "_HEAP_LFH_SUBSEGMENT"
    encoded = read_field(kernel, page_range.address, sub_type, "BlockOffsets.EncodedData")
    count = read_field(kernel, page_range.address, sub_type, "BlockCount")
    if encoded is None or count is None:
        return False
    bitmap = kernel.field_offset(sub_type, "BlockBitmap")
    decoded = plausible_lfh_offsets(encoded, lfh_key, page_range.address, layout, bitmap, count, page_range.size)
    return decoded is not None
