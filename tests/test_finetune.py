"""Fine-tuning in this process on a corpus of planted gene programmes (three cell types, each with
its own genes; shared genes in every cell), from a tiny model pretrained on it: gene classification
predicts held-out genes, cell classification predicts held-out donors' cells, shuffled labels do
not; predictions on another corpus; Ray Tune; every bad input named before training."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import needs_shared
from pretrain_helpers import pbmc_with_untrained_model, pretrain_in_process, write_corpus
from rankformer.classify.cell_job import split_cells
from rankformer.classify.cells import run_finetune_cells
from rankformer.classify.gene_job import gene_folds
from rankformer.classify.genes import run_finetune_genes
from rankformer.classify.labels import map_labels, read_label_sets
from rankformer.classify.predict import PredictConfig, run_predict
from rankformer.config.train import FinetuneCellsConfig, FinetuneGenesConfig, HeadOptions
from rankformer.errors import InputError
from rankformer.io.synth import gene_ids, programme_cells
from rankformer.train.classifier import build_classifier
from rankformer.vocab.gene_vocab import GeneVocab

N_SHARED, PER_TYPE, TYPES = 20, 40, 3
N_GENES = N_SHARED + TYPES * PER_TYPE
MEAN_POOL = "rankformer.model.heads:MeanPoolForSequenceClassification"


def _corpus(path: str, n: int, seed: int) -> tuple[str, np.ndarray, list[np.ndarray]]:
    cells, types, progs = programme_cells(n, TYPES, PER_TYPE, N_SHARED, 40, seed=3)
    rng = np.random.default_rng(seed)
    keep = rng.permutation(n)  # another sample of the same programmes for a second corpus
    cells = [cells[i] for i in keep]
    types = types[keep]
    carry = {"cell_type": [f"type{t}" for t in types], "donor": [f"d{i % 6}" for i in range(n)]}
    return write_corpus(path, cells, N_GENES, carry=carry), types, progs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("finetune")
    corpus, types, progs = _corpus(str(d / "corpus"), 900, 0)
    other, _, _ = _corpus(str(d / "other"), 300, 1)
    model = pretrain_in_process(corpus, str(d / "model"), 1000)
    ids = gene_ids(N_GENES)
    lists = {}
    for t in (0, 1):
        p = d / f"type{t}.txt"
        p.write_text("\n".join(ids[progs[t] - 4]))
        lists[t] = str(p)
    return SimpleNamespace(
        d=d, corpus=corpus, other=other, model=model, types=types, progs=progs, lists=lists
    )


def _vocab(world) -> GeneVocab:
    manifest = json.loads((world.d / "corpus" / "manifest.json").read_text())
    return GeneVocab.load(manifest["config"]["vocab"])


def _genes_cfg(world, out, **kw) -> FinetuneGenesConfig:
    base = {
        "corpus": world.corpus,
        "model": world.model,
        "out": str(out),
        "labels": [f"x={world.lists[0]}", f"y={world.lists[1]}"],
        "max_steps": 60,
        "optim": {"lr": 5e-4},
        "batch": {"max_cells": 16, "max_tokens": 2048},
        "track": {"tracking_uri": f"sqlite:///{world.d}/mlflow.db", "experiment": "genes"},
    }
    return FinetuneGenesConfig(**{**base, **kw})


def _cells_cfg(world, out, **kw) -> FinetuneCellsConfig:
    base = {
        "corpus": world.corpus,
        "model": world.model,
        "out": str(out),
        "label_column": "cell_type",
        "group_column": "donor",
        "epochs": 2.0,
        "optim": {"lr": 1e-3},
        "batch": {"max_cells": 16, "max_tokens": 2048},
        "head": {"head_class": MEAN_POOL},
        "track": {"tracking_uri": f"sqlite:///{world.d}/mlflow.db", "experiment": "cells"},
    }
    return FinetuneCellsConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def genes_run(world):
    out = world.d / "genes"
    return run_finetune_genes(
        _genes_cfg(
            world,
            out,
            shuffled_controls=3,
            track={
                "tracking_uri": f"sqlite:///{world.d}/mlflow.db",
                "experiment": "genes",
                "registered_model": "gene-clf",
            },
        )
    ), out


def test_gene_classifier_predicts_held_out_genes_and_shuffled_labels_do_not(genes_run):
    summary, _ = genes_run
    assert summary["roc_auc_mean"] >= 0.8, summary["roc_auc_mean"]
    # the mean over several shuffles: one shuffle of ~80 labels can keep a chance majority per programme
    assert abs(summary["shuffled_control_roc_auc_mean"] - 0.5) < 0.2, summary["shuffled_control_roc_auc"]
    assert summary["frozen_embeddings"]["roc_auc_mean"] >= 0.8
    assert len(summary["folds"]) == 5
    # both programmes' genes are alike in rank and frequency: rank statistics alone are near chance,
    # and the fine-tuned model is said to beat its controls
    assert summary["rank_statistics"]["roc_auc_mean"] < 0.75, summary["rank_statistics"]
    assert summary["beats_controls"] and summary["verdict"].startswith("the fine-tuned model beats")


def test_gene_folds_never_share_a_gene(genes_run, world):
    _, out = genes_run
    folds = json.loads((out / "folds.json").read_text())["fold_of_gene"]
    report = json.loads((out / "cv_metrics.json").read_text())
    tested = [g for f in report["folds"] for g in f["test_genes"]]
    assert len(tested) == len(set(tested)) == len(folds) == 2 * PER_TYPE  # each gene tested exactly once
    vocab = _vocab(world)
    labels = map_labels(read_label_sets([f"x={world.lists[0]}", f"y={world.lists[1]}"]), vocab)
    for tr, te in gene_folds(labels, 5, 0):
        assert not set(labels.tokens[tr]) & set(labels.tokens[te])
        assert 0.2 < labels.label[te].mean() < 0.8  # stratified


def test_gene_prediction_table_answers_the_question(genes_run, world):
    _, out = genes_run
    table = pd.read_parquet(out / "gene_predictions.parquet")
    assert list(table.columns) == [
        "gene_id",
        "symbol",
        "in_training",
        "n_occurrences",
        "predicted",
        "prob_x",
        "prob_y",
        "frozen_prob_x",  # the frozen-embedding baseline's answer beside the fine-tuned one
        "frozen_prob_y",
        "rank_baseline_prob_x",  # and what the genes' rank statistics alone answer
        "rank_baseline_prob_y",
    ]
    held_out_x = table[~table.in_training & (table.prob_x > 0)]
    assert len(held_out_x) and np.allclose(table.frozen_prob_x + table.frozen_prob_y, 1.0)
    assert len(table) == N_GENES  # every vocabulary gene seen in the cells
    assert table["in_training"].sum() == 2 * PER_TYPE
    assert np.allclose(table["prob_x"] + table["prob_y"], 1.0)
    assert table["prob_x"].is_monotonic_decreasing
    csv = pd.read_csv(out / "gene_predictions.csv")
    assert len(csv) == len(table)
    for name in (
        "cv_metrics.json",
        "roc_curves.png",
        "confusion.png",
        "roc_curves_frozen.png",
        "manifest.json",
    ):
        assert (out / name).exists(), name
    assert json.loads((out / "model" / "rankformer.json").read_text())["task"] == "gene-classification"


def test_gene_job_is_tracked_as_parent_and_nested_runs(genes_run, world):
    from mlflow.tracking import MlflowClient

    summary, _ = genes_run
    client = MlflowClient(f"sqlite:///{world.d}/mlflow.db")
    parent = client.get_run(summary["run_id"])
    assert parent.data.metrics["cv_roc_auc_mean"] == pytest.approx(summary["roc_auc_mean"])
    exp = client.get_experiment_by_name("genes")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{summary['run_id']}'")
    assert len(children) == 5 + 3 * 5 + 1  # folds, shuffled-control folds, final
    arts = {a.path for a in client.list_artifacts(summary["run_id"], "results")}
    assert "results/gene_predictions.parquet" in arts and "results/cv_metrics.json" in arts
    mv = client.get_model_version_by_alias("gene-clf", "current")
    assert mv.tags["task"] == "gene-classification" and mv.tags["classes"] == "x,y"


def test_predict_genes_on_another_corpus(genes_run, world, tmp_path):
    summary = run_predict(
        "genes",
        PredictConfig(
            model="models:/gene-clf@current",
            corpus=world.other,
            out=str(tmp_path / "p"),
            tracking_uri=f"sqlite:///{world.d}/mlflow.db",
        ),
    )
    assert summary["model_version"] == "1"
    table = pd.read_parquet(tmp_path / "p" / "gene_predictions.parquet")
    assert {"gene_id", "in_training", "prob_x", "prob_y"} <= set(table.columns)
    # held-out type-0 genes rank above type-1 genes on new cells too
    ids = gene_ids(N_GENES)
    x, y = set(ids[world.progs[0] - 4]), set(ids[world.progs[1] - 4])
    px = table[table.gene_id.isin(x)].prob_x.mean()
    py = table[table.gene_id.isin(y)].prob_x.mean()
    assert px > py
    with pytest.raises(InputError, match="gene-classification"):
        run_predict(
            "cells",
            PredictConfig(model=str(genes_run[1] / "model"), corpus=world.other, out=str(tmp_path / "q")),
        )


@pytest.fixture(scope="module")
def cells_run(world):
    return run_finetune_cells(_cells_cfg(world, world.d / "cells")), world.d / "cells"


def test_cell_classifier_on_held_out_donors(cells_run, world):
    summary, out = cells_run
    assert summary["test_macro_f1"] >= 0.8
    table = pd.read_parquet(out / "cell_predictions.parquet")
    assert list(table.columns) == [
        "cell_id",
        "label",
        "predicted",
        "split",
        *[f"prob_type{t}" for t in range(3)],
    ]
    donors = pd.concat([pd.read_parquet(f) for f in sorted((world.d / "corpus").glob("*.parquet"))])
    donor_of = dict(zip(donors.cell_id, donors.donor, strict=True))
    split_donors = table.groupby("split").cell_id.apply(lambda c: {donor_of[x] for x in c})
    assert not split_donors["train"] & split_donors["test"]  # no donor in two splits
    assert not split_donors["train"] & split_donors.get("validation", set())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_macro_f1"] == summary["test_macro_f1"] and "frozen_embeddings" in metrics
    assert json.loads((out / "model" / "config.json").read_text())["architectures"] == [
        "MeanPoolForSequenceClassification"
    ]


def test_cell_classifier_with_shuffled_labels_is_near_chance(world, tmp_path):
    # the same cells, each labelled at random: nothing to learn
    summary = run_finetune_cells(
        _cells_cfg(world, tmp_path / "shuffled", label_column="donor", group_column=None)
    )
    assert summary["test_macro_f1"] < 0.4, summary["test_macro_f1"]


def test_predict_cells(cells_run, world, tmp_path):
    _, out = cells_run
    run_predict("cells", PredictConfig(model=str(out / "model"), corpus=world.other, out=str(tmp_path / "p")))
    table = pd.read_parquet(tmp_path / "p" / "cell_predictions.parquet")
    assert len(table) == 300 and (table.label == table.predicted).mean() > 0.8
    # in memory: the same table for the same cells
    import rankformer
    from rankformer.corpus.read import read_corpus

    clf = rankformer.load_classifier(str(out / "model"))
    assert clf.kind == "cells" and clf.classes == [f"type{t}" for t in range(3)]
    got = clf.predict(read_corpus(world.other, engine="arrow").to_table())
    assert list(got.columns) == list(table.columns)
    assert got.cell_id.tolist() == table.cell_id.tolist() and got.label.tolist() == table.label.tolist()
    probs = [f"prob_type{t}" for t in range(3)]
    np.testing.assert_allclose(got[probs].to_numpy(), table[probs].to_numpy(), atol=1e-6)
    with pytest.raises(InputError, match="not a classifier"):
        rankformer.load_classifier(world.model)


def test_in_memory_gene_predictions_equal_the_job(genes_run, world, tmp_path):
    import rankformer
    from rankformer.corpus.read import read_corpus

    uri = f"sqlite:///{world.d}/mlflow.db"
    cfg = PredictConfig(
        model="models:/gene-clf@current", corpus=world.other, out=str(tmp_path / "p"), tracking_uri=uri
    )
    run_predict("genes", cfg)
    table = pd.read_parquet(tmp_path / "p" / "gene_predictions.parquet")
    clf = rankformer.load_classifier("models:/gene-clf@current", tracking_uri=uri)
    got = clf.predict(read_corpus(world.other, engine="arrow").to_table())
    assert got.gene_id.tolist() == table.gene_id.tolist() and list(got.columns) == list(table.columns)
    np.testing.assert_allclose(got.prob_x, table.prob_x, atol=1e-6)
    assert got.in_training.tolist() == table.in_training.tolist()


@pytest.mark.ray
def test_ray_tune_search_records_the_best_trial(world, tmp_path, ray_cluster):
    from mlflow.tracking import MlflowClient

    cfg = _cells_cfg(
        world,
        tmp_path / "tuned",
        epochs=1.0,
        tune={"trials": 3, "eval_every": 10, "grace_steps": 10, "tune_lr": [1e-4, 3e-3]},
        track={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "tune"},
    )
    summary = run_finetune_cells(cfg)
    assert len(summary["tune"]["trials"]) == 3
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parent = client.get_run(summary["run_id"])
    assert float(parent.data.tags["best_trial.lr"]) == pytest.approx(summary["tune"]["best"]["params"]["lr"])
    assert "best_trial_val_score" in parent.data.metrics


def test_split_by_group_is_stratified_and_never_leaks():
    rng = np.random.default_rng(0)
    groups = np.asarray([f"g{i}" for i in rng.integers(0, 10, 500)])
    y = rng.integers(0, 2, 500)
    split = split_cells(y, groups, 0.2, 0.1, 0, "donor")
    seen = {p: set(groups[split == p]) for p in ("train", "validation", "test")}
    assert not (seen["train"] & seen["test"]) and not (seen["train"] & seen["validation"])
    assert seen["test"] and seen["validation"]
    with pytest.raises(InputError, match="one group"):
        split_cells(y, np.asarray(["a"] * 500), 0.2, 0.1, 0, "donor")


def test_heads_and_freezing(world):
    head = HeadOptions(head_class="AutoModelForTokenClassification", freeze_layers=1, freeze_embeddings=True)
    model = build_classifier(world.model, "token", 3, head, 0, 4)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any(".layer.0." in n for n in frozen) and not any(".layer.1." in n for n in frozen)
    assert any("embeddings" in n for n in frozen) and "classifier.weight" not in frozen
    custom = build_classifier(world.model, "sequence", 2, HeadOptions(head_class=MEAN_POOL), 0, 4)
    ids = torch.tensor([[2, 10, 11, 3, 0]])
    assert custom(input_ids=ids, attention_mask=(ids != 0).long()).logits.shape == (1, 2)
    with pytest.raises(InputError, match="head_class"):
        build_classifier(world.model, "token", 2, HeadOptions(head_class="NoSuchHead"), 0, 4)
    with pytest.raises(InputError, match="freeze_layers"):
        build_classifier(world.model, "token", 2, HeadOptions(freeze_layers=9), 0, 4)


def test_label_shapes(tmp_path, world):
    ids = gene_ids(N_GENES)
    vocab = _vocab(world)
    long = pd.DataFrame({"gene": [*ids[:6], *ids[10:16]], "label": ["a"] * 6 + ["b"] * 6})
    long.to_csv(tmp_path / "long.csv", index=False)
    long.to_csv(tmp_path / "long.tsv", index=False, sep="\t")
    long.to_parquet(tmp_path / "long.parquet")
    wide = pd.DataFrame({"a": list(ids[:6]), "b": [*ids[10:15], ""]})
    wide.to_csv(tmp_path / "wide.csv", index=False)
    for name in ("long.csv", "long.tsv", "long.parquet"):
        labels = map_labels(read_label_sets([str(tmp_path / name)]), vocab)
        assert labels.counts() == {"a": 6, "b": 6}, name
    assert map_labels(read_label_sets([str(tmp_path / "wide.csv")]), vocab).counts() == {"a": 6, "b": 5}
    (tmp_path / "a.txt").write_text("\n".join([*ids[:3], "NOT_A_GENE"]))
    (tmp_path / "b.txt").write_text("\n".join(ids[20:23]))
    labels = map_labels(read_label_sets([f"a={tmp_path}/a.txt", f"b={tmp_path}/b.txt"]), vocab)
    assert labels.unmapped == {"a": ["NOT_A_GENE"]} and labels.counts() == {"a": 3, "b": 3}
    with pytest.raises(FileNotFoundError, match=r"--labels b=.*nowhere.txt: gene list .* not found"):
        read_label_sets([f"a={tmp_path}/a.txt", f"b={tmp_path}/nowhere.txt"])
    with pytest.raises(FileNotFoundError, match=r"--labels: label file .*nowhere.csv not found"):
        read_label_sets([str(tmp_path / "nowhere.csv")])


def test_bad_input_is_named_before_training(world, tmp_path):
    ids = gene_ids(N_GENES)

    def genes(**kw):
        return run_finetune_genes(_genes_cfg(world, tmp_path / f"o{len(os.listdir(tmp_path))}", **kw))

    (tmp_path / "one.txt").write_text("\n".join(ids[40:50]))
    with pytest.raises(InputError, match="two or more classes"):
        genes(labels=[f"only={tmp_path}/one.txt"])
    (tmp_path / "few.txt").write_text("\n".join(ids[60:63]))
    with pytest.raises(InputError, match="too few labelled genes"):
        genes(labels=[f"x={world.lists[0]}", f"few={tmp_path}/few.txt"])
    (tmp_path / "overlap.txt").write_text("\n".join(ids[world.progs[0][:3] - 4]))
    with pytest.raises(InputError, match="labelled both"):
        genes(labels=[f"x={world.lists[0]}", f"y={tmp_path}/overlap.txt"])
    (tmp_path / "ghost.txt").write_text("\n".join(f"ENSG9999999{i:04d}" for i in range(20)))
    with pytest.raises(InputError, match="too few labelled genes"):
        genes(labels=[f"x={world.lists[0]}", f"ghost={tmp_path}/ghost.txt"])
    pd.DataFrame({"gene": ids[:10], "kind": ["a", "b"] * 5}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(InputError, match="label column 'label_col' is missing"):
        genes(labels=[str(tmp_path / "t.csv")], label_column="label_col", gene_column="gene")
    with pytest.raises(
        InputError, match="--label-column 'tissue': no such column in corpus .* --carry tissue"
    ):
        run_finetune_cells(_cells_cfg(world, tmp_path / "c1", label_column="tissue"))
    with pytest.raises(InputError, match="--group-column 'batch': no such column in corpus"):
        run_finetune_cells(_cells_cfg(world, tmp_path / "c2", group_column="batch"))
    with pytest.raises(InputError, match="one group"):
        run_finetune_cells(_cells_cfg(world, tmp_path / "c3", cells_where=["donor=d1"], group_column="donor"))
    other_vocab = write_corpus(
        str(tmp_path / "foreign"), [np.arange(2, 12, dtype=np.int32)] * 20, N_GENES + 7
    )
    with pytest.raises(InputError, match="vocabulary"):
        genes(corpus=other_vocab)
    with pytest.raises(InputError, match="layer 'top' must be penultimate, last or an integer"):
        genes(layer="top")
    with pytest.raises(InputError, match="layer 40 is outside this model's hidden_states"):
        run_finetune_cells(_cells_cfg(world, tmp_path / "c4", layer="40"))
    assert not (tmp_path / "c4").exists()  # refused at the door, not after training
    run_finetune_cells(_cells_cfg(world, tmp_path / "c5", layer="40", frozen_baseline=False, max_steps=1))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        run_finetune_genes(_genes_cfg(world, tmp_path / "full"))


def test_packed_fine_tuning_learns_as_the_padded_one_does(genes_run, cells_run, world, tmp_path):
    """`--packed` (cells end to end, no padding): the gene classifier (token head) and the cell
    classifier (BERT's own sequence head: each cell's first token pooled) learn what the padded
    runs learn, with the same steps and seed."""
    genes = run_finetune_genes(
        _genes_cfg(
            world,
            tmp_path / "genes",
            folds=3,
            shuffled_controls=0,
            frozen_baseline=False,
            batch={"max_cells": 16, "max_tokens": 2048, "packed": True},
        )
    )
    assert genes["roc_auc_mean"] >= 0.8, genes["roc_auc_mean"]
    assert abs(genes["roc_auc_mean"] - genes_run[0]["roc_auc_mean"]) < 0.1
    cells = run_finetune_cells(
        _cells_cfg(
            world,
            tmp_path / "cells",
            head={},
            frozen_baseline=False,
            batch={"max_cells": 16, "max_tokens": 2048, "packed": True},
        )
    )
    assert cells["test_macro_f1"] >= 0.8, cells["test_macro_f1"]
    saved = json.loads((tmp_path / "cells" / "model" / "config.json").read_text())
    assert saved["architectures"] == ["BertForSequenceClassification"]
    assert "rankformer" not in json.dumps(saved)  # a plain folder: nothing of the packed attention


@pytest.mark.ray
@pytest.mark.slow
def test_fine_tuning_on_ray_train_workers(world, tmp_path, ray_cluster, s3_server):
    """The same training through Ray Train: 2 workers (DDP over gloo, packed batches), rank 0
    logging to the run, the best epoch by validation kept; with the output on s3:// and no
    --storage-path, checkpoints go to OUT/.work on s3 (every node reaches it), and a rerun resumes
    from them: no step is trained again and the classifier is the same."""
    import boto3
    import s3fs
    from mlflow.tracking import MlflowClient

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="finetune-test")
    db = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = _cells_cfg(
        world,
        "s3://finetune-test/cells",
        epochs=2.0,
        frozen_baseline=False,
        batch={"max_cells": 16, "max_tokens": 2048, "packed": True},  # DDP over packed batches
        scale={"num_workers": 2, "cpus_per_worker": 0.5},
        track={"tracking_uri": db, "experiment": "ray"},
    )
    summary = run_finetune_cells(cfg)
    assert summary["test_macro_f1"] >= 0.8
    client = MlflowClient(db)
    exp = client.get_experiment_by_name("ray")
    train = client.search_runs([exp.experiment_id], "attributes.run_name = 'train'")
    assert train and client.get_metric_history(train[0].info.run_id, "val_macro_f1")  # rank 0 scored epochs
    assert s3fs.S3FileSystem().find("finetune-test/cells/.work/ray")  # checkpoints in the run's storage
    again = run_finetune_cells(cfg)
    assert again["test_macro_f1"] == summary["test_macro_f1"]
    runs = client.search_runs(
        [exp.experiment_id], "attributes.run_name = 'train'", order_by=["start_time DESC"]
    )
    assert len(runs) == 2 and not client.get_metric_history(runs[0].info.run_id, "loss")  # resumed: no step


@needs_shared()
@pytest.mark.slow
def test_dosage_sensitivity_labels_on_real_cells(tmp_path, geneformer_v2_vocab, shared):
    """The published dosage-sensitive vs -insensitive TF labels (a wide table) end to end on real
    PBMC cells with a Geneformer V2 vocabulary: the pipeline, the fold structure, the outputs."""
    corpus, model = pbmc_with_untrained_model(str(tmp_path), str(shared), geneformer_v2_vocab)
    labels = shared / "reference" / "geneformer" / "labels" / "dosage_sens_tf_labels.csv"
    cfg = FinetuneGenesConfig(
        corpus=corpus,
        model=model,
        out=str(tmp_path / "out"),
        labels=[str(labels)],
        limit_cells=200,
        max_steps=4,
        batch={"max_tokens": 8192, "max_cells": 8},
        track={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"},
    )
    summary = run_finetune_genes(cfg)
    report = json.loads((tmp_path / "out" / "cv_metrics.json").read_text())
    assert report["classes"] == ["dosage_sensitive", "dosage_insensitive"]
    counts = report["labelled_genes"]
    assert counts["dosage_sensitive"] >= 5 and counts["dosage_insensitive"] >= 5
    # every label is accounted for: used, not in the vocabulary, or not in these cells
    missing = sum(len(v) for v in report["labelled_not_in_vocab"].values()) + len(
        report["labelled_not_in_cells"]
    )
    assert sum(counts.values()) + missing == 122 + 368
    tested = [g for f in report["folds"] for g in f["test_genes"]]
    assert len(tested) == len(set(tested)) == sum(counts.values()) and len(report["folds"]) == 5
    table = pd.read_parquet(tmp_path / "out" / "gene_predictions.parquet")
    assert {"prob_dosage_sensitive", "prob_dosage_insensitive"} <= set(table.columns)
    assert table.symbol.str.len().gt(0).mean() > 0.9  # names from the vocabulary
    assert 0.0 <= summary["roc_auc_mean"] <= 1.0


def test_cli_flags_drive_the_gene_job(world, tmp_path, capsys):
    from rankformer.cli import main as cli

    base = ["finetune", "genes", "--corpus", world.corpus, "--model", world.model, "--out"]
    labels = ["--labels", f"x={world.lists[0]}", "--labels", f"y={world.lists[1]}"]
    flags = ["--folds", "2", "--max-steps", "2", "--num-workers", "1", "--seed", "3", "--no-frozen-baseline"]
    track = ["--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]
    assert cli([*base, str(tmp_path / "o"), *labels, *flags, *track]) == 0
    report = json.loads((tmp_path / "o" / "cv_metrics.json").read_text())
    assert report["n_folds"] == 2 and "frozen_embeddings" not in report
    assert cli([*base, str(tmp_path / "p"), "--labels", f"x={world.lists[0]}", *flags, *track]) == 2
    assert "two or more classes" in capsys.readouterr().err
