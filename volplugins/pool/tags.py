"""Pool tags: the four bytes a driver names its allocations with, as users read, type and match them.

Older kernels (Windows 7) mark the allocations of executive objects by setting the top bit of a tag's
last byte, the protected bit: ``Pro\\xe3`` is ``Proc`` allocated by the object manager.  The bit is not
part of the name the driver chose, so every check of what a tag says looks through it.

Users type tags as text: printable bytes as they are, ``\\xNN`` for the others (what :func:`tag_text`
prints), and patterns with ``*`` (any run of bytes) and ``?`` (any one byte); a pattern without ``*``
shorter than four bytes is padded with spaces the way the kernel pads short tags (``Irp`` is ``Irp ``).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field

TAG_LENGTH = 4
PROTECTED_TAG_BIT = 0x80  # top bit of the last byte

_ESCAPE = re.compile(rb"\\x([0-9a-fA-F]{2})")
_TAGS_REMEMBERED = 1 << 14  # distinct tags kept: a listing shows the same few thousand again and again


@functools.lru_cache(maxsize=_TAGS_REMEMBERED)
def unprotected(tag: bytes) -> bytes:
    """The tag without the protected bit (tags of other lengths are returned as they are)."""
    if len(tag) != TAG_LENGTH:
        return tag
    return tag[:-1] + bytes([tag[-1] & ~PROTECTED_TAG_BIT & 0xFF])


def protected(tag: bytes) -> bytes:
    """The four-byte tag with the protected bit set, as the kernel stores an object's tag."""
    return tag[:-1] + bytes([tag[-1] | PROTECTED_TAG_BIT])


def is_protected(tag: bytes) -> bool:
    return len(tag) == TAG_LENGTH and bool(tag[-1] & PROTECTED_TAG_BIT)


def printable_tag(tag: bytes) -> bool:
    """Four printable ASCII bytes once the protected bit is cleared: what a driver can have written."""
    return len(tag) == TAG_LENGTH and all(32 <= byte < 127 for byte in unprotected(tag))


def same_tag(first: bytes, second: bytes) -> bool:
    """Two four-byte tags name the same thing, whether or not either carries the protected bit."""
    return len(first) == len(second) == TAG_LENGTH and unprotected(first) == unprotected(second)


@functools.lru_cache(maxsize=_TAGS_REMEMBERED)
def tag_text(tag: bytes) -> str:
    """A tag as users read it: printable bytes as-is, others escaped (never dropped)."""
    return "".join(chr(b) if 32 <= b < 127 and b != 0x5C else f"\\x{b:02x}" for b in tag)


def tag_windbg(tag: bytes) -> str:
    """A tag as WinDbg prints it: one character per byte, '.' for unprintable bytes."""
    return "".join(chr(b) if 32 <= b < 127 else "." for b in tag)


def tag_from_text(text: str) -> bytes:
    """Inverse of :func:`tag_text`: ``\\xNN`` escapes become bytes, other characters Latin-1."""
    raw = text.encode("latin-1", errors="replace")
    return _ESCAPE.sub(lambda match: bytes([int(match.group(1), 16)]), raw)


@dataclass(frozen=True)
class TagPattern:
    """A user's tag pattern: ``*`` and ``?`` wildcards over the tag's four bytes."""

    text: str
    regex: re.Pattern[bytes] = field(compare=False, repr=False)

    def matches(self, tag: bytes) -> bool:
        return self.regex.fullmatch(tag) is not None


def compile_pattern(text: str) -> TagPattern:
    """A pattern from tag text; without ``*`` a short pattern is space-padded to four bytes."""
    raw = tag_from_text(text)
    if b"*" not in raw:
        raw = raw.ljust(TAG_LENGTH, b" ")
    parts = [b".*" if byte == ord("*") else b"." if byte == ord("?") else re.escape(bytes([byte])) for byte in raw]
    return TagPattern(text, re.compile(b"".join(parts), re.DOTALL))
