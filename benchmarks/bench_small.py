"""Small jobs: wall time of `vocab build` and `tokenize` on a 2,000-cell real file, each from a cold
process (a new interpreter, as a user running the CLI gets), next to the same job forced onto a
freshly started local Ray instance (how every job ran before small work stayed in-process).

Needs the test data (``RANKFORMER_SHARED``, default ../shared). Records: ``vocab`` and ``tokenize``
with ``small_file_seconds``, and ``ratio_vs_ray_local``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import HERE, record

SHARED = Path(os.environ.get("RANKFORMER_SHARED", HERE.parent.parent / "shared"))
FILE = SHARED / "data" / "pbmc_2k_celltypes.h5ad"
CLI = [sys.executable, "-m", "rankformer.cli"]


def _timed(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def _yaml(path: Path, in_process: bool) -> str:
    path.write_text(f"cluster:\n  in_process: {str(in_process).lower()}\n")
    return str(path)


def main() -> None:
    if not FILE.exists():
        raise SystemExit(f"{FILE} not found: set RANKFORMER_SHARED to the shared test data")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["RAY_AUTH_MODE"] = "disabled"
    seconds: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        for mode, in_process in (("in_process", True), ("ray_local", False)):
            cfg = _yaml(d / f"{mode}.yaml", in_process)
            vocab, corpus = str(d / f"{mode}_vocab.json"), str(d / f"{mode}_corpus")
            secs = seconds[mode] = {
                "vocab": _timed([*CLI, "vocab", "build", str(FILE), "--out", vocab, "--config", cfg], env),
                "tokenize": _timed(
                    [*CLI, "tokenize", str(FILE), "--vocab", vocab, "--out", corpus, "--config", cfg], env
                ),
            }
            for bench, value in secs.items():
                conf = {"stage": mode, "n_cells": 2000, "file": FILE.name, "cold_process": True}
                record(bench, "small_file_seconds", value, "s", conf)
                if mode == "ray_local":  # how many times faster in-process is
                    ratio = value / seconds["in_process"][bench]
                    record(bench, "ratio_vs_ray_local", ratio, "x", {**conf, "stage": "ratio"})


if __name__ == "__main__":
    main()
