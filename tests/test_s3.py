"""s3:// inputs and outputs through a moto S3 server on 127.0.0.1, run on the Ray cluster."""

import json

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs

from rankformer.config.corpus import ReadOptions, TokenizeConfig, VocabBuildConfig
from rankformer.corpus.medians import run_vocab_build
from rankformer.corpus.read import corpus_files
from rankformer.corpus.tokenize import run_tokenize
from rankformer.io.synth import SynthSpec, write_h5ad

pytestmark = [pytest.mark.s3, pytest.mark.ray]


@pytest.fixture(scope="module")
def bucket(s3_server, tmp_path_factory):
    name = "rankformer-test"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    d = tmp_path_factory.mktemp("s3src")
    write_h5ad(str(d / "a.h5ad"), SynthSpec(n_cells=60, n_genes=30, genes_per_cell=12, seed=5), chunk_rows=25)
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.upload_file(str(d / "a.h5ad"), name, "raw/a.h5ad")
    return name, str(d / "a.h5ad")


def test_vocab_build_and_tokenize_on_s3(ray_cluster, bucket, tmp_path):
    name, local = bucket
    read = ReadOptions(rows_per_shard=25, chunk_rows=10)
    vocab_uri = f"s3://{name}/vocab/v.json"
    remote = run_vocab_build(VocabBuildConfig(inputs=[f"s3://{name}/raw/a.h5ad"], out=vocab_uri, read=read))
    local_vocab = run_vocab_build(VocabBuildConfig(inputs=[local], out=str(tmp_path / "v.json"), read=read))
    assert remote.medians.tolist() == local_vocab.medians.tolist()
    out = f"s3://{name}/corpus"
    manifest = run_tokenize(
        TokenizeConfig(inputs=[f"s3://{name}/raw/a.h5ad"], vocab=vocab_uri, out=out, read=read)
    )
    assert manifest["totals"]["cells_out"] == 60 and len(manifest["shards"]) == 3
    fs = s3fs.S3FileSystem()
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{name}/corpus"))
    assert names == [
        "_corpus_config.json",
        "manifest.json",
        "part-f00000-s000000.parquet",
        "part-f00000-s000001.parquet",
        "part-f00000-s000002.parquet",
        "vocab.json",  # the corpus's own copy, which its workers read
    ]
    files = [f.replace("s3://", "") for f in corpus_files(out)]
    table = pq.read_table(files, filesystem=fs)
    assert table.num_rows == 60
    on_s3 = json.loads(fs.cat(f"{name}/corpus/manifest.json"))
    assert on_s3["vocab_hash"] == remote.content_hash


def test_an_anndata_zarr_store_on_s3_tokenizes_as_its_h5ad(ray_cluster, bucket, tmp_path):
    """An AnnData .zarr store under an s3:// prefix: the same tokens as the .h5ad it was written
    from (zarr reads the arrays' chunks from S3 as the tasks need them)."""
    import anndata as ad

    name, local = bucket
    store = tmp_path / "a.zarr"
    ad.read_h5ad(local).write_zarr(store)
    fs = s3fs.S3FileSystem()
    fs.put(str(store), f"{name}/raw/a.zarr", recursive=True)
    read = ReadOptions(rows_per_shard=25, chunk_rows=10)
    vocab = str(tmp_path / "v.json")
    run_vocab_build(VocabBuildConfig(inputs=[local], out=vocab, read=read))
    tables = []
    for src, out in (
        (local, str(tmp_path / "h5ad")),
        (f"s3://{name}/raw/a.zarr", f"s3://{name}/zarr_corpus"),
    ):
        run_tokenize(TokenizeConfig(inputs=[src], vocab=vocab, out=out, read=read))
        files = [f.replace("s3://", "") for f in corpus_files(out)]
        tables.append(pq.read_table(files, filesystem=fs if out.startswith("s3://") else None))
    assert tables[1].num_rows == 60
    assert tables[1]["input_ids"].to_pylist() == tables[0]["input_ids"].to_pylist()
    assert tables[1]["cell_id"].to_pylist() == tables[0]["cell_id"].to_pylist()


