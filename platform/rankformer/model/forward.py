"""Forward passes over many cells, batched by length, and what the later stages collect from them:
per-cell vectors (mean over gene tokens, or ``<cls>``), per-gene sums over occurrences, and class
probabilities. Fine-tuning evaluation, predictions, embeddings and perturbation all go through here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rankformer.config.infer import pick_layer
from rankformer.model.batching import budget_batches, pad_batch

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # by name


def gene_mask(ids: torch.Tensor, gene_lo: int) -> torch.Tensor:
    """True at gene tokens (specials and pad are below ``gene_lo``)."""
    return ids >= gene_lo


@dataclass
class Batch:
    index: np.ndarray  # positions of these cells in the caller's list
    ids: torch.Tensor  # (B, L) on CPU, or already on the model's device
    attn: torch.Tensor  # (B, L) on CPU


def batches(
    cells: Sequence[np.ndarray], pad: int, max_tokens: int = 16_384, max_cells: int = 64
) -> Iterator[Batch]:
    lengths = np.fromiter((len(c) for c in cells), dtype=np.int64, count=len(cells))
    for idx in budget_batches(lengths, max_tokens, max_cells):
        ids, attn = pad_batch([cells[i] for i in idx], pad)
        yield Batch(idx, ids, attn)


def one_ahead(
    items: Iterable[Batch],
    launch: Callable[[Batch], torch.Tensor],
    finish: Callable[[Batch, torch.Tensor], None],
) -> None:
    """``finish(b, launch(b))`` for every batch, one batch apart: each batch's ``launch`` (its forward
    pass and what comes back of it, on the model's device) is queued before the previous batch is
    finished. On a GPU the result is copied back into pinned memory behind its kernels and
    ``finish`` waits for that batch alone, so the host reads one batch and prepares the next while
    the device computes (see :mod:`rankformer.model.device`); on CPU it is the plain loop."""
    from rankformer.model.device import queued_mark, to_host_queued

    def done(b: Batch, host: torch.Tensor, event: Any) -> None:
        if event is not None:
            event.synchronize()
        finish(b, host)

    pending = None
    for b in items:
        out = launch(b)
        host = to_host_queued(out)
        event = queued_mark(out.device)
        if pending is not None:
            done(*pending)
        pending = (b, host, event)
    if pending is not None:
        done(*pending)


def class_probs(model: torch.nn.Module, b: Batch, device: torch.device) -> torch.Tensor:
    """A classifier's probabilities for the batch (float32, on ``device``; per cell or per token as
    its head gives them), its inputs copied there without the host waiting for the device."""
    from rankformer.model.device import mask_argument, to_device

    out = model(input_ids=to_device(b.ids, device), attention_mask=mask_argument(model, b.attn, device))
    return probs_of(logits_of(out).float(), model.config)


def probs_of(logits: torch.Tensor, config: Any) -> torch.Tensor:
    """Class probabilities from logits: one softmax, or one per task for a multi-task model
    (its config's ``task_sizes``: the tasks' logits lie side by side)."""
    sizes = getattr(config, "task_sizes", None)
    if not sizes:
        return torch.softmax(logits, -1)
    return torch.cat([torch.softmax(part, -1) for part in torch.split(logits, list(sizes), -1)], -1)


def encoder(model: torch.nn.Module) -> torch.nn.Module:
    """The BERT body of any head (``model.bert``, or the model itself)."""
    return getattr(model, "bert", model)


def n_layers(model: torch.nn.Module) -> int:
    config: Any = model.config
    return int(config.num_hidden_layers)


@torch.no_grad()
def hidden_states(model: torch.nn.Module, b: Batch, layer: int, device: torch.device) -> torch.Tensor:
    # no padding in the batch (e.g. one cell's deletions): no mask, and the attention kernel's
    # unmasked path, which is faster and gives the same states (the BERT body takes either)
    from rankformer.model.device import attention_mask_on, to_device

    body: Any = encoder(model)
    attn = attention_mask_on(b.attn, device)
    ids = to_device(b.ids, device)  # (the host does not wait for the device's queued work)
    layers = getattr(getattr(body, "encoder", None), "layer", None)
    if layers is not None and 1 <= layer == len(layers):  # the top layer (a view from up_to): the output
        return body(input_ids=ids, attention_mask=attn).last_hidden_state.float()  # (no layer kept)
    return body(input_ids=ids, attention_mask=attn, output_hidden_states=True).hidden_states[layer].float()


def up_to(model: torch.nn.Module, layer: int) -> torch.nn.Module:
    """A model sharing ``model``'s weights that runs only the layers ``hidden_states[layer]`` needs
    (the layers above it would be computed and thrown away: the penultimate layer of a 2-layer
    model costs half the forward pass)."""
    import copy

    body: Any = encoder(model)
    keep = max(layer, 1)
    if keep >= len(body.encoder.layer):
        return model
    enc = copy.copy(body.encoder)
    enc._modules = dict(enc._modules)
    enc.layer = torch.nn.ModuleList(list(body.encoder.layer)[:keep])
    view = copy.copy(body)
    view._modules = dict(view._modules)
    view.encoder = enc
    return view


def logits_of(output: Any) -> torch.Tensor:
    """Logits from a Hugging Face output, a tuple, or a plain tensor (custom heads)."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    return output[0]


