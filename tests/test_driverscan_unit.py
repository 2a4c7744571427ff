"""Driver tag scan: hand-encoded call sequences in small PE images, no memory image needed.

The images come from the samples' PE linker; the scanner's pure core reads
them in memory layout, as it reads modules out of a dump.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass

import pytest

from samples import drivers as gen
from samples.flavors import FLAVORS, SYMBOLS
from samples.image import Image
from samples.isf import KernelTypes
from volplugins.pool import driverscan
from volplugins.pool.driverscan import find_tag_uses, plausible_tag
from volplugins.pool.modules import bound_slots, import_slots

BASE = 0xFFFFF80564A00000
KERNEL_BASE = 0xFFFFF80563A00000
ISFS = sorted(SYMBOLS.glob("*.json.xz"))
FAKE_ROUTINES = {name: KERNEL_BASE + 0x10000 * (index + 1) for index, name in enumerate(
    ["ExAllocatePool", "ExAllocatePoolWithTag", "ExAllocatePool2", "ExFreePoolWithTag", "KeBugCheckEx",
     "ExInitializeNPagedLookasideList", "KeQueryPerformanceCounter"])}


def tag(text: str) -> int:
    return gen.tag_value(text.encode())


def scan(text: gen.Assembler, rdata: gen.Assembler | None = None, **options) -> list[driverscan.TagUse]:
    """Link ``text`` into a driver and run the pure scanner with the linker's IAT as the slot map."""
    linked = gen.link_driver(BASE, text, FAKE_ROUTINES.__getitem__, rdata=rdata)
    slots = {address: name for name, address in linked.slots.items()}
    return find_tag_uses(linked.memory(), BASE, slots, **options)


def tags_of(uses) -> set[bytes]:
    return {use.tag for use in uses}


def allocation(text: gen.Assembler, tag_text: str, size: int = 0x40) -> gen.Assembler:
    return text.emit(gen.mov_imm32(gen.R8, tag(tag_text)), gen.mov_imm32(gen.RDX, size), gen.xor_reg32(gen.RCX))


# -- the samples' drivers --------------------------------------------------------


@pytest.fixture(scope="module", params=ISFS, ids=lambda path: path.name[:8])
def kernel_types(request) -> KernelTypes:
    return KernelTypes(request.param)


@pytest.mark.parametrize("program", [gen.pooltst_program, gen.netfake_program], ids=["pooltst", "netfake"])
@pytest.mark.parametrize("discard_init", [False, True], ids=["with-INIT", "INIT-discarded"])
def test_sample_drivers_give_exactly_their_tags(kernel_types, program, discard_init):
    exports = gen.KernelExports(kernel_types)
    built = program(exports)
    linked = gen.link_driver(BASE, built.text, lambda name: KERNEL_BASE + kernel_types.symbol(name), rdata=built.rdata)
    image = linked.memory(discard_init=discard_init)
    routines = {KERNEL_BASE + kernel_types.symbol(name): name
                for name in driverscan.TAG_ARGUMENTS if kernel_types.has_symbol(name)}
    slots = bound_slots(image, BASE, routines) | import_slots(image, BASE)
    found = tags_of(find_tag_uses(image, BASE, slots))
    assert found == set(built.tags)
    assert not found & set(built.decoys)


def test_import_name_table_and_bound_values_agree_on_slots(kernel_types):
    built = gen.pooltst_program(gen.KernelExports(kernel_types))
    linked = gen.link_driver(BASE, built.text, lambda name: KERNEL_BASE + kernel_types.symbol(name), rdata=built.rdata)
    by_name = import_slots(linked.memory(), BASE)
    assert by_name == {address: name for name, address in linked.slots.items()}
    assert import_slots(linked.memory(discard_init=True), BASE) == {}
    routines = {KERNEL_BASE + kernel_types.symbol(name): name for name in linked.slots}
    bound = bound_slots(linked.memory(discard_init=True), BASE, routines)
    assert bound == by_name


def test_decoy_in_rdata_only_is_ignored_but_would_count_in_code():
    code_with_decoy = allocation(gen.Assembler(), "RdOk").call_import("ExAllocatePoolWithTag")
    fake_sequence = allocation(gen.Assembler(), "RdNo").call_import("ExAllocatePoolWithTag")
    assert tags_of(scan(code_with_decoy, rdata=fake_sequence)) == {b"RdOk"}
    assert tags_of(scan(fake_sequence)) == {b"RdNo"}


# -- argument tracking -------------------------------------------------------------


def test_each_path_into_the_call_contributes_its_tag():
    text = gen.Assembler().emit(gen.TEST_BL_BL).jump(gen.JE, "other")
    text.emit(gen.mov_imm32(gen.R8, tag("PthA"))).jump(gen.JMP, "call")
    text.label("other").emit(gen.mov_imm32(gen.R8, tag("PthB")))
    text.label("call").emit(gen.mov_imm32(gen.RDX, 0x20), gen.xor_reg32(gen.RCX)).call_import("ExAllocatePoolWithTag")
    assert tags_of(scan(text)) == {b"PthA", b"PthB"}


