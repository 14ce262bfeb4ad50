"""The perturbation actor: one model, the cells of one corpus shard per call, each cell's variants
scored against its original (the scores are described in :mod:`rankformer.perturb.job`).

Each cell's original forward pass runs once; its variants go through together in length-budgeted
batches (a deletion is one token shorter: no padding to a global maximum), each batch read back
while the next one runs. Memory is bounded by one shard's token lists, a window of originals'
states and two batches of variants: rows stream out in row groups, per-gene rows (up to length^2 a
cell) batch by batch.
"""

from __future__ import annotations

import functools
import pickle
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from rankformer import schema
from rankformer.config.types import PerturbKind, PerturbMode, Precision
from rankformer.embed.cells import Embedder, EmbedSpec
from rankformer.errors import InputError
from rankformer.job.actors import ModelSpec
from rankformer.job.cells import token_lists
from rankformer.job.shards import read_shard
from rankformer.model.perturbations import delete_each, perturb, positions_of
from rankformer.perturb.parts import (
    WINDOW_CELLS,
    WINDOW_TOKENS,
    Launched,
    Original,
    Perturbation,
    unit,
    windows,
)
from rankformer.perturb.rows import GeneSink, RowWriter, gene_rows_table, scores_schema, scores_table

if TYPE_CHECKING:
    import torch

    from rankformer.model.deletions import SharedDeletions


