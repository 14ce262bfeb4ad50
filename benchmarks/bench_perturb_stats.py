"""`rankformer perturb stats` on synthetic perturbation output shaped like `--mode all` (every gene of
each cell deleted: one row per cell and rank), against the plain approach measured in the same run:
per gene, each rank stratum it occupies ranked with scipy and its van Elteren sums added up in
Python. Both give the same p-values (checked to 1e-9). At the larger sizes, the default run (the
test on at most ``ROWS_IN_MEMORY`` rows at a time, the rest set aside on disk) next to one pass with
every row in memory, to show what the bound saves (same tables, checked).

Records (benchmarks/results/perturb_stats.jsonl): rows_per_s and peak_memory_mb per method and size,
ratio_vs_plain at the size both run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from common import WORK, record, rss_growth
from rankformer.perturb.stats import ROWS_IN_MEMORY, perturb_stats


def results(out: Path, cells: int, per_cell: int, vocab: int, shards: int = 8, seed: int = 0) -> Path:
    """A perturbation output folder: each cell a random gene list, every gene deleted; the shift
    falls with rank (the position effect), plus noise and a small per-gene effect."""
    if (out / "manifest.json").exists():
        return out
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    gene_effect = rng.normal(0, 0.002, vocab)
    names = []
    for s, part in enumerate(np.array_split(np.arange(cells), shards)):
        genes = np.concatenate([rng.choice(vocab, per_cell, replace=False) for _ in part])
        rank = np.tile(np.arange(per_cell), len(part))
        shift = 0.05 / (1.0 + rank) + gene_effect[genes] + rng.normal(0, 0.01, len(genes))
        table = pa.table(
            {
                "cell_id": np.repeat(part, per_cell).astype(str),
                "perturbed": pa.array([[f"G{g}"] for g in genes.tolist()]),
                "rank": rank,
                "cell_cosine": 1.0 - np.abs(shift),
                "gene_mean_cosine": 1.0 - np.abs(shift) / 2,
                "shift_goal": shift,
            }
        )
        names.append(f"part-{s:06d}.parquet")
        pq.write_table(table, out / names[-1])
    (out / "manifest.json").write_text(json.dumps({"job": "perturb", "files": names, "shards": names}))
    return out


def plain(out: Path) -> pd.DataFrame:
    """Per gene: its rows, and per rank it was perturbed at, that rank's rows ranked with scipy."""
    from scipy import stats as st

    shards = json.loads((out / "manifest.json").read_text())["shards"]
    df = pd.concat(pd.read_parquet(out / n) for n in shards)
    df["key"] = df["perturbed"].map(",".join)
    by_rank = df.groupby(df["rank"].clip(lower=0))
    strata = {r: (g["key"].to_numpy(), g["shift_goal"].to_numpy()) for r, g in by_rank}
    rows = []
    for key, g in df.groupby("key", sort=False):
        t = v = 0.0
        for r in g["rank"].clip(lower=0).unique():
            keys, x = strata[r]
            mine = keys == key
            n, m = int(mine.sum()), int((~mine).sum())
            if not m:
                continue
            big_n = n + m
            _, counts = np.unique(x, return_counts=True)
            t += (st.rankdata(x)[mine].sum() - n * (big_n + 1) / 2) / (big_n + 1)
            var = n * m / 12 * (big_n + 1 - (counts**3 - counts).sum() / (big_n * (big_n - 1)))
            v += var / (big_n + 1) ** 2
        p = 2 * st.norm.sf(abs(t) / np.sqrt(v)) if v > 0 else np.nan
        rows.append({"perturbed": key, "effect_mean": g["shift_goal"].mean(), "p_value": p})
    return pd.DataFrame(rows)


def timed(fn, *args) -> tuple[object, float, float]:
    with rss_growth() as mem:
        t0 = time.perf_counter()
        res = fn(*args)
        sec = time.perf_counter() - t0
    return res, sec, mem["mb"]


def ours(out: Path, rows_in_memory: int) -> tuple[pd.DataFrame, float, float]:
    """`perturb_stats` in a fresh process (its memory growth measured after the imports, not
    lowered by what an earlier run left allocated): the table, seconds, peak MB."""
    got = subprocess.run(
        [sys.executable, __file__, "--measure", str(out), str(rows_in_memory)],
        check=True,
        capture_output=True,
        text=True,
    )
    m = json.loads(got.stdout.strip().splitlines()[-1])
    return pd.read_parquet(out / "stats.parquet"), m["sec"], m["mb"]


def main() -> None:
    if sys.argv[1:2] == ["--measure"]:
        import scipy.stats  # noqa: F401  (imported before the measurement, as in a warm process)

        _, sec, mb = timed(perturb_stats, sys.argv[2], "goal", 1, int(sys.argv[3]))
        print(json.dumps({"sec": sec, "mb": mb}))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=200, help="cells at the size both methods run")
    p.add_argument(
        "--large-cells", type=int, nargs="*", default=[4000, 16000], help="cells at sizes only ours runs"
    )
    p.add_argument("--genes-per-cell", type=int, default=1000)
    p.add_argument("--vocab", type=int, default=8000)
    args = p.parse_args()
    for cells in [args.cells, *args.large_cells]:
        folder = WORK / f"perturb_stats_{cells}x{args.genes_per_cell}"
        out = results(folder, cells, args.genes_per_cell, args.vocab)
        n_rows = cells * args.genes_per_cell
        cfg = {"n_cells": cells, "rows": n_rows, "genes": args.vocab, "rank_window": 1}
        table, sec, peak = ours(out, ROWS_IN_MEMORY)
        mine = {**cfg, "method": "rankformer", "rows_in_memory": ROWS_IN_MEMORY}
        record("perturb_stats", "rows_per_s", n_rows / sec, "rows/s", mine)
        record("perturb_stats", "peak_memory_mb", peak, "MB", mine)
        print(f"{n_rows:,} rows, {len(table):,} genes: ours {sec:.1f} s, {peak:.0f} MB")
        if cells != args.cells:
            whole, w_sec, w_peak = ours(out, n_rows)
            pd.testing.assert_frame_equal(whole, table, rtol=1e-9)
            one = {**cfg, "method": "rankformer, every row in memory", "rows_in_memory": n_rows}
            record("perturb_stats", "rows_per_s", n_rows / w_sec, "rows/s", one)
            record("perturb_stats", "peak_memory_mb", w_peak, "MB", one)
            print(f"  every row in memory: {w_sec:.1f} s, {w_peak:.0f} MB")
            continue
        ref, ref_sec, ref_peak = timed(plain, out)
        a = table.set_index("perturbed").loc[ref["perturbed"]]
        np.testing.assert_allclose(a["p_value"], ref["p_value"], rtol=1e-9)
        np.testing.assert_allclose(a["effect_mean"], ref["effect_mean"], rtol=1e-9)
        base = {**cfg, "method": "plain per-gene loop"}
        record("perturb_stats", "rows_per_s", n_rows / ref_sec, "rows/s", base)
        record("perturb_stats", "peak_memory_mb", ref_peak, "MB", base)
        record("perturb_stats", "ratio_vs_plain", ref_sec / sec, "x", cfg)
        print(f"plain per-gene loop {ref_sec:.1f} s, {ref_peak:.0f} MB: {ref_sec / sec:.1f}x")


if __name__ == "__main__":
    main()
