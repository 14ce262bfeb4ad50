"""The thin Ray layer: join or start a cluster, and run a plain function over shards with Ray Data."""

from __future__ import annotations

import os
import pickle
import sys
from collections.abc import Callable, Iterator
from typing import Any

from rankformer.config.corpus import ClusterOptions
from rankformer.placement import Demand, check_demand


def cluster_address(opts: ClusterOptions) -> str | None:
    """The cluster this job was told to use (flag, else RAY_ADDRESS as under `ray job submit`)."""
    return opts.ray_address or os.environ.get("RAY_ADDRESS") or None


def ray_connected() -> bool:
    """Whether this process is already a Ray driver (without importing Ray, which costs ~2 s)."""
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def ensure_ray(opts: ClusterOptions, demand: Demand | None = None) -> None:
    """Join ``opts.ray_address`` or RAY_ADDRESS, else the cluster that `ray start` last started on
    this machine (while it runs), else start a private local one without the dashboard (a local
    run needs none, and it costs seconds to start). Never another driver's private instance: it
    ends with that driver, and every job that joined it dies then. ``demand``: what the job will
    place, refused at once where the cluster can never run it (:func:`rankformer.placement.check_demand`)."""
    import ray

    if not ray.is_initialized():
        address = cluster_address(opts) or shared_local_cluster()
        if address is not None:
            ray.init(address=address, log_to_driver=True, configure_logging=False)
        else:
            ray.init(address="local", include_dashboard=False, log_to_driver=True, configure_logging=False)
    if demand is not None:
        check_demand(demand)


def shared_local_cluster() -> str | None:
    """The GCS address of the cluster `ray start` last started on this machine, if it still runs.
    `ray start` records its address in Ray's temp folder (``ray_current_cluster``); a driver's
    private instance (``ray.init()`` with no cluster) records nothing, so it is never joined."""
    try:
        from ray._private.services import find_gcs_addresses
        from ray._private.utils import read_ray_address

        recorded = read_ray_address()
        running = set(find_gcs_addresses())
    except Exception:  # private helpers: when they move, start a private instance instead
        return None
    return recorded if recorded and recorded in running else None


def runs_in_process(n_tasks: int, opts: ClusterOptions) -> bool:
    """Work that fits one shard, with no cluster named and no Ray running in this process, runs
    here: starting Ray and a Ray Data pipeline would cost far more than the work itself."""
    if opts.in_process is not None:
        return opts.in_process
    return n_tasks <= 1 and cluster_address(opts) is None and not ray_connected()


def map_shards(
    tasks: list[dict[str, Any]],
    fn: Callable[[dict[str, Any]], bytes],
    opts: ClusterOptions,
) -> Iterator[bytes]:
    """Run ``fn(task)`` for every task dict on the cluster, one Ray task per shard, and yield the
    payload each returns (callers choose the encoding). A worker that dies is retried by Ray; an
    exception raised by ``fn`` is not, and surfaces here."""
    if runs_in_process(len(tasks), opts):
        yield from serial_shards(tasks, fn, opts)
        return
    import numpy as np
    import ray

    # one task a shard, any number at a time: one CPU on some node is enough to make progress
    ensure_ray(opts, Demand("shard tasks", len(tasks), cpus=1.0, gang=False))
    ctx = ray.data.DataContext.get_current()
    # One operator only: reserving half the CPUs for (absent) downstream operators would leave
    # workers idle, so let this map use the whole budget while it runs.
    saved = ctx.op_resource_reservation_enabled
    ctx.op_resource_reservation_enabled = False
    items = _task_items(tasks)

    def _apply(batch: dict[str, np.ndarray]) -> dict[str, list[bytes]]:
        return {"payload": [fn(pickle.loads(t)) for t in batch["task"]]}

    fault = os.environ.get("RANKFORMER_FAULT_INJECT")
    # test hook: forward the fault plan to the workers
    runtime_env = {"env_vars": {"RANKFORMER_FAULT_INJECT": fault}} if fault else None
    pool = task_pool(opts)
    ds = items.map_batches(
        _apply,
        batch_size=1,
        batch_format="numpy",
        num_cpus=1,
        compute=pool,
        runtime_env=runtime_env,  # Ray retries a task whose worker died (3 times by default)
    )
    try:
        yield from _payloads(ds)
    finally:
        ctx.op_resource_reservation_enabled = saved


