"""Every option a command offers takes effect: each command's job runs (in this process, on tiny
inputs) with its config's reads recorded, and every flag the command offers must have been read
by the job. Validation (``__post_init__``, ``check``) and whole-config copies (``asdict``, logged
as MLflow params) do not count as use."""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import BertForMaskedLM

from pretrain_helpers import write_corpus
from rankformer.cli import _parser, parse
from rankformer.config.flags import leaves
from rankformer.io.synth import gene_ids, programme_cells
from rankformer.model.presets import bert_config, preset
from rankformer.model.store import save_model_dir
from rankformer.vocab.gene_vocab import GeneVocab

VALIDATION = {"__post_init__", "check", "_check_numbers", "_check_common", "check_warmup"}
N_GENES = 80


def _config_classes() -> list[type]:
    from rankformer.config import corpus as config
    from rankformer.config import infer as infer_config
    from rankformer.config import train as train_config
    from rankformer.serve import app as serving

    out = []
    for module in (config, train_config, infer_config, serving):
        out += [c for c in vars(module).values() if isinstance(c, type) and dataclasses.is_dataclass(c)]
    return out


@contextmanager
def recorded() -> Iterator[set[tuple[str, str]]]:
    """(config class, field) of every read of a config field by code other than validation and
    whole-config copies, while the block runs."""
    reads: set[tuple[str, str]] = set()
    saved = {}
    for cls in _config_classes():
        names = {f.name for f in dataclasses.fields(cls)}

        def getattribute(self: Any, name: str, _names: set[str] = names) -> Any:
            if name in _names:
                frame = sys._getframe(1)
                code = frame.f_code
                if (
                    not code.co_filename.endswith(("dataclasses.py", "copy.py"))
                    and code.co_name not in VALIDATION
                ):
                    reads.add((type(self).__name__, name))
            return object.__getattribute__(self, name)

        saved[cls] = cls.__dict__.get("__getattribute__")
        cls.__getattribute__ = getattribute  # type: ignore[method-assign]
    try:
        yield reads
    finally:
        for cls, old in saved.items():
            if old is None:
                del cls.__getattribute__
            else:
                cls.__getattribute__ = old  # type: ignore[method-assign]


def offered(argv_prefix: list[str]) -> set[str]:
    """The config-field flags a command offers (their dotted field paths)."""
    p = _parser()
    for word in argv_prefix:
        p = next(a for a in p._actions if a.dest.endswith("command")).choices[word]
    module, cls_name = CONFIGS[" ".join(argv_prefix)].split(":")
    import importlib

    fields = {leaf.dotted for leaf in leaves(getattr(importlib.import_module(module), cls_name))}
    return {a.dest for a in p._actions if a.dest in fields}


def owners(cfg: Any) -> dict[str, tuple[str, str]]:
    """Leaf path -> (class of the object holding it, field), from a built config."""
    out = {}
    for leaf in leaves(type(cfg)):
        holder = cfg
        for part in leaf.path[:-1]:
            holder = object.__getattribute__(holder, part)
        out[leaf.dotted] = (type(holder).__name__, leaf.path[-1])
    return out


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    d = tmp_path_factory.mktemp("options")
    cells, types, progs = programme_cells(60, 2, 30, 20, 30, seed=2)
    carry = {"cell_type": [f"t{t}" for t in types], "donor": [f"d{i % 4}" for i in range(60)]}
    corpus = write_corpus(str(d / "corpus"), cells, N_GENES, carry=carry)
    vocab = GeneVocab.load(json.loads((d / "corpus" / "manifest.json").read_text())["config"]["vocab"])
    torch.manual_seed(0)
    save_model_dir(
        BertForMaskedLM(bert_config(preset("tiny"), vocab)),
        vocab,
        {"task": "masked-lm", "layout": "v2", "max_length": 64},
        str(d / "model"),
    )
    ids = gene_ids(N_GENES)
    for t in (0, 1):
        (d / f"t{t}.txt").write_text("\n".join(ids[progs[t] - 4]))
    from rankformer.io.synth import SynthSpec, write_h5ad

    h5ad = str(d / "cells.h5ad")
    write_h5ad(h5ad, SynthSpec(n_cells=60, n_genes=40, genes_per_cell=15, seed=3), chunk_rows=30)
    return SimpleNamespace(d=d, corpus=corpus, model=str(d / "model"), vocab=vocab, h5ad=h5ad)


