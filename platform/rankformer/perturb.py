"""`rankformer perturb`: in silico deletion, overexpression, inhibition and activation of genes in
every selected cell, scored by how the cell's embedding moves; `rankformer perturb stats`.

Per (cell, perturbation) row, with states at ``--layer``:

* ``cell_cosine``: cosine of the cell's mean-pooled gene-token embedding before and after;
* ``gene_mean_cosine``: the reference's per-cell score, the mean over the remaining genes of each
  gene's state cosine before/after, matched by gene (not position); dominated by the position shift
  a deletion causes for every later gene, so it runs lower for genes near the top of the cell;
* ``shift_<state>`` (with ``--state-column``): cos(perturbed cell, state) - cos(original cell, state),
  a state's embedding being the mean of its cells' mean-pooled embeddings.

Each cell's original forward pass runs once; its variants go through together in length-budgeted
batches (a deletion is one token shorter: no padding to a global maximum). Corpus shards are spread
over a pool of Ray actors, each writing its output shard as it finishes; a rerun skips finished
shards. Memory is bounded by one shard's token lists, a window of originals' states and one batch of
variants: rows stream out in row groups, per-gene rows (up to length^2 a cell) batch by batch.
Statistics over the output: `rankformer.perturb_stats`.
"""

from __future__ import annotations

import functools
import pickle
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rankformer import schema
from rankformer.classify.data import token_lists
from rankformer.embed import Embedder, _read_shard, sample_note, sample_rows, shard_tasks
from rankformer.errors import InputError
from rankformer.infer_config import PerturbConfig
from rankformer.io import fs
from rankformer.model.perturbations import delete_each, perturb
from rankformer.perturb_rows import GeneSink, RowWriter, gene_rows_table
from rankformer.perturb_states import STATES_FILE, gpus_of, state_embeddings
from rankformer.perturb_stats import SYMBOLS_FILE, result_paths

if TYPE_CHECKING:
    import torch


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


@dataclass
class _Original:
    """A cell before perturbation: its states and mean-pooled embedding, where each gene stood
    (``lut``: token -> position, -1 if absent), each gene's rank, and the states' embeddings
    (``s_mat``) with the original's cosines to them."""

    cell_id: str
    h0: torch.Tensor
    v0: torch.Tensor
    lut: np.ndarray
    rank: dict[int, int]
    s_names: list[str]
    s_mat: torch.Tensor | None
    s_cos0: torch.Tensor | None


