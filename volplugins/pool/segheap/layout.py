"""What the segment heap walkers know of one kernel: the structure layout from its ISF, and how a missing
type becomes a finding."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from ..kernel import SYMBOLS_MISSING, FieldLayout, IsfTypes, Kernel, per_kernel
from ..model import Finding
from ..poolheader import HeaderLayout, Symbols


def reports_missing_symbols(walker):
    """A walker over a kernel whose ISF lacks a segment heap type yields a Finding instead of raising."""

    @functools.wraps(walker)
    def guarded(kernel, *args, **kwargs):
        try:
            yield from walker(kernel, *args, **kwargs)
        except SYMBOLS_MISSING as error:
            yield Finding(0, f"{walker.__name__}: kernel symbols lack {error}")

    return guarded


@dataclass(frozen=True)
class SegHeapLayout:
    """The bits of the segment heap and pool header the decoders need, taken from one kernel's ISF."""

    vs_header_size: int  # sizeof(_HEAP_VS_CHUNK_HEADER)
    vs_header_bits: FieldLayout  # _HEAP_VS_CHUNK_HEADER.Sizes.HeaderBits, the encoded word
    vs_memory_cost: FieldLayout  # relative to _HEAP_VS_CHUNK_HEADER_SIZE
    vs_unsafe_size: FieldLayout
    vs_unsafe_prev_size: FieldLayout
    vs_allocated: FieldLayout
    vs_subsegment_size: int  # sizeof(_HEAP_VS_SUBSEGMENT)
    vs_sub_size: FieldLayout
    vs_sub_signature: FieldLayout
    lfh_block_size: FieldLayout  # relative to _HEAP_LFH_SUBSEGMENT_ENCODED_OFFSETS
    lfh_first_block_offset: FieldLayout
    pool: HeaderLayout

    @property
    def unit(self) -> int:
        """The pool block unit: sizeof(_POOL_HEADER), 16 on x64."""
        return self.pool.size

    @classmethod
    def from_isf(cls, isf: dict) -> "SegHeapLayout":
        return cls.from_symbols(IsfTypes(isf))

    @classmethod
    def from_kernel(cls, kernel: Kernel) -> "SegHeapLayout":
        return layout_of(kernel)

    @classmethod
    def from_symbols(cls, symbols: Symbols) -> "SegHeapLayout":
        size_type, offsets_type = "_HEAP_VS_CHUNK_HEADER_SIZE", "_HEAP_LFH_SUBSEGMENT_ENCODED_OFFSETS"
        field = symbols.field_layout
        return cls(
            vs_header_size=symbols.type_size("_HEAP_VS_CHUNK_HEADER"),
            vs_header_bits=field("_HEAP_VS_CHUNK_HEADER", "Sizes.HeaderBits"),
            vs_memory_cost=field(size_type, "MemoryCost"),
            vs_unsafe_size=field(size_type, "UnsafeSize"),
            vs_unsafe_prev_size=field(size_type, "UnsafePrevSize"),
            vs_allocated=field(size_type, "Allocated"),
            vs_subsegment_size=symbols.type_size("_HEAP_VS_SUBSEGMENT"),
            vs_sub_size=field("_HEAP_VS_SUBSEGMENT", "Size"),
            vs_sub_signature=field("_HEAP_VS_SUBSEGMENT", "Signature"),
            lfh_block_size=field(offsets_type, "BlockSize"),
            lfh_first_block_offset=field(offsets_type, "FirstBlockOffset"),
            pool=HeaderLayout.from_symbols(symbols),
        )


@per_kernel
def layout_of(kernel: Kernel) -> SegHeapLayout:
    return SegHeapLayout.from_symbols(kernel)
