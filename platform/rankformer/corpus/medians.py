"""Exact per-gene medians of nonzero normalized values (count / n_counts * 10,000), distributed.

Geneformer used approximate t-digests. We are exact, in a few passes over row-range shards, with
memory per worker bounded by genes x bins (never by corpus size):

1. Histogram pass: every shard counts its values into fixed log-spaced bins per gene; the driver
   adds the shard histograms and, knowing each gene's count n, finds the bin(s) holding the two
   middle ranks (n-1)//2 and n//2, and how many values lie below them.
2. Refine passes (only for genes whose median bin still holds more than ``collect_limit`` values):
   the same, with linear bins inside each gene's current interval.
3. Collect pass: shards return the few values inside each gene's final interval; the driver sorts
   them and reads off the middle ranks. median = v[(n-1)//2] for odd n, the mean of v[n//2 - 1]
   and v[n//2] for even n, exactly as numpy.median of all the values.

Bin edges are explicit float64 values compared exactly, so a value is counted in exactly one bin
in every pass, and the ranks found by counting are the ranks in the sorted values.
"""

from __future__ import annotations

import io
import json
import resource
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from rankformer.cluster import Runner, map_shards
from rankformer.config.corpus import ReadOptions, VocabBuildConfig, to_dict
from rankformer.corpus.cells import (
    Shard,
    input_symbols,
    inspect_inputs,
    iter_chunks,
    plan_shards,
    warn_if_normalized,
)
from rankformer.corpus.kernels import gene_values, histogram_values, select_in_interval
from rankformer.errors import InputError
from rankformer.io.sources import open_source
from rankformer.vocab.gene_vocab import (
    ENSEMBL_RE,
    V1_SPECIALS,
    V2_SPECIALS,
    GeneVocab,
    build_vocab,
    guess_id_kind,
    normalize_gene_id,
    read_gene_table,
)

MAX_PASSES = 40


def global_edges(n_bins: int, log2_lo: float = -12.0, log2_hi: float = 16.0) -> np.ndarray:
    """n_bins + 1 explicit edges: 0, then log-spaced 2**lo .. 2**hi, then +inf (open ends)."""
    inner = np.exp2(np.linspace(log2_lo, log2_hi, n_bins - 1))
    return np.concatenate([[0.0], inner, [np.inf]])


