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
import os
import pickle
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rankformer import schema
from rankformer.config.infer import ActorPoolJob, EmbedConfig, pick_layer
from rankformer.config.types import GeneStat, Level, Pooling
from rankformer.embed.columns import OCC_STEM, vectors
from rankformer.errors import InputError
from rankformer.io import fs
from rankformer.job.actors import ModelSpec, ShardIO, shared_encoder
from rankformer.job.cells import token_lists
from rankformer.job.shards import read_shard, sample_note, sample_rows, shard_tasks, write_parquet
from rankformer.words import counted

if TYPE_CHECKING:
    from rankformer.embed.genes import OccurrenceSpill


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


@dataclass(frozen=True)
class EmbedSpec:
    """What an embedding actor computes: the model's layer, pooled per cell or summed per gene."""

    model: ModelSpec
    io: ShardIO | None = None  # None: cells given per call (the in-memory API, the endpoints)
    level: Level = "cell"
    pooling: Pooling = "mean"
    gene_stat: GeneStat = "mean"

    def shard_io(self) -> ShardIO:
        if self.io is None:
            raise RuntimeError("this embedder takes cells per call, not corpus shards")  # a caller's bug
        return self.io


def model_spec(cfg: ActorPoolJob, tracking_uri: str) -> ModelSpec:
    """The model an actor pool job's actors load."""
    return ModelSpec(cfg.model, tracking_uri, cfg.use_gpu, cfg.precision, cfg.layer, cfg.max_tokens)


def _embed_spec(cfg: EmbedConfig, uri: str, info: Any) -> EmbedSpec:
    """What every actor needs, after the checks of the options against the model and corpus."""
    from rankformer.job.cells import check_columns, corpus_columns, parse_where

    if cfg.pooling == "cls" and (info.layout != "v2" or schema.CLS not in info.vocab.specials):
        raise InputError(f"--pooling cls needs a v2-layout model (<cls> first); {cfg.model} is {info.layout}")
    where = parse_where(cfg.cells_where)
    names = corpus_columns(cfg.corpus)
    check_columns(cfg.corpus, names, list(where), "--cells-where")
    if cfg.plot_column:
        check_columns(cfg.corpus, names, [cfg.plot_column], "--plot-column")
    return EmbedSpec(
        model_spec(cfg, uri),
        ShardIO([c for c in names if c != schema.LENGTH], where, cfg.out),
        cfg.level,
        cfg.pooling,
        cfg.gene_stat,
    )


def run_embed(cfg: EmbedConfig) -> dict[str, Any]:
    from rankformer import tracking
    from rankformer.cluster import map_shards_actors
    from rankformer.config.corpus import ClusterOptions
    from rankformer.corpus.read import corpus_files
    from rankformer.job.door import check_model_and_corpus
    from rankformer.job.output import JobOutput

    uri = tracking.resolve_uri(cfg.tracking_uri)
    info, manifest = check_model_and_corpus(cfg.model, cfg.corpus, uri, cfg.layer)
    spec = _embed_spec(cfg, uri, info)
    what = {k: v for k, v in asdict(cfg).items() if k in _EMBED_WHAT}
    files = corpus_files(cfg.corpus, vocab_hash=manifest["vocab_hash"])
    sample, selected = sample_rows(files, spec.shard_io().where, cfg.limit_cells, cfg.seed)
    out = JobOutput(cfg.out, f"embed-{cfg.level}", what, keep_on_change=False)
    shards, pending = shard_tasks(cfg.out, files, sample)
    opts = ClusterOptions(ray_address=cfg.ray_address, in_process=cfg.in_process)
    make = functools.partial(make_embedder, spec)
    cells = sum(  # each actor wrote its shard and says how many cells it held
        int(pickle.loads(p)["cells"])
        for p in map_shards_actors(pending, make, opts, cfg.num_workers, 1.0 if cfg.use_gpu else 0.0)
    )
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
        "cells_this_run": cells,
        **sample_note(cfg.limit_cells, selected, cfg.seed),
    }
    if cfg.level == "gene":
        from rankformer.embed.genes import merge_genes, write_genes

        table = merge_genes(cfg.out, shards, info.vocab, median=cfg.gene_stat == "median")
        write_genes(out, table)
        summary["genes"] = table.num_rows
    else:
        out.files += shards
        if cfg.plot_column:
            from rankformer.embed.plots import plots

            summary["umap_cells"] = plots(cfg, out, shards)
    if cfg.experiment:
        _track(cfg, uri, out.stage, summary)
    out.finish(summary)
    genes = f", {summary['genes']:,} genes in all" if cfg.level == "gene" else ""
    print(
        f"embedded {cells:,} cells in {counted(len(pending), 'shard')} ({summary['shards_done_before']} of "
        f"{len(shards)} done before){genes} -> {cfg.out}"
    )
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


