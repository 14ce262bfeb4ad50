"""`rankformer embed`: cell and gene embeddings equal a plain one-cell-at-a-time Hugging Face forward
pass whatever the batching; shards are resumable; the actor pool gives the same numbers."""

from __future__ import annotations

import dataclasses
import os
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from transformers import BertForMaskedLM

from pretrain_helpers import write_corpus
from rankformer.embed import genes as embed_genes
from rankformer.embed import plots as embed_plots
from rankformer.embed.cells import EmbedConfig, read_embeddings, run_embed
from rankformer.errors import InputError
from rankformer.io.synth import programme_cells
from rankformer.model.presets import bert_config, preset
from rankformer.model.store import save_model_dir
from rankformer.vocab.gene_vocab import GeneVocab

N_GENES = 20 + 3 * 30


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("embed")
    cells, types, _ = programme_cells(120, 3, 30, 20, 40, seed=4)
    corpus = write_corpus(
        str(d / "corpus"), cells, N_GENES, shards=3, carry={"cell_type": [f"t{t}" for t in types]}
    )
    import json

    vocab = GeneVocab.load(json.loads((d / "corpus" / "manifest.json").read_text())["config"]["vocab"])
    torch.manual_seed(0)
    model = BertForMaskedLM(bert_config(preset("tiny", {"num_hidden_layers": 3}), vocab)).eval()
    save_model_dir(model, vocab, {"task": "masked-lm", "layout": "v2", "max_length": 64}, str(d / "model"))
    return SimpleNamespace(d=d, corpus=corpus, cells=cells, model=str(d / "model"), plain=model)


