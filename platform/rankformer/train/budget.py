"""A training micro-batch's token budget on a GPU, from the memory free beside the model.

One probe step measures it: a forward and backward pass of the task on cells of the corpus's
longest length, as the loop runs it (autocast included), whose peak memory beyond the model, less
the gradients, is what a token costs. The budget is then the largest power of two of tokens whose
cost fills ``TRAIN_MEMORY_SHARE`` of what stays free once the optimizer's state is counted (AdamW:
two float32 tensors per trained parameter, created at the first step). A measured cost, not an
estimate: the kernels, the precision, packing and activation checkpointing are all in it. The
share leaves room for the caching allocator's fragments, which batches of changing shapes make.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rankformer.model.budget import CPU_MAX_TOKENS, fit_budget

TRAIN_MEMORY_SHARE = 0.7


@dataclass(frozen=True)
class Probe:
    """What the probe step measured (bytes)."""

    tokens: int
    per_token: float
    fixed: float  # the gradients and the optimizer's state, held whatever the batch
    free: float  # free beside the model before the probe (what the allocator holds unused counts)

    def budget(self) -> int:
        return fit_budget(self.free - self.fixed, self.per_token, TRAIN_MEMORY_SHARE)

    def said(self) -> str:
        gib = 1 << 30
        return (
            f"micro-batches of up to {self.budget():,} tokens: a token costs {self.per_token / 1024:.0f} KiB "
            f"(measured on {self.tokens:,}), {self.free / gib:.1f} GiB free beside the model, "
            f"{self.fixed / gib:.1f} GiB of it for gradients and optimizer state"
        )


def probe_cells(
    gene_lo: int, n_tokens: int, max_length: int, tokens: int = CPU_MAX_TOKENS
) -> list[np.ndarray]:
    """Cells of ``max_length`` distinct random gene tokens, ``tokens`` of them in all (at least one cell)."""
    rng = np.random.default_rng(0)
    length = min(max_length, n_tokens - gene_lo)
    n = max(1, tokens // max(length, 1))
    return [rng.choice(np.arange(gene_lo, n_tokens), length, replace=False) for _ in range(n)]


def measure(
    model: torch.nn.Module, task: Any, cells: list[np.ndarray], device: torch.device, precision: str
) -> Probe:
    """One probe step of ``task`` (its masking stream left as it was) on ``model``, on a CUDA
    ``device``; gradients cleared after."""
    from rankformer.train.loop import autocast_for

    gen = getattr(task, "gen", None)
    state = gen.get_state() if gen is not None else None
    trained = [p for p in model.parameters() if p.requires_grad]
    param_bytes = sum(p.numel() * p.element_size() for p in trained)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    model.train()
    with autocast_for(device, precision):
        loss, _ = task.forward(model, cells, device)
    loss.backward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    model.zero_grad(set_to_none=True)
    torch.cuda.empty_cache()
    if gen is not None:
        gen.set_state(state)
    tokens = (
        sum(len(c) for c in cells) if getattr(task, "packed", False) else len(cells) * max(map(len, cells))
    )
    per_token = max(peak - base - param_bytes, 1) / tokens
    fixed = param_bytes + 2 * sum(p.numel() * 4 for p in trained)  # gradients, AdamW's two moments
    return Probe(tokens, per_token, float(fixed), float(free))


def training_token_budget(
    max_tokens: int | None,
    model: torch.nn.Module,
    task: Any,
    device: torch.device,
    precision: str,
    max_length: int,
) -> tuple[int, str | None]:
    """(tokens per micro-batch, what was measured, in words): ``max_tokens`` when given, the CPU's
    default on a CPU, else on a GPU from a probe step (:func:`measure`) on cells of ``max_length``."""
    if max_tokens is not None:
        return max_tokens, None
    if device.type != "cuda":
        return CPU_MAX_TOKENS, None
    spec = task.spec
    cells = probe_cells(spec.gene_lo, spec.n_tokens, max_length)
    try:
        probe = measure(model, task, cells, device, precision)
    except torch.OutOfMemoryError as exc:
        from rankformer.errors import InputError

        first = (str(exc).splitlines() or [""])[0]
        raise InputError(
            f"out of GPU memory in a training step of {len(cells)} cell(s) of {max_length:,} tokens, "
            "before the first step: give --activation-checkpointing, a smaller preset, or free the "
            f"GPU ({first})"
        ) from exc
    return probe.budget(), probe.said()
