"""Perturbation rows as Parquet: the per-cell scores (with each state's shift) and the per-gene
table, streamed to a file in row groups that appears whole only when a shard finishes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rankformer import schema
from rankformer.io import fs

FLUSH_ROWS = 65_536  # rows per Parquet row group (at least; a group holds whole added tables)
GeneSink = Callable[[pa.Table], None]  # where a batch's per-gene table goes


class RowWriter:
    """Rows of one output file (per-cell scores, or the per-gene table when ``states`` is None)
    streamed to Parquet in row groups; the file appears whole when the block ends without error.
    A writer without a name (no per-gene table asked for) takes rows and writes nothing."""

    def __init__(self, out: str, name: str | None, states: list[str] | None) -> None:
        self.uri = fs.join(out, name) if name else None
        self.states = states
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.n = 0

    def __enter__(self) -> RowWriter:
        if self.uri:
            self._file_cm = fs.open_output_atomic(self.uri)
            schema_ = scores_schema(self.states) if self.states is not None else GENE_SCHEMA
            self._writer = pq.ParquetWriter(self._file_cm.__enter__(), schema_)
        return self

    def add_table(self, table: pa.Table) -> None:
        """Rows already as a table of this file's schema."""
        self.n += table.num_rows
        if self.uri:
            self.buffer.append(table)
            self.buffered += table.num_rows
            if self.buffered >= FLUSH_ROWS:
                self._flush()

    def _flush(self) -> None:
        self._writer.write_table(pa.concat_tables(self.buffer))
        self.buffer, self.buffered = [], 0

    def __exit__(self, *exc: Any) -> None:
        if not self.uri:
            return
        try:
            if exc[0] is None and self.buffer:
                self._flush()
            self._writer.close()
        finally:
            self._file_cm.__exit__(*exc)


def scores_schema(states: list[str]) -> pa.Schema:
    """The per-cell scores' columns, a shift per state."""
    fields = [
        (schema.CELL_ID, pa.string()),
        ("perturbed", pa.list_(pa.string())),
        ("rank", pa.int32()),
        ("cell_cosine", pa.float64()),
        ("gene_mean_cosine", pa.float64()),
    ]
    return pa.schema(fields + [(f"shift_{s}", pa.float64()) for s in states])


GENE_SCHEMA = pa.schema(
    [
        (schema.CELL_ID, pa.string()),
        ("perturbed", pa.list_(pa.string())),
        ("affected_gene", pa.string()),
        ("cosine", pa.float64()),
    ]
)


def scores_table(
    cell_id: str, perturbed: pa.Array, rank: np.ndarray, scores: np.ndarray, states: list[str]
) -> pa.Table:
    """Per-cell scores of a batch of one cell's variants, column-wise: variant k perturbed the genes
    ``perturbed[k]``, the best-ranked of them at ``rank[k]``; ``scores[k]`` holds its cell cosine,
    mean gene cosine, genes matched (none: the mean is NaN) and each state's shift."""
    scores = np.asarray(scores, dtype=np.float64)
    mean = np.where(scores[:, 2] > 0, scores[:, 1], np.nan)
    cols = [pa.repeat(pa.scalar(cell_id, pa.string()), len(rank)), perturbed, pa.array(rank, pa.int32())]
    cols += [pa.array(scores[:, 0]), pa.array(mean)] + [
        pa.array(scores[:, 3 + k]) for k in range(len(states))
    ]
    return pa.Table.from_arrays(cols, schema=scores_schema(states))


def gene_rows_table(
    cell_id: str, perturbed: pa.Array, variant: np.ndarray, affected: pa.Array, cosine: np.ndarray
) -> pa.Table:
    """Per-gene rows of one cell, column-wise: row k is variant ``variant[k]`` (an index into
    ``perturbed``), its affected gene ``affected[k]`` and that gene's cosine."""
    cell = pa.repeat(pa.scalar(cell_id, pa.string()), len(variant))
    cols = [cell, perturbed.take(pa.array(variant, pa.int32())), affected, pa.array(cosine, pa.float64())]
    return pa.Table.from_arrays(cols, schema=GENE_SCHEMA)
