"""GPU checks (skipped without CUDA): a bf16 pretraining step on the GPU learns, and MFU is reported."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pretrain_helpers import ordered_cells, write_corpus
from rankformer.config.train import PretrainConfig
from rankformer.corpus.read import corpus_files
from rankformer.train.local import LocalContext
from rankformer.train.loop import run_loop
from rankformer.train.pretrain import build_model, loop_options
from rankformer.train.task import MaskedGeneTask, TokenSpec, arrow_cells
from rankformer.vocab.gene_vocab import GeneVocab


def _small_config(**extra):
    """A small BERT of 60 tokens and 64 positions (``extra``: what a test changes)."""
    from transformers import BertConfig

    base = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
    return BertConfig(vocab_size=60, max_position_embeddings=64, **{**base, **extra})


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


def test_packed_bf16_pretraining_on_gpu_learns(tmp_path):
    """Packed micro-batches on the GPU in bf16: attention within each cell (variable-length
    FlashAttention without attention dropout); the states equal the padded per-cell ones within
    bf16's precision, and the training learns."""
    from transformers import BertModel

    from rankformer.model.batching import pad_batch
    from rankformer.model.packing import pack_cells, use_varlen_attention

    torch.manual_seed(0)
    model = BertModel._from_config(_small_config(), attn_implementation="sdpa").cuda().eval()
    cells = [torch.randint(4, 60, (n,)).numpy() for n in (17, 1, 40, 5, 23)]
    ids, attn = pad_batch(cells, 0)
    packed = pack_cells(cells)
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        padded = model(input_ids=ids.cuda(), attention_mask=attn.cuda()).last_hidden_state
        use_varlen_attention(model)
        flat = model(input_ids=packed.ids.cuda(), position_ids=packed.positions.cuda()).last_hidden_state[0]
    for i, h in enumerate(packed.split(flat)):
        torch.testing.assert_close(h.float(), padded[i, : len(cells[i])].float(), atol=3e-2, rtol=3e-2)

    corpus = write_corpus(str(tmp_path / "c"), ordered_cells(600, 150, 3, 30, seed=1), 150)
    cfg = PretrainConfig(
        corpus=corpus,
        out=str(tmp_path / "m"),
        max_steps=200,
        log_every=50,
        checkpoint_every=10**6,
        optim={"lr": 3e-3, "warmup_steps": 20},
        batch={"packed": True},
    )
    vocab = GeneVocab.load(str(tmp_path / "c_vocab.json"))
    task = MaskedGeneTask(arrow_cells(corpus_files(corpus), 0), TokenSpec.of(vocab), cfg, 0, packed=True)
    ctx = LocalContext(None, "cuda")
    lm = build_model(cfg, vocab, None)
    use_varlen_attention(lm.mlm)
    run_loop(lm, task, loop_options(cfg, {"flops_per_token": 1e6, "peak_flops": 1e15}), ctx)
    assert ctx.history[-1]["loss"] < 0.5 * ctx.history[0]["loss"]
    assert all(h["padding_fraction"] == 0.0 for h in ctx.history)


def _tiny_model_and_corpus(tmp_path):
    """(24 cells of 10-40 genes, a corpus of them with a `state` column, a `tiny` model folder)."""
    import numpy as np
    from transformers import BertForMaskedLM

    from rankformer.model.presets import bert_config, preset
    from rankformer.model.store import save_model_dir

    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 40, 24)
    cells = [np.asarray([2, *(rng.choice(60, int(k), replace=False) + 4), 3]) for k in lengths]
    states = ["A" if i % 2 else "B" for i in range(24)]
    corpus = write_corpus(str(tmp_path / "c"), cells, 60, carry={"state": states})
    vocab = GeneVocab.load(str(tmp_path / "c_vocab.json"))
    torch.manual_seed(0)
    model = str(tmp_path / "m")
    meta = {"task": "masked-lm", "layout": "v2", "max_length": 64}
    save_model_dir(BertForMaskedLM(bert_config(preset("tiny"), vocab)), vocab, meta, model)
    return cells, corpus, model


