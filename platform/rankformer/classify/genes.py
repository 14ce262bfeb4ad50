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
from rankformer.classify.common import PretrainedOnCorpus, check_placement
from rankformer.classify.controls import rank_statistics, verdict
from rankformer.classify.data import cells_with_tokens
from rankformer.classify.labels import GeneLabels, check_enough, describe, vocabulary_labels
from rankformer.classify.tune import GeneScorer, apply, search
from rankformer.config.train import FinetuneGenesConfig
from rankformer.errors import InputError
from rankformer.job.cells import Cells, load_cells, parse_where
from rankformer.job.output import JobOutput, in_parent_run
from rankformer.model.forward import GeneSums, token_probs
from rankformer.model.store import CLASSIFIER_TASKS, ModelInfo
from rankformer.train import metrics
from rankformer.train.finetune import IGNORE, TrainSpec, job_spec, scratch_dir, train_classifier

JOB = "finetune-genes"
FROZEN, RANKS = "frozen_embeddings", "rank_statistics"  # the baselines scored in the same folds
BASELINE_PREFIX = {FROZEN: "frozen", RANKS: "rank_baseline"}  # their metrics' prefix in MLflow


def gene_folds(labels: GeneLabels, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified K-fold over genes: (train, test) index arrays into ``labels``; disjoint by gene."""
    from sklearn.model_selection import StratifiedKFold

    skf = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(tr, te) for tr, te in skf.split(np.zeros(len(labels.tokens)), labels.label)]


class GeneJob(PretrainedOnCorpus):
    """One gene-classification job: the state its folds share."""

    def __init__(self, cfg: FinetuneGenesConfig) -> None:
        self.cfg = cfg
        super().__init__(cfg)
        manifest = self.manifest
        labels = self.vocabulary_labels
        self.cells: Cells = load_cells(
            cfg.corpus,
            parse_where(cfg.cells_where),
            vocab_hash=manifest["vocab_hash"],
            max_cells=cfg.limit_cells,
            seed=cfg.seed,
        )
        counts = np.bincount(np.concatenate(self.cells.ids), minlength=self.vocab.n_tokens)
        self.occurrences = counts
        in_corpus = counts[labels.tokens] > 0
        self.not_in_corpus = [g for g, ok in zip(labels.gene_ids, in_corpus, strict=True) if not ok]
        self.labels = labels.subset(in_corpus)
        check_enough(self.labels, cfg.folds, "in the selected cells")
        self.classes = self.labels.classes
        self.positive = self.classes.index(cfg.positive_class) if cfg.positive_class else 0
        if cfg.positive_class and cfg.positive_class not in self.classes:
            raise InputError(
                f"positive_class {cfg.positive_class!r} is not one of the classes {self.classes}"
            )
        self.output = JobOutput(cfg.out, JOB, cfg)
        self.work = scratch_dir(cfg.out)
        self.lengths = np.asarray([len(c) for c in self.cells.ids])
        self.tuned: dict[str, Any] | None = None  # the best Tune trial's settings, once searched

    def before_load(self, info: ModelInfo) -> None:
        """The labels, read and mapped onto the model's vocabulary before its weights load."""
        self.vocabulary_labels = vocabulary_labels(self.cfg, info.vocab)

    # --- one training ------------------------------------------------------------------------
    def spec(
        self, lengths: Any, lookup: np.ndarray, class_counts: list[int], run_id: str | None
    ) -> TrainSpec:
        spec = job_spec(
            self.cfg,
            self.uri,
            "token",
            len(self.classes),
            (self.pad, self.gene_lo),
            lengths,
            class_counts,
            run_id,
        )
        spec.lookup = lookup.tolist()
        return spec

    def training_set(
        self, tokens: np.ndarray, label: np.ndarray, run_id: str | None
    ) -> tuple[TrainSpec, list[np.ndarray]]:
        """The spec and cells to train on ``tokens``: the cells holding them, only they labelled."""
        lookup = np.full(self.vocab.n_tokens, IGNORE, dtype=np.int64)
        lookup[tokens] = label
        rows = cells_with_tokens(self.cells.ids, tokens)
        ids = [self.cells.ids[i] for i in rows]
        occ = lookup[np.concatenate(ids)]  # classes weigh by labelled occurrences
        counts = np.bincount(occ[occ != IGNORE], minlength=len(self.classes)).tolist()
        spec = self.spec(self.lengths[rows], lookup, counts, run_id)
        return (apply(spec, self.tuned) if self.tuned else spec), ids

    def train(self, tokens: np.ndarray, label: np.ndarray, run_id: str | None, name: str) -> torch.nn.Module:
        spec, ids = self.training_set(tokens, label, run_id)
        return train_classifier(
            spec, ids, np.zeros(len(ids), dtype=np.int64), self.cfg.scale, self.work, name
        )

    def tune(self, parent: str) -> dict[str, Any] | None:
        """Ray Tune over fold 0's training genes, a quarter of them held out for validation."""
        from sklearn.model_selection import StratifiedShuffleSplit

        cfg = self.cfg
        if cfg.tune.trials == 0:
            return None
        tr, _ = gene_folds(self.labels, cfg.folds, cfg.seed)[0]
        split = StratifiedShuffleSplit(n_splits=1, test_size=0.25, random_state=cfg.seed)
        itr, iva = next(split.split(tr, self.labels.label[tr]))
        tok, lab = self.labels.tokens[tr], self.labels.label[tr]
        spec, ids = self.training_set(tok[itr], lab[itr], None)
        scorer = GeneScorer(self.cells.ids, tok[iva], lab[iva], self.pad, self.gene_lo, cfg.batch.max_tokens)
        layers = int(self.pre.model.config.num_hidden_layers)
        found = search(
            spec,
            ids,
            np.zeros(len(ids), dtype=np.int64),
            scorer,
            cfg.tune,
            layers,
            cfg.scale.use_gpu,
            self.work,
            (self.uri, cfg.track.experiment, parent),
            cfg.scale.ray_address,
        )
        self.tuned = found["best"]["params"]
        print(
            f"Ray Tune: best of {len(found['trials'])} trials {self.tuned} "
            f"(validation ROC AUC {found['best']['val_score']:.3f})"
        )
        return found

    def predict(self, model: torch.nn.Module, tokens: np.ndarray) -> np.ndarray:
        """Mean class probabilities of ``tokens`` over their occurrences in the cells holding them."""
        rows = cells_with_tokens(self.cells.ids, tokens)
        sums = token_probs(
            model, [self.cells.ids[i] for i in rows], self.pad, self.gene_lo, self.cfg.batch.max_tokens
        )
        return sums.means(tokens)

    # --- cross-validation --------------------------------------------------------------------
    def cross_validate(
        self, labels: GeneLabels, parent: str, tag: str, baselines: dict[str, np.ndarray]
    ) -> dict[str, Any]:
        """The fine-tuned model's scores by fold, and beside them, in the same folds, a logistic
        regression on each of ``baselines`` (features per labelled gene: frozen embeddings, rank
        statistics)."""
        cfg = self.cfg
        folds = gene_folds(labels, cfg.folds, cfg.seed)
        per_fold, curves, assignment = [], [], {}
        base_folds: dict[str, list[dict[str, Any]]] = {name: [] for name in baselines}
        frozen_curves = []
        for k, (tr, te) in enumerate(folds):
            assert not set(labels.tokens[tr].tolist()) & set(labels.tokens[te].tolist())
            run = tracking.start_run(
                self.uri,
                cfg.track.experiment,
                f"{tag}-fold-{k}",
                {"job": JOB, "mlflow.parentRunId": parent, "fold": str(k)},
            )
            model = self.train(labels.tokens[tr], labels.label[tr], run, f"{tag}-fold-{k}")
            prob = self.predict(model, labels.tokens[te])
            s = metrics.scores(labels.label[te], prob, self.classes)
            s["test_genes"] = [labels.gene_ids[i] for i in te]
            per_fold.append(s)
            curves.append((f"fold {k}", labels.label[te] == self.positive, prob[:, self.positive]))
            for i in te:
                assignment[labels.gene_ids[i]] = k
            logged = {f"test_{m}": s[m] for m in ("roc_auc", "macro_f1", "accuracy")}
            for name, x in baselines.items():
                bp = logreg(x[tr], labels.label[tr], x[te], len(self.classes), cfg.seed)
                bs = metrics.scores(labels.label[te], bp, self.classes)
                base_folds[name].append(bs)
                if name == FROZEN:
                    frozen_curves.append(
                        (f"fold {k}", labels.label[te] == self.positive, bp[:, self.positive])
                    )
                logged.update(
                    {f"{BASELINE_PREFIX[name]}_{m}": bs[m] for m in ("roc_auc", "macro_f1", "accuracy")}
                )
            tracking.log_metrics(self.uri, run, {k2: float(v) for k2, v in logged.items() if v == v}, 0)
            tracking.end_run(self.uri, run)
        out: dict[str, Any] = {"folds": per_fold, **metrics.summarize(per_fold), "fold_of_gene": assignment}
        out["curves"] = curves
        for name, fold_scores in base_folds.items():
            out[name] = {"folds": fold_scores, **metrics.summarize(fold_scores)}
        if frozen_curves:
            out["frozen_curves"] = frozen_curves
        return out


def logreg(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, n_classes: int, seed: int
) -> np.ndarray:
    """Class probabilities from a standardised, L2-regularised logistic regression (all classes
    as columns, even one absent from training)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    clf.fit(x_train, y_train)
    prob = np.zeros((len(x_test), n_classes))
    prob[:, clf.classes_] = clf.predict_proba(x_test)
    return prob


def run_finetune_genes(cfg: FinetuneGenesConfig) -> dict[str, Any]:
    check_placement(cfg)
    job = GeneJob(cfg)
    out = job.output
    labels = job.labels
    print(
        f"gene classification: {describe(labels)} in {len(job.cells):,} cells"
        + (f"; {len(job.not_in_corpus)} labelled genes not in these cells" if job.not_in_corpus else "")
    )
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
    return out.save_model(model, job.vocab, meta, job.uri, parent, cfg.track)


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
