"""Typed configs of the training jobs. Every field has a one-line doc (its trailing comment), which
the CLI shows as the flag's help; nested options flatten to flags of their own name."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from rankformer.config.infer import check_layer
from rankformer.config.types import (
    Peft,
    Placement,
    Quantize,
    Schedule,
    TrainPrecision,
    check_choice,
    check_choices,
)
from rankformer.errors import InputError


@dataclass
class OptimOptions:
    # The recipe's warmup (Geneformer V1 pretraining: 10,000 steps, a tenth of a 100,000-step run).
    # A run shorter than the recipe assumes warms up for the same tenth of its own steps: 10,000 steps
    # of a 2,000-step run would reach the peak rate only at the last step, and learn almost nothing.
    RECIPE_WARMUP: ClassVar[int] = 10_000
    RECIPE_SHARE: ClassVar[float] = 0.1

    lr: float = 1e-3  # peak learning rate (Geneformer V1: 1e-3)
    warmup_steps: int | None = None  # linear warmup steps (default: 10,000, or a tenth of a shorter run)
    warmup_fraction: float = 0.0  # warmup as a share of the steps (instead of warmup_steps)
    schedule: Schedule = "linear"  # decay after warmup: linear or cosine (to 0 at max_steps)
    weight_decay: float = 0.001  # AdamW weight decay (Geneformer V1: 0.001)
    grad_clip: float = 1.0  # clip the gradient norm to this (0: no clipping)
    grad_accum: int = 1  # micro-batches per optimizer step
    adam_beta2: float = 0.999  # AdamW beta2
    adam_eps: float = 1e-8  # AdamW epsilon

    def check(self) -> None:
        check_choices(self)
        if self.lr <= 0 or (self.warmup_steps or 0) < 0 or self.grad_accum < 1:
            raise InputError("lr must be > 0, warmup_steps >= 0 and grad_accum >= 1")
        if not 0.0 <= self.warmup_fraction < 0.5:
            raise InputError(
                f"warmup_fraction {self.warmup_fraction} must be within [0, 0.5): half the run or more "
                "spent warming up leaves too few steps at the peak rate"
            )
        if self.warmup_fraction > 0 and self.warmup_steps is not None:
            raise InputError(
                f"give --warmup-steps ({self.warmup_steps}) or --warmup-fraction ({self.warmup_fraction:g}), "
                "not both: one would be ignored"
            )

    def warmup(self, max_steps: int) -> int:
        """Warmup steps of a run of ``max_steps``."""
        if self.warmup_fraction > 0:
            return round(self.warmup_fraction * max_steps)
        if self.warmup_steps is None:
            return min(self.RECIPE_WARMUP, round(self.RECIPE_SHARE * max_steps))
        return min(self.warmup_steps, max_steps)

    def check_warmup(self, max_steps: int, steps_from: str = "--max-steps") -> str:
        """The warmup of a run of ``max_steps``, said in words; an explicit ``warmup_steps`` that would
        take half the run or more is refused (the rate would peak late or never: a run that looks
        fine and has learnt little). ``steps_from``: the flags that set the run's length."""
        warm = self.warmup(max_steps)
        if self.warmup_fraction > 0:
            return f"warmup {warm:,} steps ({self.warmup_fraction:g} of {max_steps:,})"
        if self.warmup_steps is None:
            if warm == self.RECIPE_WARMUP:
                return f"warmup {warm:,} steps (the recipe's)"
            return (
                f"warmup {warm:,} steps: a tenth of the run's {max_steps:,} (the recipe's "
                f"{self.RECIPE_WARMUP:,} assume a run of {round(self.RECIPE_WARMUP / self.RECIPE_SHARE):,} "
                "steps or more)"
            )
        tenth = max(1, round(self.RECIPE_SHARE * max_steps))
        if 2 * self.warmup_steps >= max_steps and self.warmup_steps > tenth:
            share = min(self.warmup_steps, max_steps) / max_steps
            raise InputError(
                f"warmup_steps {self.warmup_steps:,} would spend {share:.0%} of the run's {max_steps:,} "
                "steps warming up (the learning rate would peak late or never, and the model learn "
                f"little): give --warmup-steps {tenth:,} or leave it out (a tenth of the run), or "
                f"lengthen the run ({steps_from})"
            )
        return f"warmup {warm:,} steps"