def test_perturbation_and_embeddings_on_gpu_equal_cpu(tmp_path):
    """`--use-gpu` computes what the CPU computes (float32 to 1e-4); bfloat16 on the GPU stays
    within rounding of it. One GPU run cuts each cell's variants into several batches (each
    finished on the host while the next runs on the device) and writes the per-gene table."""
    import numpy as np

    from rankformer.embed.cells import EmbedConfig, read_embeddings, run_embed
    from rankformer.perturb.job import PerturbConfig, read_results, run_perturb

    _, corpus, model = _tiny_model_and_corpus(tmp_path)
    common = {"model": model, "corpus": corpus, "in_process": True}
    perturbed, per_gene = {}, {}
    runs = (
        ("cpu", False, "float32", None),
        ("gpu", True, "float32", None),
        ("bf16", True, "bfloat16", None),
        ("gpu_small", True, "float32", 100),
    )
    for name, gpu, precision, max_tokens in runs:
        out = str(tmp_path / f"p_{name}")
        run_perturb(
            PerturbConfig(
                **common,
                out=out,
                mode="all",
                state_column="state",
                goal_state="A",
                use_gpu=gpu,
                precision=precision,
                max_tokens=max_tokens,
                per_gene=True,
            )
        )
        perturbed[name] = read_results(out).to_pandas()
        per_gene[name] = read_results(out, per_gene=True).to_pandas()
    for col in ("cell_cosine", "gene_mean_cosine", "shift_A"):
        np.testing.assert_allclose(perturbed["gpu"][col], perturbed["cpu"][col], atol=1e-4)
        np.testing.assert_allclose(perturbed["gpu_small"][col], perturbed["cpu"][col], atol=1e-4)
        np.testing.assert_allclose(perturbed["bf16"][col], perturbed["cpu"][col], atol=0.01)
    assert perturbed["gpu_small"]["perturbed"].tolist() == perturbed["cpu"]["perturbed"].tolist()
    for name in ("gpu", "gpu_small"):
        assert per_gene[name]["affected_gene"].tolist() == per_gene["cpu"]["affected_gene"].tolist()
        np.testing.assert_allclose(per_gene[name]["cosine"], per_gene["cpu"]["cosine"], atol=1e-4)
    vecs = {}
    for name, gpu in (("cpu", False), ("gpu", True)):
        run_embed(EmbedConfig(**common, out=str(tmp_path / f"e_{name}"), use_gpu=gpu))
        vecs[name] = np.stack(read_embeddings(str(tmp_path / f"e_{name}")).column("embedding").to_pylist())
    np.testing.assert_allclose(vecs["gpu"], vecs["cpu"], atol=1e-4)
    assert not torch.backends.cuda.cudnn_sdp_enabled()  # no cuDNN plan for every new batch shape


def test_queued_batches_leave_the_host_free(tmp_path):
    """Perturbation, embedding and the classifiers' predictions queue each batch on the GPU without
    our code or the model's making the host wait for the device (a blocking copy to it, `.cpu()`,
    `.item()`, a boolean mask, Transformers asking a 2-D attention mask whether it has padding...),
    so the host prepares and finishes batches while the device computes. CUDA's sync debug mode
    reports every implicit synchronisation; none may come from rankformer's or Transformers' lines.
    (Waiting on a batch's event, once its results are needed, is explicit and not reported.)"""
    import numpy as np
    from transformers import BertForSequenceClassification, BertForTokenClassification

    from rankformer.model.forward import token_probs
    from rankformer.model.presets import bert_config, preset
    from rankformer.perturb.perturber import Perturber
    from rankformer.train.finetune import cell_probs

    cells, _, model = _tiny_model_and_corpus(tmp_path)
    p = Perturber.on_demand(model, f"sqlite:///{tmp_path}/m.db", True, "float32", "penultimate", 100)
    config = bert_config(preset("tiny"), p.vocab)
    config.num_labels = 3
    kinds = (BertForSequenceClassification, BertForTokenClassification)
    heads = [kind(config).cuda().eval() for kind in kinds]
    states = {"A": np.random.default_rng(1).normal(size=int(p.model.config.hidden_size)).tolist()}
    p.configure(kind="delete", mode="all", targets=[], anchor=None, shift=0.1, per_gene=True, states=states)
    ids = [f"c{i}" for i in range(len(cells))]
    tables: list = []

    def queue_all() -> tuple:
        rows = sum(t.num_rows for t in p.scored(cells, ids, tables.append))
        vecs, _ = p.embed(cells)
        p.spec = dataclasses.replace(p.spec, level="gene")
        _, genes = p.embed(cells)
        probs = cell_probs(heads[0], cells, p.pad, 100)  # the classifiers' predictions
        sums = token_probs(heads[1], cells, p.pad, p.gene_lo, 100)
        return rows, vecs, genes, probs, sums

    rows, vecs, genes, probs, sums = _no_waits_from_our_code(queue_all)
    assert rows == sum(len(c) - 2 for c in cells)  # every gene of every cell deleted
    assert sum(t.num_rows for t in tables) > 0 and vecs.shape == (len(cells), int(p.model.config.hidden_size))
    assert int(genes.counts.sum()) == int(sums.counts.sum()) == sum(len(c) - 2 for c in cells)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


