"""The door of `rankformer pretrain`: every check that can fail before the first step, from the
corpus manifest, the vocabulary, the preset or initial model's metadata, the output folder and the
tracking store, without torch (a typo is named in about a second)."""

from __future__ import annotations

import dataclasses
from typing import Any

from rankformer.config.train import PretrainConfig
from rankformer.errors import InputError
from rankformer.model.presets import check_fits, preset
from rankformer.model.store import check_model_output
from rankformer.vocab.gene_vocab import GeneVocab


@dataclasses.dataclass
class Plan:
    """What the driver learned at the door."""

    manifest: dict[str, Any]
    vocab: GeneVocab
    layout: str
    max_length: int
    mean_length: float
    tracking_uri: str


def plan(cfg: PretrainConfig) -> Plan:
    """Every check that can fail before the first step, each a clear error."""
    from rankformer import tracking
    from rankformer.corpus.read import corpus_manifest, corpus_vocab

    manifest = corpus_manifest(cfg.corpus)
    totals = manifest["totals"]
    if totals["cells_out"] == 0:
        raise InputError(f"corpus {cfg.corpus} holds no cells; tokenize a non-empty input")
    ccfg = manifest["config"]
    vocab = GeneVocab.load(cfg.vocab) if cfg.vocab else corpus_vocab(cfg.corpus, manifest)
    if vocab.content_hash != manifest["vocab_hash"]:
        raise InputError(
            f"vocabulary {cfg.vocab} ({vocab.content_hash[:19]}) is not the one corpus "
            f"{cfg.corpus} was tokenized with ({manifest['vocab_hash'][:19]}); pass the corpus's vocab"
        )
    layout, max_length = str(ccfg["layout"]), int(ccfg["max_length"])
    uri = tracking.resolve_uri(cfg.track.tracking_uri)
    if cfg.init_from:
        _check_init(cfg, manifest, layout, max_length, uri)
    else:
        check_fits(preset(cfg.preset, cfg.model), cfg.preset, layout, max_length)
    check_model_output(cfg.out, allow_model=True)
    tracking.check_reachable(uri)
    return Plan(manifest, vocab, layout, max_length, totals["tokens"] / totals["cells_out"], uri)


def _check_init(
    cfg: PretrainConfig, manifest: dict[str, Any], layout: str, max_length: int, uri: str
) -> None:
    """The initial model's metadata and config against the corpus (its weights load in the workers)."""
    from rankformer.model.loader import check_fits_corpus, inspect_model

    info = inspect_model(cfg.init_from or "", uri, expect_vocab_hash=manifest["vocab_hash"])
    check_fits_corpus(info, cfg.corpus, layout, max_length)