@dataclass
class Batching:
    """What training's batches share, whatever sets their token budget."""

    max_cells: int = 64  # cells per micro-batch at most
    megabatch_cells: int = 1024  # cells sorted by length together before batching (length grouping)
    packed: bool = False  # cells end to end in one token stream, no padding, attention within each cell

    def check(self) -> None:
        if min(getattr(self, "max_tokens", None) or 1, self.max_cells, self.megabatch_cells) < 1:
            raise InputError("max_tokens, max_cells and megabatch_cells must be >= 1")


@dataclass
class BatchOptions(Batching):
    """Fine-tuning's batches (a fixed budget: the steps per epoch are counted before any worker starts)."""

    max_tokens: int = 16_384  # tokens per micro-batch and worker, padding included (cells x longest)


@dataclass
class PretrainBatchOptions(Batching):
    """Pretraining's batches: on a GPU the token budget may come from the memory free beside the model."""

    max_tokens: int | None = None  # tokens per micro-batch and worker (16,384; on a GPU: what memory holds)


@dataclass
class ScaleOptions:
    num_workers: int = 1  # Ray Train workers (one per GPU on a GPU cluster)
    use_gpu: bool = False  # one GPU per worker; DDP over NCCL (else gloo on CPU)
    cpus_per_worker: float = 1.0  # CPUs reserved per worker
    placement: Placement = "PACK"  # PACK workers onto few nodes, or SPREAD them over nodes
    ray_address: str | None = None  # Ray cluster to join; default RAY_ADDRESS, else a local one
    in_process: bool | None = None  # train in this process (default: when 1 worker and no cluster named)
    storage_path: str | None = None  # checkpoints, local or s3:// (default ./ray_results)
    max_failures: int = 1  # restarts from the last checkpoint after a worker dies
    keep_checkpoints: int = 2  # checkpoints kept (the best by loss; the latest is always kept)

    def check(self) -> None:
        check_choices(self)
        if self.num_workers < 1 or self.max_failures < 0 or self.keep_checkpoints < 1:
            raise InputError("num_workers and keep_checkpoints must be >= 1, max_failures >= 0")
        if self.cpus_per_worker <= 0:
            raise InputError(f"cpus_per_worker {self.cpus_per_worker} must be > 0")
        if self.in_process and self.num_workers > 1:
            raise InputError(
                f"--in-process trains one worker in this process, not --num-workers {self.num_workers}: "
                "drop one of the two"
            )
        if self.in_process and self.storage_path and "://" in self.storage_path:
            raise InputError(
                f"--in-process keeps checkpoints on this machine, not at {self.storage_path}: give a "
                "local --storage-path, or train on Ray Train (--no-in-process)"
            )


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
    vocab: str | None = None  # vocabulary JSON (default: the one the corpus keeps)
    max_steps: int = 1000  # optimizer steps
    seed: int = 0  # model init, masking, shuffling
    mask_prob: float = 0.15  # share of gene tokens to predict
    log_every: int = 10  # steps between metric logs
    checkpoint_every: int = 200  # steps between checkpoints (and at the end)
    precision: TrainPrecision = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU), bf16 or fp32
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False  # recompute each layer in the backward pass: less memory
    optim: OptimOptions = field(default_factory=OptimOptions)
    batch: PretrainBatchOptions = field(default_factory=PretrainBatchOptions)
    scale: ScaleOptions = field(default_factory=ScaleOptions)
    track: TrackOptions = field(default_factory=TrackOptions)

    def __post_init__(self) -> None:
        self.optim = _nested(OptimOptions, self.optim)
        self.batch = _nested(PretrainBatchOptions, self.batch)
        self.scale = _nested(ScaleOptions, self.scale)
        self.track = _nested(TrackOptions, self.track)
        for part in (self.optim, self.batch, self.scale):
            part.check()
        if self.max_steps < 1 or self.log_every < 1 or self.checkpoint_every < 1:
            raise InputError("max_steps, log_every and checkpoint_every must be >= 1")
        self.optim.check_warmup(self.max_steps)
        if not 0.0 < self.mask_prob < 1.0:
            raise InputError(f"mask_prob {self.mask_prob} must be within (0, 1)")
        self.precision = check_training_precision(self.precision)


