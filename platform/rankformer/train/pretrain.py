"""`rankformer pretrain`: masked-gene BERT from a Parquet corpus on Ray Train, tracked in MLflow.

The driver checks everything it can before the first step (corpus, vocabulary, preset, output,
tracking store), opens one MLflow run, and starts the workers; each worker streams its split of the
corpus (Ray Data, `get_dataset_shard`), batches it by length and trains; rank 0 logs to the run.
At the end the model directory is written and registered.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

import numpy as np
import torch

from rankformer import schema
from rankformer.config.train import PretrainConfig
from rankformer.errors import InputError
from rankformer.io import fs
from rankformer.model.mlm import MaskedGeneLM
from rankformer.model.packing import use_varlen_attention
from rankformer.model.presets import bert_config, preset
from rankformer.model.store import save_model_dir
from rankformer.train.budget import training_token_budget
from rankformer.train.loop import LoopOptions
from rankformer.train.plan import Plan, plan
from rankformer.train.task import (
    MaskedGeneTask,
    TokenSpec,
    arrow_cells,
    flops_per_token,
    peak_flops,
    ray_cells,
)
from rankformer.vocab.gene_vocab import GeneVocab


def build_model(cfg: PretrainConfig, vocab: GeneVocab, tracking_uri: str | None) -> MaskedGeneLM:
    from transformers import BertForMaskedLM

    torch.manual_seed(cfg.seed)
    if cfg.init_from:
        from rankformer.model.loader import load_model

        return MaskedGeneLM(load_model(cfg.init_from, tracking_uri=tracking_uri).model)  # type: ignore[arg-type]
    config = bert_config(preset(cfg.preset, cfg.model), vocab)
    return MaskedGeneLM(BertForMaskedLM._from_config(config, attn_implementation="sdpa"))


def loop_options(cfg: PretrainConfig, extra: dict[str, float]) -> LoopOptions:
    return LoopOptions(
        max_steps=cfg.max_steps,
        seed=cfg.seed,
        log_every=cfg.log_every,
        checkpoint_every=cfg.checkpoint_every,
        optim=cfg.optim,
        precision=cfg.precision,
        compile=cfg.compile,
        extra_metrics=extra,
    )


def pretrain_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: stream its split, train, report checkpoints (rank 0 logs to MLflow)."""
    import ray.train

    from rankformer.train.ray_train import RayContext, worker_setup

    worker_setup(config)
    ctx = RayContext(config.get("tracking"))
    ctx.announce_nodes()
    seed = int(config["pretrain"]["seed"])
    train(config, ctx, ray_cells(ray.train.get_dataset_shard("train"), seed, ctx.rank))


def model_and_task(
    cfg: PretrainConfig, vocab: GeneVocab, cells: Any, ctx: Any, tracking_uri: str | None
) -> tuple[MaskedGeneLM, MaskedGeneTask]:
    """The model and the masked-gene task of one worker (``ctx``: its rank and device), its
    micro-batches packed (``--packed``) or padded and grouped by length.

    Packing is off by default until a GPU run has measured it: with attention dropout (every
    published preset has some) a packed batch's attention runs cell by cell, where a padded batch
    makes one call per layer. On a CPU it was measured faster for `geneformer-v1` and level for
    `tiny` (benchmark records, `ratio_packed_vs_length_grouped`)."""
    model = run_settings(build_model(cfg, vocab, tracking_uri), cfg)
    return model, MaskedGeneTask(cells, TokenSpec.of(vocab), cfg, ctx.rank, packed=cfg.batch.packed)


def run_settings(model: MaskedGeneLM, cfg: PretrainConfig) -> MaskedGeneLM:
    """The settings that change how the model computes a step, never what: activation
    checkpointing (each layer recomputed in the backward pass: less memory, about a third more
    compute, e.g. `geneformer-v2-316m` on a smaller GPU) and, for packed batches, attention within
    each cell."""
    if cfg.activation_checkpointing:
        model.mlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.batch.packed:
        use_varlen_attention(model.mlm)
    return model


