"""The model loader every stage uses: a path, an ``s3://`` prefix or ``models:/NAME@ALIAS``
(``models:/NAME/VERSION``) becomes a checked :class:`LoadedModel` (model, vocabulary, metadata)."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from transformers import BertForMaskedLM, PreTrainedModel

from rankformer.errors import InputError
from rankformer.io import fs
from rankformer.model.store import META, LoadedModel, load_model_dir


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


def load_model(
    uri: str,
    head: type[PreTrainedModel] = BertForMaskedLM,
    tracking_uri: str | None = None,
    expect_vocab_hash: str | None = None,
    **kwargs: Any,
) -> LoadedModel:
    """Load and check a model; with ``expect_vocab_hash``, refuse one made with another vocabulary."""
    loaded = load_model_dir(fetch_model_dir(uri, tracking_uri), head, source=uri, **kwargs)
    if expect_vocab_hash is not None and loaded.vocab.content_hash != expect_vocab_hash:
        raise InputError(
            f"model {uri} uses vocabulary {loaded.vocab.content_hash[:19]} but the corpus was tokenized "
            f"with {expect_vocab_hash[:19]}; tokenize the corpus with the model's vocab.json"
        )
    return loaded
