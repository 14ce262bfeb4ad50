"""The reference's arithmetic per storage kind: scipy's sparse division (reciprocal, then multiply)
for CSR h5ad, numpy's true division for dense X. Near-tied genes sort differently under the two."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from helpers import write_anndata
from rankformer.cluster import serial_shards
from rankformer.config.corpus import ReadOptions, TokenizeConfig
from rankformer.corpus.kernels import ranking_values
from rankformer.corpus.read import corpus_files
from rankformer.corpus.tokenize import run_tokenize
from rankformer.io.synth import gene_ids
from rankformer.vocab.gene_vocab import build_vocab


def _scipy_values(counts, n, med):
    """The reference's expression on a sparse matrix, evaluated by scipy itself."""
    x = sp.csr_matrix(counts[None, :]) / n.reshape(1, 1) * 10000 / med
    return np.asarray(sp.csr_matrix(x).toarray()).ravel()


def _numpy_values(counts, n, med):
    return (counts[None, :] / n.reshape(1, 1) * 10000 / med).ravel()


def _find_flip(dtype, seed=0):
    """Two genes (counts, medians) whose order differs between true division and scipy's."""
    rng = np.random.default_rng(seed)
    for _ in range(20000):
        n = np.asarray([rng.integers(2_000, 40_000)], dtype)
        c = rng.integers(1, 300, size=2).astype(dtype)
        if c[0] == c[1]:
            continue
        m0 = float(rng.uniform(0.3, 4.0))
        m1 = m0 * float(c[1]) / float(c[0])
        for k in range(-40, 41):
            med = np.asarray([m0, m1 + k * np.spacing(m1)])
            a, b = _numpy_values(c, n, med), _scipy_values(c, n, med)
            if a[0] != a[1] and b[0] != b[1] and (a[0] > a[1]) != (b[0] > b[1]):
                return c, n, med
    raise AssertionError("no flipping pair found")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sparse_and_dense_storage_follow_their_own_arithmetic(dtype, tmp_path):
    counts, n, med = _find_flip(dtype)
    sparse_vals, dense_vals = _scipy_values(counts, n, med), _numpy_values(counts, n, med)
    # our plain-numpy restatement equals what scipy and numpy compute, bit for bit
    np.testing.assert_array_equal(ranking_values(counts, n[0], med, "reciprocal"), sparse_vals)
    np.testing.assert_array_equal(ranking_values(counts, n[0], med, "divide"), dense_vals)
    ids = list(gene_ids(2))
    vocab = str(tmp_path / "v.json")
    build_vocab(ids, med.tolist()).save(vocab)  # tokens 4 and 5 (v2 specials first)
    x = sp.csr_matrix(counts[None, :].astype(dtype))
    obs = {"n_counts": n.astype(dtype)}
    csr_path = write_anndata(str(tmp_path / "csr.h5ad"), x, ids, obs)
    dense_path = str(tmp_path / "dense.h5ad")
    import anndata as ad

    a = ad.read_h5ad(csr_path)
    a.X = a.X.toarray()
    a.write_h5ad(dense_path)

    def tokens(path, out):
        cfg = TokenizeConfig(inputs=[path], vocab=vocab, out=str(tmp_path / out), read=ReadOptions())
        run_tokenize(cfg, runner=serial_shards)
        return pq.read_table(corpus_files(str(tmp_path / out)))["input_ids"].to_pylist()[0][1:-1]

    want_sparse = [4 + int(i) for i in np.argsort(-sparse_vals, kind="stable")]
    want_dense = [4 + int(i) for i in np.argsort(-dense_vals, kind="stable")]
    assert want_sparse != want_dense
    assert tokens(csr_path, "csr") == want_sparse
    assert tokens(dense_path, "dense") == want_dense
