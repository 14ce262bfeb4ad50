"""The Ray Serve endpoints on 127.0.0.1, with a `tiny` model registered in a real MLflow store:
answers equal the batch jobs', bad input is a 4xx naming the field, the API key is enforced, a
reload under load fails no request."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest
import requests
import torch
from transformers import BertForMaskedLM

from conftest import _free_port
from pretrain_helpers import write_corpus
from rankformer.embed.cells import EmbedConfig, read_embeddings, run_embed
from rankformer.errors import InputError
from rankformer.io.synth import gene_ids, programme_cells
from rankformer.model.presets import bert_config, preset
from rankformer.model.store import save_model_dir
from rankformer.perturb.job import PerturbConfig, read_results, run_perturb
from rankformer.vocab.gene_vocab import GeneVocab

pytestmark = [pytest.mark.ray, pytest.mark.slow]
N_GENES = 20 + 2 * 30
KEY = "test-key-123"


def _model(d, vocab, seed: int) -> str:
    torch.manual_seed(seed)
    model = BertForMaskedLM(bert_config(preset("tiny"), vocab)).eval()
    out = str(d / f"model{seed}")
    save_model_dir(model, vocab, {"task": "masked-lm", "layout": "v2", "max_length": 64}, out)
    return out


@pytest.fixture(scope="module")
def app(tmp_path_factory, ray_cluster):
    from ray import serve

    from rankformer import tracking
    from rankformer.config.serve import ServeConfig
    from rankformer.serve.app import run_serve

    d = tmp_path_factory.mktemp("serve")
    cells, _, _ = programme_cells(40, 2, 30, 20, 40, seed=5)
    corpus = write_corpus(str(d / "corpus"), cells, N_GENES, shards=2, symbols=True)  # gene i is G<i>
    vocab = GeneVocab.load(json.loads((d / "corpus" / "manifest.json").read_text())["config"]["vocab"])
    uri = f"sqlite:///{d}/mlflow.db"
    versions = []
    for seed in (0, 1):
        path = _model(d, vocab, seed)
        run = tracking.start_run(uri, "serve", f"m{seed}")
        tracking.log_artifacts(uri, run, path, "model")
        versions.append(tracking.register_model(uri, run, "model", "serve-test", "current", {}))
        tracking.end_run(uri, run)
    tracking.set_alias(uri, "serve-test", "current", versions[0])
    (d / "key").write_text(KEY + "\n")
    port = _free_port()
    cfg = ServeConfig(
        model="models:/serve-test@current",
        tracking_uri=uri,
        port=port,
        api_key_file=str(d / "key"),
        max_cells_per_request=8,
        max_perturbations_per_request=4,
        max_body_bytes=200_000,
        max_tokens=4096,
        min_replicas=1,
        max_replicas=1,
    )
    url = run_serve(cfg, block=False)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=2).ok:
                break
        except requests.RequestException:
            time.sleep(1)
    yield SimpleNamespace(
        d=d,
        url=url,
        corpus=corpus,
        cells=cells,
        vocab=vocab,
        uri=uri,
        cfg=cfg,
        versions=versions,
        model0=str(d / "model0"),
    )
    serve.shutdown()


def post(app, path, body, key=KEY, **kw):
    headers = {"x-api-key": key} if key else {}
    return requests.post(f"{app.url}{path}", json=body, headers=headers, timeout=60, **kw)


def test_model_info(app):
    info = requests.get(f"{app.url}/v1/model", headers={"x-api-key": KEY}, timeout=30).json()
    assert info["name"] == "serve-test" and info["alias"] == "current" and info["version"] == app.versions[0]
    assert info["vocab_hash"] == app.vocab.content_hash and info["layout"] == "v2"
    # how the replica runs: --max-tokens reaches it (it was checked, then left out)
    assert (info["device"], info["precision"], info["max_tokens"]) == ("cpu", "float32", 4096)
    spec = requests.get(f"{app.url}/openapi.json", timeout=30).json()
    # the API key is a security scheme on the /v1/ paths; responses have schemas
    schemes = spec["components"]["securitySchemes"]
    assert [s["name"] for s in schemes.values()] == ["x-api-key"]
    assert all("security" in spec["paths"][p][m] for p, m in (("/v1/embed", "post"), ("/v1/perturb", "post")))
    ok = spec["paths"]["/v1/embed"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok["$ref"].endswith("/EmbedResponse")
    assert "embedding" in spec["components"]["schemas"]["EmbeddedCell"]["properties"]
    assert "cell_cosine" in spec["components"]["schemas"]["PerturbResult"]["properties"]


def test_embed_equals_the_batch_job(app, tmp_path):
    run_embed(EmbedConfig(model=app.model0, corpus=app.corpus, out=str(tmp_path / "e"), in_process=True))
    want = np.asarray(read_embeddings(str(tmp_path / "e")).column("embedding").to_pylist())
    body = {"cells": [{"cell_id": f"c{i}", "tokens": app.cells[i].tolist()} for i in range(8)]}
    got = post(app, "/v1/embed", body).json()["cells"]
    assert [c["cell_id"] for c in got] == [f"c{i}" for i in range(8)]  # request order
    np.testing.assert_allclose(np.asarray([c["embedding"] for c in got]), want[:8], atol=1e-5)


def test_counts_and_ranked_genes_are_tokenized_like_the_corpus(app):
    from rankformer.corpus.memory import tokenize_anndata

    ids = gene_ids(N_GENES)
    rng = np.random.default_rng(0)
    counts = {str(g): float(c) for g, c in zip(ids[:30], rng.integers(1, 20, 30), strict=True)}
    counts["NOT_A_GENE"] = 3.0
    import scipy.sparse as sp

    x = sp.csr_matrix(np.asarray([[counts[g] for g in ids[:30]]]))
    want = tokenize_anndata(x, app.vocab, gene_ids=list(ids[:30]), coverage_floor=0.0)
    cell_tokens = want.column("input_ids")[0].as_py()
    a = post(app, "/v1/embed", {"cells": [{"counts": counts, "n_counts": float(x.sum())}]}).json()["cells"][0]
    b = post(app, "/v1/embed", {"cells": [{"tokens": cell_tokens}]}).json()["cells"][0]
    assert a["n_tokens"] == len(cell_tokens) and a["unknown_genes"] == {"count": 1, "genes": ["NOT_A_GENE"]}
    np.testing.assert_allclose(a["embedding"], b["embedding"], atol=1e-6)
    ranked = [ids[t - 4] for t in cell_tokens[1:-1]]
    c = post(app, "/v1/embed", {"cells": [{"genes": ranked, "cell_id": "r"}], "gene_vectors": True}).json()
    np.testing.assert_allclose(c["cells"][0]["embedding"], b["embedding"], atol=1e-6)
    assert set(c["cells"][0]["gene_vectors"]) == set(ranked)
    by_symbol = {f"G{i}": counts[str(g)] for i, g in enumerate(ids[:30])}  # symbols the vocabulary names
    d = post(app, "/v1/embed", {"cells": [{"counts": by_symbol, "n_counts": float(x.sum())}]}).json()[
        "cells"
    ][0]
    assert d["n_tokens"] == len(cell_tokens) and d["unknown_genes"]["count"] == 0
    np.testing.assert_allclose(d["embedding"], b["embedding"], atol=1e-6)


def test_perturb_equals_the_batch_job(app, tmp_path):
    gene = gene_ids(N_GENES)[app.cells[0][3] - 4]
    run_perturb(
        PerturbConfig(
            model=app.model0, corpus=app.corpus, out=str(tmp_path / "p"), genes=[gene], in_process=True
        )
    )
    rows = read_results(str(tmp_path / "p")).to_pandas()
    want = rows[rows.cell_id == "c0"].iloc[0]
    got = post(
        app, "/v1/perturb", {"cell": {"tokens": app.cells[0].tolist()}, "genes": [gene], "per_gene": True}
    ).json()
    r = got["results"][0]
    assert r["perturbed"] == [gene]
    assert r["cell_cosine"] == pytest.approx(want.cell_cosine, abs=1e-5)
    assert r["gene_mean_cosine"] == pytest.approx(want.gene_mean_cosine, abs=1e-5)
    assert len(r["gene_cosines"]) == len(app.cells[0]) - 3


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"cells": [{"counts": {}}]}, 422, "counts"),
        ({"cells": [{"counts": {"ENSG00000000001": -1.0}}]}, 422, "counts"),
        ({"cells": [{"counts": {"ENSG00000000001": 1.0}, "tokens": [2, 5, 3]}]}, 422, "exactly one"),
        ({"cells": []}, 422, "cells"),
        ({"cells": [{"tokens": [2, 5, 3]}] * 9}, 422, "cells"),
        ({"cells": [{"tokens": [2, 99999, 3]}]}, 422, "tokens"),
        ({"cells": [{"genes": ["NOPE1", "NOPE2"]}]}, 422, "vocabulary"),
        ({"cells": [{"tokens": [2, 5, 3]}], "layer": "top"}, 422, "layer"),
        ({"cells": [{"tokens": [2, 5, 3]}], "layer": "99"}, 422, "layer: layer 99 is outside"),
    ],
)
def test_bad_input_is_a_4xx_naming_the_field(app, body, status, field):
    r = post(app, "/v1/embed", body)
    assert r.status_code == status, r.text
    assert field in r.text


def test_a_model_that_cannot_serve_is_refused_at_the_door(app, capsys):
    """Before any replica starts (one that cannot load its model would be retried until the
    deployment times out): a missing model, one not in the registry, a default layer it lacks."""
    from ray import serve

    from rankformer.cli import main

    apps = set(serve.status().applications)
    assert main(["serve", "--model", str(app.d / "nowhere")]) == 2
    assert main(["serve", "--model", "models:/nope@current", "--tracking-uri", app.uri]) == 2
    assert main(["serve", "--model", app.model0, "--layer", "40", "--name", "other"]) == 2
    err = capsys.readouterr().err
    assert "nowhere not found" in err and "not in the registry" in err
    assert "layer 40 is outside this model's hidden_states" in err
    assert set(serve.status().applications) == apps


def test_a_running_serve_is_not_silently_overridden(app):
    """Serve keeps its first HTTP address (and only logs that a new one is ignored), and a
    declarative deploy removes the applications it does not name: both are refused, unchanged."""
    from ray import serve

    from rankformer.config.serve import ServeConfig
    from rankformer.serve.app import run_serve

    apps = set(serve.status().applications)
    other_port = ServeConfig(**{**app.cfg.__dict__, "port": app.cfg.port + 1})
    with pytest.raises(
        InputError, match=f"already runs on this Ray cluster at http://127.0.0.1:{app.cfg.port}"
    ):
        run_serve(other_port, block=False)
    other_name = ServeConfig(**{**app.cfg.__dict__, "name": "second"})
    with pytest.raises(InputError, match=r"runs application\(s\) \['"):
        run_serve(other_name, block=False)
    assert set(serve.status().applications) == apps


def test_malformed_oversized_nan_and_unauthorised(app):
    headers = {"x-api-key": KEY, "content-type": "application/json"}
    r = requests.post(f"{app.url}/v1/embed", data=b'{"cells": [', headers=headers, timeout=30)
    assert r.status_code == 422
    r = requests.post(
        f"{app.url}/v1/embed",
        data=b'{"cells": [{"counts": {"ENSG00000000001": NaN}}]}',
        headers=headers,
        timeout=30,
    )
    assert r.status_code == 422 and "finite" in r.text
    big = {"cells": [{"genes": ["ENSG00000000001"] * 30_000}]}
    assert post(app, "/v1/embed", big).status_code == 413
    assert post(app, "/v1/embed", {"cells": [{"tokens": [2, 5, 3]}]}, key=None).status_code == 401
    assert post(app, "/v1/embed", {"cells": [{"tokens": [2, 5, 3]}]}, key="wrong").status_code == 401
    r = post(app, "/v1/perturb", {"cell": {"tokens": [2, 5, 3]}, "genes": ["ENSG00000000002"]})
    assert r.status_code == 422 and "without genes" in r.text
    five = list(gene_ids(N_GENES)[app.cells[0][1:6] - 4])  # five genes of the cell
    r = post(
        app, "/v1/perturb", {"cell": {"tokens": app.cells[0].tolist()}, "genes": five, "together": False}
    )
    assert r.status_code == 422 and "5 perturbations (each gene alone) is over the limit of 4" in r.text
    r = post(app, "/v1/perturb", {"cell": {"tokens": app.cells[0].tolist()}, "genes": five})
    assert r.status_code == 200 and set(r.json()["results"][0]["perturbed"]) == set(five)  # together: one


def test_bad_serve_numbers_are_named_before_ray_starts():
    from rankformer.config.serve import ServeConfig

    with pytest.raises(
        InputError, match=r"--max-replicas 0 must be >= 1; .*--min-replicas 2 must be <= --max"
    ):
        ServeConfig(model="m", min_replicas=2, max_replicas=0)
    with pytest.raises(InputError, match=r"--max-perturbations-per-request 0 must be >= 1"):
        ServeConfig(model="m", max_perturbations_per_request=0)
    with pytest.raises(InputError, match=r"--target-ongoing-requests 0 must be > 0; --port 70000"):
        ServeConfig(model="m", target_ongoing_requests=0, port=70000)


def test_reload_after_moving_the_alias_fails_no_request(app):
    """Moving the alias and bumping the deployment's user_config revision reloads the model in the
    running replica (not a redeploy) while 4 clients keep sending requests."""
    from ray import serve

    from rankformer import tracking
    from rankformer.config.serve import ServeConfig
    from rankformer.serve.app import DEPLOYMENT, run_serve

    stop = threading.Event()
    codes: list[int] = []
    body = {"cells": [{"tokens": app.cells[1].tolist()}]}

    def load() -> None:
        while not stop.is_set():
            codes.append(post(app, "/v1/embed", body).status_code)

    before = post(app, "/v1/embed", body).json()["cells"][0]["embedding"]
    with ThreadPoolExecutor(4) as pool:
        try:
            for _ in range(4):
                pool.submit(load)
            time.sleep(1.0)
            replicas = _replica_ids(app.cfg.name)
            tracking.set_alias(app.uri, "serve-test", "current", app.versions[1])
            app.cfg = ServeConfig(**{**app.cfg.__dict__, "revision": 1})
            run_serve(app.cfg, block=False)
            deadline = time.time() + 60
            info: dict = {}
            while time.time() < deadline and info.get("revision") != 1:
                info = requests.get(f"{app.url}/v1/model", headers={"x-api-key": KEY}, timeout=30).json()
                time.sleep(0.5)
            time.sleep(1.0)
        finally:
            stop.set()
    assert codes and set(codes) == {200}, set(codes)
    assert info["version"] == app.versions[1] and info["revision"] == 1
    assert _replica_ids(app.cfg.name) == replicas  # reloaded in place, not replaced
    assert serve.status().applications[app.cfg.name].deployments[DEPLOYMENT].status == "HEALTHY"
    after = post(app, "/v1/embed", body).json()["cells"][0]["embedding"]
    assert not np.allclose(before, after)


def _replicas(app_name: str) -> int:
    from ray import serve

    from rankformer.serve.app import DEPLOYMENT

    status = serve.status().applications[app_name].deployments[DEPLOYMENT]
    return sum(n for state, n in status.replica_states.items() if str(state).endswith("RUNNING"))


def _replica_ids(app_name: str) -> set[str]:
    import ray

    from rankformer.serve.app import DEPLOYMENT

    return {
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if f"{app_name}#{DEPLOYMENT}#" in a["name"]
    }


def test_autoscaling_and_a_killed_replica(app):
    """A second application (1..2 replicas, one ongoing request per replica as the target): under
    sustained load it grows to 2 replicas and shrinks back when the load stops; a replica killed
    during load is replaced, and no request fails beyond one client retry."""
    import ray
    from ray import serve

    from rankformer.config.serve import ServeConfig
    from rankformer.serve.app import DEPLOYMENT, deploy

    cfg = ServeConfig(
        **{
            **app.cfg.__dict__,
            "name": "auto",
            "min_replicas": 1,
            "max_replicas": 2,
            "target_ongoing_requests": 1.0,
            "upscale_delay_s": 1.0,
            "downscale_delay_s": 4.0,
        }
    )
    deploy([(app.cfg, "/"), (cfg, "/auto")])  # declarative, as `serve deploy`: both applications
    body = {"cells": [{"tokens": app.cells[i].tolist()} for i in range(8)]}
    stop = threading.Event()
    failed, retried = [], []

    def load() -> None:
        while not stop.is_set():
            for attempt in range(2):
                try:
                    if post(app, "/auto/v1/embed", body).status_code == 200:
                        if attempt:
                            retried.append(1)
                        break
                except requests.RequestException:
                    pass
            else:
                failed.append(1)

    peak = 1
    with ThreadPoolExecutor(8) as pool:
        try:
            for _ in range(8):
                pool.submit(load)
            deadline = time.time() + 90
            while time.time() < deadline and peak < 2:
                peak = max(peak, _replicas("auto"))
                time.sleep(0.5)
            assert peak == 2, "the deployment did not grow under load"
            victim = next(
                a
                for a in ray.util.list_named_actors(all_namespaces=True)
                if f"auto#{DEPLOYMENT}#" in a["name"]
            )
            ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
            time.sleep(6.0)
        finally:
            stop.set()  # the load threads end with the test, whatever happened
    assert not failed, f"{len(failed)} requests failed after a retry"
    deadline = time.time() + 60
    while time.time() < deadline and _replicas("auto") != 1:
        time.sleep(1.0)
    assert _replicas("auto") == 1, "the deployment did not shrink back after the load"
    deploy([(app.cfg, "/")])  # the second application goes; the first is untouched
    deadline = time.time() + 60
    while time.time() < deadline and "auto" in serve.status().applications:
        time.sleep(0.5)
    assert "auto" not in serve.status().applications
    assert post(app, "/v1/embed", {"cells": [{"tokens": app.cells[0].tolist()}]}).status_code == 200
