"""`rankformer finetune cells --tasks COL1 COL2 ...`: multi-task cell classification.

One shared encoder, one head per task (cell type, disease, donor condition...), trained jointly
on the carried label columns (:class:`rankformer.model.heads.MultiTaskForSequenceClassification`).
A cell missing one task's label still trains the others: its loss for that task is masked, never
filled with a guess; ``--task-weights`` weigh the tasks' losses. The cells are split into train /
validation / test as single-task classification splits them (by ``--group-column`` when given;
stratified by the first task), the checkpoint kept is the best by the tasks' mean validation macro
F1, and each task is scored on the test cells labelled for it, beside its own frozen-embedding
probe, log-normalised-counts baseline, majority class and (``--shuffled-controls``) shuffled
labels. One MLflow run holds every task's metrics under ``TASK/``; the model is saved with its
heads (``out/model``, what `predict cells` and ``load_classifier`` use) and without them
(``out/encoder``: the fine-tuned encoder as a masked-LM model folder, to fine-tune again, embed or
perturb).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np
import pandas as pd
import torch

from rankformer import schema, tracking
from rankformer.classify.cell_job import SPLITS, CellsOnCorpus, split_cells
from rankformer.classify.common import check_placement, saved_form
from rankformer.classify.controls import counts_baseline, majority_class, verdict
from rankformer.classify.gene_job import logreg
from rankformer.config.train import FinetuneCellsConfig
from rankformer.errors import InputError
from rankformer.job.cells import Cells
from rankformer.job.output import JobOutput, in_parent_run
from rankformer.model.store import CLASSIFIER_TASKS
from rankformer.train import metrics
from rankformer.train.finetune import (
    TrainSpec,
    cell_probs,
    job_spec,
    scratch_dir,
    train_classifier,
)
from rankformer.words import listed

JOB = "finetune-cells"
HEAD = "rankformer.model.heads:MultiTaskForSequenceClassification"


def task_labels(raw: np.ndarray, rename: dict[str, str], column: str) -> tuple[np.ndarray, list[str]]:
    """(class index per cell, -1 where the cell has no label; the task's classes)."""
    names = [rename.get(str(v), str(v)) if v is not None and str(v) not in ("", "nan") else "" for v in raw]
    classes = sorted({n for n in names if n})
    if len(classes) < 2:
        raise InputError(
            f"task {column!r}: a task needs two or more classes; its column holds {classes or 'no label'}. "
            "Leave it out of --tasks"
        )
    index = {c: i for i, c in enumerate(classes)}
    return np.asarray([index.get(n, -1) for n in names], dtype=np.int64), classes


class MultiTaskJob(CellsOnCorpus):
    """The labelled cells (a label per task, -1 where missing), their split and the model."""

    def __init__(self, cfg: FinetuneCellsConfig) -> None:
        super().__init__(cfg)
        cells = self.selected
        self.tasks = list(cfg.tasks)
        labelled = [task_labels(cells.column(t), cfg.rename, t) for t in self.tasks]
        y = np.stack([lab for lab, _ in labelled], axis=1)
        self.classes = [c for _, c in labelled]
        keep = np.flatnonzero((y >= 0).any(axis=1))
        self.dropped = int(len(y) - len(keep))
        self.cells: Cells = cells.take(keep)
        self.y = y[keep]
        groups = self.cells.column(cfg.group_column).astype(str) if cfg.group_column else None
        first = self.y[:, 0].copy()
        first[first < 0] = len(self.classes[0])  # cells without the first label: a stratum of their own
        self.split = split_cells(
            first, groups, cfg.test_fraction, cfg.validation_fraction, cfg.seed, cfg.group_column
        )
        self.check_splits()
        for t, task in enumerate(self.tasks):
            if not (self.y[self.split == "train", t] >= 0).any():
                raise InputError(f"task {task!r}: no training cell holds its label; check the column")
        self.output = JobOutput(cfg.out, JOB, cfg)
        self.work = scratch_dir(cfg.out)

    @property
    def sizes(self) -> list[int]:
        return [len(c) for c in self.classes]

    def spec(self, run_id: str | None, y: np.ndarray | None = None) -> TrainSpec:
        cfg = self.cfg
        y = self.y if y is None else y
        tr, va = self.rows("train"), self.rows("validation")
        lengths = [len(self.cells.ids[i]) for i in tr]
        spec = job_spec(
            cfg, self.uri, "multitask", sum(self.sizes), (self.pad, self.gene_lo), lengths, [], run_id
        )
        self.checkpoint_each_epoch(spec, lengths)
        return dataclasses.replace(
            spec,
            head=dataclasses.replace(spec.head, head_class=spec.head.head_class or HEAD),
            weights=None,
            task_names=self.tasks,
            task_sizes=self.sizes,
            task_weights=list(cfg.task_weights) or None,
            val_ids=[self.cells.ids[i].tolist() for i in va] or None,
            val_y=y[va].tolist() or None,
        )

    def task_prob(self, prob: np.ndarray, t: int) -> np.ndarray:
        bounds = np.cumsum([0, *self.sizes])
        return prob[:, bounds[t] : bounds[t + 1]]


def run_multitask(cfg: FinetuneCellsConfig) -> dict[str, Any]:
    check_placement(cfg)
    job = MultiTaskJob(cfg)
    sizes = {p: int((job.split == p).sum()) for p in SPLITS}
    labelled = {t: int((job.y[:, i] >= 0).sum()) for i, t in enumerate(job.tasks)}
    print(
        f"multi-task cell classification: {len(job.cells):,} cells, tasks "
        + "; ".join(
            f"{t} ({len(c)} classes, {labelled[t]:,} labelled)"
            for t, c in zip(job.tasks, job.classes, strict=True)
        )
        + f"; split {sizes}"
        + (f" by {cfg.group_column}" if cfg.group_column else "")
    )
    return in_parent_run(JOB, cfg, job.uri, job.vocab.content_hash, lambda parent: _run(job, parent, sizes))


def _train(
    job: MultiTaskJob, parent: str | None, y: np.ndarray | None = None, name: str = "train"
) -> torch.nn.Module:
    run = None
    if parent is not None:
        run = tracking.start_run(
            job.uri, job.cfg.track.experiment, name, {"job": JOB, "mlflow.parentRunId": parent}
        )
    rows = job.rows("train")
    labels = job.y if y is None else y
    model = train_classifier(
        job.spec(run, y), [job.cells.ids[i] for i in rows], labels[rows], job.cfg.scale, job.work, name
    )
    if run is not None:
        tracking.end_run(job.uri, run)
    return model


def _run(job: MultiTaskJob, parent: str, sizes: dict[str, int]) -> dict[str, Any]:
    cfg = job.cfg
    model = _train(job, parent)
    prob = cell_probs(model, job.cells.ids, job.pad, cfg.batch.max_tokens)
    report = _report(job, prob, sizes)
    _write(job, prob, report)
    version = _save(job, model, parent, report)
    tracking.log_metrics(job.uri, parent, _flat(report), 0)
    job.output.log_to(job.uri, parent)
    f1 = {t: report["tasks"][t]["test_macro_f1"] for t in job.tasks}
    job.output.finish({"test_macro_f1": f1, "model_version": version})
    tracking.set_tag(job.uri, parent, "verdict", " | ".join(report["tasks"][t]["verdict"] for t in job.tasks))
    _print_summary(job, report)
    print(f"-> {cfg.out}")
    return {"out": cfg.out, "run_id": parent, "model_version": version, **report}


def _report(job: MultiTaskJob, prob: np.ndarray, sizes: dict[str, int]) -> dict[str, Any]:
    """Per task: validation and test scores on the cells labelled for it, beside its controls."""
    cfg = job.cfg
    report: dict[str, Any] = {"split_sizes": sizes, "dropped_unlabelled": job.dropped, "tasks": {}}
    emb = job.frozen_states(job.cells.ids)[1] if cfg.frozen_baseline else None
    shuffled = _shuffled(job)
    for t, task in enumerate(job.tasks):
        classes, y, p = job.classes[t], job.y[:, t], job.task_prob(prob, t)
        has = y >= 0
        entry: dict[str, Any] = {"classes": classes, "labelled": int(has.sum())}
        for part, key in (("validation", "val"), ("test", "test")):
            rows = np.flatnonzero(has & (job.split == part))
            if len(rows):
                entry.update({f"{key}_{k}": v for k, v in metrics.scores(y[rows], p[rows], classes).items()})
        te = np.flatnonzero(has & (job.split == "test"))
        tr = np.flatnonzero(has & (job.split == "train"))
        controls: dict[str, float] = {}
        if emb is not None:
            frozen = logreg(emb[tr], y[tr], emb, len(classes), cfg.seed)
            entry["frozen_embeddings"] = {
                f"test_{k}": v for k, v in metrics.scores(y[te], frozen[te], classes).items()
            }
        entry.update(_task_controls(job, t, has, te))
        for name, key in (
            ("log-normalised counts", "lognorm_counts"),
            ("the majority class", "majority_class"),
        ):
            if key in entry:
                controls[name] = entry[key]["test_macro_f1"]
        if shuffled:
            entry["shuffled_control_macro_f1"] = [s[t] for s in shuffled]
            controls["shuffled labels"] = float(np.mean(entry["shuffled_control_macro_f1"]))
        entry["beats_controls"], entry["verdict"] = verdict(
            f"task {task}", entry.get("test_macro_f1", float("nan")), controls, "test macro F1"
        )
        report["tasks"][task] = entry
    report["beats_controls"] = all(report["tasks"][t]["beats_controls"] for t in job.tasks)
    return report


def _task_controls(job: MultiTaskJob, t: int, has: np.ndarray, te: np.ndarray) -> dict[str, Any]:
    """A task's log-normalised-counts baseline (when the source files can be read) and majority
    class, on the cells labelled for it."""
    classes, y = job.classes[t], job.y[:, t]
    sub = np.flatnonzero(has)
    out: dict[str, Any] = {}

    def test_scores(prob_sub: np.ndarray) -> dict[str, Any]:
        full = np.zeros((len(y), len(classes)))
        full[sub] = prob_sub
        return {f"test_{k}": v for k, v in metrics.scores(y[te], full[te], classes).items()}

    names = job.cells.table.column_names
    if schema.SOURCE_FILE in names and schema.SOURCE_ROW in names:
        try:
            files = job.cells.column(schema.SOURCE_FILE)[sub].tolist()
            rows = job.cells.column(schema.SOURCE_ROW)[sub].astype(np.int64).tolist()
            out["lognorm_counts"] = test_scores(
                counts_baseline(files, rows, job.cells.manifest, y[sub], job.split[sub], job.cfg.seed)
            )
        except (InputError, OSError) as exc:
            out["lognorm_counts_unavailable"] = str(exc)
    out["majority_class"] = test_scores(majority_class(y[sub], job.split[sub], len(classes)))
    return out


def _shuffled(job: MultiTaskJob) -> list[list[float]]:
    """Each shuffled-label control's test macro F1 per task: every task's labels permuted among
    its labelled cells within train and within validation."""
    cfg, te = job.cfg, job.rows("test")
    out = []
    for s in range(cfg.shuffled_controls):
        rng = np.random.default_rng([cfg.seed, 1009, s])
        y = job.y.copy()
        for t in range(len(job.tasks)):
            for part in ("train", "validation"):
                rows = np.flatnonzero((job.split == part) & (y[:, t] >= 0))
                y[rows, t] = rng.permutation(y[rows, t])
        model = _train(job, None, y=y, name=f"shuffle-{s}")
        prob = cell_probs(model, job.cells.ids, job.pad, cfg.batch.max_tokens)
        f1 = []
        for t in range(len(job.tasks)):
            rows = te[job.y[te, t] >= 0]
            f1.append(
                float(
                    metrics.scores(job.y[rows, t], job.task_prob(prob, t)[rows], job.classes[t])["macro_f1"]
                )
            )
        out.append(f1)
    return out


def _write(job: MultiTaskJob, prob: np.ndarray, report: dict[str, Any]) -> None:
    """cell_predictions (per task: label, predicted, prob_<class>), metrics.json, confusion plots."""
    out = job.output
    table = pd.DataFrame({schema.CELL_ID: job.cells.column(schema.CELL_ID), "split": job.split})
    for t, task in enumerate(job.tasks):
        classes, y, p = job.classes[t], job.y[:, t], job.task_prob(prob, t)
        table[f"{task}_label"] = [classes[i] if i >= 0 else None for i in y]
        table[f"{task}_predicted"] = [classes[i] for i in p.argmax(1)]
        for i, c in enumerate(classes):
            table[f"{task}_prob_{c}"] = p[:, i]
    out.write_table("cell_predictions", table)
    out.write_json("metrics.json", report)
    for task in job.tasks:
        entry = report["tasks"][task]
        if "test_confusion" in entry:
            name = f"confusion_{task}.png"
            metrics.plot_confusion(
                entry["test_confusion"], entry["classes"], f"{task}, test split", out.path(name)
            )
            out.publish(name)


def _save(job: MultiTaskJob, model: torch.nn.Module, parent: str, report: dict[str, Any]) -> str | None:
    """The classifier with its heads (``model/``, registered when asked) and the fine-tuned
    encoder without them (``encoder/``, a masked-LM model folder: the pretrained model's own
    masked-gene head on the fine-tuned encoder)."""
    from rankformer.model.store import save_model_dir

    cfg = job.cfg
    tasks = [{"name": t, "classes": c} for t, c in zip(job.tasks, job.classes, strict=True)]
    common = {"layout": job.pre.layout, "max_length": job.pre.meta.get("max_length"), "base_model": cfg.model}
    meta = {
        **common,
        "task": CLASSIFIER_TASKS["cells"],
        "tasks": tasks,
        "classes": [f"{t['name']}:{c}" for t in tasks for c in t["classes"]],
        "label_column": None,
        "head_class": HEAD,
        "training": {
            "mlflow_run_id": parent,
            "test_macro_f1": {t: report["tasks"][t].get("test_macro_f1") for t in job.tasks},
        },
    }
    from rankformer.train.adapters import merged

    encoder: Any = merged(copy.deepcopy(model)).bert  # adapters folded in, when there are any
    saved, extra = saved_form(model, cfg, job.uri, job.vocab.content_hash)
    version = job.output.save_model(saved, job.vocab, {**meta, **extra}, job.uri, parent, cfg.track)
    mlm = copy.deepcopy(job.pre.model).cpu()
    missing, _ = mlm.bert.load_state_dict(encoder.state_dict(), strict=False)  # type: ignore[union-attr]
    if missing:
        raise RuntimeError(f"encoder weights missing from the fine-tuned model: {missing[:5]}")
    from rankformer.io import fs

    encoder_meta = {**common, "task": "masked-lm", "finetuned_for": job.tasks}
    save_model_dir(mlm, job.vocab, encoder_meta, fs.join(cfg.out, "encoder"))  # whole, by one rename
    return version


def _flat(report: dict[str, Any]) -> dict[str, float]:
    """Every task's scores as ``TASK/metric`` (MLflow groups them by task)."""
    out: dict[str, float] = {}
    for task, entry in report["tasks"].items():
        for k, v in entry.items():
            if isinstance(v, float) and v == v:
                out[f"{task}/{k}"] = v
            elif isinstance(v, dict):
                for k2, v2 in v.items():
                    if isinstance(v2, float) and v2 == v2:
                        out[f"{task}/{k}_{k2}"] = v2
        if entry.get("shuffled_control_macro_f1"):
            out[f"{task}/shuffled_control_macro_f1_mean"] = float(np.mean(entry["shuffled_control_macro_f1"]))
        out[f"{task}/beats_controls"] = float(entry["beats_controls"])
    return out


def _print_summary(job: MultiTaskJob, report: dict[str, Any]) -> None:
    for task in job.tasks:
        e = report["tasks"][task]
        rows = [("fine-tuned model", e.get("test_macro_f1", float("nan")))]
        rows += [
            (name, e[key]["test_macro_f1"])
            for name, key in (
                ("frozen-embedding probe", "frozen_embeddings"),
                ("log-normalised counts", "lognorm_counts"),
                ("majority class", "majority_class"),
            )
            if key in e
        ]
        if e.get("shuffled_control_macro_f1"):
            rows.append(("shuffled labels", float(np.mean(e["shuffled_control_macro_f1"]))))
        print(
            f"task {task} ({listed(e['classes'], 6)}), test macro F1: "
            + ", ".join(f"{n} {s:.3f}" for n, s in rows)
        )
        print(f"  {e['verdict']}")
