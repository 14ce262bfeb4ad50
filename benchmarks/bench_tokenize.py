"""Tokenizer throughput and memory: the kernel, the end-to-end h5ad -> Parquet job on 1 and 2 Ray
workers at two corpus sizes, and the reference-method baseline measured in the same run.

Records (benchmarks/results/tokenize.jsonl): cells_per_s_per_core (kernel; e2e per worker count and
size), peak_rss_mb (per worker, per size; baseline per size), ratio_vs_baseline,
scaling_efficiency_2_workers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

from common import HERE, WORK, corpus, fresh_ray, record, warm_cache
from rankformer.config.corpus import ClusterOptions, ReadOptions, TokenizeConfig
from rankformer.corpus.kernels import rank_chunk
from rankformer.corpus.tokenize import run_tokenize
from rankformer.io.sources import open_source
from rankformer.io.synth import gene_ids
from rankformer.vocab.gene_vocab import build_vocab


def make_vocab(n_genes: int) -> str:
    path = WORK / f"vocab_{n_genes}.json"
    medians = np.random.default_rng(0).lognormal(0.0, 1.0, n_genes)
    build_vocab(list(gene_ids(n_genes)), medians).save(str(path))
    return str(path)


def kernel(path: str, vocab_path: str, base: dict) -> float:
    from rankformer.vocab.gene_vocab import GeneVocab

    vocab = GeneVocab.load(vocab_path)
    with open_source(path) as src:
        n_cells = min(8192, src.n_cells)
        x = src.read_counts(0, n_cells)
        n = src.read_obs("n_counts", 0, n_cells)
        col = vocab.map_gene_ids(list(src.gene_ids))
    med = vocab.median_by_token()
    rank_chunk(x[:8], n[:8], col, med, 4094, 2, 3)  # compile
    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        rank_chunk(x, n, col, med, 4094, 2, 3)
        best = max(best, x.shape[0] / (time.perf_counter() - t))
    record(
        "tokenize",
        "cells_per_s_per_core",
        best,
        "cells/s",
        {**base, "stage": "kernel", "n_cells": n_cells, "nnz_per_cell": round(x.nnz / x.shape[0])},
    )
    return best


def end_to_end(path: str, vocab: str, workers: int, n_cells: int, base: dict) -> tuple[float, float]:
    import ray

    out = WORK / f"corpus_{n_cells}_{workers}w"
    shutil.rmtree(out, ignore_errors=True)
    fresh_ray(workers)
    warm_cache(path)
    cfg = TokenizeConfig(
        inputs=[path],
        vocab=vocab,
        out=str(out),
        read=ReadOptions(rows_per_shard=25_000, chunk_rows=4096),
        cluster=ClusterOptions(num_workers=workers),
    )
    t = time.perf_counter()
    manifest = run_tokenize(cfg)
    seconds = time.perf_counter() - t
    ray.shutdown()
    shutil.rmtree(out, ignore_errors=True)
    per_core = manifest["totals"]["cells_out"] / seconds / workers
    cfg_rec = {
        **base,
        "stage": "end_to_end",
        "workers": workers,
        "n_cells": n_cells,
        "rows_per_shard": 25_000,
        "seconds": round(seconds, 2),
    }
    record("tokenize", "cells_per_s_per_core", per_core, "cells/s", cfg_rec)
    record(
        "tokenize",
        "tokens_per_s_per_core",
        manifest["totals"]["tokens"] / seconds / workers,
        "tokens/s",
        cfg_rec,
    )
    record(
        "tokenize",
        "peak_rss_mb",
        manifest["run"]["peak_rss_mb"],
        "MB",
        {**cfg_rec, "who": "worker (max over workers)"},
    )
    return per_core, manifest["run"]["peak_rss_mb"]


def baseline(path: str, vocab: str, n_cells: int, base: dict) -> dict:
    out = WORK / "baseline.parquet"
    proc = subprocess.run(
        [
            sys.executable,
            str(HERE / "baseline_tokenizer.py"),
            "--input",
            path,
            "--vocab",
            vocab,
            "--cells",
            str(n_cells),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    out.unlink(missing_ok=True)
    cfg_rec = {**base, "stage": "baseline", "n_cells": n_cells, "seconds": round(res["seconds"], 2)}
    record("tokenize", "cells_per_s_per_core", res["cells_per_s"], "cells/s", cfg_rec)
    record("tokenize", "peak_rss_mb", res["peak_rss_mb"], "MB", {**cfg_rec, "who": "baseline process"})
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100000,200000", help="corpus sizes (cells)")
    p.add_argument("--genes", type=int, default=20_000)
    p.add_argument("--genes-per-cell", type=int, default=2600, help="draws per cell (~1.75k nonzero)")
    p.add_argument("--baseline-cells", default="5000,10000", help="baseline sizes (cells)")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    sizes = [int(s) for s in args.sizes.split(",")]
    vocab = make_vocab(args.genes)
    base = {"n_genes": args.genes, "genes_per_cell_drawn": args.genes_per_cell}
    big = str(corpus(max(sizes), args.genes, args.genes_per_cell))
    kernel(big, vocab, base)
    base_runs = [baseline(big, vocab, int(n), base) for n in args.baseline_cells.split(",")]
    results = {}
    for n in sizes:
        path = str(corpus(n, args.genes, args.genes_per_cell))
        for workers in (1, 2):
            results[(n, workers)] = end_to_end(path, vocab, workers, n, base)
    n = max(sizes)
    one, two = results[(n, 1)][0], results[(n, 2)][0]
    best_baseline = max(r["cells_per_s"] for r in base_runs)
    record(
        "tokenize",
        "ratio_vs_baseline",
        one / best_baseline,
        "x",
        {
            **base,
            "n_cells": n,
            "ours": "end_to_end 1 worker",
            "baseline_cells_per_s": round(best_baseline, 1),
        },
    )
    record("tokenize", "scaling_efficiency_2_workers", two / one, "fraction", {**base, "n_cells": n})


if __name__ == "__main__":
    main()
