"""The door check of every job that loads a model onto a corpus: vocabulary, layout, positions and
layer agree before any weights load."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rankformer.model.store import LoadedModel, ModelInfo


def check_model_and_corpus(
    model_uri: str, corpus: str, tracking_uri: str, layer: str | None = None
) -> tuple[ModelInfo, dict[str, Any]]:
    """The model's checked metadata (vocabulary, layout and positions against the corpus, and the
    ``layer`` asked for against its depth), without its weights, and the corpus manifest: the door
    check of jobs whose workers load the model."""
    from rankformer.config.infer import pick_layer
    from rankformer.corpus.read import corpus_manifest
    from rankformer.model.loader import check_fits_corpus, inspect_model

    manifest = corpus_manifest(corpus)
    info = inspect_model(model_uri, tracking_uri, manifest["vocab_hash"])
    ccfg = manifest.get("config", {})
    check_fits_corpus(info, corpus, ccfg.get("layout"), int(ccfg.get("max_length") or 0))
    if layer is not None:
        pick_layer(layer, int(info.config.num_hidden_layers))
    return info, manifest


def open_model_and_corpus(
    model_uri: str,
    corpus: str,
    tracking_uri: str,
    head: Any = None,
    layer: str | None = None,
    before_load: Callable[[ModelInfo], None] | None = None,
) -> tuple[LoadedModel, dict[str, Any]]:
    """The model (checked against the corpus's vocabulary and layout, and ``layer`` against its
    depth) and the corpus manifest; ``before_load`` gets the model's metadata before the weights
    load."""
    from rankformer.model.loader import load_model

    info, manifest = check_model_and_corpus(model_uri, corpus, tracking_uri, layer)
    if before_load is not None:
        before_load(info)
    kwargs = {"head": head} if head is not None else {}
    want = manifest["vocab_hash"]
    return load_model(model_uri, tracking_uri=tracking_uri, expect_vocab_hash=want, **kwargs), manifest