def test_missing_bucket_and_key_are_named(s3_server, tmp_path):
    vocab = str(tmp_path / "v.json")
    from rankformer.vocab.gene_vocab import build_vocab

    build_vocab(["ENSG00000000001"], [1.0]).save(vocab)
    for uri in ("s3://no-such-bucket/a.h5ad", "s3://rankformer-test/raw/missing.h5ad"):
        with pytest.raises(FileNotFoundError, match=uri.replace(".", r"\.")):
            run_tokenize(TokenizeConfig(inputs=[uri], vocab=vocab, out=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


def test_aborted_s3_write_leaves_no_object(s3_server, bucket):
    from rankformer.io import fs as rfs

    name, _ = bucket
    with pytest.raises(RuntimeError), rfs.open_output_atomic(f"s3://{name}/half.bin") as f:
        f.write(np.zeros(10, np.uint8).tobytes())
        raise RuntimeError("die mid-write")
    assert not rfs.exists(f"s3://{name}/half.bin")


def test_streamed_copy_round_trip_and_a_missing_source(bucket, tmp_path, monkeypatch):
    """Files move between disk and S3 in chunks (here 1,000 bytes), arriving whole; a copy from a
    missing source names it and leaves nothing at the destination."""
    from rankformer.io import fs as rfs

    name, _ = bucket
    monkeypatch.setattr(rfs, "COPY_CHUNK", 1000)
    data = np.random.default_rng(0).integers(0, 256, 10_500, dtype=np.uint8).tobytes()
    (tmp_path / "a.bin").write_bytes(data)
    rfs.copy(str(tmp_path / "a.bin"), f"s3://{name}/copy/a.bin")
    rfs.copy(f"s3://{name}/copy/a.bin", str(tmp_path / "b.bin"))
    assert (tmp_path / "b.bin").read_bytes() == data
    with pytest.raises(FileNotFoundError, match="copy/missing.bin"):
        rfs.copy(f"s3://{name}/copy/missing.bin", str(tmp_path / "c.bin"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.bin"]


def test_a_model_from_s3_is_fetched_once_per_machine_and_version(bucket, tmp_path, monkeypatch):
    """A check without weights copies only the metadata, vocabulary and config, to a temporary
    folder removed after. A load fetches the model into this machine's model cache once: the next
    loads (threads at once included) fetch nothing; a model rewritten in place is fetched again;
    the least recently used model leaves the cache beyond its size."""
    import os
    import tempfile
    import threading

    import torch
    from transformers import BertForMaskedLM

    from rankformer.io import fs as rfs
    from rankformer.model.loader import inspect_model, load_model, model_meta
    from rankformer.model.presets import bert_config, preset
    from rankformer.model.store import save_model_dir
    from rankformer.vocab.gene_vocab import build_vocab

    name, _ = bucket
    vocab = build_vocab([f"ENSG{i:011d}" for i in range(1, 31)], [1.0] * 30)
    s3 = s3fs.S3FileSystem()

    def upload(seed: int, prefix: str) -> BertForMaskedLM:
        torch.manual_seed(seed)
        model = BertForMaskedLM(bert_config(preset("tiny"), vocab)).eval()
        local = tmp_path / f"model-{seed}"
        save_model_dir(model, vocab, {"task": "masked-lm", "layout": "v2"}, str(local))
        for f in local.iterdir():  # file by file: over an existing model, each file replaced
            s3.put(str(f), f"{name}/{prefix}/{f.name}")
        return model

    model = upload(0, "models/tiny")
    uri = f"s3://{name}/models/tiny"
    scratch, cache = tmp_path / "scratch", tmp_path / "cache"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("RANKFORMER_MODEL_CACHE", str(cache))
    monkeypatch.setenv("RANKFORMER_MODEL_CACHE_KEEP", "1")
    fetched: list[str] = []
    real_copy = rfs.copy

    def spy(src, dst):
        fetched.append(os.path.basename(dst))
        real_copy(src, dst)

    monkeypatch.setattr(rfs, "copy", spy)
    info = inspect_model(uri, expect_vocab_hash=vocab.content_hash)
    assert info.layout == "v2" and info.positions == model.config.max_position_embeddings
    assert model_meta(uri)["task"] == "masked-lm"
    assert sorted(set(fetched)) == ["config.json", "rankformer.json", "vocab.json"]
    assert os.listdir(scratch) == [] and not cache.exists()
    ids = torch.tensor([[2, 5, 9, 3]])

    def logits(m):
        with torch.no_grad():
            return m.eval()(input_ids=ids).logits

    fetched.clear()
    loaded = load_model(uri, expect_vocab_hash=vocab.content_hash)
    torch.testing.assert_close(logits(loaded.model), logits(model))
    assert fetched.count("model.safetensors") == 1
    entries = [e for e in os.listdir(cache) if not e.endswith(".lock")]
    assert len(entries) == 1 and os.listdir(scratch) == []
    threads = [threading.Thread(target=load_model, args=(uri,)) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fetched.count("model.safetensors") == 1  # three more loads, nothing fetched

    changed = upload(1, "models/tiny")  # rewritten in place: another version
    torch.testing.assert_close(logits(load_model(uri).model), logits(changed))
    assert fetched.count("model.safetensors") == 2
    assert [e for e in os.listdir(cache) if not e.endswith(".lock")] != entries  # the old one evicted
    assert len([e for e in os.listdir(cache) if not e.endswith(".lock")]) == 1
    monkeypatch.setenv("RANKFORMER_MODEL_CACHE", "off")  # no cache: a temporary copy, removed after
    torch.testing.assert_close(logits(load_model(uri).model), logits(changed))
    assert fetched.count("model.safetensors") == 3 and os.listdir(scratch) == []
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("RANKFORMER_MODEL_CACHE", str(tmp_path / "a-file" / "cache"))  # cannot be made
    torch.testing.assert_close(logits(load_model(uri).model), logits(changed))  # as with off
    assert fetched.count("model.safetensors") == 4 and os.listdir(scratch) == []


def test_embed_and_perturb_with_model_corpus_and_outputs_on_s3(bucket, tmp_path):
    """A model saved to s3://, a corpus on s3:// and outputs to s3://: embeddings (a seeded sample)
    and perturbation scores and statistics equal the same jobs run on local copies."""
    import torch
    from transformers import BertForMaskedLM

    from pretrain_helpers import write_corpus
    from rankformer.embed.cells import EmbedConfig, read_embeddings, run_embed
    from rankformer.io.synth import gene_ids
    from rankformer.model.presets import bert_config, preset
    from rankformer.model.store import save_model_dir
    from rankformer.perturb.job import PerturbConfig, read_results, run_perturb
    from rankformer.perturb.stats import perturb_stats
    from rankformer.vocab.gene_vocab import GeneVocab

    name, _ = bucket
    rng = np.random.default_rng(3)
    cells = [np.r_[2, rng.permutation(30)[:9] + 4, 3].astype(np.int32) for _ in range(16)]
    corpus = write_corpus(str(tmp_path / "corpus"), cells, 30, shards=2, carry={"state": ["A", "B"] * 8})
    vocab = GeneVocab.load(json.loads((tmp_path / "corpus" / "manifest.json").read_text())["config"]["vocab"])
    torch.manual_seed(0)
    model = BertForMaskedLM(bert_config(preset("tiny"), vocab)).eval()
    meta = {"task": "masked-lm", "layout": "v2", "max_length": 64}
    save_model_dir(model, vocab, meta, str(tmp_path / "model"))
    save_model_dir(model, vocab, meta, f"s3://{name}/e2e/model")
    s3fs.S3FileSystem().put(corpus, f"{name}/e2e/corpus", recursive=True)
    where = {
        "local": (str(tmp_path / "model"), corpus, str(tmp_path)),
        "s3": (f"s3://{name}/e2e/model", f"s3://{name}/e2e/corpus", f"s3://{name}/e2e"),
    }
    got = {}
    for k, (m, c, out) in where.items():
        run_embed(EmbedConfig(model=m, corpus=c, out=f"{out}/emb", limit_cells=5, seed=2, in_process=True))
        run_perturb(
            PerturbConfig(
                model=m,
                corpus=c,
                out=f"{out}/ko",
                genes=[gene_ids(30)[4]],
                state_column="state",
                goal_state="B",
                in_process=True,
            )
        )
        got[k] = (
            read_embeddings(f"{out}/emb").to_pandas(),
            read_results(f"{out}/ko").to_pandas(),
            perturb_stats(f"{out}/ko", goal_state="B"),
        )
    (e_local, r_local, s_local), (e_s3, r_s3, s_s3) = got["local"], got["s3"]
    assert len(e_s3) == 5 and e_s3.cell_id.tolist() == e_local.cell_id.tolist()
    np.testing.assert_allclose(np.stack(e_s3.embedding), np.stack(e_local.embedding), atol=1e-6)
    np.testing.assert_allclose(r_s3.shift_B, r_local.shift_B, atol=1e-6)
    assert len(r_s3) > 0 and s_s3.perturbed.tolist() == s_local.perturbed.tolist()
    assert s3fs.S3FileSystem().exists(f"{name}/e2e/ko/stats.csv")
