"""Where a model runs, and the process settings that go with it."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from rankformer.errors import InputError


def pick_device(use_gpu: bool) -> torch.device:
    """The GPU when asked for (an error naming the fix if this process has none), else the CPU;
    settled (see :func:`settle`)."""
    return settle("cuda" if use_gpu else "cpu")


def settle(device: torch.device | str) -> torch.device:
    """Process settings for model work on ``device``; returns it.

    On CUDA, scaled-dot-product attention leaves out its cuDNN backend. cuDNN builds an execution
    plan for every new (batch, length) shape, a fraction of a second each, and our batches change
    shape nearly every call: length-grouped training steps, and each perturbed cell's variants one
    token shorter than the cell, so the plans would cost more than the attention they speed up.
    FlashAttention and the memory-efficient kernel serve every shape without a plan.
    """
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(no_gpu_message())
        torch.backends.cuda.enable_cudnn_sdp(False)
    return device


def device_token_budget(
    max_tokens: int | None, model: torch.nn.Module, device: torch.device, max_length: int
) -> int:
    """Tokens per forward batch of ``model`` (on ``device``, cells up to ``max_length`` tokens):
    ``max_tokens`` if given; on CUDA, from the memory free beside the model (what the caching
    allocator holds unused counts as free) by :func:`rankformer.config.infer.fit_budget`; else the
    CPU's default."""
    from rankformer.model.budget import bytes_per_cell, bytes_per_token, fit_budget, token_budget

    if max_tokens is not None or device.type != "cuda":
        return token_budget(max_tokens)
    config: Any = model.config
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    heads = int(config.num_attention_heads)
    element = next(model.parameters()).element_size()
    per_token = bytes_per_token(int(config.hidden_size), int(config.intermediate_size), heads, element)
    return fit_budget(free - bytes_per_cell(heads, max_length), per_token)


@contextmanager
def budget_named_on_oom(max_tokens: int) -> Iterator[None]:
    """A device out of memory in the forward passes inside, raised again as an input error that names
    the fix: fewer tokens per forward batch."""
    try:
        yield
    except torch.OutOfMemoryError as exc:
        first = (str(exc).splitlines() or [""])[0]
        raise InputError(
            f"out of GPU memory with forward batches of up to {max_tokens:,} tokens: give --max-tokens "
            f"(max_tokens= in Python) {max(1, max_tokens // 2)} or fewer, or free the GPU ({first})"
        ) from exc


def no_gpu_message() -> str:
    build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
    return (
        f"--use-gpu: this process sees no CUDA device (torch {torch.__version__}, {build}); run it "
        "where a GPU and the CUDA build of torch are installed, or leave --use-gpu out"
    )


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on ``device``, the host not waiting for the device. A plain copy to a GPU
    synchronises its stream (the host waits until every queued kernel has run), so one small index
    table per batch would make the host and the GPU take turns; here it goes through pinned memory,
    queued (the pinned block is kept until the copy has run)."""
    device = torch.device(device)
    if device.type != "cuda" or t.is_cuda:
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def attention_mask_on(attn: torch.Tensor, device: torch.device | str) -> torch.Tensor | None:
    """A host (batch, tokens) 0/1 padding mask as a BERT body's ``attention_mask`` on ``device``,
    decided on the host: None when no token is padding (attention's unmasked kernels; the same
    states), else (batch, 1, 1, tokens) booleans, which Transformers' BERT takes as they are. Given
    the 2-D mask, it asks the device at every forward whether the mask holds any padding (``.all()``
    on the device's mask), which makes the host wait for the GPU. (A Transformers whose BERT does not
    build its masks with ``masking_utils``, before 5, gets the 2-D mask.)"""
    if bool(attn.all()):
        return None
    if not bert_takes_prepared_masks():
        return to_device(attn, device)
    return to_device(attn.bool()[:, None, None, :].contiguous(), device)


@functools.cache
def bert_takes_prepared_masks() -> bool:
    """Whether this Transformers' BERT uses a 4-D attention mask as given (``masking_utils``)."""
    from transformers.models.bert import modeling_bert

    return hasattr(modeling_bert, "create_bidirectional_mask")


def mask_argument(
    model: torch.nn.Module, attn: torch.Tensor, device: torch.device | str
) -> torch.Tensor | None:
    """``attention_mask`` for ``model`` (a host padding mask ``attn``): as :func:`attention_mask_on`
    for Transformers' own classes; custom heads get the 2-D mask they may pool with."""
    inner = getattr(model, "module", model)  # under DistributedDataParallel
    if type(inner).__module__.startswith("transformers."):
        return attention_mask_on(attn, device)
    return to_device(attn, device)


def to_host_queued(t: torch.Tensor) -> torch.Tensor:
    """A device tensor's copy into pinned host memory, queued behind the work that computes it: read
    it only once an event recorded after this call has completed. A host tensor is returned as is."""
    if not t.is_cuda:
        return t
    return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True)


def queued_mark(device: torch.device) -> torch.cuda.Event | None:
    """On a GPU, an event recorded after the work queued so far (``.synchronize()`` waits for that
    work alone, e.g. a batch and its copies from :func:`to_host_queued`); elsewhere None, the work
    being done already."""
    if device.type != "cuda":
        return None
    event = torch.cuda.Event()
    event.record()
    return event
