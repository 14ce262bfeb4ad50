"""LoRA adapters (`--peft lora`) against full fine-tuning, in the same run, on real cells
(`../shared/data/pbmc_2k_celltypes.h5ad`, Geneformer V2 vocabulary):

* trainable parameters, peak resident memory of the training process (each training in its own
  process, so the peaks are its own) and training tokens/s on cells of 3/4 to all of the model's
  length, for `tiny` and `geneformer-v1` (their architectures, randomly initialised: cost only);
* for `tiny`: the cell-type test macro F1 (split by chemistry) and the dosage-sensitive TF
  labels' cross-validated ROC AUC, LoRA next to full fine-tuning.

Records (`peft`): per job and mode (full|lora) cell_macro_f1 or gene_cv_roc_auc,
trainable_parameters, peak_rss_gib, job_seconds; per preset the training steps'
trainable_parameters, peak_rss_gib and tokens_per_s, full and lora, and their ratios lora/full.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import HERE, WORK, record

sys.path.insert(0, str(HERE.parent / "tests"))
from bench_finetune import PBMC, SHARED, corpus

LORA = {"peft": "lora", "lora_rank": 8, "lora_targets": ["query", "value"]}
MEAN_POOL = "rankformer.model.heads:MeanPoolForSequenceClassification"
LABELS = SHARED / "reference" / "geneformer" / "labels" / "dosage_sens_tf_labels.csv"


def one(kind: str, mode: str, data: str, model: str, work: Path, epochs: float) -> dict[str, float]:
    """One training in this process: its scores, trainable parameters and tokens/s."""
    from rankformer.classify.cells import run_finetune_cells
    from rankformer.classify.genes import run_finetune_genes
    from rankformer.config.train import FinetuneCellsConfig, FinetuneGenesConfig

    adapter = LORA if mode == "lora" else {}
    lr = 2e-2 if mode == "lora" else 1e-3  # adapters and a fresh head train at a higher rate
    common = {
        "corpus": data,
        "model": model,
        "batch": {"max_tokens": 8192, "max_cells": 12},
        "optim": {"lr": lr},
        "adapter": adapter,
        "frozen_baseline": False,
        "track": {"tracking_uri": f"sqlite:///{work}/mlflow_{kind}_{mode}.db", "experiment": "peft"},
    }
    out = work / f"{kind}_{mode}"
    t = time.perf_counter()
    if kind == "cells":
        s = run_finetune_cells(
            FinetuneCellsConfig(
                out=str(out),
                label_column="cell_type",
                group_column="tech",
                epochs=epochs,
                head={"head_class": MEAN_POOL},  # BERT's pooler head learns little in a few steps
                **common,
            )
        )
        score = {"cell_macro_f1": s["test_macro_f1"]}
    else:
        s = run_finetune_genes(  # as bench_finetune: 500 cells, 40 steps a fold
            FinetuneGenesConfig(out=str(out), labels=[str(LABELS)], limit_cells=500, max_steps=40, **common)
        )
        score = {"gene_cv_roc_auc": s["roc_auc_mean"]}
    seconds = time.perf_counter() - t
    meta = json.loads((out / "model" / "rankformer.json").read_text())
    counts = meta.get("adapter") or _full_counts(
        out / "model", "token" if kind == "genes" else "sequence", meta
    )
    return {
        **score,
        "trainable_parameters": counts["trainable_parameters"],
        "total_parameters": counts["total_parameters"],
        "job_seconds": seconds,
    }


def _full_counts(folder: Path, kind: str, meta: dict[str, object]) -> dict[str, int]:
    from rankformer.model.loader import load_model
    from rankformer.train.classifier import classifier_class

    head = classifier_class(kind, str(meta["head_class"]) if meta.get("head_class") else None)
    n = sum(p.numel() for p in load_model(str(folder), head=head).model.parameters())
    return {"trainable_parameters": n, "total_parameters": n}


def cost(mode: str, preset: str, work: Path) -> dict[str, float]:
    """Trainable parameters, peak memory and tokens/s of fine-tuning steps of a randomly initialised
    ``preset`` on real-length cells (the training loop itself, no job around it)."""
    import numpy as np
    import torch
    from transformers import BertForMaskedLM

    from rankformer.config.train import AdapterOptions, FinetuneOptim, HeadOptions
    from rankformer.model.presets import bert_config
    from rankformer.model.presets import preset as preset_of
    from rankformer.train.adapters import with_lora
    from rankformer.train.classifier import build_classifier
    from rankformer.train.finetune import ClassifyTask, local_rows
    from rankformer.train.loop import make_optimizer
    from rankformer.vocab.gene_vocab import GeneVocab

    vocab = GeneVocab.load(str(work / "gf_v2.json"))
    folder = work / f"random_{preset}"
    if not folder.exists():
        from rankformer.model.store import save_model_dir

        torch.manual_seed(0)
        save_model_dir(
            BertForMaskedLM(bert_config(preset_of(preset), vocab)),
            vocab,
            {"task": "masked-lm", "layout": "v2", "max_length": 4096},
            str(folder),
        )
    model = build_classifier(str(folder), "sequence", 3, HeadOptions(), 0, vocab.token_layout()[1])
    if mode == "lora":
        model = with_lora(model, AdapterOptions(**LORA))
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rng = np.random.default_rng(0)
    longest = preset_of(preset).max_position_embeddings - 2  # room for <cls>, <eos>
    cells = [
        rng.integers(vocab.token_layout()[1], vocab.n_tokens, int(n))
        for n in rng.integers(longest * 3 // 4, longest, 64)
    ]
    from rankformer.config.train import BatchOptions

    task = ClassifyTask(
        local_rows(cells, rng.integers(0, 3, 64), 0),
        "sequence",
        vocab.pad_id,
        BatchOptions(max_tokens=8192, max_cells=8),
        0,
        0,
    )
    opt, _ = make_optimizer(model, FinetuneOptim(lr=1e-4, warmup_steps=0), 100)
    device = torch.device("cpu")
    tokens, t = 0, None
    for i, batch in enumerate(task.epoch_batches(0)):
        if i == 1:
            t = time.perf_counter()  # the first step warms up
        loss, stats = task.forward(model, batch, device)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 1:
            tokens += int(stats["tokens"])
    assert t is not None
    return {
        "trainable_parameters": trainable,
        "total_parameters": sum(p.numel() for p in model.parameters()),
        "tokens_per_s": tokens / (time.perf_counter() - t),
    }


def _peak_rss_gib() -> float:
    """This process's resident-memory high-water mark (VmHWM: its own, from its exec; ru_maxrss
    would carry the forking parent's)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _child(args: list[str]) -> dict[str, float]:
    """Run this script on one configuration in a fresh process; its result and its peak memory."""
    out = subprocess.run(
        [sys.executable, __file__, "--one", *args], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"benchmark child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pretrain-steps", type=int, default=300)
    p.add_argument("--epochs", type=float, default=4.0)
    p.add_argument("--one", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    work = WORK / "peft"
    if args.one:
        what = args.one
        if what[0] == "cost":
            res = cost(what[1], what[2], work)
        else:
            res = one(what[0], what[1], str(work / "pbmc_corpus"), str(work / "model"), work, args.epochs)
        res["peak_rss_gib"] = _peak_rss_gib()
        print(json.dumps(res))
        return
    import shutil

    from pretrain_helpers import pretrain_in_process

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data = corpus(work)
    pretrain_in_process(data, str(work / "model"), args.pretrain_steps, max_tokens=8192)
    conf = {"data": PBMC.name, "device": "cpu", "lora": LORA, "epochs": args.epochs}
    results: dict[tuple[str, str], dict[str, float]] = {}
    for kind in ("cells", "genes"):
        for mode in ("full", "lora"):
            results[(kind, mode)] = r = _child([kind, mode, "--epochs", str(args.epochs)])
            print(kind, mode, r, flush=True)
            c = {**conf, "preset": "tiny", "mode": mode, "job": f"finetune {kind}"}
            for metric, unit in (
                ("cell_macro_f1" if kind == "cells" else "gene_cv_roc_auc", "score"),
                ("trainable_parameters", "parameters"),
                ("peak_rss_gib", "GiB"),
                ("job_seconds", "s"),
            ):
                record("peft", metric, r[metric], unit, c)
    for preset in ("tiny", "geneformer-v1"):
        full, lora = (_child(["cost", mode, preset]) for mode in ("full", "lora"))
        print(preset, "full", full, "lora", lora, flush=True)
        c = {**conf, "preset": preset, "job": "fine-tuning steps, cells of 3/4 to all of the model's length"}
        for metric, unit in (
            ("trainable_parameters", "parameters"),
            ("peak_rss_gib", "GiB"),
            ("tokens_per_s", "tokens/s"),
        ):
            record("peft", f"{metric}_full", full[metric], unit, c)
            record("peft", f"{metric}_lora", lora[metric], unit, c)
            record("peft", f"{metric}_ratio_lora_vs_full", lora[metric] / full[metric], "x", c)


if __name__ == "__main__":
    main()
