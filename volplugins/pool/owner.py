"""Address -> owning pool allocation: the library behind ``windows.poolowner``.

The order follows how Windows hands out pool: an address inside a big (or
large) allocation is named by the big page table whatever backs it; otherwise
the segment heap (19H1+) or the classic page holding it is walked; an address
in no pool gets its region and a reason.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

from . import bigchunks, bigpages, classic, objects, regions, segheap
from .kernel import Kernel
from .model import Backing, Chunk, Finding, State

NOT_POOL = "not pool"
PAST_BREAK = "found past a broken chain"


@dataclass(frozen=True)
class OwnerAnswer:
    address: int
    region: str
    chunks: tuple[Chunk, ...] = ()
    owner: Chunk | None = None
    findings: tuple[Finding, ...] = ()
    reason: str = ""  # why there is no owner, when there is none
    object: objects.ObjectInfo | None = None
    quota_process_name: str = ""
    freed_big: bigpages.BigAllocation | None = None  # a freed big allocation that held the address
    caveat: str = ""  # how far to trust the owner when it was not found on an intact chain

    @property
    def is_pool(self) -> bool:
        return self.owner is not None

    def headline(self) -> str:
        """The first line ``!pool`` prints, or the reason this address has no pool owner."""
        if self.owner is None:
            return f"{self.address:x}: {self.reason or NOT_POOL} (region: {self.region})"
        if self.owner.backing in (Backing.BIG, Backing.LARGE):
            return (f"{self.address:x} is inside a {self.owner.backing.value.lower()} pool allocation "
                    f"of {self.owner.size:#x} bytes at {self.owner.address:x}")
        return f"Pool page {self.address:x} region is {self.region}"

    def quota_note(self, chunk: Chunk) -> str:
        if chunk.quota_process is None:
            return ""
        name = f" ({self.quota_process_name})" if self.quota_process_name else ""
        return f"quota charged to process {chunk.quota_process:#x}{name}"


def find_owner(kernel: Kernel, address: int, listing: bool = True) -> OwnerAnswer:
    """Which allocation holds ``address``; never raises for bad or unreadable memory.  Without ``listing`` a
    segment heap answer's chunks are the owner alone (not every chunk of its page)."""
    region = regions.classify(kernel, address)
    if region.name in (regions.USER_SPACE, regions.USER_GUARD, regions.NON_CANONICAL):
        return OwnerAnswer(address, region.name, reason=f"{region.name.lower()} address, not kernel pool")
    big = bigpages.find_big(kernel, address)
    if big is not None:
        return _with_details(kernel, _big_answer(kernel, address, region.name, big))
    if region.pool is None and region.region is not None:
        return OwnerAnswer(address, region.name, reason=f"{NOT_POOL}: address lies in {region.name}")
    # The segment heap decommits the pages inside large free chunks: walk from the (resident) subsegment
    # header before concluding that an unreadable address has no owner.
    if kernel.uses_segment_heap:
        answer = _segment_heap_answer(kernel, address, region.name, listing)
    else:
        answer = _classic_answer(kernel, address, region)
    if answer.owner is None:
        freed = bigpages.find_freed_big(kernel, address)
        if freed is not None:
            return _big_answer(kernel, address, region.name, freed)
    if answer.owner is None and not kernel.is_valid(address):
        return OwnerAnswer(address, region.name, answer.chunks, None, answer.findings,
                           reason="address is not mapped (invalid or paged out)")
    if answer.owner is not None and answer.owner.state is State.FREE:
        answer = replace(answer, freed_big=bigpages.find_freed_big(kernel, address))
    return _with_details(kernel, answer)


def find_owners(kernel: Kernel, addresses: list[int], listing: bool = True) -> Iterator[OwnerAnswer]:
    """:func:`find_owner` of each address in turn; on the segment heap the ranges holding them are walked first,
    each segment's together, so that a batch costs one walk of what it touches."""
    if kernel.uses_segment_heap and not segheap.layout_problem(kernel):
        segheap.prepare_lookups(kernel, addresses)
    for address in addresses:
        yield find_owner(kernel, address, listing)


def _big_answer(kernel: Kernel, address: int, region: str, big: bigpages.BigAllocation) -> OwnerAnswer:
    chunk = bigchunks.big_chunk(kernel, big, region)
    return OwnerAnswer(address, region, (chunk,), chunk)


def _segment_heap_answer(kernel: Kernel, address: int, region: str, listing: bool) -> OwnerAnswer:
    problem = segheap.layout_problem(kernel)
    if problem:
        return OwnerAnswer(address, region, reason=f"no owner named: {problem}")
    result = segheap.find_owner_chunks(kernel, address, listing=listing)
    if result.owner is None:
        reason = result.findings[0].reason if result.findings else "no segment heap chunk holds this address"
        return OwnerAnswer(address, region, result.chunks, None, result.findings, reason=f"{NOT_POOL}: {reason}")
    caveat = classic.FOUND_BY_VALIDATION if result.validated else ""
    if _past_vs_break(result):
        caveat = caveat or PAST_BREAK
    return OwnerAnswer(address, region, result.chunks, result.owner, result.findings, caveat=caveat)


def _past_vs_break(result: segheap.OwnerResult) -> bool:
    """Whether the owner lies in a VS subsegment after the link where its chain broke (and was picked up again)."""
    return (result.page_range is not None and result.page_range.kind is segheap.RangeKind.VS
            and any(finding.address <= result.owner.address for finding in result.findings))


def _classic_answer(kernel: Kernel, address: int, region: regions.RegionAnswer) -> OwnerAnswer:
    """The chunk of the address's page; outside every known region (no usable region bookkeeping) only a page
    whose own chain validates is taken for pool, and the answer says so."""
    walk = classic.walk_page(kernel, address, region.pool or "")
    if region.region is None and not walk.complete:
        return OwnerAnswer(address, region.name, reason=f"{NOT_POOL}: no known pool region holds this address"
                                                         " and its page holds no valid chunk chain")
    owner = walk.owner(address)
    reason = "" if owner else "no chunk of this page holds the address (the page's chain is broken before it)"
    caveat = PAST_BREAK if owner is not None and walk.past_break(owner) else ""
    if region.region is None and owner is not None:
        caveat = classic.FOUND_BY_VALIDATION
    return OwnerAnswer(address, region.name, walk.chunks, owner, walk.findings, reason=reason, caveat=caveat)


def _with_details(kernel: Kernel, answer: OwnerAnswer) -> OwnerAnswer:
    """Add what the owner holds (an executive object) and who was charged for it."""
    chunk = answer.owner
    if chunk is None or chunk.state is State.UNREADABLE:
        return answer
    found = None
    if chunk.body is not None:
        found = objects.identify(kernel, chunk.body, max(0, chunk.end - chunk.body), chunk.tag)
    quota_name = ""
    if chunk.quota_process is not None:
        quota_name = objects.process_name(kernel, chunk.quota_process)
    return replace(answer, object=found, quota_process_name=quota_name)
