"""Hyperparameter search with Ray Tune, one option away (``--trials N``): learning rate
(log-uniform), warmup share, weight decay and frozen layers, sampled at random; ASHA stops weak
trials early. Each trial trains one classifier in its own Ray worker and is scored on validation
(macro F1 of cells, or ROC AUC of held-out genes) every ``eval_every`` steps. The best trial's
settings then drive the real training; every trial is a nested MLflow run of the job.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from rankformer import tracking
from rankformer.config.train import TuneOptions
from rankformer.model.device import settle
from rankformer.placement import Demand

METRIC = "val_score"


class TuneContext:
    """Where :func:`run_loop` runs inside a Tune trial: one process, scores go to Tune."""

    rank = 0
    world = 1

    def __init__(self, device: str) -> None:
        self.device = settle(device)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    @contextmanager
    def restore(self) -> Iterator[str | None]:
        yield None

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        from ray import tune

        tune.report({k: float(v) for k, v in metrics.items()})

    def log(self, metrics: dict[str, float]) -> None:
        pass

    def all_min_started(self, value: int) -> Callable[[], int]:
        return lambda: value  # one worker


class GeneScorer:
    """ROC AUC (binary) or macro one-vs-rest AUC of validation genes: mean class probability over
    their occurrences in the cells holding them."""

    def __init__(
        self,
        cells: list[np.ndarray],
        tokens: np.ndarray,
        label: np.ndarray,
        pad: int,
        gene_lo: int,
        max_tokens: int,
    ) -> None:
        from rankformer.classify.data import cells_with_tokens

        self.cells = [cells[i] for i in cells_with_tokens(cells, tokens)]
        self.tokens, self.label, self.pad, self.gene_lo, self.max_tokens = (
            tokens,
            label,
            pad,
            gene_lo,
            max_tokens,
        )

    def __call__(self, model: torch.nn.Module) -> float:
        from rankformer.model.forward import token_probs
        from rankformer.train.metrics import scores

        prob = token_probs(model, self.cells, self.pad, self.gene_lo, self.max_tokens).means(self.tokens)
        return float(scores(self.label, prob, [str(i) for i in range(prob.shape[1])])["roc_auc"])


class CellScorer:
    """Macro F1 of validation cells."""

    def __init__(self, cells: list[np.ndarray], y: np.ndarray, pad: int, max_tokens: int) -> None:
        self.cells, self.y, self.pad, self.max_tokens = cells, y, pad, max_tokens

    def __call__(self, model: torch.nn.Module) -> float:
        from rankformer.train.finetune import cell_probs
        from rankformer.train.metrics import scores

        prob = cell_probs(model, self.cells, self.pad, self.max_tokens)
        return float(scores(self.y, prob, [str(i) for i in range(prob.shape[1])])["macro_f1"])


def search_plan(opts: TuneOptions, n_layers: int, max_steps: int) -> tuple[dict[str, Any], dict[str, int]]:
    """The search space and ASHA's settings (in validation rounds of ``eval_every`` steps)."""
    from ray import tune

    space = {
        "lr": tune.loguniform(*opts.tune_lr),
        "warmup_fraction": tune.uniform(*opts.tune_warmup_fraction),
        "weight_decay": tune.uniform(*opts.tune_weight_decay),
        "freeze_layers": tune.choice(opts.tune_freeze_layers or list(range(n_layers))),
    }
    rounds = max(1, max_steps // opts.eval_every)
    return space, {"max_t": rounds, "grace_period": max(1, opts.grace_steps // opts.eval_every)}


def trials_demand(opts: TuneOptions, use_gpu: bool) -> Demand:
    """Trials run as resources allow, but one must fit a node, else Tune waits forever."""
    return Demand(
        "Tune trials",
        opts.trials,
        cpus=opts.cpus_per_trial,
        gpus=1.0 if use_gpu else 0.0,
        flags="--cpus-per-trial" + (", or leave out --use-gpu" if use_gpu else ""),
        gang=False,
    )


def apply(spec: Any, params: dict[str, Any]) -> Any:
    """A copy of a TrainSpec with a trial's settings."""
    optim = dataclasses.replace(
        spec.optim,
        lr=float(params.get("lr", spec.optim.lr)),
        warmup_fraction=float(params.get("warmup_fraction", spec.optim.warmup_fraction)),
        warmup_steps=None if "warmup_fraction" in params else spec.optim.warmup_steps,
        weight_decay=float(params.get("weight_decay", spec.optim.weight_decay)),
    )
    head = dataclasses.replace(
        spec.head, freeze_layers=int(params.get("freeze_layers", spec.head.freeze_layers))
    )
    return dataclasses.replace(spec, optim=optim, head=head)


def _trial(
    params: dict[str, Any],
    spec_doc: dict[str, Any],
    ids: list[np.ndarray],
    y: np.ndarray,
    scorer: Callable[[torch.nn.Module], float],
    eval_every: int,
    device: str,
) -> None:
    from rankformer.train.finetune import _task, classifier_for, local_rows, loop_options, spec_from_dict
    from rankformer.train.loop import run_loop

    os.environ["HF_HUB_OFFLINE"] = "1"
    spec = apply(spec_from_dict(spec_doc), params)
    spec = dataclasses.replace(
        spec, checkpoint_every=eval_every, log_every=eval_every, val_ids=None, val_y=None
    )
    opts = dataclasses.replace(loop_options(spec), evaluate=lambda m: {METRIC: scorer(m)})
    run_loop(classifier_for(spec), _task(spec, local_rows(ids, y, spec.seed), 0), opts, TuneContext(device))


def search(
    spec: Any,
    ids: list[np.ndarray],
    y: np.ndarray,
    scorer: Callable[[torch.nn.Module], float],
    opts: TuneOptions,
    n_layers: int,
    use_gpu: bool,
    storage: str,
    mlflow: tuple[str, str, str],
    ray_address: str | None = None,
) -> dict[str, Any]:
    """Run the search; returns the best trial's settings and score. ``mlflow``: (tracking URI,
    experiment, parent run id); ``ray_address``: the cluster to join (see :func:`ensure_ray`)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from rankformer.cluster import ensure_ray
    from rankformer.config.corpus import ClusterOptions
    from rankformer.train.finetune import local_dir

    ensure_ray(ClusterOptions(ray_address=ray_address), trials_demand(opts, use_gpu))
    space, asha = search_plan(opts, n_layers, spec.max_steps)
    trainable = tune.with_parameters(
        _trial,
        spec_doc=asdict(spec),
        ids=ids,
        y=y,
        scorer=scorer,
        eval_every=opts.eval_every,
        device="cuda" if use_gpu else "cpu",
    )
    resources = {"cpu": opts.cpus_per_trial, **({"gpu": 1} if use_gpu else {})}
    tuner = tune.Tuner(
        tune.with_resources(trainable, resources),
        param_space=space,
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            num_samples=opts.trials,
            scheduler=ASHAScheduler(max_t=asha["max_t"], grace_period=asha["grace_period"]),
        ),
        run_config=tune.RunConfig(name="tune", storage_path=os.path.abspath(local_dir(storage)), verbose=0),
    )
    trials = _record_trials(tuner.fit(), list(space), mlflow)
    best = max(trials, key=lambda t: t[METRIC])
    uri, _, parent = mlflow
    tracking.log_metrics(uri, parent, {f"best_trial_{METRIC}": best[METRIC]}, 0)
    for k, v in best["params"].items():
        tracking.set_tag(uri, parent, f"best_trial.{k}", str(v))
    return {"best": best, "trials": trials}


def _record_trials(grid: Any, names: list[str], mlflow: tuple[str, str, str]) -> list[dict[str, Any]]:
    """Each trial that reported a score: its settings, best score and steps run, also logged as a
    child MLflow run of the search's run."""
    uri, experiment, parent = mlflow
    trials: list[dict[str, Any]] = []
    for i in range(len(grid)):
        r = grid[i]
        if r.metrics is None or METRIC not in r.metrics:
            continue
        score = (
            float(max(r.metrics_dataframe[METRIC].dropna()))
            if r.metrics_dataframe is not None
            else float(r.metrics[METRIC])
        )
        steps = int(r.metrics.get("step", 0))
        params = {k: (r.config or {})[k] for k in names}
        trials.append({"params": params, METRIC: score, "steps": steps})
        run = tracking.start_run(uri, experiment, f"trial-{i}", {"mlflow.parentRunId": parent, "job": "tune"})
        tracking.log_params(uri, run, params)
        tracking.log_metrics(uri, run, {METRIC: score, "steps_run": steps}, steps)
        tracking.end_run(uri, run)
    if not trials:
        raise RuntimeError("no Tune trial reported a validation score; see the Ray logs")
    return trials
