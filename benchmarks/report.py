"""Render the latest benchmark records: every figure into the docs' performance page, the
headline figures into README.md (each between its markers), so the figures shown are the figures
measured."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import RESULTS

START, END = "<!-- perf:start -->", "<!-- perf:end -->"
HEAD_START, HEAD_END = "<!-- perf-headline:start -->", "<!-- perf-headline:end -->"
ROOT = Path(__file__).resolve().parents[1]
ABSENT = object()  # a headline's config key that the record must not have
# (what the README says, benchmark, metric, config the record must match): the latest match is shown
HEADLINES: list[tuple[str, str, str, dict]] = [
    ("exact medians: largest error against numpy", "medians", "max_abs_error_vs_numpy", {}),
    ("vocabulary build, 1M cells (14.4 GB h5ad)", "scale", "cells_per_s", {"stage": "vocab build"}),
    ("tokenize, 1M cells, 2 workers", "scale", "cells_per_s", {"stage": "tokenize", "workers": 2}),
    ("tokenize against a plain per-cell tokenizer", "tokenize", "ratio_vs_baseline", {}),
    ("pretrain held-out masked-gene accuracy (tiny)", "pretrain", "heldout_mlm_accuracy", {}),
    (
        "pretrain geneformer-v2-104m, bf16",
        "pretrain",
        "tokens_per_s_per_worker",
        {"preset": "geneformer-v2-104m", "attention": ABSENT, "batches": (ABSENT, "length-grouped")},
    ),
    (
        "pretrain geneformer-v2-104m, bf16: MFU",
        "pretrain",
        "mfu",
        {"preset": "geneformer-v2-104m", "attention": ABSENT, "batches": (ABSENT, "length-grouped")},
    ),
    (
        "... packed, the preset's attention dropout: MFU",
        "pretrain",
        "mfu",
        {"preset": "geneformer-v2-104m", "batches": "packed", "attention": "dropout"},
    ),
    (
        "... packed, no attention dropout: MFU",
        "pretrain",
        "mfu",
        {"preset": "geneformer-v2-104m", "batches": "packed", "attention": "no-dropout", "budget": ABSENT},
    ),
    (
        "pretrain packed against length-grouped (geneformer-v1, CPU)",
        "pretrain",
        "ratio_packed_vs_length_grouped",
        {"preset": "geneformer-v1", "device": "cpu"},
    ),
    (
        "fine-tune cells packed against length-grouped (geneformer-v1, CPU)",
        "finetune",
        "ratio_packed_vs_length_grouped",
        {"preset": "geneformer-v1", "head": "sequence"},
    ),
    ("gene classification CV ROC AUC (PBMC, tiny)", "finetune", "gene_cv_roc_auc", {}),
    (
        "LoRA fine-tuning: trainable parameters against full (geneformer-v1)",
        "peft",
        "trainable_parameters_ratio_lora_vs_full",
        {"preset": "geneformer-v1"},
    ),
    (
        "... tokens/s against full (geneformer-v1)",
        "peft",
        "tokens_per_s_ratio_lora_vs_full",
        {"preset": "geneformer-v1"},
    ),
    ("embed, 2 workers (tiny)", "embed", "cells_per_s", {"workers": 2}),
    (
        "perturb every gene against the reference's method (tiny)",
        "perturb",
        "ratio_vs_reference_method",
        {"preset": "tiny", "device": "cpu", "precision": "float32"},
    ),
    (
        "... (geneformer-v1, bfloat16)",
        "perturb",
        "ratio_vs_reference_method",
        {"preset": "geneformer-v1", "device": "cpu", "precision": "bfloat16"},
    ),
    ("perturb stats against a plain in-memory groupby", "perturb_stats", "ratio_vs_plain", {}),
    ("serve /v1/embed, 16 clients, 1 replica", "serve", "requests_per_s", {}),
    ("... p99 latency", "serve", "p99_ms", {}),
]
HIDDEN = {"seconds", "n_genes", "genes_per_cell_drawn"}


IDENTITY = (
    "stage",
    "workers",
    "n_cells",
    "method",
    "preset",
    "head",
    "precision",
    "device",
    "attention",
    "cpu_bf16",
    "batches",
    "budget",
    "compile",
)
# what a record written before the key existed measured (every CPU record before `cpu_bf16`: AVX-512 BF16)
DEFAULTS = {"precision": "float32", "device": "cpu", "cpu_bf16": "avx512"}


def _key(rec: dict) -> str:
    """What a figure is a figure of: a newer record with the same identity replaces an older one."""
    cfg = rec["config"]
    return json.dumps([rec["metric"], *(cfg.get(k, DEFAULTS.get(k)) for k in IDENTITY)])


def latest(path: Path) -> list[dict]:
    """The last record of every (metric, config) in the file, in first-seen order."""
    last: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            last.pop(_key(rec), None)
            last[_key(rec)] = rec
    return list(last.values())


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def table() -> str:
    rows = [
        "| benchmark | metric | value | unit | configuration | machine, commit, date |",
        "|---|---|---|---|---|---|",
    ]
    for path in sorted(RESULTS.glob("*.jsonl")):
        for r in latest(path):
            cfg = ", ".join(f"{k}={v}" for k, v in r["config"].items() if k not in HIDDEN)
            rows.append(
                f"| {r['benchmark']} | {r['metric']} | {_fmt(r['value'])} | {r['unit']} | "
                f"{cfg} | {r['machine']}, {r['git']}, {r['date']} |"
            )
    return "\n".join(rows)


def _matches(rec: dict, benchmark: str, metric: str, want: dict) -> bool:
    if rec["benchmark"] != benchmark or rec["metric"] != metric:
        return False
    cfg = rec["config"]
    return all(_one_of(cfg, k, v if isinstance(v, tuple) else (v,)) for k, v in want.items())


def _one_of(cfg: dict, key: str, allowed: tuple) -> bool:
    """Whether ``cfg[key]`` is one of ``allowed`` (ABSENT among them: or the key is not there)."""
    return any((key not in cfg) if v is ABSENT else cfg.get(key) == v for v in allowed)


def headlines() -> str:
    """The headline figures: for each, the latest record that matches it."""
    records = [r for path in sorted(RESULTS.glob("*.jsonl")) for r in latest(path)]
    rows = ["| figure | value | unit | machine, commit, date |", "|---|---|---|---|"]
    for label, benchmark, metric, want in HEADLINES:
        found = [r for r in records if _matches(r, benchmark, metric, want)]
        if found:
            r = found[-1]
            rows.append(
                f"| {label} | {_fmt(r['value'])} | {r['unit']} | {r['machine']}, {r['git']}, {r['date']} |"
            )
    return "\n".join(rows)


def _replace(path: Path, start: str, end: str, body: str) -> None:
    text = path.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{path} has no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{start}\n{body}\n{end}{tail}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--readme", default=str(ROOT / "README.md"))
    p.add_argument("--docs", default=str(ROOT / "docs" / "performance.md"))
    args = p.parse_args()
    _replace(Path(args.docs), START, END, table())
    _replace(Path(args.readme), HEAD_START, HEAD_END, headlines())
    print(f"performance tables in {args.docs} and {args.readme} updated from {RESULTS}")


if __name__ == "__main__":
    main()