def mean_pool(states: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Mean over the positions where ``keep`` is true: (B, L, H) -> (B, H)."""
    w = keep.to(states.dtype).unsqueeze(-1)
    return (states * w).sum(1) / w.sum(1).clamp(min=1.0)


class GeneSums:
    """Per-token sums of vectors over occurrences, and occurrence counts."""

    def __init__(self, n_tokens: int, dim: int) -> None:
        self.sums = torch.zeros(n_tokens, dim, dtype=torch.float64)
        self.counts = torch.zeros(n_tokens, dtype=torch.int64)

    def add(self, ids: torch.Tensor, values: torch.Tensor, keep: torch.Tensor) -> None:
        """Positions where ``keep`` is true: ``ids`` (B, L) and their ``values`` (B, L, H)."""
        self.add_flat(ids[keep.to(ids.device)], values[keep.to(values.device)])

    def add_flat(self, tokens: torch.Tensor, values: torch.Tensor) -> None:
        """One token id per row of ``values`` (N, H)."""
        flat = tokens.cpu().long()
        self.sums.index_add_(0, flat, values.detach().cpu().double())
        self.counts.index_add_(0, flat, torch.ones_like(flat))

    def merge(self, other: GeneSums) -> None:
        self.sums += other.sums
        self.counts += other.counts

    def seen(self) -> np.ndarray:
        return np.flatnonzero(self.counts.numpy())

    def means(self, tokens: np.ndarray) -> np.ndarray:
        c = self.counts[tokens].double().clamp(min=1).unsqueeze(-1)
        return (self.sums[tokens] / c).numpy()


@torch.no_grad()
def gene_and_cell_states(
    model: torch.nn.Module,
    cells: Sequence[np.ndarray],
    pad: int,
    gene_lo: int,
    layer: str | int = "penultimate",
    device: torch.device | None = None,
    max_tokens: int = 16_384,
) -> tuple[GeneSums, np.ndarray]:
    """Frozen features: per-gene sums of the layer's states over all occurrences, and each cell's
    mean over its gene tokens (in the order of ``cells``)."""
    device = device or next(model.parameters()).device
    model.eval()
    li = pick_layer(layer, n_layers(model))
    config: Any = model.config
    dim = int(config.hidden_size)
    genes = GeneSums(int(config.vocab_size), dim)
    cell_vecs = np.zeros((len(cells), dim), dtype=np.float32)

    def finish(b: Batch, h: torch.Tensor) -> None:
        keep = gene_mask(b.ids, gene_lo)
        genes.add(b.ids, h, keep)
        cell_vecs[b.index] = mean_pool(h, keep).numpy()

    one_ahead(batches(cells, pad, max_tokens), lambda b: hidden_states(model, b, li, device), finish)
    return genes, cell_vecs


@torch.no_grad()
def token_probs(
    model: torch.nn.Module, cells: list[np.ndarray], pad: int, gene_lo: int, max_tokens: int = 16_384
) -> GeneSums:
    """Per-token sums of class probabilities over every occurrence in ``cells``, and counts."""
    model.eval()
    device = next(model.parameters()).device
    config: Any = model.config
    sums = GeneSums(int(config.vocab_size), int(config.num_labels))

    def finish(b: Batch, prob: torch.Tensor) -> None:
        sums.add(b.ids, prob, b.ids >= gene_lo)

    one_ahead(batches(cells, pad, max_tokens), lambda b: class_probs(model, b, device), finish)
    return sums