CONFIGS = {
    "pretrain": "rankformer.config.train:PretrainConfig",
    "finetune genes": "rankformer.config.train:FinetuneGenesConfig",
    "finetune cells": "rankformer.config.train:FinetuneCellsConfig",
    "predict genes": "rankformer.config.infer:PredictConfig",
    "embed": "rankformer.config.infer:EmbedConfig",
    "perturb": "rankformer.config.infer:PerturbConfig",
    "tokenize": "rankformer.config.corpus:TokenizeConfig",
    "vocab build": "rankformer.config.corpus:VocabBuildConfig",
}


def _argvs(w: SimpleNamespace, tmp: Any) -> list[tuple[str, list[str]]]:
    """Runs, in this process, that between them take every branch that reads an option: one
    with options at their defaults where a given option would short-circuit another (``--max-steps``
    replaces ``--epochs``, ``--in-process`` replaces the worker count)."""
    track = ["--tracking-uri", f"sqlite:///{tmp}/mlflow.db", "--experiment", "opts", "--run-name", "r"]
    labels = ["--labels", f"x={w.d / 't0.txt'}", "--labels", f"y={w.d / 't1.txt'}"]
    base = ["--corpus", w.corpus, "--model", w.model]
    ckpt = ["--storage-path", f"{tmp}/ckpt"]
    genes = ["finetune", "genes", *base, *labels, "--folds", "2", *ckpt, *track]
    lora = ["--peft", "lora", "--lora-rank", "2", "--lora-alpha", "4", "--lora-dropout", "0.0"]
    lora += ["--lora-targets", "query"]
    cells = [
        "finetune",
        "cells",
        *base,
        "--label-column",
        "cell_type",
        "--group-column",
        "donor",
        *ckpt,
        *track,
    ]
    return [
        (
            "pretrain",
            [
                "pretrain",
                "--corpus",
                w.corpus,
                "--out",
                f"{tmp}/pre",
                "--max-steps",
                "2",
                *ckpt,
                "--vocab",
                str(w.d / "corpus_vocab.json"),
                "--registered-model",
                "opt-pre",
                *track,
            ],
        ),
        (
            "pretrain",
            [
                "pretrain",
                "--corpus",
                w.corpus,
                "--out",
                f"{tmp}/pre2",
                "--max-steps",
                "2",
                *ckpt,
                "--in-process",
                "--warmup-steps",
                "1",
                *track,
            ],
        ),
        (
            "finetune genes",
            [
                *genes,
                "--out",
                f"{tmp}/g1",
                "--max-steps",
                "2",
                "--registered-model",
                "opt-genes",
                "--positive-class",
                "y",
                "--cells-where",
                "cell_type=t0,t1",
                "--limit-cells",
                "50",
                "--in-process",
                "--warmup-steps",
                "1",
            ],
        ),
        ("finetune genes", [*genes, "--out", f"{tmp}/g2", "--epochs", "0.05", "--shuffled-controls", "0"]),
        (
            "finetune genes",
            [
                *genes,
                "--out",
                f"{tmp}/g3",
                "--max-steps",
                "2",
                "--shuffled-controls",
                "0",
                *lora,
                "--packed",
            ],
        ),
        (
            "finetune cells",
            [
                *cells,
                "--out",
                f"{tmp}/c1",
                "--max-steps",
                "2",
                "--classes",
                "t0",
                "t1",
                "--rename",
                "t9=t0",
                "--shuffled-controls",
                "1",
                "--registered-model",
                "opt-cells",
                "--in-process",
                "--warmup-steps",
                "1",
            ],
        ),
        ("finetune cells", [*cells, "--out", f"{tmp}/c2", "--epochs", "0.05"]),
        (  # adapters, and several label columns at once
            "finetune cells",
            [
                *cells,
                "--out",
                f"{tmp}/c3",
                "--max-steps",
                "2",
                "--tasks",
                "cell_type",
                "donor",
                "--task-weights",
                "1",
                "2",
                *lora,
                "--merge",
                "--packed",
            ],
        ),
        (
            "predict genes",
            [
                "predict",
                "genes",
                "--corpus",
                w.corpus,
                "--model",
                f"{tmp}/g1/model",
                "--out",
                f"{tmp}/pg",
                "--cells-where",
                "cell_type=t0",
                "--limit-cells",
                "10",
                "--max-tokens",
                "4096",
                "--tracking-uri",
                f"sqlite:///{tmp}/mlflow.db",
            ],
        ),
        (
            "embed",
            [
                "embed",
                *base,
                "--out",
                f"{tmp}/e",
                "--in-process",  # no private Ray: a later test's cluster fixture must start its own
                "--plot-column",
                "cell_type",
                "--experiment",
                "opts",
                "--tracking-uri",
                f"sqlite:///{tmp}/mlflow.db",
            ],
        ),
        ("embed", ["embed", *base, "--out", f"{tmp}/eg", "--level", "gene", "--in-process"]),
        (
            "vocab build",
            [
                "vocab",
                "build",
                w.h5ad,
                "--out",
                f"{tmp}/v.json",
                "--layout",
                "v2",
                "--min-cells",
                "2",
                "--rows-per-shard",
                "30",
                "--chunk-rows",
                "10",
                "--histogram-bins",
                "64",
                "--collect-limit",
                "64",
                "--in-process",
            ],
        ),
        (
            "tokenize",
            [
                "tokenize",
                w.h5ad,
                "--vocab",
                f"{tmp}/v.json",
                "--out",
                f"{tmp}/t",
                "--max-length",
                "32",
                "--carry",
                "cell_type",
                "--coverage-floor",
                "0.1",
                "--rows-per-shard",
                "30",
                "--chunk-rows",
                "10",
                "--in-process",
            ],
        ),
        (
            "perturb",
            [
                "perturb",
                *base,
                "--out",
                f"{tmp}/p",
                "--in-process",
                "--mode",
                "all",
                "--state-column",
                "cell_type",
                "--start-state",
                "t0",
                "--goal-state",
                "t1",
                "--limit-cells",
                "4",
            ],
        ),
    ]


