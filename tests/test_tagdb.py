"""Tag database: pooltag.txt parsing, layering, wildcards, hints and the built-in file."""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

import pytest

from volplugins.pool import tagdb
from volplugins.pool.tagdb import TagDatabase, TagInfo, describe, parse_pooltag_lines

# Line numbers matter: the bad lines are 14, 15, 16, 18 (duplicate) and 23.
POOLTAG_LINES: list[bytes] = [
    b"// user descriptions",  # 1
    b"rem   written by the test",  # 2
    b"REM",  # 3
    b"",  # 4
    b"AfdB - afd.sys      - user afd buffer",  # 5
    b"Irp  - nt!io        - user irp text",  # 6
    b"Cc - nt!cc - cache short tag",  # 7
    b"Dh 0 - win32k.sys - inner space",  # 8
    b"Afd? - afd.sys - afd wildcard",  # 9
    b"CM?? - nt!cm - registry wildcard",  # 10
    b"Aml* - acpi.sys - aml prefix",  # 11
    b"proc - lower.sys - lower-case proc",  # 12
    b"NoBn - only a description here",  # 13
    b"Bad1 no separator here",  # 14
    b"Toolong - x.sys - tag too long",  # 15
    b"   - x.sys - empty tag",  # 16
    b"Dupe - first.sys - first",  # 17
    b"Dupe - second.sys - second",  # 18
    b"Lat1 - caf\xe9.sys - caf\xe9 in latin-1",  # 19
    b"\xff\xfeXY - odd.sys - tag with high bytes",  # 20
    b"Ut8 - utf8.sys - caf\xc3\xa9 in utf-8\r",  # 21
    b"Dash - x.sys - a note - with a dash inside",  # 22
    b"A*b - bad.sys - star before the end",  # 23
    b"Wide - multi word binary - text",  # 24
    b"remx - r.sys - not a comment",  # 25
    b"Tab\t-\tt.sys\t-\ttab separated",  # 26
]
BAD_LINES = {14, 15, 16, 18, 23}


@pytest.fixture
def pooltag_file(tmp_path: Path) -> Path:
    path = tmp_path / "pooltag.txt"
    path.write_bytes(b"\r\n".join(POOLTAG_LINES) + b"\r\n")
    return path


def _by_tag(entries: list[TagInfo]) -> dict[bytes, TagInfo]:
    return {entry.tag: entry for entry in entries}


def test_each_bad_line_gives_exactly_one_warning_with_its_line_number() -> None:
    entries, warnings = parse_pooltag_lines(POOLTAG_LINES, "mem")
    assert Counter(warning.line for warning in warnings) == Counter(BAD_LINES)
    reasons = {warning.line: warning.reason for warning in warnings}
    assert "separator" in reasons[14]
    assert "longer than 4" in reasons[15]
    assert "empty tag" in reasons[16]
    assert "duplicate" in reasons[18] and "line 17" in reasons[18]
    assert "'*'" in reasons[23]
    assert all(warning.source == "mem" for warning in warnings)
    assert len(entries) == 17


def test_lines_parse_into_padded_case_sensitive_tags() -> None:
    entries = _by_tag(parse_pooltag_lines(POOLTAG_LINES, "mem")[0])
    assert entries[b"AfdB"] == TagInfo(b"AfdB", "user afd buffer", "afd.sys", "mem")
    assert entries[b"Irp "].description == "user irp text"
    assert entries[b"Cc  "].binary == "nt!cc"
    assert entries[b"Dh 0"].description == "inner space"
    assert entries[b"proc"].binary == "lower.sys"
    assert b"Proc" not in entries
    assert entries[b"NoBn"].binary == ""
    assert entries[b"NoBn"].description == "only a description here"
    assert entries[b"Dupe"].binary == "second.sys"
    assert entries[b"Lat1"].description == "caf\u00e9 in latin-1"
    assert entries[b"\xff\xfeXY"].binary == "odd.sys"
    assert entries[b"Ut8 "].description == "caf\u00e9 in utf-8"
    assert entries[b"Dash"].description == "a note - with a dash inside"
    assert entries[b"Wide"] == TagInfo(b"Wide", "multi word binary - text", "", "mem")
    assert entries[b"remx"].binary == "r.sys"
    assert entries[b"Tab "].description == "tab separated"
    assert entries[b"Aml*"].is_pattern and entries[b"Afd?"].is_pattern
    assert not entries[b"AfdB"].is_pattern