def check_training_precision(precision: str) -> TrainPrecision:
    """Training's mixed precision by its name (the inference jobs' float32/bfloat16 accepted)."""
    precision = {"float32": "fp32", "bfloat16": "bf16"}.get(precision, precision)
    check_choice("precision", precision, ("auto", "bf16", "fp32"))
    return typing.cast(TrainPrecision, precision)


def _nested(cls: type, value: Any) -> Any:
    from rankformer.config.corpus import from_mapping

    return from_mapping(cls, value) if isinstance(value, dict) else value


@dataclass
class FinetuneOptim(OptimOptions):
    """Fine-tuning defaults from Geneformer's examples for 6-layer models."""

    RECIPE_WARMUP: ClassVar[int] = 500  # Geneformer's fine-tuning examples

    lr: float = 5e-5  # peak learning rate (Geneformer fine-tuning: 5e-5)
    warmup_steps: int | None = None  # linear warmup steps (default: a tenth of the run, at most 500)


@dataclass
class HeadOptions:
    head_class: str | None = None  # AutoModelFor... name or module:Class path (default: BERT's own head)
    freeze_layers: int = 0  # freeze the first N encoder layers
    freeze_embeddings: bool = False  # freeze the token and position embeddings
    class_weights: str = "none"  # loss weights: none, balanced, or one number per class (1,3)
    dropout: float | None = None  # classifier dropout (default: the model's hidden dropout)

    def check(self) -> None:
        if self.freeze_layers < 0:
            raise InputError(f"freeze_layers {self.freeze_layers} must be >= 0")
        if self.class_weights not in ("none", "balanced"):
            try:
                [float(x) for x in self.class_weights.split(",")]
            except ValueError:
                raise InputError(
                    f"class_weights {self.class_weights!r} must be none, balanced or numbers like 1,3"
                ) from None


@dataclass
class AdapterOptions:
    """Parameter-efficient fine-tuning: LoRA adapters (Hugging Face PEFT) on a frozen encoder."""

    peft: Peft = "none"  # lora: train low-rank adapters and the head only, the base weights frozen
    lora_rank: int = 8  # LoRA: rank of each adapter
    lora_alpha: int = 16  # LoRA: scaling numerator (the update is scaled by alpha / rank)
    lora_dropout: float = 0.1  # LoRA: dropout on the adapters' input
    lora_targets: list[str] = field(default_factory=lambda: ["query", "value"])  # LoRA: modules adapted
    merge: bool = False  # save the adapters merged into a plain Hugging Face model (else adapters + base ref)
    quantize: Quantize = "none"  # 8bit or 4bit frozen base weights (CUDA, bitsandbytes; LoRA only)

    def check(self, use_gpu: bool) -> None:
        check_choices(self)
        if self.peft == "none":
            extra = [f for f in ("merge", "quantize") if getattr(self, f) not in (False, "none")]
            if extra:
                raise InputError(f"{', '.join(extra)} go with adapters; add --peft lora or leave them out")
            return
        if self.lora_rank < 1 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise InputError(
                f"lora_rank {self.lora_rank} must be >= 1, lora_alpha {self.lora_alpha} > 0 and "
                f"lora_dropout {self.lora_dropout} within [0, 1)"
            )
        if not self.lora_targets:
            raise InputError("lora_targets names no module; give e.g. --lora-targets query value")
        if self.quantize != "none" and not use_gpu:
            raise InputError(
                f"quantize {self.quantize}: quantized base weights need a CUDA GPU (bitsandbytes); add "
                "--use-gpu on a GPU machine, or leave --quantize out to fine-tune adapters in full precision"
            )


