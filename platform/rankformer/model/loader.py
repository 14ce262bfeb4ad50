"""The model loader every stage uses: a path, an ``s3://`` prefix or ``models:/NAME@ALIAS``
(``models:/NAME/VERSION``) becomes a checked :class:`LoadedModel` (model, vocabulary, metadata),
or, where a driver only checks a model before its workers load it, a :class:`ModelInfo` (the same
without the weights)."""

from __future__ import annotations

import hashlib
import json
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
    check_weights,
    load_model_dir,
    read_meta,
    read_model_dir,
)
from rankformer.vocab.gene_vocab import GeneVocab

if TYPE_CHECKING:
    from transformers import PreTrainedModel

LIGHT_FILES = (META, VOCAB, "config.json")  # what a model says about itself, without its weights


CACHE_ENV = "RANKFORMER_MODEL_CACHE"  # folder of fetched models on this machine; "off": none
CACHE_KEEP_ENV = "RANKFORMER_MODEL_CACHE_KEEP"  # models it keeps (least recently used go first)
CACHE_KEEP = 3


@contextmanager
def local_model_dir(uri: str, tracking_uri: str | None = None, weights: bool = True) -> Iterator[str]:
    """The model folder at ``uri`` as a local folder for the block. A remote one (``s3://`` or
    ``models:/``) with its weights comes from this machine's model cache (:func:`cached_model_dir`),
    fetched once per machine and version, not once per worker; ``weights=False`` copies only its
    metadata, vocabulary and config into a temporary folder removed afterwards."""
    remote = uri.startswith("models:/") or fs.is_remote(uri)
    if not remote:
        if not os.path.isdir(uri):
            raise FileNotFoundError(
                f"model {uri} not found; give a model folder, an s3:// prefix or models:/NAME@ALIAS"
            )
        yield uri
        return
    root = _cache_root() if weights else None
    if root is not None:
        with cached_model_dir(uri, tracking_uri, root) as local:
            yield local
        return
    tmp = tempfile.mkdtemp(prefix="rankformer-model-")
    try:
        yield _fetch(uri, tracking_uri, tmp, None if weights else LIGHT_FILES)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fetch(uri: str, tracking_uri: str | None, dst: str, files: tuple[str, ...] | None) -> str:
    """Copy the remote model at ``uri`` (only ``files`` of it when given) into ``dst``; returns
    the local model folder."""
    if uri.startswith("models:/"):
        from rankformer.tracking import download_model

        return download_model(uri, tracking_uri, dst, files)
    _require_model(uri)
    for name in files or fs.listdir(uri):
        fs.copy(fs.join(uri, name), os.path.join(dst, name))
    return dst


def _require_model(uri: str) -> None:
    if not fs.exists(fs.join(uri, META)):
        raise InputError(f"{uri} holds no rankformer model (no {META}); check the prefix")


def _cache_root() -> str | None:
    """The model cache folder, created; None when it is off or cannot be written (a read-only
    home: loads then use a temporary copy, as with ``off``)."""
    root = os.environ.get(CACHE_ENV)
    if root == "off":
        return None
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    root = root or os.path.join(base, "rankformer", "models")
    try:
        os.makedirs(root, exist_ok=True)
    except OSError:
        return None
    return root if os.access(root, os.W_OK) else None


def _version_of(uri: str, tracking_uri: str | None) -> str:
    """What identifies the files of a remote model now: for ``s3://`` its objects' names, sizes
    and ETags (a model rewritten in place is another version), for ``models:/`` the registry's
    name, version and artifact source (a version's files never change; an alias moves)."""
    if uri.startswith("models:/"):
        from rankformer import tracking

        store = tracking.resolve_uri(tracking_uri)
        v = tracking.model_version_info(store, uri)
        doc: Any = [store, v["name"], v["version"], v["source"]]
    else:
        _require_model(uri)
        listing = fs.filesystem(uri).ls(uri, detail=True)
        doc = [
            uri,
            sorted((e["name"], e.get("size"), str(e.get("ETag") or e.get("LastModified"))) for e in listing),
        ]
    return hashlib.sha256(json.dumps(doc, default=str).encode()).hexdigest()[:24]


