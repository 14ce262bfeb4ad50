"""Load test of `/v1/embed` on 127.0.0.1: `tiny` model, CPU, N requests of one cell each at a
fixed concurrency; p50/p95/p99 latency, throughput and errors; then the same with one model
replica killed halfway (the client retries once, as a production client would). The client is a
keep-alive HTTP/1.1 connection per thread (the standard library's, which costs the 2-core
machine less CPU than `requests`).

Records (`serve`): p50_ms, p95_ms, p99_ms, requests_per_s, errors, failed_during_replica_kill.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from common import HERE, WORK, record

sys.path.insert(0, str(HERE.parent / "tests"))
from pretrain_helpers import write_corpus


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--replicas", type=int, default=1)
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from ray import serve
    from transformers import BertForMaskedLM

    from rankformer.model.presets import bert_config, preset
    from rankformer.model.store import save_model_dir
    from rankformer.serving import ServeConfig, run_serve
    from rankformer.synth import programme_cells
    from rankformer.vocab import GeneVocab

    work = WORK / "serve"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cells, _, _ = programme_cells(200, 3, 100, 100, 300, seed=0)
    corpus = write_corpus(str(work / "corpus"), cells, 400, shards=1)
    with open(os.path.join(corpus, "manifest.json")) as f:
        vocab = GeneVocab.load(json.load(f)["config"]["vocab"])
    torch.manual_seed(0)
    model = str(work / "model")
    save_model_dir(
        BertForMaskedLM(bert_config(preset("tiny"), vocab)),
        vocab,
        {"task": "masked-lm", "layout": "v2", "max_length": 4096},
        model,
    )
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    cfg = ServeConfig(model=model, port=8123, min_replicas=args.replicas, max_replicas=args.replicas)
    run_serve(cfg, block=False)
    bodies = [json.dumps({"cells": [{"cell_id": str(i), "tokens": c.tolist()}]}) for i, c in enumerate(cells)]
    local = threading.local()

    def post(i: int) -> bool:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection("127.0.0.1", cfg.port, timeout=30)
        try:
            body = bodies[i % len(bodies)].encode()
            conn.request("POST", "/v1/embed", body, {"content-type": "application/json"})
            r = conn.getresponse()
            r.read()
            return r.status == 200
        except (OSError, http.client.HTTPException):
            conn.close()
            local.conn = None
            return False

    def one(i: int, retry: bool) -> tuple[float, bool, bool]:
        t = time.perf_counter()
        for attempt in range(2 if retry else 1):
            if post(i):
                return time.perf_counter() - t, True, attempt > 0
        return time.perf_counter() - t, False, False

    for i in range(50):  # warm up
        one(i, False)
    conf = {
        "preset": "tiny",
        "device": "cpu",
        "requests": args.requests,
        "concurrency": args.concurrency,
        "replicas": args.replicas,
        "cell_tokens": int(np.mean([len(c) for c in cells])),
        "client": "http.client keep-alive, one connection per thread",
        "batch_wait_timeout_s": cfg.batch_wait_timeout_s,
    }

    def run(kill: bool) -> tuple[list[float], int, float]:
        lat: list[float] = []
        bad = 0
        t0 = time.perf_counter()
        killer = threading.Timer(2.0, _kill_replica) if kill else None
        if killer:
            killer.start()
        with ThreadPoolExecutor(args.concurrency) as pool:
            for dt, ok, _ in pool.map(lambda i: one(i, kill), range(args.requests)):
                lat.append(dt)
                bad += 0 if ok else 1
        return lat, bad, time.perf_counter() - t0

    lat, bad, wall = run(False)
    ms = np.asarray(lat) * 1000
    for q, name in ((50, "p50_ms"), (95, "p95_ms"), (99, "p99_ms")):
        record("serve", name, float(np.percentile(ms, q)), "ms", conf)
    record("serve", "requests_per_s", args.requests / wall, "requests/s", conf)
    record("serve", "errors", bad, "requests", conf)
    _, failed, _ = run(True)
    record("serve", "failed_during_replica_kill", failed, "requests", {**conf, "client_retries": 1})
    serve.shutdown()
    ray.shutdown()


def _kill_replica() -> None:
    import ray

    from rankformer.serving import DEPLOYMENT

    for a in ray.util.list_named_actors(all_namespaces=True):
        if f"#{DEPLOYMENT}#" in a["name"]:
            ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=True)
            print(f"killed replica {a['name']}", flush=True)
            return


if __name__ == "__main__":
    main()
