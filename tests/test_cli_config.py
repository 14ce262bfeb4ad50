"""Flags and YAML generated from the config dataclasses; the sqlite registry round trip."""

from __future__ import annotations

import argparse

import pytest
import torch
import yaml
from transformers import BertForMaskedLM

from rankformer import tracking
from rankformer.cli import _parser, parse, pretrain_config
from rankformer.config.flags import add_config_arguments, build, command_parser
from rankformer.config.train import PretrainConfig
from rankformer.errors import InputError
from rankformer.io.synth import gene_ids
from rankformer.model.loader import inspect_model, load_model, model_meta
from rankformer.model.presets import bert_config, preset
from rankformer.model.store import save_model_dir
from rankformer.vocab.gene_vocab import build_vocab


def test_flags_override_the_yaml_and_nest(tmp_path):
    cfg_file = tmp_path / "p.yaml"
    cfg_file.write_text(
        yaml.safe_dump({"corpus": "c", "out": "m", "optim": {"lr": 0.01}, "scale": {"num_workers": 4}})
    )
    args = parse(
        [
            "pretrain",
            "--num-workers",
            "2",
            "--max-steps",
            "7",
            "--model",
            "num_hidden_layers=3",
            "--use-gpu",
            "--tracking-uri",
            "sqlite:///x.db",
            "--registered-model",
            "r",
            "--config",  # flags override the file wherever they stand
            str(cfg_file),
        ]
    )
    cfg = pretrain_config(args)
    assert cfg.optim.lr == 0.01 and cfg.scale.num_workers == 2 and cfg.max_steps == 7
    assert cfg.model == {"num_hidden_layers": 3} and cfg.scale.use_gpu is True
    assert cfg.track.tracking_uri == "sqlite:///x.db" and cfg.track.registered_model == "r"


def test_errors_name_the_field(tmp_path, capsys):
    p = command_parser()
    add_config_arguments(p, PretrainConfig)
    with pytest.raises(InputError, match=r"unknown option\(s\) \['optim.learning_rate'\]"):
        build(PretrainConfig, {"corpus": "c", "out": "m", "optim": {"learning_rate": 1}})
    with pytest.raises(InputError, match=r"option 'scale.num_workers' must be int, got 'two'"):
        build(PretrainConfig, {"corpus": "c", "out": "m", "scale": {"num_workers": "two"}})
    with pytest.raises(InputError, match=r"missing 'corpus': give it as --corpus"):
        build(PretrainConfig, {"out": "m"})
    with pytest.raises(argparse.ArgumentError, match="required: corpus"):  # the parser marks it
        p.parse_args(["--out", "m"])
    from rankformer.cli import main

    assert main(["pretrain", "--out", "m"]) == 2
    assert "rankformer: error: the following arguments are required: --corpus" in capsys.readouterr().err
    with pytest.raises(InputError, match=r"schedule 'step' must be linear or cosine"):
        build(PretrainConfig, {"corpus": "c", "out": "m", "optim": {"schedule": "step"}})


def test_help_comes_from_the_field_docs(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["pretrain", "--help"])
    out = capsys.readouterr().out
    assert "peak learning rate (Geneformer V1: 1e-3)" in out and "--max-tokens" in out
    import rankformer

    with pytest.raises(SystemExit):
        _parser().parse_args(["--version"])
    assert capsys.readouterr().out.strip() == f"rankformer {rankformer.__version__}"


def test_every_option_of_every_command_has_help():
    """Each option's help is its field's trailing comment: a field whose comment does not sit on its
    own line (a formatter wrapped it) would show only its default."""
    import argparse

    def walk(parser: argparse.ArgumentParser, path: str):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{path} {name}")
            elif action.option_strings and action.dest not in ("help", "version"):
                yield path, action

    bare = [
        f"{path} {a.option_strings[0]}"
        for path, a in walk(_parser(), "rankformer")
        if not (a.help or "").strip() or a.help.strip().startswith("(default")
    ]
    assert not bare, bare


