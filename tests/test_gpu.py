"""GPU checks (skipped without CUDA): a bf16 pretraining step on the GPU learns, and MFU is reported."""

from __future__ import annotations

import pytest
import torch

from pretrain_helpers import ordered_cells, write_corpus
from rankformer.api import corpus_files
from rankformer.train.config import PretrainConfig
from rankformer.train.local import LocalContext
from rankformer.train.loop import run_loop
from rankformer.train.pretrain import MaskedGeneTask, TokenSpec, arrow_cells, build_model, loop_options
from rankformer.vocab import GeneVocab

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_bf16_pretraining_on_gpu(tmp_path):
    corpus = write_corpus(str(tmp_path / "c"), ordered_cells(600, 150, 3, 30, seed=1), 150)
    cfg = PretrainConfig(
        corpus=corpus,
        out=str(tmp_path / "m"),
        max_steps=200,
        log_every=50,
        checkpoint_every=10**6,
        optim={"lr": 3e-3, "warmup_steps": 20},
    )
    vocab = GeneVocab.load(str(tmp_path / "c_vocab.json"))
    task = MaskedGeneTask(arrow_cells(corpus_files(corpus), 0), TokenSpec.of(vocab), cfg, 0)
    ctx = LocalContext(None, "cuda")
    extra = {"flops_per_token": 1e6, "peak_flops": 1e15}
    run_loop(build_model(cfg, vocab, None), task, loop_options(cfg, extra), ctx)
    assert ctx.history[-1]["loss"] < 0.5 * ctx.history[0]["loss"]
    assert 0 < ctx.history[-1]["mfu"] < 1
