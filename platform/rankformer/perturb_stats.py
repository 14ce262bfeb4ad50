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
overexpression of an absent gene) form a stratum of their own. One sort of all rows and a few group
sums compute it for every gene at once; only the score columns are read, shard by shard.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rankformer.errors import InputError
from rankformer.io import fs

RANK_WINDOW = 1  # rank positions per stratum: exact rank by default
SYMBOLS_FILE = "gene_symbols.json"  # written by `perturb`: the model vocabulary's gene id -> symbol


def symbols_of(names: dict[str, str], keys: list[str]) -> list[str]:
    """Each key's gene symbols (comma-joined like the key; "" where the vocabulary has none)."""
    return [",".join(names.get(g, "") for g in k.split(",")) for k in keys]


def _symbols_in(out: str) -> dict[str, str]:
    path = fs.join(out, SYMBOLS_FILE)
    names: dict[str, str] = json.loads(fs.read_bytes(path)) if fs.exists(path) else {}
    return names


def result_paths(out: str, per_gene: bool = False) -> list[str]:
    """The finished output files of a perturbation run, in shard order."""
    manifest = json.loads(fs.read_bytes(fs.join(out, "manifest.json")))
    return [fs.join(out, ("genes-" if per_gene else "") + name) for name in manifest["shards"]]


