"""The one MLflow module: where runs go, what they record, the model registry, and `models:/` URIs.

Tracking URI: the job's setting, else ``MLFLOW_TRACKING_URI``, else a SQLite store in the working
directory (``sqlite:///mlflow.db``, artifacts in ``./mlartifacts``), so a laptop run needs no server.
A relative SQLite path is made absolute so Ray workers (other working directories) reach the same
store; on a multi-node cluster use a tracking server.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from rankformer.errors import InputError

DEFAULT_URI = "sqlite:///mlflow.db"
RESERVED_ALIASES = {"latest"}  # MLflow reserves it (models:/NAME/latest)


def resolve_uri(uri: str | None) -> str:
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + os.path.abspath(uri[len("sqlite:///") :])
    return uri


def artifact_location(uri: str) -> str | None:
    """For a SQLite store, artifacts live beside the database (absolute, shared by workers)."""
    if uri.startswith("sqlite:///"):
        return "file://" + os.path.join(os.path.dirname(uri[len("sqlite:///") :]), "mlartifacts")
    return None


def _client(uri: str) -> Any:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def check_reachable(uri: str) -> None:
    """Fail before any work when the tracking store cannot be reached, naming it and the fix."""
    if uri.startswith(("http://", "https://")):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    try:
        _client(uri).search_experiments(max_results=1)
    except Exception as exc:
        raise InputError(
            f"MLflow tracking store {uri} is unreachable ({type(exc).__name__}: {str(exc)[:200]}); start "
            "the server or pass --tracking-uri (default: a local sqlite:///mlflow.db)"
        ) from exc


def experiment_id(uri: str, name: str) -> str:
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return str(exp.experiment_id)
    return str(client.create_experiment(name, artifact_location=artifact_location(uri)))


def start_run(uri: str, experiment: str, run_name: str, tags: Mapping[str, str] | None = None) -> str:
    """A new run (not active in this process); returns its id for every process to log into."""
    client = _client(uri)
    run = client.create_run(experiment_id(uri, experiment), run_name=run_name, tags=dict(tags or {}))
    return str(run.info.run_id)


RESUME_TAG = "rankformer.resume_key"


def find_run(uri: str, experiment: str, key: str) -> dict[str, Any] | None:
    """The latest run of ``experiment`` tagged with resume key ``key`` (``run_id``, ``status``,
    ``tags``), or None."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id], f"tags.`{RESUME_TAG}` = '{key}'", max_results=1, order_by=["start_time DESC"]
    )
    if not runs:
        return None
    return {"run_id": str(runs[0].info.run_id), "status": str(runs[0].info.status), "tags": runs[0].data.tags}


def reopen_run(uri: str, run_id: str) -> None:
    """An interrupted run running again (a rerun that resumes its training logs into it)."""
    _client(uri).update_run(run_id, status="RUNNING")


# A training's driver stamps its run while it lives ("host pid token unix-seconds"), so that a
# rerun can tell a live training (refused: both would write the same checkpoints) from one whose
# driver was killed (resumed).
DRIVER_TAG = "rankformer.driver"
BEAT_S = 30.0  # how often a live driver renews its stamp
STALE_S = 120.0  # a stamp older than this is a dead driver's
CLAIM_WAIT_S = 0.5  # how long a claim waits before it reads back who holds the training


def _stamp() -> str:
    import socket
    import time
    import uuid

    return f"{socket.gethostname()} {os.getpid()} {uuid.uuid4().hex[:8]} {int(time.time())}"


def live_driver(tags: Mapping[str, str], now: float | None = None) -> str | None:
    """Who drives a run, when that driver is alive: its stamp is fresh and, on this machine, its
    process still runs. None when the run has no stamp or its driver is gone."""
    import socket
    import time

    parts = tags.get(DRIVER_TAG, "").split()
    if len(parts) != 4 or not parts[1].isdigit() or not parts[3].isdigit():
        return None
    host, pid, age = parts[0], int(parts[1]), (now or time.time()) - int(parts[3])
    if age > STALE_S or (host == socket.gethostname() and not _process_runs(pid)):
        return None
    return f"driver on {host} (pid {pid}), last seen {max(age, 0):.0f} s ago"


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def claim_run(uri: str, key: str, run_id: str) -> None:
    """Stamp ``run_id`` as driven by this process, wait ``CLAIM_WAIT_S``, and raise InputError when
    another live driver holds the training after all: it stamped this same run later (two reruns
    started at one moment), or it drives an earlier-started run with the same resume ``key``."""
    import time

    stamp = _stamp()
    set_tag(uri, run_id, DRIVER_TAG, stamp)
    time.sleep(CLAIM_WAIT_S)
    client = _client(uri)
    mine = client.get_run(run_id)
    holder = mine.data.tags.get(DRIVER_TAG)
    if holder != stamp:
        raise running_elsewhere(run_id, live_driver(mine.data.tags) or f"driver {holder}")
    query = f"tags.`{RESUME_TAG}` = '{key}' and attributes.status = 'RUNNING'"
    for run in client.search_runs([mine.info.experiment_id], query, max_results=100):
        who = live_driver(run.data.tags)
        first = (run.info.start_time, run.info.run_id) < (mine.info.start_time, run_id)
        if run.info.run_id != run_id and who and first:
            raise running_elsewhere(run.info.run_id, who)


def running_elsewhere(run_id: str, who: str) -> InputError:
    return InputError(
        f"this training is already running: MLflow run {run_id}, {who}. Wait for it to finish (a rerun "
        "then finds its model and does nothing) or stop it: a rerun after that resumes from its last "
        f"checkpoint (a driver killed on another machine counts as gone {STALE_S:.0f} s after its last stamp)"
    )


