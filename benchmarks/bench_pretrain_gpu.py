"""MFU of `geneformer-v1`, `geneformer-v2-104m` and `geneformer-v2-316m` pretraining in bf16 on one
GPU, today's padded batches (grouped by length) against packed ones (one token stream per
micro-batch) in the same run (the `gpu` benchmark; exits without a record when CUDA is absent).
MFU = real tokens/s x training FLOPs per token (6 x non-embedding parameters + attention) / the
GPU's peak dense bf16 FLOP/s (RANKFORMER_PEAK_FLOPS overrides the built-in table). 30 steps
measured and logged once (a log is the loop's one wait for the GPU), after 30 that warm up.

Per preset, as the records' `batches` and `attention` say:
- `length-grouped`: padded, the token budget given (65,536; 32,768 for v2-316m);
- `packed`: the same budget, the preset's attention dropout (FlashAttention over a jagged nested
  tensor, dropout in the kernel);
- `packed`, `attention: no-dropout`: attention dropout 0 (PyTorch's `varlen_attn`), the recipe of
  recent BERT pretraining;
- `packed`, `budget: from-memory`: no --max-tokens: the job's probe step sizes the micro-batch.
With --with-cudnn, also the padded run with SDPA's cuDNN backend allowed (the loop leaves it out
on CUDA: it builds a plan for every new batch shape; on ad40a6d that was 3.3x and 1.9x slower).
Records: `pretrain` `tokens_per_s_per_worker`, `mfu`, `ratio_packed_vs_length_grouped`,
`peak_memory_gib`, `ratio_vs_cudnn_attention`; `--presets` picks some."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bench_pretrain import N_GENES, ours, realistic_cells
from common import record

PRESETS = {"geneformer-v1": 65536, "geneformer-v2-104m": 65536, "geneformer-v2-316m": 32768}
NO_DROPOUT = {"attention_probs_dropout_prob": 0.0}


def variants(budget: int) -> list[tuple[bool, int | None, dict | None, dict[str, str]]]:
    """(packed, max_tokens, preset overrides, record labels) of each run of a preset, padded first."""
    return [
        (False, budget, None, {}),
        (True, budget, None, {"attention": "dropout"}),
        (True, budget, NO_DROPOUT, {"attention": "no-dropout"}),
        (True, None, NO_DROPOUT, {"attention": "no-dropout", "budget": "from-memory"}),
    ]


def main() -> None:
    from pretrain_helpers import write_corpus

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--with-cudnn", action="store_true", help="also the padded run with cuDNN attention")
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: the GPU benchmark is skipped")
        return
    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_corpus(str(Path(tmp) / "realistic"), realistic_cells(20000), N_GENES, shards=4)
        for preset in args.presets:
            conf = {"preset": preset, "device": torch.cuda.get_device_name(), "precision": "bf16"}
            conf.update({"stage": "gpu", "log_every": 30})
            padded = 0.0
            for packed, max_tokens, overrides, labels in variants(PRESETS[preset]):
                r = ours(
                    corpus, preset, 30, max_tokens, "cuda", window=30, packed=packed, overrides=overrides
                )
                batches = "packed" if packed else "length-grouped"
                c = {**conf, "batches": batches, "max_tokens": int(r["max_tokens"]), **labels}
                record("pretrain", "tokens_per_s_per_worker", r["tokens_per_s"], "tokens/s", c)
                record("pretrain", "mfu", r["mfu"], "fraction", c)
                record("pretrain", "peak_memory_gib", r["peak_memory_gib"], "GiB", c)
                print(f"{preset} {batches} {labels}: {r['tokens_per_s']:,.0f} tokens/s, MFU {r['mfu']:.3f}")
                if packed:
                    record("pretrain", "ratio_packed_vs_length_grouped", r["tokens_per_s"] / padded, "x", c)
                else:
                    padded = r["tokens_per_s"]
            if args.with_cudnn:
                r = ours(corpus, preset, 30, PRESETS[preset], "cuda", cudnn_attention=True, window=30)
                torch.backends.cuda.enable_cudnn_sdp(False)
                record("pretrain", "ratio_vs_cudnn_attention", padded / r["tokens_per_s"], "x", conf)


if __name__ == "__main__":
    main()
