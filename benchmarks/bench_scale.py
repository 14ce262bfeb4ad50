"""The scale record (by hand, never in CI): >= 1M synthetic cells written in row chunks, through
`vocab build` and `tokenize` on the local Ray cluster. Records wall time, cells/s and peak memory
per worker under benchmark "scale" (benchmarks/results/scale.jsonl)."""

from __future__ import annotations

import argparse
import os
import shutil
import time

from common import WORK, corpus, record
from rankformer.config import ClusterOptions, ReadOptions, TokenizeConfig, VocabBuildConfig
from rankformer.corpus.medians import run_vocab_build
from rankformer.corpus.tokenize import run_tokenize


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=1_000_000)
    p.add_argument("--genes", type=int, default=20_000)
    p.add_argument("--genes-per-cell", type=int, default=2600)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    t = time.perf_counter()
    path = str(corpus(args.cells, args.genes, args.genes_per_cell))
    base = {
        "n_cells": args.cells,
        "n_genes": args.genes,
        "genes_per_cell_drawn": args.genes_per_cell,
        "workers": args.workers,
        "file_gb": round(os.path.getsize(path) / 1e9, 1),
    }
    print(f"corpus ready in {time.perf_counter() - t:.0f}s: {path}")
    def fresh_ray() -> None:  # new worker processes, so each stage's peak memory is its own
        ray.shutdown()
        ray.init(address="local", num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False

    fresh_ray()
    read = ReadOptions(rows_per_shard=50_000, chunk_rows=4096)
    cluster = ClusterOptions(num_workers=args.workers)
    t = time.perf_counter()
    vocab = run_vocab_build(
        VocabBuildConfig(inputs=[path], out=str(WORK / "scale_vocab.json"), read=read, cluster=cluster)
    )
    seconds = time.perf_counter() - t
    record(
        "scale",
        "seconds",
        seconds,
        "s",
        {**base, "stage": "vocab build", "passes": vocab.provenance["passes"]},
    )
    record("scale", "cells_per_s", args.cells / seconds, "cells/s", {**base, "stage": "vocab build"})
    out = WORK / "scale_corpus"
    shutil.rmtree(out, ignore_errors=True)
    fresh_ray()
    t = time.perf_counter()
    manifest = run_tokenize(
        TokenizeConfig(
            inputs=[path], vocab=str(WORK / "scale_vocab.json"), out=str(out), read=read, cluster=cluster
        )
    )
    seconds = time.perf_counter() - t
    stage = {**base, "stage": "tokenize", "shards": len(manifest["shards"])}
    record("scale", "seconds", seconds, "s", stage)
    record("scale", "cells_per_s", manifest["totals"]["cells_out"] / seconds, "cells/s", stage)
    record(
        "scale",
        "peak_rss_mb",
        manifest["run"]["peak_rss_mb"],
        "MB",
        {**stage, "who": "worker (max over workers)"},
    )
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
