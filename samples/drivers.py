"""Loaded kernel modules: the loader list and driver images whose code allocates pool.

``PsLoadedModuleList`` heads a ring of loader entries (``_KLDR_DATA_TABLE_ENTRY``
from Windows 10 on, ``_LDR_DATA_TABLE_ENTRY`` before) linked through
``InLoadOrderLinks``; the kernel comes first.  Each entry sits in a nonpaged
``MmLd`` allocation followed by its full path, and ``BaseDllName`` points
into that path at the file name, as the loader lays it out.

The fake drivers are real PE32+ images whose ``.text`` holds the x64 code a
compiler emits around pool calls: arguments in rcx, rdx, r8, r9 then on the
stack, calls through the import address table (``call [rip+disp32]``), the
tag loaded with ``mov r8d, imm32`` or ``mov r8, simm32``, sometimes several
instructions before the call, across a branch, through a nonvolatile register
in a loop, through a register holding the import, or as a tail jump.  Each
driver also carries decoys: tag-like constants that are *not* tags of its
allocations (an argument of ``KeBugCheckEx``, a signature stored into a
structure or compared against, a fake call sequence inside ``.rdata``).

The rule the ground truth follows: a driver uses a tag when the tag is the
tag argument of an allocation routine it calls, of ``ExFreePoolWithTag``
(freeing with a tag names the owner's tag), or of a lookaside-list
initializer.  Import descriptors and their name table sit in the ``INIT``
section, which the kernel discards after ``DriverEntry``; ``netfake.sys``
models that: its ``INIT`` pages are not in memory, only the bound IAT is.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .image import Image
from .isf import KernelTypes
from .manifest import tag_text
from .pe import CODE_CHARACTERISTICS, DATA_CHARACTERISTICS, RDATA_CHARACTERISTICS, PeImage, codeview_section

LOADER_TAG = b"MmLd"
KERNEL_FILE = "ntoskrnl.exe"
KERNEL_PATH = "\\SystemRoot\\system32\\ntoskrnl.exe"
DRIVER_DIRECTORY = "\\SystemRoot\\system32\\drivers\\"
PAGE = 0x1000
DRIVER_ALIGNMENT = 0x10000
DISCARDABLE = 0x02000000
INIT_CHARACTERISTICS = CODE_CHARACTERISTICS | DISCARDABLE
IMPORT_DIRECTORY = 1
IAT_DIRECTORY = 12
IMPORT_DESCRIPTOR_SIZE = 20
LOADER_FLAGS = 0x49104000  # image-dll | entry-processed | load-config-processed, as on live systems

# Register numbers of the x64 encoding.
RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI = range(8)
R8, R9 = 8, 9

# Constant instructions, encoded by hand (the mnemonic is in the name).
SUB_RSP_28 = bytes.fromhex("4883ec28")
ADD_RSP_28 = bytes.fromhex("4883c428")
SUB_RSP_38 = bytes.fromhex("4883ec38")
SUB_RSP_48 = bytes.fromhex("4883ec48")
ADD_RSP_48 = bytes.fromhex("4883c448")
SUB_RSP_20 = bytes.fromhex("4883ec20")
ADD_RSP_20 = bytes.fromhex("4883c420")
PUSH_RBX, PUSH_RSI, PUSH_RDI = b"\x53", b"\x56", b"\x57"
POP_RBX, POP_RSI, POP_RDI = b"\x5b", b"\x5e", b"\x5f"
RET = b"\xc3"
INT3 = b"\xcc"
NOP5 = bytes.fromhex("0f1f440000")  # nop dword ptr [rax+rax]: the import-optimization pad after an IAT call
TEST_RAX_RAX = bytes.fromhex("4885c0")
TEST_BL_BL = bytes.fromhex("84db")
AND_QWORD_RSP20_ZERO = bytes.fromhex("488364242000")  # and qword ptr [rsp+20h], 0 (fifth argument)
AND_DWORD_RSP20_ZERO = bytes.fromhex("8364242000")  # and dword ptr [rsp+20h], 0
MOV_R8D_DWORD_RBX10 = bytes.fromhex("448b4310")  # mov r8d, dword ptr [rbx+10h]
MOV_QWORD_RBX_RAX = bytes.fromhex("488903")  # mov qword ptr [rbx], rax
ADD_RBX_8 = bytes.fromhex("4883c308")
DEC_EDI = bytes.fromhex("ffcf")
LEA_EDX_RAX20 = bytes.fromhex("8d5020")  # lea edx, [rax+20h]
MOV_RSP8_RBX = bytes.fromhex("48895c2408")  # mov qword ptr [rsp+8], rbx
MOV_RBX_RSP30 = bytes.fromhex("488b5c2430")  # mov rbx, qword ptr [rsp+30h]
XOR_EAX_EAX = bytes.fromhex("33c0")
MOV_EAX_1 = bytes.fromhex("b801000000")
ENTRY_STUB = XOR_EAX_EAX + RET  # DriverEntry returning STATUS_SUCCESS
ENTRY_STUB_SIZE = 16

# Two-byte opcodes of the rip-relative forms used below.
CALL_RIP = b"\xff\x15"  # call qword ptr [rip+disp32]
JMP_RIP = b"\x48\xff\x25"  # rex.W jmp qword ptr [rip+disp32]: tail call through the IAT
MOV_RAX_RIP = b"\x48\x8b\x05"  # mov rax, qword ptr [rip+disp32]
LEA_RCX_RIP = b"\x48\x8d\x0d"  # lea rcx, [rip+disp32]
CALL_RAX = b"\xff\xd0"
JE, JNE, JMP = 0x74, 0x75, 0xEB

POOL_FLAG_NON_PAGED = 0x40  # ExAllocatePool2 flags (wdm.h)
NORMAL_POOL_PRIORITY = 16


def tag_value(tag: bytes) -> int:
    """A tag as the 32-bit immediate a compiler emits for a ``'abcd'`` multi-character constant."""
    return int.from_bytes(tag, "little")


def mov_imm32(register: int, value: int) -> bytes:
    """``mov r32, imm32`` (B8+r, REX.B for r8d..r15d): zero-extends into the full register."""
    prefix = b"\x41" if register >= 8 else b""
    return prefix + bytes([0xB8 + (register & 7)]) + struct.pack("<I", value & 0xFFFFFFFF)


def mov_imm64_sx(register: int, value: int) -> bytes:
    """``mov r64, simm32`` (REX.W C7 /0): the immediate is sign-extended to 64 bits."""
    return bytes([0x48 | (register >> 3), 0xC7, 0xC0 | (register & 7)]) + struct.pack("<I", value & 0xFFFFFFFF)


def mov_reg32(target: int, source: int) -> bytes:
    """``mov r32, r32`` (8B /r)."""
    rex = 0x40 | ((target >> 3) << 2) | (source >> 3)
    return (bytes([rex]) if rex != 0x40 else b"") + bytes([0x8B, 0xC0 | ((target & 7) << 3) | (source & 7)])


def mov_reg64(target: int, source: int) -> bytes:
    """``mov r64, r64`` (REX.W 8B /r)."""
    rex = 0x48 | ((target >> 3) << 2) | (source >> 3)
    return bytes([rex, 0x8B, 0xC0 | ((target & 7) << 3) | (source & 7)])


def xor_reg32(register: int) -> bytes:
    """``xor r32, r32``: how compilers load zero."""
    rex = 0x40 | ((register >> 3) << 2) | (register >> 3)
    return (bytes([rex]) if rex != 0x40 else b"") + bytes([0x33, 0xC0 | ((register & 7) << 3) | (register & 7)])


def mov_stack_imm32(offset: int, value: int) -> bytes:
    """``mov dword ptr [rsp+disp8], imm32``: how stack arguments (the fifth on) are passed."""
    return bytes([0xC7, 0x44, 0x24, offset]) + struct.pack("<I", value & 0xFFFFFFFF)


def mov_rbx_field_imm32(offset: int, value: int) -> bytes:
    """``mov dword ptr [rbx+disp8], imm32``: a constant stored into a structure."""
    return bytes([0xC7, 0x43, offset]) + struct.pack("<I", value & 0xFFFFFFFF)


def cmp_rcx_imm32(value: int) -> bytes:
    """``cmp dword ptr [rcx], imm32``: a signature check."""
    return b"\x81\x39" + struct.pack("<I", value & 0xFFFFFFFF)


def cmp_r8d_imm32(value: int) -> bytes:
    """``cmp r8d, imm32``: reads the tag register without writing it."""
    return b"\x41\x81\xf8" + struct.pack("<I", value & 0xFFFFFFFF)


@dataclass
class Assembler:
    """Bytes of one section, with rip-relative references and short jumps resolved at link time.

    ``rip(prefix, symbol)`` emits ``prefix`` + disp32 where the displacement
    reaches ``symbol`` (an RVA chosen at link time: ``"iat:<routine>"`` for
    an import slot, ``"data"`` for ``.data``) from the end of the instruction.
    """

    code: bytearray = field(default_factory=bytearray)
    references: list[tuple[int, str]] = field(default_factory=list)  # (disp32 position, symbol)
    labels: dict[str, int] = field(default_factory=dict)
    jumps: list[tuple[int, str]] = field(default_factory=list)  # (rel8 position, label)

    def emit(self, *parts: bytes) -> "Assembler":
        for part in parts:
            self.code += part
        return self

    def rip(self, prefix: bytes, symbol: str) -> "Assembler":
        self.code += prefix
        self.references.append((len(self.code), symbol))
        self.code += b"\0\0\0\0"
        return self

    def call_import(self, name: str) -> "Assembler":
        return self.rip(CALL_RIP, f"iat:{name}")

    def label(self, name: str) -> "Assembler":
        self.labels[name] = len(self.code)
        return self

    def jump(self, opcode: int, label: str) -> "Assembler":
        self.code.append(opcode)
        self.jumps.append((len(self.code), label))
        self.code.append(0)
        return self

    def align(self, boundary: int = 16) -> "Assembler":
        """Pad with int3 between functions, as linkers do."""
        self.code += INT3 * (-len(self.code) % boundary)
        return self

    def imports(self) -> list[str]:
        return sorted({symbol[4:] for _, symbol in self.references if symbol.startswith("iat:")})

    def link(self, rva: int, symbols: dict[str, int]) -> bytes:
        out = bytearray(self.code)
        for position, symbol in self.references:
            struct.pack_into("<i", out, position, symbols[symbol] - (rva + position + 4))
        for position, label in self.jumps:
            distance = self.labels[label] - (position + 1)
            if not -128 <= distance < 128:
                raise ValueError(f"short jump to {label} out of range")
            struct.pack_into("<b", out, position, distance)
        return bytes(out)


@dataclass
class LinkedDriver:
    """A driver image laid out at its base: the PE, where its IAT slots are, which section is ``INIT``."""

    pe: PeImage
    slots: dict[str, int]  # import name -> IAT slot VA
    init_rva: int
    init_size: int

    def memory(self, discard_init: bool = False) -> bytes:
        """The image as loaded (offset = RVA); a discarded ``INIT`` reads as zeros."""
        out = bytearray(self.pe.size_of_image)
        out[: len(self.pe.headers())] = self.pe.headers()
        for section in self.pe.sections:
            if discard_init and section.rva == self.init_rva:
                continue
            out[section.rva : section.rva + len(section.data)] = section.data
        return bytes(out)

    def write_to(self, space, discard_init: bool = False) -> None:
        space.write(self.pe.base, self.pe.headers())
        for section in self.pe.sections:
            if not (discard_init and section.rva == self.init_rva):
                space.write(self.pe.base + section.rva, section.data)


def link_driver(
    base: int,
    text: Assembler,
    resolve: Callable[[str], int],
    *,
    rdata: Assembler | None = None,
    data_size: int = PAGE,
    pdb_name: str = "driver.pdb",
    guid: str = "00000000-0000-0000-0000-000000000000",
    dll: str = KERNEL_FILE,
    os_version: tuple[int, int] = (10, 0),
) -> LinkedDriver:
    """Lay out ``.text``, ``.rdata`` (IAT first), ``.data``, a CodeView record and ``INIT``; bind the IAT.

    ``resolve(name)`` is the address the loader bound each import to.
    ``INIT`` holds a ``DriverEntry`` stub, the import descriptor, the name
    table and the hint/name entries, as in linked drivers.
    """
    rdata = rdata or Assembler()
    names = sorted(set(text.imports()) | set(rdata.imports()))
    pe = PeImage(base=base, os_version=os_version)
    text_rva = pe.next_rva()
    rdata_rva = text_rva + _align(max(len(text.code), 1), PAGE)
    iat_size = 8 * (len(names) + 1)
    symbols = {f"iat:{name}": rdata_rva + 8 * index for index, name in enumerate(names)}
    data_rva = rdata_rva + _align(iat_size + len(rdata.code), PAGE)
    symbols["data"] = data_rva
    pe.add_section(b".text", text.link(text_rva, symbols), CODE_CHARACTERISTICS)
    iat = b"".join(struct.pack("<Q", resolve(name)) for name in names) + bytes(8)
    pe.add_section(b".rdata", iat + rdata.link(rdata_rva + iat_size, symbols), RDATA_CHARACTERISTICS)
    pe.add_section(b".data", bytes(data_size), DATA_CHARACTERISTICS)
    codeview_section(pe, guid, 1, pdb_name)
    init_rva = pe.next_rva()
    init = _init_section(init_rva, names, rdata_rva, dll)
    pe.add_section(b"INIT", init, INIT_CHARACTERISTICS)
    pe.entry_rva = init_rva
    pe.directories[IMPORT_DIRECTORY] = (init_rva + ENTRY_STUB_SIZE, 2 * IMPORT_DESCRIPTOR_SIZE)
    pe.directories[IAT_DIRECTORY] = (rdata_rva, iat_size)
    slots = {name: base + rdata_rva + 8 * index for index, name in enumerate(names)}
    return LinkedDriver(pe, slots, init_rva, len(init))


def _init_section(rva: int, names: Sequence[str], iat_rva: int, dll: str) -> bytes:
    """DriverEntry stub, then one import descriptor (+ null), the name table and the names."""
    stub = ENTRY_STUB + INT3 * (ENTRY_STUB_SIZE - len(ENTRY_STUB))
    descriptors_rva = rva + ENTRY_STUB_SIZE
    int_rva = descriptors_rva + 2 * IMPORT_DESCRIPTOR_SIZE
    hints_rva = int_rva + 8 * (len(names) + 1)
    hints = bytearray()
    thunks = bytearray()
    for name in names:
        thunks += struct.pack("<Q", hints_rva + len(hints))
        entry = struct.pack("<H", 0) + name.encode() + b"\0"
        hints += entry + b"\0" * (len(entry) % 2)
    thunks += bytes(8)
    dll_rva = hints_rva + len(hints)
    descriptor = struct.pack("<IIIII", int_rva, 0, 0, dll_rva, iat_rva) + bytes(IMPORT_DESCRIPTOR_SIZE)
    return stub + descriptor + bytes(thunks) + bytes(hints) + dll.encode() + b"\0"


# -- the fake drivers' code --------------------------------------------------


@dataclass(frozen=True)
class KernelExports:
    """What the code generator needs of the image's kernel: its exports and pool type values."""

    types: KernelTypes

    def has(self, function: str) -> bool:
        return self.types.has_symbol(function)

    def pool_type(self, name: str, fallback: str) -> int:
        """A ``POOL_TYPE`` constant from the ISF (``NonPagedPoolNx`` only exists from Windows 8)."""
        try:
            return self.types.enum("_POOL_TYPE", name)
        except KeyError:
            return self.types.enum("_POOL_TYPE", fallback)


