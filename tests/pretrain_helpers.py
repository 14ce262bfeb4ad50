"""Corpora for training tests: cells of planted gene orders (rankformer.io.synth.ordered_cells) written
as a corpus folder without going through counts."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rankformer import schema
from rankformer.io.synth import gene_ids, ordered_cells

__all__ = ["ordered_cells", "write_corpus"]
from rankformer.vocab.gene_vocab import build_vocab


def write_corpus(
    out: str,
    cells: list[np.ndarray],
    n_genes: int,
    shards: int = 2,
    layout: str = "v2",
    carry: dict[str, list[str]] | None = None,
    symbols: bool = False,
) -> str:
    """A corpus folder (shards, manifest, vocabulary) holding exactly ``cells`` (and ``carry``:
    obs columns, one value per cell); ``symbols``: the vocabulary names gene i ``G<i>``."""
    os.makedirs(out, exist_ok=True)
    ids = list(gene_ids(n_genes))
    names = {g: f"G{i}" for i, g in enumerate(ids)} if symbols else None
    vocab = build_vocab(ids, [1.0] * n_genes, gene_names=names)
    vocab_path = os.path.join(out, "..", os.path.basename(out) + "_vocab.json")
    vocab.save(vocab_path)
    bounds = np.linspace(0, len(cells), shards + 1).astype(int)
    entries, tokens = [], 0
    for s in range(shards):
        part = cells[bounds[s] : bounds[s + 1]]
        name = f"part-f00000-s{s:06d}.parquet"
        table = pa.table(
            {
                schema.INPUT_IDS: pa.array([c.tolist() for c in part], pa.list_(pa.int32())),
                schema.LENGTH: pa.array([len(c) for c in part], pa.int32()),
                schema.CELL_ID: pa.array([f"c{bounds[s] + i}" for i in range(len(part))]),
                **{k: pa.array(v[bounds[s] : bounds[s + 1]]) for k, v in (carry or {}).items()},
            }
        )
        pq.write_table(table, os.path.join(out, name))
        entries.append({"name": name, "rows": len(part)})
        tokens += sum(len(c) for c in part)
    manifest = {
        "format": "rankformer-corpus",
        "vocab_hash": vocab.content_hash,
        "config": {
            "vocab": os.path.abspath(vocab_path),
            "layout": layout,
            "max_length": 64,
            "carry": {k: k for k in carry or {}},
        },
        "shards": entries,
        "files": [],
        "totals": {"cells_out": len(cells), "tokens": tokens, "cells_in": len(cells)},
    }
    with open(os.path.join(out, schema.CORPUS_MANIFEST), "w") as f:
        json.dump(manifest, f)
    return out


def pretrain_in_process(
    corpus: str, out: str, steps: int, seed: int = 0, max_tokens: int = 2048, **model: object
) -> str:
    """A tiny model pretrained in this process on ``corpus`` and saved as a model directory."""
    from rankformer.config.train import PretrainConfig
    from rankformer.corpus.read import corpus_files, corpus_manifest
    from rankformer.model.store import save_model_dir
    from rankformer.train.local import LocalContext
    from rankformer.train.loop import run_loop
    from rankformer.train.pretrain import build_model, loop_options
    from rankformer.train.task import MaskedGeneTask, TokenSpec, arrow_cells
    from rankformer.vocab.gene_vocab import GeneVocab

    manifest = corpus_manifest(corpus)
    vocab = GeneVocab.load(manifest["config"]["vocab"])
    cfg = PretrainConfig(
        corpus=corpus,
        out=out,
        model=dict(model),
        max_steps=steps,
        seed=seed,
        log_every=steps,
        checkpoint_every=steps,
        optim={"lr": 3e-3, "warmup_steps": 20},
        batch={"max_tokens": max_tokens, "max_cells": 32, "megabatch_cells": 256},
    )
    mlm = build_model(cfg, vocab, None)
    task = MaskedGeneTask(arrow_cells(corpus_files(corpus), seed), TokenSpec.of(vocab), cfg, 0)
    run_loop(mlm, task, loop_options(cfg, {}), LocalContext(device="cpu"))
    layout, max_length = manifest["config"]["layout"], manifest["config"]["max_length"]
    meta = {"task": "masked-lm", "layout": layout, "max_length": max_length, "preset": "tiny"}
    save_model_dir(mlm.mlm, vocab, meta, out)
    return out


def pbmc_with_untrained_model(tmp: str, shared: str, vocab_path: str) -> tuple[str, str]:
    """The real PBMC cells (cell types carried as ``cell_type``) tokenized with ``vocab_path``, and
    an untrained ``tiny`` model of that vocabulary: (corpus folder, model folder)."""
    import torch
    from transformers import BertForMaskedLM

    from rankformer.config.corpus import TokenizeConfig
    from rankformer.corpus.tokenize import run_tokenize
    from rankformer.model.presets import bert_config, preset
    from rankformer.model.store import save_model_dir
    from rankformer.vocab.gene_vocab import GeneVocab

    corpus, model = os.path.join(tmp, "corpus"), os.path.join(tmp, "m")
    source = os.path.join(shared, "data", "pbmc_2k_celltypes.h5ad")
    run_tokenize(
        TokenizeConfig(inputs=[source], vocab=vocab_path, out=corpus, carry={"celltype": "cell_type"})
    )
    vocab = GeneVocab.load(vocab_path)
    torch.manual_seed(0)
    meta = {"task": "masked-lm", "layout": "v2", "max_length": 4096}
    save_model_dir(BertForMaskedLM(bert_config(preset("tiny"), vocab)), vocab, meta, model)
    return corpus, model


def train_planted(
    corpus: str, steps: int, tmp: Any, seed: int = 0, packed: bool = False
) -> list[dict[str, float]]:
    """Pretrain `tiny` on ``corpus`` in this process, through the job's own model and task
    (:func:`rankformer.train.pretrain.model_and_task`); the loop's logged history."""
    from rankformer.config.train import PretrainConfig
    from rankformer.corpus.read import corpus_files
    from rankformer.train.local import LocalContext
    from rankformer.train.loop import run_loop
    from rankformer.train.plan import plan
    from rankformer.train.pretrain import loop_options, model_and_task
    from rankformer.train.task import arrow_cells
    from rankformer.vocab.gene_vocab import GeneVocab

    cfg = PretrainConfig(
        corpus=corpus,
        out=str(tmp / "m"),
        max_steps=steps,
        seed=seed,
        log_every=20,
        checkpoint_every=steps,
        optim={"lr": 3e-3},
        batch={"max_tokens": 2048, "max_cells": 32, "megabatch_cells": 256, "packed": packed},
    )
    vocab = GeneVocab.load(plan(cfg).manifest["config"]["vocab"])
    ctx = LocalContext(str(tmp / "ckpt"), device="cpu")
    model, task = model_and_task(cfg, vocab, arrow_cells(corpus_files(corpus), cfg.seed), ctx, None)
    run_loop(model, task, loop_options(cfg, {}), ctx)
    return ctx.history
