"""`rankformer finetune cells`: a cell classifier (sequence classification) from a label column
carried in the corpus.

Classes can be renamed, merged and filtered; the cells are split into train / validation / test by
a group column (donor, sample, batch: no group in two splits, stratified where the groups allow)
or, without one, stratified at random. The fine-tuned model is scored on the test split each epoch
on validation (the best epoch is kept), next to a logistic regression on the pretrained model's
frozen mean-pooled cell embeddings, same split.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from rankformer import schema, tracking
from rankformer.classify.cell_job import JOB, SPLITS, CellJob
from rankformer.classify.common import check_placement, saved_form
from rankformer.classify.controls import counts_baseline, majority_class, verdict
from rankformer.classify.gene_job import logreg
from rankformer.config.train import FinetuneCellsConfig
from rankformer.errors import InputError
from rankformer.job.output import in_parent_run
from rankformer.model.store import CLASSIFIER_TASKS
from rankformer.train import metrics
from rankformer.train.finetune import (
    cell_probs,
    train_classifier,
)


def run_finetune_cells(cfg: FinetuneCellsConfig) -> dict[str, Any]:
    if cfg.tasks:  # several label columns: one encoder, a head each
        from rankformer.classify.multitask import run_multitask

        return run_multitask(cfg)
    check_placement(cfg)
    job = CellJob(cfg)
    sizes = {p: int((job.split == p).sum()) for p in SPLITS}
    how = f" by {cfg.group_column}" if cfg.group_column else " (stratified at random)"
    if cfg.group_column and cfg.validation_fraction > 0 and not sizes["validation"]:
        how += (
            " (too few groups for a validation split: two or more are kept to train on; no per-epoch scoring)"
        )
    print(
        f"cell classification: {len(job.cells):,} cells of {len(job.classes)} classes {job.classes}; "
        f"split {sizes}{how}"
    )
    return in_parent_run(JOB, cfg, job.uri, job.vocab.content_hash, lambda parent: _run(job, parent, sizes))


def _tune(job: CellJob, parent: str) -> dict[str, Any]:
    """Ray Tune scored on the validation split (or, without one, a fifth of the training cells)."""
    from sklearn.model_selection import StratifiedShuffleSplit

    from rankformer.classify.tune import CellScorer, search

    cfg = job.cfg
    tr, va = job.rows("train"), job.rows("validation")
    if len(va) == 0:
        split = StratifiedShuffleSplit(n_splits=1, test_size=0.2, random_state=cfg.seed)
        a, b = next(split.split(tr, job.y[tr]))
        tr, va = tr[a], tr[b]
    spec = job.spec(None)
    scorer = CellScorer([job.cells.ids[i] for i in va], job.y[va], job.pad, cfg.batch.max_tokens)
    found = search(
        spec,
        [job.cells.ids[i] for i in tr],
        job.y[tr],
        scorer,
        cfg.tune,
        int(job.pre.model.config.num_hidden_layers),
        cfg.scale.use_gpu,
        job.work,
        (job.uri, cfg.track.experiment, parent),
        cfg.scale.ray_address,
    )
    print(
        f"Ray Tune: best of {len(found['trials'])} trials {found['best']['params']} "
        f"(validation macro F1 {found['best']['val_score']:.3f})"
    )
    return found


def _run(job: CellJob, parent: str, sizes: dict[str, int]) -> dict[str, Any]:
    cfg = job.cfg
    tuned = _tune(job, parent) if cfg.tune.trials else None
    model = _train(job, parent, tuned)
    prob = cell_probs(model, job.cells.ids, job.pad, cfg.batch.max_tokens)
    report = _report(job, prob, sizes, tuned)
    _write_predictions(job, prob, report)
    version = _save(job, model, parent, report)
    tracking.log_metrics(job.uri, parent, _flat(report), 0)
    job.output.log_to(job.uri, parent)
    job.output.finish({"test_macro_f1": report["test_macro_f1"], "model_version": version})
    tracking.set_tag(job.uri, parent, "verdict", report["verdict"])
    _print_summary(report)
    print(f"-> {cfg.out}")
    return {"out": cfg.out, "run_id": parent, "model_version": version, **report}


def _train(
    job: CellJob,
    parent: str | None,
    tuned: dict[str, Any] | None,
    y: np.ndarray | None = None,
    name: str = "train",
) -> torch.nn.Module:
    """The classifier trained on the train split (with the search's best settings, if any; on labels
    ``y`` when given), as a child MLflow run of ``parent``."""
    from rankformer.classify.tune import apply

    cfg = job.cfg
    train_run = None
    if parent is not None:
        train_run = tracking.start_run(
            job.uri, cfg.track.experiment, name, {"job": JOB, "mlflow.parentRunId": parent}
        )
    spec = job.spec(train_run, y)
    if tuned:
        spec = apply(spec, tuned["best"]["params"])
    rows = job.rows("train")
    labels = job.y if y is None else y
    model = train_classifier(spec, [job.cells.ids[i] for i in rows], labels[rows], cfg.scale, job.work, name)
    if train_run is not None:
        tracking.end_run(job.uri, train_run)
    return model


def _report(
    job: CellJob, prob: np.ndarray, sizes: dict[str, int], tuned: dict[str, Any] | None
) -> dict[str, Any]:
    """Validation and test scores, and the frozen-embedding baseline's test scores."""
    classes = job.classes
    report: dict[str, Any] = {"classes": classes, "split_sizes": sizes, "dropped_unlabelled": job.dropped}
    if tuned:
        report["tune"] = tuned
    for part in ("validation", "test"):
        rows = job.rows(part)
        if len(rows):
            s = metrics.scores(job.y[rows], prob[rows], classes)
            report.update({f"{part[:4] if part == 'test' else 'val'}_{k}": v for k, v in s.items()})
    tr, te = job.rows("train"), job.rows("test")
    if job.cfg.frozen_baseline:
        _, emb = job.frozen_states(job.cells.ids)
        frozen_prob = logreg(emb[tr], job.y[tr], emb, len(classes), job.cfg.seed)
        fs_ = metrics.scores(job.y[te], frozen_prob[te], classes)
        report["frozen_embeddings"] = {f"test_{k}": v for k, v in fs_.items()}
    report.update(_controls(job))
    against = {name: report[key]["test_macro_f1"] for name, key in CONTROLS.items() if key in report}
    if report.get("shuffled_control_macro_f1"):
        against["shuffled labels"] = float(np.mean(report["shuffled_control_macro_f1"]))
    report["beats_controls"], report["verdict"] = verdict(
        "the fine-tuned model", report["test_macro_f1"], against, "test macro F1"
    )
    return report


