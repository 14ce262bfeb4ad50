"""`rankformer embed --level gene`: the merge of the actors' per-shard partial sums into each gene's
mean state, or its exact per-dimension median over every occurrence (read a group of genes and
dimensions at a time, within a memory budget); and, for the median, each shard's occurrences
written sorted by gene in bounded memory (:class:`OccurrenceSpill`)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rankformer.embed.columns import OCC_STEM, rows_of, vectors
from rankformer.io import fs

MEDIAN_BUDGET_FLOATS = 1 << 27  # values the median merge holds at once (512 MB of float32)
SPILL_FLOATS = 1 << 25  # state values an actor holds before spilling them to local disk (128 MB)
SPILL_RANGES = 256  # token ranges a shard's occurrences are spilled into, then sorted one at a time
OCC_ROW_GROUP = 1 << 16  # occurrence rows per row group: the merge reads only the groups it needs


class OccurrenceSpill:
    """Every (token, state) occurrence of a shard, kept in arrival order per token and written to
    Parquet sorted by token, one float32 column per dimension (the median merge reads a few
    dimensions of a few genes at a time; row groups let it skip the rest). Memory stays bounded
    whatever the shard's size: occurrences are spilled to local disk by token range once they
    pass ``SPILL_FLOATS`` values, and each range is sorted on its own at the end."""

    def __init__(self, n_tokens: int, dim: int) -> None:
        self.dim, self.width = dim, max(1, -(-n_tokens // SPILL_RANGES))
        self._dir = tempfile.TemporaryDirectory(prefix="rankformer-occurrences-")
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.held = 0
        self.pieces: dict[int, list[str]] = {}

    def add(self, tokens: np.ndarray, states: np.ndarray) -> None:
        self.pending.append((tokens.astype(np.int32), states.astype(np.float32, copy=False)))
        self.held += states.size
        if self.held >= SPILL_FLOATS:
            self._spill()

    def _spill(self) -> None:
        if not self.pending:
            return
        tokens = np.concatenate([t for t, _ in self.pending])
        states = np.concatenate([s for _, s in self.pending])
        self.pending, self.held = [], 0
        ranges = tokens // self.width
        order = np.argsort(ranges, kind="stable")  # arrival order kept within each range
        cuts = np.flatnonzero(np.diff(ranges[order])) + 1
        for part in np.split(order, cuts):
            r = int(ranges[part[0]])
            path = os.path.join(self._dir.name, f"{r}-{len(self.pieces.get(r, []))}.npz")
            np.savez(path, tokens=tokens[part], states=states[part])
            self.pieces.setdefault(r, []).append(path)

    def _load(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        """Range ``r``'s occurrences in arrival order (each piece's file closed once read)."""
        tokens, states = [], []
        for path in self.pieces[r]:
            with np.load(path) as z:
                tokens.append(z["tokens"])
                states.append(z["states"])
        return np.concatenate(tokens), np.concatenate(states)

    def write(self, uri: str) -> None:
        """The shard's occurrences, sorted by token (stable), to ``uri`` atomically."""
        schema = pa.schema([("token", pa.int32())] + [(f"d{j}", pa.float32()) for j in range(self.dim)])
        self._spill()
        try:
            with fs.open_output_atomic(uri) as f, pq.ParquetWriter(f, schema) as writer:
                for r in sorted(self.pieces):
                    tokens, states = self._load(r)
                    order = np.argsort(tokens, kind="stable")
                    cols = {"token": pa.array(tokens[order], pa.int32())}
                    cols |= {f"d{j}": pa.array(states[order, j]) for j in range(self.dim)}
                    writer.write_table(pa.table(cols, schema=schema), row_group_size=OCC_ROW_GROUP)
                if not self.pieces:  # a shard with no selected cell still gets every column
                    writer.write_table(schema.empty_table())
        finally:
            self._dir.cleanup()


def merge_genes(out: str, shards: list[str], vocab: Any, median: bool = False) -> pa.Table:
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
    tokens = vocab.gene_tokens_in(np.flatnonzero(counts))
    if median:
        values = _medians(out, [OCC_STEM + s for s in shards], tokens, counts, sums.shape[1])
    else:
        values = sums[tokens] / counts[tokens, None]
    values = values.astype(np.float32)
    ids = vocab.gene_id_by_token[tokens].tolist()
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
            bounds = np.searchsorted(token_n, [*group.tolist(), int(group[-1]) + 1])
            for i in range(len(group)):
                result[start + i, d0 : d0 + len(cols)] = np.median(vals[bounds[i] : bounds[i + 1]], axis=0)
        start = stop
    return result


def _read_occurrences(
    out: str, names: list[str], lo: int, hi: int, cols: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and the given dimensions of every occurrence of tokens lo..hi over all shards, sorted
    by token (stable). The tokens are read first; then the values go straight to their sorted rows
    of one array, a row group at a time (memory: that array and one row group)."""
    tokens = [
        np.concatenate([t for t, _ in _token_groups(out, name, lo, hi, [])] or [_NO_TOKENS]) for name in names
    ]
    flat = np.concatenate(tokens)
    order = np.argsort(flat, kind="stable")
    dest = np.empty(len(flat), np.int64)
    dest[order] = np.arange(len(flat))
    vals = np.empty((len(flat), len(cols)), np.float32)
    at = 0
    for name, t in zip(names, tokens, strict=True):
        if len(t):
            for rows, part in _token_groups(out, name, lo, hi, cols):
                for j, c in enumerate(cols):
                    vals[dest[at : at + len(rows)], j] = part.column(c).to_numpy()
                at += len(rows)
    return flat[order], vals


_NO_TOKENS = np.zeros(0, np.int32)


def _token_groups(
    out: str, name: str, lo: int, hi: int, cols: list[str]
) -> Iterator[tuple[np.ndarray, pa.Table]]:
    """Row group by row group of a (token-sorted) occurrence file: the tokens lo..hi and those rows
    of ``cols``; groups whose token range misses lo..hi are skipped unread."""
    with fs.open_input(fs.join(out, name)) as f:
        pf = pq.ParquetFile(f)
        for i in range(pf.metadata.num_row_groups):
            stats = pf.metadata.row_group(i).column(0).statistics
            if stats is not None and stats.has_min_max and (stats.max < lo or stats.min > hi):
                continue
            group = pf.read_row_group(i, columns=["token", *cols])
            t = group.column("token").to_numpy()
            keep = (t >= lo) & (t <= hi)
            if keep.any():
                yield t[keep], group.filter(pa.array(keep)).select(cols)


def write_genes(out: Any, table: pa.Table) -> None:
    pq.write_table(table, out.path("genes.parquet"))
    out.publish("genes.parquet")
