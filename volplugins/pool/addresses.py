"""Parse the addresses users paste: hex with or without ``0x``, WinDbg's backtick form, files of them."""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

ADDRESS_LIMIT = 1 << 64
# A file whose first lines hold only unparsable text is not a list of addresses (an image, a binary, a
# document given by mistake): stop after this many bad lines instead of reporting thousands of rows.
BAD_LINES_BEFORE_REFUSAL = 2


class AddressFileError(Exception):
    """An address file that cannot be used at all: missing, unreadable, empty, or not a list of addresses."""


@dataclass(frozen=True)
class ParsedAddress:
    text: str
    value: int | None
    error: str = ""


def parse_address(text: str) -> ParsedAddress:
    """``ffffdc01`55e94340``, ``0xFFFFDC0155E94340`` and ``ffffdc0155e94340`` all name the same address."""
    shown = text.strip()
    cleaned = shown.replace("`", "").replace("_", "")
    if cleaned.startswith("-"):
        return ParsedAddress(text, None, f"negative address: {shown!r}")
    if cleaned.lower().startswith("0x"):
        cleaned = cleaned[2:]
    try:
        value = int(cleaned, 16)
    except ValueError:
        return ParsedAddress(text, None, f"not a hexadecimal address: {shown!r}")
    if value >= ADDRESS_LIMIT:
        return ParsedAddress(text, None, f"address does not fit in 64 bits: {shown!r}")
    return ParsedAddress(text, value)


def addresses_from_lines(lines: Iterable[str]) -> list[ParsedAddress]:
    """One address per line (or several separated by spaces/commas); ``#`` starts a comment."""
    return [item for line in lines for item in _line_addresses(line)]


def _line_addresses(line: str) -> list[ParsedAddress]:
    return [parse_address(token) for token in line.split("#", 1)[0].replace(",", " ").split()]


def addresses_from_file(path: str | Path) -> list[ParsedAddress]:
    """The addresses of a text file: UTF-8 (with or without BOM) or UTF-16 with BOM, any line ends.

    Raises :class:`AddressFileError` for a file that cannot serve as a list: missing or unreadable, empty
    (no address, only comments or blanks), or one whose first lines are all unparsable.
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as error:
        raise AddressFileError(f"address file {path}: {error.strerror or error}") from None
    per_line = [found for found in map(_line_addresses, _decode(raw).splitlines()) if found]
    if not per_line:
        raise AddressFileError(f"address file {path} is empty: no address in it")
    if _looks_binary(raw, per_line):
        raise AddressFileError(f"address file {path} is not an address list (its first lines hold no address)")
    return [item for line in per_line for item in line]


def _decode(raw: bytes) -> str:
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return raw.decode("utf-16", errors="replace")
    return raw.removeprefix(codecs.BOM_UTF8).decode("utf-8", errors="replace")


def _looks_binary(raw: bytes, per_line: list[list[ParsedAddress]]) -> bool:
    """NUL bytes in a file without a UTF-16 BOM, or first lines without a single address."""
    if b"\x00" in raw and not raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return True
    head = per_line[:BAD_LINES_BEFORE_REFUSAL]
    return len(head) == BAD_LINES_BEFORE_REFUSAL and all(item.value is None for line in head for item in line)