def test_the_default_budget_fits_its_memory_estimate(tmp_path):
    """On the GPU, unless given, a forward batch's tokens come from the memory free beside the
    model. A bfloat16 `geneformer-v1`-sized model perturbing every gene of a 1,000-gene cell at that
    budget allocates at its peak no more than the estimate the budget came from, for its largest
    pass, and computes what smaller passes compute."""
    import numpy as np
    from transformers import BertForMaskedLM

    from rankformer.model.budget import CPU_MAX_TOKENS, bytes_per_cell, bytes_per_token
    from rankformer.model.presets import bert_config, preset
    from rankformer.model.store import save_model_dir
    from rankformer.perturb.perturber import Perturber

    rng = np.random.default_rng(0)
    cell = np.asarray([2, *(rng.choice(1200, 1000, replace=False) + 4), 3])
    write_corpus(str(tmp_path / "c"), [cell], 1200)
    vocab = GeneVocab.load(str(tmp_path / "c_vocab.json"))
    p = preset("geneformer-v1")
    torch.manual_seed(0)
    meta = {"task": "masked-lm", "layout": "v2", "max_length": 2048}
    save_model_dir(BertForMaskedLM(bert_config(p, vocab)), vocab, meta, str(tmp_path / "m"))
    uri = f"sqlite:///{tmp_path}/m.db"
    scores = {}
    for budget in (None, CPU_MAX_TOKENS):
        worker = Perturber.on_demand(str(tmp_path / "m"), uri, True, "bfloat16", "penultimate", budget)
        worker.configure(
            kind="delete", mode="all", targets=[], anchor=None, shift=0.1, per_gene=False, states={}
        )
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        (table,) = worker.scored([cell], ["c"])
        scores[budget] = table.to_pandas()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        if budget is None:
            n = len(cell) - 1  # a deletion's length
            assert worker.max_tokens > CPU_MAX_TOKENS
            largest = min(worker.max_tokens // n, len(cell) - 2) * n
            estimate = bytes_per_token(p.hidden_size, p.intermediate_size, p.num_attention_heads, 2)
            assert peak <= estimate * largest + bytes_per_cell(p.num_attention_heads, n), (peak, largest)
        del worker
    assert len(scores[None]) == len(cell) - 2
    for col in ("cell_cosine", "gene_mean_cosine"):
        np.testing.assert_allclose(scores[None][col], scores[CPU_MAX_TOKENS][col], atol=2e-2)


def test_deletions_take_the_attention_pass_on_the_gpu_and_equal_the_plain_pass():
    """On CUDA in bfloat16 a cell's deletions take the first layer's attention as a plain pass over
    their shared rows by default; their states, and by prefix sums too, are no
    further from a float32 CPU pass than the plain bfloat16 pass on the GPU is."""
    import copy

    import numpy as np
    from transformers import BertConfig, BertModel

    from rankformer.model.deletions import SharedDeletions
    from rankformer.model.perturbations import delete_each

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=300,
        hidden_size=128,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=256,
        max_position_embeddings=512,
        hidden_act="relu",
    )
    exact = BertModel(cfg).eval()
    half = copy.deepcopy(exact).to("cuda", torch.bfloat16)
    rng = np.random.default_rng(0)
    cell = np.asarray([2, *(rng.choice(296, 200, replace=False) + 4), 3])
    ids = torch.as_tensor(np.stack(delete_each(cell, np.arange(len(cell)))))
    with torch.no_grad():
        want = exact(input_ids=ids, output_hidden_states=True).hidden_states
        plain = half(input_ids=ids.cuda(), output_hidden_states=True).hidden_states
    cell_dev = torch.from_numpy(cell).cuda()
    assert not SharedDeletions(half, cell_dev, 1).prefix_sums
    for layer in (1, 3):
        plain_err = (plain[layer].float().cpu() - want[layer]).abs().max()
        for prefix_sums in (None, True):
            got = SharedDeletions(half, cell_dev, layer, prefix_sums).states(0, len(cell)).cpu()
            assert (got - want[layer]).abs().max() <= 1.5 * plain_err, (layer, prefix_sums)


