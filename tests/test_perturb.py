"""In silico perturbation: hand-worked token sequences for every type; scores equal the plain
per-variant computation; on a model pretrained on cells with planted marker genes, deleting the
markers moves cells toward the other state more than deleting other genes, and the statistics say
so; bad input is named."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import BertModel

from pretrain_helpers import pretrain_in_process, write_corpus
from rankformer.errors import InputError
from rankformer.io.synth import gene_ids
from rankformer.model.perturbations import delete_each, perturb, positions_of
from rankformer.perturb.job import PerturbConfig, read_results, run_perturb
from rankformer.perturb.stats import perturb_stats

V2 = np.array([2, 10, 11, 12, 13, 3])
V1 = np.array([10, 11, 12, 13, 14, 15])


@pytest.mark.parametrize(
    ("cell", "genes", "kind", "shift", "max_len", "want"),
    [
        (V2, [11], "delete", 0, 6, [2, 10, 12, 13, 3]),
        (V2, [11, 13], "delete", 0, 6, [2, 10, 12, 3]),
        (V2, [12], "overexpress", 0, 6, [2, 12, 10, 11, 13, 3]),
        (V2, [20], "overexpress", 0, 7, [2, 20, 10, 11, 12, 13, 3]),
        (V2, [20], "overexpress", 0, 6, [2, 20, 10, 11, 12, 3]),  # v2: the first 5 tokens + <eos>
        (V2, [10], "inhibit", 2, 6, [2, 11, 12, 10, 13, 3]),
        (V2, [12], "inhibit", 5, 6, [2, 10, 11, 13, 12, 3]),  # never past <eos>
        (V2, [13], "activate", 2, 6, [2, 10, 13, 11, 12, 3]),
        (V2, [11], "activate", 5, 6, [2, 11, 10, 12, 13, 3]),  # never before <cls>
        (V2, [10, 12], "inhibit", 1, 6, [2, 11, 10, 13, 12, 3]),
        (V1, [12], "delete", 0, 6, [10, 11, 13, 14, 15]),
        (V1, [20], "overexpress", 0, 6, [20, 10, 11, 12, 13, 14]),  # v1: the tail is cut
        (V1, [15], "activate", 2, 6, [10, 11, 12, 15, 13, 14]),
    ],
)
def test_hand_worked_perturbations(cell, genes, kind, shift, max_len, want):
    cls, eos = (2, 3) if cell[0] == 2 else (None, None)
    assert perturb(cell, genes, kind, max_len, cls, eos, shift).tolist() == want


@pytest.mark.parametrize("cell", [V2, V1])
def test_deleting_each_gene_at_once_equals_one_by_one(cell):
    cls, eos = (2, 3) if cell[0] == 2 else (None, None)
    genes = [t for t in cell.tolist() if t >= 4][::-1]
    got = delete_each(cell, positions_of(cell, genes))
    assert [g.tolist() for g in got] == [perturb(cell, [g], "delete", 6, cls, eos).tolist() for g in genes]


def _bert(layers: int) -> BertModel:
    from transformers import BertConfig

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=60,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=48,
        max_position_embeddings=64,
        hidden_act="relu",
    )
    return BertModel(cfg).eval()


@pytest.mark.parametrize("prefix_sums", [True, False], ids=["prefix-sums", "attention-pass"])
@pytest.mark.parametrize("layout", ["v1", "v2"])
def test_the_shared_first_layer_equals_each_deletions_own_forward_pass(layout, prefix_sums):
    """Runs of consecutive deletions through SharedDeletions give each deletion's plain forward
    pass at every layer, the first and the last position included, in float32 (to 1e-5) and in
    bfloat16 (no further from float32 than the plain bfloat16 pass); the first layer's attention by
    prefix sums (CPU's default) or as a plain pass over the shared rows (a GPU's)."""
    from rankformer.model.deletions import SharedDeletions, prefix_sums_on, shareable

    bert = _bert(3)
    rng = np.random.default_rng(1)
    genes = rng.choice(np.arange(4, 60), 30, replace=False)
    cell = np.asarray([2, *genes, 3] if layout == "v2" else genes, dtype=np.int64)
    runs = [(0, 1), (0, 7), (5, 9), (len(cell) - 3, 3), (len(cell) - 1, 1), (0, len(cell))]
    for layer in (1, 2, 3):
        shared = SharedDeletions(bert, torch.from_numpy(cell), layer, prefix_sums)
        assert shared.prefix_sums is prefix_sums
        for p0, count in runs:
            ids = torch.as_tensor(np.stack(delete_each(cell, np.arange(p0, p0 + count))))
            with torch.no_grad():
                want = bert(input_ids=ids, output_hidden_states=True).hidden_states[layer]
            torch.testing.assert_close(shared.states(p0, count), want, atol=1e-5, rtol=0)
    ids = torch.as_tensor(np.stack(delete_each(cell, np.arange(len(cell)))))  # every deletion
    half = _bert(3).to(torch.bfloat16)
    with torch.no_grad():
        exact = bert(input_ids=ids, output_hidden_states=True).hidden_states[3]
        plain = half(input_ids=ids, output_hidden_states=True).hidden_states[3].float()
    got = SharedDeletions(half, torch.from_numpy(cell), 3, prefix_sums).states(0, len(cell))
    assert (got - exact).abs().max() <= 1.5 * (plain - exact).abs().max()
    cpu, gpu, bf16 = torch.device("cpu"), torch.device("cuda"), torch.bfloat16
    assert prefix_sums_on(cpu, bf16) and prefix_sums_on(gpu, torch.float32)
    assert not prefix_sums_on(gpu, bf16) and not prefix_sums_on(gpu, torch.float16)
    assert shareable(bert, 2) and not shareable(bert, 0)  # layer 0: the embeddings, nothing to share
    assert not shareable(bert.train(), 2)
    with pytest.raises(ValueError, match="positions"):
        shared.states(len(cell) - 2, 3)


N_SHARED, MARKERS = 40, 3


def _cells(n: int, seed: int) -> tuple[list[np.ndarray], list[str]]:
    """Two states sharing one ranked programme (4 .. 4+N_SHARED, a few adjacent swaps); state A
    cells also hold MARKERS marker genes at random ranks."""
    rng = np.random.default_rng(seed)
    markers = np.arange(4 + N_SHARED, 4 + N_SHARED + MARKERS)
    cells, states = [], []
    for i in range(n):
        body = list(range(4, 4 + N_SHARED))
        for j in rng.integers(0, N_SHARED - 1, 4):
            body[j], body[j + 1] = body[j + 1], body[j]
        body = body[: int(rng.integers(25, N_SHARED + 1))]
        state = "A" if i % 2 == 0 else "B"
        if state == "A":
            for m in markers:
                body.insert(int(rng.integers(0, len(body) + 1)), int(m))
        cells.append(np.asarray([2, *body, 3], dtype=np.int32))
        states.append(state)
    return cells, states


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("perturb")
    cells, states = _cells(400, 0)
    n_genes = N_SHARED + MARKERS
    corpus = write_corpus(str(d / "corpus"), cells, n_genes, shards=2, carry={"state": states}, symbols=True)
    model = pretrain_in_process(corpus, str(d / "model"), 1000)
    small = write_corpus(
        str(d / "small"), cells[:24], n_genes, shards=2, carry={"state": states[:24]}, symbols=True
    )
    return SimpleNamespace(
        d=d, corpus=corpus, small=small, model=model, cells=cells, states=states, ids=gene_ids(n_genes)
    )


def _delete_every_gene(world, out, **kw) -> dict:
    """Every gene of each state-A cell of the small corpus deleted, shifts toward state B."""
    kw.setdefault("in_process", True)
    return run_perturb(
        PerturbConfig(
            model=world.model,
            corpus=world.small,
            out=str(out),
            mode="all",
            state_column="state",
            start_state="A",
            goal_state="B",
            **kw,
        )
    )


def test_scores_equal_the_plain_per_variant_computation(world, tmp_path, monkeypatch):
    from rankformer.model.deletions import SharedDeletions

    shared_runs = []
    states_of = SharedDeletions.states

    def counted(self, p0, n):
        shared_runs.append(n)
        return states_of(self, p0, n)

    monkeypatch.setattr(SharedDeletions, "states", counted)
    out = tmp_path / "p"
    _delete_every_gene(world, out, per_gene=True, max_tokens=300)
    assert len(shared_runs) > 12  # several batches a cell, each through the shared first layer
    rows = read_results(str(out)).to_pandas()
    per_gene = read_results(str(out), per_gene=True).to_pandas()
    bert = BertModel.from_pretrained(world.model).eval()

    def states(cell):
        ids = torch.as_tensor(np.asarray(cell, dtype=np.int64)[None])
        with torch.no_grad():
            return bert(input_ids=ids, output_hidden_states=True).hidden_states[1][0]  # penultimate of 2

    def pooled(cell):
        return states(cell)[1:-1].mean(0)

    cos = torch.nn.functional.cosine_similarity
    goal = torch.stack(
        [pooled(c) for c, s in zip(world.cells[:24], world.states[:24], strict=True) if s == "B"]
    ).mean(0)
    a_cells = [i for i in range(24) if world.states[i] == "A"]
    assert set(rows.cell_id) == {f"c{i}" for i in a_cells}  # only the start state's cells
    for i in a_cells[:3]:
        cell = world.cells[i]
        h0 = states(cell)
        for g in cell[1:-1][::9].tolist():
            variant = np.asarray([t for t in cell if t != g])
            h1 = states(variant)
            gid = world.ids[g - 4]
            row = rows[(rows.cell_id == f"c{i}") & (rows.perturbed.map(tuple) == (gid,))].iloc[0]
            assert row["rank"] == list(cell[1:-1]).index(g)
            assert row.cell_cosine == pytest.approx(
                float(cos(h0[1:-1].mean(0), h1[1:-1].mean(0), dim=0)), abs=1e-5
            )
            pos0 = {t: p for p, t in enumerate(cell.tolist())}
            pos1 = {t: p for p, t in enumerate(variant.tolist())}
            common = [t for t in cell[1:-1].tolist() if t != g]
            gc = cos(h0[[pos0[t] for t in common]], h1[[pos1[t] for t in common]], dim=-1)
            assert row.gene_mean_cosine == pytest.approx(float(gc.mean()), abs=1e-5)
            want = float(cos(h1[1:-1].mean(0), goal, dim=0) - cos(h0[1:-1].mean(0), goal, dim=0))
            assert row.shift_B == pytest.approx(want, abs=1e-5)
            mine = per_gene[(per_gene.cell_id == f"c{i}") & (per_gene.perturbed.map(tuple) == (gid,))]
            np.testing.assert_allclose(mine.cosine.to_numpy(), gc.numpy(), atol=1e-5)


def test_a_seeded_sample_of_the_start_state_cells(world, tmp_path):
    """--limit-cells samples among the selected (start-state) cells, the sample `predict` draws;
    their rows equal the full run's; the state embeddings still use every cell of each state."""
    from rankformer.job.cells import load_cells

    _delete_every_gene(world, tmp_path / "full")
    summary = _delete_every_gene(world, tmp_path / "s", limit_cells=4, seed=2)
    want = load_cells(world.small, {"state": ["A"]}, max_cells=4, seed=2).column("cell_id")
    got = read_results(str(tmp_path / "s")).to_pandas()
    assert list(dict.fromkeys(got.cell_id)) == [str(c) for c in want]
    full = read_results(str(tmp_path / "full")).to_pandas()
    full = full[full.cell_id.isin(got.cell_id)]
    for col in ("cell_cosine", "gene_mean_cosine", "shift_B"):
        np.testing.assert_allclose(got[col], full[col], atol=1e-5)
    n_a = sum(s == "A" for s in world.states[:24])
    assert summary["sample"] == {"cells": 4, "of_selected": n_a, "seed": 2}
    states = [json.loads((tmp_path / d / "states.json").read_text()) for d in ("full", "s")]
    assert states[0] == states[1]


