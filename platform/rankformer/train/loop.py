"""The training loop shared by pretraining and fine-tuning, as a plain function of a model, a task
and a context. The context is where the loop runs: in this process (tests, small jobs) or inside a
Ray Train worker (:mod:`rankformer.train.ray_train`); the task says what a batch is and what its
loss is. Checkpoints hold model, optimizer, scheduler, data position and RNG, so a restarted worker
group carries on from the step it had reached, not from step 0.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch

from rankformer.cluster import maybe_inject_fault
from rankformer.config.train import OptimOptions
from rankformer.errors import InputError


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # passes over this worker's data begun
    batch_in_epoch: int = 0  # micro-batches of the current epoch consumed (the data position)
    tokens: int = 0  # real (non-pad) tokens this worker has trained on


@dataclass
class LoopOptions:
    max_steps: int
    seed: int
    log_every: int
    checkpoint_every: int
    optim: OptimOptions
    precision: str = "auto"
    compile: bool = False
    extra_metrics: dict[str, float] = field(default_factory=dict)
    # scores of the model at each checkpoint (rank 0; e.g. validation), logged and reported with it
    evaluate: Callable[[torch.nn.Module], dict[str, float]] | None = None


# A sum to log: a number, or a tensor on the device that is read only when the metrics are logged,
# so that a training step does not make the host wait for the device.
Stat = float | torch.Tensor


class Task(Protocol):
    def epoch_batches(self, epoch: int) -> Iterator[Any]: ...

    def forward(
        self, model: torch.nn.Module, batch: Any, device: torch.device
    ) -> tuple[torch.Tensor, dict[str, Stat]]:
        """(loss, sums to log: must include 'tokens' and 'pad_tokens' as numbers; 'correct'/'labels' if
        any)."""
        ...


class Context(Protocol):
    rank: int
    world: int
    device: torch.device

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module: ...

    def restore(self) -> AbstractContextManager[str | None]: ...

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        """Called by every worker at the same steps (a barrier under Ray Train)."""
        ...

    def log(self, metrics: dict[str, float]) -> None:
        """Metrics of this worker's last steps (the context keeps rank 0's)."""
        ...

    def all_min_started(self, value: int) -> Callable[[], int]:
        """The workers' minimum of ``value``, started now; calling the result reads it. Started before
        a step's work is queued and read after, it keeps the host a step ahead of the device."""
        ...


def make_optimizer(
    model: torch.nn.Module, opts: OptimOptions, max_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (no decay on biases and norms); linear warmup, then linear or cosine decay to 0."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "LayerNorm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": opts.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # on a GPU one fused kernel updates every parameter (the same AdamW; the step is not a loop of
    # small kernels over the parameter tensors)
    fused = all(p.is_cuda for p in decay + no_decay) and bool(decay + no_decay)
    betas = (0.9, opts.adam_beta2)
    opt = torch.optim.AdamW(groups, lr=opts.lr, betas=betas, eps=opts.adam_eps, fused=fused or None)
    warm = opts.warmup(max_steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / max(warm, 1)
        frac = (step - warm) / max(max_steps - warm, 1)
        if opts.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))
        return max(0.0, 1.0 - frac)

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)


def save_checkpoint(
    d: str, model: torch.nn.Module, opt: Any, sched: Any, state: TrainState, gen: Any
) -> None:
    torch.save(_unwrap(model).state_dict(), os.path.join(d, "model.pt"))
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}, os.path.join(d, "optim.pt"))
    torch.save({"torch": torch.get_rng_state(), "generator": gen.get_state()}, os.path.join(d, "rng.pt"))
    with open(os.path.join(d, "state.json"), "w") as f:
        json.dump(asdict(state), f)


def load_checkpoint(d: str, model: torch.nn.Module, opt: Any, sched: Any, gen: Any) -> TrainState:
    _unwrap(model).load_state_dict(
        torch.load(os.path.join(d, "model.pt"), map_location="cpu", weights_only=True)
    )
    o = torch.load(os.path.join(d, "optim.pt"), map_location="cpu", weights_only=True)
    opt.load_state_dict(o["optimizer"])
    sched.load_state_dict(o["scheduler"])
    rng = torch.load(os.path.join(d, "rng.pt"), weights_only=True)
    torch.set_rng_state(rng["torch"])
    gen.set_state(rng["generator"])
    with open(os.path.join(d, "state.json")) as f:
        return TrainState(**json.load(f))


def autocast_for(device: torch.device, precision: str) -> AbstractContextManager[Any]:
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


