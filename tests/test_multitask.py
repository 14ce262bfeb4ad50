"""Multi-task cell classification (`finetune cells --tasks`) on cells with two planted,
independent labels: a cell type (its own gene programme) and a condition (a block of three genes
at the top of a cell, or not), some cells missing one label. The joint model scores each task above
its shuffled-label control and near the single-task model of that task; a missing label trains
nothing for its task; predictions carry every task; the encoder is saved with and without heads."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from pretrain_helpers import pretrain_in_process, write_corpus
from rankformer.classify.cells import run_finetune_cells
from rankformer.config.train import FinetuneCellsConfig
from rankformer.errors import InputError
from rankformer.io.synth import programme_cells

N_SHARED, PER_TYPE, TYPES, N_COND = 20, 30, 3, 3
N_GENES = N_SHARED + TYPES * PER_TYPE + N_COND
MEAN_POOL = "rankformer.model.heads:MeanPoolForSequenceClassification"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("multitask")
    n = 600
    cells, types, _ = programme_cells(n, TYPES, PER_TYPE, N_SHARED, 36, seed=5)
    rng = np.random.default_rng(6)
    cond = rng.integers(0, 2, n)  # independent of the type
    block = list(range(4 + N_GENES - N_COND, 4 + N_GENES))
    cells = [
        np.asarray([2, *block, *c[1:-1], 3], np.int32) if k else c for c, k in zip(cells, cond, strict=True)
    ]
    cell_type = np.asarray([f"type{t}" for t in types], dtype=object)
    condition = np.asarray(["treated" if k else "control" for k in cond], dtype=object)
    cell_type[rng.choice(n, 60, replace=False)] = None  # some cells lack one label or the other
    condition[rng.choice(n, 60, replace=False)] = None
    carry = {
        "cell_type": list(cell_type),
        "condition": list(condition),
        "donor": [f"d{i % 6}" for i in range(n)],
    }
    corpus = write_corpus(str(d / "corpus"), cells, N_GENES, carry=carry)
    model = pretrain_in_process(corpus, str(d / "model"), 600)
    return SimpleNamespace(d=d, corpus=corpus, model=model, types=types, cond=cond)


def _cfg(world, out, **kw) -> FinetuneCellsConfig:
    base = {
        "corpus": world.corpus,
        "model": world.model,
        "out": str(out),
        "group_column": "donor",
        "epochs": 6.0,
        "optim": {"lr": 1e-3},
        "batch": {"max_cells": 16, "max_tokens": 2048},
        "frozen_baseline": False,
        "track": {"tracking_uri": f"sqlite:///{world.d}/mlflow.db", "experiment": "multitask"},
    }
    return FinetuneCellsConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def joint(world):
    out = world.d / "joint"
    return run_finetune_cells(
        _cfg(world, out, tasks=["cell_type", "condition"], shuffled_controls=1, frozen_baseline=True)
    ), out


def test_each_task_beats_its_shuffled_control_and_matches_its_single_task_model(world, joint):
    report, _ = joint
    single = {
        t: run_finetune_cells(
            _cfg(world, world.d / f"single_{t}", label_column=t, head={"head_class": MEAN_POOL})
        )
        for t in ("cell_type", "condition")
    }
    for task in ("cell_type", "condition"):
        entry = report["tasks"][task]
        f1 = entry["test_macro_f1"]
        assert f1 > 0.9, (task, f1)
        assert f1 > max(entry["shuffled_control_macro_f1"]) + 0.2
        assert abs(f1 - single[task]["test_macro_f1"]) < 0.1, (task, f1, single[task]["test_macro_f1"])
        assert entry["beats_controls"] and "frozen_embeddings" in entry and "majority_class" in entry
        assert len(entry["test_confusion"]) == len(entry["classes"])
    assert report["tasks"]["condition"]["classes"] == ["control", "treated"]
    # one MLflow run, every task's metrics under TASK/
    from mlflow.tracking import MlflowClient

    run = MlflowClient(f"sqlite:///{world.d}/mlflow.db").get_run(report["run_id"])
    assert {"cell_type/test_macro_f1", "condition/test_macro_f1", "condition/val_macro_f1"} <= set(
        run.data.metrics
    )


def test_predictions_carry_every_task_and_the_encoder_is_kept_without_heads(world, joint):
    import rankformer
    from rankformer.classify.predict import PredictConfig, run_predict
    from rankformer.corpus.read import read_corpus

    _, out = joint
    table = pd.read_parquet(out / "cell_predictions.parquet")
    for task, classes in (("cell_type", ["type0", "type1", "type2"]), ("condition", ["control", "treated"])):
        assert {f"{task}_label", f"{task}_predicted", *(f"{task}_prob_{c}" for c in classes)} <= set(
            table.columns
        )
        probs = table[[f"{task}_prob_{c}" for c in classes]].to_numpy()
        np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)  # a softmax per task
    assert table.cell_type_label.isna().sum() > 0  # kept, though unlabelled for one task
    run_predict(
        "cells", PredictConfig(model=str(out / "model"), corpus=world.corpus, out=str(world.d / "pred"))
    )
    pred = pd.read_parquet(world.d / "pred" / "cell_predictions.parquet")
    clf = rankformer.load_classifier(str(out / "model"))
    mem = clf.predict(read_corpus(world.corpus, engine="arrow").to_table())
    assert list(mem.columns) == list(pred.columns)
    np.testing.assert_allclose(mem.condition_prob_treated, pred.condition_prob_treated, atol=1e-6)
    labelled = pred.condition_label.notna()
    assert (pred.condition_predicted[labelled] == pred.condition_label[labelled]).mean() > 0.9
    # the encoder without its heads: a masked-LM model folder with the fine-tuned encoder's weights
    from transformers import BertForMaskedLM

    from rankformer.model.loader import load_model

    enc = load_model(str(out / "encoder")).model
    heads = load_model(str(out / "model"), head=clf._model.__class__).model
    assert isinstance(enc, BertForMaskedLM)
    for name, w in heads.bert.state_dict().items():
        torch.testing.assert_close(enc.bert.state_dict()[name], w)
    meta = json.loads((out / "encoder" / "rankformer.json").read_text())
    assert meta["task"] == "masked-lm" and meta["finetuned_for"] == ["cell_type", "condition"]


def test_a_missing_label_trains_nothing_for_its_task():
    from rankformer.model.heads import multitask_loss

    logits = torch.randn(4, 5, requires_grad=True)
    slices = [slice(0, 3), slice(3, 5)]
    labels = torch.tensor([[0, 1], [2, -100], [-100, 0], [1, 1]])
    loss = multitask_loss(logits, labels, slices, [1.0, 2.0])
    loss.backward()
    assert logits.grad is not None
    assert torch.all(logits.grad[1, 3:] == 0) and torch.all(logits.grad[2, :3] == 0)  # masked, not guessed
    want = torch.nn.functional.cross_entropy(logits[[0, 1, 3], :3], labels[[0, 1, 3], 0]) + 2.0 * (
        torch.nn.functional.cross_entropy(logits[[0, 2, 3], 3:], labels[[0, 2, 3], 1])
    )
    torch.testing.assert_close(loss, want)
    # a batch where no cell has a task's label: that task adds nothing (not NaN)
    only_first = torch.tensor([[0, -100], [1, -100]])
    assert torch.isfinite(multitask_loss(torch.randn(2, 5), only_first, slices))


def test_bad_multitask_input_is_named(world, tmp_path):
    with pytest.raises(InputError, match=r"--tasks 'severity': no such column"):
        run_finetune_cells(_cfg(world, tmp_path / "a", tasks=["cell_type", "severity"]))
    with pytest.raises(InputError, match="two or more different label columns"):
        _cfg(world, tmp_path / "b", tasks=["cell_type"])
    with pytest.raises(InputError, match="task_weights"):
        _cfg(world, tmp_path / "c", tasks=["cell_type", "condition"], task_weights=[1.0])
    with pytest.raises(InputError, match=r"task 'donor'.*two or more classes"):
        run_finetune_cells(
            _cfg(
                world,
                tmp_path / "d",
                tasks=["cell_type", "donor"],
                cells_where=["donor=d1"],
                group_column=None,
            )
        )