def _no_waits_from_our_code(fn):
    """``fn()`` under CUDA's sync debug mode, which reports every implicit synchronisation; fails on
    any from rankformer's or Transformers' lines (the model code we call: its 2-D attention mask asks
    the device whether it holds padding; we give the mask so that it does not). Those inside torch
    are shown in the run's warnings summary, for the record. Returns what ``fn`` returns."""
    import os
    import warnings

    import transformers

    import rankformer

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [(w.filename, w.lineno) for w in caught if "synchroniz" in str(w.message)]
    checked = [os.path.dirname(m.__file__) for m in (rankformer, transformers)]
    ours = [f"{f}:{n}" for f, n in syncs if any(os.path.abspath(f).startswith(d) for d in checked)]
    assert not ours, f"implicit synchronisations in our code or the model's: {ours} (all: {syncs})"
    if syncs:
        found = sorted(set(syncs))
        warnings.warn(f"{len(syncs)} implicit synchronisations inside torch: {found}", stacklevel=2)
    return out


def test_training_steps_leave_the_host_free(tmp_path):
    """A pretraining step and a fine-tuning step of each task (token, sequence) queue their work
    without our code or the model's making the host wait for the device: the labelled positions come
    from the host's masking, the attention mask is decided on the host, batches go through pinned
    memory, and loss, accuracy and gradient norm stay on the device until the metrics are logged. So
    the host prepares the next batch while the GPU trains."""
    import numpy as np
    from transformers import BertForSequenceClassification, BertForTokenClassification

    from rankformer.config.train import BatchOptions
    from rankformer.model.presets import bert_config, preset
    from rankformer.train.finetune import ClassifyTask, local_rows

    corpus = write_corpus(str(tmp_path / "c"), ordered_cells(200, 150, 3, 30, seed=1), 150)
    batch = BatchOptions(max_tokens=2048, max_cells=8)
    cfg = PretrainConfig(corpus=corpus, out=str(tmp_path / "m"), max_steps=3, log_every=3, batch=batch)
    vocab = GeneVocab.load(str(tmp_path / "c_vocab.json"))
    cells = ordered_cells(64, 150, 3, 30, seed=2)
    lookup = np.full(vocab.n_tokens, -100)
    lookup[10:60], lookup[60:110] = 0, 1
    config = bert_config(preset("tiny"), vocab)
    config.num_labels = 3
    pretraining = MaskedGeneTask(lambda epoch: iter(cells), TokenSpec.of(vocab), cfg, 0)
    runs = [(build_model(cfg, vocab, None), pretraining)]
    for kind, cls in (("sequence", BertForSequenceClassification), ("token", BertForTokenClassification)):
        rows = local_rows(cells, np.arange(len(cells)) % 3, 0)
        table = lookup if kind == "token" else None
        runs.append((cls(config), ClassifyTask(rows, kind, 0, batch, 0, 0, table, [1.0, 2.0, 1.0])))
    for model, task in runs:
        steps = _train_steps(model, task, LocalContext(None, "cuda"), 3)
        where = next(model.parameters()).device
        for stats in steps:
            assert all(stats[k].device == where for k in ("correct", "grad_norm", "loss"))
            assert 0 <= float(stats["correct"]) <= stats["labels"] and np.isfinite(float(stats["loss"]))


def _train_steps(model, task, ctx, n):
    """The stats of ``n`` optimizer steps of ``model`` on ``task``'s first batches, all but the first
    (which creates the optimizer's state) checked by :func:`_no_waits_from_our_code`."""
    from rankformer.config.train import FinetuneOptim
    from rankformer.train.loop import LoopOptions, _step, make_optimizer

    opts = LoopOptions(n, 0, n, n, FinetuneOptim(lr=1e-3))
    model.to(ctx.device).train()
    opt, sched = make_optimizer(model, opts.optim, opts.max_steps)
    batches = task.epoch_batches(0)
    micro = [[next(batches)] for _ in range(n)]

    def step(b):
        return _step(model, task, b, opts, ctx, opt, sched, torch.Generator())

    first = step(micro[0])
    return [first, *_no_waits_from_our_code(lambda: [step(b) for b in micro[1:]])]


