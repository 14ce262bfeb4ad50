"""Results back on the AnnData they came from, as scverse tools expect them.

- cell embeddings -> ``adata.obsm[key]`` (cells x hidden; NaN rows for cells the tokenizer left
  out), what they were computed with -> ``adata.uns[key]``;
- cell predictions -> ``adata.obs[key_predicted]`` and ``adata.obs[key_prob_<class>]``;
- gene embeddings -> ``adata.varm[key]``, gene predictions -> ``adata.var[key_...]``, by gene id;
- perturbation scores -> ``adata.obsm[key_<score>]``: a cells x perturbations frame.

Job outputs are matched by ``source_file``/``source_row`` (or by ``cell_id`` where an output has
no source columns), never by position: :func:`attach` and `rankformer attach` check each match.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from rankformer import schema
from rankformer.errors import InputError
from rankformer.io import fs
from rankformer.words import listed

# the default key of each output, where scanpy users look for it
DEFAULT_KEYS = {
    "embed-cell": "X_rankformer",
    "embed-gene": "rankformer",
    "predict-cells": "rankformer",
    "predict-genes": "rankformer",
    "finetune-genes": "rankformer",
    "perturb": "rankformer_perturb",
}
SCORES = ("cell_cosine", "gene_mean_cosine")  # per-cell perturbation scores (with shift_<state>)


def slot_name(key: str, column: str) -> str:
    """``<key>_<column>``, without the '/' an .h5ad store cannot hold in a name (a class "T/NK")."""
    return f"{key}_{column}".replace("/", "_")


def _check_anndata(adata: Any) -> None:
    if not (hasattr(adata, "obs") and hasattr(adata, "var") and hasattr(adata, "obsm")):
        raise InputError(f"adata: expected an AnnData, got {type(adata).__name__}")


# --- cells -------------------------------------------------------------------------------------
def full_rows(values: np.ndarray, rows: np.ndarray, n: int) -> np.ndarray:
    """``values`` (one row per kept cell) placed at ``rows`` of an ``n``-row float array, NaN
    elsewhere."""
    out = np.full((n, *values.shape[1:]), np.nan, dtype=np.float32 if values.dtype == np.float32 else float)
    out[rows] = values
    return out


def put_cell_vectors(
    adata: Any, key: str, vectors: np.ndarray, rows: np.ndarray, info: dict[str, Any]
) -> np.ndarray:
    """``adata.obsm[key]`` = the vectors row for row with ``adata`` (NaN for cells without one);
    ``adata.uns[key]`` = ``info``. Returns what it wrote."""
    _check_anndata(adata)
    full = full_rows(vectors, rows, adata.n_obs)
    adata.obsm[key] = full
    adata.uns[key] = _uns(info, adata.n_obs, len(rows))
    return full


def put_cell_table(
    adata: Any, key: str, table: pd.DataFrame, rows: np.ndarray, info: dict[str, Any]
) -> pd.DataFrame:
    """Per-cell prediction columns (``predicted``, ``prob_<class>``) into ``adata.obs`` as
    ``<key>_<column>``, NaN (or missing) for cells without a prediction. Returns the new columns."""
    _check_anndata(adata)
    wanted = [c for c in table.columns if c == "predicted" or c.endswith("_predicted") or "prob_" in c]
    out = pd.DataFrame(index=adata.obs_names)
    for col in wanted:
        values = table[col].to_numpy()
        if col.endswith("predicted"):  # a class per cell (a task's, for a multi-task classifier)
            full = np.full(adata.n_obs, None, dtype=object)
            full[rows] = values
            stem = col[: -len("predicted")] + "prob_"
            classes = [c[len(stem) :] for c in table.columns if c.startswith(stem)]
            cats = list(dict.fromkeys([*classes, *(str(v) for v in values)]))
            out[slot_name(key, col)] = pd.Categorical(full, categories=cats)
        else:
            out[slot_name(key, col)] = full_rows(values.astype(np.float64), rows, adata.n_obs)
    for col in out.columns:
        adata.obs[col] = out[col].array  # a Categorical stays one
    adata.uns[key] = _uns(info, adata.n_obs, len(rows))
    return out


def _uns(info: dict[str, Any], n_obs: int, matched: int) -> dict[str, Any]:
    doc = {k: v for k, v in info.items() if v is not None}
    doc.update(n_cells_with_values=int(matched), n_cells_without=int(n_obs - matched))
    return json.loads(json.dumps(doc, default=str))  # plain values: .h5ad writes them


def source_rows(
    adata: Any, table: pa.Table | pd.DataFrame, source: str | None, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """(rows of ``table`` that are cells of ``adata``, their row numbers in ``adata``).

    By ``source_file``/``source_row`` when the table has them (``source``: which input file
    ``adata`` was read from, needed when the table came from several), each match checked by
    ``cell_id``; else by ``cell_id`` against ``adata.obs_names``."""
    frame = table.to_pandas() if isinstance(table, pa.Table) else table
    names = np.asarray(adata.obs_names.astype(str))
    if schema.SOURCE_ROW in frame.columns and schema.SOURCE_FILE in frame.columns:
        files = frame[schema.SOURCE_FILE].astype(str).to_numpy()
        kept = _from_file(files, source, what)
        rows = frame[schema.SOURCE_ROW].to_numpy()[kept].astype(np.int64)
        if len(rows) and (rows.max() >= len(names) or rows.min() < 0):
            raise InputError(
                f"{what}: source rows up to {int(rows.max())} for an AnnData of {len(names)} cells: it was "
                "not read from this file; pass the AnnData of that file (or source=)"
            )
        if schema.CELL_ID in frame.columns:
            ids = frame[schema.CELL_ID].astype(str).to_numpy()[kept]
            wrong = np.flatnonzero(ids != names[rows])
            if len(wrong):
                i = int(wrong[0])
                raise InputError(
                    f"{what}: row {int(rows[i])} of the AnnData is cell {names[rows[i]]!r}, but the output "
                    f"says {ids[i]!r} ({len(wrong)} such): the AnnData is not the file the corpus was "
                    "tokenized from (subset or reordered?); pass that file"
                )
        return np.flatnonzero(kept), rows
    if schema.CELL_ID not in frame.columns:
        raise InputError(f"{what}: no {schema.CELL_ID!r} or source columns to match cells by")
    if len(set(names)) != len(names):
        raise InputError(
            f"{what}: matched by cell id, but adata.obs_names are not unique; run "
            "adata.obs_names_make_unique() before tokenizing, or attach an output with source_file/source_row"
        )
    where = pd.Index(names).get_indexer(frame[schema.CELL_ID].astype(str).to_numpy())
    return np.flatnonzero(where >= 0), where[where >= 0]


def _from_file(files: np.ndarray, source: str | None, what: str) -> np.ndarray:
    distinct = list(dict.fromkeys(files.tolist()))
    if source is None:
        if len(distinct) > 1:
            raise InputError(
                f"{what}: its cells come from {len(distinct)} files ({listed(distinct, 4)}); say which one "
                "this AnnData is with source=PATH (--source)"
            )
        return np.ones(len(files), dtype=bool)
    same = [f for f in distinct if f == source or posixpath.basename(f) == posixpath.basename(source)]
    if not same:
        raise InputError(f"{what}: no cells of {source}; its files are {listed(distinct, 4)}")
    return np.isin(files, same)


# --- genes -------------------------------------------------------------------------------------
def var_gene_ids(adata: Any, gene_id_column: str = schema.DEFAULT_GENE_ID_COLUMN) -> np.ndarray:
    """The gene id of each var, as the tokenizer reads it (column, scanpy's gene_ids, or index)."""
    from rankformer.io.base import id_column

    var = adata.var
    col, _ = id_column(
        gene_id_column, [str(c) for c in var.columns], lambda c: np.asarray(var[c].astype(str))
    )
    if col in var.columns:
        return np.asarray(var[col].astype(str))
    return np.asarray(adata.var_names.astype(str))


def gene_rows(
    adata: Any, table: pd.DataFrame, gene_id_column: str, vocab: Any
) -> tuple[np.ndarray, np.ndarray]:
    """(rows of the gene table, the var rows they go to): each var's id mapped to a vocabulary
    gene as the tokenizer maps it (aliases, retired Ensembl ids, symbols), then to that gene's row."""
    var_tokens = vocab.map_gene_ids(list(var_gene_ids(adata, gene_id_column)), names=True)
    token_of = vocab.token_by_gene_id
    row_of_token = {token_of.get(str(g), -1): i for i, g in enumerate(table["gene_id"])}
    where = np.asarray([row_of_token.get(int(t), -1) if t >= 0 else -1 for t in var_tokens])
    v_rows = np.flatnonzero(where >= 0)
    return where[v_rows], v_rows


def put_gene_table(
    adata: Any, key: str, table: pd.DataFrame, gene_id_column: str, vocab: Any, info: dict[str, Any]
) -> int:
    """Gene embeddings into ``adata.varm[key]`` and gene columns (``n_occurrences``,
    ``predicted``, ``prob_<class>``, ``in_training``) into ``adata.var`` as ``<key>_<column>``, by
    gene id (``vocab``: the model's :class:`GeneVocab`, which maps the var ids). Returns how many
    vars got values."""
    _check_anndata(adata)
    t_rows, v_rows = gene_rows(adata, table, gene_id_column, vocab)
    if "embedding" in table.columns:
        vecs = np.stack([np.asarray(v, dtype=np.float32) for v in table["embedding"]])
        adata.varm[key] = full_rows(vecs[t_rows], v_rows, adata.n_vars)
    for col in table.columns:
        if col in ("gene_id", "symbol", "embedding"):
            continue
        values = table[col].to_numpy()[t_rows]
        if values.dtype.kind in "biuf":
            full = full_rows(values.astype(np.float64), v_rows, adata.n_vars)
            adata.var[slot_name(key, col)] = full
        else:
            obj = np.full(adata.n_vars, None, dtype=object)
            obj[v_rows] = values
            adata.var[slot_name(key, col)] = pd.Categorical(obj) if col == "predicted" else obj.astype(str)
    doc = {k: v for k, v in info.items() if v is not None}
    doc.update(n_vars_with_values=len(v_rows), n_genes_in_output=len(table))
    adata.uns[key] = json.loads(json.dumps(doc, default=str))
    return len(v_rows)


# --- job outputs -------------------------------------------------------------------------------
def output_kind(out: str) -> tuple[str, dict[str, Any]]:
    from rankformer.job.output import MANIFEST

    uri = fs.join(out, MANIFEST)
    if not fs.exists(uri):
        raise InputError(
            f"{out} holds no finished rankformer output (no {MANIFEST}); give the --out folder of a "
            "finished `embed`, `predict` or `perturb` run"
        )
    manifest: dict[str, Any] = fs.read_json(uri, "rerun the job")
    job = str(manifest.get("job"))
    if job not in DEFAULT_KEYS:
        raise InputError(
            f"{out} is the output of `{job}`; attach takes embed, predict cells|genes, finetune genes or "
            "perturb outputs"
        )
    return job, manifest


def _parquet(out: str, name: str) -> pa.Table:
    import pyarrow.parquet as pq

    with fs.open_input(fs.join(out, name)) as f:
        return pq.read_table(f)


def attach(
    adata: Any,
    out: str,
    *,
    key_added: str | None = None,
    source: str | None = None,
    gene_id_column: str = schema.DEFAULT_GENE_ID_COLUMN,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Put a finished job output (``out``: its folder, local or s3://) on ``adata``, in place.

    Parameters
    ----------
    adata
        The AnnData the corpus was tokenized from (the same cells; a backed one works too).
    out
        Output folder of `rankformer embed` (cell or gene level), `predict cells|genes`,
        `finetune genes` or `perturb`.
    key_added
        Where the results go (default ``X_rankformer`` for cell embeddings, ``rankformer``
        for predictions and gene embeddings, ``rankformer_perturb`` for perturbation scores).
    source
        The input file ``adata`` was read from, when the corpus was tokenized from several.
    gene_id_column
        The var column of gene ids, as for tokenizing (gene outputs only).
    tracking_uri
        The MLflow store of an output made with a ``models:/`` model (gene outputs read its
        vocabulary).

    Returns
    -------
    dict
        What was written where: ``job``, ``key``, ``slots`` (the obs/obsm/var/varm names),
        ``matched`` and ``unmatched`` counts.
    """
    _check_anndata(adata)
    job, manifest = output_kind(out)
    key = key_added or DEFAULT_KEYS[job]
    info = {
        "job": job,
        "output": out,
        **{k: manifest.get(k) for k in ("model", "model_version", "layer", "pooling")},
    }
    what = f"{job} output {out}"
    if job == "embed-cell":
        from rankformer.embed.columns import rows_of

        table = pa.concat_tables(_parquet(out, n) for n in manifest["shards"])
        t_rows, rows = source_rows(adata, table.drop_columns(["embedding"]), source, what)
        vecs = rows_of(table.column("embedding").take(pa.array(t_rows)))
        put_cell_vectors(adata, key, vecs, rows, info)
        return _done(job, key, [f"obsm[{key!r}]", f"uns[{key!r}]"], len(rows), adata.n_obs)
    if job == "predict-cells":
        frame = _parquet(out, "cell_predictions.parquet").to_pandas()
        t_rows, rows = source_rows(adata, frame, source, what)
        cols = put_cell_table(adata, key, frame.iloc[t_rows].reset_index(drop=True), rows, info)
        return _done(job, key, [f"obs[{c!r}]" for c in cols.columns], len(rows), adata.n_obs)
    if job == "perturb":
        n = _put_perturb(adata, out, manifest, key, source, what, info)
        return _done(job, key, [f"obsm[{slot_name(key, s)!r}]" for s in n[1]], n[0], adata.n_obs)
    name = "genes.parquet" if job == "embed-gene" else "gene_predictions.parquet"
    frame = _parquet(out, name).to_pandas()
    matched = put_gene_table(
        adata, key, frame, gene_id_column, _output_vocab(out, manifest, tracking_uri), info
    )
    slots = [f"varm[{key!r}]"] if "embedding" in frame.columns else []
    slots += [
        f"var[{slot_name(key, c)!r}]" for c in frame.columns if c not in ("gene_id", "symbol", "embedding")
    ]
    return _done(job, key, slots, matched, adata.n_vars, "genes")


def _output_vocab(out: str, manifest: dict[str, Any], tracking_uri: str | None) -> Any:
    """The vocabulary of the model that made ``out``: its own saved model, else the manifest's."""
    from rankformer.vocab.gene_vocab import GeneVocab

    own = fs.join(out, "model", "vocab.json")
    if fs.exists(own):
        return GeneVocab.load(own)
    if not manifest.get("model"):
        raise InputError(f"{out}: its manifest names no model, so its gene ids cannot be mapped")
    from rankformer import tracking
    from rankformer.model.loader import inspect_model

    return inspect_model(str(manifest["model"]), tracking.resolve_uri(tracking_uri)).vocab


def _put_perturb(
    adata: Any,
    out: str,
    manifest: dict[str, Any],
    key: str,
    source: str | None,
    what: str,
    info: dict[str, Any],
) -> tuple[int, list[str]]:
    """One cells x perturbations frame per score in ``obsm`` (NaN: not perturbed in that cell)."""
    table = pa.concat_tables(_parquet(out, n) for n in manifest["shards"]).to_pandas()
    scores = [c for c in table.columns if c in SCORES or c.startswith("shift_")]
    t_rows, rows = source_rows(adata, table, source, what)
    sub = table.iloc[t_rows].assign(_row=rows)
    written = []
    for score in scores:
        wide = sub.pivot_table(index="_row", columns="perturbed", values=score, aggfunc="mean")
        frame = pd.DataFrame(np.nan, index=adata.obs_names, columns=[str(c) for c in wide.columns])
        frame.iloc[wide.index.to_numpy()] = wide.to_numpy()
        frame.columns = [c.replace("/", "_") for c in frame.columns]
        adata.obsm[slot_name(key, score)] = frame
        written.append(score)
    adata.uns[key] = _uns(info, adata.n_obs, len(np.unique(rows)))
    return len(np.unique(rows)), written


def _done(
    job: str, key: str, slots: list[str], matched: int, total: int, unit: str = "cells"
) -> dict[str, Any]:
    return {
        "job": job,
        "key": key,
        "slots": slots,
        "matched": matched,
        "unmatched": total - matched,
        "unit": unit,
    }


def attach_files(
    source: str,
    outs: Sequence[str],
    write: str,
    key_added: str | None = None,
    gene_id_column: str = schema.DEFAULT_GENE_ID_COLUMN,
) -> list[dict[str, Any]]:
    """`rankformer attach`: read ``source`` (.h5ad or .zarr), attach each output, write the
    annotated AnnData to ``write`` (.h5ad; temp file then rename)."""
    import anndata as ad

    if key_added and len(outs) > 1:
        raise InputError("--key-added names one output's results; give one OUT with it, or leave it out")
    if not write.endswith(".h5ad"):
        raise InputError(
            f"--write {write}: the annotated AnnData is written as .h5ad; end the name with .h5ad"
        )
    if not os.path.exists(source):
        raise FileNotFoundError(f"{source} not found; give the .h5ad or .zarr the corpus was tokenized from")
    adata = ad.read_zarr(source) if source.rstrip("/").endswith(".zarr") else ad.read_h5ad(source)
    done = [attach(adata, o, key_added=key_added, source=source, gene_id_column=gene_id_column) for o in outs]
    parent = os.path.dirname(os.path.abspath(write))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".h5ad", dir=parent)
    os.close(fd)
    try:
        adata.write_h5ad(tmp)
        os.replace(tmp, write)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return done
