"""Token-for-token identity with the reference Geneformer tokenizer on real data."""

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from rankformer.cluster import serial_shards
from rankformer.config.corpus import ReadOptions, TokenizeConfig
from rankformer.corpus.read import corpus_files
from rankformer.corpus.tokenize import run_tokenize
from rankformer.vocab.gene_vocab import GeneVocab

CASES = [("pbmc3k_first1k", "V2", "v2"), ("pbmc3k_first1k", "V1", "v1"), ("breast_tumor_302", "V2", "v2")]


def assert_same_modulo_ties(
    ours: list[int], ref: list[int], counts: list[float], median_by_token: np.ndarray
) -> None:
    """Equal sequences up to the order inside runs of exactly equal ranking values."""
    assert len(ours) == len(ref)
    med = np.asarray([median_by_token[t] if t < len(median_by_token) else np.nan for t in ref])
    value = np.where(np.asarray(counts) > 0, np.asarray(counts) / med, np.inf)
    i = 0
    while i < len(ref):
        j = i + 1
        while j < len(ref) and value[j] == value[i]:
            j += 1
        assert sorted(ours[i:j]) == sorted(ref[i:j]), f"positions {i}..{j}"
        i = j


def _check(out_dir: Path, ref_path: Path, vocab_path: str) -> int:
    ours = pq.read_table(corpus_files(str(out_dir))).to_pydict()
    ref = pq.read_table(ref_path).to_pydict()
    assert ours["cell_id"] == ref["cell_id"]
    assert ours["length"] == ref["length"]
    med = GeneVocab.load(vocab_path).median_by_token()
    exact = 0
    for o, r, c in zip(ours["input_ids"], ref["input_ids"], ref["counts"], strict=True):
        exact += o == r
        assert_same_modulo_ties(o, r, c, med)
    return exact


@pytest.mark.parametrize("name,ref_layout,layout", CASES)
def test_parity_with_reference_tokenizer(
    shared, tmp_path, name, ref_layout, layout, geneformer_v1_vocab, geneformer_v2_vocab
):
    vocab = geneformer_v2_vocab if layout == "v2" else geneformer_v1_vocab
    cfg = TokenizeConfig(
        inputs=[str(shared / "data" / f"{name}.h5ad")],
        vocab=vocab,
        out=str(tmp_path / "corpus"),
        layout=layout,
        read=ReadOptions(rows_per_shard=400, chunk_rows=150),
    )
    manifest = run_tokenize(cfg, runner=serial_shards)
    ref = shared / "reference" / "expected" / f"{name}_{ref_layout}.parquet"
    exact = _check(tmp_path / "corpus", ref, vocab)
    assert manifest["totals"]["cells_out"] == pq.read_metadata(ref).num_rows
    assert exact > 0
