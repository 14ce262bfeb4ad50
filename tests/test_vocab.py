"""GeneVocab: hashing, persistence, restricted pickle import, id mapping."""

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from conftest import needs_shared
from rankformer.errors import InputError, VocabError
from rankformer.vocab.gene_vocab import (
    V1_SPECIALS,
    GeneVocab,
    aliases_from_table,
    build_vocab,
    guess_id_kind,
    normalize_gene_id,
)
from rankformer.vocab.geneformer import import_geneformer, load_plain_dict


def _vocab() -> GeneVocab:
    return build_vocab(
        ["ENSG00000000003", "ENSG00000000001", "ENSG00000000002"],
        [1.5, 0.25, 3.0],
        aliases={"TP53": "ENSG00000000002", "GONE": "ENSG99999999999"},
        gene_names={"ENSG00000000002": "TP53"},
    )


def test_genes_are_numbered_after_specials_in_id_order():
    v = _vocab()
    assert v.gene_ids == ("ENSG00000000001", "ENSG00000000002", "ENSG00000000003")
    assert v.token_ids.tolist() == [4, 5, 6]
    assert v.medians.tolist() == [0.25, 3.0, 1.5]
    assert v.aliases == {"TP53": "ENSG00000000002"}  # alias to a gene outside the vocab dropped


def test_round_trip_keeps_content_and_hash(tmp_path):
    v = _vocab()
    path = str(tmp_path / "v.json")
    digest = v.save(path)
    back = GeneVocab.load(path, expect_hash=digest)
    assert back.content_hash == digest and back.medians.tolist() == v.medians.tolist()
    assert oct(os.stat(path).st_mode & 0o777) == "0o644"


def test_edited_vocab_is_refused(tmp_path):
    path = str(tmp_path / "v.json")
    _vocab().save(path)
    doc = json.loads(Path(path).read_text())
    doc["genes"]["median"][0] = 0.5
    Path(path).write_text(json.dumps(doc))
    with pytest.raises(VocabError, match="content_hash .* does not match"):
        GeneVocab.load(path)


def test_wrong_version_and_wrong_expected_hash(tmp_path):
    path = str(tmp_path / "v.json")
    _vocab().save(path)
    with pytest.raises(VocabError, match="made with sha256:abc"):
        GeneVocab.load(path, expect_hash="sha256:abc")
    doc = json.loads(Path(path).read_text())
    doc["format_version"] = 99
    Path(path).write_text(json.dumps(doc))
    with pytest.raises(VocabError, match="format_version 99"):
        GeneVocab.load(path)
    Path(path).write_text("{not json")
    with pytest.raises(VocabError, match="not valid JSON"):
        GeneVocab.load(path)


def test_missing_vocab_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        GeneVocab.load(str(tmp_path / "nope.json"))


def test_map_gene_ids_uses_aliases_case_and_versions():
    v = _vocab()
    got = v.map_gene_ids(["ensg00000000001", "tp53", "ENSG00000000003.7", "", None, "XYZ"])
    assert got.tolist() == [4, 5, 6, -1, -1, -1]


def test_token_lookups_both_ways():
    v = _vocab()
    assert v.token_by_gene_id == {"ENSG00000000001": 4, "ENSG00000000002": 5, "ENSG00000000003": 6}
    assert v.gene_id_by_token[[6, 4]].tolist() == ["ENSG00000000003", "ENSG00000000001"]
    assert v.gene_id_by_token[0] is None  # a special token
    # specials, negatives and ids past the vocabulary are dropped; the order is kept
    assert v.gene_tokens_in(np.array([6, 0, 9, -1, 4, 5, 3])).tolist() == [6, 4, 5]
    assert v.gene_tokens_in(np.array([], dtype=np.int64)).tolist() == []


def test_an_artifacts_vocabulary_is_read_once_per_process(tmp_path):
    """`load_expected` (model folders, corpora): checked against the artifact's hash on first read,
    then kept by that hash: the same object again without reading, the file gone or not. A wrong
    hash is refused and not kept; at most a few vocabularies are kept."""
    from rankformer.vocab import gene_vocab as vocab_module

    v = _vocab()
    uri = str(tmp_path / "v.json")
    v.save(uri)
    vocab_module._BY_HASH.pop(v.content_hash, None)
    with pytest.raises(VocabError, match="has hash"):
        vocab_module.load_expected(uri, "sha256:other")
    assert "sha256:other" not in vocab_module._BY_HASH
    first = vocab_module.load_expected(uri, v.content_hash)
    assert first.content_hash == v.content_hash
    os.remove(uri)
    assert vocab_module.load_expected(uri, v.content_hash) is first
    for i in range(vocab_module._BY_HASH_MAX):  # others, read later, push it out
        other = build_vocab([f"ENSG0000000{i:04d}"], [1.0])
        other.save(str(tmp_path / f"o{i}.json"))
        vocab_module.load_expected(str(tmp_path / f"o{i}.json"), other.content_hash)
    assert len(vocab_module._BY_HASH) == vocab_module._BY_HASH_MAX
    assert v.content_hash not in vocab_module._BY_HASH
    with pytest.raises(FileNotFoundError):
        vocab_module.load_expected(uri, v.content_hash)


