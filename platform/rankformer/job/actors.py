"""What every actor that holds a model shares: loading the encoder once (and, within an
in-process job, once for all its passes)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from rankformer.config.types import Precision


@dataclass(frozen=True)
class ModelSpec:
    """Which model an actor loads, onto what, and the layer whose states it reads."""

    model: str  # folder, s3:// prefix or models:/NAME@ALIAS
    tracking_uri: str  # the MLflow store models:/ URIs resolve in
    use_gpu: bool = False
    precision: Precision = "float32"
    layer: str = "penultimate"
    max_tokens: int | None = None  # tokens a forward pass; None: by device


@dataclass(frozen=True)
class ShardIO:
    """What an actor reads of each corpus shard (``where``: the selected cells) and the folder it
    writes its output shards to."""

    columns: list[str]
    where: dict[str, list[str]]
    out: str


_SHARED: dict[tuple[Any, ...], tuple[Any, Any]] | None = None  # see sharing_models


@contextlib.contextmanager
def sharing_models() -> Iterator[None]:
    """Within the block, the embedders this process builds for the same model, device and
    precision share one loaded copy (an in-process job's passes: the state embeddings, then the
    perturbations, would each load it). Ray actors, other processes, load their own."""
    global _SHARED
    outer = _SHARED
    _SHARED = {} if outer is None else outer
    try:
        yield
    finally:
        _SHARED = outer


def load_encoder(uri: str, tracking_uri: str, device: Any, precision: str) -> tuple[Any, Any]:
    """(the loaded model, its encoder on ``device`` in ``precision``, in eval mode)."""
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    from rankformer.model.loader import load_model

    os.environ["HF_HUB_OFFLINE"] = "1"
    hf_logging.set_verbosity_error()  # a masked-LM folder read as BertModel: its head is left out
    loaded = load_model(uri, head=BertModel, tracking_uri=tracking_uri)
    model: Any = loaded.model
    model = model.to(device).eval()
    if precision != "float32":  # states come back as float32 for pooling and cosines
        from rankformer.model.forward import PRECISIONS

        model = model.to(PRECISIONS[precision])
    return loaded, model


def shared_encoder(spec: ModelSpec, device: Any) -> tuple[Any, Any]:
    """:func:`load_encoder`, or the copy already loaded inside a :func:`sharing_models` block."""
    key = (spec.model, spec.tracking_uri, device, spec.precision)
    shared = _SHARED.get(key) if _SHARED is not None else None
    loaded, model = shared or load_encoder(spec.model, spec.tracking_uri, device, spec.precision)
    if _SHARED is not None:
        _SHARED[key] = (loaded, model)
    return loaded, model
