"""In silico perturbation and embeddings on CPU.

* Perturbed cells/s, every gene of each cell deleted, with two cell states, for `tiny` and
  `geneformer-v1` (random weights: speed does not depend on them) on a vocabulary the size of
  Geneformer V1's, next to the reference's method written our own way in the same run: each cell's
  original forward once, then its variants in minibatches of `forward_batch_size` through a plain
  per-batch loop, one cell at a time, through the masked-LM model as the reference loads a
  pretrained one (every hidden state returned, the prediction head run over the vocabulary),
  padded with an attention mask, per-gene cosines against the original with the deleted row
  removed. Also next to the same loop through the bare encoder (no prediction head), so the two
  sources of the ratio are apart. All compute the same numbers (checked on the first cell). Ours
  also runs in bfloat16 (`--precision bfloat16`; this CPU has AVX-512 BF16), recorded with
  `precision` in the config and checked to 1e-2.
* With CUDA: the same comparison on the GPU (float32, bfloat16, float16), longer cells. There each
  timed run (every method, ours at each setting) follows an untimed run of the same job: the first
  run of a method on a GPU loads its kernels and makes the libraries' per-shape plans (each length
  of cell is a new shape), which a corpus-scale job pays once and a 128-cell run would count in
  full (timed cold, whichever of two runs of ours came second won by up to 2x).
* Embedding cells/s on a pool of 1 and 2 Ray actors; the gene-level median's peak memory, with a
  shard's occurrences spilled by token range, against holding and sorting them all in memory.

Records: `perturb` perturbed_cells_per_s, peak_memory_mb (CPU: growth of the process's resident
memory during the run; CUDA: torch's peak allocation), ratio_vs_reference_method,
ratio_vs_plain_encoder_loop; gflops_per_s of each method (its arithmetic, counted from the shapes,
over its time) and of a plain matmul at the model's feed-forward shape (`plain-matmul`: what the
device gives dense arithmetic at that precision, in the same run); arithmetic_ratio_vs_reference_method
(how much of the ratio is less arithmetic: the rest is arithmetic done faster); on CPU,
kernel_floor_ratio_vs_reference_method (the ratio if ours took only the time of its matrix products
and attention, PyTorch's kernels timed alone at the job's shapes: the most those kernels allow) and
time_over_kernel_floor (ours' time over that floor), with `cpu_bf16` in the config (what the CPU has
for bfloat16 products: AMX, AVX-512 BF16 or none); on a GPU,
gpu_busy_fraction (the share of an extra, profiled run of ours in which the GPU computed) and
ratio_vs_fixed_budget (ours at its default tokens per forward batch, from the GPU's free memory,
against the same job at 131,072, the fixed default before) and ratio_vs_other_first_layer (ours,
whose deletions take the first layer's attention by prefix sums or as a plain attention pass as
`rankformer.model.deletions.prefix_sums_on` decides, against the same job the other way);
`embed` cells_per_s, scaling_efficiency_2_workers, median_peak_memory_mb,
median_memory_ratio_vs_hold_all.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import HERE, WORK, record, rss_growth

sys.path.insert(0, str(HERE.parent / "tests"))
from pretrain_helpers import write_corpus

N_GENES = 2000
FIXED_GPU_BUDGET = 131_072  # the GPU's default tokens per forward batch before it came from memory
V1_GENES = 25_422  # with our four special tokens, the 25,426 entries of Geneformer's V1 dictionary


def cells(n: int, median: int, seed: int = 0, n_genes: int = N_GENES) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.lognormal(np.log(median), 0.4, n).clip(20, 2046).astype(int)
    return [np.asarray([2, *(rng.choice(n_genes, k, replace=False) + 4), 3], dtype=np.int32) for k in lengths]


def cpu_bf16() -> str:
    """What this CPU has for bfloat16 matrix products: "amx" (tile units: PyTorch's bfloat16 matmul and
    CPU flash attention use them), "avx512" (AVX-512 BF16 dot products) or "none"."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        flags = []
    return "amx" if "amx_bf16" in flags else "avx512" if "avx512_bf16" in flags else "none"