def test_packed_attention_with_dropout_on_gpu_stays_within_each_cell():
    """With attention dropout (every published preset has some) packed attention on the GPU runs as
    variable-length FlashAttention over a jagged nested tensor: in eval it gives the padded states
    within bf16's precision; in training a cell's outputs depend on no other cell's inputs, and a
    training pass of a published-size layer runs."""
    from transformers import BertModel

    from rankformer.model import packing
    from rankformer.model.batching import pad_batch
    from rankformer.model.packing import pack_cells, use_varlen_attention

    torch.manual_seed(0)
    config = _small_config(hidden_size=256, intermediate_size=512, attention_probs_dropout_prob=0.1)
    model = BertModel._from_config(config, attn_implementation="sdpa").cuda()
    cells = [torch.randint(4, 60, (n,)).numpy() for n in (17, 1, 40, 5, 23)]
    ids, attn = pad_batch(cells, 0)
    packed = pack_cells(cells)
    kw = packed.attention_kwargs("cuda")
    with torch.autocast("cuda", torch.bfloat16):
        with torch.no_grad():
            padded = model.eval()(input_ids=ids.cuda(), attention_mask=attn.cuda()).last_hidden_state
        use_varlen_attention(model)
        model.train()
        query = torch.zeros(1, 4, 8, 64, device="cuda", dtype=torch.bfloat16)
        assert packing.packed_kernel(query, 0.1) == "jagged" and packing.packed_kernel(query, 0.0) == "varlen"
        embeds = model.embeddings.word_embeddings(packed.ids.cuda()).detach().requires_grad_(True)
        h = model(inputs_embeds=embeds, position_ids=packed.positions.cuda(), **kw).last_hidden_state
        s, e = int(packed.starts[2]), int(packed.starts[3])
        h[0, s:e].float().sum().backward()
        with torch.no_grad():
            model.eval()
            flat = model(
                input_ids=packed.ids.cuda(), position_ids=packed.positions.cuda(), **kw
            ).last_hidden_state[0]
    grad = embeds.grad[0].float().abs().sum(-1).cpu()
    assert (
        float(grad[:s].abs().max()) == 0.0
        and float(grad[e:].abs().max()) == 0.0
        and float(grad[s:e].min()) > 0
    )
    for i, hc in enumerate(packed.split(flat)):
        torch.testing.assert_close(hc.float(), padded[i, : len(cells[i])].float(), atol=3e-2, rtol=3e-2)


def test_packed_fine_tuning_step_on_gpu_equals_the_padded_one():
    """A packed classification step (token and sequence heads) on the GPU in bf16: the padded
    step's loss within bf16's precision."""
    import numpy as np
    from transformers import BertForSequenceClassification, BertForTokenClassification

    from rankformer.config.train import BatchOptions
    from rankformer.model.packing import use_packing
    from rankformer.train.finetune import ClassifyTask

    rng = np.random.default_rng(0)
    cells = [rng.choice(np.arange(4, 60), n, replace=False) for n in (17, 3, 40, 5, 23)]
    batch = [(c, i % 3) for i, c in enumerate(cells)]
    lookup = np.where(np.arange(60) >= 4, np.arange(60) % 3, -100)
    for cls, kind in ((BertForTokenClassification, "token"), (BertForSequenceClassification, "sequence")):
        losses = []
        for packed in (False, True):
            torch.manual_seed(0)
            config = _small_config(num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
            model = cls._from_config(config, attn_implementation="sdpa").cuda().train()
            if packed:
                use_packing(model)
            task = ClassifyTask(
                lambda e: iter(()),
                kind,
                0,
                BatchOptions(packed=packed),
                0,
                0,
                lookup if kind == "token" else None,
            )
            with torch.autocast("cuda", torch.bfloat16):
                loss, _ = task.forward(model, batch, torch.device("cuda"))
            loss.backward()
            losses.append(float(loss))
        assert losses[1] == pytest.approx(losses[0], rel=2e-2), (kind, losses)


def test_the_training_budget_probe_on_gpu(tmp_path):
    """`pretrain` on a GPU without --max-tokens: a probe step measures a token's cost, and the
    budget it gives trains without running out of memory."""
    from rankformer.train.budget import training_token_budget

    corpus = write_corpus(str(tmp_path / "c"), ordered_cells(300, 150, 3, 30, seed=1), 150)
    cfg = PretrainConfig(
        corpus=corpus, out=str(tmp_path / "m"), max_steps=3, log_every=1, checkpoint_every=10**6
    )
    vocab = GeneVocab.load(str(tmp_path / "c_vocab.json"))
    task = MaskedGeneTask(arrow_cells(corpus_files(corpus), 0), TokenSpec.of(vocab), cfg, 0)
    model = build_model(cfg, vocab, None).cuda()
    budget, said = training_token_budget(None, model, task, torch.device("cuda"), "auto", 64)
    assert budget >= 16_384 and budget & (budget - 1) == 0 and said and "KiB" in said, said
    assert all(p.grad is None for p in model.parameters())
    cfg.batch.max_tokens = budget
    ctx = LocalContext(None, "cuda")
    run_loop(model, task, loop_options(cfg, {}), ctx)
    assert len(ctx.history) == 3
