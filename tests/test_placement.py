"""Jobs a cluster can never run end with an error naming the numbers and the flag, before any work
starts, instead of waiting forever; and a job never joins another driver's private Ray."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest
import torch
from transformers import BertForMaskedLM

from conftest import REPO
from pretrain_helpers import write_corpus
from rankformer.cli import main
from rankformer.io.synth import gene_ids, programme_cells
from rankformer.model.presets import bert_config, preset
from rankformer.model.store import save_model_dir
from rankformer.placement import Demand, shortfall
from rankformer.vocab.gene_vocab import GeneVocab

TWO_CPUS = [{"CPU": 2.0}]
CLUSTER = [{"CPU": 2.0}, {"CPU": 2.0}]  # the test cluster: two raylets of 2 CPUs


def _workers(n: int, cpus: float, **kw: object) -> Demand:
    return Demand("Ray Train workers", n, cpus=cpus, flags="--num-workers or --cpus-per-worker", **kw)  # type: ignore[arg-type]


def test_two_workers_on_a_two_core_machine_leave_nothing_for_the_reads():
    why = shortfall(_workers(2, 1.0, beside_cpus=1.0, beside_what="the corpus reads"), TWO_CPUS)
    assert why is not None and "leave no 1 CPU for the corpus reads" in why and "2 CPUs on 1 node" in why
    assert shortfall(_workers(2, 0.5, beside_cpus=1.0, beside_what="reads"), TWO_CPUS) is None


def test_more_than_the_cluster_has_or_more_than_a_node_holds():
    why = shortfall(_workers(5, 1.0), CLUSTER)
    assert why is not None and "5 Ray Train workers x 1 CPU need 5 CPU" in why and "4 CPUs on 2 nodes" in why
    why = shortfall(_workers(1, 3.0), CLUSTER)
    assert why is not None and "no node has that (the largest has 2 CPU" in why
    assert shortfall(_workers(4, 1.0), CLUSTER) is None
    # every bundle on one node: 3 x 1 CPU fit the cluster but no node
    why = shortfall(_workers(3, 1.0, strategy="STRICT_PACK"), CLUSTER)
    assert why is not None and "on one node (STRICT_PACK)" in why
    assert shortfall(_workers(2, 1.0, strategy="STRICT_SPREAD"), CLUSTER) is None
    assert shortfall(_workers(3, 0.5, strategy="STRICT_SPREAD"), CLUSTER) is not None


def test_gpus_and_pools_that_need_only_one_member():
    gpu = Demand("actors", 2, cpus=1.0, gpus=1.0)
    assert "1 CPU + 1 GPU" in (shortfall(gpu, CLUSTER) or "")
    assert shortfall(gpu, [{"CPU": 8.0, "GPU": 2.0}]) is None
    trials = Demand("Tune trials", 10, cpus=1.0, gang=False)  # run as resources allow
    assert shortfall(trials, TWO_CPUS) is None
    assert shortfall(Demand("Tune trials", 10, cpus=3.0, gang=False), TWO_CPUS) is not None


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("placement")
    n_genes = 80
    cells, types, progs = programme_cells(60, 2, 30, 20, 30, seed=1)
    corpus = write_corpus(str(d / "corpus"), cells, n_genes, carry={"cell_type": [f"t{t}" for t in types]})
    import json

    vocab = GeneVocab.load(json.loads((d / "corpus" / "manifest.json").read_text())["config"]["vocab"])
    torch.manual_seed(0)
    model = BertForMaskedLM(bert_config(preset("tiny"), vocab))
    save_model_dir(model, vocab, {"task": "masked-lm", "layout": "v2", "max_length": 64}, str(d / "model"))
    ids = gene_ids(n_genes)
    for t in (0, 1):
        (d / f"t{t}.txt").write_text("\n".join(ids[progs[t] - 4]))
    return SimpleNamespace(d=d, corpus=corpus, model=str(d / "model"))


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str], *expected: str) -> None:
    t0 = time.perf_counter()
    assert main(argv) == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, err
    assert "cannot add nodes, so the job would never start" in err
    print(f"refused in {time.perf_counter() - t0:.1f}s")


@pytest.mark.ray
@pytest.mark.timeout(300)  # each would otherwise wait forever
def test_each_job_that_places_work_is_refused_on_the_test_cluster(ray_cluster, small, tmp_path, capsys):
    """The two-raylet cluster has 4 CPUs, 2 a node, and no autoscaler."""
    track = ["--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]
    on = ["--ray-address", ray_cluster["address"]]
    pre = [
        "pretrain",
        "--corpus",
        small.corpus,
        "--out",
        str(tmp_path / "m"),
        "--max-steps",
        "5",
        *track,
        *on,
    ]
    _refused([*pre, "--num-workers", "5"], capsys, "5 Ray Train workers x 1 CPU need 5 CPU", "--num-workers")
    _refused([*pre, "--num-workers", "4"], capsys, "leave no 1 CPU for Ray Data's corpus listing and reads")
    _refused([*pre, "--num-workers", "2", "--cpus-per-worker", "3"], capsys, "no node has that")
    genes = [
        "finetune",
        "genes",
        "--corpus",
        small.corpus,
        "--model",
        small.model,
        "--out",
        str(tmp_path / "g"),
    ]
    labels = ["--labels", f"x={small.d / 't0.txt'}", "--labels", f"y={small.d / 't1.txt'}", *track, *on]
    _refused([*genes, *labels, "--num-workers", "3", "--cpus-per-worker", "2"], capsys, "3 Ray Train workers")
    _refused([*genes, *labels, "--trials", "2", "--cpus-per-trial", "3"], capsys, "each of the Tune trials")
    cells = [
        "finetune",
        "cells",
        "--corpus",
        small.corpus,
        "--model",
        small.model,
        "--out",
        str(tmp_path / "c"),
    ]
    _refused([*cells, *track, *on, "--num-workers", "5"], capsys, "5 Ray Train workers")
    embed = ["embed", "--corpus", small.corpus, "--model", small.model, "--out", str(tmp_path / "e"), *on]
    _refused([*embed, "--num-workers", "5", "--use-gpu"], capsys, "actors of the pool", "1 GPU")
    perturb = ["perturb", "--corpus", small.corpus, "--model", small.model, "--out", str(tmp_path / "p")]
    _refused(
        [*perturb, *on, "--mode", "all", "--num-workers", "2", "--use-gpu"], capsys, "actors of the pool"
    )
    os.environ["RAY_ADDRESS"] = ray_cluster["address"]
    try:
        serve = ["serve", "--model", small.model, "--port", "0", "--min-replicas", "9", "--max-replicas", "9"]
        _refused(serve, capsys, "9 Serve replicas of rankformer x 0.5 CPU need 4.5 CPU", "--min-replicas")
    finally:
        os.environ.pop("RAY_ADDRESS")


def test_only_a_cluster_started_to_be_shared_is_joined(monkeypatch):
    """`ray start` records its address; a driver's private instance records nothing and is never
    joined, however many (or few) Ray instances run on the machine."""
    import ray._private.services as services
    import ray._private.utils as utils

    from rankformer.cluster import shared_local_cluster

    running = {"10.0.0.1:6379"}
    monkeypatch.setattr(services, "find_gcs_addresses", lambda: frozenset(running))
    monkeypatch.setattr(utils, "read_ray_address", lambda temp_dir=None: None)
    assert shared_local_cluster() is None  # one instance runs, but no `ray start` made it
    monkeypatch.setattr(utils, "read_ray_address", lambda temp_dir=None: "10.0.0.1:6379")
    assert shared_local_cluster() == "10.0.0.1:6379"
    running.clear()  # `ray stop` leaves the file behind: a stale address is not joined
    assert shared_local_cluster() is None


_DRIVER = textwrap.dedent(
    """
    import os, sys, time
    import ray
    from rankformer.cluster import ensure_ray
    from rankformer.config.corpus import ClusterOptions

    me, other, flags = sys.argv[1], sys.argv[2], sys.argv[3]
    ensure_ray(ClusterOptions())
    print("gcs", ray.get_runtime_context().gcs_address, flush=True)

    @ray.remote(num_cpus=0.1)
    def square(x):
        return x * x

    assert ray.get(square.remote(3)) == 9
    open(os.path.join(flags, me + "-ready"), "w").close()
    deadline = time.time() + 150
    while not os.path.exists(os.path.join(flags, other + ("-done" if me == "second" else "-ready"))):
        assert time.time() < deadline, "the other job never got there"
        time.sleep(0.2)
    if me == "second":  # keep working after the first job (and its private Ray) ended
        end = time.time() + 8
        while time.time() < end:
            assert ray.get(square.remote(4)) == 16
            time.sleep(0.2)
    open(os.path.join(flags, me + "-done"), "w").close()
    print(me, "finished", flush=True)
    """
)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_jobs_side_by_side_the_first_ending_while_the_second_runs(tmp_path):
    """Two drivers on one machine with no cluster named: the second does not join the first one's
    private Ray, so it keeps working after the first ends (it used to die with "Owner's node has
    crashed")."""
    import tempfile

    flags = tmp_path / "flags"
    flags.mkdir()
    ray_tmp = tempfile.mkdtemp(prefix="rf-", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "PYTHONPATH": str(REPO / "platform")}
    env.pop("RAY_ADDRESS", None)
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER)

    def start(me: str, other: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, str(script), me, other, str(flags)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    first = start("first", "second")
    deadline = time.time() + 150
    while not (flags / "first-ready").exists():
        assert first.poll() is None and time.time() < deadline, first.communicate()[0][-3000:]
        time.sleep(0.5)
    second = start("second", "first")
    out_first, _ = first.communicate(timeout=300)
    out_second, _ = second.communicate(timeout=300)
    assert first.returncode == 0, out_first[-3000:]
    assert second.returncode == 0, out_second[-3000:]
    assert "second finished" in out_second
    gcs = [
        next(line for line in out.splitlines() if line.startswith("gcs ")) for out in (out_first, out_second)
    ]
    assert gcs[0] != gcs[1], gcs


def test_an_autoscaler_is_told_apart_from_a_cluster_started_by_hand(monkeypatch):
    """Autoscaler v2 records itself in the GCS; v1's status names the node types it launches, where
    a cluster started by hand has only the read-only provider's `node_<id>` types."""
    import json as js

    import ray.experimental.internal_kv as kv

    from rankformer.placement import can_autoscale

    store: dict[bytes, bytes] = {}

    def get(key: str | bytes, namespace: bytes | None = None) -> bytes | None:
        return store.get(key if isinstance(key, bytes) else key.encode())

    monkeypatch.setattr(kv, "_internal_kv_get", get)
    assert not can_autoscale()  # no status at all
    by_hand = {"autoscaler_report": {"active_nodes": {"node_35ca0ddb": 1}, "pending_launches": {}}}
    store[b"__autoscaling_status"] = js.dumps(by_hand).encode()
    assert not can_autoscale()
    launcher = {"autoscaler_report": {"active_nodes": {"head": 1}, "pending_launches": {"gpu-workers": 2}}}
    store[b"__autoscaling_status"] = js.dumps(launcher).encode()
    assert can_autoscale()
    store.clear()
    store[b"__autoscaler_v2_enabled"] = b"1"
    assert can_autoscale()


def test_strict_pack_leaves_the_task_beside_to_any_node():
    # 2 workers fill one 2-CPU node; the listing task runs on the other node
    demand = _workers(2, 1.0, strategy="STRICT_PACK", beside_cpus=1.0, beside_what="reads")
    assert shortfall(demand, CLUSTER) is None
    assert "leave no 1 CPU for reads" in (shortfall(demand, TWO_CPUS) or "")
