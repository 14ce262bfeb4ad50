"""Packed micro-batches (rankformer.model.packing): cells end to end in one token stream, no
padding. The padded per-cell computation is the reference: forward states, the masked-gene loss
and its gradients agree to float32 precision, no attention weight crosses a cell, and a packed
pretraining learns as the padded one does."""

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from pretrain_helpers import ordered_cells, train_planted, write_corpus
from rankformer.config.train import PretrainConfig
from rankformer.model.batching import pad_batch
from rankformer.model.device import attention_mask_on
from rankformer.model.masking import IGNORE
from rankformer.model.mlm import MaskedGeneLM, labelled_positions
from rankformer.model.packing import VARLEN, pack_cells, packed_batches, use_varlen_attention
from rankformer.train.pretrain import run_settings

PAD, CLS, EOS, GENE_LO, N_TOKENS = 0, 2, 3, 4, 60
IMPLEMENTATIONS = ("rankformer_varlen", "sdpa", "eager", "flex_attention")


def _model(implementation: str) -> BertForMaskedLM:
    torch.manual_seed(0)
    config = _config()
    if implementation == VARLEN:
        model = BertForMaskedLM._from_config(config, attn_implementation="sdpa").float()
        use_varlen_attention(model)
        return model
    return BertForMaskedLM._from_config(config, attn_implementation=implementation).float()


def _cells(specials: bool) -> list[np.ndarray]:
    """Cells of mixed lengths (1 to 40 genes), with or without <cls> ... <eos>."""
    rng = np.random.default_rng(3)
    out = []
    for n in (17, 1, 40, 5, 23, 2):
        genes = rng.choice(np.arange(GENE_LO, N_TOKENS), n, replace=False)
        out.append(np.concatenate([[CLS], genes, [EOS]]) if specials else genes)
    return out


def _padded_states(model: BertForMaskedLM, cells: list[np.ndarray]) -> list[torch.Tensor]:
    ids, attn = pad_batch(cells, PAD)
    h = model.bert(input_ids=ids, attention_mask=attn).last_hidden_state  # each backend masks its way
    return [h[i, : len(c)] for i, c in enumerate(cells)]


def _packed_states(model: BertForMaskedLM, cells: list[np.ndarray]) -> list[torch.Tensor]:
    packed = pack_cells(cells)
    h = model.bert(input_ids=packed.ids, position_ids=packed.positions).last_hidden_state
    return packed.split(h[0])


def test_packing_lays_cells_end_to_end_with_their_own_positions():
    packed = pack_cells([np.array([5, 6, 7]), np.array([8]), np.array([9, 10])])
    assert packed.ids.tolist() == [[5, 6, 7, 8, 9, 10]]
    assert packed.positions.tolist() == [[0, 1, 2, 0, 0, 1]]
    assert packed.starts.tolist() == [0, 3, 4, 6] and packed.n_tokens == 6
    assert [b.tolist() for b in packed_batches(np.array([3, 4, 5, 9, 1, 1]), 8, 64)] == [
        [0, 1],
        [2],
        [3],
        [4, 5],
    ]
    assert [b.tolist() for b in packed_batches(np.array([1, 1, 1]), 100, 2)] == [[0, 1], [2]]
    with pytest.raises(ValueError):
        pack_cells([np.array([5]), np.array([], dtype=np.int64)])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("specials", [True, False])
def test_packed_states_equal_the_padded_per_cell_ones(implementation, specials):
    model = _model(implementation).eval()
    cells = _cells(specials)
    with torch.no_grad():
        for padded, packed in zip(_padded_states(model, cells), _packed_states(model, cells), strict=True):
            torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)


def test_no_attention_weight_crosses_a_cell():
    model = _model("eager").eval()
    cells = _cells(True)
    packed = pack_cells(cells)
    with torch.no_grad():
        out = model.bert(input_ids=packed.ids, position_ids=packed.positions, output_attentions=True)
    cell_of = np.repeat(np.arange(len(cells)), np.diff(packed.starts))
    same = torch.from_numpy(cell_of[:, None] == cell_of[None, :])
    for layer in out.attentions:  # (1, heads, tokens, tokens)
        assert float(layer[0][:, ~same].abs().max()) == 0.0
        torch.testing.assert_close(layer[0].sum(-1), torch.ones(layer.shape[1:3]))
    # and changing one cell changes no other cell's states
    changed = [c.copy() for c in cells]
    changed[2][1:-1] = changed[2][1:-1][::-1]
    with torch.no_grad():
        before, after = _packed_states(model, cells), _packed_states(model, changed)
    for i in (0, 1, 3, 4, 5):
        torch.testing.assert_close(after[i], before[i], atol=0, rtol=0)
    assert not torch.allclose(after[2], before[2])


