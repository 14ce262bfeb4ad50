"""Pretraining pieces without Ray: masking statistics, length grouping, the loop learning a
planted signal (and not a shuffled one), checkpoints resuming, and every door check."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from transformers import BertForMaskedLM

from pretrain_helpers import ordered_cells, train_planted, write_corpus
from rankformer.config.train import PretrainConfig
from rankformer.errors import InputError
from rankformer.model.batching import budget_batches, length_grouped, padding_fraction
from rankformer.model.masking import IGNORE, mask_genes
from rankformer.train.local import LocalContext
from rankformer.train.loop import run_loop
from rankformer.train.pretrain import plan
from rankformer.vocab.gene_vocab import GeneVocab


def test_masking_statistics():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 1000, (400, 500))
    ids[:, 0], ids[:, -1], ids[:, -50:-1] = 2, 3, 0  # <cls>, <eos>, padding
    inputs, labels = mask_genes(ids, gene_lo=4, mask_id=1, n_tokens=1000, generator=g, prob=0.15)
    chosen = labels != IGNORE
    genes = ids >= 4
    assert not chosen[~genes].any()  # specials and pad are never chosen
    assert (labels[chosen] == ids[chosen]).all()
    assert abs(chosen.sum().item() / genes.sum().item() - 0.15) < 0.005
    masked = (inputs == 1) & chosen
    kept = (inputs == ids) & chosen
    replaced = chosen & ~masked & ~kept
    n = chosen.sum().item()
    assert abs(masked.sum().item() / n - 0.8) < 0.01
    assert abs(replaced.sum().item() / n - 0.1) < 0.01  # a random gene (rarely the same one)
    assert abs(kept.sum().item() / n - 0.1) < 0.01
    assert ((inputs[replaced] >= 4) & (inputs[replaced] < 1000)).all()
    assert (inputs[~chosen] == ids[~chosen]).all()


def test_the_masked_gene_loss_is_hugging_faces_with_the_mask_decided_on_the_host(monkeypatch):
    """MaskedGeneLM (labelled positions chosen on the host, the attention mask as the host decides it:
    none without padding, else (batch, 1, 1, tokens) booleans) gives Hugging Face's masked-LM loss and
    logits. Custom heads keep the 2-D mask they may pool with."""
    from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

    from rankformer.model.device import attention_mask_on, mask_argument
    from rankformer.model.heads import MeanPoolForSequenceClassification
    from rankformer.model.mlm import MaskedGeneLM, labelled_positions

    config = BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    torch.manual_seed(0)
    hf = BertForMaskedLM(config).eval()
    ours = MaskedGeneLM(hf)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 60, (3, 12), generator=g)
    for attn in (torch.ones_like(ids), (torch.arange(12) < torch.tensor([[12], [7], [3]])).long()):
        inputs, labels = mask_genes(ids * attn, 4, 1, 60, g, prob=0.5)
        mask = attention_mask_on(attn, "cpu")
        assert (
            mask is None if bool(attn.all()) else (mask.shape == (3, 1, 1, 12) and mask.dtype == torch.bool)
        )
        with torch.no_grad():
            want = hf(input_ids=inputs, attention_mask=attn, labels=labels)
            loss, logits = ours(inputs, mask, *labelled_positions(labels))
        torch.testing.assert_close(loss, want.loss)
        torch.testing.assert_close(logits, want.logits[labels != IGNORE])
    config.num_labels = 2
    assert mask_argument(BertForSequenceClassification(config), attn, "cpu").shape == (3, 1, 1, 12)
    assert mask_argument(MeanPoolForSequenceClassification(config), attn, "cpu").shape == (3, 12)
    with monkeypatch.context() as m:  # a Transformers whose BERT would refuse a 4-D mask
        m.setattr("rankformer.model.device.bert_takes_prepared_masks", lambda: False)
        assert attention_mask_on(attn, "cpu").shape == (3, 12)


def test_length_grouping_spends_little_on_padding():
    rng = np.random.default_rng(0)
    cells = [np.arange(int(n)) for n in rng.lognormal(6.5, 0.6, 5000).clip(20, 4096)]
    for b in budget_batches(np.array([len(c) for c in cells]), 16384, 64):
        assert len(b) * max(len(cells[i]) for i in b) <= 16384 or len(b) == 1
    batches = list(length_grouped(iter(cells), 16384, 64, 1024, rng))
    assert sorted(len(c) for b in batches for c in b) == sorted(len(c) for c in cells)
    pad = sum(padding_fraction(b) * len(b) * max(map(len, b)) for b in batches)
    total = sum(len(b) * max(map(len, b)) for b in batches)
    assert pad / total < 0.05
    fixed = 1 - sum(map(len, cells)) / (4096 * len(cells))  # padding every cell to the model length
    assert fixed > 0.7


def _train(corpus: str, steps: int, tmp_path, seed: int = 0) -> list[dict[str, float]]:
    return train_planted(corpus, steps, tmp_path, seed)


def test_loss_falls_on_a_learnable_order_and_not_on_shuffled_tokens(tmp_path):
    cells = ordered_cells(600, 150, 3, 30, seed=1)
    rng = np.random.default_rng(2)
    shuffled = [np.concatenate([[2], rng.permutation(c[1:-1]), [3]]) for c in cells]
    learn = _train(write_corpus(str(tmp_path / "ordered"), cells, 150), 300, tmp_path / "a")
    control = _train(write_corpus(str(tmp_path / "shuffled"), shuffled, 150), 300, tmp_path / "b")
    assert learn[-1]["loss"] < 0.5 * learn[0]["loss"]
    assert learn[-1]["accuracy"] > 0.6
    # shuffled: only which genes a type has is learnable, not their order
    assert control[-1]["accuracy"] < 0.3
    assert learn[-1]["loss"] < control[-1]["loss"] - 1.0
    assert all(h["padding_fraction"] < 0.2 for h in learn)


def test_each_steps_agreement_starts_before_the_step_ahead_of_it_runs():
    """The workers' agreement that each has the next step's batches is started before the current
    step's work is queued and read after it (so on GPUs the host stays a step ahead); an epoch ends
    when a worker runs short, and no agreement is left pending after the last step."""
    from rankformer.config.train import OptimOptions
    from rankformer.train.loop import LoopOptions

    events: list[str] = []

    class Task:
        def epoch_batches(self, epoch: int):
            return iter([torch.ones(2, 3)] * 3)  # 3 batches an epoch: 2 steps of 1, 1 of 2 with accum 2

        def forward(self, model, b, device):
            events.append("forward")
            return model(b).sum(), {"tokens": 6.0, "pad_tokens": 0.0}

    class Context(LocalContext):
        def all_min_started(self, value: int):
            events.append(f"start:{value}")

            def read() -> int:
                events.append("read")
                return value

            return read

    opts = LoopOptions(
        max_steps=3, seed=0, log_every=10, checkpoint_every=10, optim=OptimOptions(grad_accum=2)
    )
    run_loop(torch.nn.Linear(3, 1), Task(), opts, Context())
    step = ["forward", "forward"]
    assert events == [
        *["start:1", "read", "start:0"],  # epoch 0: a full step, then a short one found before it runs
        *step,
        *["read"],  # short: the epoch ends
        *["start:1", "read", "start:0", *step, "read"],  # epoch 1 likewise
        *["start:1", "read", *step],  # epoch 2: the last step starts no agreement after it
    ]


def test_resume_from_checkpoint_continues_the_step_count(tmp_path):
    corpus = write_corpus(str(tmp_path / "c"), ordered_cells(200, 60, 2, 20, seed=3), 60)
    first = _train(corpus, 40, tmp_path)
    again = _train(corpus, 60, tmp_path)  # same checkpoint folder: carries on from step 40
    assert first[-1]["step"] == 40 and again[0]["resumed_from_step"] == 40
    assert [h["step"] for h in again] == [60.0]


@pytest.fixture
def small_corpus(tmp_path):
    return write_corpus(str(tmp_path / "c"), ordered_cells(50, 40, 2, 20, seed=4), 40)


def _plan(corpus, tmp_path, **kw):
    base = {
        "corpus": corpus,
        "out": str(tmp_path / "model"),
        "track": {"tracking_uri": f"sqlite:///{tmp_path}/m.db"},
    }
    return plan(PretrainConfig(**{**base, **kw}))


def test_door_checks(small_corpus, tmp_path):
    assert _plan(small_corpus, tmp_path).layout == "v2"
    other = tmp_path / "other_vocab.json"
    GeneVocab.load(_plan(small_corpus, tmp_path).manifest["config"]["vocab"])
    from rankformer.io.synth import gene_ids
    from rankformer.vocab.gene_vocab import build_vocab

    build_vocab(list(gene_ids(41)), [1.0] * 41).save(str(other))
    with pytest.raises(InputError, match="is not the one corpus"):
        _plan(small_corpus, tmp_path, vocab=str(other))
    with pytest.raises(InputError, match="preset 'geneformer-v1' is for v1 corpora"):
        _plan(small_corpus, tmp_path, preset="geneformer-v1")
    with pytest.raises(InputError, match="shorter than the corpus's max_length 64"):
        _plan(small_corpus, tmp_path, model={"max_position_embeddings": 32})
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="holds no rankformer model"):
        _plan(small_corpus, tmp_path, out=str(tmp_path / "busy"))
    with pytest.raises(InputError, match="unreachable"):
        _plan(small_corpus, tmp_path, track={"tracking_uri": "http://127.0.0.1:9"})
    empty = write_corpus(str(tmp_path / "empty"), [], 40, shards=1)
    with pytest.raises(InputError, match="holds no cells"):
        _plan(empty, tmp_path)
    with pytest.raises(InputError, match="no finished corpus"):
        _plan(str(tmp_path / "nothing"), tmp_path)


def test_init_from_door_checks(small_corpus, tmp_path):
    """--init-from: the model's vocabulary, layout and positions are checked from its metadata and
    config (its weights load once, in the workers)."""
    from transformers import BertForMaskedLM

    from rankformer.io.synth import gene_ids
    from rankformer.model.presets import bert_config, preset
    from rankformer.model.store import save_model_dir
    from rankformer.vocab.gene_vocab import build_vocab

    vocab = GeneVocab.load(_plan(small_corpus, tmp_path).manifest["config"]["vocab"])

    def model(name, voc, positions=64, layout="v2"):
        bert = BertForMaskedLM(bert_config(preset("tiny", {"max_position_embeddings": positions}), voc))
        save_model_dir(bert, voc, {"task": "masked-lm", "layout": layout, "max_length": positions}, name)
        return name

    good = model(str(tmp_path / "good"), vocab)
    assert _plan(small_corpus, tmp_path, init_from=good).layout == "v2"
    other = build_vocab(list(gene_ids(41)), [1.0] * 41)
    with pytest.raises(InputError, match="tokenize the corpus with the model's vocab"):
        _plan(small_corpus, tmp_path, init_from=model(str(tmp_path / "other"), other))
    with pytest.raises(InputError, match="fewer than the corpus max_length 64"):
        _plan(small_corpus, tmp_path, init_from=model(str(tmp_path / "short"), vocab, positions=32))
    with pytest.raises(InputError, match="is for v1 corpora"):
        _plan(small_corpus, tmp_path, init_from=model(str(tmp_path / "v1"), vocab, layout="v1"))


def test_the_resume_key_follows_what_a_training_computes_not_where_it_runs(tmp_path):
    from dataclasses import replace

    from rankformer.config.train import ScaleOptions, TrackOptions
    from rankformer.train.pretrain import resume_key

    cfg = PretrainConfig(corpus="c", out=str(tmp_path / "m"), max_steps=40)
    key = resume_key(cfg)
    same = [
        replace(
            cfg, scale=ScaleOptions(ray_address="ray://h:10001", storage_path="s3://b/r", max_failures=3)
        ),
        replace(cfg, scale=ScaleOptions(placement="SPREAD", keep_checkpoints=5, cpus_per_worker=2.0)),
        replace(cfg, track=TrackOptions(experiment="other", registered_model="m")),
    ]
    assert {resume_key(c) for c in same} == {key}
    other = [
        replace(cfg, max_steps=41),
        replace(cfg, out=str(tmp_path / "m2")),
        replace(cfg, seed=1),
        replace(cfg, scale=ScaleOptions(num_workers=2)),
    ]
    assert len({key, *(resume_key(c) for c in other)}) == 5


def test_a_cluster_of_several_machines_needs_a_storage_path(monkeypatch):
    """Ray Train writes checkpoints from the workers and reads them from the driver: a local
    default only works on one machine (the two-raylet test cluster is one)."""
    from rankformer.config.train import ScaleOptions
    from rankformer.train import ray_train

    monkeypatch.setattr(ray_train, "cluster_hosts", lambda: {"10.0.0.1", "10.0.0.2"})
    with pytest.raises(InputError, match=r"spans 2 machines .* Give --storage-path s3://"):
        ray_train.checkpoint_storage(ScaleOptions(), "/work/ray_results")
    assert ray_train.checkpoint_storage(ScaleOptions(storage_path="s3://b/ckpt"), "/x") == "s3://b/ckpt"
    monkeypatch.setattr(ray_train, "cluster_hosts", lambda: {"127.0.0.1"})
    assert ray_train.checkpoint_storage(ScaleOptions(), "/work/ray_results") == "/work/ray_results"


def test_a_live_training_is_not_driven_twice(small_corpus, tmp_path, monkeypatch):
    """A rerun while the training's driver lives is refused before Ray starts (both would write
    the same checkpoints); a stale or dead driver's stamp does not hold it; of two drivers that
    claim one training at the same moment, exactly one goes on, and an earlier-started live run
    with the same key holds it against a newer one."""
    import os
    import socket
    import subprocess
    import threading
    import time

    from rankformer import tracking
    from rankformer.train.pretrain import TRAIN_RUN_TAG, resume_key, run_pretrain

    track = {"tracking_uri": f"sqlite:///{tmp_path}/m.db"}
    cfg = PretrainConfig(corpus=small_corpus, out=str(tmp_path / "model"), track=track)
    uri, key = tracking.resolve_uri(cfg.track.tracking_uri), resume_key(cfg)
    run = tracking.start_run(uri, cfg.track.experiment, "a", {tracking.RESUME_TAG: key, TRAIN_RUN_TAG: "t"})
    now = int(time.time())
    tracking.set_tag(uri, run, tracking.DRIVER_TAG, f"other-host 123 abcd1234 {now - 5}")
    with pytest.raises(
        InputError, match=rf"already running: MLflow run {run}, driver on other-host \(pid 123\)"
    ):
        run_pretrain(cfg)
    assert not os.path.exists(cfg.out)

    def stamp(host: str, pid: int, at: int) -> dict[str, str]:
        return {tracking.DRIVER_TAG: f"{host} {pid} 0123abcd {at}"}

    dead = subprocess.Popen(["true"])
    dead.wait()
    here = socket.gethostname()
    assert tracking.live_driver(stamp("other-host", 1, now - int(tracking.STALE_S) - 1)) is None
    assert tracking.live_driver(stamp(here, dead.pid, now)) is None
    assert (
        tracking.live_driver(stamp(here, os.getpid(), now - 60), now=now)
        == f"driver on {here} (pid {os.getpid()}), last seen 60 s ago"
    )
    assert tracking.live_driver({}) is None

    monkeypatch.setattr(tracking, "CLAIM_WAIT_S", 1.0)
    outcome: list[str] = []

    def claim() -> None:
        try:
            tracking.claim_run(uri, key, run)
            outcome.append("on")
        except InputError as exc:
            outcome.append(str(exc))

    threads = [threading.Thread(target=claim) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcome)[0] == "on" and "already running" in sorted(outcome)[1], outcome
    time.sleep(0.01)
    later = tracking.start_run(uri, cfg.track.experiment, "b", {tracking.RESUME_TAG: key})
    with pytest.raises(InputError, match=f"MLflow run {run}"):
        tracking.claim_run(uri, key, later)
    tracking.claim_run(uri, key, run)  # the earlier run goes on beside the newer one's fresh stamp


def test_pretrain_in_process_trains_logs_and_resumes(small_corpus, tmp_path, capsys):
    """`--in-process` (and the default with one worker and no cluster named) trains here, without
    Ray: checkpoints under --storage-path, the same MLflow run, a rerun that finds the model done."""
    from mlflow.tracking import MlflowClient

    from rankformer.train.pretrain import run_pretrain

    db = f"sqlite:///{tmp_path}/m.db"
    cfg = PretrainConfig(
        corpus=small_corpus,
        out=str(tmp_path / "model"),
        max_steps=12,
        log_every=4,
        checkpoint_every=6,
        scale={"in_process": True, "storage_path": str(tmp_path / "ckpt")},
        track={"tracking_uri": db, "registered_model": "here"},
    )
    summary = run_pretrain(cfg)
    assert summary["step"] == 12 and os.path.basename(summary["checkpoint"]) == "step-12"
    assert summary["checkpoint"].startswith(str(tmp_path / "ckpt"))
    out = capsys.readouterr().out
    assert "warmup 1 steps: a tenth of the run's 12" in out
    run = MlflowClient(db).get_run(summary["run_id"])
    assert run.data.params["warmup_steps_used"] == "1" and run.data.params["scale.in_process"] == "True"
    assert len(MlflowClient(db).get_metric_history(summary["run_id"], "loss")) == 3
    assert BertForMaskedLM.from_pretrained(cfg.out) is not None
    assert run_pretrain(cfg)["already_done"]
    default = PretrainConfig(
        corpus=small_corpus, out=str(tmp_path / "d"), max_steps=2, track={"tracking_uri": db}
    )
    assert "step-2" in run_pretrain(default)["checkpoint"]  # one worker, no cluster named: here too


def test_the_default_warmup_is_a_tenth_of_a_short_run_and_a_long_explicit_one_is_refused():
    from rankformer.config.train import FinetuneOptim, OptimOptions

    assert OptimOptions().warmup(2_000) == 200 and OptimOptions().warmup(500_000) == 10_000
    assert OptimOptions(warmup_steps=50).warmup(2_000) == 50
    assert FinetuneOptim().warmup(300) == 30  # fine-tuning's default share
    assert (
        FinetuneOptim(warmup_fraction=0.0).warmup(300) == 30
        and FinetuneOptim(warmup_fraction=0.0).warmup(9_000) == 500
    )
    cfg = PretrainConfig(corpus="c", out="m", max_steps=2_000)
    assert cfg.optim.warmup(cfg.max_steps) == 200
    with pytest.raises(
        InputError,
        match=r"warmup_steps 10,000 would spend 100% of the run's 2,000 steps .* --warmup-steps 200",
    ):
        PretrainConfig(corpus="c", out="m", max_steps=2_000, optim={"warmup_steps": 10_000})
    with pytest.raises(InputError, match="warmup_fraction 0.6 must be within"):
        PretrainConfig(corpus="c", out="m", optim={"warmup_fraction": 0.6})
    with pytest.raises(
        InputError, match="--in-process trains one worker in this process, not --num-workers 2"
    ):
        PretrainConfig(corpus="c", out="m", scale={"in_process": True, "num_workers": 2})


def test_the_control_of_pretraining_is_guessing_the_most_common_gene(tmp_path):
    from rankformer.train.pretrain import most_common_gene_share

    # gene tokens start at 4 (v2 specials): token 5 is 3 of the 6 gene tokens; <cls>/<eos> not counted
    cells = [np.array([2, 5, 5, 6, 3]), np.array([2, 5, 7, 4, 3])]
    corpus = write_corpus(str(tmp_path / "c"), cells, 4, shards=1)
    vocab = GeneVocab.load(str(tmp_path / "c_vocab.json"))
    assert most_common_gene_share(corpus, vocab) == pytest.approx(3 / 6)
    assert most_common_gene_share(corpus, vocab, max_cells=1) == pytest.approx(2 / 3)