@dataclass(frozen=True)
class DriverProgram:
    text: Assembler
    rdata: Assembler
    tags: tuple[bytes, ...]  # tags the driver allocates, frees or initializes lookasides with
    decoys: tuple[bytes, ...]  # tag-like constants that are not its tags


def pooltst_program(kernel: KernelExports) -> DriverProgram:
    """Direct IAT calls: canonical order, interleaved, REX.W immediate, branch join, a free; three decoys."""
    nonpaged = kernel.pool_type("NonPagedPoolNx", "NonPagedPool")
    paged = kernel.pool_type("PagedPool", "PagedPool")
    text = Assembler()
    # PtsA: the canonical sequence, tag loaded first, then size, then pool type.
    text.emit(SUB_RSP_28, mov_imm32(R8, tag_value(b"PtsA")), mov_imm32(RDX, 0x100), mov_imm32(RCX, nonpaged))
    text.call_import("ExAllocatePoolWithTag").emit(NOP5, ADD_RSP_28, RET).align()
    # PtsB: tag set early, unrelated instructions before the call (quota-charged allocation).
    text.emit(MOV_RSP8_RBX, SUB_RSP_28, mov_imm32(R8, tag_value(b"PtsB")), mov_reg64(RBX, RCX), LEA_EDX_RAX20,
              mov_imm32(RCX, paged))
    text.call_import("ExAllocatePoolWithQuotaTag").emit(mov_reg64(RCX, RBX), ADD_RSP_28, MOV_RBX_RSP30, RET).align()
    # PtsC: ``mov r8, simm32`` (REX.W C7) instead of ``mov r8d``.
    text.emit(SUB_RSP_28, mov_imm64_sx(R8, tag_value(b"PtsC")), mov_imm32(RDX, 0x80))
    if kernel.has("ExAllocatePool2"):
        text.emit(mov_imm32(RCX, POOL_FLAG_NON_PAGED)).call_import("ExAllocatePool2")
    else:
        text.emit(mov_imm32(R9, NORMAL_POOL_PRIORITY), xor_reg32(RCX)).call_import("ExAllocatePoolWithTagPriority")
    text.emit(ADD_RSP_28, RET).align()
    # PtsD: the tag is loaded before a branch choosing the pool type; both paths reach the call.
    text.emit(SUB_RSP_28, mov_imm32(R8, tag_value(b"PtsD")), mov_imm32(RDX, 0x60), TEST_BL_BL)
    text.jump(JE, "paged").emit(mov_imm32(RCX, nonpaged)).jump(JMP, "call")
    text.label("paged").emit(mov_imm32(RCX, paged))
    text.label("call").call_import("ExAllocatePoolWithTag").emit(ADD_RSP_28, RET).align()
    # Freeing with a tag: the tag is the second argument (edx).
    text.emit(SUB_RSP_28, mov_imm32(RDX, tag_value(b"PtsB")), mov_reg64(RCX, RBX))
    text.call_import("ExFreePoolWithTag").emit(ADD_RSP_28, RET).align()
    # Decoy: a tag-like bug check parameter in r8d, passed to a routine that allocates nothing.
    text.emit(SUB_RSP_38, AND_QWORD_RSP20_ZERO, mov_reg64(R9, RBX), mov_imm32(R8, tag_value(b"Dcy1")),
              mov_imm32(RDX, 1), mov_imm32(RCX, 0xDEADDEAD))
    text.call_import("KeBugCheckEx").emit(INT3).align()
    # Decoy: a signature stored into the structure; the tag comes from a field, unknown statically.
    text.emit(MOV_RSP8_RBX, SUB_RSP_28, mov_reg64(RBX, RCX), mov_rbx_field_imm32(0x14, tag_value(b"Dcy2")),
              MOV_R8D_DWORD_RBX10, mov_imm32(RDX, 0x40), xor_reg32(RCX))
    text.call_import("ExAllocatePoolWithTag").emit(ADD_RSP_28, MOV_RBX_RSP30, RET).align()
    # Decoy: a signature compared against.
    text.emit(cmp_rcx_imm32(tag_value(b"Dcy3"))).jump(JNE, "bad").emit(MOV_EAX_1, RET)
    text.label("bad").emit(XOR_EAX_EAX, RET).align()
    # Decoy outside code: bytes of an allocation sequence inside .rdata.
    rdata = Assembler().emit(mov_imm32(R8, tag_value(b"Dcy4")), mov_imm32(RDX, 0x100), xor_reg32(RCX))
    rdata.call_import("ExAllocatePoolWithTag")
    return DriverProgram(text, rdata, (b"PtsA", b"PtsB", b"PtsC", b"PtsD"), (b"Dcy1", b"Dcy2", b"Dcy3", b"Dcy4"))


