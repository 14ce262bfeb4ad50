"""Parameter-efficient fine-tuning (`--peft lora`): only the adapters and the head train, every base
weight bit for bit as it was; the saved adapters (with their base model's reference) and the
merged plain model predict the same (1e-5), both through the project's loader; a training with
adapters resumes from its checkpoint; quantized bases are refused on CPU."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pretrain_helpers import pretrain_in_process, write_corpus
from rankformer.classify.cell_job import CellJob
from rankformer.classify.cells import run_finetune_cells
from rankformer.classify.genes import run_finetune_genes
from rankformer.config.train import FinetuneCellsConfig, FinetuneGenesConfig
from rankformer.errors import InputError
from rankformer.io.synth import gene_ids, programme_cells
from rankformer.model.loader import load_model
from rankformer.train.finetune import train_classifier

N_SHARED, PER_TYPE, TYPES = 20, 30, 3
N_GENES = N_SHARED + TYPES * PER_TYPE
MEAN_POOL = "rankformer.model.heads:MeanPoolForSequenceClassification"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("peft")
    cells, types, progs = programme_cells(360, TYPES, PER_TYPE, N_SHARED, 36, seed=8)
    carry = {"cell_type": [f"type{t}" for t in types], "donor": [f"d{i % 6}" for i in range(360)]}
    corpus = write_corpus(str(d / "corpus"), cells, N_GENES, carry=carry)
    model = pretrain_in_process(corpus, str(d / "model"), 400)
    ids = gene_ids(N_GENES)
    lists = []
    for t in (0, 1):
        p = d / f"type{t}.txt"
        p.write_text("\n".join(ids[progs[t] - 4]))
        lists.append(f"t{t}={p}")
    return SimpleNamespace(d=d, corpus=corpus, model=model, lists=lists)


def _cfg(world, out, **kw) -> FinetuneCellsConfig:
    base = {
        "corpus": world.corpus,
        "model": world.model,
        "out": str(out),
        "label_column": "cell_type",
        "group_column": "donor",
        "epochs": 4.0,
        "optim": {"lr": 2e-2},  # adapters and a fresh head: a higher rate than full fine-tuning
        "batch": {"max_cells": 16, "max_tokens": 2048},
        "head": {"head_class": MEAN_POOL},
        "frozen_baseline": False,
        "adapter": {"peft": "lora", "lora_rank": 4, "lora_targets": ["query", "value"]},
        "track": {"tracking_uri": f"sqlite:///{world.d}/mlflow.db", "experiment": "peft"},
    }
    return FinetuneCellsConfig(**{**base, **kw})


def _base_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's weights under their plain names (PEFT's wrapping taken off)."""
    out = {}
    for name, p in model.state_dict().items():
        if "lora_" in name or "modules_to_save" in name:
            continue
        plain = name.replace("base_model.model.", "").replace(".base_layer", "")
        if plain.startswith("bert."):
            out[plain] = p.detach().clone()
    return out


def test_only_adapters_and_head_train_the_base_stays_bit_identical(world, tmp_path):
    job = CellJob(_cfg(world, tmp_path / "unit"))
    spec = job.spec(None)
    rows = job.rows("train")
    before = _base_weights(load_model(world.model).model)
    model = train_classifier(
        spec, [job.cells.ids[i] for i in rows], job.y[rows], job.cfg.scale, job.work, "lora"
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    after = _base_weights(model)
    assert set(before) <= set(after)
    for name, w in before.items():
        assert torch.equal(after[name], w), name  # bit for bit
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # LoRA's B starts at zero: it trained
    total = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for n, p in model.named_parameters() if n in trainable) < 0.1 * total


