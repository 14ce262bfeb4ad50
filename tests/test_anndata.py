"""Results back on AnnData, scverse-style, on real PBMC cells: embeddings into obsm and predictions
into obs (NaN rows for the cells the tokenizer left out, with the count said), job outputs attached
by source row and checked by cell id, gene outputs into var/varm by gene id, the `attach` command's
.h5ad read back; inputs as scanpy leaves them (backed, zarr)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
import torch
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

import rankformer
from conftest import DATA, needs_shared
from rankformer.annotate import attach
from rankformer.cli import main as cli
from rankformer.cluster import serial_shards
from rankformer.config.corpus import ReadOptions, TokenizeConfig
from rankformer.config.infer import EmbedConfig, PredictConfig
from rankformer.corpus.memory import dropped_counts
from rankformer.corpus.read import corpus_files
from rankformer.corpus.tokenize import run_tokenize
from rankformer.embed.cells import run_embed
from rankformer.errors import InputError
from rankformer.model.presets import bert_config, preset
from rankformer.model.store import save_model_dir
from rankformer.vocab.gene_vocab import GeneVocab

pytestmark = needs_shared()
FILE = DATA / "pbmc_2k_celltypes.h5ad"
N = 240
CLASSES = ["B cells", "T/NK cells", "other"]


@pytest.fixture(scope="module")
def world(tmp_path_factory, geneformer_v2_vocab):
    """240 real PBMC cells in an .h5ad (3 failing filter_pass, one with no vocabulary gene), its
    corpus, a tiny model and a cell classifier of the Geneformer V2 vocabulary."""
    d = tmp_path_factory.mktemp("anndata")
    adata = ad.read_h5ad(FILE)[:N].copy()
    x = sp.csr_matrix(adata.X)
    vocab = GeneVocab.load(geneformer_v2_vocab)
    known = np.isin(adata.var["ensembl_id"].astype(str), list(vocab.gene_ids))
    x = x.tolil()
    x[7, np.flatnonzero(known)] = 0  # cell 7 expresses no vocabulary gene
    adata.X = x.tocsr()
    adata.X.eliminate_zeros()
    adata.obs["filter_pass"] = np.ones(N, dtype=np.int8)
    adata.obs.iloc[[11, 12, 200], adata.obs.columns.get_loc("filter_pass")] = 0
    h5ad = str(d / "pbmc.h5ad")
    adata.write_h5ad(h5ad)
    corpus = str(d / "corpus")
    run_tokenize(
        TokenizeConfig(
            inputs=[h5ad], vocab=geneformer_v2_vocab, out=corpus, read=ReadOptions(rows_per_shard=100)
        ),
        runner=serial_shards,
    )
    torch.manual_seed(0)
    cfg = bert_config(preset("tiny", {"num_hidden_layers": 2}), vocab)
    model = BertForMaskedLM(cfg).eval()
    save_model_dir(model, vocab, {"task": "masked-lm", "layout": "v2", "max_length": 4096}, str(d / "model"))
    clf = BertForSequenceClassification(BertConfig(**{**cfg.to_dict(), "num_labels": 3})).eval()
    meta = {
        "task": "cell-classification",
        "layout": "v2",
        "max_length": 4096,
        "classes": CLASSES,
        "label_column": "cell_type",
    }
    save_model_dir(clf, vocab, meta, str(d / "clf"))
    return {"d": d, "h5ad": h5ad, "corpus": corpus, "model": str(d / "model"), "clf": str(d / "clf")}


LEFT_OUT = [7, 11, 12, 200]


def test_embeddings_into_obsm_row_for_row_with_nan_for_cells_left_out(world, capsys):
    adata = ad.read_h5ad(world["h5ad"])
    model = rankformer.load_model(world["model"])
    got = model.embed(adata, key_added="X_rankformer")
    said = capsys.readouterr().out
    assert "kept 236 of 240 cells (1 without a vocabulary gene, 3 with obs filter_pass 0)" in said
    assert got is adata.obsm["X_rankformer"] and got.shape == (N, model.hidden_size)
    nan = np.flatnonzero(np.isnan(got).all(1))
    assert nan.tolist() == LEFT_OUT and not np.isnan(np.delete(got, LEFT_OUT, 0)).any()
    cells = model.tokenize(adata, report=False)
    assert dropped_counts(cells) == {"cells_in": N, "no_vocabulary_gene": 1, "filter_pass": 3}
    np.testing.assert_allclose(np.delete(got, LEFT_OUT, 0), model.embed(cells), atol=1e-6)
    assert adata.uns["X_rankformer"]["n_cells_without"] == 4
    # the .h5ad keeps them
    path = world["d"] / "with_embeddings.h5ad"
    adata.write_h5ad(path)
    back = ad.read_h5ad(path)
    np.testing.assert_array_equal(back.obsm["X_rankformer"], got)
    with pytest.raises(InputError, match="key_added writes into an AnnData"):
        model.embed(cells, key_added="X_rankformer")


def test_the_embed_jobs_output_attaches_by_source_row(world, tmp_path):
    out = str(tmp_path / "embed")
    run_embed(EmbedConfig(model=world["model"], corpus=world["corpus"], out=out, in_process=True))
    adata = ad.read_h5ad(world["h5ad"])
    done = attach(adata, out)
    assert done["key"] == "X_rankformer" and done["matched"] == 236 and done["unmatched"] == 4
    in_memory = rankformer.load_model(world["model"]).embed(ad.read_h5ad(world["h5ad"]))
    np.testing.assert_allclose(adata.obsm["X_rankformer"], in_memory, atol=1e-5)
    # reordered cells are matched by row and caught by cell id, never taken by position
    shuffled = adata[np.random.default_rng(0).permutation(N)].copy()
    with pytest.raises(InputError, match="not the file the corpus was tokenized from"):
        attach(shuffled, out)
    with pytest.raises(InputError, match="source rows up to"):
        attach(adata[:100].copy(), out)
    with pytest.raises(InputError, match="no cells of"):
        attach(adata, out, source="other.h5ad")
    # gene level: varm and var by gene id
    genes_out = str(tmp_path / "genes")
    run_embed(
        EmbedConfig(
            model=world["model"], corpus=world["corpus"], out=genes_out, level="gene", in_process=True
        )
    )
    done = attach(adata, genes_out, key_added="rf_genes")
    table = pd.read_parquet(f"{genes_out}/genes.parquet")
    assert done["matched"] == len(table) and adata.varm["rf_genes"].shape == (adata.n_vars, 32)
    row = int(np.flatnonzero(adata.var["ensembl_id"].astype(str) == table.gene_id[0])[0])
    np.testing.assert_allclose(adata.varm["rf_genes"][row], table.embedding[0], atol=1e-7)
    assert adata.var["rf_genes_n_occurrences"].iloc[row] == table.n_occurrences[0]


def test_predictions_into_obs_in_memory_and_from_the_job(world, tmp_path, capsys):
    adata = ad.read_h5ad(world["h5ad"])
    clf = rankformer.load_classifier(world["clf"])
    table = clf.predict(adata, key_added="rf")
    assert len(table) == 236
    probs = [f"rf_prob_{c.replace('/', '_')}" for c in CLASSES]  # .h5ad names hold no '/'
    assert "rf_prob_T_NK cells" in adata.obs
    assert adata.obs[probs].isna().all(1).to_numpy().nonzero()[0].tolist() == LEFT_OUT
    np.testing.assert_allclose(adata.obs[probs].sum(1).drop(adata.obs_names[LEFT_OUT]), 1.0, rtol=1e-6)
    assert adata.obs["rf_predicted"].dtype == "category" and adata.obs["rf_predicted"].isna().sum() == 4
    out = str(tmp_path / "pred")
    from rankformer.classify.predict import run_predict

    run_predict("cells", PredictConfig(model=world["clf"], corpus=world["corpus"], out=out))
    job = ad.read_h5ad(world["h5ad"])
    attach(job, out, key_added="rf")
    np.testing.assert_allclose(job.obs[probs].to_numpy(), adata.obs[probs].to_numpy(), atol=1e-5)
    assert job.obs["rf_predicted"].astype(str).tolist() == adata.obs["rf_predicted"].astype(str).tolist()
    # the command: embed and predict outputs written into one .h5ad, read back
    capsys.readouterr()
    embed_out = str(tmp_path / "embed")
    run_embed(EmbedConfig(model=world["model"], corpus=world["corpus"], out=embed_out, in_process=True))
    written = str(tmp_path / "annotated.h5ad")
    assert cli(["attach", world["h5ad"], embed_out, out, "--write", written]) == 0
    assert "obsm['X_rankformer']" in capsys.readouterr().out
    back = ad.read_h5ad(written)
    assert back.obsm["X_rankformer"].shape == (N, 32)
    np.testing.assert_allclose(
        back.obs[[f"rankformer{p[2:]}" for p in probs]].to_numpy(), job.obs[probs].to_numpy()
    )
    assert cli(["attach", world["h5ad"], embed_out, out, "--write", written, "--key-added", "x"]) == 2
    assert "give one OUT" in capsys.readouterr().err


def test_backed_and_zarr_inputs_read_by_row_chunks_as_the_h5ad(world, tmp_path, geneformer_v2_vocab):
    want = pq.read_table(corpus_files(world["corpus"]))
    backed = ad.read_h5ad(world["h5ad"], backed="r")
    table = rankformer.tokenize_anndata(backed, geneformer_v2_vocab, report=False)
    assert table["input_ids"].to_pylist() == want["input_ids"].to_pylist()
    assert table["source_row"].to_pylist() == want["source_row"].to_pylist()
    store = str(tmp_path / "pbmc.zarr")
    with ad.settings.override(zarr_write_format=3):  # the coming default; v2 stores read alike
        ad.read_h5ad(world["h5ad"]).write_zarr(store)
    out = str(tmp_path / "zarr_corpus")
    run_tokenize(
        TokenizeConfig(
            inputs=[store], vocab=geneformer_v2_vocab, out=out, read=ReadOptions(rows_per_shard=100)
        ),
        runner=serial_shards,
    )
    got = pq.read_table(corpus_files(out))
    assert got["input_ids"].to_pylist() == want["input_ids"].to_pylist()
    assert got["cell_id"].to_pylist() == want["cell_id"].to_pylist()
