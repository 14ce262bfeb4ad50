"""Where a model runs, and the process settings that go with it."""

from __future__ import annotations

import torch


def pick_device(use_gpu: bool) -> torch.device:
    """A GPU when asked for and present, else the CPU; settled (see :func:`settle`)."""
    return settle(torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu"))


def settle(device: torch.device | str) -> torch.device:
    """Process settings for model work on ``device``; returns it.

    On CUDA, scaled-dot-product attention leaves out its cuDNN backend. cuDNN builds an execution
    plan for every new (batch, length) shape, a fraction of a second each, and our batches change
    shape nearly every call: length-grouped training steps, and each perturbed cell's variants one
    token shorter than the cell. On an H200 (torch 2.11) that made bfloat16 perturbation 5x slower
    than float32. FlashAttention and the memory-efficient kernel serve every shape without a plan.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)
    return device
