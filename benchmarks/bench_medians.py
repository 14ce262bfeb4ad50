"""Exact distributed medians (`vocab build`) against the plain approach (numpy.median over the
whole corpus in memory) and a t-digest, on one synthetic corpus.

Records (benchmarks/results/medians.jsonl): seconds (ours per worker count, plain, t-digest),
peak_rss_mb (plain process; ours per worker), max_abs_error_vs_numpy, tdigest_max_rel_error.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from common import HERE, WORK, corpus, fresh_ray, record, warm_cache
from rankformer.config.corpus import ClusterOptions, ReadOptions, VocabBuildConfig
from rankformer.corpus.medians import build_vocab_with_stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=100_000)
    p.add_argument("--genes", type=int, default=20_000)
    p.add_argument("--genes-per-cell", type=int, default=2600)
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    path = str(corpus(args.cells, args.genes, args.genes_per_cell))
    base = {"n_cells": args.cells, "n_genes": args.genes, "genes_per_cell_drawn": args.genes_per_cell}
    out = WORK / "plain_medians.npz"
    proc = subprocess.run(
        [sys.executable, str(HERE / "plain_medians.py"), "--input", path, "--out", str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    plain = json.loads(proc.stdout.strip().splitlines()[-1])
    ref = np.load(out)
    record("medians", "seconds", plain["seconds"], "s", {**base, "method": "plain numpy.median"})
    record(
        "medians",
        "peak_rss_mb",
        plain["peak_rss_mb"],
        "MB",
        {**base, "method": "plain numpy.median", "nnz": plain["nnz"]},
    )
    record(
        "medians",
        "seconds",
        plain["tdigest_seconds"],
        "s",
        {**base, "method": "t-digest (delta 100, per shard then merged)"},
    )
    exact = ref["exact"]
    ok = ~np.isnan(exact)
    td_err = np.abs(ref["tdigest"][ok] - exact[ok]) / exact[ok]
    record(
        "medians",
        "tdigest_max_rel_error",
        td_err.max(),
        "fraction",
        {**base, "delta": 100, "median_rel_error": round(float(np.median(td_err)), 6)},
    )
    for workers in (1, 2):
        fresh_ray(workers)
        warm_cache(path)
        cfg = VocabBuildConfig(
            inputs=[path],
            out=str(WORK / "bench_vocab.json"),
            read=ReadOptions(rows_per_shard=25_000, chunk_rows=4096),
            cluster=ClusterOptions(num_workers=workers),
        )
        t = time.perf_counter()
        vocab, stats = build_vocab_with_stats(cfg)
        seconds = time.perf_counter() - t
        ray.shutdown()
        ours = np.full(args.genes, np.nan)
        ours[[int(g[4:]) - 1 for g in vocab.gene_ids]] = vocab.medians
        record(
            "medians",
            "seconds",
            seconds,
            "s",
            {**base, "method": "rankformer exact", "workers": workers, "passes": vocab.provenance["passes"]},
        )
        record(
            "medians",
            "peak_rss_mb",
            stats.peak_rss_mb,
            "MB",
            {
                **base,
                "method": "rankformer exact",
                "workers": workers,
                "who": "worker (max)",
                "rows_per_shard": 25_000,
            },
        )
    assert np.array_equal(np.isnan(ours), np.isnan(exact)), "genes differ"
    record(
        "medians",
        "max_abs_error_vs_numpy",
        np.abs(ours[ok] - exact[ok]).max(),
        "abs",
        {**base, "method": "rankformer exact", "genes": int(ok.sum())},
    )


if __name__ == "__main__":
    main()