def netfake_program(kernel: KernelExports) -> DriverProgram:
    """Loop through a nonvolatile register, call through rax, lookaside on the stack, tail jump."""
    nonpaged = kernel.pool_type("NonPagedPoolNx", "NonPagedPool")
    text = Assembler()
    # NfkR: the tag lives in esi across a loop; each iteration copies it to r8d.
    text.emit(PUSH_RBX, PUSH_RSI, PUSH_RDI, SUB_RSP_20, mov_imm32(RSI, tag_value(b"NfkR")), mov_imm32(RDI, 8),
              mov_reg64(RBX, RCX))
    text.label("loop").emit(mov_reg32(R8, RSI), mov_imm32(RDX, 0x200), mov_imm32(RCX, nonpaged))
    text.call_import("ExAllocatePoolWithTag").emit(NOP5, TEST_RAX_RAX).jump(JE, "out")
    text.emit(MOV_QWORD_RBX_RAX, ADD_RBX_8, DEC_EDI).jump(JNE, "loop")
    text.label("out").emit(ADD_RSP_20, POP_RDI, POP_RSI, POP_RBX, RET).align()
    # NfkQ: the import loaded into rax, then ``call rax``.
    text.emit(SUB_RSP_28).rip(MOV_RAX_RIP, "iat:ExAllocatePoolWithTagPriority")
    text.emit(mov_imm32(R9, NORMAL_POOL_PRIORITY), mov_imm32(R8, tag_value(b"NfkQ")), mov_imm32(RDX, 0x100),
              xor_reg32(RCX), CALL_RAX, ADD_RSP_28, RET).align()
    # NfkL: ExInitializeLookasideListEx takes the tag as its seventh argument, [rsp+30h].
    text.emit(SUB_RSP_48, mov_stack_imm32(0x38, 0), mov_stack_imm32(0x30, tag_value(b"NfkL")),
              mov_stack_imm32(0x28, 0x58), AND_DWORD_RSP20_ZERO, mov_imm32(R9, nonpaged), xor_reg32(R8),
              xor_reg32(RDX))
    text.rip(LEA_RCX_RIP, "data").call_import("ExInitializeLookasideListEx").emit(ADD_RSP_48, RET).align()
    # NfkT: a wrapper ending in a tail jump through the IAT; a compare reads r8d in between.
    text.emit(mov_imm32(R8, tag_value(b"NfkT")), cmp_r8d_imm32(tag_value(b"Dcy6")), mov_imm32(RDX, 0x30),
              mov_imm32(RCX, nonpaged)).rip(JMP_RIP, "iat:ExAllocatePoolWithTag").align()
    # Freeing NfkR objects.
    text.emit(SUB_RSP_28, mov_imm32(RDX, tag_value(b"NfkR")), mov_reg64(RCX, RAX))
    text.call_import("ExFreePoolWithTag").emit(ADD_RSP_28, RET).align()
    return DriverProgram(text, Assembler(), (b"NfkR", b"NfkQ", b"NfkL", b"NfkT"), (b"Dcy6",))


