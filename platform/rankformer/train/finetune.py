"""Fine-tuning plumbing both classification jobs share: the classification task for
:func:`rankformer.train.loop.run_loop`, and one training run on labelled cells, in this process or
on Ray Train workers (the classifier itself comes from :mod:`rankformer.train.classifier`). Which
cells and labels, and what is done with the trained model, belong to :mod:`rankformer.classify`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from rankformer.config.train import AdapterOptions, BatchOptions, FinetuneOptim, HeadOptions, ScaleOptions
from rankformer.model.batching import Batcher, budget_batches, length_grouped, pad_batch
from rankformer.model.device import mask_argument, to_device
from rankformer.model.forward import logits_of
from rankformer.model.packing import pack_cells, packed_batches, use_packing, use_padding
from rankformer.train.classifier import build_classifier, class_weights
from rankformer.train.loop import LoopOptions, Stat
from rankformer.train.ray_train import training_workers, trains_in_process

IGNORE = -100


class ClassifyTask:
    """Length-grouped batches of (cell, label) rows; cross-entropy on a token or sequence head.

    Token task: each token's class comes from ``lookup`` (token id -> class, -100 for unlabelled
    tokens); sequence task: the row's own label."""

    def __init__(
        self,
        rows: Callable[[int], Iterator[tuple[np.ndarray, int]]],
        kind: str,
        pad: int,
        batch: BatchOptions,
        seed: int,
        rank: int,
        lookup: np.ndarray | None = None,
        weights: list[float] | None = None,
        task_sizes: list[int] | None = None,
        task_weights: list[float] | None = None,
    ) -> None:
        self.rows, self.kind, self.pad, self.batch = rows, kind, pad, batch
        self.task_sizes, self.task_weights = task_sizes, task_weights
        self.seed, self.rank = seed, rank
        self.lookup = torch.as_tensor(lookup, dtype=torch.long) if lookup is not None else None
        self.weights = torch.tensor(weights, dtype=torch.float32) if weights else None

    def epoch_batches(self, epoch: int) -> Iterator[list[tuple[np.ndarray, int]]]:
        rng = np.random.default_rng([self.seed, epoch, self.rank, 17])
        b = self.batch
        return length_grouped(
            self.rows(epoch),
            b.max_tokens,
            b.max_cells,
            b.megabatch_cells,
            rng,
            length=lambda r: len(r[0]),
            batcher=batcher(b),
        )

    def forward(
        self, model: torch.nn.Module, batch: list[tuple[np.ndarray, int]], device: torch.device
    ) -> tuple[torch.Tensor, dict[str, Stat]]:
        cells = [r[0] for r in batch]
        if self.batch.packed:  # one row of cells end to end (the model takes them: use_packing)
            packed = pack_cells(cells)
            ids, attn = packed.ids, torch.ones_like(packed.ids)
            inputs = {
                "position_ids": to_device(packed.positions, device),
                **packed.attention_kwargs(device),
            }
        else:
            ids, attn = pad_batch(cells, self.pad)
            inputs = {"attention_mask": mask_argument(model, attn, device)}
        if self.kind == "token":  # each token's class, from the host's ids
            assert self.lookup is not None
            labels = self.lookup[ids.clamp(max=len(self.lookup) - 1)]
            labels[attn == 0] = IGNORE
            labels = labels.reshape(-1)
        elif self.task_sizes:  # a label per task, -1 where the cell has none
            labels = torch.as_tensor(np.asarray([np.asarray(r[1]) for r in batch], dtype=np.int64))
            labels[labels < 0] = IGNORE
        else:
            labels = torch.tensor([int(r[1]) for r in batch], dtype=torch.long)
        n_labels = int((labels != IGNORE).sum())  # counted on the host
        ids_d, labels_d = to_device(ids, device), to_device(labels, device)
        if self.weights is not None and self.weights.device.type != device.type:  # once ("cuda" is cuda:0)
            self.weights = to_device(self.weights, device)
        logits = logits_of(model(input_ids=ids_d, **inputs)).float()
        if self.task_sizes:
            return self._multitask(logits, labels_d, attn, n_labels)
        flat_logits = logits.reshape(-1, logits.shape[-1])
        loss = torch.nn.functional.cross_entropy(
            flat_logits, labels_d, weight=self.weights, ignore_index=IGNORE
        )
        with torch.no_grad():  # unlabelled positions (-100) never equal a class; stays on the device
            correct = (flat_logits.argmax(-1) == labels_d).sum()
        return loss, _stats(attn, correct, n_labels)

    def _multitask(
        self, logits: torch.Tensor, labels: torch.Tensor, attn: torch.Tensor, n_labels: int
    ) -> tuple[torch.Tensor, dict[str, Stat]]:
        from rankformer.model.heads import multitask_loss

        assert self.task_sizes is not None
        bounds = itertools.accumulate([0, *self.task_sizes])
        slices = [slice(a, b) for a, b in itertools.pairwise(bounds)]
        loss = multitask_loss(logits, labels, slices, self.task_weights, IGNORE)
        with torch.no_grad():
            correct = sum((logits[:, part].argmax(-1) == labels[:, t]).sum() for t, part in enumerate(slices))
        return loss, _stats(attn, correct, n_labels)


