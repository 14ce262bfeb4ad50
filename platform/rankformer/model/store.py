"""A model directory: Hugging Face ``save_pretrained`` output, the GeneVocab (``vocab.json``, hash
included) and ``rankformer.json`` (format, vocab hash, layout, preset, corpus, training summary).

``transformers.BertForMaskedLM.from_pretrained(dir)`` loads it without rankformer installed;
:func:`load_model_dir` also checks model and vocabulary against each other. A directory is complete
only once ``rankformer.json`` exists: it is written last (and locally the whole directory appears
by one rename).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from rankformer.config.types import Layout, as_layout
from rankformer.errors import InputError
from rankformer.io import fs
from rankformer.vocab.gene_vocab import GeneVocab, load_expected

if TYPE_CHECKING:  # torch and transformers load only where weights do: drivers check models without them
    import torch
    from transformers import PreTrainedModel

META = "rankformer.json"
# the `task` a fine-tuned model's META records, by what it classifies (`finetune genes|cells`)
CLASSIFIER_TASKS = {"genes": "gene-classification", "cells": "cell-classification"}
CLASSIFIED_BY_TASK = {task: what for what, task in CLASSIFIER_TASKS.items()}
VOCAB = "vocab.json"
FORMAT = "rankformer-model"
FORMAT_VERSION = 1


@dataclass
class LoadedModel:
    model: PreTrainedModel
    vocab: GeneVocab
    meta: dict[str, Any]
    source: str  # where it was loaded from (path, s3:// or models:/ URI)

    @property
    def layout(self) -> Layout:
        return as_layout(self.meta["layout"])


def quiet() -> None:
    """No per-file progress bars from transformers and MLflow in job output (logs stay on)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def save_model_dir(model: PreTrainedModel, vocab: GeneVocab, meta: dict[str, Any], out: str) -> None:
    """Write the model directory at ``out`` (local or s3://) whole."""
    quiet()
    from rankformer.model.mlflow_model import write_mlflow_files

    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "vocab_hash": vocab.content_hash, **meta}
    if meta.get("classes"):  # class names where Hugging Face's pipelines and the Hub look for them
        labels = [str(c) for c in meta["classes"]]
        model.config.id2label = dict(enumerate(labels))
        model.config.label2id = {c: i for i, c in enumerate(labels)}
    with tempfile.TemporaryDirectory(prefix="rankformer-model-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if hasattr(model, "peft_config"):  # adapters: the classifier's own config beside them
            model.config.save_pretrained(tmp)
        vocab.save(os.path.join(tmp, VOCAB))
        write_mlflow_files(tmp, vocab, doc)
        if fs.is_remote(out):
            for name in sorted(os.listdir(tmp)):
                fs.copy(os.path.join(tmp, name), fs.join(out, name))
            fs.write_bytes_atomic(fs.join(out, META), json.dumps(doc, indent=1).encode())
            return
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(doc, f, indent=1)
        parent = os.path.dirname(os.path.abspath(out))
        os.makedirs(parent, exist_ok=True)
        staged = tempfile.mkdtemp(prefix=".tmp-model-", dir=parent)
        shutil.copytree(tmp, staged, dirs_exist_ok=True)
        if os.path.isdir(out):  # replacing our own earlier model: never a foreign folder
            check_model_output(out, allow_model=True)
            shutil.rmtree(out)
        os.replace(staged, out)


def check_model_output(out: str, allow_model: bool = True) -> None:
    """Refuse an output folder that holds anything other than a rankformer model."""
    present = [n for n in fs.listdir(out) if not n.startswith(".tmp-")]
    if not present:
        return
    if allow_model and META in present:
        return
    raise InputError(
        f"output {out} is not empty and holds no rankformer model (found {present[:5]}); choose a new "
        "--out folder or delete that one"
    )


WEIGHTS = (
    "model.safetensors",
    "adapter_model.safetensors",  # LoRA adapters and head; the base weights come from its base model
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)


def read_json(path: str, source: str | None = None) -> dict[str, Any]:
    """A model folder's JSON file as a mapping; a damaged one is an error naming it."""
    where = os.path.join(source, os.path.basename(path)) if source else path
    fix = "write the model folder again (`rankformer pretrain`, `save_pretrained`) or copy it whole"
    doc = fs.read_json(path, fix, shown=where)
    if not isinstance(doc, dict):
        raise InputError(
            f"{where} holds {type(doc).__name__}, not a JSON object: the model folder is damaged"
        )
    return doc


def check_weights(names: list[str], source: str) -> None:
    """A model folder lists a weights file (safetensors or PyTorch, whole or sharded)."""
    if not any(n in names for n in WEIGHTS):
        raise InputError(
            f"model {source} has no weights (none of {list(WEIGHTS)}; found {sorted(names)[:8]}): the "
            "folder is incomplete; copy it whole, or write it again with `save_pretrained`"
        )


def read_meta(local_dir: str) -> dict[str, Any]:
    path = os.path.join(local_dir, META)
    if not os.path.exists(path):
        raise InputError(
            f"{local_dir} is not a rankformer model directory (no {META}); make one with `rankformer "
            "pretrain` or `rankformer model import-geneformer`"
        )
    doc = read_json(path)
    if doc.get("format") != FORMAT or doc.get("format_version") != FORMAT_VERSION:
        got = f"{doc.get('format')!r} v{doc.get('format_version')}"
        raise InputError(f"{path}: format {got} is not {FORMAT} v{FORMAT_VERSION}; upgrade rankformer")
    return doc


@dataclass
class ModelInfo:
    """What a model directory says about itself, read without its weights."""

    config: Any  # the Hugging Face config
    vocab: GeneVocab
    meta: dict[str, Any]
    source: str  # where it came from (path, s3:// or models:/ URI)

    @property
    def layout(self) -> Layout:
        return as_layout(self.meta["layout"])

    @property
    def positions(self) -> int:
        return int(self.config.max_position_embeddings)

    @property
    def max_length(self) -> int:
        return max_length_of(self.meta, self.config)


def max_length_of(meta: dict[str, Any], config: Any) -> int:
    """The longest cell a model takes: the ``max_length`` it was made for, else its positions."""
    return int(meta.get("max_length") or config.max_position_embeddings)


CONFIG_KEYS = ("vocab_size", "pad_token_id", "max_position_embeddings", "num_hidden_layers", "hidden_size")


def read_config(local_dir: str, source: str | None = None) -> SimpleNamespace:
    """The Hugging Face ``config.json`` of a model folder as attributes, read as JSON (no torch):
    what a driver checks before its workers load the weights."""
    path = os.path.join(local_dir, "config.json")
    if not os.path.exists(path):
        raise InputError(
            f"{source or local_dir} has no config.json; a model folder is `save_pretrained` output"
        )
    doc = read_json(path, source)
    missing = [k for k in CONFIG_KEYS if doc.get(k) is None]
    if missing:
        raise InputError(
            f"{source or local_dir}: config.json has no {', '.join(missing)}; write the config with "
            "`save_pretrained` (it records every field) or add them"
        )
    return SimpleNamespace(**doc)


def read_model_dir(local_dir: str, source: str | None = None) -> ModelInfo:
    """Metadata, vocabulary and config of a local model directory, checked against each other."""
    meta = read_meta(local_dir)
    vocab = load_expected(os.path.join(local_dir, VOCAB), meta["vocab_hash"])
    cfg = read_config(local_dir, source)
    if cfg.vocab_size != vocab.n_tokens or cfg.pad_token_id != vocab.pad_id:
        raise InputError(
            f"{source or local_dir}: model has vocab_size {cfg.vocab_size} and pad id {cfg.pad_token_id} "
            f"but its vocabulary has {vocab.n_tokens} tokens and pad id {vocab.pad_id}"
        )
    return ModelInfo(cfg, vocab, meta, source or local_dir)


def load_model_dir(
    local_dir: str, head: type[PreTrainedModel] | None = None, source: str | None = None, **kwargs: Any
) -> LoadedModel:
    """Model (``head``: a Hugging Face class, by default ``BertForMaskedLM``), vocabulary and
    metadata from a local model directory, checked against each other."""
    from safetensors import SafetensorError
    from transformers import BertForMaskedLM

    quiet()
    info = read_model_dir(local_dir, source)
    check_weights(os.listdir(local_dir), source or local_dir)
    try:
        model = (head or BertForMaskedLM).from_pretrained(local_dir, attn_implementation="sdpa", **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:  # a truncated or foreign file
        raise InputError(
            f"model {source or local_dir}: its weights could not be loaded ({type(exc).__name__}: "
            f"{str(exc)[:300]}); the folder is damaged or not a BERT of its config.json: write it again"
        ) from None
    return LoadedModel(model, info.vocab, info.meta, info.source)


def state_checksum(model: torch.nn.Module) -> float:
    """A cheap fingerprint of the weights (tests compare models with it)."""
    return float(sum(p.detach().double().sum() for p in model.parameters()))