def test_rows_stream_out_in_windows_and_row_groups(world, tmp_path, monkeypatch):
    """Scored a few cells at a time and written a few rows at a time: the same rows, same order."""
    import pyarrow.parquet as pq

    import rankformer.perturb.perturber as perturber
    import rankformer.perturb.rows as perturb_rows

    _delete_every_gene(world, tmp_path / "whole", per_gene=True)
    monkeypatch.setattr(perturber, "WINDOW_CELLS", 5)
    monkeypatch.setattr(perturber, "WINDOW_TOKENS", 60)
    monkeypatch.setattr(perturb_rows, "FLUSH_ROWS", 37)
    added: list[int] = []  # per-gene tables reach the writer batch by batch, not a cell at a time
    add_table = perturb_rows.RowWriter.add_table
    monkeypatch.setattr(
        perturb_rows.RowWriter, "add_table", lambda w, t: (added.append(t.num_rows), add_table(w, t))
    )
    summary = _delete_every_gene(world, tmp_path / "pieces", per_gene=True, max_tokens=120)
    for per_gene in (False, True):
        a = read_results(str(tmp_path / "whole"), per_gene=per_gene).to_pandas()
        b = read_results(str(tmp_path / "pieces"), per_gene=per_gene).to_pandas()
        assert len(a) == len(b) > 200 and list(a.columns) == list(b.columns)
        for col in a.columns:
            if a[col].dtype == float:  # batches differ between the runs: the same up to rounding
                np.testing.assert_allclose(a[col], b[col], atol=1e-6)
            else:
                assert a[col].map(str).tolist() == b[col].map(str).tolist()
    assert pq.ParquetFile(tmp_path / "pieces" / "part-000000.parquet").num_row_groups > 3
    per_gene_parts = len(added) - summary["cells_this_run"]  # the rest: one row table per cell
    assert per_gene_parts > 2 * summary["cells_this_run"] and max(added) <= 120


