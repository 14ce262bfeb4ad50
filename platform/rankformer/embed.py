"""`rankformer embed`: cell and gene embeddings of a corpus under a model, on Ray Data.

Cell level: each cell's vector is the mean of a layer's states over its gene tokens (special and
pad tokens excluded) or, for v2-layout models, the ``<cls>`` state (``--pooling cls``). Gene level:
each gene's states averaged over all its occurrences in the selected cells, with the count.
``--layer``: ``penultimate`` (the default, as Geneformer), ``last``, or an index into Hugging Face
``hidden_states`` (0 = the embedding output).

The work unit is a corpus shard: a pool of Ray actors (one model each; a GPU each when asked) takes
shards, batches their cells by length, and writes one output shard each, atomically (gene level: a
Parquet file of per-gene partial sums per shard, and with the exact median every occurrence's state,
sorted by gene, which the merge reads a group of genes and dimensions at a time). A rerun skips the
shards already written; the manifest comes last.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rankformer import schema
from rankformer.classify.data import seeded_sample, split_by_shard, token_lists
from rankformer.errors import InputError
from rankformer.infer_config import EmbedConfig, pick_layer
from rankformer.io import fs

SHARD_STEM = "part-"
OCC_STEM = "occurrences-"  # gene level with the exact median: every occurrence's state, per shard


class Embedder:
    """One model, loaded once; embeds one corpus shard per call."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import torch
        from transformers import BertModel
        from transformers.utils import logging as hf_logging

        from rankformer.infer import up_to
        from rankformer.loader import load_model
        from rankformer.model.store import max_length_of

        self.spec = spec
        os.environ["HF_HUB_OFFLINE"] = "1"
        hf_logging.set_verbosity_error()  # a masked-LM folder read as BertModel: its head is left out
        loaded = load_model(spec["model"], head=BertModel, tracking_uri=spec["tracking_uri"])
        self.device = torch.device("cuda" if spec["use_gpu"] and torch.cuda.is_available() else "cpu")
        model: Any = loaded.model
        self.model = model.to(self.device).eval()
        precision = spec.get("precision", "float32")
        if precision != "float32":  # states come back as float32 for pooling and cosines
            from rankformer.infer import PRECISIONS

            self.model = self.model.to(PRECISIONS[precision])
        self.pad = int(loaded.vocab.specials[schema.PAD])
        self.gene_lo = int(loaded.vocab.token_ids.min())
        self.vocab = loaded.vocab
        self.meta = loaded.meta
        self.max_length = max_length_of(loaded.meta, loaded.model.config)
        self.cls = loaded.vocab.specials.get(schema.CLS)
        self.eos = loaded.vocab.specials.get(schema.EOS)
        self.gene_of = dict(zip(loaded.vocab.token_ids.tolist(), loaded.vocab.gene_ids, strict=True))
        self.layer = pick_layer(spec["layer"], int(self.model.config.num_hidden_layers))
        self.model = up_to(self.model, self.layer)

    def embed(self, cells: list[np.ndarray]) -> tuple[np.ndarray, Any]:
        """(cell vectors in input order, GeneSums over all occurrences)."""
        from rankformer.infer import GeneSums, batches, hidden_states, mean_pool

        dim = int(self.model.config.hidden_size)
        genes = GeneSums(int(self.model.config.vocab_size), dim) if self.spec["level"] == "gene" else None
        vecs = np.zeros((len(cells), dim), dtype=np.float32)
        self.occurrences: list[tuple[np.ndarray, np.ndarray]] = []  # (tokens, states) for medians
        for b in batches(cells, self.pad, self.spec["max_tokens"]):
            # pooled on the device: a cell's vector comes back, not its states
            h = hidden_states(self.model, b, self.layer, self.device)
            keep = b.ids >= self.gene_lo
            if genes is not None:
                states = h[keep.to(h.device)].cpu()  # the gene tokens' states, in ids[keep] order
                genes.add_flat(b.ids[keep], states)
                if self.spec.get("gene_stat") == "median":
                    self.occurrences.append((b.ids[keep].numpy(), states.numpy()))
            elif self.spec["pooling"] == "cls":
                vecs[b.index] = h[:, 0].cpu().numpy()
            else:
                vecs[b.index] = mean_pool(h, keep.to(h.device)).cpu().numpy()
        return vecs, genes

    def __call__(self, task: dict[str, Any]) -> bytes:
        spec = self.spec
        table = _read_shard(task["uri"], spec["columns"], spec["where"], task.get("rows"))
        cells = token_lists(table)
        vecs, genes = self.embed(cells)
        target = fs.join(spec["out"], task["name"])
        if genes is not None:
            if spec.get("gene_stat") == "median":  # before the partial sums: they mark the shard done
                occ = _occurrences(self.occurrences, int(self.model.config.hidden_size))
                _write_parquet(fs.join(spec["out"], OCC_STEM + task["name"]), occ, row_group_size=1 << 16)
            seen = genes.seen()
            sums = genes.sums[seen].numpy()
            part = pa.table(
                {
                    "token": pa.array(seen, pa.int32()),
                    "n": pa.array(genes.counts[seen].numpy(), pa.int64()),
                    "sum": vectors(sums, pa.float64()),
                }
            )
            _write_parquet(target, part)
            return pickle.dumps({"name": task["name"], "cells": len(cells)})
        out = table.drop_columns([schema.INPUT_IDS]).append_column("embedding", vectors(vecs))
        _write_parquet(target, out)
        return pickle.dumps({"name": task["name"], "cells": len(cells)})