def train(config: dict[str, Any], ctx: Any, cells: Any) -> None:
    """The training of one worker (``ctx``: a Ray Train or local loop context) on ``cells``."""
    from rankformer.train.loop import run_loop

    cfg = PretrainConfig(**config["pretrain"])
    vocab = GeneVocab.from_doc(config["vocab"])
    model, task = model_and_task(cfg, vocab, cells, ctx, (config.get("tracking") or {}).get("uri"))
    # the given budget, the CPU's default, or on a GPU the most its free memory holds
    budget, said = training_token_budget(
        cfg.batch.max_tokens, model.to(ctx.device), task, ctx.device, cfg.precision, _longest(config, model)
    )
    cfg.batch.max_tokens = budget  # the task batches by this (it holds the same config)
    if said:
        print(f"rank {ctx.rank}: {said}", flush=True)
        ctx.log({"max_tokens_per_micro_batch": float(budget), "step": 0.0})
    extra = {"flops_per_token": flops_per_token(model, config["mean_length"])}
    peak = peak_flops(ctx.device)
    if peak:
        extra["peak_flops"] = peak
    run_loop(model, task, loop_options(cfg, extra), ctx)


def _longest(config: dict[str, Any], model: MaskedGeneLM) -> int:
    """The longest cell a micro-batch may hold: the corpus's, else the model's positions."""
    c: Any = model.mlm.config
    return int(config.get("max_length") or c.max_position_embeddings)


READ_CPUS = 0.25  # a corpus read task's CPUs: light next to training, so reads fit beside the workers
# Beside the workers, Ray Data first lists the corpus files in a task of its default 1 CPU (its
# read API takes no resources for that task), then reads with READ_CPUS: one CPU must stay free.
BESIDE_CPUS = max(1.0, READ_CPUS)


def train_here(cfg: PretrainConfig, config: dict[str, Any], train_run: str) -> Any:
    """Train in this process, without Ray (``--in-process``): the same loop, task and checkpoints,
    kept in ``--storage-path``/RUN (default ./ray_results/RUN) so that a rerun resumes."""
    from rankformer.corpus.read import corpus_files
    from rankformer.train.local import LocalContext

    root = os.path.join(os.path.abspath(cfg.scale.storage_path or "ray_results"), train_run)
    device = "cuda" if cfg.scale.use_gpu else "cpu"
    ctx = LocalContext(root, device, config.get("tracking"))
    files = corpus_files(cfg.corpus, vocab_hash=config["vocab_hash"])
    train(config, ctx, arrow_cells(files, cfg.seed))
    return ctx.result()


def train_on_ray(cfg: PretrainConfig, config: dict[str, Any], train_run: str) -> Any:
    """Train on Ray Train workers, each streaming its split of the corpus (Ray Data)."""
    import ray.data

    from rankformer.corpus.read import read_corpus
    from rankformer.train.ray_train import fit

    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = read_corpus(cfg.corpus, columns=[schema.INPUT_IDS], read_cpus=READ_CPUS)
    ds = ds.randomize_block_order(seed=cfg.seed)
    return fit(pretrain_worker, config, {"train": ds}, cfg.scale, train_run, reads_cpus=BESIDE_CPUS)