def test_saved_adapters_and_merged_model_predict_alike(world, tmp_path):
    import rankformer
    from rankformer.corpus.read import read_corpus

    adapters = run_finetune_cells(_cfg(world, tmp_path / "adapters"))
    run_finetune_cells(
        _cfg(world, tmp_path / "merged", adapter={**_cfg(world, "x").adapter.__dict__, "merge": True})
    )
    assert adapters["test_macro_f1"] > 0.8
    folder = tmp_path / "adapters" / "model"
    assert (folder / "adapter_model.safetensors").exists() and not (folder / "model.safetensors").exists()
    meta = json.loads((folder / "rankformer.json").read_text())["adapter"]
    assert meta["base_model"] == world.model and meta["method"] == "lora" and not meta["merged"]
    assert meta["trainable_parameters"] < meta["total_parameters"] / 10
    assert (tmp_path / "merged" / "model" / "model.safetensors").exists()
    cells = read_corpus(world.corpus, engine="arrow").to_table()
    a = rankformer.load_classifier(str(folder)).predict(cells)
    m = rankformer.load_classifier(str(tmp_path / "merged" / "model")).predict(cells)
    probs = [f"prob_type{t}" for t in range(TYPES)]
    np.testing.assert_allclose(a[probs].to_numpy(), m[probs].to_numpy(), atol=1e-5)
    # the merged folder is a plain Hugging Face model
    from rankformer.model.heads import MeanPoolForSequenceClassification

    plain = MeanPoolForSequenceClassification.from_pretrained(str(tmp_path / "merged" / "model"))
    assert not hasattr(plain, "peft_config")
    # an adapter folder whose base model is gone is named
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    doc = json.loads((moved / "rankformer.json").read_text())
    doc["adapter"]["base_model"] = str(tmp_path / "no-such-model")
    (moved / "rankformer.json").write_text(json.dumps(doc))
    with pytest.raises((InputError, FileNotFoundError), match="no-such-model"):
        rankformer.load_classifier(str(moved))


def test_gene_classification_with_adapters(world, tmp_path):
    cfg = FinetuneGenesConfig(
        corpus=world.corpus,
        model=world.model,
        out=str(tmp_path / "genes"),
        labels=world.lists,
        folds=2,
        max_steps=40,
        optim={"lr": 1e-2},
        batch={"max_cells": 16, "max_tokens": 2048},
        frozen_baseline=False,
        shuffled_controls=0,
        adapter={"peft": "lora", "lora_rank": 4},
        track={"tracking_uri": f"sqlite:///{world.d}/mlflow.db", "experiment": "peft-genes"},
    )
    report = run_finetune_genes(cfg)
    assert report["roc_auc_mean"] > 0.8
    import rankformer
    from rankformer.corpus.read import read_corpus

    clf = rankformer.load_classifier(str(tmp_path / "genes" / "model"))
    table = clf.predict(read_corpus(world.corpus, engine="arrow").to_table())
    assert len(table) and {"prob_t0", "prob_t1"} <= set(table.columns)


def test_a_training_with_adapters_resumes_from_its_checkpoint(world, tmp_path):
    cfg = _cfg(world, tmp_path / "resume", max_steps=20, checkpoint_every=10, validation_fraction=0.0)
    job = CellJob(cfg)
    spec = job.spec(None)
    rows = job.rows("train")
    ids, y = [job.cells.ids[i] for i in rows], job.y[rows]
    whole = train_classifier(spec, ids, y, cfg.scale, str(tmp_path / "a"), "t")
    # a second run that died after its step-10 checkpoint: the same folder without step 20
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "t" / "step-20")
    resumed = train_classifier(spec, ids, y, cfg.scale, str(tmp_path / "b"), "t")
    for (name, w), (_, v) in zip(whole.state_dict().items(), resumed.state_dict().items(), strict=True):
        torch.testing.assert_close(w, v, atol=1e-6, rtol=0, msg=name)


def test_bad_adapter_options_are_named(world, tmp_path):
    with pytest.raises(InputError, match="quantized base weights need a CUDA GPU"):
        _cfg(world, tmp_path / "q", adapter={"peft": "lora", "quantize": "4bit"})
    with pytest.raises(InputError, match="merge go with adapters"):
        _cfg(world, tmp_path / "m", adapter={"merge": True})
    with pytest.raises(InputError, match="lora_rank 0 must be >= 1"):
        _cfg(world, tmp_path / "r", adapter={"peft": "lora", "lora_rank": 0})
    with pytest.raises(InputError, match=r"lora_targets \['attention_q'\]: no such module"):
        run_finetune_cells(
            _cfg(world, tmp_path / "t", adapter={"peft": "lora", "lora_targets": ["attention_q"]})
        )
