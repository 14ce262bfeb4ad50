"""Typed configs of the training jobs. Every field has a one-line doc (its trailing comment), which
the CLI shows as the flag's help; nested options flatten to flags of their own name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rankformer.errors import InputError


@dataclass
class OptimOptions:
    lr: float = 1e-3  # peak learning rate (Geneformer V1: 1e-3)
    warmup_steps: int = 10_000  # linear warmup steps (Geneformer V1: 10,000)
    schedule: str = "linear"  # decay after warmup: linear or cosine (to 0 at max_steps)
    weight_decay: float = 0.001  # AdamW weight decay (Geneformer V1: 0.001)
    grad_clip: float = 1.0  # clip the gradient norm to this (0: no clipping)
    grad_accum: int = 1  # micro-batches per optimizer step
    adam_beta2: float = 0.999  # AdamW beta2
    adam_eps: float = 1e-8  # AdamW epsilon

    def check(self) -> None:
        if self.schedule not in ("linear", "cosine"):
            raise InputError(f"schedule {self.schedule!r} must be linear or cosine")
        if self.lr <= 0 or self.warmup_steps < 0 or self.grad_accum < 1:
            raise InputError("lr must be > 0, warmup_steps >= 0 and grad_accum >= 1")


@dataclass
class BatchOptions:
    max_tokens: int = 16_384  # per micro-batch and worker: cells x longest cell, padding included
    max_cells: int = 64  # cells per micro-batch at most
    megabatch_cells: int = 1024  # cells sorted by length together before batching (length grouping)

    def check(self) -> None:
        if min(self.max_tokens, self.max_cells, self.megabatch_cells) < 1:
            raise InputError("max_tokens, max_cells and megabatch_cells must be >= 1")


@dataclass
class ScaleOptions:
    num_workers: int = 1  # Ray Train workers (one per GPU on a GPU cluster)
    use_gpu: bool = False  # one GPU per worker; DDP over NCCL (else gloo on CPU)
    cpus_per_worker: float = 1.0  # CPUs reserved per worker
    placement: str = "PACK"  # PACK workers onto few nodes, or SPREAD them over nodes
    ray_address: str | None = None  # Ray cluster to join; default RAY_ADDRESS, else a local one
    storage_path: str | None = None  # checkpoints, local or s3:// (default ./ray_results)
    max_failures: int = 1  # restarts from the last checkpoint after a worker dies
    keep_checkpoints: int = 2  # checkpoints kept (the best by loss; the latest is always kept)

    def check(self) -> None:
        if self.placement not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise InputError(
                f"placement {self.placement!r} must be PACK, SPREAD, STRICT_PACK or STRICT_SPREAD"
            )
        if self.num_workers < 1 or self.max_failures < 0 or self.keep_checkpoints < 1:
            raise InputError("num_workers and keep_checkpoints must be >= 1, max_failures >= 0")


@dataclass
class TrackOptions:
    tracking_uri: str | None = None  # MLflow store; default MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "rankformer"  # MLflow experiment name
    registered_model: str | None = None  # register the final model under this name
    alias: str = "current"  # registry alias set on the new version ('latest' is reserved)
    run_name: str | None = None  # MLflow run name (default: job and output name)


@dataclass
class PretrainConfig:
    """`rankformer pretrain`: masked-gene BERT on a Parquet corpus, on Ray Train, tracked in MLflow."""

    corpus: str  # corpus folder from `rankformer tokenize` (local or s3://)
    out: str  # model folder to write (local or s3://)
    preset: str = "tiny"  # tiny, geneformer-v1, geneformer-v2-104m, geneformer-v2-316m
    model: dict[str, Any] = field(default_factory=dict)  # preset overrides, e.g. {num_hidden_layers: 4}
    init_from: str | None = None  # continue pretraining this model (path, s3:// or models:/NAME@ALIAS)
    vocab: str | None = None  # vocabulary JSON (default: the corpus manifest's)
    max_steps: int = 1000  # optimizer steps
    seed: int = 0  # model init, masking, shuffling
    mask_prob: float = 0.15  # share of gene tokens to predict
    log_every: int = 10  # steps between metric logs
    checkpoint_every: int = 200  # steps between checkpoints (and at the end)
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU), bf16 or fp32
    compile: bool = False  # torch.compile the model
    optim: OptimOptions = field(default_factory=OptimOptions)
    batch: BatchOptions = field(default_factory=BatchOptions)
    scale: ScaleOptions = field(default_factory=ScaleOptions)
    track: TrackOptions = field(default_factory=TrackOptions)

    def __post_init__(self) -> None:
        self.optim = _nested(OptimOptions, self.optim)
        self.batch = _nested(BatchOptions, self.batch)
        self.scale = _nested(ScaleOptions, self.scale)
        self.track = _nested(TrackOptions, self.track)
        for part in (self.optim, self.batch, self.scale):
            part.check()
        if self.max_steps < 1 or self.log_every < 1 or self.checkpoint_every < 1:
            raise InputError("max_steps, log_every and checkpoint_every must be >= 1")
        if not 0.0 < self.mask_prob < 1.0:
            raise InputError(f"mask_prob {self.mask_prob} must be within (0, 1)")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise InputError(f"precision {self.precision!r} must be auto, bf16 or fp32")


def _nested(cls: type, value: Any) -> Any:
    from rankformer.config import from_mapping

    return from_mapping(cls, value) if isinstance(value, dict) else value
