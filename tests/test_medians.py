"""Exact medians: every case against numpy.median of the concatenated nonzero values."""

import numpy as np
import pytest
import scipy.sparse as sp

from helpers import write_anndata
from rankformer.cluster import serial_shards
from rankformer.config.corpus import ReadOptions, VocabBuildConfig
from rankformer.corpus.medians import run_vocab_build
from rankformer.errors import InputError
from rankformer.io.synth import SynthSpec, write_h5ad

IDS = [f"ENSG{i:011d}" for i in range(1, 7)]


def _numpy_medians(paths, n_genes):
    import anndata as ad

    vals = {i: [] for i in range(n_genes)}
    for p in paths:
        a = ad.read_h5ad(p)
        x = sp.csr_matrix(a.X)
        n = a.obs["n_counts"].to_numpy() if "n_counts" in a.obs else np.asarray(x.sum(axis=1)).ravel()
        coo = x.tocoo()
        for r, c, d in zip(coo.row, coo.col, coo.data, strict=True):
            if d:
                vals[c].append(d / n[r] * 10000)
    return {i: np.median(v) for i, v in vals.items() if v}


def _build(paths, tmp_path, **kw):
    read = ReadOptions(rows_per_shard=kw.pop("rows_per_shard", 7), chunk_rows=3)
    cfg = VocabBuildConfig(inputs=[str(p) for p in paths], out=str(tmp_path / "v.json"), read=read, **kw)
    return run_vocab_build(cfg, runner=serial_shards)


@pytest.mark.parametrize("collect_limit,bins", [(4096, 1024), (2, 16), (3, 17)])
def test_medians_equal_numpy_on_synthetic_corpus(tmp_path, collect_limit, bins):
    paths = []
    for seed in (1, 2):
        p = str(tmp_path / f"s{seed}.h5ad")
        write_h5ad(p, SynthSpec(n_cells=40, n_genes=30, genes_per_cell=12, seed=seed), chunk_rows=13)
        paths.append(p)
    v = _build(paths, tmp_path, collect_limit=collect_limit, histogram_bins=bins)
    ref = _numpy_medians(paths, 30)
    got = dict(zip(v.gene_ids, v.medians.tolist(), strict=True))
    assert len(got) == len(ref)
    for i, m in ref.items():
        assert got[f"ENSG{i + 1:011d}"] == m  # exact, not approximately
    if collect_limit == 2:
        assert v.provenance["passes"] > 2  # refine passes ran


def test_even_count_with_middle_values_far_apart_and_many_ties(tmp_path):
    # gene 0: 10 x value 1 and 10 x value 1000 (middle ranks in bins far apart, forcing separate
    # searches); gene 1: 30 identical values (an interval that cannot split); gene 2: one cell.
    rows = []
    for i in range(20):
        rows.append([1 if i < 10 else 1000, 7, 0])
    for _ in range(10):
        rows.append([0, 7, 0])
    rows.append([0, 0, 3])
    x = np.asarray(rows)
    n = np.full(len(rows), 10000)
    path = write_anndata(str(tmp_path / "t.h5ad"), x, IDS[:3], obs={"n_counts": n})
    v = _build([path], tmp_path, collect_limit=2, histogram_bins=16)
    got = dict(zip(v.gene_ids, v.medians.tolist(), strict=True))
    norm = lambda c: c / 10000 * 10000  # noqa: E731 - the same float64 operations
    assert got[IDS[0]] == np.median([norm(1)] * 10 + [norm(1000)] * 10) == 500.5
    assert got[IDS[1]] == norm(7)
    assert got[IDS[2]] == norm(3) != 3.0


def test_min_cells_leaves_rare_genes_out(tmp_path):
    x = np.array([[1, 2, 0], [1, 0, 0], [3, 0, 0]])
    path = write_anndata(str(tmp_path / "t.h5ad"), x, IDS[:3])
    v = _build([path], tmp_path, min_cells=2)
    assert v.gene_ids == (IDS[0],)  # gene 1 in one cell, gene 2 never expressed
    v = _build([path], tmp_path, min_cells=1)
    assert v.gene_ids == (IDS[0], IDS[1])


def test_symbols_map_through_a_gene_table(tmp_path):
    x = np.array([[1, 2, 5], [1, 4, 0]])
    path = write_anndata(str(tmp_path / "t.h5ad"), x, ["CD3E", "LYZ", "OLDNAME"], id_column="symbol")
    table = tmp_path / "genes.csv"
    table.write_text(f"{IDS[0]},CD3E\n{IDS[1]},LYZ\n")
    read = ReadOptions(gene_id_column="symbol", gene_table=str(table))
    cfg = VocabBuildConfig(inputs=[path], out=str(tmp_path / "v.json"), read=read)
    v = run_vocab_build(cfg, runner=serial_shards)
    assert v.gene_ids == (IDS[0], IDS[1])
    assert v.map_gene_ids(["cd3e", "LYZ"]).tolist() == [4, 5]
    assert v.gene_names == {IDS[0]: "CD3E", IDS[1]: "LYZ"}


def test_symbols_without_a_table_are_an_error_saying_so(tmp_path):
    x = np.array([[1, 2, 5]])
    path = write_anndata(str(tmp_path / "t.h5ad"), x, ["CD3E", "LYZ", "MS4A1"])
    with pytest.raises(InputError, match="gene symbols .* --gene-table"):
        _build([path], tmp_path)