def vectors(rows: np.ndarray, kind: pa.DataType | None = None) -> pa.FixedSizeListArray:
    """A (n, dim) array as a ``fixed_size_list<float32>`` column (or of ``kind``)."""
    flat = pa.array(rows.reshape(-1), kind or pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, rows.shape[1])


def rows_of(column: pa.ChunkedArray) -> np.ndarray:
    """A ``fixed_size_list`` column as an (n, dim) array: the inverse of :func:`vectors`."""
    flat = column.combine_chunks().flatten()  # flatten(), not .values: it honours a slice's offset
    return flat.to_numpy(zero_copy_only=False).reshape(len(column), -1)


def _write_parquet(uri: str, table: pa.Table, row_group_size: int | None = None) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=row_group_size)
    fs.write_bytes_atomic(uri, buf.getvalue())


def _occurrences(chunks: list[tuple[np.ndarray, np.ndarray]], dim: int) -> pa.Table:
    """Every (token, state) of a shard, sorted by token, one float32 column per dimension (the
    median merge reads a few dimensions of a few genes at a time; row groups let it skip the rest).
    A shard with no selected cell still gets every column."""
    tokens = np.concatenate([t for t, _ in chunks]) if chunks else np.zeros(0, np.int64)
    states = np.concatenate([s for _, s in chunks]) if chunks else np.zeros((0, dim), np.float32)
    order = np.argsort(tokens, kind="stable")
    cols = {"token": pa.array(tokens[order], pa.int32())}
    cols |= {f"d{j}": pa.array(states[order, j], pa.float32()) for j in range(dim)}
    return pa.table(cols)


def _read_shard(
    uri: str, columns: list[str], where: dict[str, list[str]], rows: list[int] | None = None
) -> pa.Table:
    """The selected cells of one shard (``rows``: only these, counted among the selected)."""
    with fs.open_input(uri) as f:
        table = pq.read_table(f, columns=columns)
    for col, values in where.items():
        table = table.filter(pc.is_in(table.column(col).cast(pa.string()), pa.array(values)))
    return table if rows is None else table.take(pa.array(rows, pa.int64()))


def _selected_in(uri: str, where: dict[str, list[str]]) -> int:
    if not where:
        with fs.open_input(uri) as f:
            return int(pq.read_metadata(f).num_rows)
    return _read_shard(uri, list(where), where).num_rows