@contextmanager
def heartbeat(uri: str, run_id: str) -> Iterator[None]:
    """Renew this process's driver stamp on ``run_id`` every ``BEAT_S`` while the block runs."""
    import sys
    import threading

    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(BEAT_S):
            try:
                set_tag(uri, run_id, DRIVER_TAG, _stamp())
            except Exception as exc:  # the store is briefly away: training goes on, the next beat retries
                print(f"warning: could not renew the driver stamp of run {run_id}: {exc}", file=sys.stderr)

    thread = threading.Thread(target=beat, name="rankformer-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def delete_run(uri: str, run_id: str) -> None:
    _client(uri).delete_run(run_id)


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    _client(uri).set_terminated(run_id, status=status)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list | dict) else str(v)
    return out


def log_params(uri: str, run_id: str, config: Mapping[str, Any]) -> None:
    """The whole config as params (values over MLflow's 6,000-character limit are cut and tagged)."""
    from mlflow.entities import Param

    params = [Param(k, v[:6000]) for k, v in flatten(config).items()]
    client = _client(uri)
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])
    client.log_text(run_id, json.dumps(config, indent=1, default=str), "config.json")


def log_metrics(uri: str, run_id: str, metrics: Mapping[str, float], step: int) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step) for k, v in metrics.items()]
    _client(uri).log_batch(run_id, metrics=batch)


def log_step(target: Mapping[str, str] | None, metrics: Mapping[str, float]) -> None:
    """Log a training step's metrics to ``target`` ({"uri", "run_id"}), if any, at ``metrics['step']``."""
    if target:
        log_metrics(target["uri"], target["run_id"], metrics, int(metrics.get("step", 0)))


def set_tag(uri: str, run_id: str, key: str, value: str) -> None:
    _client(uri).set_tag(run_id, key, value)


def log_artifacts(uri: str, run_id: str, local_dir: str, path: str | None = None) -> None:
    _client(uri).log_artifacts(run_id, local_dir, path)


def log_file(uri: str, run_id: str, local_file: str, path: str | None = None) -> None:
    _client(uri).log_artifact(run_id, local_file, path)


_SAID: set[str] = set()


def _say_once(message: str) -> None:
    """A warning about a missing optional piece, logged once per process."""
    if message not in _SAID:
        _SAID.add(message)
        logging.getLogger("rankformer").warning(message)


@contextmanager
def system_metrics(uri: str, run_id: str, interval_s: float = 10.0) -> Iterator[None]:
    """CPU, memory (and GPU where present) sampled into the run every ``interval_s`` while the
    block runs."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, tracking_uri=uri)
    except ImportError as exc:  # psutil missing or an older MLflow: training goes on without them
        _say_once(f"system metrics are not logged ({exc}); install psutil (rankformer declares it)")
        yield
        return
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def register_model(
    uri: str, run_id: str, artifact_path: str, name: str, alias: str, tags: Mapping[str, str]
) -> str:
    """Register the run's model folder as a new version of ``name``, tag it, point ``alias`` at it."""
    if alias in RESERVED_ALIASES:
        raise InputError(f"alias {alias!r} is reserved by MLflow; use another (default 'current')")
    client = _client(uri)
    try:
        client.get_registered_model(name)
    except Exception:
        client.create_registered_model(name)
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    mv = client.create_model_version(name, source, run_id=run_id, tags=dict(tags))
    client.set_registered_model_alias(name, alias, mv.version)
    return str(mv.version)


def set_alias(uri: str, name: str, alias: str, version: str) -> None:
    _client(uri).set_registered_model_alias(name, alias, version)


def model_version_info(uri: str, model_uri: str) -> dict[str, Any]:
    """name, version, alias and tags of a `models:/NAME@ALIAS` or `models:/NAME/VERSION` URI."""
    name, ref = _parse_models_uri(model_uri)
    client = _client(uri)
    alias = ref if "@" in model_uri else None
    try:
        mv = client.get_model_version_by_alias(name, ref) if alias else client.get_model_version(name, ref)
    except Exception as exc:
        raise InputError(
            f"{model_uri} is not in the registry at {uri} ({str(exc)[:200]}); check the name and alias "
            "(`mlflow ui` lists them) or pass --tracking-uri"
        ) from exc
    return {
        "name": name,
        "version": str(mv.version),
        "alias": alias,
        "tags": dict(mv.tags),
        "source": mv.source,
    }


def _parse_models_uri(model_uri: str) -> tuple[str, str]:
    body = model_uri[len("models:/") :]
    if "@" in body:
        name, alias = body.split("@", 1)
        return name, alias
    if "/" in body:
        name, version = body.rsplit("/", 1)
        return name, version
    raise InputError(f"{model_uri}: a registry URI is models:/NAME@ALIAS or models:/NAME/VERSION")


def download_model(
    model_uri: str, tracking_uri: str | None, dst: str, files: Sequence[str] | None = None
) -> str:
    """A registered model's folder copied under ``dst`` (only ``files`` of it when given); returns
    the local folder."""
    uri = resolve_uri(tracking_uri)
    info = model_version_info(uri, model_uri)
    from mlflow.artifacts import download_artifacts

    source = info["source"].rstrip("/")
    try:
        if files is None:
            return str(download_artifacts(artifact_uri=source, dst_path=dst, tracking_uri=uri))
        for name in files:
            download_artifacts(artifact_uri=f"{source}/{name}", dst_path=dst, tracking_uri=uri)
        return dst
    except Exception as exc:
        raise InputError(f"{model_uri}: could not download its files from {info['source']} ({exc})") from exc
