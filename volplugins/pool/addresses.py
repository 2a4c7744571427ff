"""Parse the addresses users paste: hex with or without ``0x``, WinDbg's backtick form, files of them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

ADDRESS_LIMIT = 1 << 64


@dataclass(frozen=True)
class ParsedAddress:
    text: str
    value: int | None
    error: str = ""


def parse_address(text: str) -> ParsedAddress:
    """``ffffdc01`55e94340``, ``0xFFFFDC0155E94340`` and ``ffffdc0155e94340`` all name the same address."""
    cleaned = text.strip().replace("`", "").replace("_", "")
    if cleaned.lower().startswith("0x"):
        cleaned = cleaned[2:]
    try:
        value = int(cleaned, 16)
    except ValueError:
        return ParsedAddress(text, None, f"not a hexadecimal address: {text.strip()!r}")
    if not 0 <= value < ADDRESS_LIMIT:
        return ParsedAddress(text, None, f"address does not fit in 64 bits: {text.strip()!r}")
    return ParsedAddress(text, value)


def addresses_from_lines(lines: Iterable[str]) -> list[ParsedAddress]:
    """One address per line (or several separated by spaces/commas); ``#`` starts a comment."""
    parsed = []
    for line in lines:
        content = line.split("#", 1)[0].replace(",", " ")
        parsed.extend(parse_address(token) for token in content.split())
    return parsed


def addresses_from_file(path: str | Path) -> list[ParsedAddress]:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return addresses_from_lines(handle)
    except OSError as error:
        return [ParsedAddress(str(path), None, f"cannot read address file: {error.strerror or error}")]
