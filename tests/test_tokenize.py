"""The tokenize stage on the local two-raylet Ray cluster: outputs, manifest, reruns, faults."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from helpers import reference_rank, write_anndata
from rankformer.cli import main
from rankformer.config.corpus import ClusterOptions, ReadOptions, TokenizeConfig
from rankformer.corpus.read import corpus_files
from rankformer.corpus.tokenize import run_tokenize
from rankformer.errors import InputError
from rankformer.io.synth import SynthSpec, counts_chunk, gene_ids, write_h5ad
from rankformer.vocab.gene_vocab import build_vocab

pytestmark = [pytest.mark.ray]
N_GENES = 50


@pytest.fixture(scope="module")
def corpus_inputs(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("inputs")
    spec = SynthSpec(n_cells=90, n_genes=N_GENES, genes_per_cell=20, seed=3)
    a = str(d / "a.h5ad")
    flt = np.ones(90, np.int64)
    flt[::10] = 0
    write_h5ad(a, spec, chunk_rows=40, obs_extra={"filter_pass": flt})
    # second file: no n_counts column (totals computed from X); one cell with no vocab gene
    x, _ = counts_chunk(SynthSpec(n_cells=25, n_genes=N_GENES, genes_per_cell=20, seed=4), 0, 25)
    x = x.toarray()
    x[5] = 0
    x[5, N_GENES - 1] = 9  # only a gene outside the vocabulary
    b = write_anndata(str(d / "b.h5ad"), x, list(gene_ids(N_GENES)), obs={"cell_type": ["t"] * 25})
    medians = np.random.default_rng(0).uniform(0.5, 3.0, N_GENES - 1)
    vocab = str(d / "vocab.json")
    build_vocab(list(gene_ids(N_GENES)[:-1]), medians).save(vocab)
    return {"a": a, "b": b, "vocab": vocab}


def _config(inputs, out, **kw) -> TokenizeConfig:
    read = kw.pop("read", ReadOptions(rows_per_shard=30, chunk_rows=16))
    return TokenizeConfig(
        inputs=[inputs["a"], inputs["b"]],
        vocab=inputs["vocab"],
        out=str(out),
        carry={"cell_type": "celltype"},
        read=read,
        **kw,
    )


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_corpus_content_and_manifest(ray_cluster, corpus_inputs, tmp_path):
    out = tmp_path / "corpus"
    manifest = run_tokenize(_config(corpus_inputs, out, max_length=12))
    files = manifest["files"]
    assert files[0]["cells_in"] == 90 and files[0]["dropped_filter"] == 9
    assert files[1]["cells_in"] == 25 and files[1]["dropped_no_genes"] == 1
    assert manifest["totals"]["cells_out"] == 81 + 24
    assert len(manifest["shards"]) == 3 + 1
    table = pq.read_table(corpus_files(str(out)))
    assert table.schema.field("input_ids").type.value_type.bit_width == 32
    assert str(table.schema.field("length").type) == "int32"
    rows = table.to_pydict()
    assert rows["source_row"][:3] == [1, 2, 3]  # row 0 fails filter_pass
    assert rows["cell_id"][:2] == ["cell1", "cell2"]
    assert set(rows["celltype"][81:]) == {"t"} and rows["celltype"][0].startswith("type")
    assert all(
        ids[0] == 2 and ids[-1] == 3 and len(ids) == n <= 12
        for ids, n in zip(rows["input_ids"], rows["length"], strict=True)
    )
    assert "b.h5ad" in rows["source_file"][-1] and 5 not in rows["source_row"][81:]


def test_the_corpus_keeps_its_vocabulary(ray_cluster, corpus_inputs, tmp_path):
    """The workers and every later stage read the vocabulary from the corpus folder: a corpus
    moved elsewhere, its vocabulary file gone, still plans its pretraining and explains its cells. A corpus
    without that copy (older ones) falls back to its config's path, else a named error."""
    import shutil

    import rankformer
    from rankformer.config.train import PretrainConfig
    from rankformer.corpus.inspect import explain_cell
    from rankformer.corpus.read import corpus_vocab
    from rankformer.train.plan import plan

    given = tmp_path / "given_vocab.json"
    shutil.copy(corpus_inputs["vocab"], given)
    run_tokenize(_config({**corpus_inputs, "vocab": str(given)}, tmp_path / "corpus"))
    moved = tmp_path / "elsewhere" / "corpus"
    shutil.move(tmp_path / "corpus", moved)
    given.unlink()
    manifest = json.loads((moved / "manifest.json").read_text())
    assert corpus_vocab(str(moved)).content_hash == manifest["vocab_hash"]
    assert rankformer.corpus_vocab is corpus_vocab  # the top-level API
    track = {"tracking_uri": f"sqlite:///{tmp_path}/m.db"}
    cfg = PretrainConfig(corpus=str(moved), out=str(tmp_path / "model"), track=track)
    assert plan(cfg).vocab.content_hash == manifest["vocab_hash"]
    assert len(explain_cell(str(moved), row=0)) > 0
    (moved / "vocab.json").unlink()
    with pytest.raises(InputError, match=r"holds no vocab.json .* pass that vocabulary \(--vocab\)"):
        corpus_vocab(str(moved))
    shutil.copy(corpus_inputs["vocab"], given)
    assert corpus_vocab(str(moved)).content_hash == manifest["vocab_hash"]


