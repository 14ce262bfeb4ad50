"""`rankformer perturb stats OUT --by affected-gene`: for each perturbation, which other genes'
states moved most, over the cells it was made in (from the per-gene table `perturb --per-gene`
writes): per (perturbed, affected gene) pair the cells, the mean shift ``1 - cosine`` of the
affected gene's state with a 95% t interval, and the mean cosine.

Memory is bounded whatever the number of rows: one streamed pass sets each row's (pair code,
shift) aside in partitions by perturbation (in memory while they fit ``rows_in_memory``, else as
raw files on local disk, 16 bytes a row), and each partition is then reduced on its own: a
perturbation's pairs all live in one partition. The reference averages the same per-gene
cosines; this adds the interval and the count, and streams.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rankformer.errors import InputError
from rankformer.io import fs
from rankformer.perturb.stats import BATCH_ROWS, ROWS_IN_MEMORY, result_paths, symbols_of

TOP = 100  # affected genes kept per perturbation by default (0: all)
AFFECTED_FILE = "affected"  # affected.parquet / affected.csv
_PAIR = 1 << 32  # pair code = perturbation code * _PAIR + affected-gene code


class _Partitions:
    """(pair code, shift) rows in ``n`` partitions by perturbation code: in memory, or appended
    to raw files in ``folder`` (``on_disk``)."""

    def __init__(self, n: int, folder: str, on_disk: bool) -> None:
        self.n, self.folder, self.on_disk = n, folder, on_disk
        self.held: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(n)]

    def add(self, pairs: np.ndarray, shift: np.ndarray) -> None:
        part = (pairs // _PAIR) % self.n
        order = np.argsort(part, kind="stable")
        bounds = np.searchsorted(part[order], np.arange(self.n + 1))
        for i in range(self.n):
            sel = order[bounds[i] : bounds[i + 1]]
            if not len(sel):
                continue
            if self.on_disk:
                for name, a in (("pair", pairs[sel]), ("shift", shift[sel])):
                    with open(os.path.join(self.folder, f"{i:05d}.{name}"), "ab") as f:
                        a.tofile(f)
            else:
                self.held[i].append((pairs[sel], shift[sel]))

    def read(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if not self.on_disk:
            got = self.held[i]
            self.held[i] = []
            if not got:
                return np.zeros(0, np.int64), np.zeros(0)
            return np.concatenate([p for p, _ in got]), np.concatenate([s for _, s in got])
        paths = [os.path.join(self.folder, f"{i:05d}.{n}") for n in ("pair", "shift")]
        if not os.path.exists(paths[0]):
            return np.zeros(0, np.int64), np.zeros(0)
        return np.fromfile(paths[0], np.int64), np.fromfile(paths[1], np.float64)


def affected_stats(
    out: str, top: int = TOP, rows_in_memory: int = ROWS_IN_MEMORY, write: bool = True
) -> pd.DataFrame:
    """Per perturbation of a `perturb --per-gene` output, its affected genes: ``perturbed``,
    ``perturbed_symbol``, ``affected_gene``, ``affected_symbol``, ``n_cells``, ``shift_mean``
    (``1 - cosine``), ``shift_ci_low``/``_high`` (95% t interval), ``cosine_mean`` and ``rank``
    (1: the gene that moved most under this perturbation); the ``top`` genes of each
    perturbation (0: all), perturbations in order of first appearance. Written to
    ``affected.parquet``/``.csv`` beside the output."""
    if top < 0:
        raise InputError(f"--top {top}: give the affected genes to keep per perturbation (0: all)")
    if rows_in_memory < 1:
        raise InputError(f"rows_in_memory is {rows_in_memory}; give a positive number of rows")
    paths = result_paths(out, per_gene=True)
    total = 0
    for path in paths:
        with fs.open_input(path) as f:
            total += pq.ParquetFile(f).metadata.num_rows
    from rankformer.perturb.stats import _symbols_in

    res = affected_table(_read(paths), total, top, rows_in_memory, _symbols_in(out))
    if write:
        import io

        buf = io.BytesIO()
        res.to_parquet(buf, index=False)
        fs.write_bytes_atomic(fs.join(out, f"{AFFECTED_FILE}.parquet"), buf.getvalue())
        fs.write_bytes_atomic(fs.join(out, f"{AFFECTED_FILE}.csv"), res.to_csv(index=False).encode())
    return res


def _read(paths: list[str]) -> Iterator[pa.RecordBatch]:
    for path in paths:
        with fs.open_input(path) as f:
            yield from pq.ParquetFile(f).iter_batches(
                batch_size=BATCH_ROWS, columns=["perturbed", "affected_gene", "cosine"]
            )


def affected_table(
    batches: Iterator[pa.RecordBatch | pa.Table],
    total_rows: int,
    top: int = TOP,
    rows_in_memory: int = ROWS_IN_MEMORY,
    symbols: dict[str, str] | None = None,
) -> pd.DataFrame:
    """:func:`affected_stats` on per-gene rows (``perturbed``, ``affected_gene``, ``cosine``);
    ``total_rows``: how many there are (it sizes the partitions)."""
    n_parts = max(1, -(-total_rows // rows_in_memory))
    keys: dict[str, int] = {}
    genes: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="rankformer-affected-") as folder:
        parts = _Partitions(n_parts, folder, on_disk=n_parts > 1)
        for batch in batches:
            for b in batch.to_batches() if isinstance(batch, pa.Table) else [batch]:
                if b.num_rows:
                    _add(b, keys, genes, parts)
        frames = [f for f in (_reduce(*parts.read(i), top) for i in range(n_parts)) if f is not None]
    if not frames:
        raise InputError("the per-gene table holds no rows with a finite cosine")
    res = pd.concat(frames, ignore_index=True)
    key_names = np.asarray(list(keys), dtype=object)
    gene_names = np.asarray(list(genes), dtype=object)
    res = res.sort_values(["key", "rank"], kind="stable").reset_index(drop=True)
    perturbed = key_names[res["key"].to_numpy()].tolist()
    affected = gene_names[res["gene"].to_numpy()].tolist()
    names = symbols or {}
    return pd.DataFrame(
        {
            "perturbed": perturbed,
            "perturbed_symbol": symbols_of(names, perturbed),
            "affected_gene": affected,
            "affected_symbol": [names.get(g, "") for g in affected],
            "n_cells": res["n"].to_numpy(np.int64),
            "shift_mean": res["mean"].to_numpy(),
            "shift_ci_low": res["mean"].to_numpy() - res["half"].to_numpy(),
            "shift_ci_high": res["mean"].to_numpy() + res["half"].to_numpy(),
            "cosine_mean": 1.0 - res["mean"].to_numpy(),
            "rank": res["rank"].to_numpy(np.int64),
        }
    )


def _codes(column: pa.Array | pa.ChunkedArray, index: dict[str, int]) -> np.ndarray:
    enc = pc.dictionary_encode(column)
    if isinstance(enc, pa.ChunkedArray):
        enc = enc.combine_chunks()
    local = np.fromiter((index.setdefault(k, len(index)) for k in enc.dictionary.to_pylist()), np.int64)
    return local[enc.indices.to_numpy(zero_copy_only=False)]


def _add(b: pa.RecordBatch, keys: dict[str, int], genes: dict[str, int], parts: _Partitions) -> None:
    cos = np.asarray(b.column("cosine").to_numpy(zero_copy_only=False), dtype=np.float64)
    ok = np.isfinite(cos)
    if not ok.any():
        return
    key = _codes(pc.binary_join(b.column("perturbed"), ","), keys)
    gene = _codes(b.column("affected_gene"), genes)
    parts.add((key * _PAIR + gene)[ok], 1.0 - cos[ok])


def _reduce(pairs: np.ndarray, shift: np.ndarray, top: int) -> pd.DataFrame | None:
    """Per pair: count, mean shift, the 95% t half-width; ranked within each perturbation (None:
    no rows)."""
    from scipy import stats as st

    if not len(pairs):
        return None
    uniq, at = np.unique(pairs, return_inverse=True)
    n = np.bincount(at).astype(np.float64)
    mean = np.bincount(at, shift) / n
    ss = np.bincount(at, (shift - mean[at]) ** 2)
    with np.errstate(invalid="ignore", divide="ignore"):
        sd = np.sqrt(ss / (n - 1))
        half = np.where(n > 1, st.t.ppf(0.975, np.maximum(n - 1, 1)) * sd / np.sqrt(n), np.nan)
    frame = pd.DataFrame({"key": uniq // _PAIR, "gene": uniq % _PAIR, "n": n, "mean": mean, "half": half})
    frame = frame.sort_values(["key", "mean"], ascending=[True, False], kind="stable")
    frame["rank"] = frame.groupby("key").cumcount() + 1
    return frame[frame["rank"] <= top] if top else frame
