"""`rankformer finetune genes`: given genes known to have a feature and genes known not to, which
other genes have it?

Cross-validation splits the labelled *genes* (stratified K folds): a fold's classifier is trained on
the cells holding its training genes, with only those genes' tokens labelled, and scored on genes it
never saw a label for (the mean class probability over each test gene's occurrences). Beside it, in
the same folds, a logistic regression on the pretrained model's frozen gene embeddings. Then a final
model on all labelled genes predicts every vocabulary gene seen in the selected cells: the ranked
table that answers the question.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch

from rankformer import tracking
from rankformer.classify.common import check_placement, saved_form
from rankformer.classify.controls import rank_statistics, verdict
from rankformer.classify.gene_job import BASELINE_PREFIX, FROZEN, JOB, RANKS, GeneJob, logreg
from rankformer.classify.labels import GeneLabels, describe
from rankformer.config.train import FinetuneGenesConfig
from rankformer.job.output import JobOutput, in_parent_run
from rankformer.model.forward import GeneSums, token_probs
from rankformer.model.store import CLASSIFIER_TASKS
from rankformer.train import metrics


def run_finetune_genes(cfg: FinetuneGenesConfig) -> dict[str, Any]:
    check_placement(cfg)
    job = GeneJob(cfg)
    out = job.output
    labels = job.labels
    print(f"gene classification: {describe(labels)} in {len(job.cells):,} cells")
    return in_parent_run(JOB, cfg, job.uri, job.vocab.content_hash, lambda parent: _run(job, out, parent))


def _run(job: GeneJob, out: JobOutput, parent: str) -> dict[str, Any]:
    cfg, labels, classes = job.cfg, job.labels, job.classes
    tuned = job.tune(parent)
    frozen, sums = None, None
    ranks = rank_statistics(job.cells.ids, job.vocab.n_tokens, job.gene_lo)
    baselines = {RANKS: ranks[labels.tokens]}
    if cfg.frozen_baseline:
        sums, _ = job.frozen_states(job.cells.ids)
        frozen = sums.means(labels.tokens)
        baselines[FROZEN] = frozen
    cv = job.cross_validate(labels, parent, "cv", baselines)
    controls = []
    for s in range(cfg.shuffled_controls):
        rng = np.random.default_rng([cfg.seed, 1009, s])
        shuffled = GeneLabels(classes, labels.tokens, rng.permutation(labels.label), labels.gene_ids)
        controls.append(job.cross_validate(shuffled, parent, f"shuffle-{s}", {})["roc_auc_mean"])
    final_run = tracking.start_run(
        job.uri, cfg.track.experiment, "final", {"job": JOB, "mlflow.parentRunId": parent}
    )
    final = job.train(labels.tokens, labels.label, final_run, "final")
    tracking.end_run(job.uri, final_run)
    table = prediction_table(job, final)
    gene_tokens = job.vocab.map_gene_ids(list(table["gene_id"])).astype(np.int64)
    if sums is not None and frozen is not None:
        # the frozen-embedding baseline's answer beside the fine-tuned one, for every gene
        fp = logreg(frozen, labels.label, sums.means(gene_tokens), len(classes), cfg.seed)
        for i, c in enumerate(classes):
            table[f"frozen_prob_{c}"] = fp[:, i]
    rp = logreg(ranks[labels.tokens], labels.label, ranks[gene_tokens], len(classes), cfg.seed)
    for i, c in enumerate(classes):  # what rank statistics alone answer, for every gene
        table[f"rank_baseline_prob_{c}"] = rp[:, i]
    report = _report(job, cv, controls)
    if tuned:
        report["tune"] = tuned
    out.write_table("gene_predictions", table)
    out.write_json("cv_metrics.json", report)
    out.write_json("folds.json", {"fold_of_gene": cv["fold_of_gene"], "classes": classes})
    _plots(job, cv, out)
    version = _save_model(job, final, out, parent, report)
    tracking.log_metrics(job.uri, parent, _flat_metrics(report), 0)
    tracking.set_tag(job.uri, parent, "verdict", report["verdict"])
    out.log_to(job.uri, parent)
    out.finish(
        {"cv": {k: v for k, v in report.items() if k.endswith(("_mean", "_sd"))}, "model_version": version}
    )
    _print_summary(job, report, table)
    return {"out": cfg.out, "run_id": parent, "model_version": version, **report}


def _print_summary(job: GeneJob, report: dict[str, Any], table: pd.DataFrame) -> None:
    """The cross-validated scores beside the baselines and controls, the verdict, then the top
    unseen genes of each model."""
    pos = f"prob_{job.classes[job.positive]}"
    rows = [("fine-tuned model", report["roc_auc_mean"], report["roc_auc_sd"])]
    if FROZEN in report:
        rows.append(("frozen-embedding probe", report[FROZEN]["roc_auc_mean"], report[FROZEN]["roc_auc_sd"]))
    rows.append(("rank statistics alone", report[RANKS]["roc_auc_mean"], report[RANKS]["roc_auc_sd"]))
    if "shuffled_control_roc_auc_mean" in report:
        rows.append(("shuffled labels", report["shuffled_control_roc_auc_mean"], float("nan")))
    print(f"cross-validated by gene ({job.cfg.folds} folds), ROC AUC of each in the same folds:")
    for name, mean, sd in rows:
        print(f"  {name:<24} {mean:.3f}" + (f" ± {sd:.3f}" if sd == sd else ""))
    print(report["verdict"])
    unseen = table[~table["in_training"] & (table["n_occurrences"] >= 10)]
    for col, who in (
        (pos, "fine-tuned"),
        (f"frozen_{pos}", "frozen-embedding baseline"),
        (f"rank_baseline_{pos}", "rank statistics alone"),
    ):
        if col not in table:
            continue
        print(f"top unseen genes (10+ occurrences) by {col} ({who}):")
        for _, r in unseen.sort_values(col, ascending=False, kind="stable").head(8).iterrows():
            print(
                f"  {r['gene_id']}  {r['symbol'] or '-':<12} {r[col]:.3f}  "
                f"({int(r['n_occurrences'])} occurrences)"
            )
    print(f"-> {job.cfg.out}")


def prediction_table(job: GeneJob, model: torch.nn.Module) -> pd.DataFrame:
    sums = token_probs(model, job.cells.ids, job.pad, job.gene_lo, job.cfg.batch.max_tokens)
    return gene_table(sums, job.gene_lo, job.vocab, job.classes, set(job.labels.gene_ids), job.positive)


def gene_table(
    sums: GeneSums, gene_lo: int, vocab: Any, classes: list[str], training: set[str], positive: int
) -> pd.DataFrame:
    """Every vocabulary gene with occurrences in ``sums``: mean class probabilities, occurrences,
    whether it was a training gene; ranked by the positive class."""
    seen = sums.seen()
    seen = seen[seen >= gene_lo]
    prob = sums.means(seen)
    ids = vocab.gene_id_by_token[seen].tolist()
    df = pd.DataFrame(
        {
            "gene_id": ids,
            "symbol": [vocab.gene_names.get(g, "") for g in ids],
            "in_training": [g in training for g in ids],
            "n_occurrences": sums.counts[seen].numpy().astype(np.int64),
            "predicted": [classes[i] for i in prob.argmax(1)],
        }
    )
    for i, c in enumerate(classes):
        df[f"prob_{c}"] = prob[:, i]
    return df.sort_values(f"prob_{classes[positive]}", ascending=False, kind="stable").reset_index(drop=True)


def _report(job: GeneJob, cv: dict[str, Any], controls: list[float]) -> dict[str, Any]:
    cfg = job.cfg
    report = {k: v for k, v in cv.items() if k not in ("curves", "frozen_curves", "fold_of_gene")}
    report.update(
        {
            "classes": job.classes,
            "positive_class": job.classes[job.positive],
            "n_folds": cfg.folds,
            "labelled_genes": job.labels.counts(),
            "labelled_not_in_vocab": job.labels.unmapped,
            "labelled_not_in_cells": job.not_in_corpus,
            "cells": len(job.cells),
            "split": "stratified K-fold by gene (no gene in both parts of a fold)",
            "score": "per gene: mean class probability over its occurrences in the selected cells",
        }
    )
    if controls:
        report["shuffled_control_roc_auc"] = controls
        report["shuffled_control_roc_auc_mean"] = float(np.mean(controls))
    against = {"rank statistics alone": report[RANKS]["roc_auc_mean"]}
    if controls:
        against["shuffled labels"] = report["shuffled_control_roc_auc_mean"]
    report["beats_controls"], report["verdict"] = verdict(
        "the fine-tuned model", report["roc_auc_mean"], against, "cross-validated ROC AUC"
    )
    return report


def _plots(job: GeneJob, cv: dict[str, Any], out: JobOutput) -> None:
    pos = job.classes[job.positive]
    metrics.plot_roc(cv["curves"], pos, out.path("roc_curves.png"))
    out.publish("roc_curves.png")
    metrics.plot_confusion(
        cv["confusion"], job.classes, "fine-tuned, summed over folds", out.path("confusion.png")
    )
    out.publish("confusion.png")
    if "frozen_curves" in cv:
        metrics.plot_roc(cv["frozen_curves"], f"{pos} (frozen embeddings)", out.path("roc_curves_frozen.png"))
        out.publish("roc_curves_frozen.png")


def _save_model(
    job: GeneJob, model: torch.nn.Module, out: JobOutput, parent: str, report: dict[str, Any]
) -> str | None:
    cfg = job.cfg
    by_class = {
        c: [g for g, y in zip(job.labels.gene_ids, job.labels.label, strict=True) if y == i]
        for i, c in enumerate(job.classes)
    }
    meta = {
        "task": CLASSIFIER_TASKS["genes"],
        "layout": job.pre.layout,
        "max_length": job.pre.meta.get("max_length"),
        "classes": job.classes,
        "positive_class": job.classes[job.positive],
        "head_class": cfg.head.head_class or "BertForTokenClassification",
        "base_model": cfg.model,
        "labelled_genes": by_class,
        "training": {"mlflow_run_id": parent, "cv_roc_auc_mean": report["roc_auc_mean"]},
    }
    model, extra = saved_form(model, cfg, job.uri, job.vocab.content_hash)
    return out.save_model(model, job.vocab, {**meta, **extra}, job.uri, parent, cfg.track)


def _flat_metrics(report: dict[str, Any]) -> dict[str, float]:
    out = {
        f"cv_{k}": float(v)
        for k, v in report.items()
        if k.endswith(("_mean", "_sd")) and isinstance(v, float)
    }
    for name, prefix in BASELINE_PREFIX.items():
        for k, v in report.get(name, {}).items():
            if k.endswith(("_mean", "_sd")):
                out[f"{prefix}_{k}"] = float(v)
    out["beats_controls"] = float(report["beats_controls"])
    return {k: v for k, v in out.items() if v == v}