def test_windows_bound_cells_and_tokens():
    from rankformer.perturb.parts import windows

    assert list(windows([10] * 7, 3, 1000)) == [(0, 3), (3, 6), (6, 7)]
    assert list(windows([10, 10, 10, 50, 10], 10, 30)) == [(0, 3), (3, 4), (4, 5)]  # a long cell alone
    assert list(windows([], 3, 30)) == []


def test_deleting_planted_markers_moves_cells_toward_the_other_state(world, tmp_path):
    out = tmp_path / "all"
    run_perturb(
        PerturbConfig(
            model=world.model,
            corpus=world.corpus,
            out=str(out),
            mode="all",
            state_column="state",
            start_state="A",
            goal_state="B",
            cells_where=[],
            in_process=True,
        )
    )
    stats = perturb_stats(str(out), goal_state="B").set_index("perturbed")
    markers = list(world.ids[N_SHARED : N_SHARED + MARKERS])
    assert stats.loc[markers, "symbol"].tolist() == [f"G{i}" for i in range(N_SHARED, N_SHARED + MARKERS)]
    others = stats.drop(index=markers)
    assert stats.loc[markers, "significant"].all()
    assert (stats.loc[markers, "effect_mean"] > stats.loc[markers, "null_effect_mean"]).all()
    assert stats.loc[markers, "effect_mean"].min() > others["effect_mean"].median()
    assert stats.loc[markers, "effect_mean"].mean() > 2 * others["effect_mean"].mean()
    assert (out / "stats.csv").exists() and (out / "stats.png").exists()


