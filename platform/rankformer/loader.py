"""The model loader every stage uses: a path, an ``s3://`` prefix or ``models:/NAME@ALIAS``
(``models:/NAME/VERSION``) becomes a checked :class:`LoadedModel` (model, vocabulary, metadata),
or, where a driver only checks a model before its workers load it, a :class:`ModelInfo` (the same
without the weights)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rankformer.errors import InputError
from rankformer.io import fs
from rankformer.model.store import (
    META,
    VOCAB,
    LoadedModel,
    ModelInfo,
    load_model_dir,
    read_meta,
    read_model_dir,
)
from rankformer.vocab import GeneVocab

if TYPE_CHECKING:
    from transformers import PreTrainedModel

LIGHT_FILES = (META, VOCAB, "config.json")  # what a model says about itself, without its weights


@contextmanager
def local_model_dir(uri: str, tracking_uri: str | None = None, weights: bool = True) -> Iterator[str]:
    """The model folder at ``uri`` as a local folder for the block. A remote one (``s3://`` or
    ``models:/``) is copied into a temporary folder that is removed afterwards (the weights, once
    loaded, live in memory); ``weights=False`` copies only its metadata, vocabulary and config."""
    remote = uri.startswith("models:/") or fs.is_remote(uri)
    if not remote:
        if not os.path.isdir(uri):
            raise FileNotFoundError(
                f"model {uri} not found; give a model folder, an s3:// prefix or models:/NAME@ALIAS"
            )
        yield uri
        return
    files = None if weights else LIGHT_FILES
    tmp = tempfile.mkdtemp(prefix="rankformer-model-")
    try:
        if uri.startswith("models:/"):
            from rankformer.tracking import download_model

            yield download_model(uri, tracking_uri, tmp, files)
            return
        if not fs.exists(fs.join(uri, META)):
            raise InputError(f"{uri} holds no rankformer model (no {META}); check the prefix")
        for name in files or fs.listdir(uri):
            fs.copy(fs.join(uri, name), os.path.join(tmp, name))
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def model_meta(uri: str, tracking_uri: str | None = None) -> dict[str, Any]:
    """A model's ``rankformer.json`` (task, layout, classes...), read without its weights."""
    with local_model_dir(uri, tracking_uri, weights=False) as local:
        return read_meta(local)


def inspect_model(
    uri: str, tracking_uri: str | None = None, expect_vocab_hash: str | None = None
) -> ModelInfo:
    """A model's metadata, vocabulary and config, checked, without loading its weights; with
    ``expect_vocab_hash``, refuse one made with another vocabulary."""
    with local_model_dir(uri, tracking_uri, weights=False) as local:
        info = read_model_dir(local, source=uri)
    _check_vocab(uri, info.vocab, expect_vocab_hash)
    return info


def _check_vocab(uri: str, vocab: GeneVocab, expect_hash: str | None) -> None:
    if expect_hash is not None and vocab.content_hash != expect_hash:
        raise InputError(
            f"model {uri} uses vocabulary {vocab.content_hash[:19]} but the corpus was tokenized "
            f"with {expect_hash[:19]}; tokenize the corpus with the model's vocab.json"
        )


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
    head: type[PreTrainedModel] | None = None,
    tracking_uri: str | None = None,
    expect_vocab_hash: str | None = None,
    **kwargs: Any,
) -> LoadedModel:
    """Load and check a model (``head``: a Hugging Face class, by default ``BertForMaskedLM``);
    with ``expect_vocab_hash``, refuse one made with another vocabulary."""
    with local_model_dir(uri, tracking_uri) as local:
        loaded = load_model_dir(local, head, source=uri, **kwargs)
    _check_vocab(uri, loaded.vocab, expect_vocab_hash)
    return loaded
