"""Why a cell ranks as it does (`rankformer corpus show`) and what a corpus holds (`corpus stats`).

`show` goes back to the input row a corpus row came from and recomputes every step of the rank
value encoding for it (raw count, count / n_counts * 10,000, the gene's median, the ranking value),
with the same reader, gene mapping and arithmetic as the tokenizer; the order it prints is checked
against the stored tokens.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.compute as pc

from rankformer import schema
from rankformer.config.corpus import ReadOptions
from rankformer.corpus.cells import cell_totals, column_tokens
from rankformer.corpus.kernels import ranking_values
from rankformer.errors import InputError
from rankformer.io import fs
from rankformer.io.sources import open_source
from rankformer.vocab.gene_vocab import GeneVocab


def _corpus(out: str) -> tuple[dict[str, Any], Any]:
    from rankformer.corpus.read import corpus_manifest, read_corpus

    return corpus_manifest(out), read_corpus(out, engine="arrow")


def find_row(out: str, cell: str | None = None, row: int | None = None) -> dict[str, Any]:
    """One corpus row by cell id (the first, if several files share it) or by position."""
    if (cell is None) == (row is None):
        raise InputError("give exactly one of --cell CELL_ID or --row N")
    _, data = _corpus(out)
    if row is not None:
        n = data.count_rows()
        if not 0 <= row < n:
            raise InputError(f"--row {row} is outside the corpus (0..{n - 1})")
        return dict(data.to_table().slice(row, 1).to_pylist()[0])
    found = data.to_table(filter=pc.field(schema.CELL_ID) == cell)
    if found.num_rows == 0:
        raise InputError(f"no cell {cell!r} in corpus {out}; `rankformer corpus stats` shows its size")
    return dict(found.slice(0, 1).to_pylist()[0])


def source_path(recorded: str, manifest: dict[str, Any]) -> str:
    """The cell's input file: as recorded, or a relative path under the directory tokenize ran in."""
    if fs.is_remote(recorded) or os.path.isabs(recorded) or fs.exists(recorded):
        return recorded
    base = manifest.get("working_dir")
    if base and fs.exists(os.path.join(base, recorded)):
        return os.path.join(base, recorded)
    raise InputError(
        f"input {recorded} not found: the corpus names it relative to the directory tokenize ran in "
        f"({base or 'not recorded by this older corpus'}); run `corpus show` from there, or put the "
        "file back at that path"
    )


def explain_cell(out: str, cell: str | None = None, row: int | None = None) -> pd.DataFrame:
    """Every expressed vocabulary gene of the cell in rank order, with how its value came about."""
    from rankformer.corpus.read import corpus_vocab

    manifest, _ = _corpus(out)
    cfg = manifest["config"]
    rec = find_row(out, cell, row)
    vocab = corpus_vocab(out, manifest)
    read = ReadOptions(**cfg["read"])
    r = int(rec[schema.SOURCE_ROW])
    with open_source(source_path(rec[schema.SOURCE_FILE], manifest), read.gene_id_column, read.counts) as src:
        x = src.read_counts(r, r + 1)
        n = cell_totals(src, r, r + 1, x)[0]
        col_token = column_tokens(vocab, list(src.gene_ids), read)
        arithmetic = src.arithmetic
    x.sum_duplicates()
    keep = (col_token[x.indices] >= 0) & (x.data != 0)
    tokens, raw = col_token[x.indices[keep]], x.data[keep]
    # several input columns of one gene are summed, as the kernel does
    uniq, inv = np.unique(tokens, return_inverse=True)
    summed = np.zeros(len(uniq), dtype=raw.dtype)
    np.add.at(summed, inv, raw)
    median = vocab.median_by_token()[uniq]
    value = ranking_values(summed, n, median, arithmetic)
    order = np.lexsort((uniq, -value))
    ids = vocab.gene_id_by_token[uniq[order]].tolist()
    table = pd.DataFrame(
        {
            "rank": np.arange(1, len(order) + 1),
            "token": uniq[order],
            "gene_id": ids,
            "symbol": [vocab.gene_names.get(g, "") for g in ids],
            "raw_count": summed[order],
            "per_10k": np.asarray(ranking_values(summed, n, np.ones(len(uniq)), arithmetic))[order],
            "median": median[order],
            "ranking_value": value[order],
        }
    )
    table.attrs.update(_placement(rec, cfg, table, vocab, n, arithmetic))
    return table