def test_overexpress_and_combinations(world, tmp_path):
    markers = list(world.ids[N_SHARED : N_SHARED + MARKERS])
    out = tmp_path / "ox"
    run_perturb(
        PerturbConfig(
            model=world.model,
            corpus=world.small,
            out=str(out),
            kind="overexpress",
            genes=markers,
            mode="together",
            state_column="state",
            start_state="B",
            goal_state="A",
            in_process=True,
        )
    )
    rows = read_results(str(out)).to_pandas()
    assert len(rows) == 12 and all(list(p) == markers for p in rows.perturbed)
    assert rows.shift_A.mean() > 0  # B cells given A's markers move toward A
    anchor = tmp_path / "anchor"
    run_perturb(
        PerturbConfig(
            model=world.model,
            corpus=world.small,
            out=str(anchor),
            genes=list(world.ids[:3]),
            anchor=markers[0],
            in_process=True,
        )
    )
    rows = read_results(str(anchor)).to_pandas()
    assert {tuple(p) for p in rows.perturbed} == {(markers[0], g) for g in world.ids[:3]}
    stats = perturb_stats(str(anchor)).set_index("perturbed")
    assert stats.symbol.to_dict() == {
        f"{markers[0]},{g}": f"G{N_SHARED},G{i}" for i, g in enumerate(world.ids[:3])
    }
    assert set(rows.cell_id) <= {f"c{i}" for i in range(24) if world.states[i] == "A"}  # the anchor's cells


