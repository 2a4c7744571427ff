"""Heap discovery: the heap keys, the pool heaps under ``ExPoolState``, and the blocks parked in its lookasides."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .. import translate
from ..kernel import FieldLayout, Kernel, per_kernel
from ..model import Finding
from .layout import SYMBOLS_MISSING
from .reads import read_bytes, read_field, read_pointer

SEGMENT_HEAP_SIGNATURE = 0xDDEEDDEE
HEAP_POOL_NAMES = ("NonPaged", "NonPagedNx", "Paged", "Paged")  # by index in PoolNode[i].Heaps / SpecialHeaps
MAX_SLIST_ENTRIES = 1 << 12  # per lookaside / delay-free list

vollog = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeapKeys:
    heap_key: int
    lfh_key: int


@per_kernel
def heap_keys(kernel: Kernel) -> HeapKeys | Finding:
    """``RtlpHpHeapGlobals.{HeapKey, LfhKey}`` (read once per kernel).  Every segment heap header is encoded with
    them: without them no segment heap chunk can be read, which one warning says."""
    keys = _heap_keys(kernel)
    if isinstance(keys, Finding):
        vollog.warning("segment heap keys unreadable (%s): no segment heap chunk can be decoded", keys.reason)
    return keys


def _heap_keys(kernel: Kernel) -> HeapKeys | Finding:
    """Found through ``ExPoolState.HeapManager.Globals`` when ``RtlpHpHeapGlobals`` is unnamed."""
    globals_type = "_RTLP_HP_HEAP_GLOBALS"
    try:
        if kernel.has_symbol("RtlpHpHeapGlobals"):
            address: int | None = kernel.symbol_address("RtlpHpHeapGlobals")
        else:
            pointer_at = kernel.symbol_address("ExPoolState")
            pointer_at += kernel.field_offset("_EX_POOL_HEAP_MANAGER_STATE", "HeapManager.Globals")
            address = read_pointer(kernel, pointer_at)
        if address is None:
            return Finding(0, "RtlpHpHeapGlobals: pointer in ExPoolState unreadable")
        heap_key = read_field(kernel, address, globals_type, "HeapKey")
        lfh_key = read_field(kernel, address, globals_type, "LfhKey")
    except SYMBOLS_MISSING as error:
        return Finding(0, f"segment heap keys: kernel symbols lack {error}")
    if heap_key is None or lfh_key is None:
        return Finding(address, "RtlpHpHeapGlobals unreadable")
    return HeapKeys(heap_key, lfh_key)


UNLISTED = -2  # PoolHeap.node of a heap under no ExPoolState slot


@dataclass(frozen=True)
class PoolHeap:
    address: int
    pool: str  # NonPaged, NonPagedNx, Paged
    node: int  # pool node index, -1 for ExPoolState.SpecialHeaps, UNLISTED for a heap found through its segments
    index: int  # index in Heaps[] / SpecialHeaps[]

    @property
    def special(self) -> bool:
        return self.node == -1


def pool_heaps(kernel: Kernel) -> list[PoolHeap | Finding]:
    """Every pool heap under ``ExPoolState``; heaps whose ``_SEGMENT_HEAP.Signature`` is wrong become Findings."""
    state_type, node_type = "_EX_POOL_HEAP_MANAGER_STATE", "_EX_HEAP_POOL_NODE"
    try:
        state = kernel.symbol_address("ExPoolState")
        pools_count = read_field(kernel, state, state_type, "NumberOfPools")
        node_base = state + kernel.field_offset(state_type, "PoolNode")
        node_size = kernel.type_size(node_type)
        max_nodes = kernel.array_count(state_type, "PoolNode")
        heaps_offset = kernel.field_offset(node_type, "Heaps")
        heaps_per_node = kernel.array_count(node_type, "Heaps")
        special_base = state + kernel.field_offset(state_type, "SpecialHeaps")
        special_count = kernel.array_count(state_type, "SpecialHeaps")
        pointer = kernel.type_size("pointer")
        kernel.field_offset("_SEGMENT_HEAP", "Signature")
    except SYMBOLS_MISSING as error:
        return [Finding(0, f"pool heaps: kernel symbols lack {error}")]
    if pools_count is None:
        return [Finding(state, "ExPoolState.NumberOfPools unreadable")]
    slots = [
        (node, index, node_base + node * node_size + heaps_offset + index * pointer)
        for node in range(min(pools_count, max_nodes))
        for index in range(heaps_per_node)
    ]
    slots += [(-1, index, special_base + index * pointer) for index in range(special_count)]
    out: list[PoolHeap | Finding] = []
    seen: set[int] = set()
    for node, index, slot in slots:
        address = read_pointer(kernel, slot)
        if address is None:
            out.append(Finding(slot, "pool heap pointer unreadable"))
            continue
        if address == 0 or address in seen:
            continue
        seen.add(address)
        signature = read_field(kernel, address, "_SEGMENT_HEAP", "Signature")
        if signature != SEGMENT_HEAP_SIGNATURE:
            shown = "unreadable" if signature is None else f"{signature:#x}"
            out.append(Finding(address, f"_SEGMENT_HEAP signature {shown}, expected {SEGMENT_HEAP_SIGNATURE:#x}"))
            continue
        name = HEAP_POOL_NAMES[index] if index < len(HEAP_POOL_NAMES) else ""
        out.append(PoolHeap(address, name, node, index))
    return out


def _slist_head(header: bytes, base: int, next_entry: FieldLayout) -> int:
    """The first entry of the x64 ``_SLIST_HEADER`` at ``base`` of ``header``: ``HeaderX64.NextEntry`` holds its
    address >> 4."""
    return next_entry.extract(header, base) << next_entry.bit_position


def _slist_entries(kernel: Kernel, heads: list[int]) -> set[int]:
    """The entries of many singly linked lists from their first entries (``_SLIST_ENTRY.Next`` holds the full
    address of the next), followed side by side: each round reads the link of every list's current entry at
    once, as thousands of links scattered over the pool would each cost a translation.  A list ends at a null
    or unreadable link, an entry it met before, or MAX_SLIST_ENTRIES entries."""
    link = kernel.field_offset("_SLIST_ENTRY", "Next")
    width = kernel.type_size("pointer")
    found: set[int] = set()
    lists = [(head, set()) for head in heads if head]  # (current entry, entries met)
    while lists:
        for entry, seen in lists:
            seen.add(entry)
            found.add(entry)
        links = translate.read_many(kernel.context, kernel.layer_name, [entry + link for entry, _ in lists], width)
        lists = [(following, seen) for (_, seen), data in zip(lists, links)
                 if data is not None and (following := int.from_bytes(data, "little"))
                 and following not in seen and len(seen) < MAX_SLIST_ENTRIES]
    return found


@per_kernel
def cached_free_addresses(kernel: Kernel) -> frozenset[int]:
    """Blocks freed into the dynamic lookasides (``ExPoolState.PoolNode[n].Lookasides[k].Buckets[b]``) and
    the VS delay-free lists: the heap still marks them busy, so walkers report them as cached-free (read
    once per kernel: every owner lookup needs them)."""
    state_type, node_type, dyn_type, la_type = (
        "_EX_POOL_HEAP_MANAGER_STATE", "_EX_HEAP_POOL_NODE", "_RTL_DYNAMIC_LOOKASIDE", "_RTL_LOOKASIDE",
    )
    try:
        next_entry = kernel.field_layout("_SLIST_HEADER", "HeaderX64.NextEntry")
        state = kernel.symbol_address("ExPoolState")
        pools_count = read_field(kernel, state, state_type, "NumberOfPools") or 0
        node_base = state + kernel.field_offset(state_type, "PoolNode")
        node_size = kernel.type_size(node_type)
        lookasides = kernel.field_offset(node_type, "Lookasides")
        dyn_size = kernel.type_size(dyn_type)
        dyn_count = kernel.array_count(node_type, "Lookasides")
        buckets = kernel.field_offset(dyn_type, "Buckets")
        bucket_count = kernel.array_count(dyn_type, "Buckets")
        la_size = kernel.type_size(la_type)
        list_head = kernel.field_offset(la_type, "ListHead")
        delay_free = kernel.field_offset("_SEGMENT_HEAP", "VsContext.DelayFreeContext.ListHead")
    except SYMBOLS_MISSING:
        return frozenset()
    heads: list[int] = []
    for node in range(min(pools_count, kernel.array_count(state_type, "PoolNode"))):
        start = node_base + node * node_size + lookasides
        data = read_bytes(kernel, start, dyn_count * dyn_size)
        if data is None:
            continue
        heads += [_slist_head(data, dyn * dyn_size + buckets + bucket * la_size + list_head, next_entry)
                  for dyn in range(dyn_count) for bucket in range(bucket_count)]
    for heap in pool_heaps(kernel):
        if isinstance(heap, PoolHeap):
            header = read_bytes(kernel, heap.address + delay_free, kernel.type_size("_SLIST_HEADER"))
            if header is not None:
                heads.append(_slist_head(header, 0, next_entry))
    return frozenset(_slist_entries(kernel, heads))
