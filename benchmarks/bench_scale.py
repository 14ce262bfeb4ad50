"""The scale record (by hand, never in CI): >= 1M synthetic cells written in row chunks, through
`vocab build` and `tokenize` (1 and N workers) on a local Ray cluster. Records wall time, cells/s,
peak memory per worker and scaling efficiency under benchmark "scale" (results/scale.jsonl)."""

from __future__ import annotations

import argparse
import os
import shutil
import time
from typing import Any

from common import WORK, corpus, fresh_ray, record, warm_cache
from rankformer.config.corpus import ClusterOptions, ReadOptions, TokenizeConfig, VocabBuildConfig
from rankformer.corpus.medians import build_vocab_with_stats
from rankformer.corpus.tokenize import run_tokenize

READ = ReadOptions(rows_per_shard=50_000, chunk_rows=4096)


def vocab_stage(path: str, vocab: str, workers: int, base: dict[str, Any]) -> None:
    fresh_ray(workers)
    warm_cache(path)
    t = time.perf_counter()
    built, stats = build_vocab_with_stats(
        VocabBuildConfig(inputs=[path], out=vocab, read=READ, cluster=ClusterOptions(num_workers=workers))
    )
    seconds = time.perf_counter() - t
    stage = {**base, "workers": workers, "stage": "vocab build", "passes": built.provenance["passes"]}
    record("scale", "seconds", seconds, "s", stage)
    record("scale", "cells_per_s", base["n_cells"] / seconds, "cells/s", stage)
    record("scale", "peak_rss_mb", stats.peak_rss_mb, "MB", {**stage, "who": "worker (max)"})


def tokenize_stage(path: str, vocab: str, workers: int, base: dict[str, Any]) -> float:
    out = WORK / "scale_corpus"
    shutil.rmtree(out, ignore_errors=True)
    fresh_ray(workers)
    warm_cache(path)
    t = time.perf_counter()
    manifest = run_tokenize(
        TokenizeConfig(
            inputs=[path], vocab=vocab, out=str(out), read=READ, cluster=ClusterOptions(num_workers=workers)
        )
    )
    seconds = time.perf_counter() - t
    shutil.rmtree(out, ignore_errors=True)
    stage = {**base, "workers": workers, "stage": "tokenize", "shards": len(manifest["shards"])}
    rate = manifest["totals"]["cells_out"] / seconds
    record("scale", "seconds", seconds, "s", stage)
    record("scale", "cells_per_s", rate, "cells/s", stage)
    record("scale", "peak_rss_mb", manifest["run"]["peak_rss_mb"], "MB", {**stage, "who": "worker (max)"})
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=1_000_000)
    p.add_argument("--genes", type=int, default=20_000)
    p.add_argument("--genes-per-cell", type=int, default=2600)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--skip-vocab", action="store_true", help="reuse the vocabulary of an earlier run")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    t = time.perf_counter()
    path = str(corpus(args.cells, args.genes, args.genes_per_cell))
    print(f"corpus ready in {time.perf_counter() - t:.0f}s: {path}")
    base = {
        "n_cells": args.cells,
        "n_genes": args.genes,
        "genes_per_cell_drawn": args.genes_per_cell,
        "file_gb": round(os.path.getsize(path) / 1e9, 1),
        "rows_per_shard": READ.rows_per_shard,
    }
    vocab = str(WORK / "scale_vocab.json")
    if not args.skip_vocab:
        vocab_stage(path, vocab, args.workers, base)
    rates = {w: tokenize_stage(path, vocab, w, base) for w in sorted({1, args.workers})}
    if args.workers > 1:
        eff = rates[args.workers] / rates[1] / args.workers
        record(
            "scale",
            f"scaling_efficiency_{args.workers}_workers",
            eff,
            "fraction",
            {**base, "stage": "tokenize"},
        )


if __name__ == "__main__":
    main()