def _plain(world, cell: np.ndarray, layer: int) -> torch.Tensor:
    ids = torch.as_tensor(cell[None].astype(np.int64))
    with torch.no_grad():
        out = world.plain.bert(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    return out.hidden_states[layer][0]


@pytest.mark.parametrize(
    ("pooling", "layer", "index", "max_tokens"),
    [
        ("mean", "penultimate", 2, 16384),
        ("mean", "last", 3, 200),
        ("cls", "0", 0, 16384),
        ("mean", "1", 1, 45),
    ],
)
def test_cell_embeddings_equal_a_plain_forward(world, tmp_path, pooling, layer, index, max_tokens):
    out = tmp_path / "emb"
    run_embed(
        EmbedConfig(
            model=world.model,
            corpus=world.corpus,
            out=str(out),
            pooling=pooling,
            layer=layer,
            max_tokens=max_tokens,
            in_process=True,
        )
    )
    table = read_embeddings(str(out))
    assert table.column_names == ["cell_id", "cell_type", "embedding"]
    got = np.asarray(table.column("embedding").to_pylist(), dtype=np.float32)
    assert got.shape == (120, 32)
    for i in range(0, 120, 7):
        h = _plain(world, world.cells[i], index)
        want = h[0] if pooling == "cls" else h[1:-1].mean(0)  # gene tokens: not <cls>/<eos>
        np.testing.assert_allclose(got[i], want.numpy(), atol=1e-5)


@pytest.mark.parametrize("stat", ["mean", "median"])
def test_gene_embeddings_over_every_occurrence(world, tmp_path, stat):
    out = tmp_path / "genes"
    run_embed(
        EmbedConfig(
            model=world.model,
            corpus=world.corpus,
            out=str(out),
            level="gene",
            gene_stat=stat,
            in_process=True,
        )
    )
    table = read_embeddings(str(out)).to_pandas()
    counts = np.bincount(np.concatenate(world.cells), minlength=N_GENES + 4)
    assert len(table) == int((counts[4:] > 0).sum())
    gene = 4 + 25  # a programme gene
    states = []
    for c in world.cells:
        pos = np.flatnonzero(c == gene)
        if len(pos):
            states.append(_plain(world, c, 2)[pos])
    every = torch.cat(states)
    row = table[table.gene_id == f"ENSG{gene - 4 + 1:011d}"].iloc[0]
    assert row.n_occurrences == len(every) == counts[gene]
    want = every.mean(0) if stat == "mean" else torch.from_numpy(np.median(every.numpy(), axis=0))
    np.testing.assert_allclose(np.asarray(row.embedding), want.numpy(), atol=1e-5)


@pytest.mark.parametrize("budget", [97, 12_800])  # one gene, a few dimensions / a few genes, all
def test_gene_median_in_bounded_pieces_equals_all_at_once(world, tmp_path, monkeypatch, budget):

    def medians(out):
        cfg = EmbedConfig(
            model=world.model,
            corpus=world.corpus,
            out=str(out),
            level="gene",
            gene_stat="median",
            in_process=True,
            max_tokens=400,  # several batches a shard
        )
        run_embed(cfg)
        return read_embeddings(str(out)).to_pandas()

    whole = medians(tmp_path / "whole")
    monkeypatch.setattr(embed_genes, "MEDIAN_BUDGET_FLOATS", budget)
    # and each shard's occurrences spilled to disk every few batches, in 7 token ranges
    monkeypatch.setattr(embed_genes, "SPILL_FLOATS", 3_000)
    monkeypatch.setattr(embed_genes, "SPILL_RANGES", 7)
    monkeypatch.setattr(embed_genes, "OCC_ROW_GROUP", 50)  # the merge skips groups outside its genes
    spills = []
    spill = embed_genes.OccurrenceSpill._spill
    monkeypatch.setattr(embed_genes.OccurrenceSpill, "_spill", lambda o: (spills.append(o.held), spill(o)))
    pieces = medians(tmp_path / "pieces")
    assert pieces.gene_id.tolist() == whole.gene_id.tolist() and len(whole) > 50
    np.testing.assert_array_equal(np.stack(pieces.embedding), np.stack(whole.embedding))
    assert sum(h > 0 for h in spills) > 6  # spilled during the shards, not only at their ends
    for name in sorted(os.listdir(tmp_path / "whole")):
        if name.startswith("occurrences-"):  # the same rows in the same order
            a, b = (pq.read_table(tmp_path / d / name) for d in ("whole", "pieces"))
            assert a.num_rows > 0 and a.equals(b)
            assert pq.ParquetFile(tmp_path / "pieces" / name).num_row_groups > 10


def test_gene_median_with_shards_left_empty_by_the_selection(world, tmp_path):
    """--cells-where keeps the first shard's cells only: the other shards add nothing."""
    batch = ["x"] * 40 + ["y"] * 80
    corpus = write_corpus(str(tmp_path / "c"), world.cells, N_GENES, shards=3, carry={"batch": batch})
    out = tmp_path / "g"
    cfg = EmbedConfig(
        model=world.model,
        corpus=corpus,
        out=str(out),
        level="gene",
        gene_stat="median",
        cells_where=["batch=x"],
        in_process=True,
    )
    run_embed(cfg)
    table = read_embeddings(str(out)).to_pandas()
    counts = np.bincount(np.concatenate(world.cells[:40]), minlength=N_GENES + 4)
    assert len(table) == int((counts[4:] > 0).sum())
    assert table.n_occurrences.sum() == counts[4:].sum()


def test_a_seeded_sample_of_the_selected_cells(world, tmp_path):
    """--limit-cells: the cells `predict --limit-cells` draws with that seed, across the shards, each
    embedded as in a full run; the sample is in the manifest; a limit over the selection takes all."""
    from rankformer.job.cells import load_cells

    where = ["cell_type=t0,t2"]
    common = {"model": world.model, "corpus": world.corpus, "cells_where": where, "in_process": True}
    run_embed(EmbedConfig(**common, out=str(tmp_path / "full")))
    full = read_embeddings(str(tmp_path / "full")).to_pandas().set_index("cell_id")
    summary = run_embed(EmbedConfig(**common, out=str(tmp_path / "s"), limit_cells=13, seed=5))
    got = read_embeddings(str(tmp_path / "s")).to_pandas()
    want = load_cells(world.corpus, {"cell_type": ["t0", "t2"]}, max_cells=13, seed=5)
    assert got.cell_id.tolist() == [str(c) for c in want.column("cell_id")]
    shard_of = {f"c{i}": i * 3 // 120 for i in range(120)}  # write_corpus: 3 equal shards in order
    assert len({shard_of[c] for c in got.cell_id}) > 1
    np.testing.assert_allclose(
        np.stack(got.embedding), np.stack(full.loc[got.cell_id].embedding.to_numpy()), atol=1e-5
    )
    assert summary["sample"] == {"cells": 13, "of_selected": len(full), "seed": 5}
    run_embed(EmbedConfig(**common, out=str(tmp_path / "all"), limit_cells=1000))
    assert read_embeddings(str(tmp_path / "all")).to_pandas().cell_id.tolist() == full.index.tolist()
    with pytest.raises(InputError, match="limit_cells 0 must be >= 1"):
        EmbedConfig(**common, out="x", limit_cells=0)
    with pytest.raises(InputError, match="cell-level options; drop them with --level gene"):
        EmbedConfig(**common, out="x", level="gene", pooling="cls")
    with pytest.raises(InputError, match="gene-level option; add --level gene"):
        EmbedConfig(**common, out="x", gene_stat="median")
    no_match = {**common, "cells_where": ["cell_type=T cells"], "out": str(tmp_path / "none")}
    with pytest.raises(
        InputError, match=r"matches --cells-where cell_type in \['T cells'\]; the values there: cell_type: 't"
    ):
        run_embed(EmbedConfig(**no_match))
    assert not (tmp_path / "none").exists()  # refused before the output folder is claimed


def test_rerun_skips_finished_shards_and_refuses_other_options(world, tmp_path, capsys):
    out = tmp_path / "emb"
    cfg = EmbedConfig(model=world.model, corpus=world.corpus, out=str(out), in_process=True)
    run_embed(cfg)
    first = read_embeddings(str(out))
    os.remove(out / "part-000001.parquet")
    summary = run_embed(cfg)
    assert summary["shards_done_before"] == 2
    assert read_embeddings(str(out)).equals(first)
    with pytest.raises(InputError, match="other options"):
        run_embed(
            EmbedConfig(model=world.model, corpus=world.corpus, out=str(out), layer="last", in_process=True)
        )
    # a folder a failed run claimed but wrote nothing to is taken over by a run with other options
    claimed = tmp_path / "claimed"
    claimed.mkdir()
    (claimed / "job.json").write_text('{"job": "embed-cell", "fingerprint": "another run"}')
    run_embed(EmbedConfig(model=world.model, corpus=world.corpus, out=str(claimed), in_process=True))
    assert read_embeddings(str(claimed)).equals(first)


def test_plots_and_tracking(world, tmp_path, monkeypatch):
    """The UMAP is fitted on a bounded sample; the class means are over every cell."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setattr(embed_plots, "UMAP_CELLS", 50)

    out = tmp_path / "emb"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = EmbedConfig(
        model=world.model,
        corpus=world.corpus,
        out=str(out),
        in_process=True,
        plot_column="cell_type",
        tracking_uri=uri,
        experiment="embed",
    )
    summary = run_embed(cfg)
    assert (out / "umap.png").exists() and (out / "class_means.png").exists()
    assert summary["umap_cells"] == 50
    cells = read_embeddings(str(out)).to_pandas()
    want = pd.DataFrame(np.stack(cells["embedding"].to_numpy())).groupby(cells["cell_type"].to_numpy()).mean()
    got = pd.read_parquet(out / "class_means.parquet").set_index("cell_type")
    assert got["n_cells"].sum() == len(cells) == 120 and list(got.index) == list(want.index)
    np.testing.assert_allclose(got.iloc[:, 1:].to_numpy(), want.to_numpy(), rtol=1e-5, atol=1e-6)
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("embed").experiment_id])[0]
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert arts == {"plots/umap.png", "plots/class_means.png"}


def test_bad_input(world, tmp_path):
    foreign = write_corpus(str(tmp_path / "foreign"), [np.arange(2, 12, dtype=np.int32)] * 10, N_GENES + 3)
    with pytest.raises(InputError, match="vocabulary"):
        run_embed(EmbedConfig(model=world.model, corpus=foreign, out=str(tmp_path / "a"), in_process=True))
    with pytest.raises(InputError, match="tissue"):
        run_embed(
            EmbedConfig(model=world.model, corpus=world.corpus, out=str(tmp_path / "b"), plot_column="tissue")
        )
    with pytest.raises(InputError, match="level"):
        EmbedConfig(model=world.model, corpus=world.corpus, out="x", level="token")
    with pytest.raises(InputError, match="layer 'top' must be penultimate, last or an integer"):
        EmbedConfig(model=world.model, corpus=world.corpus, out="x", layer="top")
    for layer in ("4", "-5"):  # 3 layers: hidden_states 0..3, or -4..-1
        with pytest.raises(InputError, match=rf"layer {layer} is outside this model's hidden_states 0\.\.3"):
            run_embed(
                EmbedConfig(
                    model=world.model,
                    corpus=world.corpus,
                    out=str(tmp_path / "c"),
                    layer=layer,
                    in_process=True,
                )
            )
    assert not (tmp_path / "c").exists()  # refused at the door: no output folder started


def test_model_layout_and_positions_checked_against_the_corpus(world, tmp_path):
    """Refused at the door, from the model's metadata and config (the workers load the weights)."""
    vocab = GeneVocab.load(os.path.join(world.model, "vocab.json"))

    def model(name, positions=64, layout="v2"):
        bert = BertForMaskedLM(bert_config(preset("tiny", {"max_position_embeddings": positions}), vocab))
        save_model_dir(bert, vocab, {"task": "masked-lm", "layout": layout, "max_length": positions}, name)
        return name

    short, v1 = model(str(tmp_path / "short"), positions=32), model(str(tmp_path / "v1"), layout="v1")
    with pytest.raises(InputError, match="32 positions, fewer than the corpus max_length 64"):
        run_embed(EmbedConfig(model=short, corpus=world.corpus, out=str(tmp_path / "a"), in_process=True))
    with pytest.raises(InputError, match="is for v1 corpora; corpus .* is v2"):
        run_embed(EmbedConfig(model=v1, corpus=world.corpus, out=str(tmp_path / "b"), in_process=True))


@pytest.mark.ray
def test_actor_pool_gives_the_same_embeddings(world, tmp_path, ray_cluster):
    local = tmp_path / "local"
    run_embed(EmbedConfig(model=world.model, corpus=world.corpus, out=str(local), in_process=True))
    pooled = tmp_path / "pooled"
    run_embed(
        EmbedConfig(model=world.model, corpus=world.corpus, out=str(pooled), num_workers=2, in_process=False)
    )
    a = np.asarray(read_embeddings(str(local)).column("embedding").to_pylist())
    b = np.asarray(read_embeddings(str(pooled)).column("embedding").to_pylist())
    np.testing.assert_allclose(a, b, atol=1e-6)
    sampled = tmp_path / "sampled"  # a sample's rows travel with each shard's task
    common = {"model": world.model, "corpus": world.corpus, "limit_cells": 9, "seed": 1}
    run_embed(EmbedConfig(**common, out=str(sampled), num_workers=2, in_process=False))
    run_embed(EmbedConfig(**common, out=str(tmp_path / "sampled_here"), in_process=True))
    assert read_embeddings(str(sampled)).column("cell_id").to_pylist() == (
        read_embeddings(str(tmp_path / "sampled_here")).column("cell_id").to_pylist()
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="for a cluster without GPUs")
def test_use_gpu_on_a_ray_cluster_without_gpus(ray_cluster, monkeypatch, capsys):
    """A job asking for GPUs on a cluster with none would wait forever: an error where no
    autoscaler can add a GPU node (the test cluster), a note of what it waits for where one can."""
    from rankformer import placement

    gpu = placement.Demand("actors of the pool", 1, cpus=1.0, gpus=1.0, flags="--num-workers or --use-gpu")
    with pytest.raises(InputError, match=r"needs 1 CPU \+ 1 GPU, and no node has that.*--use-gpu"):
        placement.check_demand(gpu)
    monkeypatch.setattr(placement, "can_autoscale", lambda: True)
    placement.check_demand(gpu)
    assert "waiting for the autoscaler" in capsys.readouterr().err


def test_in_memory_api_gives_the_jobs_numbers(world, tmp_path):
    """rankformer.load_model(...).embed / .embed_genes on cells in memory: the embed job's vectors
    for the same cells (cell ids kept from a table, input order kept); bad cells named."""
    import pyarrow as pa

    import rankformer

    model = rankformer.load_model(world.model)
    assert (model.layout, model.hidden_size) == ("v2", 32)
    table = pa.table(
        {"input_ids": [c.tolist() for c in world.cells], "cell_id": [f"c{i}" for i in range(120)]}
    )
    run_embed(EmbedConfig(model=world.model, corpus=world.corpus, out=str(tmp_path / "c"), in_process=True))
    job = read_embeddings(str(tmp_path / "c")).to_pandas()
    np.testing.assert_allclose(model.embed(table), np.stack(job.embedding), atol=1e-6)
    reversed_cells = [c.tolist() for c in world.cells[::-1]]
    np.testing.assert_allclose(model.embed(reversed_cells), np.stack(job.embedding)[::-1], atol=1e-6)
    cls = model.embed(world.cells[:5], pooling="cls")
    np.testing.assert_allclose(cls[2], _plain(world, world.cells[2], 2)[0].numpy(), atol=1e-5)
    run_embed(
        EmbedConfig(
            model=world.model, corpus=world.corpus, out=str(tmp_path / "g"), level="gene", in_process=True
        )
    )
    genes = read_embeddings(str(tmp_path / "g")).to_pandas()
    got = model.embed_genes(table)
    assert got.gene_id.tolist() == genes.gene_id.tolist()
    assert got.n_occurrences.tolist() == genes.n_occurrences.tolist()
    np.testing.assert_allclose(np.stack(got.embedding), np.stack(genes.embedding), atol=1e-6)
    last = rankformer.load_model(world.model, layer="last").embed(world.cells[:1])[0]
    np.testing.assert_allclose(last, _plain(world, world.cells[0], 3)[1:-1].mean(0).numpy(), atol=1e-5)
    with pytest.raises(InputError, match="cells: cell 1 is not a list of this model's token ids"):
        model.embed([[2, 5, 3], [2, 9999, 3]])
    with pytest.raises(InputError, match="needs an 'input_ids' column"):
        model.embed(pa.table({"tokens": [[2, 5, 3]]}))
    with pytest.raises(InputError, match="more than the model's 64"):
        model.embed([[2] + [5] * 70 + [3]])
    with pytest.raises(InputError, match="layer 'top'"):
        rankformer.load_model(world.model, layer="top")
    with pytest.raises(InputError, match=r"holds the pad or mask token"):
        model.embed([[2, 5, 0, 3]])


def test_in_memory_model_tokenizes_cells_for_itself(world):
    """model.tokenize(adata) is tokenize_anndata with the model's vocabulary, layout and length;
    an AnnData or a counts matrix given where tokens are expected is named, not read as tokens."""
    import anndata as ad
    import pyarrow as pa
    import scipy.sparse as sp

    import rankformer
    from rankformer.vocab.gene_vocab import GeneVocab

    model = rankformer.load_model(world.model)
    vocab = GeneVocab.load(f"{world.model}/vocab.json")
    rng = np.random.default_rng(7)
    counts = rng.poisson(0.4, (12, 40)).astype(np.float32)
    counts[3] = 0  # no gene: dropped
    genes = list(vocab.gene_ids[:40])
    adata = ad.AnnData(X=sp.csr_matrix(counts), var=pd.DataFrame(index=genes))
    adata.obs["donor"] = [f"d{i % 3}" for i in range(12)]
    cells = model.tokenize(adata, carry=["donor"], report=False)
    want = rankformer.tokenize_anndata(
        adata, vocab, layout=model.layout, max_length=model.max_length, carry=["donor"], report=False
    )
    assert cells.equals(want) and cells.num_rows == 11 and 3 not in cells.column("source_row").to_pylist()
    assert model.embed(cells).shape == (11, model.hidden_size)
    # an AnnData is tokenized on the way: row for row with it, NaN for the cell left out
    rows = model.embed(adata)
    assert rows.shape == (12, model.hidden_size) and np.isnan(rows[3]).all()
    np.testing.assert_allclose(np.delete(rows, 3, 0), model.embed(cells), atol=1e-6)
    with pytest.raises(InputError, match="reads as counts, not token ids"):
        model.embed(counts)
    with pytest.raises(InputError, match="reads as counts"):
        model.embed(sp.csr_matrix(counts))
    with pytest.raises(TypeError, match="max_length"):  # the model's own: not a parameter
        model.tokenize(adata, max_length=10)
    assert model.embed(pa.table({"input_ids": [c.tolist() for c in world.cells[:2]]})).shape[0] == 2


def test_device_settings_and_default_token_budgets(world, tmp_path):
    """A GPU asked for where torch sees none is an error naming the fix (it used to run on the CPU
    without a word); on CUDA, attention leaves out SDPA's cuDNN backend (it builds a plan for each
    new batch shape), which tests/test_gpu.py checks; unless given, a forward batch holds more
    tokens on a GPU than on the CPU."""
    from rankformer.model.budget import CPU_MAX_TOKENS, token_budget
    from rankformer.model.device import device_token_budget, settle

    was = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    assert settle("cpu").type == "cpu" and torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(was)
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="--use-gpu: this process sees no CUDA device"):
            settle("cuda:0")
        with pytest.raises(InputError, match="--use-gpu: .* or leave --use-gpu out"):
            cfg = EmbedConfig(model=world.model, corpus=world.corpus, out=str(tmp_path / "e"), use_gpu=True)
            run_embed(dataclasses.replace(cfg, in_process=True))
    assert token_budget(None) == CPU_MAX_TOKENS and token_budget(100) == 100
    # a given budget wins on a GPU too, before its memory is asked
    assert device_token_budget(100, torch.nn.Linear(1, 1), torch.device("cuda"), 2048) == 100


def test_a_gpus_default_budget_comes_from_its_free_memory():
    """On a GPU the default tokens per forward batch is the largest power of two whose estimated
    activations fill half the free memory, between the CPU's default and 2^20: a 500-gene cell's
    deletions in one pass for v1 on an 80 GB card, fewer tokens for a wider model or a smaller card,
    never fewer than the CPU's."""
    from rankformer.model.budget import CPU_MAX_TOKENS, GPU_MAX_TOKENS, bytes_per_token, fit_budget

    v1 = {p: bytes_per_token(256, 512, 4, e) for p, e in (("bf16", 2), ("fp32", 4))}
    v2 = {p: bytes_per_token(768, 3072, 12, e) for p, e in (("bf16", 2), ("fp32", 4))}
    assert v1["bf16"] < v1["fp32"] < v2["bf16"] < v2["fp32"]
    gb = 1e9
    assert fit_budget(78 * gb, v1["bf16"]) == GPU_MAX_TOKENS >= 500 * 501
    assert fit_budget(78 * gb, v2["bf16"]) == 1 << 19
    assert fit_budget(15 * gb, v2["bf16"]) == 1 << 17
    assert fit_budget(15 * gb, v2["fp32"]) == 1 << 16
    assert fit_budget(0.1 * gb, v2["fp32"]) == fit_budget(-gb, 1) == CPU_MAX_TOKENS
    fit = fit_budget(15 * gb, v2["bf16"])
    assert fit * v2["bf16"] <= 0.5 * 15 * gb < 2 * fit * v2["bf16"]


_PEAK_GROWTH = """
import json, sys
from rankformer.perturb.job import PerturbConfig, run_perturb
model, corpus, out, budget = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
def run(tag, tokens):
    run_perturb(PerturbConfig(model=model, corpus=corpus, out=out + tag, mode="all", in_process=True,
                              max_tokens=tokens))
def status(key):  # bytes
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) * 1024
run("_warm", 2048)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak resident size starts again from the current one
before = status("VmRSS:")
run("_measured", budget)
print(json.dumps(status("VmHWM:") - before))
"""


def test_the_budgets_memory_estimate_bounds_a_perturbation_pass(tmp_path):
    """The per-token estimate the GPU's budget comes from bounds what a perturbation pass holds per
    token. Measured on CPU (the same operations; a GPU's allocator is checked in tests/test_gpu.py):
    a fresh process's peak resident memory over a pass (Linux's high-water mark, reset before it;
    `ru_maxrss` would keep the forking test process's size) grows, from a pass of 4,096 tokens to one
    of 32,768 (one 180-gene cell's deletions, `tiny`), by less than the estimate for the 28,672
    tokens between (1.4-1.6 kB a token measured, 2.5 kB estimated)."""
    import json
    import subprocess
    import sys

    from rankformer.model.budget import bytes_per_token

    rng = np.random.default_rng(0)
    cell = np.asarray([2, *(rng.choice(1000, 180, replace=False) + 4), 3])
    corpus = write_corpus(str(tmp_path / "c"), [cell], 1000)
    vocab = GeneVocab.load(str(tmp_path / "c_vocab.json"))
    p = preset("tiny")
    torch.manual_seed(0)
    model = BertForMaskedLM(bert_config(p, vocab)).eval()
    save_model_dir(
        model, vocab, {"task": "masked-lm", "layout": "v2", "max_length": 256}, str(tmp_path / "m")
    )
    growth = {}
    for budget in (4096, 32_768):
        args = [str(tmp_path / "m"), corpus, str(tmp_path / f"p{budget}"), str(budget)]
        done = subprocess.run(
            [sys.executable, "-c", _PEAK_GROWTH, *args], capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-2000:]
        growth[budget] = json.loads(done.stdout.strip().splitlines()[-1])
    per_token = (growth[32_768] - growth[4096]) / (32_768 - 4096)
    estimate = bytes_per_token(p.hidden_size, p.intermediate_size, p.num_attention_heads, 4)
    assert 0.2 * estimate < per_token < estimate, (per_token, estimate, growth)


def test_a_jobs_passes_share_one_loaded_model(world):
    """Inside `sharing_models` (an in-process perturbation's state and perturbation passes),
    embedders of the same model, device and precision share one loaded copy, each with its own
    layer; another precision, or outside the block, loads its own."""
    from dataclasses import replace

    from rankformer.embed.cells import Embedder, EmbedSpec
    from rankformer.job.actors import ModelSpec, sharing_models

    model = ModelSpec(world.model, "", use_gpu=False, layer="penultimate")
    spec = EmbedSpec(model, level="cell", pooling="mean")

    def weights(e: Embedder) -> torch.Tensor:
        return e.model.embeddings.word_embeddings.weight

    with sharing_models():
        a, b = Embedder(spec), Embedder(replace(spec, model=replace(model, layer="last")))
        c = Embedder(replace(spec, model=replace(model, precision="bfloat16")))
    d = Embedder(spec)
    assert weights(a) is weights(b) and len(a.model.encoder.layer) == 2 and len(b.model.encoder.layer) == 3
    assert weights(c) is not weights(a) and weights(c).dtype == torch.bfloat16
    assert weights(d) is not weights(a)
    cells = world.cells[:5]
    np.testing.assert_allclose(a.embed(cells)[0], d.embed(cells)[0], atol=1e-6)