@pytest.mark.parametrize("implementation", ("rankformer_varlen", "sdpa", "eager"))  # flex: CUDA only
def test_the_masked_gene_loss_and_its_gradients_equal_the_padded_ones(implementation):
    cells = _cells(True)
    rng = np.random.default_rng(5)
    labelled = [rng.random(len(c)) < 0.3 for c in cells]
    for m in labelled:
        m[0] = m[-1] = False  # specials are never masked
    inputs = [np.where(m, 1, c) for c, m in zip(cells, labelled, strict=True)]  # 1: <mask>
    labels = [np.where(m, c, IGNORE) for c, m in zip(cells, labelled, strict=True)]

    def loss_and_grads(packed: bool) -> tuple[float, dict[str, torch.Tensor]]:
        model = MaskedGeneLM(_model(implementation)).train()
        if packed:
            batch = pack_cells(inputs)
            ids, mask, positions = batch.ids, None, batch.positions
            lab = torch.from_numpy(np.concatenate(labels))[None]
        else:
            ids, attn = pad_batch(inputs, PAD)
            mask, positions = (attention_mask_on(attn, "cpu") if implementation == "sdpa" else attn), None
            lab = torch.full(ids.shape, IGNORE, dtype=torch.int64)
            for i, row in enumerate(labels):
                lab[i, : len(row)] = torch.from_numpy(row)
        where, target = labelled_positions(lab)
        loss, _ = model(ids, mask, where, target, positions)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return float(loss.detach()), grads

    padded_loss, padded_grads = loss_and_grads(False)
    packed_loss, packed_grads = loss_and_grads(True)
    assert packed_loss == pytest.approx(padded_loss, abs=1e-5)
    assert packed_grads.keys() == padded_grads.keys()
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_a_packed_pretraining_learns_as_the_padded_one_does(tmp_path):
    """The planted gene orders of ``ordered_cells``, the same steps and seed either way."""
    corpus = write_corpus(str(tmp_path / "ordered"), ordered_cells(600, 150, 3, 30, seed=1), 150)
    padded = train_planted(corpus, 200, tmp_path / "padded")
    packed = train_planted(corpus, 200, tmp_path / "packed", packed=True)
    assert all(h["padding_fraction"] == 0.0 for h in packed)
    assert padded[-1]["accuracy"] > 0.5 and packed[-1]["accuracy"] > 0.5
    assert abs(packed[-1]["accuracy"] - padded[-1]["accuracy"]) < 0.1
    assert abs(packed[-1]["loss"] - padded[-1]["loss"]) < 0.3


def test_activation_checkpointing_gives_the_same_step():
    """``--activation-checkpointing`` recomputes each layer in the backward pass: the same loss and
    gradients, packed or padded."""
    from rankformer.train.task import MaskedGeneTask, TokenSpec

    spec = TokenSpec(PAD, 1, GENE_LO, N_TOKENS)
    cells = _cells(True)

    def step(checkpointing: bool, packed: bool) -> tuple[float, list[torch.Tensor]]:
        cfg = PretrainConfig(
            corpus="c", out="o", activation_checkpointing=checkpointing, batch={"packed": packed}
        )
        model = run_settings(MaskedGeneLM(_model("sdpa")), cfg).train()
        assert model.mlm.is_gradient_checkpointing is checkpointing
        task = MaskedGeneTask(None, spec, cfg, 0, packed=packed)
        loss, _ = task.forward(model, cells, torch.device("cpu"))
        loss.backward()
        return float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    for packed in (False, True):
        (a, ga), (b, gb) = step(False, packed), step(True, packed)
        assert a == pytest.approx(b, abs=1e-6)
        for x, y in zip(ga, gb, strict=True):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


def _config(**extra) -> BertConfig:
    return BertConfig(
        vocab_size=N_TOKENS,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=PAD,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        classifier_dropout=0.0,
        first_gene_token=GENE_LO,
        **extra,
    )


def _classifier(head: str) -> torch.nn.Module:
    """A small classifier of each kind fine-tuning offers, seeded."""
    from transformers import BertForSequenceClassification, BertForTokenClassification

    from rankformer.model.heads import MeanPoolForSequenceClassification, MultiTaskForSequenceClassification

    torch.manual_seed(0)
    if head == "multitask":
        cls, config = MultiTaskForSequenceClassification, _config(num_labels=5, task_sizes=[3, 2])
    else:
        cls = {
            "token": BertForTokenClassification,
            "sequence": BertForSequenceClassification,
            "mean": MeanPoolForSequenceClassification,
        }[head]
        config = _config(num_labels=3)
    return cls._from_config(config, attn_implementation="sdpa").float()


