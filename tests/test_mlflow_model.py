"""Every model folder is an MLflow pyfunc model: loaded by MLflow's own loader from a folder and
from the registry, it answers what `rankformer embed` and `predict cells` write (1e-5), and
`mlflow models serve` answers /invocations on 127.0.0.1 the same; the folder stays a Hugging Face
folder (from_pretrained, id2label)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import torch
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

from pretrain_helpers import write_corpus
from rankformer import tracking
from rankformer.classify.predict import run_predict
from rankformer.config.infer import EmbedConfig, PredictConfig
from rankformer.corpus.read import read_corpus
from rankformer.embed.cells import read_embeddings, run_embed
from rankformer.io.synth import programme_cells
from rankformer.model.presets import bert_config, preset
from rankformer.model.store import save_model_dir
from rankformer.vocab.gene_vocab import GeneVocab

pytestmark = pytest.mark.mlflow
N_GENES = 20 + 3 * 30
CLASSES = ["a", "b/c"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("pyfunc")
    cells, _, _ = programme_cells(40, 3, 30, 20, 40, seed=2)
    corpus = write_corpus(str(d / "corpus"), cells, N_GENES, shards=2)
    vocab = GeneVocab.load(json.loads((d / "corpus" / "manifest.json").read_text())["config"]["vocab"])
    torch.manual_seed(0)
    cfg = bert_config(preset("tiny", {"num_hidden_layers": 2}), vocab)
    save_model_dir(
        BertForMaskedLM(cfg).eval(),
        vocab,
        {"task": "masked-lm", "layout": "v2", "max_length": 64},
        str(d / "model"),
    )
    clf = BertForSequenceClassification(BertConfig(**{**cfg.to_dict(), "num_labels": 2})).eval()
    meta = {"task": "cell-classification", "layout": "v2", "max_length": 64, "classes": CLASSES}
    save_model_dir(clf, vocab, meta, str(d / "clf"))
    table = read_corpus(corpus, engine="arrow").to_table()
    frame = pd.DataFrame(
        {"input_ids": table["input_ids"].to_pylist(), "cell_id": table["cell_id"].to_pylist()}
    )
    return {"d": d, "corpus": corpus, "model": str(d / "model"), "clf": str(d / "clf"), "frame": frame}


def test_a_model_folder_loads_through_mlflow_pyfunc_as_the_jobs_compute(world, tmp_path):
    run_embed(
        EmbedConfig(model=world["model"], corpus=world["corpus"], out=str(tmp_path / "e"), in_process=True)
    )
    job = np.stack(read_embeddings(str(tmp_path / "e")).to_pandas().embedding)
    loaded = mlflow.pyfunc.load_model(world["model"])
    assert loaded.metadata.get_input_schema().input_names() == ["input_ids", "cell_id"]
    np.testing.assert_allclose(loaded.predict(world["frame"]), job, atol=1e-5)
    cls = loaded.predict(world["frame"].head(3), params={"pooling": "cls"})
    assert cls.shape == (3, 32) and not np.allclose(cls, job[:3])
    # the example MLflow saved beside it is a valid request
    example = json.loads((tmp_path.parent / world["model"] / "input_example.json").read_text())
    assert loaded.predict(pd.DataFrame(example["data"], columns=example["columns"])).shape == (1, 32)
    # still a Hugging Face folder
    plain = BertForMaskedLM.from_pretrained(world["model"])
    assert plain.config.vocab_size == N_GENES + 4
    run_predict("cells", PredictConfig(model=world["clf"], corpus=world["corpus"], out=str(tmp_path / "p")))
    want = pd.read_parquet(tmp_path / "p" / "cell_predictions.parquet")
    got = mlflow.pyfunc.load_model(world["clf"]).predict(world["frame"])
    assert got.cell_id.tolist() == want.cell_id.tolist() and got.predicted.tolist() == want.predicted.tolist()
    probs = [f"prob_{c}" for c in CLASSES]
    np.testing.assert_allclose(got[probs].to_numpy(), want[probs].to_numpy(), atol=1e-5)
    config = BertForSequenceClassification.from_pretrained(world["clf"]).config
    assert config.id2label == {0: "a", 1: "b/c"} and config.label2id == {"a": 0, "b/c": 1}


def _register(world, uri: str, name: str, folder: str) -> None:
    run = tracking.start_run(uri, "pyfunc", "register")
    tracking.log_artifacts(uri, run, folder, "model")
    tracking.register_model(uri, run, "model", name, "current", {})
    tracking.end_run(uri, run)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_registered_model_through_pyfunc_and_mlflow_models_serve(world, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _register(world, uri, "pyfunc-embed", world["model"])
    mlflow.set_tracking_uri(uri)
    try:
        loaded = mlflow.pyfunc.load_model("models:/pyfunc-embed@current")
    finally:
        mlflow.set_tracking_uri(None)
    want = mlflow.pyfunc.load_model(world["model"]).predict(world["frame"])
    np.testing.assert_allclose(loaded.predict(world["frame"]), want, atol=1e-5)
    port = _port()
    env = {  # as in an activated environment: MLflow starts `uvicorn` from PATH
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "PYTHONPATH": os.pathsep.join(sys.path),
        "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
    }
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", "models:/pyfunc-embed@current"]
    cmd += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
            assert server.poll() is None, server.stdout.read().decode()[-3000:] if server.stdout else ""
        else:
            pytest.fail("mlflow models serve did not answer /ping within 120 s")
        body = {"dataframe_split": world["frame"].head(8).to_dict(orient="split", index=False)}
        answer = requests.post(f"http://127.0.0.1:{port}/invocations", json=body, timeout=60)
        assert answer.status_code == 200, answer.text[:500]
        np.testing.assert_allclose(np.asarray(answer.json()["predictions"]), want[:8], atol=1e-5)
        bad = requests.post(
            f"http://127.0.0.1:{port}/invocations",
            json={"dataframe_split": {"columns": ["x"], "data": [[1]]}},
            timeout=60,
        )
        assert bad.status_code >= 400
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