def test_bfloat16_scores_stay_close_to_float32(world, tmp_path):
    """The reduced-precision option (for GPUs, and CPUs with bfloat16 units) moves the scores by
    rounding only: same rows, scores within 0.005 (they span ~0.1), correlation above 0.999."""
    runs = {}
    for precision in ("float32", "bfloat16"):
        out = tmp_path / precision
        _delete_every_gene(world, out, precision=precision)
        runs[precision] = read_results(str(out)).to_pandas()
    a, b = runs["float32"], runs["bfloat16"]
    assert list(a.cell_id) == list(b.cell_id) and list(a.perturbed.map(tuple)) == list(b.perturbed.map(tuple))
    for col in ("cell_cosine", "gene_mean_cosine", "shift_B"):
        np.testing.assert_allclose(b[col], a[col], atol=0.005)
        assert np.corrcoef(a[col], b[col])[0, 1] > 0.999
    assert not np.array_equal(a.shift_B, b.shift_B)  # it did run in bfloat16


def test_bad_input(world, tmp_path, monkeypatch, capsys):
    import gc
    import shutil
    import tempfile

    staging = tempfile.mkdtemp()
    monkeypatch.setattr(tempfile, "tempdir", staging)

    def run(**kw):
        base = {
            "model": world.model,
            "corpus": world.small,
            "out": str(tmp_path / f"o{len(list(tmp_path.iterdir()))}"),
        }
        return run_perturb(PerturbConfig(**{**base, "in_process": True, **kw}))

    summary = run(genes=[f"{world.ids[0]},NOT_A_GENE"])  # a comma-separated list is a list
    assert summary["genes_not_in_vocabulary"] == ["NOT_A_GENE"]
    assert "not in the vocabulary, skipped: NOT_A_GENE (manifest" in capsys.readouterr().out
    with pytest.raises(InputError, match="NOT_A_GENE"):
        run(genes=[world.ids[0], "NOT_A_GENE"], missing="error")
    with pytest.raises(InputError, match="without genes"):
        run(genes=list(world.ids), mode="together")
    before = set(os.listdir(tmp_path))
    with pytest.raises(
        InputError, match=r"no cell of state\(s\) \['C'\] in column 'state'; its states \(cells\): '"
    ):
        run(mode="all", state_column="state", goal_state="C")
    assert set(os.listdir(tmp_path)) == before  # refused before the output folder is claimed
    with pytest.raises(InputError, match="--state-column 'cond': no such column in corpus"):
        run(mode="all", state_column="cond", goal_state="B")
    foreign = write_corpus(str(tmp_path / "foreign"), [np.arange(2, 12, dtype=np.int32)] * 10, 7)
    with pytest.raises(InputError, match="vocabulary"):
        run(genes=[world.ids[0]], corpus=foreign)
    with pytest.raises(InputError, match="--state-column"):
        PerturbConfig(model="m", corpus="c", out="o", mode="all", goal_state="B")
    with pytest.raises(InputError, match="float16 needs --use-gpu"):
        PerturbConfig(model="m", corpus="c", out="o", mode="all", precision="float16")
    with pytest.raises(InputError, match="precision 'float64'"):
        PerturbConfig(model="m", corpus="c", out="o", mode="all", precision="float64")
    with pytest.raises(InputError, match="layer 'top'"):
        PerturbConfig(model="m", corpus="c", out="o", mode="all", layer="top")
    with pytest.raises(InputError, match="num_workers 0 must be >= 1"):
        PerturbConfig(model="m", corpus="c", out="o", mode="all", num_workers=0)
    with pytest.raises(InputError, match="max_tokens 0 must be >= 1"):
        PerturbConfig(model="m", corpus="c", out="o", mode="all", max_tokens=0)
    with pytest.raises(InputError, match="layer 99 is outside this model's hidden_states"):
        run(mode="all", layer="99")
    manifest = json.loads((tmp_path / "o0" / "manifest.json").read_text())
    assert manifest["job"] == "perturb"
    # reading results (and `perturb stats`) needs a finished perturbation output
    with pytest.raises(InputError, match=r"kept no per-gene table; rerun it with --per-gene"):
        read_results(str(tmp_path / "o0"), per_gene=True)
    with pytest.raises(InputError, match=r"no finished `perturb` output: no rankformer job wrote there"):
        read_results(str(tmp_path / "nothing"))
    for job, name in (("perturb", "started"), ("embed-cell", "embedded")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "job.json").write_text(json.dumps({"job": job}))
    (tmp_path / "embedded" / "manifest.json").write_text(json.dumps({"job": "embed-cell", "shards": []}))
    with pytest.raises(InputError, match=r"has not finished \(it is running, or it failed: rerun it"):
        read_results(str(tmp_path / "started"))
    with pytest.raises(InputError, match=r"holds the output of `embed-cell`, not of `perturb`"):
        read_results(str(tmp_path / "embedded"))
    gc.collect()
    assert not os.listdir(staging)  # failed jobs leave no staged files behind
    shutil.rmtree(staging)