def _classify_task(head: str, packed: bool):
    from rankformer.config.train import BatchOptions
    from rankformer.train.finetune import ClassifyTask

    lookup = np.full(N_TOKENS, IGNORE, dtype=np.int64)
    lookup[GENE_LO : GENE_LO + 30] = np.arange(30) % 3  # half the genes labelled, 3 classes
    batch = BatchOptions(max_tokens=4096, max_cells=64, packed=packed)
    kind = "token" if head == "token" else "sequence"
    sizes = [3, 2] if head == "multitask" else None
    return ClassifyTask(
        lambda epoch: iter(()),
        kind,
        PAD,
        batch,
        0,
        0,
        lookup if kind == "token" else None,
        [1.0, 2.0, 0.5] if head in ("sequence", "token") else None,
        sizes,
        [1.0, 0.5] if sizes else None,
    )


@pytest.mark.parametrize("head", ["token", "sequence", "mean", "multitask"])
def test_packed_fine_tuning_gives_the_padded_loss_and_gradients(head):
    """`finetune --packed`: BERT's token and sequence heads (each cell's first token pooled), the
    gene-mean head and the multi-task head give the padded batch's loss and gradients."""
    from rankformer.model.packing import use_packing

    cells = _cells(True)
    labels = (
        [[i % 3, (i + 1) % 2] for i in range(len(cells))]
        if head == "multitask"
        else [i % 3 for i in range(6)]
    )
    batch = [(c, y) for c, y in zip(cells, labels, strict=True)]

    def step(packed: bool) -> tuple[float, dict[str, torch.Tensor], dict]:
        model = _classifier(head).train()
        if packed:
            use_packing(model)
        loss, stats = _classify_task(head, packed).forward(model, batch, torch.device("cpu"))
        loss.backward()
        return (
            float(loss.detach()),
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            stats,
        )

    padded_loss, padded_grads, padded_stats = step(False)
    packed_loss, packed_grads, packed_stats = step(True)
    assert packed_stats["pad_tokens"] == 0.0 and padded_stats["pad_tokens"] > 0
    assert (
        packed_stats["tokens"] == padded_stats["tokens"] and packed_stats["labels"] == padded_stats["labels"]
    )
    assert int(packed_stats["correct"]) == int(padded_stats["correct"])
    assert packed_loss == pytest.approx(padded_loss, abs=1e-5)
    assert packed_grads.keys() == padded_grads.keys()
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_a_packed_classifier_goes_back_to_padded_batches_unchanged(tmp_path):
    """After packed training the same model predicts padded batches, and saves the plain folder."""
    from rankformer.model.packing import use_packing, use_padding

    cells = _cells(True)
    ids, attn = pad_batch(cells, PAD)
    model = _classifier("sequence").eval()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=attn).logits
        use_packing(model)
        packed = pack_cells(cells)
        per_cell = model(
            input_ids=packed.ids, position_ids=packed.positions, **packed.attention_kwargs()
        ).logits
        torch.testing.assert_close(per_cell, before, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            model(input_ids=ids, attention_mask=attn).logits, before, atol=1e-6, rtol=1e-6
        )
    use_padding(model).save_pretrained(tmp_path)
    assert "rankformer" not in (tmp_path / "config.json").read_text()
    assert model.config._attn_implementation == "sdpa"


def test_a_custom_head_must_say_it_takes_packed_batches():
    from transformers import BertPreTrainedModel

    from rankformer.errors import InputError
    from rankformer.model.packing import use_packing

    class Head(BertPreTrainedModel):
        def __init__(self, config):
            super().__init__(config)
            self.lin = torch.nn.Linear(4, 4)

    with pytest.raises(InputError, match="takes_packed_batches = True"):
        use_packing(Head(_config()))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_the_jagged_kernel_keeps_attention_within_each_cell(monkeypatch, dropout):
    """The GPU's kernel for packed batches with attention dropout (a jagged nested tensor; run here
    on the CPU): without dropout the padded per-cell states; with it, a cell's outputs still depend
    on no other cell's inputs (their gradients are exactly zero)."""
    from rankformer.model import packing

    monkeypatch.setattr(packing, "FORCED_KERNEL", "jagged")
    torch.manual_seed(0)
    config = _config()
    config.attention_probs_dropout_prob = dropout
    model = BertForMaskedLM._from_config(config, attn_implementation="sdpa").float()
    use_varlen_attention(model)
    cells = _cells(True)
    if dropout == 0.0:
        model.eval()
        with torch.no_grad():
            for padded, packed in zip(
                _padded_states(model, cells), _packed_states(model, cells), strict=True
            ):
                torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
        return
    model.train()
    packed = pack_cells(cells)
    embeds = model.bert.embeddings.word_embeddings(packed.ids).detach().requires_grad_(True)
    h = model.bert(
        inputs_embeds=embeds, position_ids=packed.positions, **packed.attention_kwargs()
    ).last_hidden_state
    h[0, packed.starts[2] : packed.starts[3]].sum().backward()  # cell 2's outputs
    grad = embeds.grad[0].abs().sum(-1)
    inside = torch.zeros(len(grad), dtype=torch.bool)
    inside[packed.starts[2] : packed.starts[3]] = True
    assert float(grad[~inside].max()) == 0.0 and float(grad[inside].min()) > 0.0
    # the dropout is drawn: two training passes differ, as a padded batch's do
    again = model.bert(
        inputs_embeds=embeds, position_ids=packed.positions, **packed.attention_kwargs()
    ).last_hidden_state
    assert not torch.allclose(again, h)