def batcher(batch: BatchOptions) -> Batcher:
    """How a megabatch is cut: into packed batches (tokens in all under the budget), else padded
    ones of similar lengths (cells x longest under the budget)."""
    return packed_batches if batch.packed else budget_batches


def _stats(attn: torch.Tensor, correct: Any, n_labels: int) -> dict[str, Stat]:
    """A classification batch's sums for the loop's log (``correct`` may stay on the device)."""
    real = int(attn.sum())
    return {
        "tokens": float(real),
        "pad_tokens": float(attn.numel() - real),
        "correct": correct,
        "labels": float(n_labels),
    }


def local_rows(
    ids: Sequence[np.ndarray], y: np.ndarray, seed: int, rank: int = 0, world: int = 1
) -> Callable[[int], Iterator[tuple[np.ndarray, int]]]:
    """Rows in a seeded order per epoch, every ``world``-th to this rank."""

    def rows(epoch: int) -> Iterator[tuple[np.ndarray, int]]:
        order = np.random.default_rng([seed, epoch]).permutation(len(ids))
        for i in order[rank::world]:
            yield ids[i], (y[i] if y.ndim > 1 else int(y[i]))  # a label per task for multitask

    return rows


def ray_rows(shard: Any, seed: int, rank: int) -> Callable[[int], Iterator[tuple[np.ndarray, int]]]:
    """This worker's split of a Ray Dataset of ``input_ids``/``y`` rows, locally shuffled per epoch."""

    def rows(epoch: int) -> Iterator[tuple[np.ndarray, int]]:
        for batch in shard.iter_batches(
            batch_size=256,
            batch_format="numpy",
            local_shuffle_buffer_size=1024,
            local_shuffle_seed=seed * 1_000 + epoch * 97 + rank,
        ):
            yield from zip(batch["input_ids"], list(batch["y"]), strict=True)

    return rows


@dataclass
class TrainSpec:
    """One training run of a classifier, everything a worker needs (plain data: it travels to Ray)."""

    model: str  # the pretrained model (path, s3://, models:/)
    tracking_uri: str | None
    kind: str  # token or sequence
    n_classes: int
    head: HeadOptions
    optim: FinetuneOptim
    batch: BatchOptions
    max_steps: int
    seed: int
    pad: int
    gene_lo: int  # lowest gene token id (specials below)
    log_every: int
    checkpoint_every: int
    precision: str = "auto"
    lookup: list[int] | None = None  # token task: class per token id (-100: unlabelled)
    weights: list[float] | None = None
    run_id: str | None = None  # MLflow run the metrics go to
    val_ids: list[list[int]] | None = None  # sequence task: validation cells, scored at each checkpoint
    val_y: list[int] | list[list[int]] | None = None  # (a label per task for multitask; -1: none)
    task_names: list[str] | None = None  # multitask: the label columns, one head each
    task_sizes: list[int] | None = None  # multitask: classes per task (n_classes is their sum)
    task_weights: list[float] | None = None  # multitask: each task's share of the loss
    adapter: AdapterOptions | None = None  # --peft lora: adapters on a frozen encoder


