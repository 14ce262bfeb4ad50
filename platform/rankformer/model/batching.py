"""Length-aware batching: cells of similar length share a batch, so little is spent on padding.

A stream of cells is cut into megabatches; each megabatch is sorted by length and split into
batches under a token budget (cells x longest cell <= ``max_tokens``), and the batches are
shuffled (seeded) so consecutive steps do not walk from short to long cells.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

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


def length_grouped(
    cells: Iterable[Sequence[np.ndarray]],
    max_tokens: int,
    max_cells: int,
    megabatch_cells: int,
    rng: np.random.Generator,
) -> Iterator[list[np.ndarray]]:
    """Batches (lists of token arrays) from a stream of cells, megabatch by megabatch."""
    pending: list[np.ndarray] = []
    for cell in cells:
        pending.append(np.asarray(cell))
        if len(pending) >= megabatch_cells:
            yield from _emit(pending, max_tokens, max_cells, rng)
            pending = []
    if pending:
        yield from _emit(pending, max_tokens, max_cells, rng)


def _emit(
    cells: list[np.ndarray], max_tokens: int, max_cells: int, rng: np.random.Generator
) -> Iterator[list[np.ndarray]]:
    lengths = np.fromiter((len(c) for c in cells), dtype=np.int64, count=len(cells))
    batches = budget_batches(lengths, max_tokens, max_cells)
    for i in rng.permutation(len(batches)):
        yield [cells[j] for j in batches[i]]


def pad_batch(cells: Sequence[np.ndarray], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask), right-padded to the longest cell of the batch."""
    width = max(len(c) for c in cells)
    ids = np.full((len(cells), width), pad_id, dtype=np.int64)
    for i, c in enumerate(cells):
        ids[i, : len(c)] = c
    ids_bt = torch.from_numpy(ids)
    return ids_bt, (ids_bt != pad_id).long()


def padding_fraction(cells: Sequence[np.ndarray]) -> float:
    width = max(len(c) for c in cells)
    return 1.0 - sum(len(c) for c in cells) / (width * len(cells))
