"""The Python API (tokenize_anndata, read_corpus) and the corpus inspection commands."""

from __future__ import annotations

import json
import re

import anndata as ad
import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

import rankformer
from conftest import DATA, needs_shared
from rankformer.cli import main as cli
from rankformer.cluster import serial_shards
from rankformer.config.corpus import ReadOptions, TokenizeConfig
from rankformer.corpus.inspect import corpus_stats, explain_cell
from rankformer.corpus.read import corpus_files
from rankformer.corpus.tokenize import run_tokenize
from rankformer.errors import InputError

pytestmark = needs_shared()
FILE = DATA / "pbmc_2k_celltypes.h5ad"


@pytest.fixture(scope="module")
def job_corpus(tmp_path_factory, geneformer_v2_vocab):
    out = tmp_path_factory.mktemp("api") / "corpus"
    cfg = TokenizeConfig(
        inputs=[str(FILE)],
        vocab=geneformer_v2_vocab,
        out=str(out),
        carry={"celltype": "cell_type"},
        read=ReadOptions(rows_per_shard=700),
    )
    run_tokenize(cfg, runner=serial_shards)
    return str(out)


def test_tokenize_anndata_equals_the_job(job_corpus, geneformer_v2_vocab):
    adata = ad.read_h5ad(FILE)
    table = rankformer.tokenize_anndata(adata, geneformer_v2_vocab, carry={"celltype": "cell_type"})
    job = pq.read_table(corpus_files(job_corpus))
    assert table.column_names == job.column_names
    assert table["input_ids"].to_pylist() == job["input_ids"].to_pylist()
    assert table["cell_type"].to_pylist() == job["cell_type"].to_pylist()
    # a bare CSR matrix with its gene ids, and n_counts from the matrix: same cells, own totals
    x = sp.csr_matrix(adata.X)
    bare = rankformer.tokenize_anndata(
        x[:50], rankformer.GeneVocab.load(geneformer_v2_vocab), gene_ids=list(adata.var["ensembl_id"])
    )
    sub = adata[:50].copy()
    del sub.obs["n_counts"]
    assert (
        bare["input_ids"].to_pylist()
        == rankformer.tokenize_anndata(sub, geneformer_v2_vocab)["input_ids"].to_pylist()
    )


def test_tokenize_anndata_checks_like_the_job(geneformer_v2_vocab):
    adata = ad.read_h5ad(FILE)[:20].copy()
    with pytest.raises(InputError, match="needs gene_ids"):
        rankformer.tokenize_anndata(sp.csr_matrix(adata.X), geneformer_v2_vocab)
    with pytest.raises(InputError, match="obs has no column"):
        rankformer.tokenize_anndata(adata, geneformer_v2_vocab, carry=["donor"])
    with pytest.raises(InputError, match="no such layer"):
        rankformer.tokenize_anndata(adata, geneformer_v2_vocab, counts="layers/counts")
    with pytest.raises(InputError, match=r"'gene_symbol' not found; columns are: .*Pass gene_id_column="):
        rankformer.tokenize_anndata(adata, geneformer_v2_vocab, gene_id_column="gene_symbol")
    adata.X = adata.X.astype(np.float32) / 3
    with pytest.raises(InputError, match="non-integer count"):
        rankformer.tokenize_anndata(adata, geneformer_v2_vocab)


def test_read_corpus_in_manifest_order(job_corpus):
    want = pq.read_table(corpus_files(job_corpus))["cell_id"].to_pylist()
    arrow = rankformer.read_corpus(job_corpus, engine="arrow")
    assert arrow.to_table()["cell_id"].to_pylist() == want
    assert len(arrow.files) == 3
    with pytest.raises(InputError, match="not .*sha256:nope"):
        rankformer.read_corpus(job_corpus, engine="arrow", vocab_hash="sha256:nope")


