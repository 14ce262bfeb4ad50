"""What both classification jobs (and `rankformer predict`) do around training: check model and
corpus against each other at the door, own the output folder, write results atomically with a
manifest, and keep MLflow's parent and nested runs."""

from __future__ import annotations

from typing import Any

import numpy as np

from rankformer.job.door import open_model_and_corpus
from rankformer.model.store import ModelInfo


def check_placement(cfg: Any) -> None:
    """Refuse, before any model loads or output is written, a training (``cfg``: a fine-tuning
    config) or a Tune search that the cluster can never place."""
    from rankformer.classify.tune import trials_demand
    from rankformer.cluster import ensure_ray
    from rankformer.config.corpus import ClusterOptions
    from rankformer.train.ray_train import trains_in_process, workers_demand

    where = ClusterOptions(ray_address=cfg.scale.ray_address)
    if not trains_in_process(cfg.scale):
        ensure_ray(where, workers_demand(cfg.scale))
    if cfg.tune.trials:
        ensure_ray(where, trials_demand(cfg.tune, cfg.scale.use_gpu))


class PretrainedOnCorpus:
    """What both fine-tuning jobs open first: the tracking store (checked reachable), the pretrained
    model checked against the corpus (and against the frozen baseline's layer when there is one),
    its token layout and the corpus manifest."""

    def __init__(self, cfg: Any) -> None:
        from rankformer import tracking

        self.uri = tracking.resolve_uri(cfg.track.tracking_uri)
        tracking.check_reachable(self.uri)
        self.frozen_layer: str | None = cfg.layer if cfg.frozen_baseline else None
        self.pre, self.manifest = open_model_and_corpus(
            cfg.model, cfg.corpus, self.uri, layer=self.frozen_layer, before_load=self.before_load
        )
        self.vocab = self.pre.vocab
        self.pad, self.gene_lo = self.vocab.token_layout()
        self.max_tokens = int(cfg.batch.max_tokens)

    def before_load(self, info: ModelInfo) -> None:
        """A job's own checks against the model's metadata (vocabulary, config), run before the
        weights load; none by default."""

    def frozen_states(self, ids: list[np.ndarray]) -> tuple[Any, np.ndarray]:
        """The frozen baseline's features from the pretrained model, on CPU: per-gene sums of the
        layer's states over all occurrences, and each cell's mean-pooled vector."""
        import torch

        from rankformer.model.forward import gene_and_cell_states

        if self.frozen_layer is None:
            raise RuntimeError("frozen_states needs frozen_baseline on")  # a caller's bug, not input
        return gene_and_cell_states(
            self.pre.model,
            ids,
            self.pad,
            self.gene_lo,
            self.frozen_layer,
            torch.device("cpu"),
            self.max_tokens,
        )


def saved_form(model: Any, cfg: Any, uri: str, base_vocab_hash: str) -> tuple[Any, dict[str, Any]]:
    """The fine-tuned model as the job saves it, and what its metadata adds: with ``--peft lora``
    the adapters and a pinned reference to the base model (``adapter``), merged into a plain
    model with ``--merge``; without adapters the model itself."""
    if cfg.adapter.peft == "none":
        return model, {}
    from rankformer.train.adapters import adapter_meta, counts, merged

    meta = {"adapter": {**adapter_meta(cfg.adapter, cfg.model, base_vocab_hash, uri), **counts(model)}}
    return (merged(model) if cfg.adapter.merge else model), meta
