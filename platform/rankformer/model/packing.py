"""Packed micro-batches: a batch's cells laid end to end in one token stream, with no padding.

Each cell keeps its own positions (0, 1, ... restarting at every cell), and attention never
crosses a cell: Transformers' BERT reads the cell boundaries from the restarting ``position_ids``
(given no attention mask) and builds a document mask, which FlexAttention turns into a
block-sparse kernel that skips every pair of cells. The saved model is the same plain BERT: only
the batch's layout differs, so a packed forward equals the per-cell one.
"""

from __future__ import annotations

import itertools
import os
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

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

    def attention_kwargs(self, device: torch.device | str | None = None) -> dict[str, Any]:
        """The cell boundaries for :func:`varlen_attention`, given once per forward pass: on the
        host (``cu_seq_lens_q``, ``max_length_q``: no layer reads them back from the device) and,
        for a ``device``, a copy there queued without the host waiting (``cu_seq_lens_k``, int32)."""
        lengths = np.diff(self.starts)
        kw: dict[str, Any] = {
            "cu_seq_lens_q": torch.from_numpy(self.starts),
            "max_length_q": int(lengths.max()),
            "min_length_q": int(lengths.min()),
        }
        if device is not None:
            from rankformer.model.device import to_device

            kw["cu_seq_lens_k"] = to_device(torch.from_numpy(self.starts.astype(np.int32)), device)
        return kw

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
    cu_seq_lens_k: torch.Tensor | None = None,
    min_length_q: int | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """Attention within each cell of a packed batch (``query``, ``key``, ``value``: (1, heads,
    tokens, head width); cells where ``position_ids`` restart at 0), as Transformers' attention
    functions return it: (1, tokens, heads, head width). The cells' boundaries come as
    ``cu_seq_lens_q`` (host cumulative lengths, :meth:`Packed.attention_kwargs`; ``cu_seq_lens_k``
    the same on the device), else from where ``position_ids`` restart. The kernel is
    :func:`packed_kernel`'s choice. A batch with a padding mask, or more than one row, is plain
    scaled-dot-product attention."""
    import torch.nn.functional as F

    if attention_mask is not None or position_ids is None or query.shape[0] != 1:
        out = F.scaled_dot_product_attention(query, key, value, attention_mask, dropout, scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    cu = cu_seq_lens_q
    if cu is None:
        starts = (position_ids[0] == 0).nonzero().squeeze(1).cpu()
        cu = torch.cat([starts, starts.new_tensor([position_ids.shape[1]])])
    kernel = packed_kernel(query, dropout)
    if kernel != "per-cell":
        lengths = np.diff(cu.numpy())
        span = (int(min_length_q or lengths.min()), int(max_length_q or lengths.max()))
        cu_d = cu_seq_lens_k if cu_seq_lens_k is not None else cu.to(query.device, torch.int32)
        if kernel == "varlen":
            from torch.nn.attention.varlen import varlen_attn

            q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (tokens, heads, width)
            flat: Any = varlen_attn(q, k, v, cu_d, cu_d, span[1], span[1], scale=scaling)
            return flat[None], None
        return _jagged_attention(query, key, value, cu_d, span, dropout, scaling)[None], None
    parts = [
        F.scaled_dot_product_attention(
            query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=dropout, scale=scaling
        )
        for s, e in itertools.pairwise(cu.tolist())
    ]
    return torch.cat(parts, dim=2).transpose(1, 2).contiguous(), None


Kernel = Literal["varlen", "jagged", "per-cell"]
FORCED_KERNEL: Kernel | None = None  # tests: one kernel whatever the device (RANKFORMER_PACKED_KERNEL too)


def packed_kernel(query: torch.Tensor, dropout: float) -> Kernel:
    """How a packed batch's attention is computed. On a GPU in half precision: one
    variable-length FlashAttention call over the whole stream (``varlen``, PyTorch's
    ``varlen_attn``), or with attention dropout (every published preset has some, which that
    function lacks) scaled-dot-product attention on a jagged nested tensor (``jagged``: the same
    FlashAttention kernel over the cells' cumulative lengths, dropout in the kernel). Otherwise
    (a CPU, float32) scaled-dot-product attention cell by cell (``per-cell``: no cell pays for
    another's length; measured level with or faster than padded batches on a CPU, where a launch
    costs little). Dropout is drawn as in a padded batch (the same rate, its own random stream)."""
    forced = FORCED_KERNEL or os.environ.get("RANKFORMER_PACKED_KERNEL")
    if forced:
        return typing.cast(Kernel, forced)
    if query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
        return "varlen" if dropout == 0.0 else "jagged"
    return "per-cell"


def _jagged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu: torch.Tensor,
    span: tuple[int, int],
    dropout: float,
    scaling: float | None,
) -> torch.Tensor:
    """Scaled-dot-product attention over the cells as one jagged nested tensor (cells, heads,
    ragged tokens, width), which PyTorch runs as variable-length attention (FlashAttention with
    its dropout on a GPU); returns (tokens, heads, width). ``cu``: the cumulative lengths on the
    device; ``span``: the shortest and longest cell (given, so that nothing reads them back)."""
    import torch.nn.functional as F

    offsets = cu.to(torch.int64)

    def jagged(t: torch.Tensor) -> torch.Tensor:
        flat = t[0].transpose(0, 1).contiguous()  # (tokens, heads, width)
        nested = torch.nested.nested_tensor_from_jagged(flat, offsets, min_seqlen=span[0], max_seqlen=span[1])
        return nested.transpose(1, 2)

    out = F.scaled_dot_product_attention(
        jagged(query), jagged(key), jagged(value), dropout_p=dropout, scale=scaling
    )
    return out.transpose(1, 2).values()


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