@pytest.mark.ray
def test_read_corpus_as_a_ray_dataset(job_corpus, ray_cluster, capsys):
    """In manifest order, only the columns asked for, selected inside the read (Ray Data's optimised
    plan has no projection operator of its own, which would ask for a CPU of its own)."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ds = rankformer.read_corpus(job_corpus, columns=["cell_id", "length"])
    rows = ds.take_all()
    want = pq.read_table(corpus_files(job_corpus))["cell_id"].to_pylist()
    assert [r["cell_id"] for r in rows] == want and set(rows[0]) == {"cell_id", "length"}
    capsys.readouterr()
    ds.explain()
    plans = capsys.readouterr().out
    optimised = plans.split("Logical Plan (Optimized)")[1].split("Physical Plan")[0]
    assert "Read" in optimised
    assert "Project" not in optimised, plans


def test_show_explains_the_stored_order(job_corpus, capsys):
    table = explain_cell(job_corpus, row=5)
    stored = pq.read_table(corpus_files(job_corpus)).slice(5, 1)["input_ids"].to_pylist()[0]
    assert table["token"].tolist()[: len(stored) - 2] == stored[1:-1]
    assert (np.diff(table["ranking_value"].to_numpy()) <= 0).all()
    np.testing.assert_allclose(
        table["ranking_value"],
        table["raw_count"] / table.attrs["n_counts"] * 1e4 / table["median"],
        rtol=1e-12,
    )
    cell = table.attrs["cell_id"]
    assert cli(["corpus", "show", job_corpus, "--cell", cell, "--limit", "5"]) == 0
    out = capsys.readouterr().out
    assert f"cell {cell}" in out and "<cls> at position 0" in out and "ranking_value" in out
    assert cli(["corpus", "show", job_corpus, "--cell", "no-such-cell"]) == 2


def test_show_finds_an_input_given_by_a_relative_path_from_elsewhere(
    tmp_path, monkeypatch, geneformer_v2_vocab
):
    import shutil

    (tmp_path / "data").mkdir()
    shutil.copy(FILE, tmp_path / "data" / "cells.h5ad")
    monkeypatch.chdir(tmp_path / "data")
    cfg = TokenizeConfig(inputs=["cells.h5ad"], vocab=geneformer_v2_vocab, out=str(tmp_path / "c"))
    run_tokenize(cfg, runner=serial_shards)
    monkeypatch.chdir(tmp_path)  # cells.h5ad is not here
    assert len(explain_cell(str(tmp_path / "c"), row=0)) > 0
    (tmp_path / "data" / "cells.h5ad").unlink()
    where = re.escape(f"tokenize ran in ({tmp_path / 'data'})")
    with pytest.raises(InputError, match=f"input cells.h5ad not found: .* {where}"):
        explain_cell(str(tmp_path / "c"), row=0)


def test_show_marks_truncation(tmp_path, geneformer_v2_vocab):
    out = tmp_path / "short"
    cfg = TokenizeConfig(inputs=[str(FILE)], vocab=geneformer_v2_vocab, out=str(out), max_length=12)
    run_tokenize(cfg, runner=serial_shards)
    table = explain_cell(str(out), row=0)
    assert table.attrs["kept"] == 10 and table.attrs["truncated"] == len(table) - 10 > 0


def test_stats(job_corpus, tmp_path, capsys):
    stats = corpus_stats(job_corpus, str(tmp_path / "len.png"))
    lengths = pq.read_table(corpus_files(job_corpus))["length"].to_numpy()
    assert stats["cells"] == 2000 and stats["tokens"] == int(lengths.sum())
    assert stats["length"]["median"] == float(np.median(lengths))
    assert (tmp_path / "len.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stats["vocab"]["kept"]  # the corpus holds its own vocab.json
    assert cli(["corpus", "stats", job_corpus, "--json", "--plot", str(tmp_path / "b.png")]) == 0
    assert json.loads(capsys.readouterr().out)["shards"] == 3


def test_scanpys_gene_ids_column_is_read_like_ensembl_id(job_corpus, geneformer_v2_vocab, tmp_path, capsys):
    """scanpy's 10x readers keep the Ensembl ids in var['gene_ids'] (the symbols are the var
    names): the real PBMC cells laid out that way tokenize to the same tokens, in memory and from
    an h5ad file, and the coverage line says where the ids came from."""
    adata = ad.read_h5ad(FILE)
    scanpy_like = adata.copy()
    scanpy_like.var = scanpy_like.var.rename(columns={"ensembl_id": "gene_ids"})
    job = pq.read_table(corpus_files(job_corpus))["input_ids"].to_pylist()
    in_memory = rankformer.tokenize_anndata(scanpy_like, geneformer_v2_vocab)
    assert in_memory["input_ids"].to_pylist() == job
    assert "var['gene_ids']" in capsys.readouterr().out
    path = tmp_path / "scanpy_like.h5ad"
    scanpy_like.write_h5ad(path)
    out = tmp_path / "corpus"
    run_tokenize(
        TokenizeConfig(inputs=[str(path)], vocab=geneformer_v2_vocab, out=str(out)), runner=serial_shards
    )
    assert pq.read_table(corpus_files(str(out)))["input_ids"].to_pylist() == job