# Options read only on the cluster path (Ray Train, Ray Tune): checked by calling the functions
# that path uses to place and configure the work, with the job's own config.
def _cluster_path(cfg: Any) -> None:
    from rankformer.classify.tune import search_plan, trials_demand
    from rankformer.train.ray_train import trainer_settings, workers_demand

    if hasattr(cfg, "cluster"):
        from rankformer.cluster import cluster_address, runs_in_process, task_pool

        runs_in_process(2, cfg.cluster)
        cluster_address(cfg.cluster)  # the cluster ensure_ray joins
        task_pool(cfg.cluster)
    if hasattr(cfg, "scale"):
        workers_demand(cfg.scale)
        trainer_settings(cfg.scale, "/tmp/unused", "run", ("loss", "min"))
    if hasattr(cfg, "tune"):
        search_plan(cfg.tune, 2, 100)
        trials_demand(cfg.tune, cfg.scale.use_gpu)


def _config(name: str, argv: list[str]) -> Any:
    import importlib

    from rankformer.config.flags import build, merged_values

    module, cls_name = CONFIGS[name].split(":")
    cls = getattr(importlib.import_module(module), cls_name)
    args = parse(argv)
    if name == "tokenize":
        from rankformer.cli import tokenize_config

        return tokenize_config(args)
    return build(cls, merged_values(args, cls))


@pytest.mark.slow
def test_every_offered_option_is_read_by_its_job(w, tmp_path):
    """Each command's runs (and, for training, its cluster path's placement and Ray Train / Tune
    settings) read every option the command offers; an option no job reads would be accepted and
    silently do nothing (`pretrain --in-process` did, before pretraining could run in process)."""
    from rankformer.cli import main

    seen: dict[str, set[tuple[str, str]]] = {}
    owner: dict[str, dict[str, tuple[str, str]]] = {}
    for name, argv in _argvs(w, tmp_path):
        cfg = _config(name, argv)
        owner[name] = owners(cfg)
        with recorded() as reads:
            assert main(argv) == 0, argv
            _cluster_path(cfg)
        seen.setdefault(name, set()).update(reads)
    unread = {
        name: sorted(f for f in offered(name.split()) if owner[name][f] not in seen[name]) for name in seen
    }
    assert unread == {name: [] for name in seen}
