"""Fine-tuning steps on packed micro-batches (`--packed`: cells end to end, no padding) against
today's padded ones (grouped by length), in the same run: the training loop of `finetune cells`
(BERT's sequence head, each cell's first token pooled) and `finetune genes` (token head), for the
`tiny` and `geneformer-v1` presets on cells of real lengths (log-normal, median ~700 genes, at most
2,048). The weights are freshly initialised (a step's cost does not depend on them). Records
(`finetune`): `tokens_per_s` per head and batching, `ratio_packed_vs_length_grouped`."""

from __future__ import annotations

import argparse

import numpy as np
import torch

from bench_pretrain import N_GENES, realistic_cells
from common import record


def rate(preset: str, kind: str, packed: bool, cells: list[np.ndarray], steps: int, max_tokens: int) -> float:
    """Real tokens/s of ``steps`` classification steps, after one that pays the one-off costs."""
    from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

    from rankformer.config.train import BatchOptions, FinetuneOptim
    from rankformer.model.packing import use_packing
    from rankformer.model.presets import preset as get
    from rankformer.train.finetune import ClassifyTask, local_rows
    from rankformer.train.local import LocalContext
    from rankformer.train.loop import LoopOptions, run_loop

    torch.manual_seed(0)
    p = get(preset)
    config = BertConfig(
        vocab_size=N_GENES + 4,
        hidden_size=p.hidden_size,
        num_hidden_layers=p.num_hidden_layers,
        num_attention_heads=p.num_attention_heads,
        intermediate_size=p.intermediate_size,
        max_position_embeddings=2048,
        hidden_dropout_prob=p.hidden_dropout_prob,
        attention_probs_dropout_prob=p.attention_probs_dropout_prob,
        hidden_act=p.hidden_act,
        num_labels=3,
    )
    cls = BertForTokenClassification if kind == "token" else BertForSequenceClassification
    model = cls._from_config(config, attn_implementation="sdpa")
    if packed:
        use_packing(model)
    y = np.arange(len(cells)) % 3
    lookup = np.where(np.arange(N_GENES + 4) >= 4, np.arange(N_GENES + 4) % 3, -100)
    batch = BatchOptions(max_tokens=max_tokens, max_cells=64, packed=packed)
    task = ClassifyTask(local_rows(cells, y, 0), kind, 0, batch, 0, 0, lookup if kind == "token" else None)
    opts = LoopOptions(
        max_steps=steps + 1, seed=0, log_every=1, checkpoint_every=10**9, optim=FinetuneOptim()
    )
    ctx = LocalContext(None, "cpu")
    run_loop(model, task, opts, ctx)
    return float(np.mean([h["tokens_per_s"] for h in ctx.history[1:]]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--presets", nargs="+", default=["tiny", "geneformer-v1"])
    p.add_argument("--steps", type=int, default=8)
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    cells = realistic_cells(3000)
    for preset in args.presets:
        for kind in ("sequence", "token"):
            conf = {"preset": preset, "head": kind, "device": "cpu", "max_tokens": 16384, "steps": args.steps}
            padded = rate(preset, kind, False, cells, args.steps, 16384)
            packed = rate(preset, kind, True, cells, args.steps, 16384)
            record("finetune", "tokens_per_s", padded, "tokens/s", {**conf, "batches": "length-grouped"})
            record("finetune", "tokens_per_s", packed, "tokens/s", {**conf, "batches": "packed"})
            record(
                "finetune",
                "ratio_packed_vs_length_grouped",
                packed / padded,
                "x",
                {**conf, "batches": "packed"},
            )


if __name__ == "__main__":
    main()
