"""`rankformer perturb`: in silico deletion, overexpression, inhibition and activation of genes in
every selected cell, scored by how the cell's embedding moves; `rankformer perturb stats`.

Per (cell, perturbation) row, with states at ``--layer``:

* ``cell_cosine``: cosine of the cell's mean-pooled gene-token embedding before and after;
* ``gene_mean_cosine``: the reference's per-cell score, the mean over the remaining genes of each
  gene's state cosine before/after, matched by gene (not position); dominated by the position shift
  a deletion causes for every later gene, so it runs lower for genes near the top of the cell;
* ``shift_<state>`` (with ``--state-column``): cos(perturbed cell, state) - cos(original cell, state),
  a state's embedding being the mean of its cells' mean-pooled embeddings.

The scoring is :class:`rankformer.perturb.perturber.Perturber`'s (one per actor). Corpus shards are spread
over a pool of Ray actors, each writing its output shard as it finishes; a rerun skips finished
shards. Statistics over the output: `rankformer.perturb.stats`.
"""

from __future__ import annotations

import functools
import pickle
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from rankformer import schema
from rankformer.config.infer import PerturbConfig
from rankformer.embed.cells import EmbedSpec, model_spec
from rankformer.errors import InputError
from rankformer.io import fs
from rankformer.job.actors import ShardIO, sharing_models
from rankformer.job.shards import sample_note, sample_rows, shard_tasks
from rankformer.perturb.parts import Perturbation
from rankformer.perturb.perturber import Perturber
from rankformer.perturb.states import STATES_FILE, check_states, gpus_of, state_embeddings, wanted_states
from rankformer.perturb.stats import SYMBOLS_FILE, result_paths
from rankformer.words import counted, listed


def _make_perturber(spec: EmbedSpec, how: Perturbation) -> Callable[[dict[str, Any]], bytes]:
    return Perturber(spec, how)


def targets_of(
    vocab: Any, genes: list[str], anchor: str | None, mode: str, missing: str
) -> tuple[list[int], int | None, list[str]]:
    """(the listed genes' tokens, the anchor's token, the names not in the vocabulary)."""
    names = vocab.symbol_index
    asked = list(genes) + ([anchor] if anchor else [])
    tokens = vocab.map_gene_ids(asked, extra_aliases=names).tolist()
    not_found = [g for g, t in zip(asked, tokens, strict=True) if t < 0]
    if anchor and tokens[-1] < 0:
        raise InputError(f"anchor gene {anchor} is not in the model's vocabulary")
    if not_found and missing == "error":
        raise InputError(f"genes not in the model's vocabulary: {not_found}; fix them or pass --missing skip")
    listed = [t for t in tokens[: len(genes)] if t >= 0]
    if mode != "all" and not listed:
        raise InputError(f"none of the genes {genes} is in the model's vocabulary")
    return listed, (tokens[-1] if anchor else None), not_found


def _job_spec(cfg: PerturbConfig, uri: str) -> EmbedSpec:
    """What every actor reads (the model, the selected cells) and where it writes."""
    from rankformer.job.cells import check_columns, corpus_columns, parse_where

    where = parse_where(cfg.cells_where)
    names = corpus_columns(cfg.corpus)
    check_columns(cfg.corpus, names, list(where), "--cells-where")
    state = [cfg.state_column] if cfg.state_column else []
    check_columns(cfg.corpus, names, state, "--state-column")
    if cfg.start_state and cfg.state_column:
        where[cfg.state_column] = [cfg.start_state]
    return EmbedSpec(
        model_spec(cfg, uri), ShardIO([schema.INPUT_IDS, schema.CELL_ID, *state], where, cfg.out)
    )


def _selection(cfg: PerturbConfig, files: list[str], where: dict[str, list[str]]) -> tuple[list[Any], int]:
    """The states checked present, then :func:`sample_rows` (both before any model loads)."""
    if cfg.state_column:
        check_states(files, cfg.state_column, wanted_states(cfg))
    return sample_rows(files, where, cfg.limit_cells, cfg.seed)


