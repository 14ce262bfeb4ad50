"""Fixtures that start real components on 127.0.0.1: a two-raylet Ray cluster, a moto S3 server."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RANKFORMER_SHARED", REPO.parent / "shared"))
REFERENCE = SHARED / "reference"
DATA = SHARED / "data"

# Nothing writes to the real home or reaches for a hub.
_HOME = tempfile.mkdtemp(prefix="rankformer-test-home-")
for var, value in {
    "HOME": _HOME,
    "HF_HOME": f"{_HOME}/hf",
    "MPLCONFIGDIR": f"{_HOME}/mpl",
    "HF_HUB_OFFLINE": "1",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
}.items():
    os.environ[var] = value
os.environ.pop("RAY_ADDRESS", None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def needs_shared() -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        not DATA.exists(),
        reason=f"../shared not found at {SHARED}: the real test data and reference dictionaries live there",
    )


@pytest.fixture(scope="session")
def shared() -> Path:
    if not DATA.exists():
        pytest.skip(f"../shared not found at {SHARED}")
    return SHARED


def _ray(*args: str) -> None:
    ray_bin = Path(sys.executable).with_name("ray")
    subprocess.run([str(ray_bin), *args], check=True, capture_output=True, timeout=180)


@pytest.fixture(scope="session")
def ray_cluster(s3_server: str) -> Iterator[dict[str, str]]:
    """Two raylets on one machine (a real two-node cluster), shared by the whole session. Started
    after the S3 server so its nodes carry the AWS settings, as a configured cluster would."""
    import ray

    port, dash = _free_port(), _free_port()
    store = "--object-store-memory=1500000000"
    _ray(
        "start",
        "--head",
        f"--port={port}",
        "--node-ip-address=127.0.0.1",
        "--num-cpus=2",
        store,
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        "--disable-usage-stats",
    )
    try:
        _ray(
            "start",
            f"--address=127.0.0.1:{port}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=2",
            store,
            "--disable-usage-stats",
        )
        address = f"127.0.0.1:{port}"
        ray.init(address=address, log_to_driver=False)
        deadline = time.time() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.time() < deadline:
            time.sleep(0.5)
        ray.data.DataContext.get_current().enable_progress_bars = False
        wait_for_job_agent()
        yield {"address": address, "dashboard": f"http://127.0.0.1:{dash}"}
    finally:
        ray.shutdown()
        _ray("stop", "--force")


def wait_for_job_agent(timeout_s: float = 180.0) -> None:
    """Wait until the head node's job agent has registered its address in the GCS, which Ray does
    once the agent serves: `ray job submit` before then fails with "No available agent to submit
    job" (seen in a fresh clone under load)."""
    import ray
    from ray._private import ray_constants
    from ray.dashboard import consts
    from ray.experimental.internal_kv import _internal_kv_get

    head = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"])
    key = f"{consts.DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX}{head}".encode()
    deadline = time.time() + timeout_s
    while not _internal_kv_get(key, namespace=ray_constants.KV_NAMESPACE_DASHBOARD):
        if time.time() > deadline:
            raise RuntimeError(f"the head node's job agent did not register within {timeout_s:.0f}s")
        time.sleep(0.5)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1; AWS_* variables point every client at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {
        k: os.environ.get(k)
        for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    )
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _import_release(tmp_path_factory: pytest.TempPathFactory, shared: Path, release: str) -> str:
    """Geneformer's dictionaries of one release (gc104M = V2, gc30M = V1) as a vocab JSON."""
    from rankformer.vocab.geneformer import import_geneformer

    g = shared / "reference" / "geneformer"
    names = g / f"gene_name_id_dict_{release}.pkl"
    vocab = import_geneformer(
        str(g / f"token_dictionary_{release}.pkl"),
        str(g / f"gene_median_dictionary_{release}.pkl"),
        str(g / f"ensembl_mapping_dict_{release}.pkl"),
        str(names) if release == "gc104M" else None,
    )
    out = str(tmp_path_factory.mktemp("vocab") / f"gf_{release}.json")
    vocab.save(out)
    return out


@pytest.fixture(scope="session")
def geneformer_v2_vocab(tmp_path_factory: pytest.TempPathFactory, shared: Path) -> str:
    return _import_release(tmp_path_factory, shared, "gc104M")


@pytest.fixture(scope="session")
def geneformer_v1_vocab(tmp_path_factory: pytest.TempPathFactory, shared: Path) -> str:
    return _import_release(tmp_path_factory, shared, "gc30M")


@pytest.fixture(scope="session", autouse=True)
def _cleanup_home() -> Iterator[None]:
    yield
    shutil.rmtree(_HOME, ignore_errors=True)


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    return str(candidates[-1]) if candidates else None


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: drop to the postgres user when we are root."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A PostgreSQL server on 127.0.0.1 (Debian's package; .ci/run installs it). Yields its URL."""
    initdb, pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        msg = "PostgreSQL is not installed (apt-get install postgresql; .ci/run does this)"
        if os.environ.get("CI"):
            pytest.fail(msg + ": CI never skips the PostgreSQL-backed MLflow server test")
        pytest.skip(msg)
    root = tempfile.mkdtemp(prefix="rankformer-pg-")
    data, sock = os.path.join(root, "data"), os.path.join(root, "sock")
    os.makedirs(sock)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
    port = _free_port()
    subprocess.run(
        _as_postgres([initdb, "-D", data, "-A", "trust", "-U", "postgres"]),
        check=True,
        capture_output=True,
        timeout=120,
    )
    opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1"
    subprocess.run(
        _as_postgres([pg_ctl, "-D", data, "-o", opts, "-w", "-l", os.path.join(root, "log"), "start"]),
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        conn.autocommit = True
        conn.cursor().execute("CREATE DATABASE mlflow")
        conn.close()
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(
            _as_postgres([pg_ctl, "-D", data, "-m", "fast", "stop"]), capture_output=True, timeout=120
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server(postgres: str, s3_server: str) -> Iterator[str]:
    """`mlflow server` as a team deploys it: PostgreSQL backend store, artifacts on the S3 server."""
    import urllib.request

    import boto3

    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="mlflow-artifacts")
    port = _free_port()
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_server}
    log = open(tempfile.mktemp(prefix="mlflow-server-", suffix=".log"), "w")  # noqa: SIM115
    server = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("mlflow")),
            "server",
            "--backend-store-uri",
            postgres,
            "--artifacts-destination",
            "s3://mlflow-artifacts/",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.time() > deadline:
            log.close()
            raise RuntimeError(f"mlflow server did not start; see {log.name}")
        time.sleep(1)
    yield url
    server.terminate()
    server.wait(timeout=30)
    log.close()