class Scores:
    """The score columns of every row, with each row's perturbation as a code into ``keys``."""

    def __init__(
        self, parts: Iterable[pa.Table], names: list[str], goal_state: str | None, source: str
    ) -> None:
        """``parts``: tables of rows (as `perturb` writes them) holding at least the columns
        read here; ``names``: their column names; ``source``: what errors call them."""
        self.shifts = [c for c in names if c.startswith("shift_")]
        if goal_state and f"shift_{goal_state}" not in self.shifts:
            raise InputError(
                f"{source} has no shift toward {goal_state!r}; its states: {[c[6:] for c in self.shifts]}"
            )
        floats = ["cell_cosine", "gene_mean_cosine", *self.shifts]
        keys: list[pa.Array] = []
        ranks: list[np.ndarray] = []
        values: dict[str, list[np.ndarray]] = {c: [] for c in floats}
        for t in parts:
            keys.append(pc.binary_join(t.column("perturbed"), ",").cast(pa.large_string()).combine_chunks())
            ranks.append(t.column("rank").to_numpy())
            for c in floats:
                values[c].append(t.column(c).to_numpy().astype(np.float64))
        if not keys or not sum(len(k) for k in keys):
            raise InputError(f"{source} holds no perturbation rows")
        encoded = pa.chunked_array(keys, pa.large_string()).combine_chunks().dictionary_encode()
        self.codes = encoded.indices.to_numpy().astype(np.int64)  # first appearance first
        self.keys: list[str] = encoded.dictionary.to_pylist()
        self.rank = np.concatenate(ranks).astype(np.int64)
        self.values = {c: np.concatenate(v) for c, v in values.items()}
        self.effect = self.values[f"shift_{goal_state}"] if goal_state else 1.0 - self.values["cell_cosine"]

    @classmethod
    def read(cls, out: str, goal_state: str | None) -> Scores:
        """The rows of a `perturb` output folder, shard by shard, only the score columns."""
        paths = result_paths(out)
        if not paths:
            raise InputError(f"{out} holds no perturbation rows")
        with fs.open_input(paths[0]) as f:
            names = pq.read_schema(f).names
        wanted = ["perturbed", "rank", "cell_cosine", "gene_mean_cosine"] + [
            c for c in names if c.startswith("shift_")
        ]

        def parts() -> Iterator[pa.Table]:
            for path in paths:
                with fs.open_input(path) as f:
                    yield pq.read_table(f, columns=wanted)

        return cls(parts(), names, goal_state, out)

    def by_key(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per key: the mean of its finite values of ``x`` (NaN if none), and how many there were."""
        ok = np.isfinite(x)
        n = np.bincount(self.codes[ok], minlength=len(self.keys))
        s = np.bincount(self.codes[ok], x[ok], minlength=len(self.keys))
        with np.errstate(invalid="ignore", divide="ignore"):
            return s / n, n


def stratified_rank_sum(
    codes: np.ndarray, strata: np.ndarray, x: np.ndarray, n_keys: int
) -> tuple[np.ndarray, np.ndarray]:
    """Van Elteren's test of each key's values against the other keys' values in the same strata:
    (two-sided p-value, NaN where no stratum of the key holds another key's row; the mean of those
    other values, each stratum weighted by the key's rows in it). ``x`` must be finite."""
    from scipy.stats import norm

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
    t = np.bincount(key, w * (rank_sum - own * (big_n + 1.0) / 2.0), minlength=n_keys)
    v = np.bincount(key, w * w * var, minlength=n_keys)
    tested = np.bincount(key, minlength=n_keys) > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(v > 0, 2.0 * norm.sf(np.abs(t) / np.sqrt(v)), 1.0)  # all tied: no evidence
        null_mean = np.bincount(key, own * (total[b] - own_total) / other, minlength=n_keys) / np.bincount(
            key, own, minlength=n_keys
        )
    return np.where(tested, p, np.nan), np.where(tested, null_mean, np.nan)


def perturb_stats(out: str, goal_state: str | None = None, rank_window: int = RANK_WINDOW) -> pd.DataFrame:
    """Per perturbed gene (or combination) of a `perturb` output folder: :func:`stats_table`,
    written to stats.parquet/.csv with a plot; returns the table."""
    _check_window(rank_window)
    res = stats_table(Scores.read(out, goal_state), goal_state, rank_window, _symbols_in(out))
    _write_stats(out, res)
    return res


def _check_window(rank_window: int) -> None:
    if rank_window < 1:
        raise InputError(f"rank_window is {rank_window}; it counts rank positions, 1 (exact rank) or more")


def stats_table(
    s: Scores, goal_state: str | None, rank_window: int = RANK_WINDOW, names: dict[str, str] | None = None
) -> pd.DataFrame:
    """Per perturbed gene (or combination): cells, mean scores with a 95% confidence interval for the
    effect, and the rank-stratified rank-sum test (module docstring) with its null's mean effect,
    Benjamini-Hochberg FDR over the genes with a test; sorted by mean effect, largest first.
    ``names``: gene id -> symbol, for the ``symbol`` column."""
    from scipy import stats as st

    _check_window(rank_window)
    n_keys = len(s.keys)
    eff_mean, eff_n = s.by_key(s.effect)
    usable = np.isfinite(s.effect)
    dev = np.where(usable, s.effect - eff_mean[s.codes], 0.0)
    ss = np.bincount(s.codes, dev * dev, minlength=n_keys)
    with np.errstate(invalid="ignore", divide="ignore"):
        sd = np.sqrt(ss / (eff_n - 1))
        half = np.where(eff_n > 1, st.t.ppf(0.975, np.maximum(eff_n - 1, 1)) * sd / np.sqrt(eff_n), np.nan)
    rank = s.rank[usable]
    strata = np.where(rank < 0, 0, rank // rank_window + 1)  # 0: genes the cell did not hold
    p, null_mean = stratified_rank_sum(s.codes[usable], strata, s.effect[usable], n_keys)
    res = pd.DataFrame(
        {
            "perturbed": s.keys,
            "symbol": symbols_of(names or {}, s.keys),
            "n_cells": np.bincount(s.codes, minlength=n_keys),
            "effect_mean": eff_mean,
            "effect_ci_low": eff_mean - half,
            "effect_ci_high": eff_mean + half,
            "cell_cosine_mean": s.by_key(s.values["cell_cosine"])[0],
            "gene_mean_cosine_mean": s.by_key(s.values["gene_mean_cosine"])[0],
            "null_effect_mean": null_mean,
            "p_value": p,
            **{f"{c}_mean": s.by_key(s.values[c])[0] for c in s.shifts},
        }
    )
    ok = res["p_value"].notna()
    res["fdr"] = np.nan
    if ok.any():
        res.loc[ok, "fdr"] = st.false_discovery_control(res.loc[ok, "p_value"].to_numpy(), method="bh")
    res["significant"] = res["fdr"] < 0.05
    res = res.sort_values("effect_mean", ascending=False, kind="stable").reset_index(drop=True)
    res.attrs["effect"] = f"shift toward {goal_state}" if goal_state else "1 - cell_cosine"
    return res


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