@dataclass(frozen=True)
class DriverSpec:
    file_name: str
    program: Callable[[KernelExports], DriverProgram]
    discard_init: bool
    guid: str

    @property
    def service(self) -> str:
        return self.file_name.rsplit(".", 1)[0]


DRIVERS = (
    DriverSpec("pooltst.sys", pooltst_program, False, "5d1c8a4e-2b7f-4c3a-9e61-0f2a7b3c4d51"),
    DriverSpec("netfake.sys", netfake_program, True, "a3e0b6c2-71d4-4f0e-8b25-c9d84e1f6a07"),
)


# -- the loader list ---------------------------------------------------------


@dataclass(frozen=True)
class Module:
    file_name: str
    full_name: str
    base: int
    size: int
    entry_point: int


def kernel_image_size(types: KernelTypes) -> int:
    """SizeOfImage of the kernel: every symbol of its ISF lies inside, rounded up to a page."""
    largest = max(symbol["address"] for symbol in types._symbols.values())
    return _align(largest + 1, PAGE)


def loader_entry_type(types: KernelTypes) -> str:
    """The kernel's loader entry: ``_KLDR_DATA_TABLE_ENTRY`` where the PDB has it (Windows 10 on)."""
    return "_KLDR_DATA_TABLE_ENTRY" if types.has_type("_KLDR_DATA_TABLE_ENTRY") else "_LDR_DATA_TABLE_ENTRY"