def manifest_hash(manifest: dict[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def config_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_final(
    cfg: PretrainConfig, checkpoint_dir: str, vocab: GeneVocab, meta: dict[str, Any], tracking_uri: str
) -> str:
    """Model directory at ``cfg.out`` from the final checkpoint's weights; returns a local folder
    holding it (``cfg.out`` itself when local, else a temporary copy the caller removes)."""
    model = build_model(cfg, vocab, tracking_uri)  # the preset's or the initial model's architecture
    state = torch.load(os.path.join(checkpoint_dir, "model.pt"), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    save_model_dir(model.mlm, vocab, meta, cfg.out)
    if not fs.is_remote(cfg.out):
        return cfg.out
    local = tempfile.mkdtemp(prefix="rankformer-final-")
    save_model_dir(model.mlm, vocab, meta, os.path.join(local, "model"))
    return os.path.join(local, "model")


def run_pretrain(cfg: PretrainConfig, checked: Plan | None = None) -> dict[str, Any]:
    """Pretrain; write, log and register the model; return a summary. ``checked``: the
    :func:`plan` of ``cfg`` when the caller already made it (the CLI does, before torch loads)."""
    from rankformer import tracking
    from rankformer.cluster import ensure_ray
    from rankformer.config.corpus import ClusterOptions
    from rankformer.train.ray_train import trains_in_process, workers_demand

    p = checked or plan(cfg)
    uri = p.tracking_uri
    key = resume_key(cfg)
    earlier = tracking.find_run(uri, cfg.track.experiment, key)
    if earlier is not None and earlier["status"] == "FINISHED":
        done = _finished_model(cfg, earlier["run_id"])
        if done is not None:
            return done
        earlier = None  # finished, but its model is gone or replaced: train again
    here = trains_in_process(cfg.scale)
    if not here:  # a cluster that can never place the workers: refused here
        ensure_ray(ClusterOptions(ray_address=cfg.scale.ray_address), workers_demand(cfg.scale, BESIDE_CPUS))
    run_id, train_run, resumed = _resume_or_start(cfg, p, key, earlier)
    try:
        warmup = cfg.optim.warmup(cfg.max_steps)
        if not resumed:  # a resumed run has its params (MLflow never changes one)
            tracking.log_params(uri, run_id, {**config_dict(cfg), "warmup_steps_used": warmup})
        print(
            f"pretraining {cfg.preset} for {cfg.max_steps:,} steps, {cfg.optim.check_warmup(cfg.max_steps)}"
        )
        config = {
            "pretrain": config_dict(cfg),
            "vocab": json.loads(p.vocab.to_json()),
            "vocab_hash": p.vocab.content_hash,
            "tracking": {"uri": uri, "run_id": run_id},
            "mean_length": p.mean_length,
            "max_length": p.max_length,
        }
        control = most_common_gene_share(cfg.corpus, p.vocab)
        tracking.log_metrics(uri, run_id, {"control_accuracy_most_common_gene": control}, 0)
        with tracking.system_metrics(uri, run_id), tracking.heartbeat(uri, run_id):
            result = (train_here if here else train_on_ray)(cfg, config, train_run)
        summary = _finish(cfg, p, result, run_id, control)
    except BaseException:
        tracking.end_run(uri, run_id, "FAILED")
        raise
    tracking.end_run(uri, run_id)
    return summary


def _resume_or_start(
    cfg: PretrainConfig, p: Plan, key: str, earlier: dict[str, Any] | None
) -> tuple[str, str, bool]:
    """(MLflow run id, Ray Train run name, whether it resumes): the ``earlier`` run of this same
    training, interrupted, resumes from its last checkpoint (unless its driver still lives), else
    a new run starts; either way this driver claims it."""
    from rankformer import tracking

    uri = p.tracking_uri
    resumed = earlier is not None and TRAIN_RUN_TAG in earlier["tags"]
    if earlier is not None and resumed:
        run_id, train_run = earlier["run_id"], earlier["tags"][TRAIN_RUN_TAG]
        who = tracking.live_driver(earlier["tags"]) if earlier["status"] == "RUNNING" else None
        if who:  # a live driver: both would write the same checkpoints
            raise tracking.running_elsewhere(run_id, who)
        tracking.reopen_run(uri, run_id)
        resumes = int(earlier["tags"].get(RESUMES_TAG, "0")) + 1
        tracking.set_tag(uri, run_id, RESUMES_TAG, str(resumes))
        gone = "; its driver had stopped without ending it" if earlier["status"] == "RUNNING" else ""
        print(f"resuming the interrupted training of MLflow run {run_id} (Ray Train run {train_run}){gone}")
    else:
        name = cfg.track.run_name or f"pretrain-{os.path.basename(cfg.out.rstrip('/'))}"
        tags = {
            "job": "pretrain",
            "vocab_hash": p.vocab.content_hash,
            "corpus": cfg.corpus,
            tracking.RESUME_TAG: key,
        }
        run_id = tracking.start_run(uri, cfg.track.experiment, name, tags)
        train_run = f"{name}-{run_id[:8]}"  # the Ray Train run: its checkpoint folder in the storage
        tracking.set_tag(uri, run_id, TRAIN_RUN_TAG, train_run)
    try:  # a driver that started at the same moment may hold this training
        tracking.claim_run(uri, key, run_id)
    except InputError:
        if not resumed:
            tracking.delete_run(uri, run_id)  # ours alone; a resumed run is the other driver's
        raise
    return run_id, train_run, resumed


# options that change where and how robustly a training runs, not what it computes: a rerun that
# changes only these resumes the same training
_PLACE_ONLY = (
    "ray_address",
    "storage_path",
    "max_failures",
    "keep_checkpoints",
    "placement",
    "cpus_per_worker",
)
TRAIN_RUN_TAG = "rankformer.train_run"  # the Ray Train run name of an MLflow run's training
RESUMES_TAG = "rankformer.resumes"  # how many reruns resumed it


def resume_key(cfg: PretrainConfig) -> str:
    """What identifies a training: its output and every option that changes what it computes.
    It tags the MLflow run (which records its Ray Train run name, i.e. its checkpoint folder in
    the storage path), so that rerunning an interrupted job resumes from its last checkpoint, in
    the same run."""
    doc = config_dict(cfg)
    doc.pop("track")
    for k in _PLACE_ONLY:
        doc["scale"].pop(k)
    out = cfg.out if fs.is_remote(cfg.out) else os.path.abspath(cfg.out)
    return hashlib.sha256(json.dumps([out, doc], sort_keys=True).encode()).hexdigest()[:16]


def _finished_model(cfg: PretrainConfig, run_id: str) -> dict[str, Any] | None:
    """The summary of this same training, finished as MLflow run ``run_id``, when its model is
    at ``cfg.out`` (a rerun then does nothing), else None."""
    from rankformer.model.store import META

    if not fs.exists(fs.join(cfg.out, META)):
        return None
    training = fs.read_json(fs.join(cfg.out, META), "delete the folder and pretrain again").get(
        "training", {}
    )
    if training.get("mlflow_run_id") != run_id:
        return None
    print(f"already pretrained with these options -> {cfg.out} (MLflow run {run_id}); nothing to do")
    return {"out": cfg.out, "run_id": run_id, "already_done": True, **training}


def most_common_gene_share(corpus: str, vocab: GeneVocab, max_cells: int = 100_000) -> float:
    """The masked-gene accuracy of always guessing the corpus's most common gene (masking picks gene
    tokens uniformly): the control a pretrained model's accuracy is read against. Counted over the
    first ``max_cells`` cells in manifest order."""
    import pyarrow.parquet as pq

    from rankformer.corpus.read import corpus_files

    counts = np.zeros(vocab.n_tokens, dtype=np.int64)
    gene_lo, seen = TokenSpec.of(vocab).gene_lo, 0
    for uri in corpus_files(corpus, vocab_hash=vocab.content_hash):
        with fs.open_input(uri) as f:
            for rb in pq.ParquetFile(f).iter_batches(columns=[schema.INPUT_IDS]):
                rb = rb.slice(0, max_cells - seen)
                flat = rb.column(0).flatten().to_numpy()
                counts += np.bincount(flat, minlength=vocab.n_tokens)[: vocab.n_tokens]
                seen += rb.num_rows
                if seen >= max_cells:
                    break
        if seen >= max_cells:
            break
    genes = counts[gene_lo:]
    return float(genes.max() / max(genes.sum(), 1))


def _finish(
    cfg: PretrainConfig, p: Plan, result: Any, run_id: str, control: float = float("nan")
) -> dict[str, Any]:
    from rankformer import tracking

    metrics = dict(result.metrics or {})
    meta = {
        "task": "masked-lm",
        "layout": p.layout,
        "max_length": p.max_length,
        "preset": cfg.preset if not cfg.init_from else f"init:{cfg.init_from}",
        "corpus": cfg.corpus,
        "corpus_manifest_hash": manifest_hash(p.manifest),
        "training": {"mlflow_run_id": run_id, **{k: metrics[k] for k in sorted(metrics) if k != "epoch"}},
    }
    with result.checkpoint.as_directory() as d:
        local = save_final(cfg, d, p.vocab, meta, p.tracking_uri)
    tracking.log_artifacts(p.tracking_uri, run_id, local, "model")
    if local != cfg.out:
        shutil.rmtree(os.path.dirname(local), ignore_errors=True)
    version = None
    if cfg.track.registered_model:
        reg_tags = {
            "vocab_hash": p.vocab.content_hash,
            "corpus_manifest": manifest_hash(p.manifest),
            "corpus": cfg.corpus,
            "layout": p.layout,
        }
        version = tracking.register_model(
            p.tracking_uri, run_id, "model", cfg.track.registered_model, cfg.track.alias, reg_tags
        )
    summary = {
        "out": cfg.out,
        "run_id": run_id,
        "tracking_uri": p.tracking_uri,
        "version": version,
        "checkpoint": result.checkpoint.path,
        **metrics,
    }
    reg = f", registered {cfg.track.registered_model} v{version} @{cfg.track.alias}" if version else ""
    accuracy = float(metrics.get("accuracy", float("nan")))
    print(
        f"pretrained {cfg.preset} for {int(metrics.get('step', cfg.max_steps))} steps: loss "
        f"{metrics.get('loss', float('nan')):.3f}, masked-gene accuracy {accuracy:.3f} (always guessing "
        f"the most common gene: {control:.3f}) -> {cfg.out} (MLflow run {run_id}{reg})"
    )
    summary["control_accuracy_most_common_gene"] = control
    if not accuracy > 2 * control:  # the last logged steps' accuracy, noisy: a factor, not a margin
        print(
            f"WARNING: masked-gene accuracy {accuracy:.3f} is not twice that of always guessing the most "
            f"common gene ({control:.3f}): the model has learnt little, and embeddings, classifiers and "
            "perturbations built on it will be near chance. Train longer (--max-steps), on more cells, or "
            "check --lr"
        )
    return summary
