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
    config = BertConfig(
        vocab_size=N_TOKENS,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=PAD,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
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
