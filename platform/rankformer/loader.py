"""The model loader every stage uses: a path, an ``s3://`` prefix or ``models:/NAME@ALIAS``
(``models:/NAME/VERSION``) becomes a checked :class:`LoadedModel` (model, vocabulary, metadata),
or, where a driver only checks a model before its workers load it, a :class:`ModelInfo` (the same
without the weights)."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from transformers import BertForMaskedLM, PreTrainedModel

from rankformer.errors import InputError
from rankformer.io import fs
from rankformer.model.store import META, LoadedModel, ModelInfo, load_weights, read_model_dir


def fetch_model_dir(uri: str, tracking_uri: str | None = None) -> str:
    """A local folder holding the model directory at ``uri``."""
    if uri.startswith("models:/"):
        from rankformer.tracking import download_model

        return download_model(uri, tracking_uri)
    if fs.is_remote(uri):
        if not fs.exists(fs.join(uri, META)):
            raise InputError(f"{uri} holds no rankformer model (no {META}); check the prefix")
        local = tempfile.mkdtemp(prefix="rankformer-model-")
        for name in fs.listdir(uri):
            with open(os.path.join(local, name), "wb") as f:
                f.write(fs.read_bytes(fs.join(uri, name)))
        return local
    if not os.path.isdir(uri):
        raise FileNotFoundError(
            f"model {uri} not found; give a model folder, an s3:// prefix or models:/NAME@ALIAS"
        )
    return uri


def inspect_model(
    uri: str, tracking_uri: str | None = None, expect_vocab_hash: str | None = None
) -> ModelInfo:
    """A model's metadata, vocabulary and config, checked, without loading its weights; with
    ``expect_vocab_hash``, refuse one made with another vocabulary."""
    info = read_model_dir(fetch_model_dir(uri, tracking_uri), source=uri)
    if expect_vocab_hash is not None and info.vocab.content_hash != expect_vocab_hash:
        raise InputError(
            f"model {uri} uses vocabulary {info.vocab.content_hash[:19]} but the corpus was tokenized "
            f"with {expect_vocab_hash[:19]}; tokenize the corpus with the model's vocab.json"
        )
    return info


def check_fits_corpus(info: ModelInfo, corpus: str, layout: str | None, max_length: int) -> None:
    """The model reads the corpus's layout and its longest cells (``layout`` None: not recorded)."""
    if layout and info.layout != layout:
        raise InputError(f"model {info.source} is for {info.layout} corpora; corpus {corpus} is {layout}")
    if max_length > info.positions:
        raise InputError(
            f"model {info.source} has {info.positions} positions, fewer than the corpus max_length "
            f"{max_length} of {corpus}; use a model with at least {max_length} positions or retokenize "
            f"the corpus with --max-length {info.positions}"
        )


def load_model(
    uri: str,
    head: type[PreTrainedModel] = BertForMaskedLM,
    tracking_uri: str | None = None,
    expect_vocab_hash: str | None = None,
    **kwargs: Any,
) -> LoadedModel:
    """Load and check a model; with ``expect_vocab_hash``, refuse one made with another vocabulary."""
    return load_weights(inspect_model(uri, tracking_uri, expect_vocab_hash), head, **kwargs)
