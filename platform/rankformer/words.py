"""Counts in the run lines people read."""

from __future__ import annotations

from collections.abc import Sequence


def counted(n: int, noun: str) -> str:
    """``1 shard``, ``3 shards``, ``12,000 shards`` (nouns whose plural adds an s)."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def listed(items: Sequence[str], most: int) -> str:
    """``a, b, c`` for at most ``most`` items, then ``and 12 more``."""
    rest = f" and {len(items) - most:,} more" if len(items) > most else ""
    return ", ".join(items[:most]) + rest
