"""Shard-by-shard work over a corpus: which rows of each shard a job takes (its selection and
sample), the tasks still to run, and reading and writing one shard."""

from __future__ import annotations

import io
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rankformer.errors import InputError
from rankformer.io import fs
from rankformer.job.cells import seeded_sample, split_by_shard, where_filter
from rankformer.words import listed

SHARD_STEM = "part-"


def write_parquet(uri: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    fs.write_bytes_atomic(uri, buf.getvalue())


def read_shard(
    uri: str, columns: list[str], where: dict[str, list[str]], rows: list[int] | None = None
) -> pa.Table:
    """The selected cells of one shard (``rows``: only these, counted among the selected)."""
    with fs.open_input(uri) as f:
        table = pq.read_table(f, columns=columns, filters=where_filter(where))
    return table if rows is None else table.take(pa.array(rows, pa.int64()))


def selected_in(uri: str, where: dict[str, list[str]]) -> int:
    if not where:
        with fs.open_input(uri) as f:
            return int(pq.read_metadata(f).num_rows)
    return read_shard(uri, list(where), where).num_rows


def sample_rows(
    files: list[str], where: dict[str, list[str]], limit: int | None, seed: int
) -> tuple[list[list[int] | None], int]:
    """Per shard, the rows (among its selected cells) of a seeded sample of ``limit`` of the
    corpus's selected cells, None for all; and how many cells were selected. The sample is the
    one ``predict --limit-cells`` draws with the same seed: the same rule over the same cells in
    manifest order. Only the shards' footers (or their ``where`` columns) are read, in threads."""
    from concurrent.futures import ThreadPoolExecutor

    if limit is None and not where:
        return [None] * len(files), -1
    with ThreadPoolExecutor(16) as pool:
        counts = np.asarray(list(pool.map(lambda f: selected_in(f, where), files)), dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        cond = " and ".join(f"{k} in {v}" for k, v in where.items())
        present = "; ".join(f"{k}: {listed_counts(column_values(files, k))}" for k in where)
        raise InputError(f"no cell of the corpus matches --cells-where {cond}; the values there: {present}")
    if limit is None or limit >= total:
        return [None] * len(files), total
    return list(split_by_shard(seeded_sample(total, limit, seed), counts.tolist())), total


def column_values(files: list[str], column: str) -> Counter[str]:
    """How many cells hold each value of a carried column (read alone, shard by shard, in threads)."""
    from concurrent.futures import ThreadPoolExecutor

    def counts(uri: str) -> Counter[str]:
        vc = pc.value_counts(
            pc.cast(read_shard(uri, [column], {}).column(column), pa.string()).combine_chunks()
        )
        return Counter(dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True)))

    with ThreadPoolExecutor(16) as pool:
        return sum(pool.map(counts, files), Counter())


def listed_counts(values: Counter[str], most: int = 20) -> str:
    """``'A' (1,004), 'B' (280)`` for the commonest values, and how many more there are."""
    return listed([f"{k!r} ({n:,})" for k, n in values.most_common()], most)


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