class Perturber(Embedder):
    """One model per actor: perturbs every cell of one corpus shard per call."""

    def __init__(self, spec: EmbedSpec, how: Perturbation | None = None) -> None:
        super().__init__(spec)
        self.how = how or Perturbation()

    def variants(self, cell: np.ndarray) -> np.ndarray:
        """The cell's perturbations, one a row: the genes each perturbs (tokens, in order), padded
        with -1: (perturbations, most genes in one)."""
        how = self.how
        genes = cell[cell >= self.gene_lo].astype(np.int64)
        pool = genes if how.mode == "all" else np.asarray(how.targets, dtype=np.int64)
        if how.kind != "overexpress" and how.mode != "all":
            pool = pool[np.isin(pool, genes)]
        anchor = how.anchor
        if anchor is not None:
            if how.kind != "overexpress" and anchor not in genes:
                return np.empty((0, 2), dtype=np.int64)
            others = pool[pool != anchor]
            return np.stack([np.full(len(others), anchor, dtype=np.int64), others], 1)
        if how.mode == "together":
            return pool[None] if len(pool) else np.empty((0, 0), dtype=np.int64)
        return pool[:, None]

    def score_cell(
        self, cell: np.ndarray, h0: torch.Tensor, cell_id: str, genes_out: GeneSink | None = None
    ) -> pa.Table:
        """One cell's rows: its variants in length-budgeted batches, scored against the original's
        states ``h0`` (one cell, its own length). With per-gene scores asked for, each batch's
        per-gene table goes to ``genes_out`` as it is computed (a cell has up to length^2 of them)."""
        parts: list[pa.Table] = []
        for batch in self._launch_cell(cell, h0, cell_id):
            self._finish(batch, parts, genes_out)
        return self._rows(parts)

    def _rows(self, parts: list[pa.Table]) -> pa.Table:
        """A cell's rows from its batches' tables (none: an empty table of the columns)."""
        return pa.concat_tables(parts) if parts else scores_schema(self.how.state_names).empty_table()

    def _launch_cell(self, cell: np.ndarray, h0: torch.Tensor, cell_id: str) -> Iterator[Launched]:
        """A cell's variant batches, each launched as the caller asks for the next."""
        from rankformer.model.batching import budget_batches
        from rankformer.model.deletions import SharedDeletions

        moved = self.variants(cell)
        seqs, at = self._sequences(cell, moved, cell_id)
        orig = self._original(cell, h0, cell_id)
        lengths = (
            np.full(len(moved), len(cell) - 1, np.int64)
            if seqs is None
            else np.asarray([len(s) for s in seqs], np.int64)
        )
        shared = None  # (no cap on variants a batch but the budget: on a GPU, each pass costs its host)
        for idx in budget_batches(lengths, self.max_tokens, len(moved)) if len(moved) else []:
            run = None  # a run of consecutive single deletions: through the shared first layer
            if at is not None and self._shares_deletions and bool((np.diff(at[idx]) == 1).all()):
                if shared is None:
                    shared = SharedDeletions(self.model, orig.cell_dev, self.layer)
                run = (shared, int(at[idx[0]]), len(idx))
            batch: list[np.ndarray] | np.ndarray | None = None  # (none: made on the device)
            if run is None and at is not None:
                batch = delete_each(cell, at[idx])
            elif run is None:
                assert seqs is not None  # (only single deletions go without sequences)
                batch = [seqs[i] for i in idx]
            yield self._launch(orig, idx, batch, moved[idx], run)

    @functools.cached_property
    def _shares_deletions(self) -> bool:
        from rankformer.model.deletions import shareable

        return shareable(self.model, self.layer)

    def _sequences(
        self, cell: np.ndarray, moved: np.ndarray, cell_id: str
    ) -> tuple[list[np.ndarray] | None, np.ndarray | None]:
        """Each perturbation's token sequence, or for single deletions the positions deleted
        instead (their sequences are made batch by batch, on the device for the shared first layer);
        an error naming a perturbation that would leave no gene."""
        how = self.how
        at = None
        if (
            how.kind == "delete"
            and moved.shape[1] == 1
            and len(cell) <= self.max_length
            and len(np.unique(cell)) == len(cell)
        ):
            at = positions_of(cell, moved[:, 0])  # every gene alone: the common case
            seqs = None  # (each deletes one of the cell's distinct genes: some gene is left if 2 were there)
            left = np.full(len(moved), int((cell >= self.gene_lo).sum()) >= 2)
        else:
            shift = max(1, round(how.shift * int((cell >= self.gene_lo).sum())))
            seqs = [
                perturb(cell, c[c >= 0], how.kind, self.max_length, self.cls, self.eos, shift) for c in moved
            ]
            left = np.asarray([(s >= self.gene_lo).any() for s in seqs], dtype=bool)
        if not left.all():
            c = moved[int(np.argmin(left))]
            c = c[c >= 0]
            raise InputError(
                f"perturbing {self.names(c)} would leave cell {cell_id} without genes; leave such cells "
                "out (--cells-where) or perturb fewer genes"
            )
        return seqs, at

    def _original(self, cell: np.ndarray, h0: torch.Tensor, cell_id: str) -> Original:
        """What every variant of the cell is scored against."""
        import torch

        from rankformer.model.device import to_device
        from rankformer.model.forward import mean_pool

        dev = self.device  # scores are computed where the states are; only the scores come back
        h0 = h0.to(dev)  # (already there when the original ran on the device)
        cell_dev = to_device(torch.from_numpy(cell.astype(np.int64)), dev)
        v0 = mean_pool(h0[None], (cell_dev >= self.gene_lo)[None])[0]
        at = np.flatnonzero(cell >= self.gene_lo)[::-1]
        rank = np.full(int(max(cell.max(), self.vocab.n_tokens)) + 1, -1, dtype=np.int64)
        rank[cell[at]] = np.arange(len(at) - 1, -1, -1)  # first occurrence wins
        states = self.how.states
        v0_unit = unit(v0)
        s_unit = s_cos0 = None
        if states:
            s_unit = self._state_matrix(states)
            s_cos0 = (v0_unit[None] * s_unit).sum(-1)
        return Original(cell_id, cell, cell_dev, unit(h0), v0_unit, rank, list(states), s_unit, s_cos0)

    def _state_matrix(self, states: dict[str, Any]) -> torch.Tensor:
        """The states' embeddings as unit rows, on the model's device (made once per set of states)."""
        import torch

        from rankformer.model.device import to_device

        kept = getattr(self, "_states_on_device", None)
        if kept is None or kept[0] is not states:
            rows = torch.from_numpy(np.asarray(list(states.values()), dtype=np.float32))
            kept = self._states_on_device = (states, unit(to_device(rows, self.device)))
        return kept[1]

    def _lut(self, orig: Original) -> torch.Tensor:
        """Where each gene token stood in the original cell (-1: not there), on the device: variants'
        states are matched to the original's by gene with one gather per batch."""
        import torch

        from rankformer.model.device import to_device

        if orig.lut is None:  # a gene's rank indexes the cell's gene positions (its first occurrence)
            at = np.flatnonzero(orig.cell >= self.gene_lo)
            lut = np.where(orig.rank >= 0, at[orig.rank.clip(min=0)] if len(at) else -1, -1)
            orig.lut = to_device(torch.from_numpy(lut.astype(np.int64)), self.device)
        return orig.lut

    def _launch(
        self,
        orig: Original,
        idx: np.ndarray,
        seqs: list[np.ndarray] | np.ndarray | None,
        moved: np.ndarray,
        run: tuple[SharedDeletions, int, int] | None = None,
    ) -> Launched:
        """One forward pass over a batch of a cell's variants and their scores, computed where the
        states are; on a GPU this only queues the work, and the scores' copy to the host. ``run``:
        the batch deletes consecutive positions (from, count), its ids and states come from the
        cell's shared first layer (``seqs`` unused)."""
        import torch

        from rankformer.model.batching import pad_batch
        from rankformer.model.device import queued_mark, to_device, to_host_queued
        from rankformer.model.forward import Batch, hidden_states, mean_pool

        dev = self.device
        if run is not None:
            ids_dev, pos = run[0].variants(run[1], run[2])
            h1 = run[0].states(run[1], run[2])
            genes = ids_dev >= self.gene_lo  # (a deletion's tokens are distinct: each where it stood)
            p0, common = torch.where(genes, pos, -1), genes
        else:
            assert seqs is not None
            ids, attn = pad_batch(seqs, self.pad)
            ids_dev = to_device(ids, dev)  # once: the forward pass and the scores use it
            h1 = hidden_states(self.model, Batch(idx, ids_dev, attn), self.layer, dev)
            p0, common = self._matched(ids_dev, moved, self._lut(orig))
        v1 = mean_pool(h1, ids_dev >= self.gene_lo)
        # (B, L1), 0 where not matched (where(), not a product: a pad row's value never leaks)
        gene_cos = torch.where(common, (unit(h1) * orig.h0_unit[p0.clamp(min=0)]).sum(-1), 0.0)
        n_common = common.sum(1)
        v1 = unit(v1)
        scores = [
            (orig.v0_unit[None] * v1).sum(-1),
            gene_cos.sum(1) / n_common.clamp(min=1),
            n_common.float(),
        ]
        if orig.s_unit is not None and orig.s_cos0 is not None:
            scores += ((v1[:, None] * orig.s_unit[None]).sum(-1) - orig.s_cos0).unbind(1)
        # what comes back is queued for the host (pinned memory, on a GPU), ready once `done` is
        # reached: nothing here makes the host wait for the device
        table = to_host_queued(torch.stack(scores, 1))  # (B, 3 + states)
        per_gene = None
        if self.how.per_gene:
            per_gene = (
                to_host_queued(ids_dev),
                to_host_queued(p0),
                to_host_queued(common),
                to_host_queued(gene_cos),
            )
        return Launched(orig, moved, table, queued_mark(dev), per_gene)

    def _finish(self, batch: Launched, parts: list[pa.Table], genes_out: GeneSink | None) -> None:
        """A launched batch's rows appended to ``parts`` as a table (after its scores reach the
        host), its per-gene table given to ``genes_out``."""
        if batch.done is not None:
            batch.done.synchronize()
        orig, moved = batch.orig, batch.moved
        names = self.gene_id_array.take(pa.array(moved[moved >= 0]))  # each variant's genes, in order
        perturbed = pa.ListArray.from_arrays(
            pa.array(np.r_[0, np.cumsum((moved >= 0).sum(1))], pa.int32()), names
        )
        ranks = np.where(moved >= 0, orig.rank[moved.clip(min=0)], -1)
        best = np.where(ranks >= 0, ranks, np.iinfo(np.int64).max).min(1)  # the best-ranked gene present
        rank = np.where(best < np.iinfo(np.int64).max, best, -1)
        parts.append(scores_table(orig.cell_id, perturbed, rank, batch.table.float().numpy(), orig.s_names))
        if batch.genes is not None and genes_out is not None:
            ids, p0, common, gene_cos = batch.genes
            genes_out(self._gene_rows(orig.cell_id, perturbed, ids, p0, common, gene_cos))

    def _gene_rows(
        self,
        cell_id: str,
        perturbed: pa.Array,
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
        cos = gene_cos.numpy()[j, at].astype(np.float64)
        return gene_rows_table(cell_id, perturbed, j, self.gene_id_array.take(ids.numpy()[j, at]), cos)

    @functools.cached_property
    def gene_id_array(self) -> pa.Array:
        """Gene id by token id (null at the special tokens), for column-wise lookups."""
        return pa.array(self.vocab.gene_id_by_token, pa.string())

    def _matched(
        self, ids: torch.Tensor, moved: np.ndarray, lut: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For a batch of variants (``ids`` where ``lut`` is): each position's position in the
        original cell (-1 if none), and whether it holds a gene present in both that was not itself
        perturbed."""
        import torch

        from rankformer.model.device import to_device

        p0 = lut[ids]
        common = (p0 >= 0) & (ids >= self.gene_lo)
        if self.how.kind == "delete":  # a deleted gene is in none of the variant's positions
            return p0, common
        mv = to_device(torch.from_numpy(np.ascontiguousarray(moved)), ids.device)
        hit = (ids[:, :, None] == mv[:, None, :]).any(-1)
        return p0, common & ~hit

    def names(self, tokens: list[int] | np.ndarray) -> list[str]:
        return self.vocab.gene_id_by_token[tokens].tolist()

    @classmethod
    def on_demand(
        cls,
        model: str,
        tracking_uri: str,
        use_gpu: bool,
        precision: Precision,
        layer: str,
        max_tokens: int | None = None,
    ) -> Perturber:
        """One loaded model for cells given per call (the endpoint, the in-memory API): it embeds
        with mean pooling and perturbs as :meth:`configure` says."""
        return cls(EmbedSpec(ModelSpec(model, tracking_uri, use_gpu, precision, layer, max_tokens)))

    def configure(
        self,
        *,
        kind: PerturbKind,
        mode: PerturbMode,
        targets: list[int],
        anchor: int | None,
        shift: float,
        per_gene: bool,
        states: dict[str, Any],
    ) -> None:
        """What the next cells are perturbed with (the job sets it once; the endpoint and the
        in-memory API per call)."""
        self.how = Perturbation(kind, mode, targets, anchor, shift, per_gene, states)

    def scored(
        self, cells: list[np.ndarray], ids: list[str], genes_out: GeneSink | None = None
    ) -> Iterator[pa.Table]:
        """Each cell's rows, in input order (per-gene tables to ``genes_out``, in the same order).
        The originals run in length-grouped batches over a window of cells and wait for their
        turn (memory: one window's original states, two batches of variants). Each batch is
        finished while the next one runs: on a GPU the host prepares and reads batches while the
        device computes, instead of the two taking turns. A GPU out of memory is an error naming
        the fix (fewer tokens a batch)."""
        from rankformer.model.device import budget_named_on_oom

        with budget_named_on_oom(self.max_tokens):
            yield from self._scored(cells, ids, genes_out)

    def _scored(
        self, cells: list[np.ndarray], ids: list[str], genes_out: GeneSink | None
    ) -> Iterator[pa.Table]:
        from rankformer.model.forward import batches, hidden_states

        # launched batches, oldest first, each with its cell's tables; None marks the end of a cell
        queue: deque[tuple[Launched | None, list[pa.Table]]] = deque()

        def finish(keep: int) -> Iterator[pa.Table]:
            """Finish batches until ``keep`` remain launched; each cell's rows once complete."""
            while queue and (queue[0][0] is None or sum(b is not None for b, _ in queue) > keep):
                batch, parts = queue.popleft()
                if batch is None:
                    yield self._rows(parts)
                else:
                    self._finish(batch, parts, genes_out)

        lengths = [len(c) for c in cells]
        for lo, hi in windows(lengths, WINDOW_CELLS, WINDOW_TOKENS):
            window = cells[lo:hi]
            originals: list[Any] = [None] * len(window)
            for b in batches(window, self.pad, self.max_tokens):  # each original runs once
                h = hidden_states(self.model, b, self.layer, self.device)
                for j, i in enumerate(b.index.tolist()):
                    originals[i] = h[j, : len(window[i])]
            for i in range(len(window)):
                h0, originals[i] = originals[i], None
                parts: list[pa.Table] = []
                for batch in self._launch_cell(window[i], h0, ids[lo + i]):
                    queue.append((batch, parts))
                    yield from finish(1)
                queue.append((None, parts))
                yield from finish(1)
        yield from finish(0)

    def __call__(self, task: dict[str, Any]) -> bytes:
        io = self.spec.shard_io()
        table = read_shard(task["uri"], io.columns, io.where, task.get("rows"))
        cells = token_lists(table)
        ids = [str(x) for x in table.column(schema.CELL_ID).to_pylist()]
        genes_name = "genes-" + task["name"] if self.how.per_gene else None
        with (
            RowWriter(io.out, task["name"], self.how.state_names) as rows,
            RowWriter(io.out, genes_name, None) as per_gene,
        ):
            for cell_rows in self.scored(cells, ids, per_gene.add_table):  # in corpus order
                rows.add_table(cell_rows)
        return pickle.dumps({"cells": len(cells), "rows": rows.n})
