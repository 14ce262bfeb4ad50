"""Packed micro-batches: a batch's cells laid end to end in one token stream, with no padding.

Each cell keeps its own positions (0, 1, ... restarting at every cell), and attention never
crosses a cell: Transformers' BERT reads the cell boundaries from the restarting ``position_ids``
(given no attention mask) and builds a document mask, which FlexAttention turns into a
block-sparse kernel that skips every pair of cells. The saved model is the same plain BERT: only
the batch's layout differs, so a packed forward equals the per-cell one.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class Packed:
    """A packed micro-batch: ``ids`` and ``positions`` (1, tokens); cell ``i`` is the slice
    ``starts[i]:starts[i + 1]`` of the stream."""

    ids: torch.Tensor
    positions: torch.Tensor
    starts: np.ndarray

    @property
    def n_tokens(self) -> int:
        return int(self.starts[-1])

    def attention_kwargs(self) -> dict[str, Any]:
        """The cell boundaries for :func:`varlen_attention`, given once per forward pass (on the
        host: no layer then reads them back from the device)."""
        return {
            "cu_seq_lens_q": torch.from_numpy(self.starts),
            "max_length_q": int(np.diff(self.starts).max()),
        }

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per-token rows of the stream (tokens, ...) cut back into one tensor per cell."""
        return list(torch.split(flat, np.diff(self.starts).tolist()))


def pack_cells(cells: Sequence[np.ndarray]) -> Packed:
    """The cells' tokens end to end, with each cell's positions."""
    lengths = np.fromiter((len(c) for c in cells), dtype=np.int64, count=len(cells))
    if len(cells) == 0 or lengths.min() < 1:
        raise ValueError("a packed batch needs at least one cell, and no empty cell")  # a caller's bug
    starts = np.concatenate([[0], np.cumsum(lengths)])
    ids = np.concatenate([np.asarray(c, dtype=np.int64) for c in cells])
    positions = np.arange(int(starts[-1]), dtype=np.int64) - np.repeat(starts[:-1], lengths)
    return Packed(torch.from_numpy(ids)[None], torch.from_numpy(positions)[None], starts)


def packed_batches(lengths: np.ndarray, max_tokens: int, max_cells: int) -> list[np.ndarray]:
    """Indices of ``lengths`` in order, cut into batches of at most ``max_tokens`` tokens in all
    (a longer cell alone) and ``max_cells`` cells: a packed batch pays for its tokens only, so no
    sorting by length is needed."""
    batches: list[np.ndarray] = []
    start, total = 0, 0
    for i, n in enumerate(lengths.tolist()):
        if i > start and (total + n > max_tokens or i - start >= max_cells):
            batches.append(np.arange(start, i))
            start, total = i, 0
        total += n
    if start < len(lengths):
        batches.append(np.arange(start, len(lengths)))
    return batches


VARLEN = "rankformer_varlen"  # the attention implementation name a packed model runs with


def varlen_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_ids: torch.Tensor | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Attention within each cell of a packed batch (``query``, ``key``, ``value``: (1, heads,
    tokens, head width); cells where ``position_ids`` restart at 0), as Transformers' attention
    functions return it: (1, tokens, heads, head width). On a GPU in half precision without
    attention dropout, one variable-length FlashAttention call over the whole stream; otherwise
    scaled-dot-product attention cell by cell (no cell pays for another's length, and dropout is
    the same as a padded batch's). The cells' boundaries come as ``cu_seq_lens_q`` (host
    cumulative lengths, :meth:`Packed.attention_kwargs`), else from where ``position_ids`` restart.
    A batch with a padding mask, or more than one row, is plain scaled-dot-product attention."""
    import torch.nn.functional as F

    if attention_mask is not None or position_ids is None or query.shape[0] != 1:
        out = F.scaled_dot_product_attention(query, key, value, attention_mask, dropout, scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    cu = cu_seq_lens_q
    if cu is None:
        starts = (position_ids[0] == 0).nonzero().squeeze(1).cpu()
        cu = torch.cat([starts, starts.new_tensor([position_ids.shape[1]])])
    bounds = cu.tolist()
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and dropout == 0.0:
        from torch.nn.attention.varlen import varlen_attn

        longest = max_length_q or max(e - s for s, e in itertools.pairwise(bounds))
        cu_d = cu.to(query.device, torch.int32, non_blocking=True)
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, width)
        flat: Any = varlen_attn(q, k, v, cu_d, cu_d, longest, longest, scale=scaling)
        return flat[None], None
    parts = [
        F.scaled_dot_product_attention(
            query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=dropout, scale=scaling
        )
        for s, e in itertools.pairwise(bounds)
    ]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


def varlen_mask(*args: Any, **kwargs: Any) -> Any:
    """The attention mask of a batch under :func:`varlen_attention`: none for a packed batch (the
    cells are read from the positions), scaled-dot-product attention's for a padded one."""
    from transformers.masking_utils import sdpa_mask

    return None if kwargs.get("attention_mask") is None else sdpa_mask(*args, **kwargs)


def use_varlen_attention(model: torch.nn.Module) -> None:
    """Run ``model`` (a Transformers BERT) with :func:`varlen_attention`. Only how attention is
    computed changes: the weights, the config it saves and a padded batch's results are the same."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as exc:
        from rankformer.errors import InputError

        raise InputError(
            f"--packed needs Transformers 5 (its attention interfaces: {exc}); upgrade it"
        ) from None

    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, varlen_mask)
    model.set_attn_implementation(VARLEN)  # type: ignore[operator]