def test_bad_medians_are_refused():
    with pytest.raises(VocabError, match="median"):
        build_vocab(["ENSG00000000001"], [0.0])


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_restricted_unpickler_refuses_code(tmp_path):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ENSG00000000001": _Evil()}))
    with pytest.raises(VocabError, match="posix.system is not allowed|os.system is not allowed"):
        load_plain_dict(str(path))


def test_restricted_unpickler_refuses_non_dict_values(tmp_path):
    path = tmp_path / "list.pkl"
    path.write_bytes(pickle.dumps({"ENSG00000000001": [1, 2]}))
    with pytest.raises(VocabError, match="value for 'ENSG00000000001' is a list"):
        load_plain_dict(str(path))


def test_numpy_scalars_are_accepted(tmp_path):
    path = tmp_path / "np.pkl"
    path.write_bytes(
        pickle.dumps({"<pad>": 0, "ENSG00000000001": np.int16(2), "ENSG00000000002": np.float64(0.5)})
    )
    assert load_plain_dict(str(path)) == {"<pad>": 0, "ENSG00000000001": 2, "ENSG00000000002": 0.5}


def test_aliases_from_table_drops_ambiguous_symbols():
    aliases, names = aliases_from_table(["A", "B", "B", "C"], ["ENSG1", "ENSG2", "ENSG3", ""])
    assert aliases == {"A": "ENSG1"}
    assert names["ENSG2"] == "B"


def test_guess_id_kind():
    assert "symbols" in guess_id_kind(["CD3E", "MS4A1", "LYZ"])
    assert "mouse" in guess_id_kind(["ENSMUSG00000000001", "ENSMUSG00000000002"])
    assert guess_id_kind(["ENSG00000000001"]) == "human Ensembl ids"
    assert normalize_gene_id(" ensg00000141510.17 ") == "ENSG00000141510"


@needs_shared()
def test_import_real_geneformer_v2(geneformer_v2_vocab):
    v = GeneVocab.load(geneformer_v2_vocab)
    assert len(v.gene_ids) == 20271 and v.has_v2_specials
    assert v.specials == {"<pad>": 0, "<mask>": 1, "<cls>": 2, "<eos>": 3}
    assert v.token_ids.min() == 4 and v.token_ids.max() == 20274
    tok = dict(zip(v.gene_ids, v.token_ids.tolist(), strict=True))
    assert tok["ENSG00000000003"] == 4
    assert v.medians[v.gene_ids.index("ENSG00000000003")] > 0


@needs_shared()
def test_import_real_geneformer_v1_has_no_cls(geneformer_v1_vocab):
    v = GeneVocab.load(geneformer_v1_vocab)
    assert v.specials == V1_SPECIALS and not v.has_v2_specials
    assert len(v.gene_ids) == 25424
    with pytest.raises(InputError, match="no special token '<cls>'"):
        v.token("<cls>")


@needs_shared()
def test_import_refuses_mismatched_median_dictionary(shared, tmp_path):
    g = shared / "reference" / "geneformer"
    with pytest.raises(VocabError, match="have no entry in"):
        import_geneformer(
            str(g / "token_dictionary_gc30M.pkl"),
            str(tmp_path / "m.pkl") if (tmp_path / "m.pkl").write_bytes(pickle.dumps({"<pad>": 0})) else "",
        )


def test_symbols_map_through_the_names_only_where_no_alias_table_holds_symbols():
    names = {"ENSG00000000001": "A", "ENSG00000000002": "B", "ENSG00000000003": "B", "ENSG00000000004": "C"}
    ids = list(names)
    plain = build_vocab(ids, [1.0] * 4, gene_names=names)
    assert plain.map_gene_ids(["a", "B", "C", "ENSG00000000004"], names=True).tolist() == [4, -1, 7, 7]
    assert plain.map_gene_ids(["A"]).tolist() == [-1]  # only when asked (the tokenizer asks)
    # a gene table's aliases decide: "C" was ambiguous there (not an alias), so it stays unmapped
    tabled = build_vocab(ids, [1.0] * 4, aliases={"A": ids[0]}, gene_names=names)
    assert tabled.map_gene_ids(["A", "C"], names=True).tolist() == [4, -1]