# the controls a cell classifier is shown beside: name -> report key
CONTROLS = {"log-normalised counts": "lognorm_counts", "the majority class": "majority_class"}


def _controls(job: CellJob) -> dict[str, Any]:
    """Test scores of the log-normalised-counts baseline (from the cells' source files; when they
    cannot be read, the reason), of always answering the majority class, and of the classifier
    trained on shuffled labels (``--shuffled-controls``)."""
    cfg, classes, te = job.cfg, job.classes, job.rows("test")
    out: dict[str, Any] = {}

    def test_scores(prob: np.ndarray) -> dict[str, Any]:
        return {f"test_{k}": v for k, v in metrics.scores(job.y[te], prob[te], classes).items()}

    names = job.cells.table.column_names
    if schema.SOURCE_FILE in names and schema.SOURCE_ROW in names:
        try:
            files, rows = job.cells.column(schema.SOURCE_FILE), job.cells.column(schema.SOURCE_ROW)
            prob = counts_baseline(
                files.tolist(), rows.astype(np.int64).tolist(), job.cells.manifest, job.y, job.split, cfg.seed
            )
            out["lognorm_counts"] = test_scores(prob)
        except (InputError, OSError) as exc:  # the source files moved: said, not hidden
            out["lognorm_counts_unavailable"] = str(exc)
    out["majority_class"] = test_scores(majority_class(job.y, job.split, len(classes)))
    shuffled = []
    for s in range(cfg.shuffled_controls):
        rng = np.random.default_rng([cfg.seed, 1009, s])
        y = job.y.copy()
        for part in ("train", "validation"):  # the best epoch is chosen on shuffled labels too
            rows = job.rows(part)
            y[rows] = rng.permutation(y[rows])
        model = _train(job, None, None, y=y, name=f"shuffle-{s}")
        prob = cell_probs(model, job.cells.ids, job.pad, cfg.batch.max_tokens)
        shuffled.append(float(metrics.scores(job.y[te], prob[te], classes)["macro_f1"]))
    if shuffled:
        out["shuffled_control_macro_f1"] = shuffled
    return out