def test_a_call_clobbers_volatile_registers_but_not_nonvolatile_ones():
    text = gen.Assembler().emit(gen.mov_imm32(gen.R8, tag("Lost")), gen.mov_imm32(gen.RBX, tag("Kept")))
    text.call_import("KeQueryPerformanceCounter")
    text.emit(gen.mov_imm32(gen.RDX, 0x20), gen.xor_reg32(gen.RCX)).call_import("ExAllocatePoolWithTag")
    text.emit(gen.mov_reg32(gen.R8, gen.RBX), gen.mov_imm32(gen.RDX, 0x20), gen.xor_reg32(gen.RCX))
    text.call_import("ExAllocatePoolWithTag")
    assert tags_of(scan(text)) == {b"Kept"}


def test_values_do_not_flow_across_a_return_or_into_a_function_entry():
    for separator in (b"", gen.INT3 * 3):
        text = gen.Assembler().emit(gen.mov_imm32(gen.R8, tag("Prev")), gen.RET, separator)
        text.emit(gen.mov_imm32(gen.RDX, 0x20), gen.xor_reg32(gen.RCX)).call_import("ExAllocatePoolWithTag")
        assert scan(text) == []


def test_an_unknown_write_between_load_and_call_hides_the_constant():
    text = gen.Assembler().emit(gen.mov_imm32(gen.R8, tag("Gone")), gen.MOV_R8D_DWORD_RBX10)
    text.emit(gen.mov_imm32(gen.RDX, 0x20), gen.xor_reg32(gen.RCX)).call_import("ExAllocatePoolWithTag")
    assert scan(text) == []


def test_a_loop_carries_the_tag_in_a_register_around_the_back_edge():
    text = gen.Assembler().emit(gen.mov_imm32(gen.RSI, tag("Loop")), gen.mov_imm32(gen.RDI, 4))
    text.label("top").emit(gen.mov_reg32(gen.R8, gen.RSI), gen.mov_imm32(gen.RDX, 0x20), gen.xor_reg32(gen.RCX))
    text.call_import("ExAllocatePoolWithTag").emit(gen.DEC_EDI).jump(gen.JNE, "top").emit(gen.RET)
    uses = scan(text)
    assert [(use.tag, use.routine) for use in uses] == [(b"Loop", "ExAllocatePoolWithTag")]


def test_free_with_tag_counts_the_second_argument():
    text = gen.Assembler().emit(gen.mov_imm32(gen.RDX, tag("Free")), gen.mov_imm32(gen.R8, tag("NotA")))
    text.emit(gen.mov_reg64(gen.RCX, gen.RBX)).call_import("ExFreePoolWithTag")
    assert [(use.tag, use.routine) for use in scan(text)] == [(b"Free", "ExFreePoolWithTag")]


def test_tag_like_argument_of_another_routine_is_not_a_tag():
    text = gen.Assembler().emit(gen.mov_imm32(gen.R8, tag("BugC")), gen.mov_imm32(gen.RDX, tag("BugD")),
                                gen.mov_imm32(gen.RCX, 0xC2)).call_import("KeBugCheckEx")
    assert scan(text) == []


def test_sign_extended_immediate_keeps_a_protected_tag():
    protected = b"Pro" + bytes([ord("t") | 0x80])
    text = gen.Assembler().emit(gen.mov_imm64_sx(gen.R8, gen.tag_value(protected)), gen.mov_imm32(gen.RDX, 0x20),
                                gen.mov_imm32(gen.RCX, 0x40)).call_import("ExAllocatePool2")
    assert tags_of(scan(text)) == {protected}


def test_untagged_allocation_uses_tag_none():
    text = gen.Assembler().emit(gen.mov_imm32(gen.RDX, 0x20), gen.xor_reg32(gen.RCX)).call_import("ExAllocatePool")
    assert [(use.tag, use.routine) for use in scan(text)] == [(b"None", "ExAllocatePool")]


def test_stack_argument_is_lost_when_rsp_moves():
    text = gen.Assembler().emit(gen.SUB_RSP_48, gen.mov_stack_imm32(0x28, tag("LkOk")))
    text.rip(gen.LEA_RCX_RIP, "data").call_import("ExInitializeNPagedLookasideList").emit(gen.ADD_RSP_48, gen.RET)
    text.align().emit(gen.mov_stack_imm32(0x28, tag("LkNo")), gen.SUB_RSP_48)
    text.call_import("ExInitializeNPagedLookasideList").emit(gen.ADD_RSP_48, gen.RET)
    assert tags_of(scan(text)) == {b"LkOk"}