def write_modules(image: Image, allocate) -> list[dict]:
    """Write the drivers' images and the ``PsLoadedModuleList`` ring; return the drivers.

    ``allocate(size, tag)`` returns an allocation with ``address`` (pool
    header) and ``body``; loader entries come from nonpaged ``MmLd`` chunks.
    Each returned dict names a driver (``service`` for its driver object),
    its image range and the tags its code uses; the same dicts go to
    ``manifest.drivers``; the whole list, kernel first, to
    ``manifest.extras["modules"]``.
    """
    kernel_size = kernel_image_size(image.types)
    entry = image.kernel_base + image.types.symbol("KiSystemStartup") if image.types.has_symbol("KiSystemStartup") else 0
    modules = [Module(KERNEL_FILE, KERNEL_PATH, image.kernel_base, kernel_size, entry)]
    kernel = KernelExports(image.types)
    region_base, region_size = image.flavor.regions["SystemImages"]
    base = _align(image.kernel_base + kernel_size, DRIVER_ALIGNMENT) + DRIVER_ALIGNMENT
    drivers: list[dict] = []
    for spec in DRIVERS:
        program = spec.program(kernel)
        linked = link_driver(base, program.text, lambda name: image.kernel_base + image.types.symbol(name),
                             rdata=program.rdata, pdb_name=f"{spec.service}.pdb", guid=spec.guid,
                             os_version=(image.flavor.major, image.flavor.minor))
        size = linked.pe.size_of_image
        if base + size > region_base + region_size:
            raise ValueError(f"{spec.file_name} does not fit in the system image region")
        linked.write_to(image.space, discard_init=spec.discard_init)
        module = Module(spec.file_name, DRIVER_DIRECTORY + spec.file_name, base, size,
                        base + linked.pe.entry_rva)
        modules.append(module)
        drivers.append({
            "name": spec.file_name, "service": spec.service, "full_name": module.full_name, "base": base,
            "size": size, "tags": [tag_text(tag) for tag in program.tags],
            "decoys": [tag_text(tag) for tag in program.decoys], "init_discarded": spec.discard_init,
            "init": base + linked.init_rva,
        })
        base = _align(base + size, DRIVER_ALIGNMENT) + DRIVER_ALIGNMENT
    entries = [_write_loader_entry(image, allocate, module) for module in modules]
    links = image.offset(loader_entry_type(image.types), "InLoadOrderLinks")
    _link_ring(image, image.symbol("PsLoadedModuleList"), [entry + links for entry in entries])
    image.manifest.drivers.extend(drivers)
    image.manifest.extras["modules"] = [
        {"name": module.file_name, "full_name": module.full_name, "base": module.base, "size": module.size,
         "entry": entry}
        for module, entry in zip(modules, entries)
    ]
    return drivers


