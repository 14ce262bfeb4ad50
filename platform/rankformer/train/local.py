"""Run the training loop in this process (tests, benchmarks, debugging): the same loop, task and
checkpoint format as on Ray Train, with checkpoints kept in a local folder."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from rankformer.model.device import settle


@dataclass
class LocalCheckpoint:
    path: str  # the checkpoint folder

    @contextmanager
    def as_directory(self) -> Iterator[str]:
        yield self.path


@dataclass
class LocalResult:
    metrics: dict[str, float]
    checkpoint: LocalCheckpoint


class LocalContext:
    rank = 0
    world = 1

    def __init__(
        self,
        checkpoint_root: str | None = None,
        device: str | None = None,
        tracking: dict[str, str] | None = None,
    ) -> None:
        self.device = settle(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.root = checkpoint_root
        self.tracking = tracking  # {"uri", "run_id"}: metrics also go to that MLflow run
        self.history: list[dict[str, float]] = []
        self.checkpoints: list[int] = []
        self.reported: dict[int, dict[str, float]] = {}  # step -> metrics of each checkpoint

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def _latest(self) -> str | None:
        if not self.root or not os.path.isdir(self.root):
            return None
        steps = sorted(int(n.split("-")[1]) for n in os.listdir(self.root) if n.startswith("step-"))
        return os.path.join(self.root, f"step-{steps[-1]}") if steps else None

    @contextmanager
    def restore(self) -> Iterator[str | None]:
        yield self._latest()

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        if checkpoint_dir and self.root:
            step = int(metrics.get("step", 0))
            staged = os.path.join(self.root, f".tmp-step-{step}")
            shutil.rmtree(staged, ignore_errors=True)
            shutil.copytree(checkpoint_dir, staged)
            os.replace(staged, os.path.join(self.root, f"step-{step}"))
            self.checkpoints.append(step)
            self.reported[step] = dict(metrics)

    def best(self, metric: str) -> str | None:
        """The checkpoint folder with the highest ``metric`` (the latest on ties), if any."""
        scored = [(m[metric], s) for s, m in self.reported.items() if metric in m]
        if not self.root or not scored:
            return None
        return os.path.join(self.root, f"step-{max(scored)[1]}")

    def result(self) -> LocalResult:
        """The last checkpoint and its metrics, shaped as Ray Train's Result (metrics, checkpoint)."""
        if not self.root or not self.reported:
            raise RuntimeError("the training reported no checkpoint")
        step = max(self.reported)
        return LocalResult(
            dict(self.reported[step]), LocalCheckpoint(os.path.join(self.root, f"step-{step}"))
        )

    def log(self, metrics: dict[str, float]) -> None:
        self.history.append(dict(metrics))
        from rankformer.tracking import log_step

        log_step(self.tracking, metrics)

    def all_min_started(self, value: int) -> Callable[[], int]:
        return lambda: value  # one worker