SELECT = "val_macro_f1"  # with validation cells, the checkpoint kept is the best by this


def validation(spec: TrainSpec) -> Callable[[torch.nn.Module], dict[str, float]] | None:
    """Validation scores of a sequence classifier (macro F1, accuracy), when there are cells."""
    if not spec.val_ids or spec.val_y is None:
        return None
    cells = [np.asarray(c, dtype=np.int64) for c in spec.val_ids]
    y = np.asarray(spec.val_y)

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        from rankformer.train.metrics import scores

        prob = cell_probs(model, cells, spec.pad, spec.batch.max_tokens)
        if not spec.task_sizes:
            s = scores(y, prob, [str(i) for i in range(spec.n_classes)])
            return {SELECT: s["macro_f1"], "val_accuracy": s["accuracy"]}
        out: dict[str, float] = {}
        bounds = np.cumsum([0, *spec.task_sizes])
        for t, name in enumerate(spec.task_names or []):  # each task on the cells labelled for it
            has = y[:, t] >= 0
            if has.any():
                s = scores(
                    y[has, t],
                    prob[has, bounds[t] : bounds[t + 1]],
                    [str(i) for i in range(spec.task_sizes[t])],
                )
                out[f"{name}/val_macro_f1"], out[f"{name}/val_accuracy"] = s["macro_f1"], s["accuracy"]
        f1 = [v for k, v in out.items() if k.endswith("/val_macro_f1")]
        out[SELECT] = float(np.mean(f1)) if f1 else 0.0  # the mean over tasks picks the checkpoint
        return out

    return evaluate


@torch.no_grad()
def cell_probs(
    model: torch.nn.Module, cells: Sequence[np.ndarray], pad: int, max_tokens: int = 16_384
) -> np.ndarray:
    """Class probabilities of each cell from a sequence classifier, in the order of ``cells``."""
    from rankformer.model.forward import Batch, batches, class_probs, one_ahead

    device = next(model.parameters()).device
    config: Any = model.config
    out = np.zeros((len(cells), int(config.num_labels)), dtype=np.float64)

    def finish(b: Batch, prob: torch.Tensor) -> None:
        out[b.index] = prob.numpy()

    one_ahead(batches(cells, pad, max_tokens), lambda b: class_probs(model, b, device), finish)
    return out