def read_embeddings(out: str) -> pa.Table:
    """All cell-level shards of a finished embed output, in corpus order."""
    from rankformer.job.output import finished_output

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


class Embedder:
    """One model, loaded once; embeds one corpus shard per call."""

    def __init__(self, spec: EmbedSpec) -> None:
        from rankformer.model.device import device_token_budget, pick_device
        from rankformer.model.forward import up_to
        from rankformer.model.store import max_length_of

        self.spec = spec
        self.device = pick_device(spec.model.use_gpu)
        loaded, self.model = shared_encoder(spec.model, self.device)
        self.pad, self.gene_lo = loaded.vocab.token_layout()
        self.vocab = loaded.vocab
        self.meta = loaded.meta
        self.max_length = max_length_of(loaded.meta, loaded.model.config)
        self.max_tokens = device_token_budget(spec.model.max_tokens, self.model, self.device, self.max_length)
        self.cls = loaded.vocab.specials.get(schema.CLS)
        self.eos = loaded.vocab.specials.get(schema.EOS)
        self.layer = pick_layer(spec.model.layer, int(self.model.config.num_hidden_layers))
        self.model = up_to(self.model, self.layer)

    def embed(self, cells: list[np.ndarray]) -> tuple[np.ndarray, Any]:
        """(cell vectors in input order, GeneSums over all occurrences)."""
        import torch

        from rankformer.model.device import budget_named_on_oom, to_device
        from rankformer.model.forward import Batch, GeneSums, batches, hidden_states, mean_pool, one_ahead

        dim = int(self.model.config.hidden_size)
        genes = GeneSums(int(self.model.config.vocab_size), dim) if self.spec.level == "gene" else None
        vecs = np.zeros((len(cells), dim), dtype=np.float32)
        self.occurrences: OccurrenceSpill | None = None
        if genes is not None and self.spec.gene_stat == "median":
            from rankformer.embed.genes import OccurrenceSpill

            self.occurrences = OccurrenceSpill(int(self.model.config.vocab_size), dim)

        def launch(b: Batch) -> torch.Tensor:
            """What comes back of the batch: its gene tokens' states (in ids[keep] order), or its
            cells' vectors (pooled on the device, not their states)."""
            h = hidden_states(self.model, b, self.layer, self.device)
            keep = b.ids >= self.gene_lo
            if genes is not None:  # by flat position: a boolean mask on the device waits for it
                at = to_device(torch.from_numpy(np.flatnonzero(keep.numpy())), h.device)
                return h.reshape(-1, h.shape[-1]).index_select(0, at)
            if self.spec.pooling == "cls":
                return h[:, 0]
            return mean_pool(h, to_device(keep, h.device))

        def finish(b: Batch, out: torch.Tensor) -> None:
            if genes is None:
                vecs[b.index] = out.numpy()
                return
            keep = b.ids >= self.gene_lo
            genes.add_flat(b.ids[keep], out)
            if self.occurrences is not None:
                self.occurrences.add(b.ids[keep].numpy(), out.numpy())

        with budget_named_on_oom(self.max_tokens):
            one_ahead(batches(cells, self.pad, self.max_tokens), launch, finish)
        return vecs, genes

    def __call__(self, task: dict[str, Any]) -> bytes:
        io = self.spec.shard_io()
        table = read_shard(task["uri"], io.columns, io.where, task.get("rows"))
        cells = token_lists(table)
        vecs, genes = self.embed(cells)
        target = fs.join(io.out, task["name"])
        if genes is not None:
            if self.occurrences is not None:  # before the partial sums: they mark the shard done
                self.occurrences.write(fs.join(io.out, OCC_STEM + task["name"]))
            seen = genes.seen()
            sums = genes.sums[seen].numpy()
            part = pa.table(
                {
                    "token": pa.array(seen, pa.int32()),
                    "n": pa.array(genes.counts[seen].numpy(), pa.int64()),
                    "sum": vectors(sums, pa.float64()),
                }
            )
            write_parquet(target, part)
            return pickle.dumps({"name": task["name"], "cells": len(cells)})
        out = table.drop_columns([schema.INPUT_IDS]).append_column("embedding", vectors(vecs))
        write_parquet(target, out)
        return pickle.dumps({"name": task["name"], "cells": len(cells)})


def make_embedder(spec: EmbedSpec) -> Callable[[dict[str, Any]], bytes]:
    return Embedder(spec)