def test_a_gpu_training_budget_is_what_the_probe_measured_fits():
    """The arithmetic of the training token budget (the probe itself runs on a GPU: test_gpu): the
    largest power of two of tokens whose measured cost fills the share of what the optimizer's
    state leaves free; the CPU's fixed budget without a GPU; a given --max-tokens as it is."""
    from rankformer.model.budget import CPU_MAX_TOKENS, GPU_MAX_TOKENS
    from rankformer.train.budget import TRAIN_MEMORY_SHARE, Probe, probe_cells, training_token_budget

    gib = 1 << 30
    probe = Probe(tokens=16_384, per_token=200 * 1024, fixed=4 * gib, free=70 * gib)
    fit = TRAIN_MEMORY_SHARE * 66 * gib / (200 * 1024)  # ~236k tokens
    assert probe.budget() == 131_072 and 131_072 <= fit < 262_144
    assert "131,072 tokens" in probe.said() and "200 KiB" in probe.said()
    assert Probe(16_384, 200 * 1024, 4 * gib, 5 * gib).budget() == CPU_MAX_TOKENS  # never below the CPU's
    assert Probe(16_384, 10.0, 0.0, 1e15).budget() == GPU_MAX_TOKENS
    model = torch.nn.Linear(2, 2)
    assert training_token_budget(None, model, None, torch.device("cpu"), "auto", 100) == (
        CPU_MAX_TOKENS,
        None,
    )
    assert training_token_budget(4096, model, None, torch.device("cuda"), "auto", 100) == (4096, None)
    cells = probe_cells(GENE_LO, N_TOKENS, 40, tokens=200)
    assert len(cells) == 5 and all(len(set(c)) == 40 and c.min() >= GENE_LO for c in cells)


def test_a_packed_pretraining_saves_a_plain_bert_with_the_trained_logits(tmp_path):
    """`pretrain --packed` through the job (in this process, the CPU's token budget by default):
    `BertForMaskedLM.from_pretrained` on the saved folder gives, on padded cells, the logits the
    trained model gives on the same cells packed."""
    import os

    from rankformer.train.pretrain import run_pretrain

    corpus = write_corpus(str(tmp_path / "c"), ordered_cells(120, 150, 3, 30, seed=1), 150)
    cfg = PretrainConfig(
        corpus=corpus,
        out=str(tmp_path / "m"),
        max_steps=4,
        log_every=2,
        checkpoint_every=4,
        optim={"lr": 3e-3},
        batch={"max_cells": 16, "packed": True},
        scale={"in_process": True, "storage_path": str(tmp_path / "ckpt")},
        track={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "packed"},
    )
    assert cfg.batch.max_tokens is None  # from the device: the CPU's 16,384
    summary = run_pretrain(cfg)
    plain = BertForMaskedLM.from_pretrained(cfg.out).eval()
    assert plain.config._attn_implementation == "sdpa"
    trained = MaskedGeneLM(BertForMaskedLM.from_pretrained(cfg.out))
    state = torch.load(os.path.join(summary["checkpoint"], "model.pt"), weights_only=True)
    trained.load_state_dict(state)
    use_varlen_attention(trained.mlm)
    trained.eval()
    cells = [c.astype(np.int64) for c in ordered_cells(5, 150, 3, 30, seed=9)]
    ids, attn = pad_batch(cells, PAD)
    packed = pack_cells(cells)
    with torch.no_grad():
        padded_logits = plain(input_ids=ids, attention_mask=attn).logits
        flat = trained.mlm(
            input_ids=packed.ids, position_ids=packed.positions, **packed.attention_kwargs()
        ).logits
    for i, logits in enumerate(packed.split(flat[0])):
        torch.testing.assert_close(logits, padded_logits[i, : len(cells[i])], atol=1e-4, rtol=1e-4)
