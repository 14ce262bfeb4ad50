"""Corpora for training tests: a planted gene order that a model can learn, and its shuffle."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rankformer import schema
from rankformer.synth import gene_ids
from rankformer.vocab import build_vocab


def ordered_cells(n_cells: int, n_genes: int, n_types: int, length: int, seed: int) -> list[np.ndarray]:
    """Each type has its own ranked gene list; a cell is its type's list with a few adjacent swaps."""
    rng = np.random.default_rng(seed)
    orders = [rng.choice(n_genes, length, replace=False) + 4 for _ in range(n_types)]
    cells = []
    for _ in range(n_cells):
        cell = orders[rng.integers(n_types)].copy()
        for i in rng.integers(0, length - 1, size=max(1, length // 10)):
            cell[i], cell[i + 1] = cell[i + 1], cell[i]
        cells.append(
            np.concatenate([[2], cell[: rng.integers(length // 2, length + 1)], [3]]).astype(np.int32)
        )
    return cells


def write_corpus(out: str, cells: list[np.ndarray], n_genes: int, shards: int = 2, layout: str = "v2") -> str:
    """A corpus folder (shards, manifest, vocabulary) holding exactly ``cells``."""
    os.makedirs(out, exist_ok=True)
    vocab = build_vocab(list(gene_ids(n_genes)), [1.0] * n_genes)
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
            }
        )
        pq.write_table(table, os.path.join(out, name))
        entries.append({"name": name, "rows": len(part)})
        tokens += sum(len(c) for c in part)
    manifest = {
        "format": "rankformer-corpus",
        "vocab_hash": vocab.content_hash,
        "config": {"vocab": os.path.abspath(vocab_path), "layout": layout, "max_length": 64},
        "shards": entries,
        "files": [],
        "totals": {"cells_out": len(cells), "tokens": tokens, "cells_in": len(cells)},
    }
    with open(os.path.join(out, schema.CORPUS_MANIFEST), "w") as f:
        json.dump(manifest, f)
    return out
