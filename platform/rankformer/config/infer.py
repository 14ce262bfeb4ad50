"""The inference jobs' configs (`predict`, `embed`, `perturb`), importable without torch: the
command line builds its parser from them, so every command, `--help` included, starts without
loading torch and Transformers."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import get_args

from rankformer.config.types import (
    GeneStat,
    Level,
    Missing,
    PerturbKind,
    PerturbMode,
    Pooling,
    Precision,
    check_choice,
    check_choices,
)
from rankformer.errors import InputError

KINDS: tuple[str, ...] = get_args(PerturbKind)
PRECISION_NAMES = ("float32", "bfloat16", "float16")  # the canonical spellings of Precision
LAYER_NAMES = ("penultimate", "last")


def check_layer(layer: str) -> None:
    """The `layer` option's form (its range needs the model: :func:`pick_layer`)."""
    if str(layer) in LAYER_NAMES:
        return
    try:
        int(layer)
    except ValueError:
        raise InputError(
            f"layer {layer!r} must be penultimate, last or an integer index into hidden_states "
            "(0 = embedding output, negative from the end)"
        ) from None


def pick_layer(layer: str | int, n_layers: int) -> int:
    """Index into Hugging Face ``hidden_states`` (0 = embedding output, n_layers = last layer)."""
    if layer == "penultimate":
        return n_layers - 1
    if layer == "last":
        return n_layers
    check_layer(str(layer))
    i = int(layer)
    if not -(n_layers + 1) <= i <= n_layers:
        raise InputError(
            f"layer {layer} is outside this model's hidden_states 0..{n_layers} ({n_layers} layers; "
            f"negative counts from the end, down to -{n_layers + 1})"
        )
    return i % (n_layers + 1)


PRECISION_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # as training spells them


def check_precision(precision: str, use_gpu: bool) -> Precision:
    """The `precision` option of the inference jobs and the endpoints, by its name (training's
    fp32/bf16/fp16 spellings accepted)."""
    precision = PRECISION_ALIASES.get(precision, precision)
    if precision not in PRECISION_NAMES:
        raise InputError(f"precision {precision!r} must be one of {list(PRECISION_NAMES)}")
    if precision == "float16" and not use_gpu:
        raise InputError("precision float16 needs --use-gpu; on CPU use bfloat16 (or float32)")
    return typing.cast(Precision, precision)


def check_perturbation(kind: str, mode: str, genes: list[str], missing: str, shift: float) -> list[str]:
    """The perturbation options (the job's and the in-memory API's); returns the gene list with
    comma-separated items split (``A,B`` is two genes)."""
    check_choice("kind", kind, KINDS)
    check_choice("mode", mode, get_args(PerturbMode))
    genes = [g.strip() for item in genes for g in item.split(",") if g.strip()]
    if mode != "all" and not genes:
        raise InputError("give --genes to perturb, or --mode all for every gene of each cell")
    check_choice("missing", missing, get_args(Missing))
    if not 0 < shift <= 1:
        raise InputError(f"shift {shift} must be within (0, 1]")
    return genes


@dataclass
class ModelOnCorpus:
    """What every inference job names: a model, a corpus it reads and an output folder."""

    model: str  # model: folder, s3:// prefix or models:/NAME@ALIAS
    corpus: str  # corpus folder (tokenized with the model's vocabulary)
    out: str  # output folder (local or s3://)
    cells_where: list[str] = field(default_factory=list)  # keep cells whose carried obs match: COL=V1,V2
    limit_cells: int | None = None  # take a seeded sample of this many of the selected cells; unset: all
    seed: int = 0  # the sample's seed
    max_tokens: int | None = None  # tokens a forward pass (cells x longest); unset: 16,384, GPU: by memory
    tracking_uri: str | None = None  # MLflow store for models:/ URIs (default MLFLOW_TRACKING_URI, sqlite)

    def __post_init__(self) -> None:
        if self.limit_cells is not None and self.limit_cells < 1:
            raise InputError(
                f"limit_cells {self.limit_cells} must be >= 1 (or left out: every selected cell)"
            )
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InputError(f"max_tokens {self.max_tokens} must be >= 1 (a longer cell runs alone)")


@dataclass
class PredictConfig(ModelOnCorpus):
    """`rankformer predict genes|cells`: a fine-tuned classifier applied to another corpus."""


@dataclass
class ActorPoolJob(ModelOnCorpus):
    """Jobs that read a layer's states of every selected cell on a pool of Ray actors."""

    layer: str = "penultimate"  # penultimate, last, or an index into hidden_states (0 = embeddings)
    num_workers: int = 1  # actors, one model each
    use_gpu: bool = False  # one GPU per actor
    precision: Precision = "float32"  # float32 (exact), bfloat16, or float16 (GPU only); scores in float32
    ray_address: str | None = None  # Ray cluster to join; default RAY_ADDRESS, else local
    in_process: bool | None = None  # run here (default: a one-shard corpus with no cluster named)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.precision = check_precision(self.precision, self.use_gpu)
        check_layer(self.layer)
        if self.num_workers < 1:
            raise InputError(f"num_workers {self.num_workers} must be >= 1")


@dataclass
class EmbedConfig(ActorPoolJob):
    """`rankformer embed`: cell or gene embeddings of a corpus under a model."""

    level: Level = "cell"  # cell or gene
    pooling: Pooling = "mean"  # cell vector: mean over gene tokens, or cls (v2-layout models)
    gene_stat: GeneStat = "mean"  # gene vector over occurrences: mean, or median (writes every occurrence)
    plot_column: str | None = None  # carried column colouring the UMAP and the per-class heatmap
    experiment: str | None = None  # log plots and the manifest to a run of this experiment (tracking_uri)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choices(self)
        # options of the other level would be silently ignored
        if self.level == "gene" and (self.pooling != "mean" or self.plot_column):
            raise InputError(
                "--pooling and --plot-column are cell-level options; drop them with --level gene"
            )
        if self.level == "cell" and self.gene_stat != "mean":
            raise InputError("--gene-stat is a gene-level option; add --level gene")


@dataclass
class PerturbConfig(ActorPoolJob):
    """`rankformer perturb`: how perturbing genes moves each cell's embedding."""

    kind: PerturbKind = "delete"  # delete, overexpress, inhibit or activate
    genes: list[str] = field(default_factory=list)  # genes to perturb (Ensembl ids or symbols)
    mode: PerturbMode = "each"  # each (listed genes one at a time), together (all at once), or all
    anchor: str | None = None  # perturb this gene together with each other one
    shift: float = 0.1  # inhibit/activate: ranks moved, as a share of the cell's genes
    missing: Missing = "skip"  # listed genes not in the vocabulary: skip (reported) or error
    state_column: str | None = None  # carried column naming each cell's state
    start_state: str | None = None  # perturb only cells of this state
    goal_state: str | None = None  # score the shift toward this state
    alt_states: list[str] = field(default_factory=list)  # further states to score shifts toward
    state_cells: int | None = None  # state embeddings from at most this many cells per state (seeded)
    per_gene: bool = False  # also write each affected gene's cosine (genes-part-*.parquet)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.genes = check_perturbation(self.kind, self.mode, self.genes, self.missing, self.shift)
        if self.state_cells is not None and self.state_cells < 1:
            raise InputError(
                f"state_cells {self.state_cells} must be >= 1 (or left out: every cell of a state)"
            )
        states = [s for s in (self.start_state, self.goal_state, *self.alt_states) if s]
        if states and not self.state_column:
            raise InputError("--start-state/--goal-state/--alt-states need --state-column")