def _write_loader_entry(image: Image, allocate, module: Module) -> int:
    """One loader entry with its path after it; ``BaseDllName`` shares the path's buffer."""
    type_name = loader_entry_type(image.types)
    entry_size = image.types.size(type_name)
    path = module.full_name.encode("utf-16-le")
    allocation = allocate(entry_size + len(path) + 2, LOADER_TAG)
    entry = allocation.body
    buffer = entry + entry_size
    file_offset = len(path) - 2 * len(module.file_name)
    image.space.write(entry, bytes(entry_size))
    image.space.write(buffer, path + b"\0\0")
    image.put(entry, type_name, {
        "DllBase": module.base,
        "EntryPoint": module.entry_point,
        "SizeOfImage": module.size,
        "FullDllName.Length": len(path),
        "FullDllName.MaximumLength": len(path) + 2,
        "FullDllName.Buffer": buffer,
        "BaseDllName.Length": len(path) - file_offset,
        "BaseDllName.MaximumLength": len(path) - file_offset + 2,
        "BaseDllName.Buffer": buffer + file_offset,
        "Flags": LOADER_FLAGS,
        # Windows 8.1's user-mode loader moved the count to its DDAG node; the kernel keeps the old slot.
        "LoadCount" if image.types.has_field(type_name, "LoadCount") else "ObsoleteLoadCount": 1,
    })
    return entry


def _link_ring(image: Image, head: int, links: list[int]) -> None:
    ring = [head, *links]
    for position, link in enumerate(ring):
        image.space.write_u64(link, ring[(position + 1) % len(ring)])
        image.space.write_u64(link + 8, ring[position - 1])


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment
