"""Pool tag descriptions: which component a four-byte pool tag belongs to.

Descriptions come in layers, later layers winning: the built-in file shipped
with this package, files named by ``VOLPOOL_POOLTAG_FILE``, then files given
explicitly (typically a ``pooltag.txt`` of the Debugging Tools for Windows,
which cannot be shipped).  All of them use the ``pooltag.txt`` line format::

    Proc - nt!ps        - Process objects
    Ps   - Process manager allocations        (no binary)
    Afd? - afd.sys      - ...                 ('?' = any one byte)
    Aml* - ...                                ('*' at the end = any rest)

Tags are raw bytes, case sensitive, four long; a shorter tag in the file is
padded with spaces because the kernel pads it that way (``Irp`` is ``Irp ``).
Bad lines and unreadable files become warnings, never exceptions, so one
damaged description file cannot stop an analysis.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple

from volplugins.pool.tags import TAG_LENGTH, is_protected, tag_text, unprotected

logger = logging.getLogger(__name__)

ENVIRONMENT_VARIABLE = "VOLPOOL_POOLTAG_FILE"
BUILTIN_SOURCE = "builtin"
DRIVER_SCAN_SOURCE = "driver scan"
BUILTIN_RESOURCE = "data/builtin_tags.txt"

# What pooltag.txt writes when the owning binary is not known; a driver scan
# hint is more useful than this placeholder.
UNKNOWN_BINARY = "<unknown>"

_ANY_ONE = ord("?")
_ANY_REST = ord("*")
_BLANKS = " \t\r\n\f\v"
# A field separator is a '-' with a blank (or the start of the text) before it
# and a blank (or the end) after it, so dashes inside words ("x-ray") stay text.
_SEPARATOR = re.compile(r"(?:^|(?<=[ \t]))-(?=[ \t]|$)")
_REM_COMMENT = re.compile(r"rem(?:[ \t]|$)", re.IGNORECASE)


@dataclass(frozen=True)
class TagInfo:
    """One description entry.

    ``tag`` is the entry's own tag or wildcard pattern (4 bytes, or shorter
    when it ends with ``*``); ``source`` is ``"builtin"``, the path of the file
    it came from, or ``"driver scan"`` for binaries found in memory.
    """

    tag: bytes
    description: str
    binary: str
    source: str

    @property
    def is_pattern(self) -> bool:
        return _is_pattern(self.tag)


class TagWarning(NamedTuple):
    """A skipped line or unreadable file: where, and why (line 0 = whole file)."""

    source: str
    line: int
    reason: str


def parse_pooltag_lines(
    lines: Iterable[str | bytes], source: str
) -> tuple[list[TagInfo], list[TagWarning]]:
    """Parses pooltag.txt-format lines into entries and warnings, without side effects.

    Byte lines that are not valid UTF-8 are read as Latin-1 so every byte of a
    tag survives.  ``//`` and ``rem`` lines and blank lines are ignored.  A
    tag given twice keeps its later line (the order a reader of the file
    expects) and the repetition is reported.
    """
    entries: dict[bytes, tuple[int, TagInfo]] = {}
    warnings: list[TagWarning] = []
    for number, raw in enumerate(lines, start=1):
        text = _decode(raw).strip(_BLANKS)
        if number == 1:
            text = text.lstrip("\ufeff")
        if not text or _is_comment(text):
            continue
        parsed = _parse_line(text, source)
        if isinstance(parsed, str):
            warnings.append(TagWarning(source, number, parsed))
            continue
        previous = entries.pop(parsed.tag, None)
        if previous is not None:
            reason = f"duplicate tag '{tag_text(parsed.tag)}' (also on line {previous[0]}); the later line wins"
            warnings.append(TagWarning(source, number, reason))
        entries[parsed.tag] = (number, parsed)
    return [info for _, info in entries.values()], warnings


class TagDatabase:
    """Tag descriptions from layered sources, plus binary hints from a driver scan.

    Entries added later replace earlier ones with the same tag or pattern, so
    building from ``builtin, file1, file2`` lets the user's files win.
    """

    def __init__(self, entries: Iterable[TagInfo] = (), warnings: Iterable[TagWarning] = ()) -> None:
        self._exact: dict[bytes, TagInfo] = {}
        # pattern -> (insertion order, entry); the order breaks specificity ties
        # in favour of the later (user) layer.
        self._patterns: dict[bytes, tuple[int, TagInfo]] = {}
        self._hints: dict[bytes, dict[str, str]] = {}
        self._added = 0
        self._cache: dict[bytes, TagInfo | None] = {}
        self.warnings: list[TagWarning] = list(warnings)
        for entry in entries:
            self._add(entry)

    @classmethod
    def load(
        cls,
        paths: Iterable[str | Path] = (),
        use_builtin: bool = True,
        environ: Mapping[str, str] = os.environ,
    ) -> TagDatabase:
        """Built-in entries, then files from ``VOLPOOL_POOLTAG_FILE``, then ``paths``.

        The environment variable holds ``os.pathsep``-separated file names.
        Each later file overrides earlier entries for the same tag.
        """
        database = builtin_database() if use_builtin else cls()
        for path in [*environment_paths(environ), *paths]:
            database = database.merged_with(cls.from_file(path))
        return database

    @classmethod
    def from_file(cls, path: str | Path) -> TagDatabase:
        """The entries of one file; a missing or unreadable file yields only a warning."""
        source = str(path)
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            reason = f"cannot read file: {error.strerror or error}"
            warning = TagWarning(source, 0, reason)
            _log([warning])
            return cls(warnings=[warning])
        entries, warnings = parse_pooltag_lines(_lines(data), source)
        _log(warnings)
        return cls(entries, warnings)

    def merged_with(self, other: TagDatabase) -> TagDatabase:
        """A new database with ``other`` layered on top of this one."""
        merged = TagDatabase(self.entries(), self.warnings)
        for entry in other.entries():
            merged._add(entry)
        merged.warnings.extend(other.warnings)
        for database in (self, other):
            for tag, hints in database._hints.items():
                for binary, source in hints.items():
                    merged.add_binary_hint(tag, binary, source)
        return merged

    def entries(self) -> list[TagInfo]:
        """Every entry: exact tags first, then patterns, each in insertion order."""
        patterns = sorted(self._patterns.values(), key=lambda item: item[0])
        return [*self._exact.values(), *(entry for _, entry in patterns)]

    def __len__(self) -> int:
        return len(self._exact) + len(self._patterns)

    def add_binary_hint(self, tag: bytes, binary: str, source: str = DRIVER_SCAN_SOURCE) -> None:
        """Records that ``binary`` uses ``tag`` (found by scanning driver images).

        A hint names the binary only where no entry does; several hints for one
        tag are all kept, in the order they were added.  Tags that cannot be
        pool tags (longer than four bytes) are ignored.
        """
        key = _normalize(tag)
        if key is None or not binary:
            return
        self._hints.setdefault(key, {}).setdefault(binary, source)
        self._cache.clear()

    def lookup(self, tag: bytes) -> TagInfo | None:
        """The best entry for a tag as found in memory, or None.

        An exact entry wins over patterns; among patterns the one with the
        most literal bytes wins.  A tag with the protected bit (0x80 in its
        last byte, set by older kernels on object allocations) that has no
        entry of its own is looked up without that bit (its exact entry
        still beats a pattern matching the protected form).
        """
        key = _normalize(tag)
        if key is None:
            return None
        if key not in self._cache:
            self._cache[key] = self._resolve(key)
        return self._cache[key]

    def describe(self, tag: bytes) -> tuple[str, str]:
        """``(description, binary)`` for a tag, ``""`` for whatever is unknown."""
        info = self.lookup(tag)
        return (info.description, info.binary) if info is not None else ("", "")

    def _add(self, entry: TagInfo) -> None:
        if entry.is_pattern:
            self._patterns[entry.tag] = (self._added, entry)
        else:
            key = _normalize(entry.tag)
            if key is None:
                return
            self._exact[key] = replace(entry, tag=key)
        self._added += 1
        self._cache.clear()

    def _resolve(self, key: bytes) -> TagInfo | None:
        candidates = [key]
        if is_protected(key):
            candidates.append(unprotected(key))
        entry = next((self._exact[tag] for tag in candidates if tag in self._exact), None)
        if entry is None:
            entry = next((found for found in map(self._best_pattern, candidates) if found), None)
        hints = next((self._hints[tag] for tag in candidates if tag in self._hints), None)
        if hints is None:
            return entry
        hinted_binary = ", ".join(hints)
        hinted_source = "; ".join(dict.fromkeys(hints.values()))
        if entry is None:
            return TagInfo(key, "", hinted_binary, hinted_source)
        if entry.binary and entry.binary != UNKNOWN_BINARY:
            return entry
        return replace(entry, binary=hinted_binary, source=f"{entry.source}; {hinted_source}")

    def _best_pattern(self, key: bytes) -> TagInfo | None:
        matches = [item for pattern, item in self._patterns.items() if _matches(pattern, key)]
        if not matches:
            return None
        return max(matches, key=lambda item: (_specificity(item[1].tag), item[0]))[1]


def builtin_database() -> TagDatabase:
    """A fresh database holding only the descriptions shipped with this package."""
    entries, warnings = _builtin_entries()
    return TagDatabase(entries, warnings)


def describe(tag: bytes, database: TagDatabase | None = None) -> tuple[str, str]:
    """``(description, binary)`` for a tag from ``database`` (default: the built-in one)."""
    return (database if database is not None else _default_database()).describe(tag)


def environment_paths(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The description files named by ``VOLPOOL_POOLTAG_FILE``, in order."""
    value = environ.get(ENVIRONMENT_VARIABLE, "")
    return [path for path in value.split(os.pathsep) if path.strip()]