def sample_rows(
    files: list[str], where: dict[str, list[str]], limit: int | None, seed: int
) -> tuple[list[list[int] | None], int]:
    """Per shard, the rows (among its selected cells) of a seeded sample of ``limit`` of the
    corpus's selected cells, None for all; and how many cells were selected. The sample is the
    one ``predict --limit-cells`` draws with the same seed: the same rule over the same cells in
    manifest order. Only the shards' footers (or their ``where`` columns) are read, in threads."""
    from concurrent.futures import ThreadPoolExecutor

    if limit is None:
        return [None] * len(files), -1
    with ThreadPoolExecutor(16) as pool:
        counts = np.asarray(list(pool.map(lambda f: _selected_in(f, where), files)), dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        cond = " and ".join(f"{k} in {v}" for k, v in where.items())
        raise InputError(f"no cell of the corpus matches {cond}; check the values")
    if limit >= total:
        return [None] * len(files), total
    return list(split_by_shard(seeded_sample(total, limit, seed), counts.tolist())), total


def _make_embedder(spec: dict[str, Any]) -> Callable[[dict[str, Any]], bytes]:
    return Embedder(spec)


def shard_tasks(out: str, files: list[str], sample: list[Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """The output shard names (one per corpus shard, in order) and the tasks of those that a
    finished earlier run has not already written (``sample``: each shard's rows, or None)."""
    done = set(fs.listdir(out))
    names = [f"{SHARD_STEM}{i:06d}.parquet" for i in range(len(files))]
    tasks = [
        {"uri": f, "name": n, "rows": rows}
        for f, n, rows in zip(files, names, sample, strict=True)
        if n not in done
    ]
    return names, tasks


def sample_note(limit_cells: int | None, selected: int, seed: int) -> dict[str, Any]:
    """The summary's note of a ``--limit-cells`` sample (nothing without one)."""
    if limit_cells is None:
        return {}
    return {"sample": {"cells": min(limit_cells, selected), "of_selected": selected, "seed": seed}}


# what embeddings depend on (not where or how widely they are computed)
_EMBED_WHAT = (
    "model",
    "corpus",
    "level",
    "pooling",
    "layer",
    "cells_where",
    "limit_cells",
    "seed",
    "gene_stat",
    "precision",
)


def _embed_spec(cfg: EmbedConfig, uri: str, info: Any) -> dict[str, Any]:
    """What every actor needs, after the checks of the options against the model and corpus."""
    from rankformer.classify.data import check_columns, corpus_columns, parse_where

    if cfg.pooling == "cls" and (info.layout != "v2" or schema.CLS not in info.vocab.specials):
        raise InputError(f"--pooling cls needs a v2-layout model (<cls> first); {cfg.model} is {info.layout}")
    where = parse_where(cfg.cells_where)
    names = corpus_columns(cfg.corpus)
    check_columns(cfg.corpus, names, list(where), "--cells-where")
    if cfg.plot_column:
        check_columns(cfg.corpus, names, [cfg.plot_column], "--plot-column")
    return {
        "model": cfg.model,
        "tracking_uri": uri,
        "use_gpu": cfg.use_gpu,
        "precision": cfg.precision,
        "layer": cfg.layer,
        "level": cfg.level,
        "pooling": cfg.pooling,
        "max_tokens": cfg.max_tokens,
        "gene_stat": cfg.gene_stat,
        "columns": [c for c in names if c != schema.LENGTH],
        "where": where,
        "out": cfg.out,
    }


def run_embed(cfg: EmbedConfig) -> dict[str, Any]:
    from rankformer import tracking
    from rankformer.classify.common import JobOutput, check_model_and_corpus
    from rankformer.cluster import map_shards_actors
    from rankformer.config import ClusterOptions
    from rankformer.corpus.tokenize import corpus_files

    uri = tracking.resolve_uri(cfg.tracking_uri)
    info, manifest = check_model_and_corpus(cfg.model, cfg.corpus, uri, cfg.layer)
    spec = _embed_spec(cfg, uri, info)
    what = {k: v for k, v in asdict(cfg).items() if k in _EMBED_WHAT}
    out = JobOutput(cfg.out, f"embed-{cfg.level}", what, keep_on_change=False)
    files = corpus_files(cfg.corpus, vocab_hash=manifest["vocab_hash"])
    sample, selected = sample_rows(files, spec["where"], cfg.limit_cells, cfg.seed)
    shards, pending = shard_tasks(cfg.out, files, sample)
    opts = ClusterOptions(ray_address=cfg.ray_address, in_process=cfg.in_process)
    make = functools.partial(_make_embedder, spec)
    for _ in map_shards_actors(pending, make, opts, cfg.num_workers, 1.0 if cfg.use_gpu else 0.0):
        pass  # each actor wrote its shard
    summary: dict[str, Any] = {
        "model": cfg.model,
        "vocab_hash": info.vocab.content_hash,
        "layout": info.layout,
        "level": cfg.level,
        "layer": cfg.layer,
        "pooling": cfg.pooling if cfg.level == "cell" else f"{cfg.gene_stat} over occurrences",
        "dim": int(info.config.hidden_size),
        "shards": shards,
        "shards_done_before": len(shards) - len(pending),
        **sample_note(cfg.limit_cells, selected, cfg.seed),
    }
    if cfg.level == "gene":
        table = _merge_genes(cfg.out, shards, info.vocab, median=cfg.gene_stat == "median")
        _write_genes(out, table)
        summary["genes"] = table.num_rows
    else:
        out.files += shards
        if cfg.plot_column:
            summary["umap_cells"] = _plots(cfg, out, shards)
    if cfg.experiment:
        _track(cfg, uri, out.stage, summary)
    out.finish(summary)
    done_what = (
        f"{summary.get('genes', 0):,} genes" if cfg.level == "gene" else f"cells of {len(shards)} shards"
    )
    print(f"embedded {done_what} ({summary['shards_done_before']} shards already done) -> {cfg.out}")
    return summary


def _track(cfg: EmbedConfig, uri: str, stage: str, summary: dict[str, Any]) -> None:
    """An MLflow run of the job: its summary as params, its plots as artifacts."""
    from rankformer import tracking

    run = tracking.start_run(uri, cfg.experiment or "", f"embed-{cfg.level}", {"job": "embed"})
    tracking.log_params(uri, run, {k: v for k, v in summary.items() if k != "shards"})
    for name in ("umap.png", "class_means.png"):
        if os.path.exists(os.path.join(stage, name)):
            tracking.log_file(uri, run, os.path.join(stage, name), "plots")
    tracking.end_run(uri, run)


MEDIAN_BUDGET_FLOATS = 1 << 27  # values the median merge holds at once (512 MB of float32)


def _merge_genes(out: str, shards: list[str], vocab: Any, median: bool = False) -> pa.Table:
    """Per-gene mean (or exact median, per dimension) over every occurrence in every shard."""
    sums = counts = None
    for s in shards:
        with fs.open_input(fs.join(out, s)) as f:
            part = pq.read_table(f)
        tokens = part.column("token").to_numpy().astype(np.int64)
        if sums is None:
            dim = part.schema.field("sum").type.list_size
            sums, counts = np.zeros((vocab.n_tokens, dim)), np.zeros(vocab.n_tokens, np.int64)
        assert counts is not None
        if len(tokens):
            sums[tokens] += rows_of(part.column("sum"))
            counts[tokens] += part.column("n").to_numpy()
    assert sums is not None and counts is not None
    gene_of = dict(zip(vocab.token_ids.tolist(), vocab.gene_ids, strict=True))
    tokens = np.asarray([t for t in np.flatnonzero(counts) if t in gene_of], dtype=np.int64)
    if median:
        values = _medians(out, [OCC_STEM + s for s in shards], tokens, counts, sums.shape[1])
    else:
        values = sums[tokens] / counts[tokens, None]
    values = values.astype(np.float32)
    ids = [gene_of[t] for t in tokens.tolist()]
    return pa.table(
        {
            "gene_id": ids,
            "symbol": [vocab.gene_names.get(g, "") for g in ids],
            "n_occurrences": pa.array(counts[tokens], pa.int64()),
            "embedding": vectors(values),
        }
    )


def _medians(out: str, names: list[str], tokens: np.ndarray, counts: np.ndarray, dim: int) -> np.ndarray:
    """Exact per-dimension medians of each token's occurrences, holding at most about
    MEDIAN_BUDGET_FLOATS values: tokens go in groups whose occurrences fit, and each group in
    blocks of dimensions (a gene that occurs in every cell needs one float per cell per dimension)."""
    result = np.zeros((len(tokens), dim))
    start = 0
    while start < len(tokens):
        stop, held = start + 1, int(counts[tokens[start]])
        while stop < len(tokens) and held + counts[tokens[stop]] <= MEDIAN_BUDGET_FLOATS // dim:
            held += int(counts[tokens[stop]])
            stop += 1
        group = tokens[start:stop]
        block = int(np.clip(MEDIAN_BUDGET_FLOATS // max(held, 1), 1, dim))
        for d0 in range(0, dim, block):
            cols = [f"d{j}" for j in range(d0, min(d0 + block, dim))]
            token_n, vals = _read_occurrences(out, names, int(group[0]), int(group[-1]), cols)
            order = np.argsort(token_n, kind="stable")
            token_n, vals = token_n[order], vals[order]
            bounds = np.searchsorted(token_n, [*group.tolist(), int(group[-1]) + 1])
            for i in range(len(group)):
                result[start + i, d0 : d0 + len(cols)] = np.median(vals[bounds[i] : bounds[i + 1]], axis=0)
        start = stop
    return result


def _read_occurrences(
    out: str, names: list[str], lo: int, hi: int, cols: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and the given dimensions of every occurrence of tokens lo..hi, over all shards."""
    tokens, vals = [], []
    for name in names:
        with fs.open_input(fs.join(out, name)) as f:
            t = pq.read_table(f, columns=["token", *cols], filters=[("token", ">=", lo), ("token", "<=", hi)])
        tokens.append(t.column("token").to_numpy())
        vals.append(np.stack([t.column(c).to_numpy() for c in cols], axis=1))
    return np.concatenate(tokens), np.concatenate(vals)


def _write_genes(out: Any, table: pa.Table) -> None:
    pq.write_table(table, out.path("genes.parquet"))
    out.publish("genes.parquet")


def read_embeddings(out: str) -> pa.Table:
    """All cell-level shards of a finished embed output, in corpus order."""
    from rankformer.classify.common import finished_output

    manifest = finished_output(out, "embed-cell", "embed-gene")
    if manifest.get("level") == "gene":
        with fs.open_input(fs.join(out, "genes.parquet")) as f:
            return pq.read_table(f)
    return _cell_shards(out, manifest["shards"])


def _cell_shards(out: str, names: list[str]) -> pa.Table:
    tables = []
    for name in names:
        with fs.open_input(fs.join(out, name)) as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables)


UMAP_CELLS = 20_000  # cells the UMAP is fitted on at most: a seeded sample (class means use every cell)


def _plot_data(cfg: EmbedConfig, names: list[str]) -> tuple[np.ndarray, np.ndarray, pd.DataFrame, int]:
    """Streamed over the output shards, two columns at a time: the UMAP sample's vectors and labels,
    every class's mean vector and cell count, and the number of cells."""
    col = cfg.plot_column or ""
    paths = [fs.join(cfg.out, name) for name in names]
    sizes = []
    for path in paths:
        with fs.open_input(path) as f:
            sizes.append(pq.ParquetFile(f).metadata.num_rows)
    total = sum(sizes)
    pick = np.sort(np.random.default_rng(0).choice(total, min(total, UMAP_CELLS), replace=False))
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    xs, ls = [], []
    start = 0
    for path, size in zip(paths, sizes, strict=True):
        with fs.open_input(path) as f:
            t = pq.read_table(f, columns=[col, "embedding"])
        x = rows_of(t.column("embedding"))
        labels = np.asarray([str(v) for v in t.column(col).to_pylist()])
        for c in np.unique(labels):
            m = labels == c
            sums[c] = sums.get(c, 0.0) + x[m].sum(0, dtype=np.float64)
            counts[c] = counts.get(c, 0) + int(m.sum())
        here = pick[(pick >= start) & (pick < start + size)] - start
        xs.append(x[here])
        ls.append(labels[here])
        start += size
    classes = sorted(sums)
    vecs = np.stack([sums[c] / counts[c] for c in classes]).astype(np.float32)
    means = pd.DataFrame(vecs, columns=[f"d{i}" for i in range(vecs.shape[1])])
    means.insert(0, "n_cells", [counts[c] for c in classes])
    means.insert(0, col, classes)
    return np.concatenate(xs), np.concatenate(ls), means, total


def _plots(cfg: EmbedConfig, out: Any, names: list[str]) -> int:
    """UMAP of (a seeded sample of at most UMAP_CELLS) cell embeddings coloured by ``plot_column``;
    heatmap of every class's mean over all cells, also written as class_means.parquet/.csv. Returns
    the UMAP's cell count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, labels, means, total = _plot_data(cfg, names)
    classes = means[cfg.plot_column].tolist()
    if len(x) >= 10:
        import umap

        xy = umap.UMAP(n_neighbors=min(15, len(x) - 1), random_state=0).fit_transform(x)
        fig, ax = plt.subplots(figsize=(5.5, 4.5))
        for c in classes:
            m = labels == c
            ax.scatter(xy[m, 0], xy[m, 1], s=4, label=c)
        sample = f", {len(x):,} of {total:,} cells" if len(x) < total else ""
        ax.set(title=f"UMAP of cell embeddings ({cfg.layer} layer{sample})", xticks=[], yticks=[])
        ax.legend(fontsize=7, markerscale=3, loc="best")
        fig.tight_layout()
        fig.savefig(out.path("umap.png"), dpi=120)
        plt.close(fig)
        out.publish("umap.png")
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(classes) + 1.5))
    ax.imshow(means.iloc[:, 2:].to_numpy(), aspect="auto", cmap="RdBu_r")
    ax.set_yticks(range(len(classes)), classes, fontsize=8)
    ax.set(xlabel="embedding dimension", title=f"mean embedding per {cfg.plot_column}")
    fig.tight_layout()
    fig.savefig(out.path("class_means.png"), dpi=120)
    plt.close(fig)
    out.publish("class_means.png")
    out.write_table("class_means", means)
    return len(x) if len(x) >= 10 else 0
