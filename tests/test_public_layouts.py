"""Files as public atlases ship them (CELLxGENE / scanpy): Ensembl ids as the var index, symbols in
`feature_name`, normalised values in X and the raw counts in raw/X or a layer."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp

from conftest import DATA, needs_shared
from rankformer.cluster import serial_shards
from rankformer.config.corpus import ReadOptions, TokenizeConfig
from rankformer.corpus.read import corpus_files
from rankformer.corpus.tokenize import run_tokenize
from rankformer.errors import InputError

pytestmark = needs_shared()
N_CELLS = 300


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The same real cells three ways: CELLxGENE-style with raw/X, with layers/counts, and plain."""
    d = tmp_path_factory.mktemp("cxg")
    src = ad.read_h5ad(DATA / "pbmc_2k_celltypes.h5ad")[:N_CELLS]
    ids = src.var["ensembl_id"].astype(str)
    keep = (ids != "").to_numpy() & ~ids.duplicated(keep="first").to_numpy()
    src = src[:, keep]
    counts = sp.csr_matrix(src.X, dtype=np.float32)
    var = pd.DataFrame(
        {"feature_name": src.var_names.astype(str)}, index=src.var["ensembl_id"].astype(str).to_numpy()
    )
    obs = pd.DataFrame({"cell_type": src.obs["celltype"].astype(str).to_numpy()}, index=src.obs_names)
    norm = counts.multiply(1e4 / np.maximum(counts.sum(axis=1), 1)).tocsr()
    norm.data = np.log1p(norm.data).astype(np.float32)
    paths = {}
    a = ad.AnnData(X=norm, obs=obs, var=var)
    a.raw = ad.AnnData(X=counts, obs=obs, var=var)
    paths["raw"] = str(d / "cxg_raw.h5ad")
    a.write_h5ad(paths["raw"])
    b = ad.AnnData(X=norm, obs=obs, var=var, layers={"counts": counts})
    paths["layer"] = str(d / "cxg_layer.h5ad")
    b.write_h5ad(paths["layer"])
    plain_var = pd.DataFrame({"ensembl_id": var.index.to_numpy()}, index=var["feature_name"].to_numpy())
    paths["plain"] = str(d / "plain.h5ad")
    ad.AnnData(X=counts, obs=obs, var=plain_var).write_h5ad(paths["plain"])
    paths["normalized_only"] = str(d / "norm_only.h5ad")
    ad.AnnData(X=norm, obs=obs, var=var).write_h5ad(paths["normalized_only"])
    return paths


def _tokenize(path, vocab, out, **read):
    cfg = TokenizeConfig(
        inputs=[path], vocab=vocab, out=str(out), carry={"cell_type": "cell_type"}, read=ReadOptions(**read)
    )
    run_tokenize(cfg, runner=serial_shards)
    return pq.read_table(corpus_files(str(out))).to_pydict()


def test_raw_and_layer_counts_give_the_tokens_of_plain_counts(files, geneformer_v2_vocab, tmp_path, capsys):
    plain = _tokenize(files["plain"], geneformer_v2_vocab, tmp_path / "plain")
    from_raw = _tokenize(files["raw"], geneformer_v2_vocab, tmp_path / "raw", counts="raw")
    assert "var index" in capsys.readouterr().out  # the coverage line says where the ids came from
    from_layer = _tokenize(files["layer"], geneformer_v2_vocab, tmp_path / "layer", counts="layers/counts")
    assert len(plain["input_ids"]) == N_CELLS
    assert from_raw["input_ids"] == plain["input_ids"]
    assert from_layer["input_ids"] == plain["input_ids"]
    assert from_raw["cell_id"] == plain["cell_id"] and from_raw["cell_type"] == plain["cell_type"]


