"""Why the system stopped, and the pool behind it: ``!analyze`` and ``!pool`` for a crashed system's memory.

The bug check is read from the crash dump's header when the image is a
crash dump, else from ``KiBugCheckData`` (the code and four pointer-sized
parameters the kernel stores before it writes the dump), so a raw image of
a crashed machine answers too.

For the pool bug checks each parameter has a role: an address inside a
chunk the kernel was checking or freeing, the damaged header next to it, a
faulting address, the address of the code that faulted, a heap, or a plain
value.  Every address parameter gets the ``!pool`` answer for its page
(owner chunk and neighbours), what a ``!poolval`` of that page says, and
the chunk that most likely did it: the one that overran into a damaged
header, the freed block that was freed or touched again, the allocation
read past its end.  When no parameter leads into the pool (a corrupted
pointer for 0xC5), the whole pool is validated and the chunk before each
damaged header is the suspect.  Other bug checks are named and left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from volatility3.framework import exceptions
from volatility3.framework.layers import crash

from . import exhaustion, freespace, modules, owner, scan, validate
from .kernel import Kernel
from .model import Chunk, Finding, State

# Parameter roles.
ENTRY = "entry"  # a chunk the kernel was checking or freeing: its owner is the suspect
DAMAGED = "damaged"  # a header found corrupt: the chunk before it is the suspect
FREED = "freed"  # an address in a block already freed: its last user is the suspect
BEYOND = "beyond"  # the first address past an allocation: the chunk ending there is the suspect
REFERENCED = "referenced"  # an address the kernel tripped over: pool or not
CODE = "code"  # the instruction that faulted: which module
HEAP = "heap"  # the segment heap that reported the problem
VALUE = "value"
ADDRESS_ROLES = (ENTRY, DAMAGED, FREED, BEYOND, REFERENCED)
RESERVED = ("Reserved", VALUE)

MUST_SUCCEED_POOL_EMPTY = 0x41
NONPAGED = "Nonp"  # the tracker's name of nonpaged pool
SOURCE_DUMP = "crash dump header"
SOURCE_MEMORY = "KiBugCheckData"
KI_BUGCHECK_VALUES = 5  # code and four parameters


@dataclass(frozen=True)
class BugCheck:
    code: int
    parameters: tuple[int, int, int, int]
    source: str  # SOURCE_DUMP or SOURCE_MEMORY


@dataclass(frozen=True)
class CodeInfo:
    """What a code (and its subcode) means and what each parameter holds: (meaning, role)."""

    name: str
    meaning: str
    parameters: tuple[tuple[str, str], ...]
    pool: bool = True


# code -> (name, meaning, {subcode: (subcode meaning, P1..P4)}, subcode parameter index or None, default P1..P4)
_READ_WRITE = ("0 read, 1 write", VALUE)
_FAULT = (("Memory referenced", BEYOND), _READ_WRITE, ("Address of the code that referenced it", CODE), RESERVED)
_POOL_CODES: dict[int, tuple[str, str, dict[int, tuple[str, tuple]], int | None, tuple]] = {
    0x19: ("BAD_POOL_HEADER", "a pool header is corrupt", {
        0x3: ("the pool free list is corrupt", (("Subcode", VALUE), ("Pool entry being checked", ENTRY),
                                                ("Read-back Flink", VALUE), ("Read-back Blink", VALUE))),
        0x5: ("two adjacent pool entries contradict each other",
              (("Subcode", VALUE), ("One pool entry", ENTRY), RESERVED, ("The other pool entry", DAMAGED))),
        0x7: ("a pool block header size is corrupt",
              (("Subcode", VALUE), RESERVED, RESERVED, ("Bad pool entry", DAMAGED))),
        0x20: ("a pool block header size is corrupt",
               (("Subcode", VALUE), ("Pool entry that should have been found", ENTRY),
                ("Next pool entry", DAMAGED), RESERVED)),
    }, 1, (("Subcode", VALUE), ("Pool entry", ENTRY), ("See the subcode", VALUE), ("See the subcode", VALUE))),
    0xC2: ("BAD_POOL_CALLER", "a driver made a bad pool request", {
        0x7: ("attempt to free pool which was already freed",
              (("Subcode", VALUE), ("Pool tag from the pool header", VALUE), ("Contents of the pool header", VALUE),
               ("Address of the block being freed", FREED))),
    }, 1, (("Subcode", VALUE), ("See the subcode", VALUE), ("See the subcode", VALUE), ("See the subcode", VALUE))),
    0xC5: ("DRIVER_CORRUPTED_EXPOOL", "the kernel tripped over corrupt pool at raised IRQL: a driver damaged it", {},
           None, (("Memory referenced", REFERENCED), ("IRQL", VALUE), _READ_WRITE,
                  ("Address of the code that referenced it", CODE))),
    0x13A: ("KERNEL_MODE_HEAP_CORRUPTION", "the segment heap found a pool heap corrupt", {
        0x3: ("a corrupt entry header was detected", ()),
        0x4: ("multiple corrupt entry headers were detected", ()),
        0x5: ("a corrupt entry header in a large allocation was detected", ()),
        0x6: ("corruption with the features of a buffer overrun", ()),
        0x7: ("corruption with the features of a buffer underrun", ()),
        0x8: ("a free block was passed to an operation only valid for busy blocks", ()),
        0xB: ("corruption with the features of a use after free", ()),
        0xD: ("a corrupt free list was detected", ()),
        0x11: ("invalid internal heap state, usually a buffer overflow", ()),
        0x12: ("invalid internal heap state, usually a buffer overflow", ()),
    }, 1, (("Type of corruption", VALUE), ("Heap that reported it", HEAP), ("Address where it was detected", DAMAGED),
           RESERVED)),
    0xD5: ("DRIVER_PAGE_FAULT_IN_FREED_SPECIAL_POOL", "a driver touched pool it had freed", {}, None,
           (("Memory referenced", FREED), _READ_WRITE, ("Address of the code that referenced it", CODE), RESERVED)),
    0xD6: ("DRIVER_PAGE_FAULT_BEYOND_END_OF_ALLOCATION", "a driver accessed memory past the end of its allocation",
           {}, None, _FAULT),
    0xCD: ("PAGE_FAULT_BEYOND_END_OF_ALLOCATION", "an access ran past the end of a pool allocation", {}, None, _FAULT),
    0xC1: ("SPECIAL_POOL_DETECTED_MEMORY_CORRUPTION",
           "special pool caught a write outside an allocation or a bad free", {
        0x20: ("the block freed was not allocated", ()),
        0x21: ("the address freed is bad", ()),
        0x22: ("the address freed is bad", ()),
        0x23: ("bytes near the allocation, in its page, were overwritten", ()),
        0x24: ("bytes after the end of the allocation were overwritten", ()),
    }, 4, (("Address being freed", ENTRY), RESERVED, ("Address of the corruption (or 0)", DAMAGED),
           ("Subcode", VALUE))),
    0x41: ("MUST_SUCCEED_POOL_EMPTY", "a must-succeed allocation found nonpaged pool empty", {}, None,
           (("Size of the request", VALUE), ("Pages of nonpaged pool in use", VALUE),
            ("Requests larger than a page", VALUE), ("Pages available", VALUE))),
}
_OTHER_CODES = {
    0x0A: ("IRQL_NOT_LESS_OR_EQUAL", "pageable or invalid memory touched at raised IRQL"),
    0x1A: ("MEMORY_MANAGEMENT", "the memory manager found its own state broken"),
    0x1E: ("KMODE_EXCEPTION_NOT_HANDLED", "a kernel-mode exception nobody handled"),
    0x3B: ("SYSTEM_SERVICE_EXCEPTION", "an exception while running a system service"),
    0x50: ("PAGE_FAULT_IN_NONPAGED_AREA", "invalid system memory was referenced"),
    0x7E: ("SYSTEM_THREAD_EXCEPTION_NOT_HANDLED", "a system thread raised an exception nobody handled"),
    0x7F: ("UNEXPECTED_KERNEL_MODE_TRAP", "a trap the kernel does not allow or cannot catch"),
    0x9F: ("DRIVER_POWER_STATE_FAILURE", "a driver left a power request pending"),
    0x101: ("CLOCK_WATCHDOG_TIMEOUT", "a processor stopped answering clock interrupts"),
    0x109: ("CRITICAL_STRUCTURE_CORRUPTION", "kernel code or a critical structure was modified"),
    0x124: ("WHEA_UNCORRECTABLE_ERROR", "the hardware reported an error it could not correct"),
    0x133: ("DPC_WATCHDOG_VIOLATION", "a DPC or the DPC queue ran too long"),
    0x139: ("KERNEL_SECURITY_CHECK_FAILURE", "the kernel found a corrupted critical data structure"),
    0xC4: ("DRIVER_VERIFIER_DETECTED_VIOLATION", "Driver Verifier caught a driver breaking a rule"),
    0xD1: ("DRIVER_IRQL_NOT_LESS_OR_EQUAL", "a driver touched pageable or invalid memory at raised IRQL"),
    0xE2: ("MANUALLY_INITIATED_CRASH", "the crash was started on purpose (keyboard or debugger)"),
    0xEF: ("CRITICAL_PROCESS_DIED", "a process the system needs exited"),
}


def code_info(code: int, parameters: tuple[int, int, int, int]) -> CodeInfo:
    """Name, one-line meaning (with the subcode's) and the meaning and role of each parameter."""
    if code not in _POOL_CODES:
        name, meaning = _OTHER_CODES.get(code, (f"BUGCHECK_{code:X}", "not a code this analysis knows"))
        return CodeInfo(name, meaning, (("Parameter", VALUE),) * 4, pool=False)
    name, meaning, subcodes, subcode_index, default = _POOL_CODES[code]
    if subcode_index is None:
        return CodeInfo(name, meaning, default)
    subcode = parameters[subcode_index - 1]
    sub_meaning, sub_parameters = subcodes.get(subcode, (f"subcode {subcode:#x}", ()))
    return CodeInfo(name, f"{meaning}: {sub_meaning}", sub_parameters or default)


def read_bugcheck(kernel: Kernel) -> BugCheck | None:
    """The crash dump header's bug check, else ``KiBugCheckData``'s; None when neither records one."""
    layer = _dump_layer(kernel)
    if layer is not None:
        try:
            header = layer.get_header()
            code = int(header.BugCheckCode)
            parameters = tuple(int(value) for value in header.BugCheckCodeParameter)
        except (exceptions.InvalidAddressException, AttributeError):
            code = 0
        if code:
            return BugCheck(code, parameters, SOURCE_DUMP)
    return _from_memory(kernel)


def _dump_layer(kernel: Kernel) -> crash.WindowsCrashDump32Layer | None:
    """The crash dump layer under the kernel's layer, if the image is a crash dump."""
    pending, seen = [kernel.layer_name], set()
    while pending:
        name = pending.pop()
        if name in seen or name not in kernel.context.layers:
            continue
        seen.add(name)
        layer = kernel.context.layers[name]
        if isinstance(layer, crash.WindowsCrashDump32Layer):
            return layer
        pending.extend(layer.dependencies)
    return None


def _from_memory(kernel: Kernel) -> BugCheck | None:
    if not kernel.has_symbol("KiBugCheckData"):
        return None
    width = kernel.type_size("pointer")
    try:
        data = kernel.read(kernel.symbol_address("KiBugCheckData"), KI_BUGCHECK_VALUES * width)
    except exceptions.InvalidAddressException:
        return None
    values = [int.from_bytes(data[i : i + width], "little") for i in range(0, len(data), width)]
    return BugCheck(values[0], tuple(values[1:]), SOURCE_MEMORY) if values[0] else None


@dataclass(frozen=True)
class AddressAnswer:
    """The pool answer for one address parameter: ``!pool`` (owner, neighbours) and ``!poolval`` of its page."""

    parameter: int  # 1..4
    role: str
    answer: owner.OwnerAnswer
    previous: Chunk | None  # the chunk before the owner (or before the address, when no chunk owns it)
    next: Chunk | None
    validation: tuple[Finding, ...]


@dataclass(frozen=True)
class CodeSite:
    parameter: int
    address: int
    module: str  # "" when no loaded module holds the address
    offset: int


@dataclass(frozen=True)
class Suspect:
    chunk: Chunk | None  # None when a tag as a whole is to blame (a pool filled to its limit)
    tag: bytes  # the chunk's tag, or the stale tag of a freed one
    reason: str


@dataclass(frozen=True)
class CrashAnalysis:
    bugcheck: BugCheck
    info: CodeInfo
    addresses: tuple[AddressAnswer, ...] = ()
    code_sites: tuple[CodeSite, ...] = ()
    suspect: Suspect | None = None
    pool_findings: tuple[Finding, ...] = ()  # whole-pool validation, when no parameter led into pool
    usage: tuple[exhaustion.PoolUsage, ...] = ()  # pools against their limits, for an empty pool


def analyze(kernel: Kernel, bugcheck: BugCheck) -> CrashAnalysis:
    """The pool behind ``bugcheck``: every address parameter answered, code sites named, the suspect chosen."""
    info = code_info(bugcheck.code, bugcheck.parameters)
    if not info.pool:
        return CrashAnalysis(bugcheck, info)
    if bugcheck.code == MUST_SUCCEED_POOL_EMPTY:
        return _exhausted(kernel, bugcheck, info)
    roles = [(index, role, value) for index, ((_, role), value) in
             enumerate(zip(info.parameters, bugcheck.parameters), start=1)]
    answers = tuple(_address_answer(kernel, index, role, value) for index, role, value in roles
                    if role in ADDRESS_ROLES and value)
    sites = tuple(_code_site(kernel, index, value) for index, role, value in roles if role == CODE and value)
    suspect = next((found for found in (_suspect(kernel, item) for item in answers) if found), None)
    pool_findings: tuple[Finding, ...] = ()
    if suspect is None and not any(item.answer.is_pool for item in answers):
        pool_findings = tuple(validate.validate(kernel, scan.scan_pools(kernel)))
        suspect = _suspect_from_findings(kernel, pool_findings)
    return CrashAnalysis(bugcheck, info, answers, sites, suspect, pool_findings)


def _exhausted(kernel: Kernel, bugcheck: BugCheck, info: CodeInfo) -> CrashAnalysis:
    """An empty nonpaged pool: the pools against their limits; a tag holding a third of the limit is to blame."""
    usage, _ = exhaustion.pool_usage(kernel)
    nonpaged = next((pool for pool in usage if pool.pool == NONPAGED), None)
    blamed = [row for row in nonpaged.top if nonpaged.tag_warning(row)] if nonpaged else []
    suspect = None
    if blamed:
        share = nonpaged.share(blamed[0])
        suspect = Suspect(None, blamed[0].tag, f"holds {share:.0%} of the nonpaged pool's limit")
    return CrashAnalysis(bugcheck, info, suspect=suspect, usage=tuple(usage))


def _address_answer(kernel: Kernel, parameter: int, role: str, address: int) -> AddressAnswer:
    answer = owner.find_owner(kernel, address)
    pivot = answer.owner.address if answer.owner else address
    chunks = sorted(answer.chunks, key=lambda chunk: chunk.address)
    previous = next((chunk for chunk in reversed(chunks) if chunk.address < pivot), None)
    following = next((chunk for chunk in chunks if chunk.address > pivot), None)
    return AddressAnswer(parameter, role, answer, previous, following, _page_validation(kernel, answer))


def _page_validation(kernel: Kernel, answer: owner.OwnerAnswer) -> tuple[Finding, ...]:
    """What ``!poolval`` says of the page: the walk's own problems and the header checks of its chunks."""
    return tuple(validate.merge([
        *answer.findings,
        *validate.header_overruns(answer.chunks, kernel.page_size),
        *validate.unprintable_tags(answer.chunks),
    ]))


def _suspect(kernel: Kernel, item: AddressAnswer) -> Suspect | None:
    address, found = item.answer.address, item.answer.owner
    if item.role == ENTRY and found is not None:
        damaged = [finding.address for finding in item.validation if finding.address >= found.end]
        why = f"its next header at {damaged[0]:#x} is damaged: it overran its allocation" if damaged \
            else f"the pool entry parameter {item.parameter} names"
        return Suspect(found, found.tag, why)
    if item.role == DAMAGED and item.previous is not None:
        return Suspect(item.previous, item.previous.tag,
                       f"the chunk before the damaged header at {address:#x}: it overran its allocation")
    if item.role == FREED and found is not None:
        verb = "freed again" if item.parameter == 4 else "touched"
        state = "already free" if found.state is not State.ALLOCATED else "still allocated"
        return Suspect(found, _last_tag(kernel, found), f"block {state} when it was {verb}")
    if item.role == BEYOND:
        ending = item.previous if found is None or found.address >= address else found
        if ending is not None:
            return Suspect(ending, ending.tag, f"the allocation before {address:#x}: accessed past its end")
    if item.role == REFERENCED and found is not None:
        return Suspect(found, _last_tag(kernel, found), "holds the address the kernel tripped over")
    return None


def _last_tag(kernel: Kernel, chunk: Chunk) -> bytes:
    """A live chunk's tag, or the stale tag its last user left in a free one."""
    if chunk.state is State.ALLOCATED:
        return chunk.tag
    return freespace.stale_tag(kernel, chunk).tag or chunk.tag


def _suspect_from_findings(kernel: Kernel, findings: tuple[Finding, ...]) -> Suspect | None:
    """The chunk right before the first damaged header the whole-pool validation found."""
    for finding in findings:
        answer = owner.find_owner(kernel, finding.address)
        before = [chunk for chunk in answer.chunks if chunk.address < finding.address]
        if before:
            chunk = max(before, key=lambda candidate: candidate.address)
            return Suspect(chunk, chunk.tag, f"the chunk before the damage validation found at {finding.address:#x} "
                                             f"({finding.reason})")
    return None


def _code_site(kernel: Kernel, parameter: int, address: int) -> CodeSite:
    loaded, _ = modules.loaded_modules(kernel)
    mask = kernel.layer.address_mask
    for module in loaded:
        if module.base & mask <= address & mask < (module.base + module.size) & mask:
            return CodeSite(parameter, address, module.name, (address - module.base) & mask)
    return CodeSite(parameter, address, "", 0)