def task_pool(opts: ClusterOptions) -> Any:
    """Ray Data's pool of shard tasks: ``--num-workers`` at a time, else as many as the CPUs allow."""
    import ray.data

    return ray.data.TaskPoolStrategy(size=opts.num_workers) if opts.num_workers else None


def _task_items(tasks: list[dict[str, Any]]) -> Any:
    """One dataset row per task, the task pickled whole: from plain dicts Ray Data would infer one
    Arrow type per key, and a key that is None in one task and a list in another has none."""
    import ray

    return ray.data.from_items([{"task": pickle.dumps(t)} for t in tasks], override_num_blocks=len(tasks))


def _payloads(ds: Any) -> Iterator[bytes]:
    """The payload column of a map's output; an input error raised in a task surfaces as itself."""
    try:
        for row in ds.iter_rows():
            yield row["payload"]
    except Exception as exc:
        user = user_error_inside(exc)
        if user is None:
            raise
        raise user from exc


def map_shards_actors(
    tasks: list[dict[str, Any]],
    make: Callable[[], Callable[[dict[str, Any]], bytes]],
    opts: ClusterOptions,
    actors: int,
    gpus_per_actor: float = 0.0,
    cpus_per_actor: float = 1.0,
) -> Iterator[bytes]:
    """Like :func:`map_shards`, through a pool of ``actors`` long-lived Ray actors: each calls
    ``make()`` once (e.g. loads a model) and then its result on every task it is given. Work that
    fits one task, with no cluster named, runs in this process."""
    if runs_in_process(len(tasks), opts):
        fn = make()
        for task in tasks:
            yield fn(task)
        return
    import numpy as np

    pool = max(1, min(actors, len(tasks)))
    # a fixed pool: every actor must be placed (Ray Data would wait for the missing ones forever)
    demand = Demand(
        "actors of the pool",
        pool,
        cpus=cpus_per_actor,
        gpus=gpus_per_actor,
        flags="--num-workers (actors)" + (" or leave out --use-gpu" if gpus_per_actor else ""),
    )
    ensure_ray(opts, demand)
    items = _task_items(tasks)

    class _Actor:
        def __init__(self) -> None:
            self.fn = make()

        def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[bytes]]:
            return {"payload": [self.fn(pickle.loads(t)) for t in batch["task"]]}

    ds = items.map_batches(
        _Actor,
        batch_size=1,
        batch_format="numpy",
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor or None,
        concurrency=pool,
    )
    yield from _payloads(ds)


def user_error_inside(exc: BaseException) -> BaseException | None:
    """An input error raised inside a Ray task, unwrapped from Ray's wrappers (None if none)."""
    from rankformer.errors import InputError

    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        cur = todo.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, InputError | FileNotFoundError) and not type(cur).__name__.startswith("Ray"):
            return cur
        todo += [getattr(cur, "cause", None), cur.__cause__, cur.__context__]
    # Ray Data keeps only the text of a UDF's exception: recover our own error types from it.
    import re

    from rankformer.errors import VocabError

    kinds: dict[str, type[Exception]] = {
        "rankformer.errors.InputError": InputError,
        "rankformer.errors.VocabError": VocabError,
        "FileNotFoundError": FileNotFoundError,
    }
    found = re.findall(r"^(rankformer\.errors\.\w+|FileNotFoundError): (.+)$", str(exc), re.M)
    for kind, message in found:
        if kind in kinds:
            return kinds[kind](message.strip())
    return None


def serial_shards(
    tasks: list[dict[str, Any]], fn: Callable[[dict[str, Any]], bytes], opts: ClusterOptions
) -> Iterator[bytes]:
    """The same contract as :func:`map_shards`, in this process: for tests and debugging."""
    for task in tasks:
        yield fn(task)


Runner = Callable[[list[dict[str, Any]], Callable[[dict[str, Any]], bytes], ClusterOptions], Iterator[bytes]]


def maybe_inject_fault(point: str, shard_name: str) -> None:
    """Test hook: RANKFORMER_FAULT_INJECT='point:shard_name:marker_path' kills this worker process
    once (the marker file records that it happened) at the named point."""
    spec = os.environ.get("RANKFORMER_FAULT_INJECT", "")
    if spec.count(":") < 2:
        return
    want_point, want_shard, marker = spec.split(":", 2)
    if want_point == point and want_shard == shard_name and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(f"killed at {point} in {shard_name}, pid {os.getpid()}\n")
        os._exit(1)
