"""Which loaded module uses which pool tag, read from the modules' code in memory.

A driver names its tags as immediates at its calls to the pool routines:
``mov r8d, 'Tag1'`` before ``call [__imp_ExAllocatePoolWithTag]``.  The scan
walks ``PsLoadedModuleList``, reads each module's image from memory,
finds the import address table slots bound to tag-taking routines and
disassembles the executable sections (capstone, x64).  At every call (or
tail jump) through such a slot it asks which constants can reach the tag
argument: a backward walk over the instructions that can precede the call
(fall-through and direct jumps), following register copies, stopping at
writes, at calls for volatile registers, and at function entries.  A
constant is recorded only when it reaches the call on some path with no
unknown write in between, and only when its four bytes look like a tag.

Rule for what counts: the tag argument of an allocation routine, of
``ExFreePoolWithTag``/``ExFreePool2`` (a driver frees with the tag it
allocated with), of ``ExAllocateCacheAwareRundownProtection`` and of the
lookaside-list initializers (the list allocates with that tag).  The
untagged ``ExAllocatePool``/``ExAllocatePoolWithQuota`` allocate with tag
``None``.  Any other routine's arguments are not tags, however tag-like.

Import slots are found two ways: the import name table (often in the
discarded ``INIT`` section, so frequently gone from memory), and the bound
IAT values compared with the kernel's routine addresses from its ISF, which
works whenever the slot's page is present.  The kernel itself calls its
routines directly (no imports); it is skipped unless asked for, then direct
calls to those addresses count.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from volatility3.framework import exceptions

from .kernel import MASK64, PAGE_SIZE, SYMBOLS_MISSING, Kernel
from .model import Finding
from .modules import bound_slots, covers, import_slots, loaded_modules, read_module_image, section_headers
from .tags import printable_tag, unprotected

WALK_BUDGET = 512  # instructions visited per resolved argument
MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class TagArgument:
    """Where a routine takes its tag: a register family or a stack slot at the call, or a fixed tag."""

    location: str | None  # "r8", "rdx", "[rsp + 0x30]"; None for a routine with a fixed tag
    fixed: bytes | None = None


def _stack(argument: int) -> str:
    """Stack slot of the n-th (1-based, > 4) argument at the call instruction (Windows x64 ABI)."""
    return f"[rsp + {8 * (argument - 1):#x}]"


# Routines and their tag argument (WDK prototypes; x64: rcx, rdx, r8, r9, then [rsp+20h], ...).
TAG_ARGUMENTS: dict[str, TagArgument] = {
    "ExAllocatePool": TagArgument(None, b"None"),
    "ExAllocatePoolWithQuota": TagArgument(None, b"None"),
    "ExAllocatePoolWithTag": TagArgument("r8"),
    "ExAllocatePoolWithQuotaTag": TagArgument("r8"),
    "ExAllocatePoolWithTagPriority": TagArgument("r8"),
    "ExAllocatePoolWithTagFromNode": TagArgument("r8"),
    "ExAllocatePool2": TagArgument("r8"),
    "ExAllocatePool3": TagArgument("r8"),
    "FsRtlAllocatePoolWithTag": TagArgument("r8"),
    "FsRtlAllocatePoolWithQuotaTag": TagArgument("r8"),
    "NdisAllocateMemoryWithTag": TagArgument("r8"),
    "NdisAllocateMemoryWithTagPriority": TagArgument("r8"),
    "ExFreePoolWithTag": TagArgument("rdx"),
    "ExFreePool2": TagArgument("rdx"),
    "ExAllocateCacheAwareRundownProtection": TagArgument("rdx"),
    "ExInitializeNPagedLookasideList": TagArgument(_stack(6)),
    "ExInitializePagedLookasideList": TagArgument(_stack(6)),
    "ExInitializeLookasideListEx": TagArgument(_stack(7)),
}


@dataclass(frozen=True)
class TagUse:
    """One call site passing a tag."""

    tag: bytes
    routine: str
    call_site: int
    module: str = ""


@dataclass(frozen=True)
class DriverScanResult:
    tags: dict[bytes, set[str]]  # tag -> names of the modules using it
    modules_scanned: int
    findings: tuple[Finding, ...] = ()
    uses: tuple[TagUse, ...] = ()


# -- pure part: a module image in memory layout -> tag uses --------------------


def find_tag_uses(
    image: bytes,
    image_base: int,
    import_for_slot: Mapping[int, str],
    *,
    direct: Mapping[int, str] | None = None,
    readable: Sequence[tuple[int, int]] | None = None,
) -> list[TagUse]:
    """Tags passed at calls to tag-taking routines in ``image`` (bytes at their RVAs, loaded at ``image_base``).

    ``import_for_slot`` maps IAT slot addresses to routine names; ``direct``
    maps routine addresses called without an import (the kernel's own
    calls); ``readable`` limits disassembly to those (rva, size) ranges.
    """
    code = _Code(_disassemble(image, image_base, _code_ranges(image, readable)))
    return code.tag_uses(import_for_slot, direct or {})


def plausible_tag(tag: bytes) -> bool:
    """Four printable ASCII bytes with a letter or digit; the last may carry the protected bit."""
    return printable_tag(tag) and any(chr(byte).isalnum() for byte in unprotected(tag))


def _code_ranges(image: bytes, readable: Sequence[tuple[int, int]] | None) -> list[tuple[int, int]]:
    """(start, end) RVA ranges of executable sections, clipped to the readable ranges."""
    sections = [(s.rva, min(s.rva + s.size, len(image))) for s in section_headers(image) if s.executable]
    if readable is None:
        return [(start, end) for start, end in sections if start < end]
    out = []
    for start, end in sections:
        for run_start, run_size in readable:
            low, high = max(start, run_start), min(end, run_start + run_size)
            if low < high:
                out.append((low, high))
    return sorted(out)


def _disassemble(image: bytes, image_base: int, ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int, str, str]]:
    import capstone  # imported lazily: the rest of the library does not need it

    disassembler = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    disassembler.skipdata = True  # undecodable bytes become ".byte" and the sweep goes on
    view = memoryview(image)
    out: list[tuple[int, int, str, str]] = []
    for start, end in ranges:
        out.extend(disassembler.disasm_lite(view[start:end], image_base + start))
    return out


def _register_table() -> dict[str, tuple[str, int]]:
    """Every general register name -> (64-bit family, width in bits)."""
    table: dict[str, tuple[str, int]] = {}
    legacy = {"rax": ("eax", "ax", "al", "ah"), "rbx": ("ebx", "bx", "bl", "bh"), "rcx": ("ecx", "cx", "cl", "ch"),
              "rdx": ("edx", "dx", "dl", "dh"), "rsi": ("esi", "si", "sil"), "rdi": ("edi", "di", "dil"),
              "rbp": ("ebp", "bp", "bpl"), "rsp": ("esp", "sp", "spl")}
    for family, (name32, name16, *names8) in legacy.items():
        table[family] = (family, 64)
        table[name32] = (family, 32)
        table[name16] = (family, 16)
        for name8 in names8:
            table[name8] = (family, 8)
    for number in range(8, 16):
        family = f"r{number}"
        table.update({family: (family, 64), f"{family}d": (family, 32), f"{family}w": (family, 16),
                      f"{family}b": (family, 8)})
    return table


REGISTERS = _register_table()
VOLATILE = frozenset({"rax", "rcx", "rdx", "r8", "r9", "r10", "r11"})
# Instructions that end straight-line flow: the next instruction is reached only by a jump.
BARRIERS = frozenset({"jmp", "ret", "retf", "iretq", "iretd", "int3", "ud2", "hlt", ".byte", "sysret", "sysretq"})
# Instructions whose first operand is read, not written.
READ_ONLY = frozenset({"cmp", "test", "bt", "push", "call", "jmp", "nop", "prefetch", "prefetchw", "prefetcht0",
                       "prefetchnta", "clflush", "invlpg", "lfence", "mfence", "sfence", "verr", "verw"})
# Registers written without being named as the first operand.
IMPLICIT_WRITES = {
    "mul": ("rax", "rdx"), "div": ("rax", "rdx"), "idiv": ("rax", "rdx"),
    "cdq": ("rdx",), "cqo": ("rdx",), "cwd": ("rdx",), "cdqe": ("rax",), "cwde": ("rax",), "cbw": ("rax",),
    "rdtsc": ("rax", "rdx"), "rdtscp": ("rax", "rdx", "rcx"), "rdmsr": ("rax", "rdx"), "rdpmc": ("rax", "rdx"),
    "xgetbv": ("rax", "rdx"), "cpuid": ("rax", "rbx", "rcx", "rdx"), "syscall": ("rcx", "r11"),
    "lahf": ("rax",), "xlatb": ("rax",), "in": ("rax",), "loop": ("rcx",), "loope": ("rcx",), "loopne": ("rcx",),
    "cmpxchg": ("rax",), "cmpxchg8b": ("rax", "rdx"), "cmpxchg16b": ("rax", "rdx"),
    "pop": ("rsp",), "push": ("rsp",), "leave": ("rsp", "rbp"), "enter": ("rsp", "rbp"),
    "pushfq": ("rsp",), "popfq": ("rsp",),
}
STRING_PREFIXES = ("stos", "lods", "scas", "cmps", "movs", "ins", "outs")
STRING_WRITES = ("rax", "rcx", "rsi", "rdi")
_RIP_OPERAND = re.compile(r"^(?:qword ptr )?\[rip ([+-]) (0x[0-9a-f]+|\d+)\]$")
_STACK_OPERAND = re.compile(r"^(?:\w+ ptr )?(\[rsp(?: \+ (?:0x[0-9a-f]+|\d+))?\])$")


@dataclass(frozen=True)
class _Slot:
    """A register holding the content of a memory slot (an IAT entry), not a number."""

    address: int


_UNKNOWN = object()  # the location was written with something we cannot know
_KEEP = object()  # the instruction does not write the location


@dataclass(frozen=True)
class _Copy:
    source: str
    mask: int


class _Code:
    """Decoded instructions with the predecessor relation direct branches give."""

    def __init__(self, instructions: list[tuple[int, int, str, str]]):
        self.instructions = instructions
        self.jumps_to: dict[int, list[int]] = {}
        self.calls: list[int] = []  # calls and jumps: a jump through a slot is a tail call
        for position, (_, _, mnemonic, operands) in enumerate(instructions):
            if mnemonic[0] not in "jclbn":  # jcc, jmp, call, loop, and the bnd/notrack prefixed forms
                continue
            operation = _operation(mnemonic)
            if operation in ("call", "jmp"):
                self.calls.append(position)
            if (operation[0] == "j" or operation.startswith("loop")) and operands[:2] == "0x":
                self.jumps_to.setdefault(int(operands, 16), []).append(position)

    def tag_uses(self, import_for_slot: Mapping[int, str], direct: Mapping[int, str]) -> list[TagUse]:
        uses: list[TagUse] = []
        for position in self.calls:
            address = self.instructions[position][0]
            for routine in self._callees(position, import_for_slot, direct):
                argument = TAG_ARGUMENTS.get(routine)
                if argument is None:
                    continue
                if argument.fixed is not None:
                    uses.append(TagUse(argument.fixed, routine, address))
                    continue
                for value in sorted(v for v in self.values(argument.location, position) if isinstance(v, int)):
                    tag = (value & MASK32).to_bytes(4, "little")
                    if plausible_tag(tag):
                        uses.append(TagUse(tag, routine, address))
        return uses

    def _callees(self, position: int, import_for_slot: Mapping[int, str], direct: Mapping[int, str]) -> set[str]:
        address, size, _, operands = self.instructions[position]
        slot = _rip_target(operands, address + size)
        if slot is not None:
            return {import_for_slot[slot]} if slot in import_for_slot else set()
        if operands[:2] == "0x":
            target = int(operands, 16)
            return {direct[target]} if target in direct else set()
        register = REGISTERS.get(operands)
        if register is None or register[1] != 64:
            return set()
        return {import_for_slot[value.address] for value in self.values(register[0], position)
                if isinstance(value, _Slot) and value.address in import_for_slot}

    def predecessors(self, position: int) -> list[int]:
        address = self.instructions[position][0]
        out = list(self.jumps_to.get(address, ()))
        if position > 0:
            previous_address, previous_size, mnemonic, _ = self.instructions[position - 1]
            if previous_address + previous_size == address and _operation(mnemonic) not in BARRIERS:
                out.append(position - 1)
        return out

    def values(self, location: str, position: int) -> set:
        """Constants (ints) or IAT slots ``location`` may hold just before instruction ``position`` runs."""
        found: set = set()
        pending = [(location, position, MASK64)]
        seen: set[tuple[str, int]] = set()
        budget = WALK_BUDGET
        while pending and budget > 0:
            current, at, mask = pending.pop()
            for previous in self.predecessors(at):
                if (current, previous) in seen:
                    continue
                seen.add((current, previous))
                budget -= 1
                effect = _effect(self.instructions[previous], current)
                if effect is _KEEP:
                    pending.append((current, previous, mask))
                elif isinstance(effect, _Copy):
                    pending.append((effect.source, previous, mask & effect.mask))
                elif isinstance(effect, int):
                    found.add(effect & mask)
                elif isinstance(effect, _Slot):
                    found.add(effect)
        return found


def _operation(mnemonic: str) -> str:
    """The operation without prefixes (``rep stosb`` -> ``stosb``, ``notrack jmp`` -> ``jmp``)."""
    return mnemonic.rsplit(" ", 1)[-1]


def _rip_target(operand: str, next_address: int) -> int | None:
    match = _RIP_OPERAND.match(operand)
    if not match:
        return None
    displacement = int(match.group(2), 0)
    return (next_address + (displacement if match.group(1) == "+" else -displacement)) & MASK64


def _immediate(operand: str) -> int | None:
    if not operand or not (operand[0].isdigit() or operand[0] == "-"):
        return None
    try:
        return int(operand, 0) & MASK64
    except ValueError:
        return None


def _effect(instruction: tuple[int, int, str, str], location: str):
    """What ``instruction`` does to ``location`` (a register family or a stack slot)."""
    address, size, mnemonic, operands = instruction
    operation = _operation(mnemonic)
    if operation == "call":
        return _UNKNOWN if location in VOLATILE or location.startswith("[") else _KEEP
    parts = operands.split(", ")
    first = parts[0]
    if location.startswith("["):
        return _stack_effect(operation, parts, location)
    if location in IMPLICIT_WRITES.get(operation, ()):
        return _UNKNOWN
    if operation.startswith(STRING_PREFIXES) and "[r" in operands and location in STRING_WRITES:
        return _UNKNOWN
    if operation in ("xchg", "xadd"):
        return _UNKNOWN if any(REGISTERS.get(part, ("",))[0] == location for part in parts) else _KEEP
    if operation in READ_ONLY or operation.startswith("j"):
        return _KEEP
    target = REGISTERS.get(first)
    if target is None or target[0] != location:
        return _KEEP
    width = target[1]
    source = parts[1] if len(parts) == 2 else None
    if operation in ("xor", "sub") and source == first:
        return 0
    if operation not in ("mov", "movabs") or source is None or width < 32:
        return _UNKNOWN
    mask = MASK32 if width == 32 else MASK64
    value = _immediate(source)
    if value is not None:
        return value & mask
    copied = REGISTERS.get(source)
    if copied is not None:
        return _Copy(copied[0], mask) if copied[1] == width else _UNKNOWN
    slot = _rip_target(source, address + size)
    if slot is not None and width == 64:
        return _Slot(slot)
    return _UNKNOWN


def _stack_effect(operation: str, parts: list[str], location: str):
    """Stack argument slots: set by ``mov [rsp+N], ...``; lost when rsp moves."""
    first = parts[0]
    if operation in ("push", "pop", "pushfq", "popfq", "enter", "leave") or REGISTERS.get(first, ("",))[0] == "rsp":
        return _UNKNOWN
    match = _STACK_OPERAND.match(first)
    if not match or match.group(1) != location or operation in READ_ONLY:
        return _KEEP
    if operation != "mov" or len(parts) != 2:
        return _UNKNOWN
    value = _immediate(parts[1])
    if value is not None:
        return value & MASK32
    copied = REGISTERS.get(parts[1])
    return _Copy(copied[0], MASK32) if copied is not None else _UNKNOWN


def routine_addresses(kernel: Kernel) -> dict[int, str]:
    """Canonical addresses of the tag-taking routines this kernel exports (from its ISF).

    Canonical because that is how bound IAT slots and call targets hold them;
    the layer may hand out the kernel base masked to its address width.
    """
    mask = kernel.layer.address_mask
    sign = 1 << (mask.bit_length() - 1)
    out = {}
    for name in TAG_ARGUMENTS:
        if kernel.has_symbol(name):
            address = kernel.symbol_address(name) & mask
            out[address | (MASK64 & ~mask) if address & sign else address] = name
    return out


def scan_drivers(kernel: Kernel, include_kernel: bool = False) -> DriverScanResult:
    """Tags used by each loaded module's code; problems become findings, never exceptions.

    The kernel (the module at the kernel's base) is skipped unless
    ``include_kernel``: it is large and calls its routines directly.
    """
    try:
        import capstone  # noqa: F401  (checked here so a missing install is one clear finding)
    except ImportError:
        return DriverScanResult({}, 0, (Finding(0, "capstone is not installed: driver code cannot be disassembled"),))
    try:
        modules, findings = loaded_modules(kernel)
        routines = routine_addresses(kernel)
    except (*SYMBOLS_MISSING, exceptions.InvalidAddressException) as error:
        return DriverScanResult({}, 0, (Finding(0, f"loaded module list unavailable: {error}"),))
    tags: dict[bytes, set[str]] = {}
    uses: list[TagUse] = []
    scanned = 0
    mask = kernel.layer.address_mask
    for module in modules:
        is_kernel = module.base & mask == kernel.base & mask
        if is_kernel and not include_kernel:
            continue
        try:
            image = read_module_image(kernel, module)
        except exceptions.InvalidAddressException:
            findings.append(Finding(module.base, f"{module.name}: image unreadable"))
            continue
        findings.extend(image.findings)
        if not covers(image.readable, 0, PAGE_SIZE):
            continue
        slots = bound_slots(image.data, module.base, routines) | import_slots(image.data, module.base)
        found = find_tag_uses(image.data, module.base, slots, direct=routines if is_kernel else None,
                              readable=image.readable)
        scanned += 1
        for use in found:
            uses.append(TagUse(use.tag, use.routine, use.call_site, module.name))
            tags.setdefault(use.tag, set()).add(module.name)
    return DriverScanResult(tags, scanned, tuple(findings), tuple(uses))