def _print_summary(report: dict[str, Any]) -> None:
    """The test scores beside the baselines and controls, then the verdict."""
    rows = [("fine-tuned model", report["test_macro_f1"], report["test_accuracy"])]
    for name, key in (
        ("frozen-embedding probe", "frozen_embeddings"),
        *((n, k) for n, k in CONTROLS.items()),
    ):
        if key in report:
            rows.append((name, report[key]["test_macro_f1"], report[key]["test_accuracy"]))
    print("test split, macro F1 and accuracy of each:")
    for name, f1, acc in rows:
        print(f"  {name:<24} {f1:.3f}  {acc:.3f}")
    if report.get("shuffled_control_macro_f1"):
        print(f"  {'shuffled labels':<24} {float(np.mean(report['shuffled_control_macro_f1'])):.3f}")
    if "lognorm_counts_unavailable" in report:
        print(f"  log-normalised counts: not computed ({report['lognorm_counts_unavailable']})")
    print(report["verdict"])


def _write_predictions(job: CellJob, prob: np.ndarray, report: dict[str, Any]) -> None:
    """cell_predictions, metrics.json and the test split's ROC curves and confusion matrix."""
    out, classes = job.output, job.classes
    table = pd.DataFrame(
        {
            schema.CELL_ID: job.cells.column(schema.CELL_ID)
            if schema.CELL_ID in job.cells.table.column_names
            else np.arange(len(job.y)).astype(str),
            "label": [classes[i] for i in job.y],
            "predicted": [classes[i] for i in prob.argmax(1)],
            "split": job.split,
        }
    )
    for i, c in enumerate(classes):
        table[f"prob_{c}"] = prob[:, i]
    out.write_table("cell_predictions", table)
    out.write_json("metrics.json", report)
    te = job.rows("test")
    curves = [(c, job.y[te] == i, prob[te, i]) for i, c in enumerate(classes)]
    metrics.plot_roc(
        curves if len(classes) > 2 else curves[1:], "test split, one vs rest", out.path("roc_curves.png")
    )
    out.publish("roc_curves.png")
    metrics.plot_confusion(report["test_confusion"], classes, "test split", out.path("confusion.png"))
    out.publish("confusion.png")


def _save(job: CellJob, model: torch.nn.Module, parent: str, report: dict[str, Any]) -> str | None:
    cfg = job.cfg
    meta = {
        "task": CLASSIFIER_TASKS["cells"],
        "layout": job.pre.layout,
        "max_length": job.pre.meta.get("max_length"),
        "classes": job.classes,
        "label_column": cfg.label_column,
        "head_class": cfg.head.head_class or "BertForSequenceClassification",
        "base_model": cfg.model,
        "training": {"mlflow_run_id": parent, "test_macro_f1": report["test_macro_f1"]},
    }
    model, extra = saved_form(model, cfg, job.uri, job.vocab.content_hash)
    return job.output.save_model(model, job.vocab, {**meta, **extra}, job.uri, parent, cfg.track)


def _flat(report: dict[str, Any]) -> dict[str, float]:
    out = {k: float(v) for k, v in report.items() if isinstance(v, float) and v == v}
    for key, prefix in (("frozen_embeddings", "frozen"), *((k, k) for k in CONTROLS.values())):
        for k, v in report.get(key, {}).items():
            if isinstance(v, float) and v == v:
                out[f"{prefix}_{k}"] = v
    if report.get("shuffled_control_macro_f1"):
        out["shuffled_control_macro_f1_mean"] = float(np.mean(report["shuffled_control_macro_f1"]))
    out["beats_controls"] = float(report["beats_controls"])
    return out