def test_normalized_x_error_names_the_raw_matrix(files, geneformer_v2_vocab, tmp_path):
    with pytest.raises(
        InputError, match=r"non-integer count .* in X.*integer counts in raw: pass --counts raw"
    ):
        _tokenize(files["raw"], geneformer_v2_vocab, tmp_path / "a")
    with pytest.raises(InputError, match=r"integer counts in layers/counts: pass --counts layers/counts"):
        _tokenize(files["layer"], geneformer_v2_vocab, tmp_path / "b")
    with pytest.raises(InputError, match=r"--allow-normalized"):
        _tokenize(files["normalized_only"], geneformer_v2_vocab, tmp_path / "c")
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())


def test_missing_matrices_are_named(files, geneformer_v2_vocab, tmp_path):
    with pytest.raises(InputError, match=r"no such layer; matrices in the file: \['X', 'layers/counts'\]"):
        _tokenize(files["layer"], geneformer_v2_vocab, tmp_path / "a", counts="layers/umi")
    with pytest.raises(InputError, match=r"no raw/X"):
        _tokenize(files["layer"], geneformer_v2_vocab, tmp_path / "b", counts="raw")
    with pytest.raises(InputError, match=r"counts 'spliced' must be X, raw or layers/NAME"):
        ReadOptions(counts="spliced").check()


def test_explicit_gene_column_overrides_the_index(files, geneformer_v2_vocab, tmp_path):
    # symbols through the vocabulary's alias table still map, so the column really was used
    out = _tokenize(
        files["raw"], geneformer_v2_vocab, tmp_path / "sym", counts="raw", gene_id_column="feature_name"
    )
    assert len(out["input_ids"]) == N_CELLS
    with pytest.raises(InputError, match=r"gene-id column 'gene_ids' not found"):
        _tokenize(files["raw"], geneformer_v2_vocab, tmp_path / "x", counts="raw", gene_id_column="gene_ids")


def test_vocab_build_keeps_the_files_gene_symbols(files, tmp_path):
    """CELLxGENE's `feature_name` (Ensembl ids as the var index) and scanpy's symbol var names
    (ids in a column) both give each vocabulary gene its symbol."""
    from rankformer.config.corpus import VocabBuildConfig
    from rankformer.corpus.medians import run_vocab_build

    var = ad.read_h5ad(files["raw"]).raw.var
    want = dict(zip(var.index, var["feature_name"].astype(str), strict=True))
    read = ReadOptions(counts="raw")
    cxg = run_vocab_build(
        VocabBuildConfig([files["raw"]], str(tmp_path / "a.json"), read=read), serial_shards
    )
    plain = run_vocab_build(VocabBuildConfig([files["plain"]], str(tmp_path / "b.json")), serial_shards)
    assert len(cxg.gene_ids) > 1000 and cxg.gene_names == {g: want[g] for g in cxg.gene_ids}
    assert plain.gene_names == cxg.gene_names


def test_symbols_tokenize_like_ensembl_ids_through_geneformer_v1_names(files, shared, tmp_path):
    """Geneformer V1's mapping holds no symbols; with its gene-name dictionary imported, the same
    real cells named by symbol (the var names) give the tokens they give by Ensembl id."""
    from rankformer.vocab.geneformer import import_geneformer

    g = shared / "reference" / "geneformer"
    vocab = import_geneformer(
        *(str(g / f"{name}_gc30M.pkl") for name in ("token_dictionary", "gene_median_dictionary")),
        str(g / "ensembl_mapping_dict_gc30M.pkl"),
        str(g / "gene_name_id_dict_gc30M.pkl"),
    )
    assert not vocab.has_symbol_aliases
    path = str(tmp_path / "v1.json")
    vocab.save(path)

    def tokens(out, column):
        cfg = TokenizeConfig(
            inputs=[files["plain"]],
            vocab=path,
            out=str(tmp_path / out),
            layout="v1",
            read=ReadOptions(gene_id_column=column),
        )
        run_tokenize(cfg, runner=serial_shards)
        return pq.read_table(corpus_files(str(tmp_path / out))).column("input_ids").to_pylist()

    by_id = tokens("by_id", "ensembl_id")
    assert len(by_id) == N_CELLS and tokens("by_symbol", "index") == by_id
