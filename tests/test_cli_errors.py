"""What a user meets through ``vol`` when a run cannot do what was asked: one line, an exit code, no table."""

from __future__ import annotations

import codecs
import json

import pytest

from volplugins.pool import addresses, exits
from volrun import run_cli

SEED_ADDRESS = 0xFFFFDC0155E94340


def vol(sample, *arguments: str, renderer: str = "quick"):
    return run_cli("-f", str(sample.image), *arguments, cache_dir=sample.cache, renderer=renderer)


def assert_refused(result, message: str) -> None:
    """Exit code 2, the one error line naming the plugin run and the problem, and no table on stdout."""
    (plugin,) = [argument for argument in result.args if argument.startswith("windows.")]
    errors = [line.split(None, 1)[1] for line in result.stderr.splitlines() if line.startswith("ERROR")]
    assert result.returncode == exits.REFUSED, result.stderr
    assert len(errors) == 1 and errors[0].startswith(f"{plugin}: ") and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert "\t" not in result.stdout  # not even the column headings


# -- poolowner's addresses -----------------------------------------------------------


@pytest.mark.parametrize("arguments, message", [
    ((), "no address given: use --address ADDRESS [ADDRESS ...] or --address-file FILE"),
    (("--address", "zz"), "no address to look up: not a hexadecimal address: 'zz'"),
    (("--address=-0x10",), "negative address: '-0x10'"),
    (("--address-file", "/nonexistent/addresses.txt"), "address file /nonexistent/addresses.txt: No such file"),
])
def test_poolowner_refuses_when_nothing_can_be_looked_up(samples, arguments, message):
    assert_refused(vol(samples["win10-19041"], "windows.poolowner", *arguments), message)


@pytest.mark.parametrize("content, message", [
    (b"# only a comment\r\n\r\n", "is empty: no address in it"),
    (bytes(range(256)) * 4, "is not an address list"),
])
def test_poolowner_refuses_an_unusable_address_file(samples, tmp_path, content, message):
    listing = tmp_path / "addresses.txt"
    listing.write_bytes(content)
    assert_refused(vol(samples["win10-19041"], "windows.poolowner", "--address-file", str(listing)),
                   f"address file {listing} {message}")


@pytest.mark.parametrize("content, message", [
    (b"", "is empty: no address in it"),
    (b"MZ\x90 binary\nthis is not\nffffdc0155e94340\n", "is not an address list"),
    (b"ffffdc0155e94340\x00\x00", "is not an address list"),
])
def test_address_files_that_cannot_serve(tmp_path, content, message):
    listing = tmp_path / "addresses.txt"
    listing.write_bytes(content)
    with pytest.raises(addresses.AddressFileError, match=message):
        addresses.addresses_from_file(listing)


@pytest.mark.parametrize("text, error", [
    ("0x1ffffffffffffffff", "address does not fit in 64 bits: '0x1ffffffffffffffff'"),
    ("-10", "negative address: '-10'"),
    ("ffff`zz", "not a hexadecimal address: 'ffff`zz'"),
])
def test_bad_address_text_names_the_problem(text, error):
    assert addresses.parse_address(text) == addresses.ParsedAddress(text, None, error)


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16-le", "utf-16-be"])
def test_address_files_in_windows_encodings(tmp_path, encoding):
    listing = tmp_path / "addresses.txt"
    bom = {"utf-8-sig": b"", "utf-16-le": codecs.BOM_UTF16_LE, "utf-16-be": codecs.BOM_UTF16_BE}[encoding]
    listing.write_bytes(bom + "# a comment\r\nffffdc01`55e94340, 0x10\r\n".encode(encoding))
    assert [item.value for item in addresses.addresses_from_file(listing)] == [SEED_ADDRESS, 0x10]


def test_poolowner_reads_a_utf16_address_file(samples, tmp_path):
    listing = tmp_path / "addresses.txt"
    listing.write_bytes("# from a Windows tool\r\nffffdc01`55e94340\r\n".encode("utf-16"))
    assert listing.read_bytes().startswith(codecs.BOM_UTF16_LE)
    result = vol(samples["win10-19041"], "windows.poolowner", "--address-file", str(listing), renderer="json")
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert {row["Address"] for row in rows} == {SEED_ADDRESS}
    assert [row["Chunk"] for row in rows if row["Owner"] == "*"] == [0xFFFFDC0155E942C0]


