"""windows.poolowner names exactly the manifest's allocation for addresses inside it, and says why otherwise."""

from __future__ import annotations

import json
import random

import pytest

from volplugins.pool import exits, owner, regions, segheap
from volplugins.pool.kernel import Kernel
from volplugins.pool.tags import tag_text, tag_windbg
from volrun import cli_json, run_cli

SEED_ADDRESS = 0xFFFFDC0155E94340
# WinDbg's transcript of !pool ffffdc0155e94340 on the modeled build.
SEED_TRANSCRIPT = [
    (False, 0xFFFFDC0155E94000, 0x250, 0, "Allocated", "MmCi"),
    (False, 0xFFFFDC0155E94250, 0x60, 0, "Free", "7+.#"),
    (True, 0xFFFFDC0155E942C0, 0xD00, 0, "Allocated", "Proc"),
    (False, 0xFFFFDC0155E94FC0, 0x20, 0, "Free", ".+.#"),
]
SAMPLED = 150


def owned_allocations(sample):
    """Allocations a lookup can name: live or free chunks, and big allocations."""
    return [a for a in sample.manifest["allocations"] if a["size"] > 0]


def probe_addresses(allocation):
    start, size = allocation["address"], allocation["size"]
    return {start, start + size - 1, start + size // 2}


def test_seed_page_reproduces_the_transcript(samples):
    sample = samples["win10-19041"]
    answer = owner.find_owner(sample.kernel, SEED_ADDRESS)
    assert answer.region == "Nonpaged pool"
    page = SEED_ADDRESS & ~0xFFF
    listed = [
        (chunk == answer.owner, chunk.address, chunk.size, chunk.previous_size, chunk.state.value, tag_windbg(chunk.tag))
        for chunk in answer.chunks
        if chunk.address & ~0xFFF == page
    ]
    assert listed == SEED_TRANSCRIPT
    assert answer.object is not None and answer.object.describe() == "Process MsMpEng.exe pid 3476"


def test_seed_page_through_the_command_line(samples):
    sample = samples["win10-19041"]
    rows = cli_json("-f", str(sample.image), "windows.poolowner", "--address", f"{SEED_ADDRESS:#x}",
                    cache_dir=sample.cache)
    listed = [(row["Owner"] == "*", row["Chunk"], row["Size"], row["PreviousSize"], row["State"]) for row in rows
              if row["Chunk"] & ~0xFFF == SEED_ADDRESS & ~0xFFF]
    assert listed == [entry[:5] for entry in SEED_TRANSCRIPT]
    assert all(row["Address"] == SEED_ADDRESS and row["Region"] == "Nonpaged pool" and not row["__children"]
               for row in rows)
    starred = [row for row in rows if row["Owner"] == "*"]
    assert len(starred) == 1
    (proc,) = starred
    assert proc["Chunk"] == 0xFFFFDC0155E942C0 and proc["Size"] == 0xD00 and proc["Tag"] == "Proc"
    assert (proc["Description"], proc["Binary"]) == ("Process objects", "nt!ps")
    assert proc["Object"] == "Process MsMpEng.exe pid 3476"
    assert proc["Note"] == "Pooltag Proc : Process objects, Binary : nt!ps"


def test_text_output_reads_like_pool_with_a_hex_dump(samples):
    """One line per chunk, the owner's star the only one on the line, the dump a block of 16-byte lines."""
    sample = samples["win10-19041"]
    result = run_cli("-f", str(sample.image), "windows.poolowner", "--address", f"{SEED_ADDRESS:#x}", "--contents",
                     cache_dir=sample.cache, renderer="quick")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    chunk_lines = [line for line in lines if line.startswith(f"{SEED_ADDRESS:#x}\t")]
    assert len(chunk_lines) == len(SEED_TRANSCRIPT)
    assert not any(line.startswith("*") for line in lines)
    (owner_line,) = [line for line in chunk_lines if line.split("\t")[2] == "*"]
    assert "\t0xffffdc0155e942c0\t0xd00\t" in owner_line
    dump = lines[lines.index(owner_line) + 1:]
    assert dump[0].split() == ["ffffdc0155e942c0", "+0000", "00", "00", "d0", "02", "50", "72", "6f", "63",
                               *["00"] * 8, "....Proc........"]
    assert any("MsMpEng." in line for line in dump)
    shown = [line for line in dump if line.startswith("  ffffdc0155e9")]
    assert all(len(line.split()) == 19 for line in shown)  # address, offset, 16 bytes, text


def test_every_sampled_allocation_is_named_exactly(sample):
    rng = random.Random(7)
    allocations = owned_allocations(sample)
    chosen = rng.sample(allocations, min(SAMPLED, len(allocations)))
    chosen += [a for a in allocations if a["backing"] in ("Big", "Large")]
    mismatches = []
    for allocation in chosen:
        for address in probe_addresses(allocation):
            answer = owner.find_owner(sample.kernel, address)
            found = answer.owner
            got = None if found is None else (found.address, found.size, tag_text(found.tag), found.state.value)
            want = (allocation["address"], allocation["size"], allocation["tag"], allocation["state"])
            if got != want or answer.region != allocation["region"]:
                mismatches.append((hex(address), want, got, answer.region, answer.reason))
    assert mismatches == [], "\n".join(map(str, mismatches))


def test_batch_lookups_answer_as_single_ones(sample):
    """An address batch walks the ranges holding its addresses first, each segment's together; every answer is
    what a lookup of that address alone gives on a kernel that has walked nothing yet."""
    rng = random.Random(11)
    addresses = [address for allocation in rng.sample(owned_allocations(sample), 60)
                 for address in sorted(probe_addresses(allocation))]
    addresses += [0x7FFE0000, addresses[0], sample.kernel.base]
    fresh = Kernel.from_module(sample.session.context, sample.session.kernel_module)
    batch = list(owner.find_owners(fresh, addresses))
    alone = [owner.find_owner(Kernel.from_module(sample.session.context, sample.session.kernel_module), address)
             for address in addresses]
    assert batch == alone


def test_batch_lookups_walk_every_range_beforehand(samples, monkeypatch):
    """Preparing a batch walks every range its lookups need: none is left to walk one address at a time."""
    sample = samples["win10-19041"]
    addresses = [allocation["address"] for allocation in owned_allocations(sample)[::50]]
    fresh = Kernel.from_module(sample.session.context, sample.session.kernel_module)
    segheap.prepare_lookups(fresh, addresses)

    def walk_again(*arguments):
        raise AssertionError("a range was left to its lookup")

    monkeypatch.setattr(segheap.owner, "_walk_ranges", walk_again)
    assert all(owner.find_owner(fresh, address).owner is not None for address in addresses)


def test_owner_only_shows_one_row_per_address(sample, tmp_path):
    """--owner-only keeps, of each address's listing, the owner's row (or the row saying why there is none)."""
    allocations = random.Random(5).sample(owned_allocations(sample), 40)
    addresses = [allocation["address"] + allocation["size"] // 2 for allocation in allocations] + [0x7FFE0000]
    listing = tmp_path / "addresses.txt"
    listing.write_text("".join(f"{address:#x}\n" for address in addresses))
    full = sample.session.rows("windows.poolowner.PoolOwner", **{"address-file": str(listing)})
    short = sample.session.rows("windows.poolowner.PoolOwner", **{"address-file": str(listing), "owner-only": True})
    assert [row["Address"] for row in short] == addresses
    named = [row for row in full if row["Owner"] == "*"]
    assert [row for row in short if row["Owner"] == "*"] == named
    assert len(named) == len(allocations)
    (alone,) = [row for row in short if row["Owner"] != "*"]
    assert alone == next(row for row in full if row["Address"] == 0x7FFE0000)


def test_object_chunks_name_their_objects(sample):
    for placed in sample.manifest["objects"]:
        if placed["type"] not in ("Process", "File", "Driver") or placed.get("freed"):
            continue
        answer = owner.find_owner(sample.kernel, placed["body"])
        assert answer.owner is not None and answer.owner.address == placed["allocation"]
        assert answer.object is not None
        assert answer.object.type_name == placed["type"]
        assert answer.object.name == placed["name"]


@pytest.mark.parametrize("where", ["user", "kernel image", "unmapped pool", "non-canonical"])
def test_non_pool_addresses_get_a_reason(sample, where):
    manifest = sample.manifest
    address = {
        "user": 0x7FF6_1234_5000,
        "kernel image": manifest["kernel_base"] + 0x100,
        "unmapped pool": next(r for r in manifest["regions"] if r["kind"] == "PagedPool")["end"] - 0x10,
        "non-canonical": 0x8000_0000_0000_0000,
    }[where]
    answer = owner.find_owner(sample.kernel, address)
    assert answer.owner is None
    assert answer.reason
    expected_region = {
        "user": regions.USER_SPACE,
        "kernel image": "System images",
        "unmapped pool": "Paged pool",
        "non-canonical": regions.NON_CANONICAL,
    }[where]
    assert answer.region == expected_region


def test_quota_and_cache_aligned_allocations(sample):
    processes = {o["body"]: f"{o['name']} pid {o['pid']}" for o in sample.manifest["objects"] if o["type"] == "Process"}
    special = [a for a in sample.manifest["allocations"]
               if a["state"] == "Allocated" and (a["quota_process"] or a["pool_type"] & 4)]
    assert any(a["quota_process"] for a in special) and any(a["pool_type"] & 4 for a in special)
    for allocation in special:
        answer = owner.find_owner(sample.kernel, allocation["body"])
        assert answer.owner is not None and answer.owner.address == allocation["address"]
        if allocation["quota_process"]:
            assert answer.owner.quota_process == allocation["quota_process"]
            assert answer.quota_process_name == processes[allocation["quota_process"]]
        if allocation["pool_type"] & 4:
            assert answer.owner.body == allocation["body"]


def test_address_file_bad_input_and_contents(samples, tmp_path):
    sample = samples["win7-sp1"]
    process = next(o for o in sample.manifest["objects"] if o["type"] == "Process" and o["name"] == "lsass.exe")
    listing = tmp_path / "addresses.txt"
    listing.write_text(f"# suspicious addresses\n{process['body']:x}  # lsass\nnot-an-address\n0x7ffe0000\n")
    result = run_cli("-f", str(sample.image), "windows.poolowner", "--address-file", str(listing), "--contents",
                     cache_dir=sample.cache)
    assert result.returncode == exits.PARTIAL
    assert "1 address(es) could not be used" in result.stderr
    rows = json.loads(result.stdout)
    (starred,) = [row for row in rows if row["Owner"] == "*"]
    assert starred["Chunk"] == process["allocation"]
    assert starred["Object"] == f"Process lsass.exe pid {process['pid']}"
    assert starred["Contents"].splitlines()[1].split()[:2] == [f"{process['allocation']:016x}", "+0000"]
    (bad,) = [row for row in rows if row["Address"] is None]
    assert bad["Note"] == "not a hexadecimal address: 'not-an-address'"
    (user,) = [row for row in rows if row["Address"] == 0x7FFE0000]
    assert user["Region"] == regions.USER_SPACE and "not kernel pool" in user["Note"]
