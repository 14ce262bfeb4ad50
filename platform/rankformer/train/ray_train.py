"""The Ray Train layer every training job shares: a TorchTrainer around a worker function, and
the loop context a Ray Train worker gives :func:`rankformer.train.loop.run_loop`."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from rankformer.cluster import ensure_ray, user_error_inside
from rankformer.config.corpus import ClusterOptions
from rankformer.config.train import ScaleOptions
from rankformer.model.device import settle
from rankformer.placement import Demand

FAULT_ENV = "RANKFORMER_FAULT_INJECT"


class RayContext:
    """Where :func:`run_loop` runs inside a Ray Train worker: DDP, checkpoints, reports, MLflow."""

    def __init__(self, tracking: dict[str, str] | None) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.node = ctx.get_node_rank() if hasattr(ctx, "get_node_rank") else 0
        self.device = settle(ray.train.torch.get_device())
        self.tracking = tracking if self.rank == 0 else None

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    @contextmanager
    def restore(self) -> Iterator[str | None]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield d

    def report(self, metrics: dict[str, float], checkpoint_dir: str | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(dict(metrics), checkpoint=ckpt)

    def log(self, metrics: dict[str, float]) -> None:
        from rankformer.tracking import log_step

        log_step(self.tracking, metrics)

    def announce_nodes(self) -> list[str]:
        """The Ray node (and its raylet's process id) of every worker, in rank order; rank 0 records
        them in the MLflow run."""
        import ray

        node = f"{ray.get_runtime_context().get_node_id()}/raylet-pid-{os.getppid()}"
        nodes: list[Any] = [node]
        if self.world > 1:
            nodes = [None] * self.world
            torch.distributed.all_gather_object(nodes, node)
        if self.tracking:
            from rankformer import tracking

            tracking.set_tag(self.tracking["uri"], self.tracking["run_id"], "worker_nodes", ",".join(nodes))
        return [str(n) for n in nodes]

    def all_min_started(self, value: int) -> Callable[[], int]:
        """An all-reduce, queued (see :meth:`rankformer.train.loop.Context.all_min_started`). On GPUs
        NCCL starts it once the work queued before it has run, and its result comes back to pinned
        memory behind it: reading it waits for that alone, not for the work queued after this call
        (``.item()`` on the result would wait for everything queued)."""
        if self.world == 1:
            return lambda: value
        from rankformer.model.device import queued_mark, to_device, to_host_queued

        t = to_device(torch.tensor([value]), self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, async_op=True).wait()
        host, mark = to_host_queued(t), queued_mark(t.device)

        def read() -> int:
            if mark is not None:
                mark.synchronize()
            return int(host[0])

        return read


def worker_setup(config: dict[str, Any]) -> None:
    """Process-level settings a driver forwards to its workers (test fault plans, quiet hubs)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    if config.get("fault_inject"):
        os.environ[FAULT_ENV] = config["fault_inject"]


def cluster_hosts() -> set[str]:
    """The addresses of the machines of the connected Ray cluster's live nodes."""
    import ray

    return {str(n["NodeManagerAddress"]) for n in ray.nodes() if n.get("Alive")}


def checkpoint_storage(scale: ScaleOptions, default: str) -> str:
    """Where Ray Train keeps a run's checkpoints: ``--storage-path`` when given, else ``default``;
    a local default only works while every node is on this machine (Ray Train writes checkpoints
    from the workers and reads them back on the driver). Call with Ray connected."""
    from rankformer.errors import InputError
    from rankformer.io import fs

    if scale.storage_path:
        return scale.storage_path
    hosts = cluster_hosts()
    if len(hosts) > 1 and not fs.is_remote(default):
        raise InputError(
            f"the Ray cluster spans {len(hosts)} machines ({', '.join(sorted(hosts)[:4])}) and no "
            f"--storage-path was given: checkpoints would go to {default} on each machine's own disk. "
            "Give --storage-path s3://BUCKET/PREFIX, or a shared filesystem path mounted on every node"
        )
    return default


def ordered_data_config() -> Any:
    """How Ray Train splits the datasets between workers: its default options, in order. Unordered, Ray
    Data hands each block to whichever worker's split runs short first, so which cells a worker
    trains on, and so the model, changed from run to run whatever ``--seed`` said (two runs of the
    demo's pretraining, same options: different weights). In order (and so without locality
    hints), blocks go out in the stream's seeded order to the split with the fewest rows, and a
    run repeats itself on the same cluster shape."""
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(execution_options=options)


def trains_in_process(scale: ScaleOptions) -> bool:
    """Whether a training runs in this process: ``--in-process`` when given, else when it has one
    worker and no cluster is named (flag or RAY_ADDRESS)."""
    from rankformer.cluster import cluster_address

    if scale.in_process is not None:
        return scale.in_process
    return scale.num_workers == 1 and cluster_address(ClusterOptions(ray_address=scale.ray_address)) is None


def training_workers(scale: ScaleOptions) -> int:
    """How many workers a training on ``scale`` runs on (one in this process)."""
    return 1 if trains_in_process(scale) else scale.num_workers


def workers_demand(scale: ScaleOptions, reads_cpus: float = 0.0) -> Demand:
    """What a training on ``scale`` places: its workers, all at once, and beside them the CPU share
    of one Ray Data read task (``reads_cpus``; 0 when the datasets need no tasks)."""
    return Demand(
        "Ray Train workers",
        scale.num_workers,
        cpus=scale.cpus_per_worker,
        gpus=1.0 if scale.use_gpu else 0.0,
        flags="--num-workers or --cpus-per-worker" + (", or leave out --use-gpu" if scale.use_gpu else ""),
        beside_cpus=reads_cpus,
        beside_what="Ray Data's corpus listing and reads",
        strategy=scale.placement,
    )


def trainer_settings(scale: ScaleOptions, storage: str, name: str, score: tuple[str, str]) -> dict[str, Any]:
    """The TorchTrainer's scaling and run configs of a training on ``scale``, checkpointed under
    ``storage``/``name`` and keeping the best by ``score``."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    resources = {"CPU": scale.cpus_per_worker, **({"GPU": 1.0} if scale.use_gpu else {})}
    return {
        "scaling_config": ScalingConfig(
            num_workers=scale.num_workers,
            use_gpu=scale.use_gpu,
            resources_per_worker=resources,
            placement_strategy=scale.placement,
        ),
        "run_config": RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=scale.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=scale.keep_checkpoints,
                checkpoint_score_attribute=score[0],
                checkpoint_score_order=score[1],
            ),
        ),
    }


def fit(
    worker_fn: Callable[[dict[str, Any]], None],
    config: dict[str, Any],
    datasets: dict[str, Any],
    scale: ScaleOptions,
    name: str,
    score: tuple[str, str] = ("loss", "min"),
    reads_cpus: float = 0.0,
) -> Any:
    """Run ``worker_fn(config)`` on ``scale.num_workers`` Ray Train workers; the Result. ``score``:
    the reported metric (and min or max) by which the best checkpoints are kept; ``reads_cpus``:
    the CPUs a read task of ``datasets`` asks for (see :func:`workers_demand`)."""
    from ray.train.torch import TorchTrainer

    ensure_ray(ClusterOptions(ray_address=scale.ray_address), workers_demand(scale, reads_cpus))
    storage = checkpoint_storage(scale, os.path.abspath("ray_results"))
    trainer = TorchTrainer(
        worker_fn,
        train_loop_config={**config, "fault_inject": os.environ.get(FAULT_ENV)},
        **trainer_settings(scale, storage, name, score),
        datasets=datasets,
        dataset_config=ordered_data_config(),
    )
    try:
        return trainer.fit()
    except Exception as exc:
        user = user_error_inside(exc)
        if user is not None:
            raise user from exc
        raise
