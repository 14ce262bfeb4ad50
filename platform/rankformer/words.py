"""Counts in the run lines people read."""

from __future__ import annotations


def counted(n: int, noun: str) -> str:
    """``1 shard``, ``3 shards``, ``12,000 shards`` (nouns whose plural adds an s)."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"