@functools.lru_cache(maxsize=1)
def _builtin_entries() -> tuple[tuple[TagInfo, ...], tuple[TagWarning, ...]]:
    data = resources.files(__package__).joinpath(BUILTIN_RESOURCE).read_bytes()
    entries, warnings = parse_pooltag_lines(_lines(data), BUILTIN_SOURCE)
    _log(warnings)
    return tuple(entries), tuple(warnings)


@functools.lru_cache(maxsize=1)
def _default_database() -> TagDatabase:
    return builtin_database()


def _parse_line(text: str, source: str) -> TagInfo | str:
    """One non-comment line as an entry, or the reason it cannot be one."""
    fields = _SEPARATOR.split(text, maxsplit=1)
    if len(fields) < 2:
        return "no ' - ' separator after the tag"
    tag_field, rest = fields[0].strip(_BLANKS), fields[1].strip(_BLANKS)
    if not tag_field:
        return "empty tag"
    try:
        tag = tag_field.encode("latin-1")
    except UnicodeEncodeError:
        return f"tag {tag_field!r} has characters that are not single bytes"
    if len(tag) > TAG_LENGTH:
        return f"tag {tag_field!r} is longer than {TAG_LENGTH} characters"
    if _ANY_REST in tag[:-1]:
        return f"tag {tag_field!r} has '*' before its last character"
    if not tag.endswith(b"*"):
        tag = tag.ljust(TAG_LENGTH, b" ")
    binary, description = _binary_and_description(rest)
    return TagInfo(tag, description, binary, source)


