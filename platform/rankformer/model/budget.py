"""How many tokens one forward pass takes (cells x longest cell), unless the job says.

The rule: on a CPU a fixed budget that keeps a batch's activations near the caches. On a GPU the
largest power of two of tokens whose activations (:func:`bytes_per_token`, plus what each cell
holds whatever the batch: :func:`bytes_per_cell`) fill ``GPU_MEMORY_SHARE`` of the memory free
beside the model, between the CPU's budget and ``GPU_MAX_TOKENS``: each pass costs its host a few
milliseconds whatever its size, so a GPU is kept busy by few, large passes. The measurements behind
the numbers are in the benchmark records (docs: performance)."""

from __future__ import annotations

CPU_MAX_TOKENS = 16_384
GPU_MAX_TOKENS = 1 << 20
GPU_MEMORY_SHARE = 0.5


def token_budget(max_tokens: int | None) -> int:
    """Tokens per forward batch on the CPU: ``max_tokens`` if given, else the CPU's default (a GPU's
    comes from its memory: :func:`rankformer.model.device.device_token_budget`)."""
    return CPU_MAX_TOKENS if max_tokens is None else max_tokens


def fit_budget(free_bytes: float, per_token: float, share: float = GPU_MEMORY_SHARE) -> int:
    """The largest power of two of tokens whose ``per_token`` bytes fill at most ``share`` of
    ``free_bytes``, clamped to [CPU_MAX_TOKENS, GPU_MAX_TOKENS]."""
    fit = share * free_bytes / per_token
    budget = CPU_MAX_TOKENS
    while budget * 2 <= min(fit, GPU_MAX_TOKENS):
        budget *= 2
    return budget


def bytes_per_token(hidden: int, intermediate: int, heads: int, element_bytes: int) -> int:
    """An upper estimate of the device memory a forward batch holds per token at its peak, for a
    BERT of these sizes with weights of ``element_bytes``: a layer's activations (input, query, key,
    value, context, projections, residual sums, the feed-forward's inner rows: 8 hidden widths and
    one inner width), the scores' float32 rows (the states, their unit rows, the matched original
    rows and their product: 4 hidden widths), and a perturbation's shared first layer (per head,
    five float32 running sums a token of the head's width plus its normaliser). It is meant to
    over-estimate (about twice what a perturbation pass was measured to grow by a token), never
    to under-estimate."""
    head = hidden // heads
    return (8 * hidden + intermediate) * element_bytes + 4 * hidden * 4 + 5 * heads * (head + 1) * 4


def bytes_per_cell(heads: int, max_length: int) -> int:
    """What a perturbation pass holds whatever its size: its shared first layer's scores and their
    exponentials, each head's queries against its keys (two float32 matrices a side, the longest
    cell's length squared)."""
    return 4 * heads * max_length**2 * 4
