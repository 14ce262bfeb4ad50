"""Shared by the benchmark scripts: JSON-line records and cached synthetic corpora."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rankformer.io.synth import SynthSpec, write_h5ad

HERE = Path(__file__).resolve().parent
RESULTS = Path(os.environ.get("RANKFORMER_BENCH_RESULTS", HERE / "results"))
WORK = Path(os.environ.get("RANKFORMER_BENCH_WORK", HERE.parent / "bench_work"))


def machine() -> str:
    cores = os.cpu_count()
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    cpu = "unknown cpu"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cores} cores, {mem_gib:.0f} GiB, {cpu}"


def git_sha() -> str:
    if os.environ.get("RANKFORMER_GIT_SHA"):  # a copy without .git (the GPU machine)
        return os.environ["RANKFORMER_GIT_SHA"]
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def record(benchmark: str, metric: str, value: float, unit: str, config: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    line = {
        "benchmark": benchmark,
        "metric": metric,
        "value": round(float(value), 4),
        "unit": unit,
        "config": config,
        "machine": machine(),
        "git": git_sha(),
        "date": datetime.date.today().isoformat(),
    }
    with open(RESULTS / f"{benchmark}.jsonl", "a") as f:
        f.write(json.dumps(line) + "\n")
    print(f"{benchmark:>9} {metric:<32} {value:>12.4g} {unit:<8} {json.dumps(config)}")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def rss_growth(every_s: float = 0.005) -> Iterator[dict[str, float]]:
    """The largest growth of this process's resident memory over the block (``["mb"]``), sampled
    every ``every_s`` by a thread: what one in-process method needs beyond what was already held."""
    start, peak, stop = _rss_bytes(), [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            stop.wait(every_s)

    out: dict[str, float] = {}
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        stop.set()
        thread.join()
        out["mb"] = max(0, max(peak[0], _rss_bytes()) - start) / 2**20


def fresh_ray(workers: int) -> None:
    """A new local Ray instance with ``workers`` CPUs: new worker processes, so each timed stage's
    peak memory is its own."""
    import ray

    ray.shutdown()
    ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False


def warm_cache(path: str) -> None:
    """Read a file through once so every timed run starts from the page cache, not the disk."""
    with open(path, "rb") as f:
        while f.read(1 << 26):
            pass


def corpus(n_cells: int, n_genes: int, genes_per_cell: int, seed: int = 0) -> Path:
    """A synthetic .h5ad, written once in row chunks and reused by later runs."""
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / f"synth_{n_cells}x{n_genes}_g{genes_per_cell}_s{seed}.h5ad"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        write_h5ad(
            str(tmp),
            SynthSpec(n_cells=n_cells, n_genes=n_genes, genes_per_cell=genes_per_cell, seed=seed),
            chunk_rows=20_000,
        )
        tmp.rename(path)
    return path
