"""What users select on the command line, read the same way by every plugin: tag patterns and chunk filters.

A tag option takes several patterns, as separate values or joined with commas (``--tag Proc,Thre``). A pattern
matches a tag with or without its protected bit (``Proc`` finds Windows 7's ``Pro\\xe3``), as PoolMon and
``!pool`` show such tags.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from .model import Backing, Chunk, State
from .tags import TAG_LENGTH, TagPattern, compile_pattern, tag_from_text, unprotected


def parse_patterns(texts: Iterable[str] | None) -> tuple[TagPattern, ...]:
    """The patterns of an option's values; commas separate patterns inside one value."""
    return tuple(compile_pattern(part.strip()) for text in texts or () for part in text.split(",") if part.strip())


def unmatchable(patterns: Iterable[TagPattern]) -> list[str]:
    """The patterns that no four-byte tag can match (longer than a tag and without ``*``)."""
    return [pattern.text for pattern in patterns
            if b"*" not in tag_from_text(pattern.text) and len(tag_from_text(pattern.text)) > TAG_LENGTH]


def matches_any(patterns: Sequence[TagPattern], tag: bytes) -> bool:
    """Whether one of ``patterns`` matches ``tag``, looking through the protected bit."""
    name = unprotected(tag)
    return any(pattern.matches(tag) or pattern.matches(name) for pattern in patterns)


@dataclass(frozen=True)
class ChunkFilter:
    """The chunk listing's filters; ``None`` fields do not filter."""

    tags: tuple[TagPattern, ...] = ()
    state: tuple[State, ...] | None = None
    min_size: int | None = None
    max_size: int | None = None
    big_only: bool = False
    region: str | None = None  # lower-case name or name prefix

    def tag_matches(self, tag: bytes) -> bool:
        return not self.tags or matches_any(self.tags, tag)

    def region_matches(self, region: str) -> bool:
        return self.region is None or region.lower().startswith(self.region)

    def size_matches(self, size: int) -> bool:
        return (self.min_size is None or size >= self.min_size) and (self.max_size is None or size <= self.max_size)

    def matches(self, chunk: Chunk, region: str, tag: bytes | None = None) -> bool:
        """``tag`` replaces the chunk's own (free VS chunks are matched by their stale tag)."""
        return (
            (self.state is None or chunk.state in self.state)
            and (not self.big_only or chunk.backing in (Backing.BIG, Backing.LARGE))
            and self.size_matches(chunk.size)
            and self.region_matches(region)
            and self.tag_matches(chunk.tag if tag is None else tag)
        )
