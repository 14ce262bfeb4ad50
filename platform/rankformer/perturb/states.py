"""Cell-state embeddings for `rankformer perturb`: each state's embedding is the mean of its
cells' mean-pooled embeddings, summed per corpus shard by a pool of Ray actors (over every cell
of the state, or a seeded sample of at most ``--state-cells`` of each)."""

from __future__ import annotations

import functools
import pickle
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rankformer import schema
from rankformer.config.infer import PerturbConfig
from rankformer.embed.cells import Embedder, EmbedSpec
from rankformer.errors import InputError
from rankformer.io import fs
from rankformer.job.cells import split_by_shard, token_lists
from rankformer.job.shards import column_values, listed_counts, read_shard


class StateSums(Embedder):
    """One model per actor: per corpus shard, the sum of each state's cells' mean-pooled embeddings
    and their count."""

    def __init__(self, spec: EmbedSpec, column: str, wanted: list[str]) -> None:
        super().__init__(spec)
        self.column, self.wanted = column, wanted

    def __call__(self, task: dict[str, Any]) -> bytes:
        column, wanted = self.column, self.wanted
        table = read_shard(task["uri"], [schema.INPUT_IDS, column], {column: wanted}, task.get("rows"))
        found: dict[str, tuple[np.ndarray, int]] = {}
        if table.num_rows:
            cells = token_lists(table)
            vecs, _ = self.embed(cells)
            labels = np.asarray([str(v) for v in table.column(column).to_pylist()])
            for s in wanted:
                m = labels == s
                if m.any():
                    found[s] = (vecs[m].astype(np.float64).sum(0), int(m.sum()))
        return pickle.dumps({"index": task["index"], "states": found})


def _make_state_sums(spec: EmbedSpec, column: str, wanted: list[str]) -> Callable[[dict[str, Any]], bytes]:
    return StateSums(spec, column, wanted)


STATES_FILE = "states.json"


def state_sample(
    files: list[str], column: str, wanted: list[str], cap: int | None, seed: int
) -> list[list[int] | None]:
    """Per shard, the rows (among its cells of the ``wanted`` states) of a seeded sample of at most
    ``cap`` cells of each state, drawn state by state over the corpus in manifest order; None per
    shard (every cell) without a cap. Only the state column is read, in threads."""
    from concurrent.futures import ThreadPoolExecutor

    if cap is None:
        return [None] * len(files)

    def labels(uri: str) -> pa.Array:
        col = read_shard(uri, [column], {column: wanted}).column(column)
        return pc.cast(col, pa.string()).combine_chunks()

    with ThreadPoolExecutor(16) as pool:
        per_shard = list(pool.map(labels, files))
    every = pa.concat_arrays(per_shard) if per_shard else pa.array([], pa.string())
    rng = np.random.default_rng(seed)
    keep = []
    for state in wanted:
        rows = np.flatnonzero(pc.equal(every, state).to_numpy(zero_copy_only=False))
        keep.append(rng.choice(rows, cap, replace=False) if len(rows) > cap else rows)
    chosen = np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)
    return list(split_by_shard(chosen, [len(a) for a in per_shard]))


def wanted_states(cfg: PerturbConfig) -> list[str]:
    """The start, goal and alternative states, each once, in that order."""
    return [s for s in dict.fromkeys([cfg.start_state, cfg.goal_state, *cfg.alt_states]) if s]


def check_states(files: list[str], column: str, wanted: list[str]) -> None:
    """Every wanted state has cells in ``column``, else a named error listing the states there
    (read before any model loads: only that column)."""
    present = column_values(files, column)
    empty = [s for s in wanted if not present.get(s)]
    if empty:
        raise InputError(
            f"no cell of state(s) {empty} in column {column!r}; its states (cells): {listed_counts(present)}"
        )


def state_embeddings(
    cfg: PerturbConfig, spec: EmbedSpec, files: list[str], opts: Any
) -> dict[str, list[float]]:
    """Each state's embedding: the mean of its cells' mean-pooled embeddings, over every cell of
    the state (``--cells-where`` and ``--start-state`` do not apply). One pass of the actor pool
    over the shards, summed in shard order (the same vectors however the shards were scheduled),
    kept in the output folder, so a rerun reuses them."""
    from rankformer.cluster import map_shards_actors

    if not cfg.state_column:
        return {}
    kept = fs.join(cfg.out, STATES_FILE)
    if fs.exists(kept):  # the folder's job fingerprint matched: same model, corpus and states
        doc: dict[str, list[float]] = fs.read_json(kept, "delete it; the rerun computes it again")
        return doc
    wanted = wanted_states(cfg)
    every_cell = replace(spec, io=replace(spec.shard_io(), where={}))
    sample = state_sample(files, cfg.state_column, wanted, cfg.state_cells, cfg.seed)
    tasks = [
        {"uri": f, "index": i, "rows": rows} for i, (f, rows) in enumerate(zip(files, sample, strict=True))
    ]
    make = functools.partial(_make_state_sums, every_cell, cfg.state_column, wanted)
    parts = [pickle.loads(p) for p in map_shards_actors(tasks, make, opts, cfg.num_workers, gpus_of(cfg))]
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for part in sorted(parts, key=lambda x: x["index"]):
        for s, (vec, n) in part["states"].items():
            sums[s] = sums.get(s, 0) + vec
            counts[s] = counts.get(s, 0) + n
    empty = [s for s in wanted if s not in counts]
    if empty:
        raise InputError(f"no cell of state(s) {empty} in column {cfg.state_column!r}; check the state names")
    return {s: (sums[s] / counts[s]).tolist() for s in wanted}


def gpus_of(cfg: PerturbConfig) -> float:
    return 1.0 if cfg.use_gpu else 0.0