@dataclass
class TuneOptions:
    trials: int = 0  # Ray Tune trials before the final training (0: no search)
    tune_lr: list[float] = field(default_factory=lambda: [1e-6, 1e-3])  # lr range, log-uniform
    tune_warmup_fraction: list[float] = field(default_factory=lambda: [0.0, 0.3])  # warmup share range
    tune_weight_decay: list[float] = field(default_factory=lambda: [0.0, 0.3])  # weight decay range
    tune_freeze_layers: list[int] = field(default_factory=list)  # frozen-layer choices (default: 0..layers-1)
    grace_steps: int = 20  # ASHA: steps a trial runs before it may be stopped
    eval_every: int = 20  # steps between a trial's validation scores
    cpus_per_trial: float = 1.0  # CPUs per trial (one GPU each when use_gpu)

    def check(self) -> None:
        if self.trials < 0 or self.eval_every < 1 or self.grace_steps < 1:
            raise InputError("trials must be >= 0, eval_every and grace_steps >= 1")
        for name in ("tune_lr", "tune_warmup_fraction", "tune_weight_decay"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or lo_hi[0] > lo_hi[1]:
                raise InputError(f"{name} {lo_hi} must be two numbers, low then high")
        if not 0.0 <= self.tune_warmup_fraction[0] <= self.tune_warmup_fraction[1] < 0.5:
            raise InputError(f"tune_warmup_fraction {self.tune_warmup_fraction} must lie within [0, 0.5)")


@dataclass
class FinetuneCommon:
    """Options both classification jobs share."""

    corpus: str  # corpus folder from `rankformer tokenize` (local or s3://)
    model: str  # pretrained model: folder, s3:// prefix or models:/NAME@ALIAS
    out: str  # output folder: predictions, metrics, plots and the fine-tuned model
    cells_where: list[str] = field(default_factory=list)  # keep cells whose carried obs match: COL=V1,V2
    limit_cells: int | None = None  # cap the selected cells (a seeded sample)
    seed: int = 0  # splits, initialisation of the head, shuffling
    epochs: float = 1.0  # passes over the training cells per training
    max_steps: int | None = None  # optimizer steps per training (replaces epochs when given)
    log_every: int = 10  # steps between metric logs
    checkpoint_every: int = 100  # steps between checkpoints (and at the end)
    precision: TrainPrecision = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU), bf16 or fp32
    layer: str = "penultimate"  # frozen-embedding baseline layer: penultimate, last or an index
    shuffled_controls: int = 0  # also train this many times on shuffled labels (the chance control)
    optim: FinetuneOptim = field(default_factory=FinetuneOptim)
    head: HeadOptions = field(default_factory=HeadOptions)
    batch: BatchOptions = field(default_factory=lambda: BatchOptions(max_tokens=16_384, max_cells=12))
    scale: ScaleOptions = field(default_factory=ScaleOptions)
    track: TrackOptions = field(default_factory=TrackOptions)
    tune: TuneOptions = field(default_factory=TuneOptions)
    adapter: AdapterOptions = field(default_factory=AdapterOptions)

    def __post_init__(self) -> None:
        self.adapter = _nested(AdapterOptions, self.adapter)
        self.optim = _nested(FinetuneOptim, self.optim)
        self.head = _nested(HeadOptions, self.head)
        self.batch = _nested(BatchOptions, self.batch)
        self.scale = _nested(ScaleOptions, self.scale)
        self.track = _nested(TrackOptions, self.track)
        self.tune = _nested(TuneOptions, self.tune)
        for part in (self.optim, self.head, self.batch, self.scale, self.tune):
            part.check()
        self.adapter.check(self.scale.use_gpu)
        if self.epochs <= 0 or (self.max_steps is not None and self.max_steps < 1):
            raise InputError("epochs must be > 0 and max_steps >= 1")
        if self.log_every < 1 or self.checkpoint_every < 1:
            raise InputError("log_every and checkpoint_every must be >= 1")
        self.precision = check_training_precision(self.precision)
        check_layer(self.layer)
        if self.shuffled_controls < 0:
            raise InputError(f"shuffled_controls {self.shuffled_controls} must be >= 0")


