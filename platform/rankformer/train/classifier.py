"""A classifier on a pretrained model: BERT's own token or sequence head, any ``AutoModelFor...``
class, or a custom head class (``module:Class``), with a fresh seeded head, frozen as asked, and the
loss weights per class."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import torch

from rankformer.config.train import HeadOptions
from rankformer.errors import InputError
from rankformer.model.forward import encoder

KINDS = {
    "token": "BertForTokenClassification",
    "sequence": "BertForSequenceClassification",
    "multitask": "rankformer.model.heads:MultiTaskForSequenceClassification",
}
# where a head module lived before the package took a folder per stage (saved models name it)
MOVED_HEADS = {"rankformer.heads": "rankformer.model.heads"}


def classifier_class(kind: str, head_class: str | None) -> Any:
    """BERT's own head for ``kind``, a transformers class by name (``AutoModelForTokenClassification``)
    or an importable ``package.module:Class``."""
    import transformers

    name = head_class or KINDS[kind]
    if ":" in name or ("." in name and not hasattr(transformers, name)):
        module, _, attr = name.partition(":") if ":" in name else name.rpartition(".")
        module = MOVED_HEADS.get(module, module)
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise InputError(f"head_class {name!r} cannot be imported ({exc}); give module:Class") from exc
    if not hasattr(transformers, name):
        raise InputError(
            f"head_class {name!r} is not a transformers class; use e.g. AutoModelForTokenClassification "
            "or an importable module:Class"
        )
    return getattr(transformers, name)


def build_classifier(
    model_dir: str,
    kind: str,
    n_classes: int,
    head: HeadOptions,
    seed: int,
    first_gene_token: int = 0,
    config_extra: dict[str, Any] | None = None,
    load: dict[str, Any] | None = None,
) -> torch.nn.Module:
    """The pretrained model with a fresh classification head (seeded), frozen as asked. The config
    records ``first_gene_token`` (heads that pool gene tokens use it) and ``config_extra``;
    ``load``: further ``from_pretrained`` keywords (a quantized base)."""
    from transformers.utils import logging as hf_logging

    from rankformer.model.store import quiet

    cls = classifier_class(kind, head.head_class)
    quiet()
    hf_logging.set_verbosity_error()  # the "newly initialised head" report is expected here
    torch.manual_seed(seed)
    from transformers import AutoConfig

    extra: dict[str, Any] = {
        "num_labels": n_classes,
        "first_gene_token": first_gene_token,
        **(config_extra or {}),
    }
    if head.dropout is not None:
        extra["classifier_dropout"] = head.dropout
    config = AutoConfig.from_pretrained(model_dir)
    for key, value in extra.items():  # set one by one: from_pretrained drops keys a config class lacks
        setattr(config, key, value)
    model = cls.from_pretrained(model_dir, config=config, attn_implementation="sdpa", **(load or {}))
    freeze(model, head)
    return model


def freeze(model: torch.nn.Module, head: HeadOptions) -> None:
    body: Any = encoder(model)
    layers = body.encoder.layer
    if head.freeze_layers > len(layers):
        raise InputError(f"freeze_layers {head.freeze_layers} exceeds the model's {len(layers)} layers")
    frozen: list[torch.nn.Module] = list(layers[: head.freeze_layers])
    if head.freeze_embeddings:
        frozen.append(body.embeddings)
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)


def class_weights(head: HeadOptions, counts: Sequence[int]) -> list[float] | None:
    """Loss weights per class: none, balanced (total / (classes x count)), or the given numbers."""
    if head.class_weights == "none":
        return None
    if head.class_weights == "balanced":
        total = float(sum(counts))
        return [total / (len(counts) * max(c, 1)) for c in counts]
    w = [float(x) for x in head.class_weights.split(",")]
    if len(w) != len(counts):
        raise InputError(f"class_weights has {len(w)} numbers for {len(counts)} classes")
    return w
