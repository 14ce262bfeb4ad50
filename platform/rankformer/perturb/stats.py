"""`rankformer perturb stats`: per perturbed gene (or combination) of a `rankformer perturb` output,
the cells it was scored in, its mean effect with a 95% confidence interval, and a two-sided rank-sum
test of its effect against other genes perturbed at the same rank, Benjamini-Hochberg FDR.

The effect is the shift toward ``goal_state`` when given, else ``1 - cell_cosine``. A deletion's
position effect is strongest near the top of a cell and would pass for a gene effect if a gene were
compared with genes at any rank, so the test is stratified by rank (van Elteren's stratified
Wilcoxon rank-sum test): within each rank (or window of ``rank_window`` positions) the gene's rows
are ranked among every row at that rank, the rank sums are combined with weights 1/(rows + 1), and
the statistic is compared with its normal approximation, ties corrected. Its null is therefore the
other genes perturbed at the gene's own ranks, every one of them, in the gene's own proportions;
nothing is sampled, so the result is deterministic. Genes a cell did not hold (rank -1: an
overexpression of an absent gene) form a stratum of their own. A sort and a few group sums compute
it for every gene at once, on ranges of strata of bounded size (:func:`stats_table`); only the
score columns are read, shard by shard.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rankformer.errors import InputError
from rankformer.io import fs

RANK_WINDOW = 1  # rank positions per stratum: exact rank by default
ROWS_IN_MEMORY = 2_000_000  # rows the test holds at once (~120 B each), more if one stratum is larger
BATCH_ROWS = 262_144  # rows read from a shard at a time
SYMBOLS_FILE = "gene_symbols.json"  # written by `perturb`: the model vocabulary's gene id -> symbol


def symbols_of(names: dict[str, str], keys: list[str]) -> list[str]:
    """Each key's gene symbols (comma-joined like the key; "" where the vocabulary has none)."""
    return [",".join(names.get(g, "") for g in k.split(",")) for k in keys]


def _symbols_in(out: str) -> dict[str, str]:
    path = fs.join(out, SYMBOLS_FILE)
    names: dict[str, str] = fs.read_json(path, "rerun `rankformer perturb`") if fs.exists(path) else {}
    return names


def result_paths(out: str, per_gene: bool = False) -> list[str]:
    """The finished output files of a perturbation run, in shard order."""
    from rankformer.job.output import finished_output

    manifest = finished_output(out, "perturb")
    if per_gene and not any(f.startswith("genes-") for f in manifest["files"]):
        raise InputError(f"perturbation run {out} kept no per-gene table; rerun it with --per-gene")
    return [fs.join(out, ("genes-" if per_gene else "") + name) for name in manifest["shards"]]