class _Window:
    """Sums over the steps since the last log; those on the device are read once, at the log."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, Stat] = {}
        self.steps = 0
        self.t0 = time.perf_counter()

    def add(self, stats: dict[str, Stat]) -> None:
        _accumulate(self.sums, stats)

    def read(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.sums.items()}


def _accumulate(sums: dict[str, Stat], stats: dict[str, Stat]) -> None:
    for k, v in stats.items():
        sums[k] = sums[k] + v if k in sums else v


def run_loop(model: torch.nn.Module, task: Task, opts: LoopOptions, ctx: Context) -> dict[str, float]:
    """Train to ``opts.max_steps``; returns the last metrics logged."""
    torch.manual_seed(opts.seed)  # the same initial weights on every worker
    model.to(ctx.device)
    opt, sched = make_optimizer(model, opts.optim, opts.max_steps)
    gen = torch.Generator().manual_seed(opts.seed * 1_000_003 + ctx.rank)
    state = TrainState()
    with ctx.restore() as ckpt_dir:
        if ckpt_dir:
            state = load_checkpoint(ckpt_dir, model, opt, sched, gen)
    resumed_from = state.step
    compiled: torch.nn.Module = torch.compile(model) if opts.compile else model  # type: ignore[assignment]
    model = ctx.prepare(compiled)
    model.train()
    win, last = _Window(), {"resumed_from_step": float(resumed_from)}
    accum = opts.optim.grad_accum
    while state.step < opts.max_steps:
        batches = task.epoch_batches(state.epoch)
        for _ in range(state.batch_in_epoch):  # resume inside an epoch: skip what was consumed
            next(batches, None)
        steps_this_epoch = 0
        micro, agreed = _next_micro(batches, accum, ctx)
        while state.step < opts.max_steps:
            if agreed() == 0:
                break  # some worker ran out: all end the epoch together (DDP needs equal steps)
            current = micro
            if state.step + 1 < opts.max_steps:  # the next step's batches, agreed on while this one runs
                micro, agreed = _next_micro(batches, accum, ctx)
            stats = _step(model, task, current, opts, ctx, opt, sched, gen)
            state.step += 1
            state.batch_in_epoch += accum
            state.tokens += int(stats["tokens"])  # a number (see Task.forward)
            steps_this_epoch += 1
            win.add(stats)
            win.steps += 1
            maybe_inject_fault("train-step", f"rank{ctx.rank}-step{state.step}")
            if state.step % opts.log_every == 0 or state.step == opts.max_steps:
                last = _metrics(win, state, sched, opts, resumed_from)
                win.reset()
                ctx.log(last)
            if state.step % opts.checkpoint_every == 0 or state.step == opts.max_steps:
                if opts.evaluate is not None and ctx.rank == 0:
                    model.eval()
                    scores = opts.evaluate(_unwrap(model))
                    model.train()
                    last = {**last, **scores}
                    ctx.log({**scores, "step": float(state.step)})
                _report_checkpoint(ctx, last, model, opt, sched, state, gen)
        if steps_this_epoch == 0:
            raise InputError(
                "an epoch produced no batch on some worker: the corpus has too few cells for "
                "the number of workers; use fewer workers or a larger corpus"
            )
        state.epoch += 1
        state.batch_in_epoch = 0
    return last


def _next_micro(batches: Iterator[Any], accum: int, ctx: Context) -> tuple[list[Any], Callable[[], int]]:
    """The next step's micro-batches, and the workers' agreement, started, that each has them all.
    (They count as consumed once trained: a checkpoint's data position leaves them out.)"""
    micro = [b for b in (next(batches, None) for _ in range(accum)) if b is not None]
    return micro, ctx.all_min_started(int(len(micro) == accum))


def _step(
    model: torch.nn.Module,
    task: Task,
    micro: list[Any],
    opts: LoopOptions,
    ctx: Context,
    opt: torch.optim.Optimizer,
    sched: Any,
    gen: torch.Generator,
) -> dict[str, Stat]:
    """One optimizer step over the micro-batches; nothing in it makes the host wait for the device."""
    sums: dict[str, Stat] = {}
    for b in micro:
        with autocast_for(ctx.device, opts.precision):
            loss, stats = task.forward(model, b, ctx.device)
        (loss / len(micro)).backward()
        _accumulate(sums, {**stats, "loss": loss.detach().double() / len(micro)})  # summed as on the host
    clip = opts.optim.grad_clip if opts.optim.grad_clip > 0 else float("inf")
    sums["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), clip).double()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return sums


def _metrics(
    win: _Window, state: TrainState, sched: Any, opts: LoopOptions, resumed_from: int
) -> dict[str, float]:
    s = win.read()  # the one wait for the device in the window's steps
    dt = max(time.perf_counter() - win.t0, 1e-9)
    real, pad = s.get("tokens", 0.0), s.get("pad_tokens", 0.0)
    out = {
        "loss": s.get("loss", 0.0) / max(win.steps, 1),
        "grad_norm": s.get("grad_norm", 0.0) / max(win.steps, 1),
        "lr": float(sched.get_last_lr()[0]),
        "tokens_per_s": real / dt,
        "padding_fraction": pad / max(real + pad, 1.0),
        "step": float(state.step),
        "epoch": float(state.epoch),
        "resumed_from_step": float(resumed_from),
    }
    if s.get("labels"):
        out["accuracy"] = s.get("correct", 0.0) / s["labels"]
    flops = opts.extra_metrics.get("flops_per_token")
    peak = opts.extra_metrics.get("peak_flops")
    if flops and peak:
        out["mfu"] = real / dt * flops / peak
    return out


def _report_checkpoint(
    ctx: Context,
    metrics: dict[str, float],
    model: torch.nn.Module,
    opt: Any,
    sched: Any,
    state: TrainState,
    gen: torch.Generator,
) -> None:
    if ctx.rank != 0:
        ctx.report(metrics, None)
        return
    with tempfile.TemporaryDirectory(prefix="rankformer-ckpt-") as d:
        save_checkpoint(d, model, opt, sched, state, gen)
        ctx.report(metrics, d)