@pytest.mark.ray
def test_a_gpu_out_of_memory_names_the_fix(world, tmp_path, monkeypatch):
    """A device out of memory in a forward pass (raised here on CPU, as torch raises it) stops a
    perturbation or embedding job with an error naming the budget and a smaller one to give."""
    from rankformer.embed.cells import EmbedConfig, run_embed

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0)")

    monkeypatch.setattr("rankformer.model.forward.hidden_states", out_of_memory)
    common = {"model": world.model, "corpus": world.corpus, "in_process": True}
    fix = r"give --max-tokens \(max_tokens= in Python\) {} or fewer, or free the GPU \(CUDA out of memory"
    with pytest.raises(InputError, match=r"up to 16,384 tokens: " + fix.format(8192)):
        run_perturb(PerturbConfig(**common, out=str(tmp_path / "p"), mode="all"))
    with pytest.raises(InputError, match=r"up to 100 tokens: " + fix.format(50)):
        run_embed(EmbedConfig(**common, out=str(tmp_path / "e"), max_tokens=100))


def test_actor_pool_and_rerun_give_the_same_scores(world, tmp_path, ray_cluster):
    """On a pool of 2 Ray actors (state embeddings and perturbations alike) the scores equal the
    in-process run's; a rerun after a lost shard redoes that shard only, with the kept states."""
    local, pooled = tmp_path / "local", tmp_path / "pooled"
    _delete_every_gene(world, local)
    _delete_every_gene(world, pooled, num_workers=2, in_process=False)
    cols = ["cell_cosine", "gene_mean_cosine", "shift_B"]
    a, b = read_results(str(local)).to_pandas(), read_results(str(pooled)).to_pandas()
    assert a.cell_id.tolist() == b.cell_id.tolist() and len(a) > 100
    np.testing.assert_allclose(a[cols].to_numpy(), b[cols].to_numpy(), atol=1e-6)
    kept = json.loads((pooled / "states.json").read_text())
    np.testing.assert_allclose(kept["B"], json.loads((local / "states.json").read_text())["B"], atol=1e-6)
    os.remove(pooled / "part-000001.parquet")
    summary = _delete_every_gene(world, pooled, num_workers=2, in_process=False)
    assert summary["shards_done_before"] == 1
    assert json.loads((pooled / "states.json").read_text()) == kept
    c = read_results(str(pooled)).to_pandas()
    np.testing.assert_allclose(c[cols].to_numpy(), b[cols].to_numpy(), atol=1e-6)


