"""Load test of `/v1/embed` on 127.0.0.1: `tiny` model, CPU, N requests of one cell each at a
fixed concurrency; p50/p95/p99 latency, throughput and errors; then the same with one model
replica killed halfway (the client retries once, as a production client would). The clients are
asyncio keep-alive HTTP/1.1 connections in this process, so the load generator takes as little
as it can of the 2 cores it shares with the proxy and the replica.

Records (`serve`): p50_ms, p95_ms, p99_ms, requests_per_s, errors, failed_during_replica_kill.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time

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

    from rankformer.config.serve import ServeConfig
    from rankformer.io.synth import programme_cells
    from rankformer.model.presets import bert_config, preset
    from rankformer.model.store import save_model_dir
    from rankformer.serve.app import run_serve
    from rankformer.vocab.gene_vocab import GeneVocab

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
    bodies = [
        json.dumps({"cells": [{"cell_id": str(i), "tokens": c.tolist()}]}).encode()
        for i, c in enumerate(cells)
    ]
    conf = {
        "preset": "tiny",
        "device": "cpu",
        "requests": args.requests,
        "concurrency": args.concurrency,
        "replicas": args.replicas,
        "cell_tokens": int(np.mean([len(c) for c in cells])),
        "client": "asyncio, one keep-alive HTTP/1.1 connection per concurrent client",
        "batch_wait_timeout_s": cfg.batch_wait_timeout_s,
    }
    asyncio.run(load(cfg.port, bodies, 50, 4, False))  # warm up

    def run(kill: bool) -> tuple[list[float], int, float]:
        t0 = time.perf_counter()
        lat, bad = asyncio.run(load(cfg.port, bodies, args.requests, args.concurrency, kill))
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


class Client:
    """One keep-alive HTTP/1.1 connection (asyncio streams: a load generator should cost the
    machine it shares with the server as little CPU as it can)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, body: bytes) -> bool:
        try:
            if self.streams is None:
                self.streams = await asyncio.open_connection("127.0.0.1", self.port)
            reader, writer = self.streams
            writer.write(
                b"POST /v1/embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            status = int((await reader.readline()).split()[1])
            length, close = 0, False
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.lower() == "content-length":
                    length = int(value)
                elif name.lower() == "connection" and "close" in value.lower():
                    close = True
            await reader.readexactly(length)
            if close:
                self.close()
            return status == 200
        except (OSError, ValueError, IndexError, asyncio.IncompleteReadError):
            self.close()
            return False

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
        self.streams = None


async def load(
    port: int, bodies: list[bytes], n: int, concurrency: int, kill: bool
) -> tuple[list[float], int]:
    """``n`` requests from ``concurrency`` clients; with ``kill``, a model replica is killed after 2 s
    and each client retries a failed request once. Returns (latencies in s, failed requests)."""
    lat: list[float] = []
    failed = 0
    todo = iter(range(n))

    async def client() -> None:
        nonlocal failed
        c = Client(port)
        for i in todo:
            t = time.perf_counter()
            for _ in range(2 if kill else 1):
                if await c.post(bodies[i % len(bodies)]):
                    lat.append(time.perf_counter() - t)
                    break
            else:
                failed += 1
        c.close()

    async def killer() -> None:
        await asyncio.sleep(2.0)
        await asyncio.get_running_loop().run_in_executor(None, _kill_replica)

    await asyncio.gather(*(client() for _ in range(concurrency)), *([killer()] if kill else []))
    return lat, failed


def _kill_replica() -> None:
    import ray

    from rankformer.serve.app import DEPLOYMENT

    for a in ray.util.list_named_actors(all_namespaces=True):
        if f"#{DEPLOYMENT}#" in a["name"]:
            ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=True)
            print(f"killed replica {a['name']}", flush=True)
            return


if __name__ == "__main__":
    main()
