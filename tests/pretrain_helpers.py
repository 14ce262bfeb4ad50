"""Corpora for training tests: cells of planted gene orders (rankformer.synth.ordered_cells) written
as a corpus folder without going through counts."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rankformer import schema
from rankformer.synth import gene_ids, ordered_cells

__all__ = ["ordered_cells", "write_corpus"]
from rankformer.vocab import build_vocab


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