def run_perturb(cfg: PerturbConfig) -> dict[str, Any]:
    from rankformer import tracking
    from rankformer.cluster import map_shards_actors
    from rankformer.config.corpus import ClusterOptions
    from rankformer.corpus.read import corpus_files
    from rankformer.job.door import check_model_and_corpus
    from rankformer.job.output import JobOutput

    uri = tracking.resolve_uri(cfg.tracking_uri)
    info, manifest = check_model_and_corpus(cfg.model, cfg.corpus, uri, cfg.layer)
    listed, anchor, missing = targets_of(info.vocab, cfg.genes, cfg.anchor, cfg.mode, cfg.missing)
    spec = _job_spec(cfg, uri)
    # where and in what batches it runs, not what it computes
    placement = ("num_workers", "ray_address", "in_process", "use_gpu", "max_tokens")
    what = {k: v for k, v in asdict(cfg).items() if k not in placement}
    files = corpus_files(cfg.corpus, vocab_hash=manifest["vocab_hash"])
    sample, selected = _selection(cfg, files, spec.shard_io().where)
    out = JobOutput(cfg.out, "perturb", what, keep_on_change=False)
    opts = ClusterOptions(ray_address=cfg.ray_address, in_process=cfg.in_process)
    with sharing_models():  # in-process, the two passes use one loaded model
        states = state_embeddings(cfg, spec, files, opts)
        if states:
            out.write_json(STATES_FILE, states)
        named = info.vocab.gene_names
        if named:  # for the statistics' tables (the rows name genes by id)
            out.write_json(SYMBOLS_FILE, {g: named[g] for g in info.vocab.gene_ids if named.get(g)})
        how = Perturbation(cfg.kind, cfg.mode, listed, anchor, cfg.shift, cfg.per_gene, states)
        shards, pending = shard_tasks(cfg.out, files, sample)
        make = functools.partial(_make_perturber, spec, how)
        done = {"cells": 0, "rows": 0}  # each actor wrote its shard's rows; these are its counts
        for payload in map_shards_actors(pending, make, opts, cfg.num_workers, gpus_of(cfg)):
            counts = pickle.loads(payload)
            done = {k: done[k] + int(counts[k]) for k in done}
    out.files += shards + (["genes-" + s for s in shards] if cfg.per_gene else [])
    summary: dict[str, Any] = {
        "model": cfg.model,
        "vocab_hash": info.vocab.content_hash,
        "kind": cfg.kind,
        "mode": cfg.mode,
        "layer": cfg.layer,
        "states": list(states),
        "state_cells": cfg.state_cells,  # None: every cell of each state
        "goal_state": cfg.goal_state,
        "genes_not_in_vocabulary": missing,
        "shards": shards,
        "shards_done_before": len(shards) - len(pending),
        "cells_this_run": done["cells"],
        "rows_this_run": done["rows"],
        **sample_note(cfg.limit_cells, selected, cfg.seed),
    }
    out.finish(summary)
    print(
        f"perturbed ({cfg.kind}, {cfg.mode}) {done['cells']:,} cells into {done['rows']:,} rows in "
        f"{counted(len(pending), 'shard')} ({summary['shards_done_before']} of {len(shards)} done before)"
        f"{_not_in_vocab(missing)} -> {cfg.out}"
    )
    return summary


def _not_in_vocab(missing: list[str]) -> str:
    """The run line's note on listed genes the vocabulary lacks (all are in the manifest)."""
    if not missing:
        return ""
    return f"; not in the vocabulary, skipped: {listed(missing, 5)} (manifest: genes_not_in_vocabulary)"


def read_results(out: str, per_gene: bool = False) -> pa.Table:
    tables = []
    for path in result_paths(out, per_gene):
        with fs.open_input(path) as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables)
