"""`rankformer model import-geneformer`: a published Geneformer checkpoint folder (a Hugging Face
BERT config and weights) and its pickled dictionaries become a rankformer model folder.

The layout follows the token dictionary: ``<cls>``/``<eos>`` present means V2 (``<cls>`` genes
``<eos>``, up to 4,096 tokens), otherwise V1 (genes only, up to 2,048). The checkpoint must match the
dictionary (vocabulary size, pad id) and have positions for the layout's length; anything else is
an error naming both numbers. Nothing is downloaded: the folder is one the user has.
"""

from __future__ import annotations

import json
import os
from typing import Any

from rankformer.config.corpus import LAYOUT_MAX_LENGTH
from rankformer.errors import InputError
from rankformer.io import fs


def import_geneformer_model(
    model_dir: str,
    token_dictionary: str,
    gene_median_dictionary: str,
    out: str,
    mapping_dictionary: str | None = None,
    gene_name_dictionary: str | None = None,
) -> dict[str, Any]:
    """Write the rankformer model folder at ``out``; returns its metadata."""
    from transformers import BertForMaskedLM

    from rankformer.model.store import check_model_output, quiet, save_model_dir
    from rankformer.vocab.geneformer import import_geneformer

    config_path, config = _checkpoint_config(model_dir)
    vocab = import_geneformer(
        token_dictionary, gene_median_dictionary, mapping_dictionary, gene_name_dictionary
    )
    layout, max_length, positions = _check_fit(config_path, config, vocab, token_dictionary)
    check_model_output(out, allow_model=True)
    quiet()
    model = BertForMaskedLM.from_pretrained(model_dir, attn_implementation="sdpa")
    meta = {
        "task": "masked-lm",
        "layout": layout,
        "max_length": max_length,
        "preset": f"imported:{os.path.basename(os.path.normpath(model_dir))}",
        "imported_from": {
            "model_dir": os.path.abspath(model_dir) if not fs.is_remote(model_dir) else model_dir,
            "token_dictionary": os.path.basename(token_dictionary),
            "gene_median_dictionary": os.path.basename(gene_median_dictionary),
            "mapping_dictionary": os.path.basename(mapping_dictionary) if mapping_dictionary else None,
        },
    }
    save_model_dir(model, vocab, meta, out)
    return {**meta, "vocab_hash": vocab.content_hash, "n_tokens": vocab.n_tokens, "positions": positions}


def _checkpoint_config(model_dir: str) -> tuple[str, dict[str, Any]]:
    """The checkpoint's config.json (path and contents), which must be a BERT's."""
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.exists(config_path):
        raise InputError(
            f"{model_dir} holds no config.json: give a Hugging Face checkpoint folder (config.json and "
            "model.safetensors or pytorch_model.bin)"
        )
    with open(config_path) as f:
        config = json.load(f)
    if config.get("model_type") != "bert":
        raise InputError(
            f"{config_path}: model_type {config.get('model_type')!r}; Geneformer models are BERT"
        )
    return config_path, config


def _check_fit(
    config_path: str, config: dict[str, Any], vocab: Any, token_dictionary: str
) -> tuple[str, int, int]:
    """(layout, max_length, positions) of a checkpoint whose vocabulary size and pad id match the
    dictionary's; a checkpoint with fewer positions than its layout's length is noted."""
    layout = "v2" if vocab.has_v2_specials else "v1"
    if int(config["vocab_size"]) != vocab.n_tokens:
        raise InputError(
            f"{config_path}: vocab_size {config['vocab_size']} but {token_dictionary} has {vocab.n_tokens} "
            "tokens; pass the token dictionary this model was trained with (V1: gc30M, V2: gc104M)"
        )
    pad = vocab.pad_id
    if int(config.get("pad_token_id", pad)) != pad:
        raise InputError(
            f"{config_path}: pad_token_id {config.get('pad_token_id')} but the dictionary's pad is {pad}"
        )
    positions = int(config["max_position_embeddings"])
    if positions < LAYOUT_MAX_LENGTH[layout]:
        print(
            f"note: {os.path.dirname(config_path)} has {positions} positions, fewer than the {layout} "
            f"layout's {LAYOUT_MAX_LENGTH[layout]}; tokenize corpora for it with --max-length {positions}"
        )
    return layout, min(LAYOUT_MAX_LENGTH[layout], positions), positions


def register_import(out: str, tracking_uri: str | None, name: str, alias: str, experiment: str) -> str:
    """Log the imported folder to an MLflow run and register it; returns the version."""
    from rankformer import tracking
    from rankformer.model.store import read_meta

    uri = tracking.resolve_uri(tracking_uri)
    tracking.check_reachable(uri)
    meta = read_meta(out)
    run = tracking.start_run(uri, experiment, f"import-{name}", {"job": "import-geneformer"})
    tracking.log_artifacts(uri, run, out, "model")
    tags = {"vocab_hash": meta["vocab_hash"], "layout": meta["layout"], "source": str(meta["preset"])}
    version = tracking.register_model(uri, run, "model", name, alias, tags)
    tracking.end_run(uri, run)
    return version
