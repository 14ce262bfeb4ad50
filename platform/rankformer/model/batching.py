"""Length-aware batching: cells of similar length share a batch, so little is spent on padding.

A stream of cells is cut into megabatches; each megabatch is sorted by length and split into
batches under a token budget (cells x longest cell <= ``max_tokens``), and the batches are
shuffled (seeded) so consecutive steps do not walk from short to long cells.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
import torch


def budget_batches(lengths: np.ndarray, max_tokens: int, max_cells: int) -> list[np.ndarray]:
    """Indices of ``lengths`` grouped, longest first, into batches with cells x longest <= max_tokens."""
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        longest = int(lengths[order[start]])
        fit = max(1, min(max_cells, max_tokens // max(longest, 1)))
        batches.append(order[start : start + fit])
        start += fit
    return batches


T = TypeVar("T")
Batcher = Callable[[np.ndarray, int, int], list[np.ndarray]]  # (lengths, max_tokens, max_cells) -> batches


def length_grouped(
    cells: Iterable[T],
    max_tokens: int,
    max_cells: int,
    megabatch_cells: int,
    rng: np.random.Generator,
    length: Callable[[Any], int] = len,
    batcher: Batcher = budget_batches,
) -> Iterator[list[T]]:
    """Batches from a stream of cells (token arrays, or items whose ``length`` is their cell's),
    megabatch by megabatch; ``batcher`` cuts a megabatch (a packed batch's is
    :func:`rankformer.model.packing.packed_batches`)."""
    pending: list[T] = []
    for cell in cells:
        pending.append(cell)
        if len(pending) >= megabatch_cells:
            yield from _emit(pending, max_tokens, max_cells, rng, length, batcher)
            pending = []
    if pending:
        yield from _emit(pending, max_tokens, max_cells, rng, length, batcher)


def _emit(
    cells: list[T],
    max_tokens: int,
    max_cells: int,
    rng: np.random.Generator,
    length: Callable[[Any], int],
    cut: Batcher,
) -> Iterator[list[T]]:
    lengths = np.fromiter((length(c) for c in cells), dtype=np.int64, count=len(cells))
    batches = cut(lengths, max_tokens, max_cells)
    for i in rng.permutation(len(batches)):
        yield [cells[j] for j in batches[i]]


def pad_batch(cells: Sequence[np.ndarray] | np.ndarray, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask), right-padded to the longest cell of the batch (``cells`` a
    2-D array: cells of one length, taken as they are)."""
    if isinstance(cells, np.ndarray) and cells.ndim == 2:
        ids = cells.astype(np.int64)  # (a copy: the batch owns its ids)
    else:
        width = max(len(c) for c in cells)
        ids = np.full((len(cells), width), pad_id, dtype=np.int64)
        for i, c in enumerate(cells):
            ids[i, : len(c)] = c
    # the mask in numpy: torch's CPU kernels cost ~0.5 ms here, each batch, on a many-core host
    return torch.from_numpy(ids), torch.from_numpy((ids != pad_id).astype(np.int64))


def padding_fraction(cells: Sequence[np.ndarray]) -> float:
    width = max(len(c) for c in cells)
    return 1.0 - sum(len(c) for c in cells) / (width * len(cells))
