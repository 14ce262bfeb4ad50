"""Fine-tuning on real cells (`../shared/data/pbmc_2k_celltypes.h5ad`, Geneformer V2 vocabulary):

* cell types (T/NK, Monocytes, B) split by chemistry (`tech`: no chemistry in two splits): the
  fine-tuned classifier's test macro F1 next to logistic regression on log-normalised counts and
  on the pretrained model's frozen mean-pooled embeddings, same split, same run;
* the dosage-sensitive vs -insensitive TF labels: cross-validated (by gene) ROC AUC of the
  fine-tuned gene classifier next to logistic regression on frozen gene embeddings;
* fine-tuning tokens/s, and 1 vs 2 Ray Train workers.

The pretrained model is the `tiny` preset trained here for a few minutes on these cells (no
weights are downloaded), so the scores measure the pipeline on a weak model; they are reported
whatever their order.

Records (`finetune`): cell_macro_f1, cell_macro_f1_logreg_counts, cell_macro_f1_frozen_embeddings,
gene_cv_roc_auc, gene_cv_roc_auc_frozen_embeddings, tokens_per_s, scaling_efficiency_2_workers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from common import HERE, WORK, record

sys.path.insert(0, str(HERE.parent / "tests"))
from pretrain_helpers import pretrain_in_process

SHARED = Path(os.environ.get("RANKFORMER_SHARED", HERE.parent.parent / "shared"))
PBMC = SHARED / "data" / "pbmc_2k_celltypes.h5ad"
GF = SHARED / "reference" / "geneformer"


def corpus(work: Path) -> str:
    from rankformer.config.corpus import TokenizeConfig
    from rankformer.corpus.tokenize import run_tokenize
    from rankformer.vocab.geneformer import import_geneformer

    vocab = str(work / "gf_v2.json")
    if not os.path.exists(vocab):
        import_geneformer(
            str(GF / "token_dictionary_gc104M.pkl"),
            str(GF / "gene_median_dictionary_gc104M.pkl"),
            str(GF / "ensembl_mapping_dict_gc104M.pkl"),
            str(GF / "gene_name_id_dict_gc104M.pkl"),
        ).save(vocab)
    out = str(work / "pbmc_corpus")
    run_tokenize(
        TokenizeConfig(
            inputs=[str(PBMC)], vocab=vocab, out=out, carry={"celltype": "cell_type", "tech": "tech"}
        )
    )
    return out


def logreg_counts(split: pd.DataFrame) -> float:
    """Logistic regression on log1p(counts per 10k) of all genes, the job's own split."""
    import anndata as ad
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    a = ad.read_h5ad(PBMC)
    x = a.X.astype(np.float64)
    x = x.multiply(1e4 / np.asarray(x.sum(1)).clip(1)).tocsr()
    x.data = np.log1p(x.data)
    row = {c: i for i, c in enumerate(a.obs_names)}
    tr = split[split.split == "train"]
    te = split[split.split == "test"]
    clf = LogisticRegression(max_iter=2000).fit(x[[row[c] for c in tr.cell_id]], tr.label)
    return float(f1_score(te.label, clf.predict(x[[row[c] for c in te.cell_id]]), average="macro"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--throughput-only", action="store_true", help="reuse the last run's corpus and model")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from rankformer.classify.cells import run_finetune_cells
    from rankformer.classify.genes import run_finetune_genes
    from rankformer.config.train import FinetuneCellsConfig, FinetuneGenesConfig

    work = WORK / "finetune"
    track = {"tracking_uri": f"sqlite:///{work}/mlflow.db", "experiment": "bench"}
    if args.throughput_only:
        throughput(str(work / "pbmc_corpus"), str(work / "model"), work, track)
        return
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data = corpus(work)
    t = time.perf_counter()
    model = pretrain_in_process(data, str(work / "model"), args.pretrain_steps, max_tokens=8192)
    pre_s = time.perf_counter() - t
    conf = {
        "data": "pbmc_2k_celltypes",
        "model": f"tiny pretrained {args.pretrain_steps} steps here ({pre_s:.0f}s)",
        "device": "cpu",
    }
    common = {"corpus": data, "model": model, "batch": {"max_tokens": 8192, "max_cells": 12}, "track": track}
    cells_conf = {**conf, "split": "by tech", "epochs": args.epochs, "lr": 1e-3}
    for head, name in (
        (None, "cell_macro_f1"),
        ("rankformer.model.heads:MeanPoolForSequenceClassification", None),
    ):
        t = time.perf_counter()
        out = work / f"cells_{'default' if head is None else 'meanpool'}"
        s = run_finetune_cells(
            FinetuneCellsConfig(
                out=str(out),
                label_column="cell_type",
                group_column="tech",
                epochs=args.epochs,
                optim={"lr": 1e-3},
                head={"head_class": head},
                **common,
            )
        )
        head_name = head or "BertForSequenceClassification"
        record(
            "finetune",
            name or "cell_macro_f1",
            s["test_macro_f1"],
            "macro F1",
            {**cells_conf, "head": head_name},
        )
        if head is None:
            split = pd.read_parquet(out / "cell_predictions.parquet")
            record("finetune", "cell_macro_f1_logreg_counts", logreg_counts(split), "macro F1", cells_conf)
            frozen = s["frozen_embeddings"]["test_macro_f1"]
            record("finetune", "cell_macro_f1_frozen_embeddings", frozen, "macro F1", cells_conf)
        print(f"cells ({head_name}): {time.perf_counter() - t:.0f}s")
    genes = FinetuneGenesConfig(
        out=str(work / "genes"),
        labels=[str(GF / "labels" / "dosage_sens_tf_labels.csv")],
        limit_cells=500,
        max_steps=40,
        optim={"lr": 5e-4},
        **common,
    )
    g = run_finetune_genes(genes)
    gconf = {**conf, "folds": 5, "cells": 500, "steps_per_fold": 40, "lr": 5e-4}
    record("finetune", "gene_cv_roc_auc", g["roc_auc_mean"], "ROC AUC", gconf)
    record(
        "finetune",
        "gene_cv_roc_auc_frozen_embeddings",
        g["frozen_embeddings"]["roc_auc_mean"],
        "ROC AUC",
        gconf,
    )
    throughput(data, model, work, track)


def throughput(data: str, model: str, work: Path, track: dict[str, str]) -> None:
    """Cell fine-tuning tokens/s in this process, then on 1 and 2 Ray Train workers."""
    import ray
    from mlflow.tracking import MlflowClient

    from rankformer.classify.cells import run_finetune_cells
    from rankformer.config.train import FinetuneCellsConfig

    rates = {}
    for name, scale in (
        ("in_process", {"in_process": True}),
        ("ray_1", {"num_workers": 1, "in_process": False, "cpus_per_worker": 0.5}),
        ("ray_2", {"num_workers": 2, "in_process": False, "cpus_per_worker": 0.5}),
    ):
        shutil.rmtree(work / f"tp_{name}", ignore_errors=True)  # no checkpoint to resume from
        if name.startswith("ray"):
            ray.shutdown()
            ray.init(address="local", include_dashboard=False, log_to_driver=False)
        s = run_finetune_cells(
            FinetuneCellsConfig(
                corpus=data,
                model=model,
                out=str(work / f"tp_{name}"),
                label_column="cell_type",
                group_column="tech",
                max_steps=30,
                log_every=10,
                frozen_baseline=False,
                validation_fraction=0.0,
                batch={"max_tokens": 8192, "max_cells": 12},
                scale={**scale, "storage_path": str(work / "ray")},
                track={**track, "run_name": f"tp-{name}"},
            )
        )
        client = MlflowClient(track["tracking_uri"])
        exp = client.get_experiment_by_name(track["experiment"])
        runs = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{s['run_id']}'")
        hist = client.get_metric_history(runs[0].info.run_id, "tokens_per_s")
        rates[name] = float(np.mean([m.value for m in hist if m.step > 10] or [m.value for m in hist]))
    ray.shutdown()
    conf = {"preset": "tiny", "data": "pbmc_2k_celltypes", "device": "cpu", "max_tokens": 8192}
    record("finetune", "tokens_per_s", rates["in_process"], "tokens/s", {**conf, "stage": "in_process"})
    for n in (1, 2):
        per = rates[f"ray_{n}"]
        record("finetune", "tokens_per_s", per * n, "tokens/s", {**conf, "stage": "ray_train", "workers": n})
    eff = rates["ray_2"] / rates["ray_1"]
    record("finetune", "scaling_efficiency_2_workers", eff, "ratio", {**conf, "cores": os.cpu_count()})


if __name__ == "__main__":
    main()
