"""Bad input to the model stages, the way the corpus stage has it: each case ends with exit code 2
and a message naming the file or field and the fix; no traceback, nothing written."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from transformers import BertForMaskedLM

from pretrain_helpers import write_corpus
from rankformer.cli import main
from rankformer.io.synth import gene_ids, programme_cells
from rankformer.model.presets import bert_config, preset
from rankformer.model.store import save_model_dir
from rankformer.vocab.gene_vocab import GeneVocab

N_GENES = 80


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_models")
    cells, types, progs = programme_cells(40, 2, 30, 20, 30, seed=2)
    corpus = write_corpus(str(d / "corpus"), cells, N_GENES, carry={"cell_type": [f"t{t}" for t in types]})
    vocab = GeneVocab.load(json.loads((d / "corpus" / "manifest.json").read_text())["config"]["vocab"])
    torch.manual_seed(0)
    model = BertForMaskedLM(bert_config(preset("tiny"), vocab))
    meta = {"task": "masked-lm", "layout": "v2", "max_length": 64}
    save_model_dir(model, vocab, meta, str(d / "model"))
    ids = gene_ids(N_GENES)
    for t in (0, 1):
        (d / f"t{t}.txt").write_text("\n".join(ids[progs[t] - 4]))
    damaged = {}
    for name, spoil in {
        "config_not_json": lambda m: (m / "config.json").write_text("{not json"),
        "no_weights": lambda m: (m / "model.safetensors").unlink(),
        "truncated_weights": lambda m: (m / "model.safetensors").write_bytes(b"\x08\x00\x00\x00"),
        "meta_not_json": lambda m: (m / "rankformer.json").write_text("]["),
    }.items():
        shutil.copytree(d / "model", d / name)
        spoil(d / name)
        damaged[name] = str(d / name)
    (d / "garbage.csv").write_bytes(bytes(range(256)) * 4)
    (d / "broken.parquet").write_bytes(b"PAR1 not really")
    (d / "one_class.csv").write_text("gene,label\n" + "".join(f"{g},x\n" for g in ids[:10]))
    (d / "not_a_pickle.pkl").write_bytes(b"plain text")
    (d / "bad.yaml").write_text("corpus: [unclosed\n")
    shutil.copytree(d / "corpus", d / "cut_corpus")
    (d / "cut_corpus" / "manifest.json").write_text('{"shards": [')
    (d / "foreign").mkdir()
    (d / "foreign" / "notes.txt").write_text("mine")
    return SimpleNamespace(d=d, corpus=corpus, model=str(d / "model"), damaged=damaged)


def _labels(w) -> list[str]:
    return ["--labels", f"x={w.d / 't0.txt'}", "--labels", f"y={w.d / 't1.txt'}"]


def _track(w) -> list[str]:
    return ["--tracking-uri", f"sqlite:///{w.d}/mlflow.db"]


def _pre(w, *a: str) -> list[str]:
    return ["pretrain", "--corpus", w.corpus, "--out", str(w.d / "out"), "--max-steps", "4", *_track(w), *a]


def _genes(w, *a: str, model: str | None = None) -> list[str]:
    base = ["finetune", "genes", "--corpus", w.corpus, "--model", model or w.model, "--out", str(w.d / "out")]
    return [*base, "--max-steps", "2", *_track(w), *a]


def _cells(w, *a: str, model: str | None = None) -> list[str]:
    base = ["finetune", "cells", "--corpus", w.corpus, "--model", model or w.model, "--out", str(w.d / "out")]
    return [*base, "--max-steps", "2", *_track(w), *a]


def _job(cmd: str, w, *a: str, model: str | None = None) -> list[str]:
    return [*cmd.split(), "--corpus", w.corpus, "--model", model or w.model, "--out", str(w.d / "out"), *a]


Case = Callable[[SimpleNamespace], list[str]]
CASES: dict[str, tuple[Case, str]] = {
    # pretrain
    "pretrain: corpus missing": (
        lambda w: [*_pre(w), "--corpus", str(w.d / "nope")],
        r"nope holds no finished corpus",
    ),
    "pretrain: config file is not YAML": (
        lambda w: ["pretrain", "--config", str(w.d / "bad.yaml")],
        r"--config .*bad.yaml is not YAML",
    ),
    "embed: corpus manifest cut short": (
        lambda w: _job("embed", w, "--corpus", str(w.d / "cut_corpus")),
        r"cut_corpus/manifest.json is not JSON .* rerun `rankformer tokenize`",
    ),
    "pretrain: unknown preset": (lambda w: _pre(w, "--preset", "huge"), r"preset 'huge'"),
    "pretrain: zero steps": (lambda w: _pre(w, "--max-steps", "0"), r"max_steps.* must be >= 1"),
    "pretrain: warmup longer than the run": (
        lambda w: _pre(w, "--warmup-steps", "10000"),
        r"warmup_steps 10,000 would spend 100% of the run's 4 steps",
    ),
    "pretrain: a foreign output folder": (
        lambda w: [*_pre(w), "--out", str(w.d / "foreign")],
        r"foreign is not empty and holds no rankformer model",
    ),
    "pretrain: init from a model whose config.json is not JSON": (
        lambda w: _pre(w, "--init-from", w.damaged["config_not_json"]),
        r"config_not_json/config.json is not JSON",
    ),
    "pretrain: in process with more workers": (
        lambda w: _pre(w, "--in-process", "--num-workers", "2"),
        r"--in-process trains one worker in this process, not --num-workers 2",
    ),
    # finetune genes
    "finetune genes: labels file is not a table": (
        lambda w: _genes(w, "--labels", str(w.d / "garbage.csv")),
        r"garbage.csv is not a readable CSV table",
    ),
    "finetune genes: labels Parquet is damaged": (
        lambda w: _genes(w, "--labels", str(w.d / "broken.parquet")),
        r"broken.parquet is not a readable Parquet table",
    ),
    "finetune genes: labels file missing": (
        lambda w: _genes(w, "--labels", str(w.d / "absent.csv")),
        r"label file .*absent.csv not found",
    ),
    "finetune genes: one class": (lambda w: _genes(w, "--labels", str(w.d / "one_class.csv")), r"two"),
    "finetune genes: model without weights": (
        lambda w: _genes(w, *_labels(w), model=w.damaged["no_weights"]),
        r"no_weights has no weights",
    ),
    "finetune genes: model missing": (
        lambda w: _genes(w, *_labels(w), model=str(w.d / "no_model")),
        r"no_model not found",
    ),
    "finetune genes: one fold": (lambda w: _genes(w, *_labels(w), "--folds", "1"), r"folds 1 must be >= 2"),
    # finetune cells
    "finetune cells: label column absent": (
        lambda w: _cells(w, "--label-column", "celltype"),
        r"celltype",
    ),
    "finetune cells: test fraction over 1": (
        lambda w: _cells(w, "--label-column", "cell_type", "--test-fraction", "1.5"),
        r"test_fraction must be within",
    ),
    "finetune cells: weights truncated": (
        lambda w: _cells(
            w, "--label-column", "cell_type", "--in-process", model=w.damaged["truncated_weights"]
        ),
        r"truncated_weights: its weights could not be loaded",
    ),
    # predict
    "predict cells: a pretrained model, not a classifier": (
        lambda w: _job("predict cells", w),
        r"masked-lm",
    ),
    "predict genes: model missing": (
        lambda w: _job("predict genes", w, model=str(w.d / "no_model")),
        r"no_model not found",
    ),
    # embed
    "embed: layer deeper than the model": (lambda w: _job("embed", w, "--layer", "99"), r"layer 99"),
    "embed: unknown level": (
        lambda w: _job("embed", w, "--level", "cells"),
        r"--level: Expected a typing.Literal\['cell', 'gene'\]. Got value: cells",  # the parser's
    ),
    "embed: rankformer.json is not JSON": (
        lambda w: _job("embed", w, model=w.damaged["meta_not_json"]),
        r"meta_not_json/rankformer.json is not JSON",
    ),
    # perturb
    "perturb: unknown kind": (
        lambda w: _job("perturb", w, "--kind", "remove", "--mode", "all"),
        r"--kind: Expected a typing.Literal\[.*'delete'.*\]. Got value: remove",
    ),
    "perturb: goal state without a state column": (
        lambda w: _job("perturb", w, "--mode", "all", "--goal-state", "t1"),
        r"need --state-column",
    ),
    "perturb: state column absent": (
        lambda w: _job("perturb", w, "--mode", "all", "--state-column", "disease", "--goal-state", "x"),
        r"disease",
    ),
    # perturb stats
    "perturb stats: not a perturbation output": (
        lambda w: ["perturb", "stats", str(w.d / "foreign")],
        r"foreign",
    ),
    # model import-geneformer
    "model import-geneformer: no config.json": (
        lambda w: [
            "model",
            "import-geneformer",
            str(w.d / "foreign"),
            "--token-dictionary",
            str(w.d / "not_a_pickle.pkl"),
            "--gene-median-dictionary",
            str(w.d / "not_a_pickle.pkl"),
            "--out",
            str(w.d / "out"),
        ],
        r"not_a_pickle.pkl|config.json",
    ),
    # serve
    "serve: fewer max than min replicas": (
        lambda w: ["serve", "--model", w.model, "--min-replicas", "3", "--max-replicas", "2"],
        r"--min-replicas 3 must be <= --max-replicas 2",
    ),
    "serve: model whose config.json is not JSON": (
        lambda w: ["serve", "--model", w.damaged["config_not_json"]],
        r"config_not_json/config.json is not JSON",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_model_stage_bad_input(case: str, w, capsys) -> None:
    argv, expected = CASES[case][0](w), CASES[case][1]
    out = w.d / "out"
    assert main(argv) == 2, capsys.readouterr()
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("rankformer: error: ") and "Traceback" not in err, err
    import re

    assert re.search(expected, last), err
    assert not out.exists() or not os.listdir(out), f"something was written: {os.listdir(out)}"
    shutil.rmtree(out, ignore_errors=True)


def test_enough_cases():
    commands = {c.split(":")[0] for c in CASES}
    assert len(CASES) >= 30 and len(commands) == 10, commands