def test_in_memory_api_gives_the_jobs_numbers(world, tmp_path):
    """rankformer.load_model(...).state_embeddings / .perturb / .perturb_stats on cells in memory:
    the perturb job's state embeddings, rows and statistics for the same cells."""
    import pyarrow as pa

    import rankformer
    from rankformer.corpus.read import read_corpus

    _delete_every_gene(world, tmp_path / "job")
    job_states = json.loads((tmp_path / "job" / "states.json").read_text())
    job = read_results(str(tmp_path / "job")).to_pandas()
    model = rankformer.load_model(world.model)
    small = read_corpus(world.small, engine="arrow").to_table()
    states = model.state_embeddings(small, small.column("state"))
    assert sorted(states) == ["A", "B"]
    for s in ("A", "B"):
        np.testing.assert_allclose(states[s], job_states[s], atol=1e-6)
    a_cells = small.filter(pa.compute.equal(small.column("state"), "A"))
    rows = model.perturb(a_cells, mode="all", states={"B": states["B"], "A": states["A"]})
    assert list(rows.columns) == [*job.columns[:5], "shift_B", "shift_A"]
    key = ["cell_id", "perturbed"]
    got = rows.assign(perturbed=rows.perturbed.map(tuple)).set_index(key).sort_index()
    want = job.assign(perturbed=job.perturbed.map(tuple)).set_index(key).sort_index()
    assert got.index.equals(want.index)
    for col in ("rank", "cell_cosine", "gene_mean_cosine", "shift_B"):
        np.testing.assert_allclose(got[col], want[col], atol=1e-5)
    stats = model.perturb_stats(rows, goal_state="B").set_index("perturbed")
    job_stats = perturb_stats(str(tmp_path / "job"), goal_state="B").set_index("perturbed")
    np.testing.assert_allclose(stats.loc[job_stats.index, "p_value"], job_stats.p_value, rtol=1e-6)
    assert stats.symbol.to_dict() == job_stats.symbol.to_dict()
    marker = world.ids[N_SHARED]
    with pytest.warns(UserWarning, match="not in the model's vocabulary, skipped: NOPE"):
        rows, genes = model.perturb(a_cells, [f"G{N_SHARED}", "NOPE"], per_gene=True)  # a symbol works
    assert {tuple(p) for p in rows.perturbed} == {(marker,)}
    assert rows.attrs["genes_not_in_vocabulary"] == ["NOPE"]
    assert set(genes.perturbed.map(tuple)) == {(marker,)} and len(genes) > len(rows)
    with pytest.raises(InputError, match="states: \\['B'\\] are not vectors of"):
        model.perturb(a_cells, [marker], states={"B": [0.0, 1.0]})
    with pytest.raises(InputError, match="kind 'knockout'"):
        model.perturb(a_cells, [marker], kind="knockout")
    with pytest.raises(InputError, match="NOPE"):
        model.perturb(a_cells, ["NOPE"], missing="error")


def test_state_embeddings_from_a_capped_sample_of_each_state(world, tmp_path):
    """--state-cells N: each state's embedding is the mean of N of its cells (checked against every
    N-subset of the state's cell vectors), the same for the same seed; no cap above a state's size."""
    from itertools import combinations

    import rankformer
    from rankformer.corpus.read import read_corpus

    def states(out, **kw):
        cfg = {"model": world.model, "corpus": world.small, "out": str(tmp_path / out), "in_process": True}
        run_perturb(PerturbConfig(**cfg, genes=[world.ids[0]], state_column="state", goal_state="B", **kw))
        return {k: np.asarray(v) for k, v in json.loads((tmp_path / out / "states.json").read_text()).items()}

    small = read_corpus(world.small, engine="arrow").to_table()
    labels = np.asarray(small.column("state").to_pylist())
    vecs = rankformer.load_model(world.model).embed(small).astype(np.float64)
    full = states("full")
    assert all(np.allclose(states("big", state_cells=1000)[s], full[s], atol=1e-12) for s in full)
    capped = states("capped", state_cells=3, seed=4)
    for s, v in capped.items():
        members = vecs[labels == s]
        assert len(members) > 3 and not np.allclose(v, full[s], atol=1e-6)
        assert any(
            np.allclose(v, members[list(c)].mean(0), atol=1e-6) for c in combinations(range(len(members)), 3)
        )
    again = states("again", state_cells=3, seed=4)
    assert all(np.array_equal(again[s], capped[s]) for s in capped)
    with pytest.raises(InputError, match="state_cells 0 must be >= 1"):
        PerturbConfig(model="m", corpus="c", out="o", mode="all", state_column="state", state_cells=0)
