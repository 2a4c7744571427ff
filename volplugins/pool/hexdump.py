"""Bytes as a person reads them in a hex dump: 16 a line, address and offset, hex, and the printable text."""

from __future__ import annotations

WIDTH = 16


def lines(address: int, data: bytes) -> str:
    """The dump of ``data`` read at ``address``, each line starting on a new line so that a text table shows
    the dump as a block under its row; a run of lines repeating the one before is folded into one line
    (as ``hexdump`` does), so a mostly zeroed object stays short."""
    out = []
    previous, folded_to = None, None
    for offset in range(0, len(data), WIDTH):
        line = data[offset : offset + WIDTH]
        if line == previous:
            folded_to = offset
            continue
        if folded_to is not None:
            out.append(_folded(folded_to))
            folded_to = None
        out.append(_line(address, offset, line))
        previous = line
    if folded_to is not None:
        out.append(_folded(folded_to))
    return "".join(out)


def _line(address: int, offset: int, line: bytes) -> str:
    hex_part = " ".join(f"{byte:02x}" for byte in line).ljust(WIDTH * 3 - 1)
    text = "".join(chr(byte) if 32 <= byte < 127 else "." for byte in line)
    return f"\n  {address + offset:016x} +{offset:04x}  {hex_part}  {text}"


def _folded(last_offset: int) -> str:
    return f"\n  {'':16} +{last_offset:04x}  (the same line repeated up to here)"