def _placement(
    rec: dict[str, Any], cfg: dict[str, Any], table: pd.DataFrame, vocab: GeneVocab, n: Any, arith: str
) -> dict[str, Any]:
    """Where the layout's specials and the truncation fall; checks the recomputed order."""
    stored = list(rec[schema.INPUT_IDS])
    v2 = cfg["layout"] == "v2"
    genes = stored[1:-1] if v2 else stored
    max_genes = int(cfg["max_length"]) - (2 if v2 else 0)
    if [int(t) for t in table["token"][: len(genes)]] != genes:
        raise InputError(
            "the input file changed since this corpus was made (recomputed ranks differ from the "
            "stored tokens); re-tokenize it"
        )
    return {
        "cell_id": rec[schema.CELL_ID],
        "source": f"{rec[schema.SOURCE_FILE]} row {rec[schema.SOURCE_ROW]}",
        "n_counts": float(n),
        "arithmetic": arith,
        "layout": cfg["layout"],
        "length": len(stored),
        "kept": len(genes),
        "truncated": max(0, len(table) - max_genes),
        "specials": "<cls> at position 0, <eos> last" if v2 else "none (v1)",
    }


def format_explanation(table: pd.DataFrame, limit: int) -> str:
    a = table.attrs
    lines = [
        f"cell {a['cell_id']} ({a['source']}): n_counts {a['n_counts']:g}, layout {a['layout']} "
        f"({a['specials']}), {a['length']} tokens, arithmetic {a['arithmetic']}",
        "ranking value = raw_count / n_counts * 10,000 / median; highest first, ties by token id",
    ]
    shown = table.head(limit).copy()
    body = shown.to_string(index=False, float_format=lambda v: f"{v:.6g}")
    lines.append(body)
    if len(table) > limit:
        lines.append(f"... {len(table) - limit} more genes (use --limit or --csv for all)")
    if a["truncated"]:
        lines.append(
            f"truncation: genes ranked below {a['kept']} are cut ({a['truncated']} genes) by max_length"
        )
    else:
        lines.append(f"no truncation: all {a['kept']} expressed vocabulary genes are in the sequence")
    return "\n".join(lines)


def corpus_stats(out: str, plot: str | None = None) -> dict[str, Any]:
    """Cells, tokens, length distribution, drops, vocabulary and config; a length histogram PNG."""
    manifest, data = _corpus(out)
    lengths = data.to_table(columns=[schema.LENGTH])[schema.LENGTH].to_numpy()
    q = np.percentile(lengths, [0, 5, 25, 50, 75, 95, 100]) if len(lengths) else np.zeros(7)
    cfg = manifest["config"]
    stats = {
        "corpus": out,
        "cells": len(lengths),
        "tokens": int(lengths.sum()),
        "length": dict(zip(["min", "p5", "p25", "median", "p75", "p95", "max"], q.tolist(), strict=True))
        | {"mean": float(lengths.mean()) if len(lengths) else 0.0},
        "at_max_length": int((lengths >= int(cfg["max_length"])).sum()),
        "dropped": {
            f["uri"]: {"no_vocabulary_gene": f["dropped_no_genes"], "filter_pass": f["dropped_filter"]}
            for f in manifest["files"]
        },
        "cells_in": manifest["totals"]["cells_in"],
        "vocab": {
            "path": cfg["vocab"],  # as given to `tokenize`
            "hash": manifest["vocab_hash"],
            "kept": fs.exists(fs.join(out, schema.CORPUS_VOCAB)),  # its copy in the corpus folder
        },
        "config": {k: cfg[k] for k in ("layout", "max_length", "carry")} | {"read": cfg["read"]},
        "shards": len(manifest["shards"]),
    }
    if plot:
        stats["plot"] = _histogram(lengths, plot, int(cfg["max_length"]))
    return stats


def _histogram(lengths: np.ndarray, path: str, max_length: int) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(lengths, bins=min(80, max(10, len(np.unique(lengths)))), color="#3b6ea5")
    ax.axvline(max_length, color="#b33", linestyle="--", label=f"max_length {max_length}")
    ax.set_xlabel("tokens per cell")
    ax.set_ylabel("cells")
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