def steps_for(lengths: Sequence[int], spec_batch: BatchOptions, epochs: float, world: int, accum: int) -> int:
    """Optimizer steps for ``epochs`` passes over cells of these lengths, split over ``world`` workers."""
    per_worker = np.asarray(lengths, dtype=np.int64)[: max(1, len(lengths) // world)]
    n = len(batcher(spec_batch)(per_worker, spec_batch.max_tokens, spec_batch.max_cells))
    return max(1, math.ceil(epochs * n / accum))


def job_spec(
    cfg: Any,
    tracking_uri: str,
    kind: str,
    n_classes: int,
    tokens: tuple[int, int],
    lengths: Sequence[int],
    class_counts: list[int],
    run_id: str | None,
) -> TrainSpec:
    """The spec of one training of a classification job (``cfg``: a FinetuneCommon) on cells of
    ``lengths``; ``tokens``: (pad id, lowest gene token id)."""
    world = training_workers(cfg.scale)
    steps = cfg.max_steps or steps_for(lengths, cfg.batch, cfg.epochs, world, cfg.optim.grad_accum)
    cfg.optim.check_warmup(steps, "--max-steps, or --epochs")
    return TrainSpec(
        model=cfg.model,
        tracking_uri=tracking_uri,
        kind=kind,
        n_classes=n_classes,
        head=cfg.head,
        optim=cfg.optim,
        batch=cfg.batch,
        max_steps=steps,
        seed=cfg.seed,
        pad=tokens[0],
        gene_lo=tokens[1],
        log_every=cfg.log_every,
        checkpoint_every=cfg.checkpoint_every,
        precision=cfg.precision,
        weights=class_weights(cfg.head, class_counts),
        run_id=run_id,
        adapter=cfg.adapter if cfg.adapter.peft != "none" else None,
    )


def loop_options(spec: TrainSpec) -> LoopOptions:
    return LoopOptions(
        max_steps=spec.max_steps,
        seed=spec.seed,
        log_every=spec.log_every,
        checkpoint_every=spec.checkpoint_every,
        optim=spec.optim,
        precision=spec.precision,
        evaluate=validation(spec),
    )


def classifier_for(spec: TrainSpec) -> torch.nn.Module:
    from rankformer.model.loader import local_model_dir

    extra = {}
    if spec.task_sizes:
        extra = {"task_names": spec.task_names, "task_sizes": spec.task_sizes}
    load: dict[str, Any] = {}
    if spec.adapter is not None:
        from rankformer.train.adapters import quantization

        load = quantization(spec.adapter)
    with local_model_dir(spec.model, spec.tracking_uri) as local:
        model = build_classifier(
            local, spec.kind, spec.n_classes, spec.head, spec.seed, spec.gene_lo, extra, load
        )
    if spec.batch.packed:
        use_packing(model)
    if spec.adapter is not None:
        from rankformer.train.adapters import with_lora

        torch.manual_seed(spec.seed)  # the adapters' initialisation, seeded like the head's
        model = with_lora(model, spec.adapter)
    return model


def _task(
    spec: TrainSpec, rows: Callable[[int], Iterator[tuple[np.ndarray, int]]], rank: int
) -> ClassifyTask:
    lookup = np.asarray(spec.lookup, dtype=np.int64) if spec.lookup is not None else None
    return ClassifyTask(
        rows,
        spec.kind,
        spec.pad,
        spec.batch,
        spec.seed,
        rank,
        lookup,
        spec.weights,
        spec.task_sizes,
        spec.task_weights,
    )


def finetune_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker of a fine-tuning run."""
    import ray.train

    from rankformer.train.loop import run_loop
    from rankformer.train.ray_train import RayContext, worker_setup

    worker_setup(config)
    spec = spec_from_dict(config["spec"])
    tracking = {"uri": spec.tracking_uri or "", "run_id": spec.run_id} if spec.run_id else None
    ctx = RayContext(tracking)
    model = classifier_for(spec)
    rows = ray_rows(ray.train.get_dataset_shard("train"), spec.seed, ctx.rank)
    run_loop(model, _task(spec, rows, ctx.rank), loop_options(spec), ctx)


def spec_from_dict(d: dict[str, Any]) -> TrainSpec:
    d = dict(d)
    d["head"] = HeadOptions(**d["head"])
    d["optim"] = FinetuneOptim(**d["optim"])
    d["batch"] = BatchOptions(**d["batch"])
    if d.get("adapter"):
        d["adapter"] = AdapterOptions(**d["adapter"])
    return TrainSpec(**d)


def train_classifier(
    spec: TrainSpec, ids: Sequence[np.ndarray], y: np.ndarray, scale: ScaleOptions, workdir: str, name: str
) -> torch.nn.Module:
    """Train ``spec`` on the rows (``ids``, ``y``); the trained classifier, in this process.

    In this process (one worker, no cluster named) checkpoints go to ``--storage-path`` when given,
    else ``workdir`` (a temporary folder when it is remote: no resume then); on Ray Train to
    ``--storage-path``, else ``workdir/ray``. A rerun after a crash resumes from the last checkpoint."""
    from rankformer.io import fs
    from rankformer.train.local import LocalContext
    from rankformer.train.loop import run_loop

    if not fs.is_remote(workdir):
        workdir = os.path.abspath(workdir)
    # The training's run name is its checkpoint folder in a storage path: it must be this training's
    # own (a rerun of the same job and training resumes; any other job sharing the storage path must
    # not pick up its checkpoints)
    what = json.dumps([workdir, {k: v for k, v in asdict(spec).items() if k != "run_id"}])
    run = f"{name}-{hashlib.sha256(what.encode()).hexdigest()[:12]}"
    if trains_in_process(scale):
        model = classifier_for(spec)
        tracking = {"uri": spec.tracking_uri or "", "run_id": spec.run_id} if spec.run_id else None
        root = os.path.join(local_dir(workdir), name)
        if scale.storage_path:
            root = os.path.join(scale.storage_path, run)
        ctx = LocalContext(root, "cuda" if scale.use_gpu else "cpu", tracking)
        run_loop(model, _task(spec, local_rows(ids, y, spec.seed), 0), loop_options(spec), ctx)
        best = ctx.best(SELECT)
        if best:
            model.load_state_dict(
                torch.load(os.path.join(best, "model.pt"), map_location="cpu", weights_only=True)
            )
        return use_padding(model).cpu().eval()
    import pyarrow as pa
    import ray.data

    from rankformer.cluster import ensure_ray
    from rankformer.config.corpus import ClusterOptions
    from rankformer.train.ray_train import checkpoint_storage, fit

    ensure_ray(ClusterOptions(ray_address=scale.ray_address))
    ray.data.DataContext.get_current().enable_progress_bars = False
    labels = pa.array(y.tolist(), pa.list_(pa.int64(), y.shape[1])) if y.ndim > 1 else y
    table = pa.table({"input_ids": pa.array([c.tolist() for c in ids], pa.list_(pa.int32())), "y": labels})
    # blocks cut here, not by a repartition: that would need a Ray Data task, and a CPU free for it
    bounds = np.linspace(0, table.num_rows, max(scale.num_workers * 2, 2) + 1).astype(int)
    ds = ray.data.from_arrow([table.slice(a, b - a) for a, b in itertools.pairwise(bounds)])
    storage = checkpoint_storage(scale, fs.join(workdir, "ray"))
    scale = ScaleOptions(**{**asdict(scale), "storage_path": storage})
    score = (SELECT, "max") if spec.val_ids else ("loss", "min")
    result = fit(finetune_worker, {"spec": asdict(spec)}, {"train": ds}, scale, run, score)
    model = classifier_for(spec)
    checkpoint = result.checkpoint
    if spec.val_ids and result.best_checkpoints:
        checkpoint = max(result.best_checkpoints, key=lambda cm: cm[1].get(SELECT, -1.0))[0]
    with checkpoint.as_directory() as d:
        state = torch.load(os.path.join(d, "model.pt"), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return use_padding(model).eval()


def scratch_dir(out: str) -> str:
    """Where a job writing to ``out`` keeps its training checkpoints: ``OUT/.work``, local or
    ``s3://``, so that a rerun resumes (and on a cluster every node reaches an s3:// one)."""
    from rankformer.io import fs

    if fs.is_remote(out):
        return fs.join(out, ".work")
    d = os.path.join(os.path.abspath(out), ".work")
    os.makedirs(d, exist_ok=True)
    return d


def local_dir(workdir: str) -> str:
    """A local folder for what must be local (checkpoints of training in this process, Ray Tune's
    state): ``workdir`` itself, or for an ``s3://`` one a temporary folder removed at exit."""
    import atexit

    from rankformer.io import fs

    if not fs.is_remote(workdir):
        return workdir
    d = tempfile.mkdtemp(prefix="rankformer-finetune-")
    atexit.register(shutil.rmtree, d, True)
    return d
