"""Every input format gives the same corpus as the same cells in .h5ad."""

import anndata as ad
import pandas as pd
import pyarrow.parquet as pq
import pytest

from helpers import write_anndata
from rankformer.cluster import serial_shards
from rankformer.config.corpus import ReadOptions, TokenizeConfig
from rankformer.corpus.read import corpus_files
from rankformer.corpus.tokenize import run_tokenize
from rankformer.io.synth import SynthSpec, counts_chunk, gene_ids, write_10x_h5, write_10x_mtx, write_loom
from rankformer.vocab.gene_vocab import build_vocab

N_CELLS, N_GENES = 30, 40


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    d = tmp_path_factory.mktemp("fmt")
    x, _ = counts_chunk(SynthSpec(n_cells=N_CELLS, n_genes=N_GENES, genes_per_cell=15, seed=9), 0, N_CELLS)
    ids = gene_ids(N_GENES)
    barcodes = [f"c{i}" for i in range(N_CELLS)]
    paths = {"h5ad": write_anndata(str(d / "x.h5ad"), x, list(ids))}
    write_loom(str(d / "x.loom"), x, ids, barcodes)
    write_10x_h5(str(d / "x.h5"), x, ids, barcodes)
    write_10x_h5(str(d / "x_v2.h5"), x, ids, barcodes, version=2)
    write_10x_mtx(str(d / "mtx_gz"), x, ids, barcodes, gz=True)
    write_10x_mtx(str(d / "mtx"), x, ids, barcodes, gz=False)
    paths.update(
        {
            "loom": str(d / "x.loom"),
            "10x-h5": str(d / "x.h5"),
            "10x-h5 v2": str(d / "x_v2.h5"),
            "mtx.gz folder": str(d / "mtx_gz"),
            "mtx file": str(d / "mtx" / "matrix.mtx"),
        }
    )
    vocab = str(d / "v.json")
    build_vocab(list(ids), [1.0 + i / 10 for i in range(N_GENES)]).save(vocab)
    return paths, vocab


def _tokens(path, vocab, out):
    cfg = TokenizeConfig(
        inputs=[path], vocab=vocab, out=str(out), read=ReadOptions(rows_per_shard=11, chunk_rows=4)
    )
    run_tokenize(cfg, runner=serial_shards)
    t = pq.read_table(corpus_files(str(out))).to_pydict()
    return t["input_ids"], t["cell_id"]


@pytest.mark.parametrize("fmt", ["loom", "10x-h5", "10x-h5 v2", "mtx.gz folder", "mtx file"])
def test_format_matches_h5ad(cells, fmt, tmp_path):
    paths, vocab = cells
    ref_ids, ref_cells = _tokens(paths["h5ad"], vocab, tmp_path / "ref")
    ids, cell_ids = _tokens(paths[fmt], vocab, tmp_path / "fmt")
    assert ids == ref_ids and len(ids) == N_CELLS
    assert cell_ids == [f"c{i}" for i in range(N_CELLS)]
    assert ref_cells[0] == "c0"


@pytest.mark.parametrize("fmt", ["loom", "10x-h5", "10x-h5 v2", "mtx.gz folder", "mtx file"])
def test_vocab_build_keeps_the_symbols_a_file_names_its_genes_by(cells, fmt, tmp_path):
    """Loom's Gene attribute, 10x feature names: each vocabulary gene's symbol (the tables of
    later stages show it); a file naming genes one way only gives none."""
    from rankformer.config.corpus import VocabBuildConfig
    from rankformer.corpus.medians import run_vocab_build

    paths, _ = cells
    ids = gene_ids(N_GENES)
    vocab = run_vocab_build(
        VocabBuildConfig(inputs=[paths[fmt]], out=str(tmp_path / "v.json")), runner=serial_shards
    )
    assert vocab.gene_names and vocab.gene_names == {g: f"SYM{list(ids).index(g)}" for g in vocab.gene_ids}
    x, _ = counts_chunk(SynthSpec(n_cells=N_CELLS, n_genes=N_GENES, genes_per_cell=15, seed=9), 0, N_CELLS)
    by_index = str(tmp_path / "ids_as_index.h5ad")
    ad.AnnData(X=x, var=pd.DataFrame(index=list(ids))).write_h5ad(by_index)
    numbered = write_anndata(str(tmp_path / "numbered.h5ad"), x, list(ids))  # var names "0", "1", ...
    h5 = ad.read_h5ad(numbered)
    h5.var_names = [str(i) for i in range(N_GENES)]
    h5.write_h5ad(numbered)
    for path in (by_index, numbered):
        plain = run_vocab_build(
            VocabBuildConfig(inputs=[path], out=str(tmp_path / "p.json")), runner=serial_shards
        )
        assert plain.gene_names == {} and list(plain.gene_ids) == list(vocab.gene_ids), path


def test_symbol_input_maps_through_a_gene_table_at_tokenize(cells, tmp_path):
    import numpy as np

    from rankformer.errors import InputError

    paths, vocab = cells
    ids = gene_ids(N_GENES)
    x, _ = counts_chunk(SynthSpec(n_cells=N_CELLS, n_genes=N_GENES, genes_per_cell=15, seed=9), 0, N_CELLS)
    symbols = [f"SYM{i}" for i in range(N_GENES)]
    sym_path = write_anndata(str(tmp_path / "sym.h5ad"), x, symbols)
    table = tmp_path / "table.tsv"
    table.write_text("".join(f"sym{i}\t{g}\n" for i, g in enumerate(ids)))  # symbol first, lower case
    cfg = TokenizeConfig(
        inputs=[sym_path], vocab=vocab, out=str(tmp_path / "sym"), read=ReadOptions(gene_table=str(table))
    )
    manifest = run_tokenize(cfg, runner=serial_shards)
    ref_ids, _ = _tokens(paths["h5ad"], vocab, tmp_path / "ref")
    got = pq.read_table(corpus_files(str(tmp_path / "sym"), manifest["vocab_hash"])).to_pydict()
    assert got["input_ids"] == ref_ids
    with pytest.raises(InputError, match="tokenized with vocabulary sha256:"):
        corpus_files(str(tmp_path / "sym"), vocab_hash="sha256:other")
    assert np.all(np.asarray(got["length"]) > 0)
    # no table, but a vocabulary that knows the symbols as its genes' names: the same tokens
    named = str(tmp_path / "named.json")
    names = dict(zip(ids, symbols, strict=True))
    build_vocab(list(ids), [1.0 + i / 10 for i in range(N_GENES)], gene_names=names).save(named)
    cfg = TokenizeConfig(inputs=[sym_path], vocab=named, out=str(tmp_path / "by_name"))
    run_tokenize(cfg, runner=serial_shards)
    assert pq.read_table(corpus_files(str(tmp_path / "by_name"))).to_pydict()["input_ids"] == ref_ids


def test_allow_normalized_warns(cells, tmp_path, capsys):
    paths, vocab = cells
    cfg = TokenizeConfig(
        inputs=[paths["h5ad"]], vocab=vocab, out=str(tmp_path / "n"), read=ReadOptions(allow_normalized=True)
    )
    with pytest.warns(UserWarning, match="normalised data"):
        run_tokenize(cfg, runner=serial_shards)
    assert "warning: --allow-normalized" in capsys.readouterr().out