def model_dir(work: Path, preset_name: str, corpus: str) -> str:
    import json

    from transformers import BertForMaskedLM

    from rankformer.model.presets import bert_config, preset
    from rankformer.model.store import save_model_dir
    from rankformer.vocab.gene_vocab import GeneVocab

    vocab = GeneVocab.load(json.loads(Path(corpus, "manifest.json").read_text())["config"]["vocab"])
    over = {"max_position_embeddings": 4096} if preset_name != "tiny" else {}
    torch.manual_seed(0)
    model = BertForMaskedLM(bert_config(preset(preset_name, over), vocab))
    out = str(work / f"model_{preset_name}")
    save_model_dir(model, vocab, {"task": "masked-lm", "layout": "v2", "max_length": 2048}, out)
    return out


def forward_flops(config: Any, lengths: Iterable[int], layers: int, head: bool) -> float:
    """Arithmetic (2 per multiply-add) of BERT forward passes, one sequence per entry of
    ``lengths`` (a padded batch: its padded length once per row): per layer the four attention
    projections, the two feed-forward matmuls, the attention scores and their weighted sum; with
    ``head``, the masked-LM prediction head (a dense layer, then the projection onto the
    vocabulary) at every position. Layer norms, activations and lookups are left out (a few % at
    these sizes)."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    n = np.fromiter(lengths, dtype=np.float64)
    total = layers * float((2 * n * (4 * h * h + 2 * h * i) + 4 * n * n * h).sum())
    if head:
        total += float((2 * n * (h * h + h * v)).sum())
    return total


def shared_first_layer_flops(config: Any, k: int, max_tokens: int) -> float:
    """Arithmetic of the first layer of a ``k``-token cell's deletions (every gene, ``<cls>`` and
    ``<eos>`` kept) through :class:`rankformer.model.deletions.SharedDeletions`, in our batches: the
    projections of its 2(k-1) distinct input rows once, per batch the scores of the queries and keys
    the batch reads and the products over the keys outside its band (the cumulative sums inside the
    band are left out, like layer norms), and per deletion the output projection and feed-forward."""
    h, i = config.hidden_size, config.intermediate_size
    n = k - 1  # a deletion's length
    total = 2.0 * (2 * n) * 3 * h * h
    per_batch = max(1, max_tokens // n)
    for p0 in range(1, k - 1, per_batch):
        p1 = min(p0 + per_batch, k - 1)
        keys = (p1 - 1) + (n - p0)  # o-keys below p1-1, s-keys from p0
        for rows in (p1 - 1, n - p0):  # o-queries, s-queries
            total += 2.0 * rows * keys * h + 2.0 * rows * (p0 + max(n - p1, 0)) * h
        total += (p1 - p0) * 2.0 * n * (h * h + 2 * h * i)
    return total


def arithmetic(
    config: Any, data: list[np.ndarray], states: list[str], batch: int, max_tokens: int, prefix_sums: bool
) -> dict[str, float]:
    """What each method computes for the run, counted from its shapes. The reference pads each
    minibatch to its longest cell and runs every layer (and, as it loads a pretrained model, the
    prediction head); ours runs the layers up to the penultimate one over each state's cells and,
    for each perturbed cell, its original and its variants, padding not counted (its batches group
    cells by length, and a cell's deletions are all one length), the variants' first layer by prefix
    sums with ``prefix_sums`` (:func:`shared_first_layer_flops`), else as a plain layer."""
    layers = config.num_hidden_layers
    padded = []
    for s in sorted(set(states)):
        members = [len(c) for c, st in zip(data, states, strict=True) if st == s]
        for i in range(0, len(members), batch):
            padded += [max(members[i : i + batch])] * len(members[i : i + batch])
    perturbed = [len(c) for c, st in zip(data, states, strict=True) if st == "A"]
    per_cell = [n for k in perturbed for n in [k] + [k - 1] * (k - 2)]  # the original, each deletion
    deletions = [k - 1 for k in perturbed for _ in range(k - 2)]
    ours = forward_flops(config, [len(c) for c in data] + perturbed, layers - 1, head=False)
    if prefix_sums:
        ours += forward_flops(config, deletions, layers - 2, head=False)
        ours += sum(shared_first_layer_flops(config, k, max_tokens) for k in perturbed)
    else:
        ours += forward_flops(config, deletions, layers - 1, head=False)
    return {
        "reference": forward_flops(config, padded + per_cell, layers, head=True),
        "plain-encoder-loop": forward_flops(config, padded + per_cell, layers, head=False),
        "rankformer": ours,
    }


@torch.no_grad()
def kernel_floor(
    config: Any,
    data: list[np.ndarray],
    states: list[str],
    max_tokens: int,
    dtype: torch.dtype,
    prefix_sums: bool,
) -> float:
    """Seconds that only the matrix products and attention of ours' deletion passes take, each of
    PyTorch's kernels timed alone on this CPU at the job's shapes (best of 3): for every batch of a
    perturbed cell's deletions (as the perturber groups them within ``max_tokens``), the layers above
    the first up to the penultimate in full (query, key and value projections as one product or
    three, whichever is faster; attention; output projection; feed-forward), and the first layer's
    attention (unless ``prefix_sums``), output projection and feed-forward. Everything else is left
    out: the originals, the state cells, the shared first layer's projections and sums, layer norms,
    activations, residuals, scoring. So this is less than any way of computing the same deletions
    with these kernels takes, and the reference's time over it bounds from above the ratio reachable
    with them here."""
    f = torch.nn.functional
    h, inter, heads = config.hidden_size, config.intermediate_size, config.num_attention_heads
    above = config.num_hidden_layers - 2  # layers 2 .. penultimate

    def best(fn: Any, *shapes: tuple[int, ...]) -> float:
        args = [torch.randn(*s, dtype=dtype) for s in shapes]
        return best_seconds(lambda: fn(*args), "cpu", warm=True)

    def linear(m: int, k: int, n: int) -> float:
        return best(f.linear, (m, k), (n, k), (n,))

    def one_pass(b: int, n: int) -> float:
        m = b * n
        attention = best(f.scaled_dot_product_attention, *[(b, heads, n, h // heads)] * 3)
        rest = linear(m, h, h) + linear(m, h, inter) + linear(m, inter, h)
        qkv = min(linear(m, h, 3 * h), 3 * linear(m, h, h))
        return above * (qkv + attention + rest) + rest + (0.0 if prefix_sums else attention)

    from rankformer.model.batching import budget_batches

    passes: dict[tuple[int, int], int] = {}  # (deletions, length) -> passes of that shape
    for c, st in zip(data, states, strict=True):
        if st != "A":
            continue
        n, dels = len(c) - 1, len(c) - 2  # every gene deleted, <cls> and <eos> kept
        for idx in budget_batches(np.full(dels, n), max_tokens, dels):  # as the perturber groups them
            passes[(len(idx), n)] = passes.get((len(idx), n), 0) + 1
    return sum(count * one_pass(b, n) for (b, n), count in passes.items())


def budget_of(model: str, device: str, precision: str) -> int:
    """The tokens per forward batch a perturbation job of ``model`` takes on ``device`` at
    ``precision`` by default (on CUDA: from the memory free beside the model, as the job finds it)."""
    from rankformer.model.budget import token_budget
    from rankformer.perturb.perturber import Perturber

    if device != "cuda":
        return token_budget(None)
    worker = Perturber.on_demand(model, "", True, precision, "penultimate")
    budget = worker.max_tokens
    del worker
    torch.cuda.empty_cache()
    return budget


def matmul_rate(config: Any, dtype: torch.dtype, device: str, tokens: int = 16_384) -> float:
    """GFLOP/s of a plain matmul at the model's feed-forward shape (a batch of ``tokens`` positions
    times the hidden-to-intermediate weight) on this device and dtype: what the hardware gives the
    bulk of the arithmetic, measured in the same run."""
    x = torch.randn(tokens, config.hidden_size, device=device, dtype=dtype)
    w = torch.randn(config.hidden_size, config.intermediate_size, device=device, dtype=dtype)
    reps = 5
    best = best_seconds(lambda: [x @ w for _ in range(reps)], device)
    return 2 * tokens * config.hidden_size * config.intermediate_size * reps / best / 1e9


def best_seconds(fn: Any, device: str, warm: bool = False, tries: int = 3) -> float:
    """The fastest of ``tries`` timed calls of ``fn`` (after an untimed one with ``warm``); on CUDA
    each timing covers the kernels the call queued."""
    if warm:
        fn()
    best = float("inf")
    for _ in range(tries):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


@torch.no_grad()
def reference_method(
    model_path: str,
    data: list[np.ndarray],
    states: list[str],
    batch: int,
    device: str = "cpu",
    with_head: bool = True,
) -> dict[str, float]:
    """The reference's way, in our words. It loads a pretrained model as the masked-LM model with
    every hidden state returned, so each forward pass also runs the prediction head over the whole
    vocabulary (`with_head`; False: the bare encoder, the plain loop without that cost). Minibatches
    of `batch` right-padded with an attention mask; state embeddings from the state cells in such
    minibatches; per cell the original once, then its variants minibatch by minibatch: the layer's
    states, per-gene cosines against the original with the deleted gene's row removed, mean-pooled
    cell embeddings and their cosines with the states."""
    from transformers import BertForMaskedLM, BertModel

    kind = BertForMaskedLM if with_head else BertModel
    model = kind.from_pretrained(model_path, output_hidden_states=True).eval().to(device)
    layer = model.config.num_hidden_layers - 1  # penultimate
    cos = torch.nn.functional.cosine_similarity

    def forward(batch_ids: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        n = max(len(c) for c in batch_ids)
        ids = torch.zeros(len(batch_ids), n, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for k, c in enumerate(batch_ids):
            ids[k, : len(c)] = torch.as_tensor(c.astype(np.int64))
            mask[k, : len(c)] = 1
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device))
        return out.hidden_states[layer], mask.to(device)

    def pooled(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean over gene tokens: not `<cls>`, `<eos>` (the last real token) or padding."""
        genes = mask.clone()
        genes[:, 0] = 0
        genes[torch.arange(len(mask), device=mask.device), mask.sum(1) - 1] = 0
        w = genes.unsqueeze(-1).to(h.dtype)
        return (h * w).sum(1) / w.sum(1)

    state_vec = {}
    for s in sorted(set(states)):
        members = [c for c, st in zip(data, states, strict=True) if st == s]
        vecs = [pooled(*forward(members[i : i + batch])) for i in range(0, len(members), batch)]
        state_vec[s] = torch.cat(vecs).mean(0)
    first = None
    for c, st in zip(data, states, strict=True):
        if st != "A":
            continue
        h0, m0 = forward([c])
        v0 = pooled(h0, m0)[0]
        g0 = h0[0, 1:-1]  # the original's gene states
        n = len(g0)
        for i in range(0, n, batch):
            rows = range(i, min(i + batch, n))
            variants = [np.delete(c, 1 + j) for j in rows]
            h1, m1 = forward(variants)
            keep = torch.ones(len(rows), n, dtype=torch.bool)
            keep[torch.arange(len(rows)), torch.as_tensor(list(rows))] = False
            keep = keep.to(g0.device)
            original = g0.unsqueeze(0).expand(len(rows), -1, -1)[keep].view(len(rows), n - 1, -1)
            gene_mean = cos(h1[:, 1:-1], original, dim=2).mean(1)
            v1 = pooled(h1, m1)
            cell = cos(v1, v0.unsqueeze(0), dim=1)
            shifts = {s: cos(v1, sv.unsqueeze(0), dim=1) - cos(v0, sv, dim=0) for s, sv in state_vec.items()}
            if first is None:
                first = {"cell_cosine": float(cell[0]), "gene_mean_cosine": float(gene_mean[0])}
                first |= {f"shift_{s}": float(v[0]) for s, v in shifts.items()}
    if device == "cuda":
        torch.cuda.synchronize()  # the timing covers the queued kernels
    return first or {}