def test_undecodable_bytes_do_not_stop_the_sweep():
    text = gen.Assembler().emit(b"\x06\x07\x27\x2f\xd6")  # invalid in 64-bit mode
    allocation(text, "Aftr").call_import("ExAllocatePoolWithTag")
    assert tags_of(scan(text)) == {b"Aftr"}


def test_direct_calls_count_only_with_a_routine_map():
    text = gen.Assembler()
    allocation(text, "Kern")
    call_site = BASE + 0x1000 + len(text.code)
    target = FAKE_ROUTINES["ExAllocatePoolWithTag"]
    text.emit(b"\xe8" + struct.pack("<i", target - (call_site + 5)))
    direct = {target: "ExAllocatePoolWithTag"}
    assert [(u.tag, u.call_site) for u in scan(text, direct=direct)] == [(b"Kern", call_site)]
    assert scan(text) == []


def test_unreadable_code_is_not_disassembled():
    text = allocation(gen.Assembler(), "Hide").call_import("ExAllocatePoolWithTag")
    assert scan(text, readable=[(0, 0x1000)]) == []
    assert tags_of(scan(text, readable=[(0, 0x2000)])) == {b"Hide"}


@pytest.mark.parametrize("candidate, plausible", [
    (b"Irp ", True), (b"PtsA", True), (b"Pro\xf4", True), (b"    ", False), (b"\x00\x01\x00\x00", False),
    (b"Ab\xe7c", False), (b"abc", False),
])
def test_plausible_tag(candidate, plausible):
    assert plausible_tag(candidate) is plausible


def test_bad_input_gives_nothing_and_raises_nothing():
    rng = random.Random(7)
    noise = bytes(rng.randrange(256) for _ in range(0x3000))
    assert find_tag_uses(b"", BASE, {}) == []
    assert find_tag_uses(noise, BASE, {}) == []
    assert find_tag_uses(b"MZ" + noise[2:], BASE, {}) == []
    assert import_slots(noise, BASE) == {}
    assert import_slots(b"MZ", BASE) == {}
    assert bound_slots(noise[:13], BASE, {1: "x"}) == {}


# -- the loader list written into an image ---------------------------------------


@dataclass
class StandIn:
    address: int
    body: int


@pytest.mark.parametrize("flavor", sorted(FLAVORS))
def test_write_modules_builds_the_loader_ring_and_the_driver_images(flavor):
    image = Image(FLAVORS[flavor], 3, 32 << 20)
    cursor = [image.flavor.regions["NonPagedPool"][0]]
    tags = []

    def allocate(size: int, pool_tag: bytes) -> StandIn:
        tags.append(pool_tag)
        allocation = StandIn(cursor[0], cursor[0] + 0x10)
        cursor[0] += (size + 0x1F) // 0x10 * 0x10
        return allocation

    drivers = gen.write_modules(image, allocate)
    space, types = image.space, image.types
    entry_type = gen.loader_entry_type(types)
    head = image.symbol("PsLoadedModuleList")

    def u64(address: int) -> int:
        return int.from_bytes(space.read(address, 8), "little")

    def unicode(entry: int, name: str) -> str:
        length = int.from_bytes(space.read(entry + image.offset(entry_type, f"{name}.Length"), 2), "little")
        return space.read(u64(entry + image.offset(entry_type, f"{name}.Buffer")), length).decode("utf-16-le")

    links = image.offset(entry_type, "InLoadOrderLinks")
    entries, link = [], u64(head)
    while link != head:
        assert u64(u64(link) + 8) == link  # Flink->Blink comes back
        entries.append(link - links)
        link = u64(link)
    assert tags == [gen.LOADER_TAG] * 3
    names = [unicode(entry, "BaseDllName") for entry in entries]
    assert names == ["ntoskrnl.exe", "pooltst.sys", "netfake.sys"]
    assert unicode(entries[0], "FullDllName") == gen.KERNEL_PATH
    assert u64(entries[0] + image.offset(entry_type, "DllBase")) == image.kernel_base
    kernel_end = image.kernel_base + gen.kernel_image_size(types)
    region_base, region_size = image.flavor.regions["SystemImages"]
    previous_end = kernel_end
    routines = {image.kernel_base + types.symbol(name): name
                for name in driverscan.TAG_ARGUMENTS if types.has_symbol(name)}
    for entry, driver in zip(entries[1:], drivers):
        base, size = driver["base"], driver["size"]
        assert u64(entry + image.offset(entry_type, "DllBase")) == base
        assert base % 0x1000 == 0 and previous_end <= base and base + size <= region_base + region_size
        previous_end = base + size
        assert space.is_mapped(driver["init"]) is not driver["init_discarded"]
        memory = space.read(base, size)
        slots = bound_slots(memory, base, routines) | import_slots(memory, base)
        found = {use.tag.decode() for use in find_tag_uses(memory, base, slots)}
        assert found == set(driver["tags"])
    assert image.manifest.drivers == drivers
    assert [module["name"] for module in image.manifest.extras["modules"]] == names