def test_text_lines_parse_like_byte_lines() -> None:
    entries, warnings = parse_pooltag_lines(["\ufeffIrp - nt!io - packets\n", "x"], "text")
    assert entries == [TagInfo(b"Irp ", "packets", "nt!io", "text")]
    assert [(warning.line, "separator" in warning.reason) for warning in warnings] == [(2, True)]


def test_file_lookup_exact_wildcards_and_case(pooltag_file: Path) -> None:
    database = TagDatabase.load([pooltag_file], use_builtin=False, environ={})
    assert database.describe(b"Irp ") == ("user irp text", "nt!io")
    assert database.describe(b"Irp") == ("user irp text", "nt!io")
    assert database.describe(b"Cc  ") == ("cache short tag", "nt!cc")
    assert database.lookup(b"Cc\x00\x00") is None
    assert database.lookup(b"AfdB").tag == b"AfdB"
    assert database.lookup(b"AfdX").tag == b"Afd?"
    assert database.lookup(b"afdX") is None
    assert database.lookup(b"CM25").tag == b"CM??"
    assert database.lookup(b"cm25") is None
    assert database.lookup(b"AmlZ").tag == b"Aml*"
    assert database.lookup(b"Aml").tag == b"Aml*"
    assert database.lookup(b"AmZZ") is None
    assert database.describe(b"proc") == ("lower-case proc", "lower.sys")
    assert database.lookup(b"Proc") is None
    assert database.lookup(b"\xff\xfeXY").description == "tag with high bytes"
    assert database.describe(b"none") == ("", "")
    assert database.lookup(b"toolong") is None


def test_file_warnings_are_kept_and_logged(pooltag_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=tagdb.__name__):
        database = TagDatabase.load([pooltag_file], use_builtin=False, environ={})
    assert sorted(line for _, line, _ in database.warnings) == sorted(BAD_LINES)
    assert {source for source, _, _ in database.warnings} == {str(pooltag_file)}
    logged = [record for record in caplog.records if record.name == tagdb.__name__]
    assert len(logged) == len(BAD_LINES)
    assert all(record.levelno == logging.WARNING for record in logged)


def test_most_specific_pattern_wins() -> None:
    lines = ["A??? - a.sys - one", "Ab?? - b.sys - two", "Ab* - c.sys - three", "Abc* - d.sys - four"]
    database = TagDatabase(parse_pooltag_lines(lines, "mem")[0])
    assert database.lookup(b"Abcd").binary == "d.sys"
    assert database.lookup(b"Abxd").binary == "b.sys"
    assert database.lookup(b"Axyz").binary == "a.sys"
    assert database.lookup(b"Bbcd") is None


def test_user_file_overrides_builtin(tmp_path: Path) -> None:
    path = tmp_path / "mine.txt"
    path.write_text("Proc - mine.sys - my processes\nZzz? - z.sys - user pattern\n")
    database = TagDatabase.load([path], environ={})
    assert database.describe(b"Proc") == ("my processes", "mine.sys")
    assert database.lookup(b"Proc").source == str(path)
    assert database.describe(b"Thre")[1] == "nt!ps"
    assert database.lookup(b"Zzz1").binary == "z.sys"
    assert len(database) == len(tagdb.builtin_database()) + 1


def test_user_pattern_wins_a_tie_with_builtin(tmp_path: Path) -> None:
    path = tmp_path / "mine.txt"
    path.write_text("CM?? - mine.sys - my registry pattern\n")
    assert TagDatabase.load([path], environ={}).describe(b"CM25")[1] == "mine.sys"


