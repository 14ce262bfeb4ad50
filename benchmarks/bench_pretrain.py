"""Pretraining: tokens/s per worker and padding for `tiny` and `geneformer-v1` on CPU against the
plain approach in the same run (every cell padded to the model length and Hugging Face's full
``BertForMaskedLM`` head, as a stock Trainer setup does); 1 vs 2 Ray Train workers; masked-gene
accuracy on held-out cells against the best position-only guess; a loss curve for the README.

Also packed micro-batches (one token stream per micro-batch, no padding) against the length-grouped
padded ones, with the same token budget.

Records (`pretrain`): tokens_per_s_per_worker, padding_fraction, ratio_vs_padded_baseline,
ratio_packed_vs_length_grouped,
scaling_efficiency_2_workers, heldout_mlm_accuracy, position_baseline_accuracy, and mfu (CUDA only).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import HERE, record

sys.path.insert(0, str(HERE.parent / "tests"))
from pretrain_helpers import write_corpus
from rankformer.config.train import PretrainConfig
from rankformer.io.synth import ordered_cells
from rankformer.model.batching import pad_batch
from rankformer.model.masking import IGNORE, mask_genes
from rankformer.train.local import LocalContext
from rankformer.train.loop import run_loop
from rankformer.train.pretrain import build_model, loop_options
from rankformer.train.task import MaskedGeneTask, TokenSpec, arrow_cells
from rankformer.vocab.gene_vocab import GeneVocab

N_GENES = 20_000


def realistic_cells(n: int, seed: int = 0) -> list[np.ndarray]:
    """Lengths like real cells (log-normal, median ~700 genes, capped at 2,048)."""
    rng = np.random.default_rng(seed)
    lengths = rng.lognormal(6.5, 0.6, n).clip(50, 2048).astype(int)
    return [rng.choice(N_GENES, k, replace=False).astype(np.int32) + 4 for k in lengths]


def _cfg(
    corpus: str,
    preset: str,
    steps: int,
    max_tokens: int | None,
    overrides: dict | None = None,
    compiled: bool = False,
) -> PretrainConfig:
    return PretrainConfig(
        compile=compiled,
        corpus=corpus,
        out="unused",
        preset=preset,
        max_steps=steps,
        log_every=steps,
        checkpoint_every=10**9,
        optim={"warmup_steps": 1},
        batch={"max_tokens": max_tokens, "max_cells": 64, "megabatch_cells": 1024},
        model={**({"max_position_embeddings": 2048} if preset == "tiny" else {}), **(overrides or {})},
    )


def ours(
    corpus: str,
    preset: str,
    steps: int,
    max_tokens: int | None,
    device: str = "cpu",
    cudnn_attention: bool = False,
    window: int = 1,
    packed: bool = False,
    overrides: dict | None = None,
    compiled: bool = False,
) -> dict[str, float]:
    """Our loop's tokens/s (and MFU where the device's peak is known) over ``steps`` steps, logged every
    ``window`` steps (a log reads the window's sums back from the device: on a GPU, the host's one
    wait), after a first window that pays the one-off costs and is left out.
    ``cudnn_attention``: with SDPA's cuDNN backend allowed again (the loop's device settings leave
    it out), to measure what that setting is worth. ``packed``: each micro-batch's cells in one
    token stream, attention as the job runs it on ``device`` (else padded, grouped by length).
    ``max_tokens`` None: the job's budget for ``device`` (on a GPU, from a probe step).
    ``overrides``: preset fields, e.g. no attention dropout. ``compiled``: `--compile`."""
    from rankformer.corpus.read import corpus_files
    from rankformer.model.packing import use_varlen_attention
    from rankformer.train.budget import training_token_budget
    from rankformer.train.task import flops_per_token, peak_flops

    cfg = _cfg(corpus, preset, window + steps, max_tokens, overrides, compiled)
    vocab = GeneVocab.load(os.path.join(os.path.dirname(corpus), os.path.basename(corpus) + "_vocab.json"))
    task = MaskedGeneTask(arrow_cells(corpus_files(corpus), 0), TokenSpec.of(vocab), cfg, 0, packed=packed)
    cfg.log_every = window
    ctx = LocalContext(None, device)
    if cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(True)
    if ctx.device.type == "cuda":  # this run's own peak
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx.device)
    model = build_model(cfg, vocab, None)
    if packed:
        use_varlen_attention(model.mlm)
    budget, said = training_token_budget(
        max_tokens, model.to(ctx.device), task, ctx.device, cfg.precision, 2048
    )
    cfg.batch.max_tokens = budget
    if said:
        print(f"{preset}: {said}", flush=True)
    extra = {"flops_per_token": flops_per_token(model, 700.0)}
    peak = peak_flops(ctx.device)
    if peak:
        extra["peak_flops"] = peak
    run_loop(model, task, loop_options(cfg, extra), ctx)
    rest = ctx.history[1:]
    out = {
        "tokens_per_s": float(np.mean([h["tokens_per_s"] for h in rest])),
        "padding_fraction": float(np.mean([h["padding_fraction"] for h in rest])),
    }
    if peak:
        out["mfu"] = float(np.mean([h["mfu"] for h in rest]))
    out["max_tokens"] = float(cfg.batch.max_tokens or 0)
    if ctx.device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(ctx.device) / (1 << 30)
    return out


def padded_baseline(
    cells: list[np.ndarray], preset: str, steps: int, cells_per_batch: int
) -> dict[str, float]:
    """Every cell padded to 2,048; the full HF head on every position; AdamW."""
    cfg = _cfg("unused", preset, steps, 1)
    vocab_size = N_GENES + 4
    from transformers import BertConfig, BertForMaskedLM

    from rankformer.model.presets import preset as get

    p = get(preset, cfg.model)
    model = BertForMaskedLM._from_config(
        BertConfig(
            vocab_size=vocab_size,
            hidden_size=p.hidden_size,
            num_hidden_layers=p.num_hidden_layers,
            num_attention_heads=p.num_attention_heads,
            intermediate_size=p.intermediate_size,
            max_position_embeddings=2048,
            hidden_act="relu",
        ),
        attn_implementation="sdpa",
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    real = 0
    times = []
    for s in range(steps + 1):
        batch = cells[s * cells_per_batch : (s + 1) * cells_per_batch]
        ids = torch.zeros((len(batch), 2048), dtype=torch.long)
        for i, c in enumerate(batch):
            ids[i, : len(c)] = torch.from_numpy(c)
        inputs, labels = mask_genes(ids, 4, 1, vocab_size, g)
        t0 = time.perf_counter()
        loss = model(input_ids=inputs, attention_mask=(ids != 0).long(), labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if s:  # the first step pays one-off costs
            times.append(time.perf_counter() - t0)
            real += int((ids != 0).sum())
    pad = 1 - real / (steps * cells_per_batch * 2048)
    return {"tokens_per_s": real / sum(times), "padding_fraction": pad}


def throughput(work: Path, presets: list[str]) -> None:
    cells = realistic_cells(3000)
    corpus = write_corpus(str(work / "realistic"), cells, N_GENES, shards=2)
    for preset, steps, budget, per_batch in (("tiny", 12, 16384, 8), ("geneformer-v1", 4, 8192, 4)):
        if preset not in presets:
            continue
        torch.manual_seed(0)
        a = ours(corpus, preset, steps, budget)
        b = padded_baseline(cells, preset, steps, per_batch)
        conf = {"preset": preset, "device": "cpu", "threads": torch.get_num_threads()}
        record(
            "pretrain", "tokens_per_s_per_worker", a["tokens_per_s"], "tokens/s", {**conf, "stage": "ours"}
        )
        record("pretrain", "padding_fraction", a["padding_fraction"], "fraction", {**conf, "stage": "ours"})
        record(
            "pretrain", "tokens_per_s_per_worker", b["tokens_per_s"], "tokens/s", {**conf, "stage": "padded"}
        )
        record("pretrain", "padding_fraction", b["padding_fraction"], "fraction", {**conf, "stage": "padded"})
        ratio = a["tokens_per_s"] / b["tokens_per_s"]
        record("pretrain", "ratio_vs_padded_baseline", ratio, "x", {**conf, "stage": "ratio"})
        packing(corpus, preset, steps, budget, a["tokens_per_s"], conf)


PACKING_RUNS = (("tiny", 12, 16384), ("geneformer-v1", 5, 8192))  # preset, steps, token budget


def packing_only(work: Path, presets: list[str]) -> None:
    """Length-grouped then packed micro-batches, each preset in the same run."""
    corpus = write_corpus(str(work / "realistic"), realistic_cells(3000), N_GENES, shards=2)
    for preset, steps, budget in PACKING_RUNS:
        if preset in presets:
            torch.manual_seed(0)
            grouped = ours(corpus, preset, steps, budget)
            conf = {"preset": preset, "device": "cpu", "threads": torch.get_num_threads()}
            record(
                "pretrain",
                "tokens_per_s_per_worker",
                grouped["tokens_per_s"],
                "tokens/s",
                {**conf, "stage": "ours"},
            )
            packing(corpus, preset, steps, budget, grouped["tokens_per_s"], conf)


def packing(corpus: str, preset: str, steps: int, budget: int, grouped: float, conf: dict) -> None:
    """Packed micro-batches (one token stream, no padding) against the length-grouped padded ones
    measured just before, in the same run and with the same token budget."""
    torch.manual_seed(0)
    p = ours(corpus, preset, steps, budget, packed=True)
    record("pretrain", "tokens_per_s_per_worker", p["tokens_per_s"], "tokens/s", {**conf, "stage": "packed"})
    ratio = p["tokens_per_s"] / grouped
    record("pretrain", "ratio_packed_vs_length_grouped", ratio, "x", {**conf, "stage": "packed"})


def heldout(work: Path) -> None:
    """Train tiny on planted gene orders; masked-gene accuracy on held-out cells vs position guess."""
    from rankformer.corpus.read import corpus_files

    cells = ordered_cells(3000, 400, 8, 60, seed=11)
    train, test = cells[:2500], cells[2500:]
    corpus = write_corpus(str(work / "ordered"), train, 400, shards=2)
    cfg = PretrainConfig(
        corpus=corpus,
        out="unused",
        max_steps=600,
        log_every=20,
        checkpoint_every=10**9,
        optim={"lr": 3e-3, "warmup_steps": 30},
        batch={"max_tokens": 2048, "max_cells": 64},
    )
    vocab = GeneVocab.load(os.path.join(work, "ordered_vocab.json"))
    spec = TokenSpec.of(vocab)
    model = build_model(cfg, vocab, None)
    ctx = LocalContext(None, "cpu")
    run_loop(
        model, MaskedGeneTask(arrow_cells(corpus_files(corpus), 0), spec, cfg, 0), loop_options(cfg, {}), ctx
    )
    # the best position-only guess: the most frequent gene at each position of the training cells
    width = max(len(c) for c in cells)
    counts = np.zeros((width, spec.n_tokens), np.int64)
    for c in train:
        np.add.at(counts, (np.arange(len(c)), c), 1)
    guess = counts.argmax(axis=1)
    g = torch.Generator().manual_seed(123)
    ids, attn = pad_batch(test, spec.pad)
    inputs, labels = mask_genes(ids, spec.gene_lo, spec.mask, spec.n_tokens, g)
    model.eval()
    with torch.no_grad():
        logits = model.mlm(input_ids=inputs, attention_mask=attn).logits
    sel = labels != IGNORE
    acc = float((logits.argmax(-1)[sel] == labels[sel]).float().mean())
    pos = torch.arange(ids.shape[1]).expand_as(ids)
    base = float((torch.from_numpy(guess)[pos[sel]] == labels[sel]).float().mean())
    conf = {"preset": "tiny", "stage": "heldout", "cells_train": 2500, "cells_test": 500, "steps": 600}
    record("pretrain", "heldout_mlm_accuracy", acc, "fraction", conf)
    record("pretrain", "position_baseline_accuracy", base, "fraction", conf)
    _loss_curve(ctx.history, HERE.parent / "docs" / "img" / "pretrain_loss.png")  # shown in the docs


def _loss_curve(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["loss"] for h in history], label="masked-gene loss")
    ax2 = ax.twinx()
    ax2.plot(steps, [h["accuracy"] for h in history], color="#b33", label="masked-gene accuracy")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax2.set_ylabel("accuracy")
    ax.set_title("tiny preset, planted gene orders (benchmarks/bench_pretrain.py)")
    fig.legend(loc="center right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def scaling(work: Path) -> None:
    """1 vs 2 Ray Train workers on a local Ray instance (tiny, the realistic corpus)."""
    import ray

    from rankformer.train.pretrain import run_pretrain

    corpus = str(work / "realistic")
    per_worker = {}
    for n in (1, 2):
        ray.shutdown()
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        cfg = _cfg(corpus, "tiny", 40, 16384)
        cfg.out = str(work / f"model_{n}")
        shutil.rmtree(cfg.out, ignore_errors=True)  # a model in place: the same training would be skipped
        cfg.log_every = 20
        cfg.checkpoint_every = 40
        cfg.scale.num_workers, cfg.scale.cpus_per_worker = n, 0.5
        cfg.scale.storage_path = str(work / "ray")
        cfg.track.tracking_uri = f"sqlite:///{work}/mlflow.db"
        per_worker[n] = run_pretrain(cfg)["tokens_per_s"]
    ray.shutdown()
    conf = {"preset": "tiny", "device": "cpu", "stage": "ray_train"}
    for n in (1, 2):
        record("pretrain", "tokens_per_s_per_worker", per_worker[n], "tokens/s", {**conf, "workers": n})
    record("pretrain", "scaling_efficiency_2_workers", per_worker[2] / per_worker[1], "fraction", conf)


def compile_only(work: Path) -> None:
    """`--compile` (torch.compile of the model) against eager, padded and packed, `tiny` on the CPU,
    in the same run: steady-state tokens/s (the first window, which compiles, left out) and the
    wall time of the whole run, compilation included."""
    corpus = write_corpus(str(work / "realistic"), realistic_cells(3000), N_GENES, shards=2)
    conf = {"preset": "tiny", "device": "cpu", "threads": torch.get_num_threads()}
    for packed in (False, True):
        rates = {}
        for compiled in (False, True):
            torch.manual_seed(0)
            t0 = time.perf_counter()
            rates[compiled] = ours(corpus, "tiny", 20, 16384, window=5, packed=packed, compiled=compiled)
            c = {**conf, "batches": "packed" if packed else "length-grouped", "compile": compiled}
            record("pretrain", "tokens_per_s_per_worker", rates[compiled]["tokens_per_s"], "tokens/s", c)
            record("pretrain", "wall_s", time.perf_counter() - t0, "s", c)
        ratio = rates[True]["tokens_per_s"] / rates[False]["tokens_per_s"]
        c = {**conf, "batches": "packed" if packed else "length-grouped", "compile": True}
        record("pretrain", "ratio_compiled_vs_eager", ratio, "x", c)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip-scaling", action="store_true")
    p.add_argument("--presets", nargs="+", default=["tiny", "geneformer-v1"])
    p.add_argument(
        "--only-packing", action="store_true", help="only packed against length-grouped micro-batches"
    )
    p.add_argument("--only-compile", action="store_true", help="only --compile against eager (tiny)")
    args = p.parse_args()
    if torch.cuda.is_available():
        print("CUDA present: `python benchmarks/bench_pretrain_gpu.py` records MFU")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.only_packing:
            packing_only(work, args.presets)
            return
        if args.only_compile:
            compile_only(work)
            return
        throughput(work, args.presets)
        heldout(work)
        if not args.skip_scaling:
            scaling(work)


if __name__ == "__main__":
    main()
