"""One gene-classification job's state: the labelled genes, their cross-validation folds (disjoint
by gene), the cells they occur in, and the frozen-embedding and rank-statistics baselines."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from rankformer import tracking
from rankformer.classify.common import PretrainedOnCorpus
from rankformer.classify.data import cells_with_tokens
from rankformer.classify.labels import GeneLabels, check_enough, vocabulary_labels
from rankformer.classify.tune import GeneScorer, apply, search
from rankformer.config.train import FinetuneGenesConfig
from rankformer.errors import InputError
from rankformer.job.cells import Cells, load_cells, parse_where
from rankformer.job.output import JobOutput
from rankformer.model.forward import token_probs
from rankformer.model.store import ModelInfo
from rankformer.train import metrics
from rankformer.train.finetune import IGNORE, TrainSpec, job_spec, scratch_dir, train_classifier


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


JOB = "finetune-genes"
FROZEN, RANKS = "frozen_embeddings", "rank_statistics"  # the baselines scored in the same folds


BASELINE_PREFIX = {FROZEN: "frozen", RANKS: "rank_baseline"}  # their metrics' prefix in MLflow