@pytest.mark.mlflow
def test_registry_round_trip_on_sqlite(tmp_path):
    vocab = build_vocab(list(gene_ids(30)), [1.0] * 30)
    torch.manual_seed(0)
    model = BertForMaskedLM._from_config(bert_config(preset("tiny"), vocab)).eval()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run = tracking.start_run(uri, "t", "r")
    local = str(tmp_path / "model")
    save_model_dir(model, vocab, {"layout": "v2", "task": "masked-lm"}, local)
    tracking.log_artifacts(uri, run, local, "model")
    assert (
        tracking.register_model(uri, run, "model", "m", "current", {"vocab_hash": vocab.content_hash}) == "1"
    )
    with pytest.raises(InputError, match="reserved"):
        tracking.register_model(uri, run, "model", "m", "latest", {})
    loaded = load_model("models:/m@current", tracking_uri=uri)
    ids = torch.tensor([[2, 5, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(input_ids=ids).logits, model(input_ids=ids).logits)
    assert tracking.model_version_info(uri, "models:/m@current")["tags"]["vocab_hash"] == vocab.content_hash
    info = inspect_model("models:/m@current", tracking_uri=uri)  # metadata, vocabulary, config only
    assert info.vocab.content_hash == vocab.content_hash
    assert info.config.hidden_size == model.config.hidden_size
    assert model_meta("models:/m@current", uri)["layout"] == "v2"
    with pytest.raises(InputError, match="not in the registry"):
        load_model("models:/nope@current", tracking_uri=uri)
    with pytest.raises(InputError, match="uses vocabulary"):
        load_model(local, expect_vocab_hash="sha256:other")


def test_drivers_check_a_model_against_a_corpus_without_loading_torch(tmp_path):
    """`embed`, `perturb`, both fine-tuning jobs and `pretrain --init-from` read a model's
    metadata, vocabulary and config at the door without importing torch (an error comes in about
    a second, not after the ~8 s torch and transformers take); a config.json without the fields
    the checks need is named."""
    import json
    import subprocess
    import sys

    import numpy as np

    from pretrain_helpers import write_corpus

    vocab = build_vocab(list(gene_ids(30)), [1.0] * 30)
    model = BertForMaskedLM._from_config(bert_config(preset("tiny"), vocab))
    local = str(tmp_path / "model")
    save_model_dir(model, vocab, {"layout": "v2", "task": "masked-lm"}, local)
    corpus = write_corpus(str(tmp_path / "corpus"), [np.arange(2, 12, dtype=np.int32)] * 4, 7)
    where = ["--model", local, "--corpus", corpus, "--out", str(tmp_path / "o")]
    code = (
        "import sys\nfrom rankformer.cli import main\n"
        "for cmd in (['embed'], ['perturb', '--mode', 'all'], ['finetune', 'cells', '--label-column', 'x'],\n"
        "            ['finetune', 'genes', '--labels', 'a.txt']):\n"
        f"    assert main([*cmd, *{where!r}]) == 2\n"
        f"assert main(['pretrain', '--corpus', {corpus!r}, '--out', {str(tmp_path / 'p')!r}, "
        f"'--init-from', {local!r}]) == 2\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert got.returncode == 0, got.stderr[-2000:]
    assert got.stderr.count("uses vocabulary") == 5
    # with a model of the corpus's vocabulary: fine-tuning's labels and label columns, still no torch
    from rankformer.corpus.read import corpus_vocab

    same = corpus_vocab(corpus)
    matching = str(tmp_path / "matching")
    bert = BertForMaskedLM._from_config(bert_config(preset("tiny"), same))
    save_model_dir(bert, same, {"layout": "v2", "task": "masked-lm"}, matching)
    (tmp_path / "a.txt").write_text("NOT_A_GENE\n")
    (tmp_path / "b.txt").write_text(f"{same.gene_ids[0]}\n")
    labels = ["--labels", f"a={tmp_path / 'a.txt'}", "--labels", f"b={tmp_path / 'b.txt'}"]
    where = ["--model", matching, "--corpus", corpus, "--out", str(tmp_path / "o")]
    code = (
        "import sys\nfrom rankformer.cli import main\n"
        f"assert main(['finetune', 'genes', *{labels!r}, *{where!r}]) == 2\n"
        f"assert main(['finetune', 'cells', '--label-column', 'x', *{where!r}]) == 2\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert got.returncode == 0, got.stderr[-2000:]
    assert "too few labelled genes in the vocabulary: {'a': 0} (each class" in got.stderr
    assert "--label-column 'x': no such column in corpus" in got.stderr
    cfg_path = tmp_path / "model" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    assert inspect_model(local).config.num_hidden_layers == cfg["num_hidden_layers"]
    del cfg["num_hidden_layers"], cfg["pad_token_id"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="config.json has no pad_token_id, num_hidden_layers; write"):
        inspect_model(local)


def test_training_and_inference_precision_names_are_both_accepted():
    """Training names its mixed precision fp32/bf16, inference its weights' dtype float32/bfloat16/
    float16: each takes the other's spelling (kept under its own), and refuses the rest by name."""
    from rankformer.config.infer import PerturbConfig
    from rankformer.config.train import FinetuneCellsConfig, PretrainConfig

    job = {"model": "m", "corpus": "c", "out": "o", "mode": "all"}
    assert PerturbConfig(**job, precision="bf16").precision == "bfloat16"
    assert PerturbConfig(**job, precision="fp32").precision == "float32"
    with pytest.raises(InputError, match="precision float16 needs --use-gpu"):
        PerturbConfig(**job, precision="fp16")
    assert PretrainConfig(corpus="c", out="o", precision="bfloat16").precision == "bf16"
    assert (
        FinetuneCellsConfig(model="m", corpus="c", out="o", label_column="y", precision="float32").precision
        == "fp32"
    )
    with pytest.raises(InputError, match="precision 'float16' must be auto, bf16 or fp32"):
        PretrainConfig(corpus="c", out="o", precision="float16")


def test_system_metrics_are_sampled_into_the_run(tmp_path):
    """psutil is declared, so MLflow's monitor runs: CPU and memory land in the run."""
    import time

    import mlflow

    uri = f"sqlite:///{tmp_path}/m.db"
    run = tracking.start_run(uri, "sys", "r")
    with tracking.system_metrics(uri, run, interval_s=0.5):
        time.sleep(2.0)
    tracking.end_run(uri, run)
    keys = set(mlflow.MlflowClient(uri).get_run(run).data.metrics)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= keys, keys


def test_typed_lists_choices_environment_and_completion(tmp_path, capsys, monkeypatch):
    """List flags are parsed as their element type (once a list of strings, refused by the
    check), choices come from the Literal types and are enforced, required flags are marked,
    every option reads an environment variable listed in --help, shell completion prints."""
    from rankformer.cli import main
    from rankformer.config.train import FinetuneCellsConfig

    base = ["finetune", "cells", "--corpus", "c", "--model", "m", "--out", "o", "--label-column", "y"]
    args = parse(
        [*base, "--tune-lr", "1e-5", "1e-3", "--tune-freeze-layers", "0", "1", "--group-column", "d"]
    )
    cfg = build(FinetuneCellsConfig, args.values)
    assert cfg.tune.tune_lr == [1e-5, 1e-3] and cfg.tune.tune_freeze_layers == [0, 1]
    assert all(isinstance(v, int) for v in cfg.tune.tune_freeze_layers)
    # repeated list flags add up; KEY=VALUE mappings read as YAML values
    again = parse([*base, "--tune-freeze-layers", "0", "--tune-freeze-layers", "2", "--rename", "a=b", "c=d"])
    assert again.values["tune"]["tune_freeze_layers"] == [0, 2] and again.values["rename"] == {
        "a": "b",
        "c": "d",
    }
    pre = parse(
        ["pretrain", "--corpus", "c", "--out", "o", "--model", "num_hidden_layers=4", "--model", "x=a"]
    )
    assert pre.values["model"] == {"num_hidden_layers": 4, "x": "a"}
    tok = parse(
        [
            "tokenize",
            "a.h5ad",
            "b.zarr",
            "--vocab",
            "v",
            "--out",
            "o",
            "--carry",
            "celltype:cell_type",
            "--carry",
            "donor",
        ]
    )
    assert tok.values["inputs"] == ["a.h5ad", "b.zarr"] and tok.values["carry"] == {
        "celltype": "cell_type",
        "donor": "donor",
    }
    # positional inputs given or not: a config file's inputs stand unless words replace them
    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"inputs": ["x.h5ad"], "vocab": "v", "out": "o"}))
    assert parse(["tokenize", "--config", str(tmp_path / "t.yaml")]).values["inputs"] == ["x.h5ad"]
    assert parse(["tokenize", "y.zarr", "--config", str(tmp_path / "t.yaml")]).values["inputs"] == ["y.zarr"]
    for bad, said in (
        (["--tune-lr", "1e-5", "fast"], "fast"),
        (["--tune-freeze-layers", "0", "one"], "one"),
        (["--pooling", "max"], "max"),
    ):
        with pytest.raises(argparse.ArgumentError, match=said):
            parse([*base, *bad])
    # --help: choices, required, environment variables
    with pytest.raises(SystemExit):
        main(["finetune", "cells", "--help"])
    shown = capsys.readouterr().out
    assert "--schedule {linear,cosine}" in shown and "(required, type: str)" in shown
    assert "RANKFORMER_FINETUNE__CELLS__TUNE__TUNE_LR" in shown
    monkeypatch.setenv("RANKFORMER_PRETRAIN__MAX_STEPS", "17")
    monkeypatch.setenv("RANKFORMER_PRETRAIN__OPTIM__LR", "0.25")
    env = build(PretrainConfig, parse(["pretrain", "--corpus", "c", "--out", "o"]).values)
    assert env.max_steps == 17 and env.optim.lr == 0.25
    assert (
        build(
            PretrainConfig, parse(["pretrain", "--corpus", "c", "--out", "o", "--max-steps", "3"]).values
        ).max_steps
        == 3
    )
    with pytest.raises(SystemExit):
        main(["--print_completion", "shtab-bash"])
    script = capsys.readouterr().out
    assert "pretrain" in script and "--max-steps" in script and "complete" in script