@dataclass
class FinetuneGenesConfig(FinetuneCommon):
    """`rankformer finetune genes`: which other genes share a feature, learned from labelled genes."""

    labels: list[str] = field(default_factory=list)  # a label table, or CLASS=FILE gene lists
    gene_column: str | None = None  # gene column of a long label table (default: found by name)
    label_column: str | None = None  # label column of a long label table (default: found by name)
    folds: int = 5  # cross-validation folds, split by gene
    positive_class: str | None = None  # class the ranking and ROC curve follow (default: the first)
    shuffled_controls: int = 1  # also cross-validate this many label shuffles (the chance control)
    frozen_baseline: bool = True  # logistic regression on frozen gene embeddings, same folds

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.folds < 2:
            raise InputError(f"folds {self.folds} must be >= 2")


@dataclass
class FinetuneCellsConfig(FinetuneCommon):
    """`rankformer finetune cells`: a cell classifier from a carried obs label column."""

    label_column: str = "cell_type"  # carried obs column holding each cell's class
    tasks: list[str] = field(default_factory=list)  # several label columns: one encoder, a head each
    task_weights: list[float] = field(default_factory=list)  # each task's share of the loss (default 1 each)
    group_column: str | None = None  # carried obs column no split may share (donor, sample, batch)
    classes: list[str] = field(default_factory=list)  # keep only these classes (after renaming)
    rename: dict[str, str] = field(default_factory=dict)  # class renames; several to one merges them
    test_fraction: float = 0.2  # share of cells (or groups) held out for the test split
    validation_fraction: float = 0.1  # share held out for validation (per-epoch scores)
    epochs: float = 10.0  # passes over the training cells (Geneformer: 10)
    frozen_baseline: bool = True  # logistic regression on frozen mean-pooled cell embeddings

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (0 < self.test_fraction < 1 and 0 <= self.validation_fraction < 1):
            raise InputError("test_fraction must be within (0, 1) and validation_fraction within [0, 1)")
        if self.test_fraction + self.validation_fraction >= 1:
            raise InputError("test_fraction + validation_fraction must leave cells to train on")
        self._check_tasks()

    def _check_tasks(self) -> None:
        if not self.tasks:
            if self.task_weights:
                raise InputError("task_weights weigh the --tasks; give --tasks COL1 COL2 ... with them")
            return
        if len(set(self.tasks)) < 2:
            raise InputError(
                f"tasks {self.tasks}: multi-task classification needs two or more different label columns "
                "(one column: --label-column)"
            )
        if self.task_weights and (
            len(self.task_weights) != len(self.tasks)
            or min(self.task_weights) < 0
            or max(self.task_weights) == 0
        ):
            raise InputError(
                f"task_weights {self.task_weights}: one number >= 0 per task ({len(self.tasks)}), not all 0"
            )
        if self.classes:
            raise InputError(
                "classes keeps classes of one label column; with --tasks every value of each is a class"
            )
        if self.tune.trials:
            raise InputError(
                "a Ray Tune search (--trials) is for one label column; leave --trials out with --tasks"
            )
        if self.head.class_weights != "none":
            raise InputError(
                "class_weights are for one label column; with --tasks weigh the tasks (--task-weights)"
            )