@contextmanager
def cached_model_dir(uri: str, tracking_uri: str | None, root: str) -> Iterator[str]:
    """The remote model at ``uri`` in this machine's model cache ``root`` (``RANKFORMER_MODEL_CACHE``,
    default ``~/.cache/rankformer/models``), fetched if absent; the same version is fetched once
    per machine however many workers ask at once (a file lock; the folder appears by one rename).
    While the block runs the entry is never evicted; the cache keeps the ``CACHE_KEEP`` (env
    ``RANKFORMER_MODEL_CACHE_KEEP``) most recently used models."""
    import fcntl

    key = _version_of(uri, tracking_uri)
    entry = os.path.join(root, key)
    with open(entry + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one fetch per machine; others wait for it
        if not os.path.isfile(os.path.join(entry, META)):
            shutil.rmtree(entry, ignore_errors=True)
            tmp = tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=root)
            try:
                got = _fetch(uri, tracking_uri, tmp, None)
                os.rename(got, entry)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        os.utime(entry)  # most recently used
        fcntl.flock(lock, fcntl.LOCK_SH)  # in use: eviction skips it
        _evict(root, keep=int(os.environ.get(CACHE_KEEP_ENV, CACHE_KEEP)), spare=key)
        yield entry


def _evict(root: str, keep: int, spare: str) -> None:
    """Remove the least recently used entries beyond ``keep``, skipping any in use."""
    import fcntl

    entries = [e for e in os.listdir(root) if not e.startswith(".") and not e.endswith(".lock")]
    entries.sort(key=lambda e: os.path.getmtime(os.path.join(root, e)), reverse=True)
    for name in entries[keep:]:
        if name == spare:
            continue
        with open(os.path.join(root, name + ".lock"), "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a worker is loading it
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


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
    if not uri.startswith("models:/"):  # a registered version's files were logged whole
        check_weights(fs.listdir(uri), uri)
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
        if os.path.exists(os.path.join(local, ADAPTER_CONFIG)):
            loaded = _load_adapters(local, head, uri, tracking_uri, **kwargs)
        else:
            loaded = load_model_dir(local, head, source=uri, **kwargs)
    _check_vocab(uri, loaded.vocab, expect_vocab_hash)
    return loaded


ADAPTER_CONFIG = "adapter_config.json"  # PEFT's file: a folder of adapters on a base model


def _load_adapters(
    local: str, head: type[PreTrainedModel] | None, source: str, tracking_uri: str | None, **kwargs: Any
) -> LoadedModel:
    """An adapter model (`finetune --peft lora` without --merge): its classifier rebuilt on the
    base model it names (checked: the same vocabulary), the adapters and head put on it."""
    from peft import PeftModel
    from transformers import AutoConfig

    info = read_model_dir(local, source)
    base = (info.meta.get("adapter") or {}).get("base_model")
    if not base:
        raise InputError(f"model {source} holds adapters but names no base model in its rankformer.json")
    if head is None:
        raise InputError(
            f"model {source} is a classifier's adapters; load it with rankformer.load_classifier or "
            "`rankformer predict` (its encoder alone: its base model, or save it with --merge)"
        )
    config = AutoConfig.from_pretrained(local)  # the classifier's: classes, task sizes, first gene token
    with local_model_dir(base, tracking_uri) as base_local:
        base_info = read_model_dir(base_local, base)
        if base_info.vocab.content_hash != info.vocab.content_hash:
            raise InputError(
                f"model {source}: its base model {base} now has vocabulary "
                f"{base_info.vocab.content_hash[:19]}, not the {info.vocab.content_hash[:19]} the adapters "
                "were trained with; give the base model they were trained on"
            )
        model = head.from_pretrained(base_local, config=config, attn_implementation="sdpa", **kwargs)
    try:
        adapted = PeftModel.from_pretrained(model, local)
    except (OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"model {source}: its adapters could not be loaded ({str(exc)[:300]})") from None
    return LoadedModel(adapted, info.vocab, info.meta, info.source)  # type: ignore[arg-type]