@dataclass
class MedianSearch:
    """Driver-side state. Each gene has one target rank (odd n) or two (even n); target t < G is
    gene t's rank (n-1)//2, target G + g is gene g's rank n//2. Per target: an interval [lo, hi)
    known to hold that rank, how many values lie below it and inside it, and the value once found.
    """

    n: np.ndarray  # nonzero values per gene

    def __post_init__(self) -> None:
        g = len(self.n)
        self.rank = np.concatenate([(self.n - 1) // 2, self.n // 2])
        self.gene = np.concatenate([np.arange(g), np.arange(g)])
        self.lo = np.zeros(2 * g)
        self.hi = np.full(2 * g, np.inf)
        self.below = np.zeros(2 * g, np.int64)
        self.inside = np.concatenate([self.n, self.n]).astype(np.int64)
        self.value = np.full(2 * g, np.nan)
        self.live = np.concatenate([self.n > 0, (self.n > 0) & (self.n % 2 == 0)])

    def absorb_histogram(self, targets: np.ndarray, hist: np.ndarray, edges: np.ndarray) -> None:
        """hist: (len(targets), bins) counts inside each target's interval; edges: (len, bins+1)."""
        cum = np.cumsum(hist, axis=1)
        rows = np.arange(len(targets))
        rel = self.rank[targets] - self.below[targets]
        b = (cum <= rel[:, None]).sum(axis=1)
        before = np.where(b > 0, cum[rows, np.maximum(b - 1, 0)], 0)
        self.below[targets] += before
        self.inside[targets] = hist[rows, b]
        self.lo[targets] = edges[rows, b]
        self.hi[targets] = edges[rows, b + 1]

    def pending(self, collect_limit: int, gmax: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(targets to refine, targets to collect). Infinite upper bounds become the gene's max."""
        open_top = self.live & np.isinf(self.hi)
        self.hi[open_top] = np.nextafter(gmax[self.gene[open_top]], np.inf)
        single = self.live & (np.nextafter(self.lo, np.inf) >= self.hi)  # one possible value
        self.value[single] = self.lo[single]
        self.live &= ~single
        refine = self.live & (self.inside > collect_limit)
        return np.flatnonzero(refine), np.flatnonzero(self.live & ~refine)

    def absorb_collected(self, targets: np.ndarray, values: list[np.ndarray]) -> None:
        for t, v in zip(targets.tolist(), values, strict=True):
            self.value[t] = np.sort(v)[self.rank[t] - self.below[t]]
        self.live[targets] = False

    def medians(self) -> np.ndarray:
        g = len(self.n)
        odd = self.n % 2 == 1
        return np.where(odd, self.value[:g], (self.value[:g] + self.value[g:]) / 2)


def _to_npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def _from_npz(blob: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _shard_values(task: dict[str, Any]):  # type: ignore[no-untyped-def]
    """(gene index, value) arrays of each chunk of the shard."""
    read = ReadOptions(**json.loads(task["read"]))
    arrays = _from_npz(task["arrays"])
    col_gene = arrays[f"col_gene_{task['file_index']}"]
    shard = Shard(task["file_index"], task["uri"], 0, task["start"], task["stop"])
    has_dups = len(np.unique(col_gene[col_gene >= 0])) != int((col_gene >= 0).sum())
    with open_source(shard.uri, read.gene_id_column, read.counts) as src:
        for chunk in iter_chunks(src, shard, read):
            x = chunk.counts
            yield (
                arrays,
                gene_values(
                    x.data.astype(np.float64),
                    x.indices,
                    x.indptr.astype(np.int64),
                    chunk.n_counts.astype(np.float64),
                    col_gene,
                    has_dups,
                    int(task["n_genes"]),
                ),
            )


def histogram_shard(task: dict[str, Any]) -> bytes:
    n_bins, n_genes = int(task["n_bins"]), int(task["n_genes"])
    acc: np.ndarray | None = None
    gmax = np.zeros(n_genes)
    for arrays, (genes, values) in _shard_values(task):
        if acc is None:
            acc = np.zeros(len(arrays["lo"]) * n_bins, np.int64)
        histogram_values(
            genes,
            values,
            arrays["slot_a"],
            arrays["slot_b"],
            arrays["lo"],
            arrays["hi"],
            arrays["edges"],
            n_bins,
            acc,
            gmax,
        )
    assert acc is not None
    nz = np.flatnonzero(acc)
    return _to_npz(code=nz, count=acc[nz], gmax=gmax, rss_mb=_peak_rss_mb())


def collect_shard(task: dict[str, Any]) -> bytes:
    parts_s, parts_v = [], []
    for arrays, (genes, values) in _shard_values(task):
        s, v = select_in_interval(
            genes, values, arrays["slot_a"], arrays["slot_b"], arrays["lo"], arrays["hi"]
        )
        parts_s.append(s)
        parts_v.append(v)
    return _to_npz(slot=np.concatenate(parts_s), value=np.concatenate(parts_v), rss_mb=_peak_rss_mb())


def _peak_rss_mb() -> np.ndarray:
    """This worker process's peak resident memory (run-time facts travel to the driver only)."""
    return np.asarray(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


@dataclass
class MedianResult:
    medians: np.ndarray  # per gene, NaN where never expressed
    n_nonzero: np.ndarray  # nonzero cells per gene
    passes: int  # passes over the corpus
    peak_rss_mb: float  # largest worker peak memory seen


def _resolve_genes(raw_ids: list[str], aliases: dict[str, str]) -> list[str | None]:
    out: list[str | None] = []
    for raw in raw_ids:
        key = normalize_gene_id(raw)
        gene = aliases.get(key, key)
        out.append(gene if gene and ENSEMBL_RE.match(gene) else None)
    return out


def _run_pass(
    fn: Any, base: list[dict[str, Any]], arrays: dict[str, np.ndarray], cfg: VocabBuildConfig, runner: Runner
) -> list[dict[str, np.ndarray]]:
    blob = _to_npz(**arrays)
    tasks = [{**t, "arrays": blob} for t in base]
    return [_from_npz(p) for p in runner(tasks, fn, cfg.cluster)]


def linear_edges(lo: np.ndarray, hi: np.ndarray, n_bins: int) -> np.ndarray:
    """(len(lo), n_bins + 1) edges, the same float64 operations as the kernel's linear_edge."""
    j = np.arange(n_bins + 1)[None, :]
    e = np.minimum(lo[:, None] + (hi - lo)[:, None] * (j / n_bins), hi[:, None])
    e[:, n_bins] = hi
    return e


def _slot_arrays(targets: np.ndarray, n_genes: int) -> dict[str, np.ndarray]:
    """slot_a/slot_b: for each gene the slot of its first/second target (-1 when not pending)."""
    slot_a = np.full(n_genes, -1, np.int32)
    slot_b = np.full(n_genes, -1, np.int32)
    first = targets < n_genes
    slot_a[targets[first]] = np.flatnonzero(first)
    slot_b[targets[~first] - n_genes] = np.flatnonzero(~first)
    return {"slot_a": slot_a, "slot_b": slot_b}


class _Passes:
    """The passes of one median search over the shards: what every task reads, and the largest
    worker memory seen."""

    def __init__(
        self,
        cfg: VocabBuildConfig,
        n_genes: int,
        col_genes: list[np.ndarray],
        shards: list[Shard],
        runner: Runner,
    ) -> None:
        self.cfg, self.runner, self.n_genes, self.peak_mb = cfg, runner, n_genes, 0.0
        read = json.dumps(to_dict(cfg.read))
        self.base = [
            {
                "file_index": s.file_index,
                "uri": s.uri,
                "start": s.start,
                "stop": s.stop,
                "n_genes": n_genes,
                "n_bins": cfg.histogram_bins,
                "read": read,
            }
            for s in shards
        ]
        self.files = {f"col_gene_{i}": c for i, c in enumerate(col_genes)}

    def _run(self, fn: Any, arrays: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        parts = _run_pass(fn, self.base, {**self.files, **arrays}, self.cfg, self.runner)
        self.peak_mb = max([self.peak_mb, *(float(p["rss_mb"]) for p in parts)])
        return parts

    def histogram(self, arrays: dict[str, np.ndarray], n_slots: int) -> tuple[np.ndarray, np.ndarray]:
        """Summed (n_slots, n_bins) counts and each gene's largest value."""
        nb = self.cfg.histogram_bins
        hist, gmax = np.zeros(n_slots * nb, np.int64), np.zeros(self.n_genes)
        for part in self._run(histogram_shard, arrays):
            np.add.at(hist, part["code"], part["count"])
            np.maximum(gmax, part["gmax"], out=gmax)
        return hist.reshape(n_slots, nb), gmax

    def first(self) -> tuple[MedianSearch, np.ndarray]:
        """Pass 1: one log-binned histogram per gene serves both of its targets."""
        g, nb = self.n_genes, self.cfg.histogram_bins
        edges = global_edges(nb)
        arrays: dict[str, np.ndarray] = {
            "slot_a": np.arange(g, dtype=np.int32),
            "slot_b": np.full(g, -1, np.int32),
            "lo": np.zeros(g),
            "hi": np.full(g, np.inf),
            "edges": edges,
        }
        hist, gmax = self.histogram(arrays, g)
        search = MedianSearch(hist.sum(axis=1))
        live = np.flatnonzero(search.live)
        search.absorb_histogram(live, hist[live % g], np.broadcast_to(edges, (len(live), nb + 1)))
        return search, gmax

    def refine(self, search: MedianSearch, targets: np.ndarray) -> None:
        """Narrow each target's interval ~n_bins-fold with a linear histogram inside it."""
        lo, hi = search.lo[targets], search.hi[targets]
        arrays = {**_slot_arrays(targets, self.n_genes), "lo": lo, "hi": hi, "edges": np.empty(0)}
        hist, _ = self.histogram(arrays, len(targets))
        search.absorb_histogram(targets, hist, linear_edges(lo, hi, self.cfg.histogram_bins))

    def collect(self, search: MedianSearch, targets: np.ndarray) -> None:
        """Gather the few values left inside each target's interval and pick the rank exactly."""
        arrays = {
            **_slot_arrays(targets, self.n_genes),
            "lo": search.lo[targets],
            "hi": search.hi[targets],
            "edges": np.empty(0),
        }
        parts = self._run(collect_shard, arrays)
        slots = np.concatenate([p["slot"] for p in parts])
        values = np.concatenate([p["value"] for p in parts])
        order = np.argsort(slots, kind="stable")
        cuts = np.searchsorted(slots[order], np.arange(1, len(targets)))
        search.absorb_collected(targets, np.split(values[order], cuts))


def compute_medians(
    cfg: VocabBuildConfig,
    n_genes: int,
    col_genes: list[np.ndarray],
    shards: list[Shard],
    runner: Runner = map_shards,
) -> MedianResult:
    """Exact median and nonzero count per gene, in a few passes over the shards."""
    run = _Passes(cfg, n_genes, col_genes, shards, runner)
    search, gmax = run.first()
    passes = 1
    refine, collect = search.pending(cfg.collect_limit, gmax)
    while len(refine):
        run.refine(search, refine)
        passes += 1
        refine, collect = search.pending(cfg.collect_limit, gmax)
        if passes > MAX_PASSES:  # each pass shrinks an interval ~n_bins-fold: float64 needs < 10
            raise RuntimeError(
                f"median search did not converge in {MAX_PASSES} passes ({len(refine)} "
                "ranks left); please report this with the corpus shape"
            )
    if len(collect):
        run.collect(search, collect)
        passes += 1
    return MedianResult(search.medians(), search.n, passes, run.peak_mb)


def run_vocab_build(cfg: VocabBuildConfig, runner: Runner = map_shards) -> GeneVocab:
    """Exact medians over the corpus -> the vocabulary, saved to ``cfg.out``."""
    return build_vocab_with_stats(cfg, runner)[0]


def build_vocab_with_stats(
    cfg: VocabBuildConfig, runner: Runner = map_shards
) -> tuple[GeneVocab, MedianResult]:
    """:func:`run_vocab_build`, also returning how the run went (passes, worker memory)."""
    t0 = time.perf_counter()
    aliases, names = read_gene_table(cfg.read.gene_table) if cfg.read.gene_table else ({}, {})
    warn_if_normalized(cfg.read)
    infos = inspect_inputs(cfg.inputs, cfg.read)
    resolved = [_resolve_genes(info.gene_ids, aliases) for info in infos]
    for info, res in zip(infos, resolved, strict=True):
        share = sum(r is not None for r in res) / len(res)
        note = f"; {info.id_note}" if info.id_note else ""
        print(f"coverage {info.uri}: {100 * share:.1f}% of gene ids resolve to Ensembl ids{note}")
        if share < 0.5:
            raise InputError(
                f"{info.uri}: only {100 * share:.1f}% of gene ids resolve to Ensembl "
                f"gene ids; they look like {guess_id_kind(info.gene_ids)}"
            )
    genes = sorted({r for res in resolved for r in res if r is not None})
    names = {**input_symbols(infos, resolved), **names}  # a gene table's symbols win
    index = {gid: i for i, gid in enumerate(genes)}
    col_genes = [np.asarray([-1 if r is None else index[r] for r in res], np.int32) for res in resolved]
    shards = plan_shards(infos, cfg.read.rows_per_shard)
    result = compute_medians(cfg, len(genes), col_genes, shards, runner)
    medians, n_nonzero, passes = result.medians, result.n_nonzero, result.passes
    keep = n_nonzero >= cfg.min_cells
    kept = [gid for gid, k in zip(genes, keep, strict=True) if k]
    vocab = build_vocab(
        kept,
        medians[keep],
        V2_SPECIALS if cfg.layout == "v2" else V1_SPECIALS,
        aliases=aliases,
        gene_names=names,
        provenance={
            "source": "rankformer vocab build",
            "inputs": cfg.inputs,
            "min_cells": cfg.min_cells,
            "cells": sum(i.n_cells for i in infos),
            "passes": passes,
            "nonzero_cells": dict(zip(kept, n_nonzero[keep].tolist(), strict=True)),
        },
    )
    vocab.save(cfg.out)
    why = "never expressed" if cfg.min_cells == 1 else f"nonzero in fewer than {cfg.min_cells} cells"
    print(
        f"vocabulary of {len(kept):,} genes ({len(genes) - len(kept):,} left out: {why}; "
        f"{len(vocab.gene_names):,} with a symbol) from "
        f"{sum(i.n_cells for i in infos):,} cells in {passes} passes, "
        f"{time.perf_counter() - t0:.1f}s -> {cfg.out} ({vocab.content_hash[:19]})"
    )
    return vocab, result
