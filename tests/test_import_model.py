"""`rankformer model import-geneformer`: small randomly initialised BERTs saved in a published
checkpoint's layout, with Geneformer's real dictionaries, become rankformer model folders."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from conftest import REFERENCE, needs_shared
from rankformer.cli import main as cli
from rankformer.model.loader import load_model

GF = REFERENCE / "geneformer"
pytestmark = needs_shared()


def _checkpoint(path, vocab_size: int, positions: int) -> BertForMaskedLM:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=positions,
        hidden_act="relu",
        pad_token_id=0,
    )
    model = BertForMaskedLM(config).eval()
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize(
    ("release", "n_tokens", "positions", "layout"),
    [
        ("gc104M", 20_275, 4096, "v2"),
        ("gc30M", 25_426, 2048, "v1"),
    ],
)
def test_import_keeps_weights_and_detects_the_layout(tmp_path, release, n_tokens, positions, layout):
    original = _checkpoint(tmp_path / "ckpt", n_tokens, positions)
    out = tmp_path / "model"
    argv = [
        "model",
        "import-geneformer",
        str(tmp_path / "ckpt"),
        "--token-dictionary",
        str(GF / f"token_dictionary_{release}.pkl"),
        "--gene-median-dictionary",
        str(GF / f"gene_median_dictionary_{release}.pkl"),
        "--mapping-dictionary",
        str(GF / f"ensembl_mapping_dict_{release}.pkl"),
        "--out",
        str(out),
        "--registered-model",
        f"gf-{release}",
        "--tracking-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
    ]
    assert cli(argv) == 0
    meta = json.loads((out / "rankformer.json").read_text())
    assert meta["layout"] == layout and meta["max_length"] == positions
    loaded = load_model(f"models:/gf-{release}@current", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert loaded.vocab.n_tokens == n_tokens and loaded.layout == layout
    ids = torch.tensor([[5, 9, 300, 4000, 0]])
    with torch.no_grad():
        a = original(input_ids=ids, attention_mask=(ids != 0).long()).logits
        b = loaded.model.eval()(input_ids=ids, attention_mask=(ids != 0).long()).logits
    torch.testing.assert_close(a, b)


def test_import_refuses_a_checkpoint_of_another_vocabulary(tmp_path, capsys):
    _checkpoint(tmp_path / "ckpt", 25_426, 2048)  # a V1 model
    argv = [
        "model",
        "import-geneformer",
        str(tmp_path / "ckpt"),
        "--token-dictionary",
        str(GF / "token_dictionary_gc104M.pkl"),
        "--gene-median-dictionary",
        str(GF / "gene_median_dictionary_gc104M.pkl"),
        "--out",
        str(tmp_path / "model"),
    ]
    assert cli(argv) == 2
    assert "vocab_size 25426" in capsys.readouterr().err
    assert cli([*argv[:2], str(tmp_path), *argv[3:]]) == 2  # no config.json
    assert "config.json" in capsys.readouterr().err