class _Spill:
    """Each row's (stratum, key code, effect), set aside chunk by chunk, each chunk sorted by
    stratum and kept as its key codes and effects with where each stratum starts: in memory while
    they fit ``budget`` rows, then as raw files in ``folder`` (12 bytes a row), read back one range
    of strata at a time."""

    def __init__(self, budget: int, folder: str) -> None:
        self.budget, self.folder = budget, folder
        self.chunk = max(budget // 8, 1)  # rows gathered before a chunk is sorted and set aside
        self.pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.chunks: list[tuple[np.ndarray, np.ndarray | str, np.ndarray | str]] = []
        self.rows = self.held = 0

    def add(self, strata: np.ndarray, codes: np.ndarray, x: np.ndarray) -> None:
        self.pending.append((strata, codes.astype(np.int32), x.astype(np.float64)))
        self.held += len(x)
        if self.held >= self.chunk:
            self.flush()

    def flush(self) -> None:
        if not self.held:
            return
        s, c, x = (np.concatenate(a) for a in zip(*self.pending, strict=True))
        self.pending, self.held = [], 0
        order = np.argsort(s, kind="stable")
        starts = np.r_[0, np.cumsum(np.bincount(s))]
        chunk: tuple[np.ndarray, np.ndarray | str, np.ndarray | str] = (starts, c[order], x[order])
        on_disk = self.rows + len(x) > self.budget
        if on_disk and self.rows <= self.budget:  # the first chunk past the budget: all go to disk
            self.chunks = [self._save(i, ch) for i, ch in enumerate(self.chunks)]
        self.rows += len(x)
        self.chunks.append(self._save(len(self.chunks), chunk) if on_disk else chunk)

    def _save(
        self, i: int, chunk: tuple[np.ndarray, np.ndarray | str, np.ndarray | str]
    ) -> tuple[np.ndarray, str, str]:
        paths = [os.path.join(self.folder, f"{i:06d}.{name}") for name in ("key", "x")]
        for path, a in zip(paths, chunk[1:], strict=True):
            np.asarray(a).tofile(path)
        return chunk[0], paths[0], paths[1]

    def between(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every row of strata ``lo`` .. ``hi - 1``: (stratum - lo, key code, effect)."""
        got: list[list[np.ndarray]] = [[], [], []]
        for starts, codes, x in self.chunks:
            bounds = starts[np.minimum(np.arange(lo, hi + 1), len(starts) - 1)]  # chunk rows lo..hi
            a, b = int(bounds[0]), int(bounds[-1])
            got[0].append(np.repeat(np.arange(hi - lo), np.diff(bounds)))
            for g, arr, dtype in ((got[1], codes, np.int32), (got[2], x, np.float64)):
                if isinstance(arr, str):
                    g.append(np.fromfile(arr, dtype, count=b - a, offset=a * np.dtype(dtype).itemsize))
                else:
                    g.append(arr[a:b])
        s, c, x = (np.concatenate(g) for g in got)
        return s, c.astype(np.int64), x


def buckets(rows_per_stratum: np.ndarray, budget: int) -> Iterator[tuple[int, int]]:
    """Consecutive ranges of strata, each holding at most ``budget`` rows or a single stratum."""
    lo = held = 0
    for s, n in enumerate(rows_per_stratum.tolist()):
        if held and held + n > budget:
            yield lo, s
            lo, held = s, 0
        held += n
    if held:
        yield lo, len(rows_per_stratum)


class _Sums:
    """Per-key sums that grow with the keys met."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.a = np.zeros((len(names), 0))

    def add(self, **parts: np.ndarray) -> None:
        n = max(len(v) for v in parts.values())
        if n > self.a.shape[1]:
            self.a = np.pad(self.a, ((0, 0), (0, n - self.a.shape[1])))
        for name, v in parts.items():
            self.a[self.names.index(name), : len(v)] += v

    def __getitem__(self, name: str) -> np.ndarray:
        return self.a[self.names.index(name)]


def van_elteren_sums(
    codes: np.ndarray, strata: np.ndarray, x: np.ndarray, n_keys: int
) -> dict[str, np.ndarray]:
    """Van Elteren's sums over the given strata for every key (they add up over disjoint sets of
    whole strata): ``t`` and ``v``, the weighted rank-sum statistic and its variance; ``tested``,
    the strata of the key holding another key's row; ``null`` and ``weight``, the other keys'
    mean value in each such stratum times the key's rows in it, and those rows. ``x`` finite."""
    n = len(x)
    n_strata = int(strata.max()) + 1 if n else 0
    order = np.lexsort((x, strata))
    xs, ss = x[order], strata[order]
    new_tie = np.r_[True, (ss[1:] != ss[:-1]) | (xs[1:] != xs[:-1])]
    tie_start = np.flatnonzero(new_tie)
    tie_size = np.diff(np.r_[tie_start, n])
    tie = np.cumsum(new_tie) - 1
    stratum_start = np.maximum.accumulate(np.where(np.r_[True, ss[1:] != ss[:-1]], np.arange(n), 0))
    rank = np.empty(n)
    rank[order] = tie_start[tie] - stratum_start + (tie_size[tie] + 1) / 2  # mid-rank in its stratum
    del order, xs, new_tie, tie, stratum_start
    rows = np.bincount(strata, minlength=n_strata).astype(np.float64)
    ties = np.bincount(ss[tie_start], tie_size.astype(np.float64) ** 3 - tie_size, minlength=n_strata)
    total = np.bincount(strata, x, minlength=n_strata)
    pairs, at = np.unique(codes * n_strata + strata, return_inverse=True)
    key, b = pairs // n_strata, pairs % n_strata
    own = np.bincount(at).astype(np.float64)
    rank_sum = np.bincount(at, rank)
    own_total = np.bincount(at, x)
    big_n = rows[b]
    other = big_n - own
    use = other > 0
    key, b, own, rank_sum, own_total, big_n, other = (
        a[use] for a in (key, b, own, rank_sum, own_total, big_n, other)
    )
    w = 1.0 / (big_n + 1.0)
    var = own * other / 12.0 * (big_n + 1.0 - ties[b] / (big_n * (big_n - 1.0)))
    return {
        "t": np.bincount(key, w * (rank_sum - own * (big_n + 1.0) / 2.0), minlength=n_keys),
        "v": np.bincount(key, w * w * var, minlength=n_keys),
        "tested": np.bincount(key, minlength=n_keys).astype(np.float64),
        "null": np.bincount(key, own * (total[b] - own_total) / other, minlength=n_keys),
        "weight": np.bincount(key, own, minlength=n_keys),
    }


def perturb_stats(
    out: str,
    goal_state: str | None = None,
    rank_window: int = RANK_WINDOW,
    rows_in_memory: int = ROWS_IN_MEMORY,
    mixture: bool = False,
) -> pd.DataFrame:
    """Per perturbed gene (or combination) of a `perturb` output folder: :func:`stats_table`
    (with ``mixture``, each perturbation's posterior of being impactful:
    :func:`rankformer.perturb.affected.impact_mixture`), written to stats.parquet/.csv with a
    plot; returns the table."""
    _check_options(rank_window, rows_in_memory)
    paths = result_paths(out)
    if not paths:
        raise InputError(f"{out} holds no perturbation rows")
    with fs.open_input(paths[0]) as f:
        names = pq.read_schema(f).names
    wanted = ["perturbed", "rank", "cell_cosine", "gene_mean_cosine"] + [
        c for c in names if c.startswith("shift_")
    ]

    def parts() -> Iterator[pa.RecordBatch]:
        for path in paths:
            with fs.open_input(path) as f:
                yield from pq.ParquetFile(f).iter_batches(batch_size=BATCH_ROWS, columns=wanted)

    res = stats_table(parts(), names, goal_state, out, rank_window, _symbols_in(out), rows_in_memory)
    if mixture:
        from rankformer.perturb.mixture import impact_mixture

        res = impact_mixture(res)
    _write_stats(out, res)
    return res


def _check_options(rank_window: int, rows_in_memory: int) -> None:
    if rank_window < 1:
        raise InputError(f"rank_window is {rank_window}; it counts rank positions, 1 (exact rank) or more")
    if rows_in_memory < 1:
        raise InputError(f"rows_in_memory is {rows_in_memory}; give a positive number of rows")


def stats_table(
    parts: Iterable[pa.Table | pa.RecordBatch],
    names: list[str],
    goal_state: str | None,
    source: str,
    rank_window: int = RANK_WINDOW,
    symbols: dict[str, str] | None = None,
    rows_in_memory: int = ROWS_IN_MEMORY,
) -> pd.DataFrame:
    """Per perturbed gene (or combination) of the rows in ``parts`` (as `perturb` writes them,
    holding at least the score columns; ``names``: their column names; ``source``: what errors
    call them): cells, mean scores with a 95% confidence interval for the effect, and the
    rank-stratified rank-sum test (module docstring) with its null's mean effect,
    Benjamini-Hochberg FDR over the genes with a test; sorted by mean effect, largest first.
    ``symbols``: gene id -> symbol, for the ``symbol`` column.

    Two passes, memory bounded whatever the number of rows: the first streams ``parts`` once,
    adding per-key sums and setting each row's (rank stratum, key, effect) aside, sorted by
    stratum (on local disk, 12 bytes a row, once they pass ``rows_in_memory``); the second runs
    the test on consecutive strata of at most ``rows_in_memory`` rows (or one larger stratum)
    at a time. The test's sums add up over disjoint strata, so the result does not depend on it."""
    _check_options(rank_window, rows_in_memory)
    shifts = [c for c in names if c.startswith("shift_")]
    if goal_state and f"shift_{goal_state}" not in shifts:
        raise InputError(
            f"{source} has no shift toward {goal_state!r}; its states: {[c[6:] for c in shifts]}"
        )
    floats = ["cell_cosine", "gene_mean_cosine", *shifts]
    with tempfile.TemporaryDirectory(prefix="rankformer-stats-") as folder:
        spill = _Spill(rows_in_memory, folder)
        sums, index, per_stratum = _first_pass(parts, floats, goal_state, rank_window, spill)
        if not index:
            raise InputError(f"{source} holds no perturbation rows")
        sums.add(rows=np.zeros(len(index)))
        with np.errstate(invalid="ignore", divide="ignore"):
            eff_mean = sums["effect"] / sums["effect_n"]
        test = _second_pass(spill, per_stratum, eff_mean, rows_in_memory)
    res = _table(sums, test, list(index), symbols or {}, shifts)
    res = res.sort_values("effect_mean", ascending=False, kind="stable").reset_index(drop=True)
    res.attrs["effect"] = f"shift toward {goal_state}" if goal_state else "1 - cell_cosine"
    return res


def _second_pass(spill: _Spill, per_stratum: np.ndarray, eff_mean: np.ndarray, rows_in_memory: int) -> _Sums:
    """The rank-sum test's sums and each key's squared deviations, over consecutive strata of at
    most ``rows_in_memory`` rows (or one larger stratum) at a time."""
    n_keys = len(eff_mean)
    test = _Sums(["t", "v", "tested", "null", "weight", "ss"])
    test.add(ss=np.zeros(n_keys))
    for lo, hi in buckets(per_stratum, rows_in_memory):
        strata, codes, x = spill.between(lo, hi)
        test.add(**van_elteren_sums(codes, strata, x, n_keys))
        test.add(ss=np.bincount(codes, (x - eff_mean[codes]) ** 2, minlength=n_keys))
    return test


def _table(
    sums: _Sums, test: _Sums, keys: list[str], symbols: dict[str, str], shifts: list[str]
) -> pd.DataFrame:
    """One row per key: means, the effect's 95% t interval, the test's p value and its null's mean
    effect (NaN where untested), and Benjamini-Hochberg FDR over the tested keys."""
    from scipy import stats as st
    from scipy.stats import norm

    eff_n = sums["effect_n"]
    with np.errstate(invalid="ignore", divide="ignore"):
        eff_mean = sums["effect"] / eff_n
        sd = np.sqrt(test["ss"] / (eff_n - 1))
        half = np.where(eff_n > 1, st.t.ppf(0.975, np.maximum(eff_n - 1, 1)) * sd / np.sqrt(eff_n), np.nan)
        v, tested = test["v"], test["tested"] > 0
        p = np.where(v > 0, 2.0 * norm.sf(np.abs(test["t"]) / np.sqrt(v)), 1.0)  # all tied: no evidence
        null_mean = test["null"] / test["weight"]

        def mean(c: str) -> np.ndarray:
            return np.asarray(sums[c] / sums[f"{c}_n"])

        res = pd.DataFrame(
            {
                "perturbed": keys,
                "symbol": symbols_of(symbols, keys),
                "n_cells": sums["rows"].astype(np.int64),
                "effect_mean": eff_mean,
                "effect_ci_low": eff_mean - half,
                "effect_ci_high": eff_mean + half,
                "cell_cosine_mean": mean("cell_cosine"),
                "gene_mean_cosine_mean": mean("gene_mean_cosine"),
                "null_effect_mean": np.where(tested, null_mean, np.nan),
                "p_value": np.where(tested, p, np.nan),
                **{f"{c}_mean": mean(c) for c in shifts},
            }
        )
    ok = res["p_value"].notna()
    res["fdr"] = np.nan
    if ok.any():
        res.loc[ok, "fdr"] = st.false_discovery_control(res.loc[ok, "p_value"].to_numpy(), method="bh")
    res["significant"] = res["fdr"] < 0.05
    return res


def _first_pass(
    parts: Iterable[pa.Table | pa.RecordBatch],
    floats: list[str],
    goal_state: str | None,
    rank_window: int,
    spill: _Spill,
) -> tuple[_Sums, dict[str, int], np.ndarray]:
    """One streamed pass over the rows: per-key sums (rows, and sum and count of the finite values
    of the effect and of each of ``floats``), the key codes (first appearance first), rows per
    stratum; each row with a finite effect set aside in ``spill``."""
    sums = _Sums(["rows", "effect", "effect_n"] + [f"{c}{k}" for c in floats for k in ("", "_n")])
    index: dict[str, int] = {}
    per_stratum = np.zeros(0, np.int64)

    def column(t: pa.RecordBatch, name: str) -> np.ndarray:
        return np.asarray(t.column(name).to_numpy(zero_copy_only=False), dtype=np.float64)

    for t in (b for part in parts for b in _batches(part)):
        if not t.num_rows:
            continue
        enc = pc.binary_join(t.column("perturbed"), ",").dictionary_encode()
        local = np.fromiter((index.setdefault(k, len(index)) for k in enc.dictionary.to_pylist()), np.int64)
        codes = local[enc.indices.to_numpy()]
        per_key: dict[str, np.ndarray] = {"rows": np.bincount(codes)}
        effect = column(t, f"shift_{goal_state}") if goal_state else 1.0 - column(t, "cell_cosine")
        for name, x in [*((c, column(t, c)) for c in floats), ("effect", effect)]:
            ok = np.isfinite(x)
            per_key[name], per_key[f"{name}_n"] = np.bincount(codes[ok], x[ok]), np.bincount(codes[ok])
        sums.add(**per_key)
        ok = np.isfinite(effect)
        rank = t.column("rank").to_numpy(zero_copy_only=False)[ok].astype(np.int64)
        strata = np.where(rank < 0, 0, rank // rank_window + 1)  # 0: genes the cell did not hold
        per_stratum = _grown(per_stratum, np.bincount(strata))
        spill.add(strata, codes[ok], effect[ok])
    spill.flush()
    return sums, index, per_stratum


def _batches(part: pa.Table | pa.RecordBatch) -> list[pa.RecordBatch]:
    return part.to_batches() if isinstance(part, pa.Table) else [part]


def _grown(acc: np.ndarray, part: np.ndarray) -> np.ndarray:
    if len(part) > len(acc):
        acc = np.pad(acc, (0, len(part) - len(acc)))
    acc[: len(part)] += part
    return acc


def _write_stats(out: str, res: pd.DataFrame) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    res.to_parquet(buf, index=False)
    fs.write_bytes_atomic(fs.join(out, "stats.parquet"), buf.getvalue())
    fs.write_bytes_atomic(fs.join(out, "stats.csv"), res.to_csv(index=False).encode())
    top = res.head(25).iloc[::-1]
    fig, ax = plt.subplots(figsize=(6, 0.25 * len(top) + 1.5))
    err = np.vstack([top.effect_mean - top.effect_ci_low, top.effect_ci_high - top.effect_mean])
    colors = ["tab:red" if s else "tab:grey" for s in top.significant]
    ax.barh(range(len(top)), top.effect_mean, xerr=np.nan_to_num(err), color=colors)
    labels = [sym if sym.strip(",") else key for key, sym in zip(top.perturbed, top.symbol, strict=True)]
    ax.set_yticks(range(len(top)), labels, fontsize=7)
    ax.axvline(float(res["null_effect_mean"].mean()), ls="--", c="k", lw=0.8)
    ax.set(
        xlabel=res.attrs.get("effect", "effect"), title="top perturbations (red: FDR < 0.05; dashed: null)"
    )
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    fs.write_bytes_atomic(fs.join(out, "stats.png"), png.getvalue())