def test_poolowner_partial_answer_keeps_good_rows_and_exits_non_zero(samples):
    result = vol(samples["win10-19041"], "windows.poolowner", "--address", "nonsense", f"{SEED_ADDRESS:x}")
    assert result.returncode == exits.PARTIAL
    assert "windows.poolowner: 1 address(es) could not be used" in result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith(f"{SEED_ADDRESS:#x}\t") and "\t*\t" in line for line in lines)
    (bad,) = [line for line in lines if line.startswith("N/A")]
    assert bad.endswith("not a hexadecimal address: 'nonsense'")
    assert not any(line.startswith("0x0\t") for line in lines)


# -- options that exclude each other, values that cannot be used ----------------------


@pytest.mark.parametrize("arguments, message", [
    (("windows.poolcensus", "--free", "--allocated"), "--free and --allocated exclude each other"),
    (("windows.poolcensus", "--bigpages", "--carve"), "choose one view at a time; got --bigpages, --carve"),
    (("windows.poolcensus", "--min-size", "0x200", "--max-size", "0x100"),
     "--min-size 0x200 is larger than --max-size 0x100"),
    (("windows.pooltags", "--pool", "nonpaged", "sesion"), "unknown pool(s) sesion for --pool"),
    (("windows.pooltags", "--top", "-1"), "--top -1: give a count of rows"),
    (("windows.pooltags", "--scan", "--baseline", "/nonexistent/base.json"), "--scan and --baseline are two views"),
    (("windows.pooltags", "--baseline", "/nonexistent/base.json"), "baseline /nonexistent/base.json: No such file"),
])
def test_runs_that_cannot_do_what_was_asked_are_refused(samples, arguments, message):
    assert_refused(vol(samples["win10-19041"], *arguments), message)


def test_dump_into_an_output_path_that_is_not_a_directory(samples, tmp_path):
    sample = samples["win10-19041"]
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    result = run_cli("-o", str(not_a_directory), "-f", str(sample.image), "windows.poolcensus", "--tag", "Proc",
                     "--dump", cache_dir=sample.cache, renderer="quick")
    assert_refused(result, "--dump cannot write to the output directory (-o)")


# -- baselines -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def win7_snapshots(samples, tmp_path_factory):
    """A full and a --top 5 JSON snapshot of the Windows 7 sample, saved as a user would."""
    sample = samples["win7-sp1"]
    folder = tmp_path_factory.mktemp("snapshots")
    saved = {}
    for name, options in (("full", ()), ("top", ("--top", "5"))):
        result = vol(sample, "windows.pooltags", *options, renderer="json")
        assert result.returncode == 0, result.stderr
        saved[name] = folder / f"{name}.json"
        saved[name].write_text(result.stdout)
    return saved


def test_baseline_of_another_kernel_is_refused_unless_asked_for(samples, win7_snapshots):
    sample = samples["win10-19041"]
    full = win7_snapshots["full"]
    assert_refused(vol(sample, "windows.pooltags", "--baseline", str(full)),
                   f"baseline {full} is of another kernel build (PDB ")
    result = vol(sample, "windows.pooltags", "--baseline", str(full), "--any-kernel", renderer="json")
    assert result.returncode == 0
    assert f"baseline {full} is of another kernel build" in result.stderr and "comparing anyway" in result.stderr
    rows = json.loads(result.stdout)
    assert rows[-1]["Type"] == "Total" and rows[-1]["BaselineBytes"] == sum(
        r["bytes"] for r in samples["win7-sp1"].manifest["tracker"])


def test_partial_json_baseline_is_refused(samples, win7_snapshots):
    top = win7_snapshots["top"]
    assert_refused(vol(samples["win7-sp1"], "windows.pooltags", "--baseline", str(top)),
                   f"baseline {top} is not a full snapshot: it was saved with only --top 5")


def test_baseline_image_of_another_kernel_is_refused(samples):
    other = samples["win7-sp1"].image
    assert_refused(vol(samples["win10-19041"], "windows.pooltags", "--baseline", str(other)),
                   f"baseline {other} is of another kernel build")