@contextmanager
def measured(device: str) -> Iterator[dict[str, float]]:
    """Seconds (``["s"]``) and peak memory in MB (``["mb"]``) of the block: on CPU the growth of
    this process's resident memory, on CUDA the most that torch held allocated on the GPU."""
    out: dict[str, float] = {}
    if device == "cuda":  # (no memory-sampling thread here: a host-bound GPU job would share the GIL)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        yield out
        torch.cuda.synchronize()
        out["s"] = time.perf_counter() - t
        out["mb"] = torch.cuda.max_memory_allocated() / 2**20
        return
    t = time.perf_counter()
    with rss_growth() as rss:
        yield out
    out["s"] = time.perf_counter() - t
    out["mb"] = rss["mb"]


def perturb_bench(
    work: Path,
    preset_name: str,
    n_cells: int,
    median: int,
    batch: int,
    precisions: tuple[str, ...],
    device: str = "cpu",
) -> None:
    """The reference method (float32, as the reference runs) and the plain encoder loop once, then
    ours at each precision; all on a vocabulary the size of Geneformer V1's (the prediction head the
    reference runs scales with it)."""
    from rankformer.model.forward import PRECISIONS
    from rankformer.perturb.job import PerturbConfig, read_results, run_perturb

    data = cells(n_cells, median, n_genes=V1_GENES)
    states = ["A" if i % 2 == 0 else "B" for i in range(n_cells)]
    corpus = write_corpus(
        str(work / f"corpus_{preset_name}"), data, V1_GENES, shards=1, carry={"state": states}
    )
    model = model_dir(work, preset_name, corpus)
    torch.set_num_threads(os.cpu_count() or 1)
    if device == "cuda":  # context, cuBLAS handles and kernels of each precision: outside every timing
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(256, 256, device=device, dtype=dtype)
            torch.nn.functional.scaled_dot_product_attention(x[None, None], x[None, None], x[None, None])
            (x @ x).sum().item()
    from transformers import AutoConfig

    bert = AutoConfig.from_pretrained(model)
    warm = device == "cuda"  # each timed run after an untimed one of the same job (see the docstring)
    baselines = {}  # method -> (seconds, peak MB, first row)
    for method, with_head in (("reference", True), ("plain-encoder-loop", False)):
        if warm:
            reference_method(model, data, states, batch, device, with_head)
        with measured(device) as m:
            row = reference_method(model, data, states, batch, device, with_head)
        baselines[method] = (m["s"], m["mb"], row)
    perturbed = n_cells // 2

    def ours(out: Path, precision: str, max_tokens: int | None = None) -> None:
        run_perturb(
            PerturbConfig(
                model=model,
                corpus=corpus,
                out=str(out),
                mode="all",
                state_column="state",
                start_state="A",
                goal_state="B",
                alt_states=["A"],
                precision=precision,
                use_gpu=device == "cuda",
                in_process=True,
                max_tokens=max_tokens,
            )
        )

    def timed_ours(out: Path, precision: str, max_tokens: int | None = None) -> dict[str, float]:
        if warm:
            ours(out.with_name(out.name + "_warm"), precision, max_tokens)
        with measured(device) as m:
            ours(out, precision, max_tokens)
        return m

    for precision in precisions:
        out = work / f"perturb_{preset_name}_{precision}"
        m = timed_ours(out, precision)
        ours_s = m["s"]
        first = read_results(str(out)).to_pandas().iloc[0]
        tol = 1e-4 if precision == "float32" else 1e-2  # the same numbers (else: to the rounding)
        for _, _, row in baselines.values():
            for k, v in row.items():
                assert abs(first[k] - v) < tol, (k, first[k], v)
        conf = {
            "preset": preset_name,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "cells": perturbed,
            "median_genes": median,
            "vocab_size": V1_GENES + 4,
            "kind": "delete",
            "mode": "all",
            "states": 2,
            "forward_batch_size": batch,
            "precision": precision,
            "max_tokens": budget_of(model, device, precision),
            **({"untimed_runs_before": 1} if warm else {}),
            **({"cpu_bf16": cpu_bf16()} if device == "cpu" else {}),
        }
        from rankformer.model import deletions

        prefix_sums = deletions.prefix_sums_on(torch.device(device), PRECISIONS[precision])
        flops = arithmetic(bert, data, states, batch, conf["max_tokens"], prefix_sums)  # (at its budget)
        runs = {"rankformer": (ours_s, m["mb"])}
        if precision == "float32":  # the baselines run as the reference does, in float32
            runs |= {k: (sec, mb) for k, (sec, mb, _) in baselines.items()}
        for method, (sec, mb) in runs.items():
            record("perturb", "perturbed_cells_per_s", perturbed / sec, "cells/s", {**conf, "method": method})
            record("perturb", "peak_memory_mb", mb, "MB", {**conf, "method": method})
            rate = flops[method] / sec / 1e9
            record("perturb", "gflops_per_s", rate, "GFLOP/s", {**conf, "method": method})
        rate = matmul_rate(bert, PRECISIONS[precision], device)
        record("perturb", "gflops_per_s", rate, "GFLOP/s", {**conf, "method": "plain-matmul"})
        if precision == "float32":  # the same counts at every precision
            fixed = {k: v for k, v in conf.items() if k not in ("precision", "max_tokens")}
            ratio = flops["reference"] / flops["rankformer"]
            record("perturb", "arithmetic_ratio_vs_reference_method", ratio, "x", fixed)
        ref_s, plain_s = baselines["reference"][0], baselines["plain-encoder-loop"][0]
        record("perturb", "ratio_vs_reference_method", ref_s / ours_s, "x", conf)
        record("perturb", "ratio_vs_plain_encoder_loop", plain_s / ours_s, "x", conf)
        if device == "cpu":  # the most PyTorch's kernels allow here (see kernel_floor)
            dtype = PRECISIONS[precision]
            floor = kernel_floor(bert, data, states, conf["max_tokens"], dtype, prefix_sums)
            record("perturb", "kernel_floor_ratio_vs_reference_method", ref_s / floor, "x", conf)
            record("perturb", "time_over_kernel_floor", ours_s / floor, "x", conf)
        if device == "cuda" and conf["max_tokens"] != FIXED_GPU_BUDGET:  # against the earlier default
            m = timed_ours(work / f"fixed_{preset_name}_{precision}", precision, FIXED_GPU_BUDGET)
            ratio = m["s"] / ours_s
            record("perturb", "ratio_vs_fixed_budget", ratio, "x", {**conf, "fixed_budget": FIXED_GPU_BUDGET})
        if device == "cuda":  # against the deletions' first layer the other way
            way, other = ("prefix-sums", "attention-pass")[:: 1 if prefix_sums else -1]
            deletions.FIRST_LAYER = other
            try:
                m = timed_ours(work / f"{other}_{preset_name}_{precision}", precision)
            finally:
                deletions.FIRST_LAYER = None
            ways = {"first_layer": way, "other": other}
            record("perturb", "ratio_vs_other_first_layer", m["s"] / ours_s, "x", {**conf, **ways})
        if device == "cuda":  # how much of the job's time the GPU computes (the rest: the host)
            busy = gpu_busy_fraction(ours, work / f"profiled_{preset_name}_{precision}", precision)
            record("perturb", "gpu_busy_fraction", busy, "fraction", {**conf, "method": "rankformer"})


