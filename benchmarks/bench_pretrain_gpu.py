"""MFU of `geneformer-v1` and `geneformer-v2-104m` pretraining in bf16 on one GPU (the `gpu`
benchmark; exits without a record when CUDA is absent). MFU = real tokens/s x training FLOPs per
token (6 x non-embedding parameters + attention) / the GPU's peak dense bf16 FLOP/s
(RANKFORMER_PEAK_FLOPS overrides the built-in table). Record: `pretrain`, `mfu`."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from bench_pretrain import N_GENES, ours, realistic_cells
from common import record
from pretrain_helpers import write_corpus


def main() -> None:
    if not torch.cuda.is_available():
        print("no CUDA device: the GPU benchmark is skipped")
        return
    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_corpus(str(Path(tmp) / "realistic"), realistic_cells(20000), N_GENES, shards=4)
        for preset, budget in (("geneformer-v1", 65536), ("geneformer-v2-104m", 65536)):
            r = ours(corpus, preset, 30, budget, device="cuda")
            conf = {"preset": preset, "device": torch.cuda.get_device_name(), "precision": "bf16"}
            record(
                "pretrain", "tokens_per_s_per_worker", r["tokens_per_s"], "tokens/s", {**conf, "stage": "gpu"}
            )
            record("pretrain", "mfu", r["mfu"], "fraction", {**conf, "stage": "gpu"})


if __name__ == "__main__":
    main()
