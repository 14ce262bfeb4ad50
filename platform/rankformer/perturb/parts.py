"""The pieces of a perturbation pass: how cells are perturbed (:class:`Perturbation`), the
original and perturbed batches in flight, and the windows of cells run together."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from rankformer.config.types import PerturbKind, PerturbMode

if TYPE_CHECKING:
    import torch


def unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length, as ``torch.nn.functional.cosine_similarity`` scales each side
    (norm clamped at its 1e-8): the cosine of two rows is then the sum of their product, the same
    number, with each side scaled once however many rows it meets (an original against all its
    variants)."""
    import torch

    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-8)


@dataclass
class Original:
    """A cell before perturbation: its tokens (``cell``, also on the model's device), states and
    mean-pooled embedding (as unit rows: see :func:`unit`), each gene's rank (``rank``: token ->
    rank among the cell's genes, -1 if absent), and the states' embeddings (``s_unit``, unit rows)
    with the original's cosines to them. ``lut`` (token -> position, -1 if absent; on the device)
    is made when a batch first needs it."""

    cell_id: str
    cell: np.ndarray
    cell_dev: torch.Tensor
    h0_unit: torch.Tensor
    v0_unit: torch.Tensor
    rank: np.ndarray
    s_names: list[str]
    s_unit: torch.Tensor | None
    s_cos0: torch.Tensor | None
    lut: torch.Tensor | None = None


@dataclass
class Launched:
    """A batch of a cell's variants on its way: the scores and, for per-gene rows, the batch's ids,
    matches and cosines, all on the host once ``done`` is reached (None: already there)."""

    orig: Original
    moved: np.ndarray
    table: torch.Tensor
    done: Any
    genes: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None


@dataclass(frozen=True)
class Perturbation:
    """How cells are perturbed and scored: the kind, which genes (``targets``: tokens; ``anchor``:
    perturbed together with each of them), and the states whose shifts are scored."""

    kind: PerturbKind = "delete"
    mode: PerturbMode = "each"
    targets: list[int] = field(default_factory=list)
    anchor: int | None = None
    shift: float = 0.1  # inhibit/activate: ranks moved, as a share of the cell's genes
    per_gene: bool = False  # also each affected gene's cosine
    states: dict[str, Any] = field(default_factory=dict)  # state name -> embedding

    @property
    def state_names(self) -> list[str]:
        return list(self.states)


WINDOW_CELLS = 256  # at most this many cells' originals run before their variants


WINDOW_TOKENS = 65_536  # ... and at most this many tokens of them (one cell, if longer)


def windows(lengths: list[int], max_cells: int, max_tokens: int) -> Iterator[tuple[int, int]]:
    """Consecutive [lo, hi) runs of cells, each at most ``max_cells`` cells and ``max_tokens``
    tokens (a longer cell alone)."""
    lo, n = 0, len(lengths)
    while lo < n:
        hi, tokens = lo + 1, lengths[lo]
        while hi < n and hi - lo < max_cells and tokens + lengths[hi] <= max_tokens:
            tokens += lengths[hi]
            hi += 1
        yield lo, hi
        lo = hi
