"""The cells a job works on: read from a finished corpus, optionally only those whose carried
``obs`` columns match (``--cells-where cell_type=cardiomyocyte``), and a seeded sample of them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rankformer import schema
from rankformer.errors import InputError


@dataclass
class Cells:
    ids: list[np.ndarray]  # token ids per cell
    table: pa.Table  # cell_id and the other columns asked for, one row per cell
    manifest: dict[str, Any]

    def __len__(self) -> int:
        return len(self.ids)

    def column(self, name: str) -> np.ndarray:
        return np.asarray(self.table.column(name).to_pylist(), dtype=object)

    def take(self, rows: np.ndarray) -> Cells:
        return Cells([self.ids[i] for i in rows.tolist()], self.table.take(pa.array(rows)), self.manifest)


def parse_where(items: Sequence[str] | Mapping[str, Any] | None) -> dict[str, list[str]]:
    """``["cell_type=cardiomyocyte,fibroblast", "donor=d1"]`` -> ``{column: [allowed values]}``."""
    if isinstance(items, Mapping):
        return {str(k): [str(x) for x in (v if isinstance(v, list) else [v])] for k, v in items.items()}
    out: dict[str, list[str]] = {}
    for item in items or []:
        col, sep, values = item.partition("=")
        if not sep or not col or not values:
            raise InputError(f"--cells-where {item!r} must be COLUMN=VALUE[,VALUE...]")
        out.setdefault(col.strip(), []).extend(v.strip() for v in values.split(","))
    return out


def where_filter(where: Mapping[str, Sequence[str]]) -> pc.Expression | None:
    """The Arrow filter of a ``--cells-where`` selection (values compared as text); None: all cells."""
    expr = None
    for col, values in where.items():
        cond = pc.field(col).cast(pa.string()).isin(pa.array([str(v) for v in values]))
        expr = cond if expr is None else expr & cond
    return expr


def carried_columns(manifest: dict[str, Any]) -> list[str]:
    return sorted(set(dict(manifest.get("config", {}).get("carry") or {}).values()))


def corpus_columns(corpus: str) -> list[str]:
    """The column names of a corpus, from one shard's footer."""
    from rankformer.corpus.read import read_corpus

    return list(read_corpus(corpus, engine="arrow").schema.names)


def check_columns(corpus: str, available: Sequence[str], wanted: Sequence[str], what: str) -> None:
    for col in wanted:
        if col not in available:
            carried = [c for c in available if c not in (schema.INPUT_IDS, schema.LENGTH)]
            raise InputError(
                f"{what} {col!r}: no such column in corpus {corpus} (its columns: {carried}); tokenize "
                f"with --carry {col} to keep that obs column"
            )


def seeded_sample(n: int, k: int, seed: int) -> np.ndarray:
    """``k`` of the positions ``0..n-1``, in order: the one sampling rule of every ``limit_cells``
    (so a job and `predict` given the same seed take the same cells)."""
    return np.sort(np.random.default_rng(seed).choice(n, k, replace=False))


def split_by_shard(chosen: np.ndarray, counts: Sequence[int]) -> list[list[int]]:
    """Sorted positions in the concatenation of shards of ``counts`` rows, as each shard's own."""
    starts = np.r_[0, np.cumsum(np.asarray(counts, dtype=np.int64))]
    return [(chosen[(chosen >= lo) & (chosen < hi)] - lo).tolist() for lo, hi in pairwise(starts)]


def load_cells(
    corpus: str,
    where: Mapping[str, Sequence[str]] | None = None,
    columns: Sequence[str] = (),
    vocab_hash: str | None = None,
    max_cells: int | None = None,
    seed: int = 0,
) -> Cells:
    """The selected cells of ``corpus``, in manifest order (a seeded sample of ``max_cells``)."""
    from rankformer.corpus.read import corpus_manifest, read_corpus

    manifest = corpus_manifest(corpus)
    dataset: Any = read_corpus(corpus, engine="arrow", vocab_hash=vocab_hash)
    names = list(dataset.schema.names)
    where = dict(where or {})
    check_columns(corpus, names, list(where), "--cells-where")
    check_columns(corpus, names, list(columns), "column")
    keep = [schema.INPUT_IDS, *dict.fromkeys([schema.CELL_ID, *columns])]
    keep = [c for c in keep if c in names]
    table = dataset.to_table(columns=keep, filter=where_filter(where))
    if table.num_rows == 0:
        cond = " and ".join(f"{k} in {v}" for k, v in where.items())
        raise InputError(f"no cell of corpus {corpus} matches --cells-where {cond}; check the values")
    if max_cells and table.num_rows > max_cells:
        table = table.take(pa.array(seeded_sample(table.num_rows, max_cells, seed)))
    return Cells(token_lists(table), table.drop_columns([schema.INPUT_IDS]), manifest)


def token_lists(table: pa.Table) -> list[np.ndarray]:
    """Each cell's token ids (int64) from a table of corpus rows."""
    column = table.column(schema.INPUT_IDS).to_numpy(zero_copy_only=False)
    return [np.asarray(x, dtype=np.int64) for x in column]
