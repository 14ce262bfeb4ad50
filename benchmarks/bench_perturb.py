"""In silico perturbation and embeddings on CPU.

* Perturbed cells/s, every gene of each cell deleted, with two cell states, for `tiny` and
  `geneformer-v1` (random weights: speed does not depend on them), next to the reference's method
  written our own way in the same run: each cell's original forward once, then its variants in
  minibatches of `forward_batch_size` through a plain per-batch loop, one cell at a time, the full
  model's hidden states, per-gene cosines matched gene by gene in Python. Both compute the same
  numbers (checked on the first cell). Ours also runs in bfloat16 (`--precision bfloat16`; this
  CPU has AVX-512 BF16), recorded with `precision` in the config and checked to 1e-2.
* With CUDA: the same comparison on the GPU (float32, bfloat16, float16), longer cells.
* Embedding cells/s on a pool of 1 and 2 Ray actors.

Records: `perturb` perturbed_cells_per_s, ratio_vs_reference_method; `embed` cells_per_s,
scaling_efficiency_2_workers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import HERE, WORK, record

sys.path.insert(0, str(HERE.parent / "tests"))
from pretrain_helpers import write_corpus

N_GENES = 2000


def cells(n: int, median: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.lognormal(np.log(median), 0.4, n).clip(20, 2046).astype(int)
    return [np.asarray([2, *(rng.choice(N_GENES, k, replace=False) + 4), 3], dtype=np.int32) for k in lengths]


def model_dir(work: Path, preset_name: str, corpus: str) -> str:
    import json

    from transformers import BertForMaskedLM

    from rankformer.model.presets import bert_config, preset
    from rankformer.model.store import save_model_dir
    from rankformer.vocab import GeneVocab

    vocab = GeneVocab.load(json.loads(Path(corpus, "manifest.json").read_text())["config"]["vocab"])
    over = {"max_position_embeddings": 4096} if preset_name != "tiny" else {}
    torch.manual_seed(0)
    model = BertForMaskedLM(bert_config(preset(preset_name, over), vocab))
    out = str(work / f"model_{preset_name}")
    save_model_dir(model, vocab, {"task": "masked-lm", "layout": "v2", "max_length": 2048}, out)
    return out


@torch.no_grad()
def reference_method(
    model_path: str, data: list[np.ndarray], states: list[str], batch: int, device: str = "cpu"
) -> dict[str, float]:
    """The reference's way, in our words: full forward passes, per-batch, per-cell, per-gene loops."""
    from transformers import BertModel

    model = BertModel.from_pretrained(model_path).eval().to(device)
    cos = torch.nn.functional.cosine_similarity

    def pooled(h: torch.Tensor) -> torch.Tensor:
        return h[1:-1].mean(0)

    def forward(batch_ids: list[np.ndarray]) -> torch.Tensor:
        ids = torch.as_tensor(np.stack(batch_ids).astype(np.int64)).to(device)
        return model(input_ids=ids, output_hidden_states=True).hidden_states[-2]

    state_vec = {}
    for s in sorted(set(states)):
        vecs = [pooled(forward([c])[0]) for c, st in zip(data, states, strict=True) if st == s]
        state_vec[s] = torch.stack(vecs).mean(0)
    first = None
    for c, st in zip(data, states, strict=True):
        if st != "A":
            continue
        h0 = forward([c])[0]
        v0 = pooled(h0)
        genes = c[1:-1].tolist()
        variants = [np.asarray([t for t in c if t != g]) for g in genes]
        for i in range(0, len(variants), batch):
            h1 = forward(variants[i : i + batch])
            for j, g in enumerate(genes[i : i + batch]):
                v1 = pooled(h1[j])
                gene_cos = []
                pos1 = {t: p for p, t in enumerate(variants[i + j].tolist())}
                for p0, t in enumerate(c.tolist()[1:-1], start=1):
                    if t != g:
                        gene_cos.append(float(cos(h0[p0], h1[j, pos1[t]], dim=0)))
                row = {"cell_cosine": float(cos(v0, v1, dim=0)), "gene_mean_cosine": float(np.mean(gene_cos))}
                for s, sv in state_vec.items():
                    row[f"shift_{s}"] = float(cos(v1, sv, dim=0) - cos(v0, sv, dim=0))
                if first is None:
                    first = row
    return first or {}


def perturb_bench(
    work: Path,
    preset_name: str,
    n_cells: int,
    median: int,
    batch: int,
    precisions: tuple[str, ...],
    device: str = "cpu",
) -> None:
    """The reference method (float32, as the reference runs) once, then ours at each precision."""
    from rankformer.perturb import PerturbConfig, read_results, run_perturb

    data = cells(n_cells, median)
    states = ["A" if i % 2 == 0 else "B" for i in range(n_cells)]
    corpus = write_corpus(
        str(work / f"corpus_{preset_name}"), data, N_GENES, shards=1, carry={"state": states}
    )
    model = model_dir(work, preset_name, corpus)
    torch.set_num_threads(os.cpu_count() or 1)
    t = time.perf_counter()
    ref_first = reference_method(model, data, states, batch, device)
    ref_s = time.perf_counter() - t
    perturbed = n_cells // 2
    for precision in precisions:
        out = work / f"perturb_{preset_name}_{precision}"
        t = time.perf_counter()
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
            )
        )
        ours_s = time.perf_counter() - t
        first = read_results(str(out)).to_pandas().iloc[0]
        tol = 1e-4 if precision == "float32" else 1e-2  # the same numbers (else: to the rounding)
        for k, v in ref_first.items():
            assert abs(first[k] - v) < tol, (k, first[k], v)
        conf = {
            "preset": preset_name,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "cells": perturbed,
            "median_genes": median,
            "kind": "delete",
            "mode": "all",
            "states": 2,
            "forward_batch_size": batch,
            "precision": precision,
        }
        record(
            "perturb",
            "perturbed_cells_per_s",
            perturbed / ours_s,
            "cells/s",
            {**conf, "method": "rankformer"},
        )
        if precision == "float32":
            record(
                "perturb",
                "perturbed_cells_per_s",
                perturbed / ref_s,
                "cells/s",
                {**conf, "method": "reference"},
            )
        record("perturb", "ratio_vs_reference_method", ref_s / ours_s, "x", conf)


def embed_bench(work: Path, n_cells: int) -> None:
    import ray

    from rankformer.embed import EmbedConfig, run_embed

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cells", type=int, default=16, help="cells per perturbation run (half are perturbed)")
    p.add_argument("--median-genes", type=int, default=200)
    p.add_argument("--forward-batch-size", type=int, default=100)
    p.add_argument("--gpu-cells", type=int, default=8, help="cells per GPU perturbation run")
    p.add_argument("--gpu-median-genes", type=int, default=500)
    p.add_argument("--skip-embed", action="store_true", help="perturbation only (e.g. on the GPU machine)")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    work = WORK / "perturb"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for preset_name, n in (("tiny", args.cells), ("geneformer-v1", max(4, args.cells // 4))):
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


if __name__ == "__main__":
    main()