# Transformers' heads whose forward takes a packed batch as it is (per-token outputs), or with
# each cell's first token pooled (:func:`pool_each_cell`)
PACKABLE = ("BertModel", "BertForMaskedLM", "BertForTokenClassification", "BertForSequenceClassification")
TAKES_PACKED = "takes_packed_batches"  # a custom head's class attribute: its forward pools each cell


def use_packing(model: torch.nn.Module) -> None:
    """Make ``model`` (a Transformers BERT head, under PEFT adapters or not) take packed batches:
    attention within each cell (:func:`use_varlen_attention`) and, for a head that pools the first
    token (BERT's sequence classifier), each cell's first token pooled. A custom head takes them
    when its class says so (``takes_packed_batches = True``: its forward reads the cells from
    ``cu_seq_lens_q``, as :func:`rankformer.model.heads.gene_mean` does); any other is refused."""
    base = _base(model)
    cls = type(base)
    ours = bool(getattr(cls, TAKES_PACKED, False))
    if not ours and not (cls.__module__.startswith("transformers.") and cls.__name__ in PACKABLE):
        from rankformer.errors import InputError

        raise InputError(
            f"--packed: the head {cls.__module__}.{cls.__name__} does not say it takes packed batches "
            f"(one row of cells end to end); leave --packed out, or give the class "
            f"`{TAKES_PACKED} = True` once its forward pools each cell from `cu_seq_lens_q` (as "
            "rankformer.model.heads.gene_mean does)"
        )
    use_varlen_attention(base)
    body = getattr(base, "bert", base)
    if not ours and getattr(body, "pooler", None) is not None:
        pool_each_cell(body)


def use_padding(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` back on Transformers' scaled-dot-product attention, as it was built (the pooler's
    hooks pass padded batches unchanged); returns it."""
    base = _base(model)
    config: Any = getattr(base, "config", None)
    if config is not None and getattr(config, "_attn_implementation", None) == VARLEN:
        base.set_attn_implementation("sdpa")  # type: ignore[operator]
    return model


def _base(model: torch.nn.Module) -> torch.nn.Module:
    """The model under PEFT adapters (the model itself without)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def pool_each_cell(bert: torch.nn.Module) -> None:
    """BERT's pooler (a dense layer on the first token of each row) on the first token of each cell
    of a packed batch: a hook on the body notes the cells' starts of each forward pass, and one on
    the pooler hands it those tokens as rows (cells, 1, hidden). A padded batch passes unchanged.
    Only hooks are added: the weights and what is saved are the same."""
    if getattr(bert, "_rankformer_pools_cells", False):
        return
    seen: dict[str, Any] = {}

    def note(module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        seen["cu"] = cumulative_lengths(kwargs)

    def firsts(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> Any:
        cu = seen.pop("cu", None)
        if cu is None:
            return None
        hidden = args[0]
        starts = cu[:-1].to(hidden.device, torch.int64)
        return (hidden[0].index_select(0, starts)[:, None],)

    bert.register_forward_pre_hook(note, with_kwargs=True)
    bert.pooler.register_forward_pre_hook(firsts)  # type: ignore[union-attr]
    bert._rankformer_pools_cells = True  # type: ignore[assignment]


def cumulative_lengths(kwargs: dict[str, Any]) -> torch.Tensor | None:
    """A packed batch's cell boundaries among a forward pass's keywords (the device copy,
    ``cu_seq_lens_k``, else the host's ``cu_seq_lens_q``); None for a padded batch."""
    cu = kwargs.get("cu_seq_lens_k")
    return kwargs.get("cu_seq_lens_q") if cu is None else cu


def cell_index(cu: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """The cell of each of a packed batch's ``n_tokens`` tokens, from its cumulative lengths (on
    the host or the device: given the size, nothing is read back)."""
    lengths = (cu[1:] - cu[:-1]).long()
    cells = torch.arange(len(lengths), device=cu.device)
    return torch.repeat_interleave(cells, lengths, output_size=n_tokens)