def _binary_and_description(rest: str) -> tuple[str, str]:
    """Splits ``binary - description``; a first field with blanks is description text."""
    fields = _SEPARATOR.split(rest, maxsplit=1)
    if len(fields) == 2:
        binary = fields[0].strip(_BLANKS)
        if not any(blank in binary for blank in _BLANKS):
            return binary, fields[1].strip(_BLANKS)
    return "", rest


def _lines(data: bytes) -> list[bytes]:
    """Lines split at LF only, so line numbers agree with editors and grep; a
    stray CR is trimmed with the other blanks."""
    return data.split(b"\n")


def _decode(raw: str | bytes) -> str:
    if isinstance(raw, str):
        return raw
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _is_comment(text: str) -> bool:
    return text.startswith("//") or _REM_COMMENT.match(text) is not None


def _normalize(tag: bytes) -> bytes | None:
    """A tag as the 4-byte key entries use; shorter tags are space-padded."""
    key = bytes(tag)
    return key.ljust(TAG_LENGTH, b" ") if len(key) <= TAG_LENGTH else None


def _is_pattern(tag: bytes) -> bool:
    return _ANY_ONE in tag or _ANY_REST in tag


def _matches(pattern: bytes, tag: bytes) -> bool:
    if pattern.endswith(b"*"):
        pattern = pattern[:-1]
    elif len(pattern) != len(tag):
        return False
    return all(want in (_ANY_ONE, have) for want, have in zip(pattern, tag))


def _specificity(pattern: bytes) -> tuple[int, bool]:
    """More literal bytes first; at equal count a fixed-length pattern beats a '*' one."""
    literal = sum(1 for byte in pattern if byte not in (_ANY_ONE, _ANY_REST))
    return literal, not pattern.endswith(b"*")


def _log(warnings: Iterable[TagWarning]) -> None:
    for warning in warnings:
        logger.warning("%s:%d: %s", warning.source, warning.line, warning.reason)
