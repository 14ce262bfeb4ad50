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
            self._writer = pq.ParquetWriter(self._file_cm.__enter__(), rows_table([], self.states).schema)
        return self

    def add(self, rows: list[dict[str, Any]]) -> None:
        """Rows as dicts of the columns."""
        if self.uri:
            self.add_table(rows_table(rows, self.states))
        else:
            self.n += len(rows)

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


def rows_table(rows: list[dict[str, Any]], states: list[str] | None) -> pa.Table:
    if states is not None:
        cols: dict[str, Any] = {
            schema.CELL_ID: pa.array([r[schema.CELL_ID] for r in rows], pa.string()),
            "perturbed": pa.array([r["perturbed"] for r in rows], pa.list_(pa.string())),
            "rank": pa.array([r["rank"] for r in rows], pa.int32()),
            "cell_cosine": pa.array([r["cell_cosine"] for r in rows], pa.float64()),
            "gene_mean_cosine": pa.array([r["gene_mean_cosine"] for r in rows], pa.float64()),
        }
        for s in states:
            cols[f"shift_{s}"] = pa.array([r[f"shift_{s}"] for r in rows], pa.float64())
        return pa.table(cols)
    return pa.table(
        {
            schema.CELL_ID: pa.array([r[schema.CELL_ID] for r in rows], pa.string()),
            "perturbed": pa.array([r["perturbed"] for r in rows], pa.list_(pa.string())),
            "affected_gene": pa.array([r["affected_gene"] for r in rows], pa.string()),
            "cosine": pa.array([r["cosine"] for r in rows], pa.float64()),
        }
    )


def gene_rows_table(
    cell_id: str, perturbed: list[list[str]], variant: np.ndarray, affected: pa.Array, cosine: np.ndarray
) -> pa.Table:
    """Per-gene rows of one cell, column-wise: row k is variant ``variant[k]`` (an index into
    ``perturbed``), its affected gene ``affected[k]`` and that gene's cosine."""
    take = pa.array(variant, pa.int32())
    return pa.table(
        {
            schema.CELL_ID: pa.array([cell_id], pa.string()).take(pa.array(np.zeros(len(variant), np.int32))),
            "perturbed": pa.array(perturbed, pa.list_(pa.string())).take(take),
            "affected_gene": affected,
            "cosine": pa.array(cosine, pa.float64()),
        }
    )
