"""MFU of `geneformer-v1`, `geneformer-v2-104m` and `geneformer-v2-316m` pretraining in bf16 on one
GPU, padded (grouped by length) and packed (one token stream per micro-batch) in the same run (the `gpu`
benchmark; exits without a record when CUDA is absent). MFU = real tokens/s x training FLOPs per
token (6 x non-embedding parameters + attention) / the GPU's peak dense bf16 FLOP/s
(RANKFORMER_PEAK_FLOPS overrides the built-in table). 30 steps measured and logged once (a log is
the loop's one wait for the GPU), after 30 that warm up. With --with-cudnn, also the same runs
with SDPA's cuDNN backend allowed (the training loop leaves it out on CUDA: it builds a plan for
every new batch shape; on ad40a6d that was 3.3x and 1.9x slower). Records: `pretrain`
`tokens_per_s_per_worker`, `mfu`, `ratio_vs_cudnn_attention`."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bench_pretrain import N_GENES, ours, realistic_cells
from common import record
from pretrain_helpers import write_corpus


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "--with-cudnn",
        action="store_true",
        help="also run with cuDNN attention allowed (ratio_vs_cudnn_attention)",
    )
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: the GPU benchmark is skipped")
        return
    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_corpus(str(Path(tmp) / "realistic"), realistic_cells(20000), N_GENES, shards=4)
        for preset, budget in (
            ("geneformer-v1", 65536),
            ("geneformer-v2-104m", 65536),
            ("geneformer-v2-316m", 32768),
        ):
            conf = {"preset": preset, "device": torch.cuda.get_device_name(), "precision": "bf16"}
            rates = {}
            # the loop's own settings (the headline figures), then with cuDNN's attention when asked
            for cudnn in (False, True) if args.with_cudnn else (False,):
                r = ours(corpus, preset, 30, budget, device="cuda", cudnn_attention=cudnn, window=30)
                rates[cudnn] = r["tokens_per_s"]
                run = {**conf, "stage": "gpu", "log_every": 30}
                run.update({"attention": "cudnn-allowed"} if cudnn else {})
                record("pretrain", "tokens_per_s_per_worker", r["tokens_per_s"], "tokens/s", run)
                record("pretrain", "mfu", r["mfu"], "fraction", run)
            # packed micro-batches (attention within each cell) against the padded run above
            r = ours(corpus, preset, 30, budget, device="cuda", window=30, packed=True)
            run = {**conf, "stage": "gpu", "log_every": 30, "batches": "packed"}
            record("pretrain", "tokens_per_s_per_worker", r["tokens_per_s"], "tokens/s", run)
            record("pretrain", "mfu", r["mfu"], "fraction", run)
            record("pretrain", "ratio_packed_vs_length_grouped", r["tokens_per_s"] / rates[False], "x", run)
            if args.with_cudnn:
                ratio = rates[False] / rates[True]
                run = {**conf, "stage": "gpu", "log_every": 30}
                record("pretrain", "ratio_vs_cudnn_attention", ratio, "x", run)


if __name__ == "__main__":
    main()