def test_tokens_equal_the_plain_restatement(ray_cluster, corpus_inputs, tmp_path):
    import anndata as ad

    from rankformer.vocab.gene_vocab import GeneVocab

    out = tmp_path / "corpus"
    run_tokenize(_config(corpus_inputs, out))
    vocab = GeneVocab.load(corpus_inputs["vocab"])
    a = ad.read_h5ad(corpus_inputs["b"])
    x = a.X.toarray()
    expect = reference_rank(
        x, x.sum(axis=1), vocab.map_gene_ids(list(a.var["ensembl_id"])), vocab.median_by_token(), 4094
    )
    got = pq.read_table(corpus_files(str(out))).to_pydict()["input_ids"][81:]
    assert got == [[2, *e, 3] for e in expect if e]


def test_rerun_skips_finished_shards_and_is_byte_identical(ray_cluster, corpus_inputs, tmp_path, capsys):
    out = tmp_path / "corpus"
    run_tokenize(_config(corpus_inputs, out))
    first = _digests(out)
    run_tokenize(_config(corpus_inputs, out))
    assert "(4 already done)" in capsys.readouterr().out
    assert _digests(out) == first
    (out / "part-f00000-s000001.parquet").unlink()
    run_tokenize(_config(corpus_inputs, out))
    assert "(3 already done)" in capsys.readouterr().out
    assert _digests(out) == first


def test_worker_killed_mid_write_leaves_an_identical_corpus(
    ray_cluster, corpus_inputs, tmp_path, monkeypatch
):
    clean = tmp_path / "clean"
    run_tokenize(_config(corpus_inputs, clean))
    marker = tmp_path / "killed.txt"
    monkeypatch.setenv("RANKFORMER_FAULT_INJECT", f"before-rename:part-f00000-s000001.parquet:{marker}")
    faulty = tmp_path / "faulty"
    run_tokenize(_config(corpus_inputs, faulty))
    assert marker.exists(), "the fault was not injected"
    shards = lambda d: {k: v for k, v in _digests(d).items() if k.endswith(".parquet")}  # noqa: E731
    assert shards(faulty) == shards(clean) and len(shards(clean)) == 4
    clean_manifest = json.loads((clean / "manifest.json").read_text())
    faulty_manifest = json.loads((faulty / "manifest.json").read_text())
    assert clean_manifest["shards"] == faulty_manifest["shards"]
    assert not [n for n in os.listdir(faulty) if n.startswith(".tmp-")]


def test_output_folder_of_another_corpus_is_refused(ray_cluster, corpus_inputs, tmp_path):
    out = tmp_path / "corpus"
    run_tokenize(_config(corpus_inputs, out))
    with pytest.raises(InputError, match="holds a different corpus"):
        run_tokenize(_config(corpus_inputs, out, max_length=100))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty and holds no rankformer corpus"):
        run_tokenize(_config(corpus_inputs, foreign))


def test_bad_counts_deep_in_a_file_surface_from_the_worker(ray_cluster, tmp_path, capsys):
    x = np.ones((40, 3), np.float32)
    x[33, 1] = 2.5  # beyond the first chunk the driver checks
    path = write_anndata(str(tmp_path / "late.h5ad"), x, list(gene_ids(3)))
    vocab = str(tmp_path / "v.json")
    build_vocab(list(gene_ids(3)), [1.0, 1.0, 1.0]).save(vocab)
    code = main(
        [
            "tokenize",
            path,
            "--vocab",
            vocab,
            "--out",
            str(tmp_path / "o"),
            "--chunk-rows",
            "10",
            "--rows-per-shard",
            "20",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "late.h5ad: row 33 has a non-integer count" in err and "--allow-normalized" in err
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_two_workers_share_the_work(ray_cluster, corpus_inputs, tmp_path):
    manifest = run_tokenize(_config(corpus_inputs, tmp_path / "c", cluster=ClusterOptions(num_workers=2)))
    assert manifest["totals"]["cells_out"] == 105