class Perturber(Embedder):
    """One model per actor: perturbs every cell of one corpus shard per call."""

    def variants(self, cell: np.ndarray) -> list[list[int]]:
        spec = self.spec
        listed: list[int] = spec["targets"]
        genes = [t for t in cell.tolist() if t >= self.gene_lo]
        present = set(genes)
        pool = genes if spec["mode"] == "all" else listed
        if spec["kind"] != "overexpress":
            pool = [g for g in pool if g in present]
        anchor = spec["anchor"]
        if anchor is not None:
            if spec["kind"] != "overexpress" and anchor not in present:
                return []
            return [[anchor, g] for g in pool if g != anchor]
        if spec["mode"] == "together":
            return [pool] if pool else []
        return [[g] for g in pool]

    def score_cell(
        self, cell: np.ndarray, h0: torch.Tensor, cell_id: str, genes_out: GeneSink | None = None
    ) -> list[dict[str, Any]]:
        """One cell's rows: its variants in length-budgeted batches, scored against the original's
        states ``h0`` (one cell, its own length). With per-gene scores asked for, each batch's
        per-gene table goes to ``genes_out`` as it is computed (a cell has up to length^2 of them)."""
        from rankformer.model.batching import budget_batches

        combos = self.variants(cell)
        seqs = self._sequences(cell, combos, cell_id)
        orig = self._original(cell, h0, cell_id)
        rows: list[dict[str, Any]] = []
        sink = genes_out if self.spec["per_gene"] else None
        lengths = np.asarray([len(s) for s in seqs], dtype=np.int64)
        for idx in budget_batches(lengths, self.spec["max_tokens"], 256) if len(seqs) else []:
            self._score_batch(orig, idx, [seqs[i] for i in idx], [combos[i] for i in idx], rows, sink)
        return rows

    def _sequences(self, cell: np.ndarray, combos: list[list[int]], cell_id: str) -> list[np.ndarray]:
        """Each perturbation's token sequence; an error naming one that would leave no gene."""
        spec = self.spec
        if (
            spec["kind"] == "delete"
            and all(len(c) == 1 for c in combos)
            and len(cell) <= spec["max_length"]
            and len(np.unique(cell)) == len(cell)
        ):
            seqs = delete_each(cell, [c[0] for c in combos])  # every gene alone: the common case
        else:
            shift = max(1, round(spec["shift"] * int((cell >= self.gene_lo).sum())))
            seqs = [
                perturb(cell, c, spec["kind"], spec["max_length"], self.cls, self.eos, shift) for c in combos
            ]
        for c, s in zip(combos, seqs, strict=True):
            if not (s >= self.gene_lo).any():
                raise InputError(
                    f"perturbing {self.names(c)} would leave cell {cell_id} without genes; leave such cells "
                    "out (--cells-where) or perturb fewer genes"
                )
        return seqs

    def _original(self, cell: np.ndarray, h0: torch.Tensor, cell_id: str) -> _Original:
        """What every variant of the cell is scored against."""
        import torch

        from rankformer.infer import mean_pool

        dev = self.device  # scores are computed where the states are; only the scores come back
        h0 = h0.to(dev)
        v0 = mean_pool(h0[None], torch.as_tensor(cell >= self.gene_lo, device=dev)[None])[0]
        # where each gene token stood in the original cell (-1: not there); variants' states are
        # matched to the original's by gene with one gather per batch
        at = np.flatnonzero(cell >= self.gene_lo)
        lut = np.full(int(max(cell.max(), self.vocab.n_tokens)) + 1, -1, dtype=np.int64)
        lut[cell[at[::-1]]] = at[::-1]  # first occurrence wins
        rank = {g: r for r, g in reversed(list(enumerate(cell[at].tolist())))}
        states = self.spec["states"]
        s_mat = s_cos0 = None
        if states:
            s_mat = torch.tensor(np.asarray(list(states.values())), dtype=torch.float32, device=dev)
            s_cos0 = _cos(v0[None], s_mat)
        return _Original(cell_id, h0, v0, lut, rank, list(states), s_mat, s_cos0)

    def _score_batch(
        self,
        orig: _Original,
        idx: np.ndarray,
        seqs: list[np.ndarray],
        combos: list[list[int]],
        rows: list[dict[str, Any]],
        genes_out: GeneSink | None,
    ) -> None:
        """One forward pass over a batch of a cell's variants; their rows appended to ``rows``,
        their per-gene table given to ``genes_out``."""
        import torch

        from rankformer.infer import Batch, hidden_states, mean_pool
        from rankformer.model.batching import pad_batch

        dev = self.device
        ids, attn = pad_batch(seqs, self.pad)
        h1 = hidden_states(self.model, Batch(idx, ids, attn), self.layer, self.device)
        v1 = mean_pool(h1, (ids >= self.gene_lo).to(dev))
        cell_cos = _cos(orig.v0[None], v1).tolist()
        shifts = None
        if orig.s_mat is not None and orig.s_cos0 is not None:
            shifts = (_cos(v1[:, None], orig.s_mat[None]) - orig.s_cos0).tolist()
        p0, common = self._matched(ids, combos, orig.lut)
        # (B, L1), 0 where not matched (where(), not a product: a pad row's value never leaks)
        gene_cos = torch.where(common.to(dev), _cos(h1, orig.h0[p0.to(dev).clamp(min=0)]), 0.0)
        n_common = common.sum(1)
        mean_cos = (gene_cos.sum(1) / n_common.to(dev).clamp(min=1)).tolist()
        perturbed = [self.names(c) for c in combos]
        for j, combo in enumerate(combos):
            row = {
                schema.CELL_ID: orig.cell_id,
                "perturbed": perturbed[j],
                "rank": min((orig.rank[g] for g in combo if g in orig.rank), default=-1),
                "cell_cosine": cell_cos[j],
                "gene_mean_cosine": mean_cos[j] if n_common[j] > 0 else float("nan"),
            }
            if shifts is not None:
                row.update({f"shift_{k}": d for k, d in zip(orig.s_names, shifts[j], strict=True)})
            rows.append(row)
        if genes_out is not None:
            genes_out(self._gene_rows(orig.cell_id, perturbed, ids, p0, common, gene_cos))

    def _gene_rows(
        self,
        cell_id: str,
        perturbed: list[list[str]],
        ids: torch.Tensor,
        p0: torch.Tensor,
        common: torch.Tensor,
        gene_cos: torch.Tensor,
    ) -> pa.Table:
        """A batch's per-gene rows, built column-wise: each variant's affected genes in the
        original cell's order."""
        import torch

        j, at = (t.numpy() for t in torch.nonzero(common, as_tuple=True))
        order = np.lexsort((p0.numpy()[j, at], j))
        j, at = j[order], at[order]
        cos = gene_cos.cpu().numpy()[j, at].astype(np.float64)
        return gene_rows_table(cell_id, perturbed, j, self.gene_id_array().take(ids.numpy()[j, at]), cos)

    def gene_id_array(self) -> pa.Array:
        """Gene id by token id (empty for the special tokens), for column-wise lookups."""
        if getattr(self, "_gene_ids", None) is None:
            ids = [""] * (max(self.gene_of) + 1)
            for t, g in self.gene_of.items():
                ids[t] = g
            self._gene_ids = pa.array(ids, pa.string())
        return self._gene_ids

    def _matched(
        self, ids: torch.Tensor, moved: list[list[int]], lut: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For a batch of variants: each position's position in the original cell (-1 if none),
        and whether it holds a gene present in both that was not itself perturbed."""
        import torch

        p0 = torch.from_numpy(lut[ids.numpy()])
        width = max(len(m) for m in moved)
        mv = torch.tensor([m + [-1] * (width - len(m)) for m in moved], dtype=torch.int64)
        hit = (ids[:, :, None] == mv[:, None, :]).any(-1)
        return p0, (p0 >= 0) & (ids >= self.gene_lo) & ~hit

    def names(self, tokens: list[int]) -> list[str]:
        return [self.gene_of[t] for t in tokens]

    @classmethod
    def on_demand(
        cls,
        model: str,
        tracking_uri: str,
        use_gpu: bool,
        precision: str,
        layer: str,
        max_tokens: int = 16_384,
    ) -> Perturber:
        """One loaded model for cells given per call (the endpoint, the in-memory API): it embeds
        with mean pooling and perturbs as :meth:`configure` says."""
        return cls(
            {
                "model": model,
                "tracking_uri": tracking_uri,
                "use_gpu": use_gpu,
                "precision": precision,
                "layer": layer,
                "level": "cell",
                "pooling": "mean",
                "gene_stat": "mean",
                "max_tokens": max_tokens,
                "states": {},
                "state_names": [],
                "per_gene": False,
            }
        )

    def configure(
        self,
        *,
        kind: str,
        mode: str,
        targets: list[int],
        anchor: int | None,
        shift: float,
        per_gene: bool,
        states: dict[str, Any],
    ) -> None:
        """What the next cells are perturbed with (the job sets it once; the endpoint and the
        in-memory API per call)."""
        self.spec = {
            **self.spec,
            "kind": kind,
            "mode": mode,
            "targets": targets,
            "anchor": anchor,
            "shift": shift,
            "per_gene": per_gene,
            "max_length": self.max_length,
            "states": states,
            "state_names": list(states),
        }

    def scored(
        self, cells: list[np.ndarray], ids: list[str], genes_out: GeneSink | None = None
    ) -> Iterator[list[dict[str, Any]]]:
        """Each cell's rows, in input order (per-gene tables to ``genes_out``, in the same order).
        The originals run in length-grouped batches over a window of cells and wait for their
        turn (memory: one window's original states, one batch of a cell's variants)."""
        from rankformer.infer import batches, hidden_states

        lengths = [len(c) for c in cells]
        for lo, hi in windows(lengths, WINDOW_CELLS, WINDOW_TOKENS):
            window = cells[lo:hi]
            originals: list[Any] = [None] * len(window)
            for b in batches(window, self.pad, self.spec["max_tokens"]):  # each original runs once
                h = hidden_states(self.model, b, self.layer, self.device)
                for j, i in enumerate(b.index.tolist()):
                    originals[i] = h[j, : len(window[i])]
            for i in range(len(window)):
                h0, originals[i] = originals[i], None
                yield self.score_cell(window[i], h0, ids[lo + i], genes_out)

    def __call__(self, task: dict[str, Any]) -> bytes:
        spec = self.spec
        table = _read_shard(task["uri"], spec["columns"], spec["where"], task.get("rows"))
        cells = token_lists(table)
        ids = [str(x) for x in table.column(schema.CELL_ID).to_pylist()]
        genes_name = "genes-" + task["name"] if spec["per_gene"] else None
        with (
            RowWriter(spec["out"], task["name"], spec["state_names"]) as rows,
            RowWriter(spec["out"], genes_name, None) as per_gene,
        ):
            for cell_rows in self.scored(cells, ids, per_gene.add_table):  # in corpus order
                rows.add(cell_rows)
        return pickle.dumps({"cells": len(cells), "rows": rows.n})


WINDOW_CELLS = 256  # at most this many cells' originals run before their variants
WINDOW_TOKENS = 65_536  # ... and at most this many tokens of them (one cell, if longer)


def windows(lengths: list[int], max_cells: int, max_tokens: int) -> Iterator[tuple[int, int]]:
    """Consecutive [lo, hi) runs of cells, each at most ``max_cells`` cells and ``max_tokens``
    tokens (a longer cell alone)."""
    lo, n = 0, len(lengths)
    while lo < n:
        hi, tokens = lo + 1, lengths[lo]
        while hi < n and hi - lo < max_cells and tokens + lengths[hi] <= max_tokens:
            tokens += lengths[hi]
            hi += 1
        yield lo, hi
        lo = hi


def _make_perturber(spec: dict[str, Any]) -> Callable[[dict[str, Any]], bytes]:
    return Perturber(spec)


def targets_of(
    vocab: Any, genes: list[str], anchor: str | None, mode: str, missing: str
) -> tuple[list[int], int | None, list[str]]:
    """(the listed genes' tokens, the anchor's token, the names not in the vocabulary)."""
    from rankformer.classify.labels import symbol_index

    names = symbol_index(vocab)
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


def _job_spec(cfg: PerturbConfig, uri: str, info: Any, targets: dict[str, Any]) -> dict[str, Any]:
    """What every actor needs: the model, what to read and where to write, how to perturb."""
    from rankformer.classify.data import check_columns, corpus_columns, parse_where

    where = parse_where(cfg.cells_where)
    state = [cfg.state_column] if cfg.state_column else []
    check_columns(cfg.corpus, corpus_columns(cfg.corpus), [*where, *state], "the")
    if cfg.start_state and cfg.state_column:
        where[cfg.state_column] = [cfg.start_state]
    return {
        "model": cfg.model,
        "tracking_uri": uri,
        "use_gpu": cfg.use_gpu,
        "precision": cfg.precision,
        "layer": cfg.layer,
        "level": "cell",
        "pooling": "mean",
        "max_tokens": cfg.max_tokens,
        "columns": [schema.INPUT_IDS, schema.CELL_ID, *state],
        "where": where,
        "out": cfg.out,
        "kind": cfg.kind,
        "mode": cfg.mode,
        **targets,
        "shift": cfg.shift,
        "per_gene": cfg.per_gene,
        "max_length": info.max_length,
    }


def run_perturb(cfg: PerturbConfig) -> dict[str, Any]:
    from rankformer import tracking
    from rankformer.classify.common import JobOutput, check_model_and_corpus
    from rankformer.cluster import map_shards_actors
    from rankformer.config import ClusterOptions
    from rankformer.corpus.tokenize import corpus_files

    uri = tracking.resolve_uri(cfg.tracking_uri)
    info, manifest = check_model_and_corpus(cfg.model, cfg.corpus, uri, cfg.layer)
    listed, anchor, missing = targets_of(info.vocab, cfg.genes, cfg.anchor, cfg.mode, cfg.missing)
    spec = _job_spec(cfg, uri, info, {"targets": listed, "anchor": anchor})
    placement = ("num_workers", "ray_address", "in_process", "use_gpu")
    what = {k: v for k, v in asdict(cfg).items() if k not in placement}
    out = JobOutput(cfg.out, "perturb", what, keep_on_change=False)
    named = info.vocab.gene_names
    symbols = {g: named[g] for g in info.vocab.gene_ids if named.get(g)}
    if symbols:  # for the statistics' tables (the rows name genes by id)
        out.write_json(SYMBOLS_FILE, symbols)
    files = corpus_files(cfg.corpus, vocab_hash=manifest["vocab_hash"])
    opts = ClusterOptions(ray_address=cfg.ray_address, in_process=cfg.in_process)
    states = state_embeddings(cfg, spec, files, opts)
    if states:
        out.write_json(STATES_FILE, states)
    spec |= {"states": states, "state_names": list(states)}
    sample, selected = sample_rows(files, spec["where"], cfg.limit_cells, cfg.seed)
    shards, pending = shard_tasks(cfg.out, files, sample)
    make = functools.partial(_make_perturber, spec)
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
        f"{len(pending)} shards ({summary['shards_done_before']} of {len(shards)} done before); "
        f"{len(missing)} genes not in the vocabulary -> {cfg.out}"
    )
    return summary


def read_results(out: str, per_gene: bool = False) -> pa.Table:
    tables = []
    for path in result_paths(out, per_gene):
        with fs.open_input(path) as f:
            tables.append(pq.read_table(f))
    return pa.concat_tables(tables)