def test_environment_files_layer_before_explicit_paths(tmp_path: Path) -> None:
    first, second, explicit = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "c.txt"
    first.write_text("EnvA - first.sys - from first\nBoth - first.sys - from first\n")
    second.write_text("Both - second.sys - from second\nLast - second.sys - from second\n")
    explicit.write_text("Last - explicit.sys - given explicitly\n")
    environ = {tagdb.ENVIRONMENT_VARIABLE: f"{first}{os.pathsep}{second}"}
    database = TagDatabase.load([explicit], use_builtin=False, environ=environ)
    assert database.describe(b"EnvA")[1] == "first.sys"
    assert database.describe(b"Both")[1] == "second.sys"
    assert database.describe(b"Last")[1] == "explicit.sys"
    assert database.warnings == []


def test_missing_or_unreadable_files_are_warnings(tmp_path: Path) -> None:
    missing = tmp_path / "absent.txt"
    environ = {tagdb.ENVIRONMENT_VARIABLE: f"{missing}{os.pathsep}"}
    database = TagDatabase.load([tmp_path], environ=environ)
    assert [(source, line) for source, line, _ in database.warnings] == [(str(missing), 0), (str(tmp_path), 0)]
    assert all("cannot read" in reason for _, _, reason in database.warnings)
    assert database.describe(b"Proc") == ("Process objects", "nt!ps")


def test_builtin_has_enough_entries_and_the_windbg_proc_text() -> None:
    database = tagdb.builtin_database()
    assert len(database) >= 200
    assert database.warnings == []
    assert describe(b"Proc") == ("Process objects", "nt!ps")
    assert database.describe(b"Proc") == ("Process objects", "nt!ps")
    for tag in (b"Thre", b"File", b"Driv", b"Devi", b"MmCi", b"MmSt", b"CM31", b"Ntfx", b"Irp ", b"Toke",
                b"Even", b"Muta", b"Key ", b"ObNm", b"Sect", b"Vad ", b"VadS", b"Mdl ", b"Wait", b"ALPC",
                b"AlIn", b"Cont", b"Pool", b"Ntf0", b"NtFs", b"FMfn"):
        info = database.lookup(tag)
        assert info is not None and info.tag == tag and info.source == "builtin", tag
    assert all(entry.binary and entry.description for entry in database.entries())


def test_protected_bit_falls_back_to_the_plain_tag() -> None:
    database = tagdb.builtin_database()
    assert database.lookup(b"Pro\xe3").tag == b"Proc"
    assert database.lookup(b"Thr\xe5").tag == b"Thre"
    with_pattern = database.merged_with(TagDatabase(parse_pooltag_lines(["Pro? - p.sys - pattern"], "mem")[0]))
    assert with_pattern.lookup(b"Pro\xe3").tag == b"Proc"
    assert with_pattern.lookup(b"Prox").tag == b"Pro?"


def test_programmatic_entries_are_padded() -> None:
    database = TagDatabase([TagInfo(b"Irp", "packets", "nt!io", "code"), TagInfo(b"Toolong", "x", "", "code")])
    assert database.lookup(b"Irp ") == TagInfo(b"Irp ", "packets", "nt!io", "code")
    assert len(database) == 1


def test_binary_hints_fill_only_missing_binaries(pooltag_file: Path) -> None:
    database = TagDatabase.load([pooltag_file], use_builtin=False, environ={})
    unknown = TagDatabase(parse_pooltag_lines(["Unkn - <unknown> - placeholder binary"], "mem")[0])
    database = database.merged_with(unknown)
    database.add_binary_hint(b"NoBn", "scan.sys")
    database.add_binary_hint(b"AfdB", "other.sys")
    database.add_binary_hint(b"Unkn", "found.sys")
    database.add_binary_hint(b"Zzzz", "one.sys")
    database.add_binary_hint(b"Zzzz", "two.sys")
    database.add_binary_hint(b"Zzzz", "one.sys")
    assert database.describe(b"NoBn") == ("only a description here", "scan.sys")
    assert database.lookup(b"NoBn").source == f"{pooltag_file}; driver scan"
    assert database.describe(b"AfdB") == ("user afd buffer", "afd.sys")
    assert database.describe(b"Unkn") == ("placeholder binary", "found.sys")
    assert database.lookup(b"Zzzz") == TagInfo(b"Zzzz", "", "one.sys, two.sys", "driver scan")
    assert database.merged_with(TagDatabase()).describe(b"Zzzz") == ("", "one.sys, two.sys")
