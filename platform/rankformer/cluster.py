"""The thin Ray layer: join or start a cluster, and run a plain function over shards with Ray Data."""

from __future__ import annotations

import os
import pickle
import sys
from collections.abc import Callable, Iterator
from typing import Any

from rankformer.config import ClusterOptions


def cluster_address(opts: ClusterOptions) -> str | None:
    """The cluster this job was told to use (flag, else RAY_ADDRESS as under `ray job submit`)."""
    return opts.ray_address or os.environ.get("RAY_ADDRESS") or None


def ray_connected() -> bool:
    """Whether this process is already a Ray driver (without importing Ray, which costs ~2 s)."""
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def ensure_ray(opts: ClusterOptions, gpus: bool = False) -> None:
    """Join ``opts.ray_address`` or RAY_ADDRESS, else a Ray instance already running on this
    machine, else start a local one without the dashboard (a local run needs none, and it costs
    seconds to start). ``gpus``: the job asks for GPUs (see :func:`_check_gpus`)."""
    import ray

    started = False
    if not ray.is_initialized():
        address = cluster_address(opts) or _running_local_instance()
        if address is not None:
            ray.init(address=address, log_to_driver=True, configure_logging=False)
        else:
            ray.init(address="local", include_dashboard=False, log_to_driver=True, configure_logging=False)
            started = True
    if gpus:
        _check_gpus(started)


def _check_gpus(started_here: bool) -> None:
    """A job asking for GPUs on a Ray cluster without one would wait for one forever: an error
    where this job started Ray itself (it has this machine's GPUs, and nothing adds more), else a
    warning (an autoscaler adds GPU nodes when asked)."""
    import ray

    if ray.cluster_resources().get("GPU", 0) >= 1:
        return
    if started_here:
        from rankformer.errors import InputError

        raise InputError(
            "--use-gpu: Ray found no GPU on this machine; run on a GPU machine or join a cluster "
            "with GPU nodes (--ray-address or RAY_ADDRESS), or leave --use-gpu out"
        )
    print(
        "warning: --use-gpu, but the Ray cluster has no GPU now: the job waits until a GPU node "
        "joins (an autoscaler adds them on demand)",
        file=sys.stderr,
    )


def _running_local_instance() -> str | None:
    """The GCS address of a Ray instance started on this machine (`ray start`), if exactly one."""
    try:
        from ray._private.services import find_gcs_addresses

        found = sorted(find_gcs_addresses())
    except Exception:  # a private helper: when it moves, start a fresh instance instead
        return None
    return found[0] if len(found) == 1 else None


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

    ensure_ray(opts)
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
    pool = ray.data.TaskPoolStrategy(size=opts.num_workers) if opts.num_workers else None
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

    ensure_ray(opts, gpus=gpus_per_actor > 0)
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
        concurrency=max(1, min(actors, len(tasks))),
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
