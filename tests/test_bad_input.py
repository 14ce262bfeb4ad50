"""Bad input: each a clear error naming the file or field and the fix, and nothing written."""

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

from helpers import write_anndata
from rankformer.cluster import serial_shards
from rankformer.config.corpus import ReadOptions, TokenizeConfig
from rankformer.corpus.tokenize import run_tokenize
from rankformer.errors import InputError, VocabError
from rankformer.io.synth import gene_ids
from rankformer.vocab.gene_vocab import V1_SPECIALS, build_vocab

IDS = list(gene_ids(4))


@pytest.fixture
def vocab(tmp_path):
    path = str(tmp_path / "vocab.json")
    build_vocab(IDS, [1.0, 2.0, 3.0, 4.0]).save(path)
    return path


def _tokenize(tmp_path, path, vocab, **kw):
    read = kw.pop("read", ReadOptions())
    out = tmp_path / "out"
    cfg = TokenizeConfig(inputs=[str(path)], vocab=vocab, out=str(out), read=read, **kw)
    try:
        run_tokenize(cfg, runner=serial_shards)
    finally:
        assert not out.exists() or not os.listdir(out), "something was written"


def _h5ad(tmp_path, x=None, ids=IDS, **kw):
    x = np.array([[1, 2, 0, 3], [0, 1, 1, 0]]) if x is None else x
    return write_anndata(str(tmp_path / "in.h5ad"), x, ids, **kw)


def test_missing_gene_id_column_lists_the_columns(tmp_path, vocab):
    # (a `gene_ids` column of Ensembl ids is scanpy's layout and is read: tests/test_api.py)
    path = _h5ad(tmp_path, id_column="feature_id")
    with pytest.raises(
        InputError,
        match=r"gene-id column 'ensembl_id' not found; columns are: "
        r"\['feature_id'\].*--gene-id-column",
    ):
        _tokenize(tmp_path, path, vocab)


def test_all_ids_empty(tmp_path, vocab):
    path = _h5ad(tmp_path, ids=["", "", "", ""])
    with pytest.raises(InputError, match="every gene id in column 'ensembl_id' is empty"):
        _tokenize(tmp_path, path, vocab)


@pytest.mark.parametrize(
    "ids,kind",
    [
        (["CD3E", "LYZ", "MS4A1", "NKG7"], "gene symbols"),
        ([f"ENSMUSG{i:011d}" for i in range(4)], "mouse Ensembl"),
    ],
)
def test_ids_of_the_wrong_kind(tmp_path, vocab, ids, kind):
    path = _h5ad(tmp_path, ids=ids)
    with pytest.raises(InputError, match=f"only 0.0% of counts map .* look like {kind}"):
        _tokenize(tmp_path, path, vocab)


def test_no_cells_and_no_genes(tmp_path, vocab):
    with pytest.raises(InputError, match="holds no cells"):
        _tokenize(tmp_path, _h5ad(tmp_path, x=np.zeros((0, 4))), vocab)
    with pytest.raises(InputError, match="holds no genes"):
        _tokenize(tmp_path, _h5ad(tmp_path, x=np.zeros((3, 0)), ids=[]), vocab)


@pytest.mark.parametrize(
    "value,what", [(-1.0, "a negative count"), (np.nan, "a NaN or infinite"), (2.5, "a non-integer count")]
)
def test_bad_counts_name_file_and_row(tmp_path, vocab, value, what):
    x = np.array([[1, 2, 0, 3], [0, 1, 1, 0]], np.float32)
    x[1, 2] = value
    path = _h5ad(tmp_path, x=x)
    with pytest.raises(InputError, match=f"in.h5ad: row 1 has {what}"):
        _tokenize(tmp_path, path, vocab)


def test_integer_valued_floats_pass_and_allow_normalized_accepts_fractions(tmp_path, vocab):
    x = np.array([[1, 2, 0, 3], [0, 1, 1.5, 0]], np.float32)
    path = _h5ad(tmp_path, x=x)
    run_tokenize(
        TokenizeConfig(
            inputs=[path], vocab=vocab, out=str(tmp_path / "ok"), read=ReadOptions(allow_normalized=True)
        ),
        runner=serial_shards,
    )
    assert (tmp_path / "ok" / "manifest.json").exists()


def test_n_counts_zero_for_a_cell_with_counts(tmp_path, vocab):
    path = _h5ad(tmp_path, obs={"n_counts": [6, 0]})
    with pytest.raises(InputError, match=r"obs\['n_counts'\] is 0 at row 1.*drop it so rankformer"):
        _tokenize(tmp_path, path, vocab)


def test_corrupt_and_truncated_files(tmp_path, vocab):
    path = _h5ad(tmp_path)
    data = Path(path).read_bytes()
    trunc = tmp_path / "trunc.h5ad"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="trunc.h5ad is not a readable HDF5 file.*corrupt or truncated"):
        _tokenize(tmp_path, trunc, vocab)
    junk = tmp_path / "junk.h5ad"
    junk.write_bytes(b"this is not hdf5" * 100)
    with pytest.raises(InputError, match="junk.h5ad is not a readable HDF5 file"):
        _tokenize(tmp_path, junk, vocab)
    other = tmp_path / "other.h5ad"
    with h5py.File(other, "w") as f:
        f.create_dataset("x", data=[1])
    with pytest.raises(InputError, match="not an AnnData .h5ad file"):
        _tokenize(tmp_path, other, vocab)


def test_unknown_format_and_missing_path(tmp_path, vocab):
    csv = tmp_path / "cells.csv"
    csv.write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match="cells.csv: unknown input format; expected '.h5ad'"):
        _tokenize(tmp_path, csv, vocab)
    with pytest.raises(FileNotFoundError, match="nowhere.h5ad not found"):
        _tokenize(tmp_path, tmp_path / "nowhere.h5ad", vocab)


def test_vocab_with_wrong_hash(tmp_path, vocab):
    doc = json.loads(Path(vocab).read_text())
    doc["genes"]["median"][0] = 1.5  # edited by hand, hash left as it was
    Path(vocab).write_text(json.dumps(doc))
    with pytest.raises(VocabError, match="edited or corrupted"):
        _tokenize(tmp_path, _h5ad(tmp_path), vocab)


def test_v1_vocab_with_v2_layout(tmp_path):
    v1 = str(tmp_path / "v1.json")
    build_vocab(IDS, [1.0, 2.0, 3.0, 4.0], layout_specials=V1_SPECIALS).save(v1)
    with pytest.raises(InputError, match="no <cls>/<eos> tokens .* use --layout v1"):
        _tokenize(tmp_path, _h5ad(tmp_path), v1, layout="v2")


def test_carry_of_a_missing_obs_column(tmp_path, vocab):
    with pytest.raises(InputError, match=r"obs has no column\(s\) \['donor'\]"):
        _tokenize(tmp_path, _h5ad(tmp_path), vocab, carry={"donor": "donor"})


def test_csc_matrix_is_refused_with_the_fix(tmp_path, vocab):
    import anndata as ad
    import scipy.sparse as sp

    path = str(tmp_path / "csc.h5ad")
    a = ad.AnnData(X=sp.csc_matrix(np.array([[1.0, 2, 0, 3]])))
    a.var["ensembl_id"] = IDS
    a.write_h5ad(path)
    with pytest.raises(InputError, match=r"X is stored as csc_matrix.*tocsr\(\)"):
        _tokenize(tmp_path, path, vocab)