def gpu_busy_fraction(run: Any, *args: Any) -> float:
    """The share of ``run(*args)``'s wall time in which the GPU ran kernels or copies (their durations
    summed; one stream), under the profiler (which slows the host a little: a lower bound). Near 1:
    the job is bound by the GPU; well below: by the host launching its work."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run(*args)
        torch.cuda.synchronize()
    wall = time.perf_counter() - t
    kernels = prof.key_averages()
    print(kernels.table(sort_by="self_device_time_total", row_limit=12))  # where the GPU's time went
    busy_us = sum(e.self_device_time_total for e in kernels)
    return busy_us / 1e6 / wall


def embed_bench(work: Path, n_cells: int) -> None:
    import ray

    from rankformer.embed.cells import EmbedConfig, run_embed

    data = cells(n_cells, 300, seed=1)
    corpus = write_corpus(str(work / "corpus_embed"), data, N_GENES, shards=8)
    model = model_dir(work, "tiny", corpus)
    rates = {}
    for n in (1, 2):
        ray.shutdown()
        ray.init(address="local", num_cpus=n, include_dashboard=False, log_to_driver=False)
        out = work / f"embed_{n}"
        t = time.perf_counter()
        run_embed(EmbedConfig(model=model, corpus=corpus, out=str(out), num_workers=n, in_process=False))
        rates[n] = n_cells / (time.perf_counter() - t)
    ray.shutdown()
    conf = {"preset": "tiny", "device": "cpu", "cells": n_cells, "median_genes": 300, "shards": 8}
    for n in (1, 2):
        record("embed", "cells_per_s", rates[n], "cells/s", {**conf, "workers": n})
    record(
        "embed",
        "scaling_efficiency_2_workers",
        rates[2] / (2 * rates[1]),
        "ratio",
        {**conf, "cores": os.cpu_count()},
    )


def _median_job(model: str, corpus: str, out: str, hold_all: bool) -> float:
    """One gene-level median embedding in this (fresh) process; its resident memory growth in MB.
    ``hold_all``: the plain way, every occurrence of a shard held in memory and sorted at once."""
    from rankformer.embed import genes as embed_genes
    from rankformer.embed.cells import EmbedConfig, run_embed

    if hold_all:
        embed_genes.SPILL_FLOATS, embed_genes.SPILL_RANGES = 1 << 62, 1
    with rss_growth() as grown:
        cfg = EmbedConfig(model=model, corpus=corpus, out=out, level="gene", gene_stat="median")
        run_embed(dataclasses.replace(cfg, in_process=True))
    return grown["mb"]


def median_bench(work: Path, n_cells: int, median_genes: int) -> None:
    """Peak memory of `embed --level gene --gene-stat median` over one shard with a
    `geneformer-v1`-sized model: occurrences spilled by token range (ours) against the plain way,
    each in a fresh process; the medians are checked equal."""
    import multiprocessing as mp

    import pyarrow.parquet as pq

    n_genes = 4 * N_GENES  # room for cells of up to 2,046 genes
    data = cells(n_cells, median_genes, seed=2, n_genes=n_genes)
    corpus = write_corpus(str(work / "corpus_median"), data, n_genes, shards=1)
    model = model_dir(work, "geneformer-v1", corpus)
    peaks = {}
    for method, hold_all in (("rankformer", False), ("hold-all-in-memory", True)):
        with mp.get_context("spawn").Pool(1) as pool:
            peaks[method] = pool.apply(_median_job, (model, corpus, str(work / method), hold_all))
    a, b = (pq.read_table(work / m / "genes.parquet") for m in peaks)
    assert a.equals(b), "the two ways gave different medians"
    tokens = int(sum(len(c) for c in data))
    conf = {"preset": "geneformer-v1", "device": "cpu", "cells": n_cells, "occurrences": tokens, "dim": 256}
    for method, mb in peaks.items():
        record("embed", "median_peak_memory_mb", mb, "MB", {**conf, "method": method})
    ratio = peaks["hold-all-in-memory"] / peaks["rankformer"]
    record("embed", "median_memory_ratio_vs_hold_all", ratio, "x", conf)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=64, help="cells per perturbation run (half are perturbed)")
    p.add_argument("--median-genes", type=int, default=200)
    p.add_argument("--forward-batch-size", type=int, default=100)
    p.add_argument("--gpu-cells", type=int, default=8, help="cells per GPU perturbation run")
    p.add_argument("--gpu-median-genes", type=int, default=500)
    p.add_argument("--median-cells", type=int, default=400, help="cells of the gene-median memory run")
    p.add_argument("--skip-embed", action="store_true", help="perturbation only (e.g. on the GPU machine)")
    p.add_argument("--gpu-only", action="store_true", help="only the GPU variants (the CPU ones ran here)")
    p.add_argument(
        "--presets", default="tiny,geneformer-v1", help="comma-separated presets of the CPU perturbation runs"
    )
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    work = WORK / "perturb"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for preset_name, n in (("tiny", args.cells), ("geneformer-v1", max(4, args.cells // 4))):
        if args.gpu_only:
            break
        if preset_name not in args.presets.split(","):
            continue
        perturb_bench(
            work, preset_name, n, args.median_genes, args.forward_batch_size, ("float32", "bfloat16")
        )
    if torch.cuda.is_available():  # the GPU variants: more and longer cells, the same comparison
        for preset_name in ("tiny", "geneformer-v1"):
            perturb_bench(
                work / "gpu",
                preset_name,
                args.gpu_cells,
                args.gpu_median_genes,
                args.forward_batch_size,
                ("float32", "bfloat16", "float16"),
                device="cuda",
            )
    else:
        print("GPU variants skipped: no CUDA device")
    if not args.skip_embed:
        embed_bench(work, 2000)
        median_bench(work, args.median_cells, 1000)


if __name__ == "__main__":
    main()
