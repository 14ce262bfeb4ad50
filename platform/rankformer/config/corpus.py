"""Typed job configs: one dataclass per job, validated at the door, loadable from YAML + flags."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, TypeVar

import yaml

from rankformer import schema
from rankformer.config.types import Layout, check_choice
from rankformer.errors import InputError

T = TypeVar("T")

LAYOUT_MAX_LENGTH = {"v1": 2048, "v2": 4096}


@dataclass
class ReadOptions:
    """How input files are read and split into work."""

    gene_id_column: str = schema.DEFAULT_GENE_ID_COLUMN  # var column of gene ids ('index' = names)
    gene_table: str | None = None  # CSV/TSV mapping symbols to Ensembl ids (adds aliases)
    counts: str = "X"  # matrix of raw counts: X, raw (raw/X with raw/var) or layers/NAME
    allow_normalized: bool = False  # accept non-integer counts (medians then mean something else)
    rows_per_shard: int = 50_000  # cells per output shard / Ray task
    chunk_rows: int = 4096  # cells read into memory at once inside a task

    def check(self) -> None:
        if self.rows_per_shard < 1 or self.chunk_rows < 1:
            raise InputError("rows_per_shard and chunk_rows must be >= 1")
        if self.counts not in ("X", "raw", "raw/X") and not (
            self.counts.startswith("layers/") and len(self.counts) > len("layers/")
        ):
            raise InputError(f"counts {self.counts!r} must be X, raw or layers/NAME (e.g. layers/counts)")


@dataclass
class ClusterOptions:
    ray_address: str | None = None  # Ray cluster to join; default: RAY_ADDRESS, else a local one
    num_workers: int | None = None  # concurrent Ray tasks; default: all CPUs of the cluster
    in_process: bool | None = None  # run here (default: one shard of work, no cluster named, no Ray up)


@dataclass
class TokenizeConfig:
    """`rankformer tokenize`: raw files -> Parquet corpus of rank-value encoded cells."""

    inputs: list[str]  # h5ad, AnnData .zarr, loom or 10x files/folders, local or s3://
    vocab: str  # vocabulary JSON (from `vocab build` or `vocab import-geneformer`)
    out: str  # corpus folder to write (local or s3://); must be new or this corpus
    layout: Layout = "v2"  # v1: no special tokens, <= 2048; v2: <cls> genes <eos>, <= 4096
    max_length: int | None = None  # tokens per cell including specials; default by layout
    carry: dict[str, str] = field(default_factory=dict)  # obs column -> output column
    coverage_floor: float = 0.5  # minimum share of counts that must map to the vocabulary
    read: ReadOptions = field(default_factory=ReadOptions)
    cluster: ClusterOptions = field(default_factory=ClusterOptions)

    def __post_init__(self) -> None:
        self.read, self.cluster = _check_common(self.inputs, self.layout, self.read, self.cluster)
        limit = LAYOUT_MAX_LENGTH[self.layout]
        if self.max_length is None:
            self.max_length = limit
        min_len = 3 if self.layout == "v2" else 1
        if not min_len <= self.max_length:
            raise InputError(f"max_length {self.max_length} is too small for layout {self.layout}")
        if not 0.0 <= self.coverage_floor <= 1.0:
            raise InputError(f"coverage_floor {self.coverage_floor} must be within [0, 1]")
        reserved = {schema.INPUT_IDS, schema.LENGTH, schema.CELL_ID, schema.SOURCE_FILE, schema.SOURCE_ROW}
        clash = reserved & set(self.carry.values())
        if clash:
            raise InputError(
                f"carried columns may not be named {sorted(clash)}; rename them (--carry obs_name:new_name)"
            )

    @property
    def max_genes(self) -> int:
        assert self.max_length is not None
        return self.max_length - (2 if self.layout == "v2" else 0)

    def output_fingerprint(self, vocab_hash: str) -> str:
        """Hash of everything that decides the corpus bytes (not where or how fast it runs)."""
        decisive = {
            "inputs": self.inputs,
            "vocab_hash": vocab_hash,
            "layout": self.layout,
            "max_length": self.max_length,
            "carry": self.carry,
            "gene_id_column": self.read.gene_id_column,
            "gene_table": self.read.gene_table,
            "allow_normalized": self.read.allow_normalized,
            "rows_per_shard": self.read.rows_per_shard,
        }
        if self.read.counts != "X":  # older corpora (always X) keep their fingerprint
            decisive["counts"] = self.read.counts
        blob = json.dumps(decisive, sort_keys=True).encode()
        return "sha256:" + hashlib.sha256(blob).hexdigest()


@dataclass
class VocabBuildConfig:
    """`rankformer vocab build`: exact per-gene nonzero medians over a corpus -> vocab JSON."""

    inputs: list[str]  # h5ad, AnnData .zarr, loom or 10x files/folders, local or s3://
    out: str  # vocabulary JSON to write (local or s3://)
    layout: Layout = "v2"  # which special tokens to reserve: v1 (pad, mask) or v2 (also <cls>, <eos>)
    min_cells: int = 1  # genes nonzero in fewer cells are left out
    read: ReadOptions = field(default_factory=ReadOptions)
    cluster: ClusterOptions = field(default_factory=ClusterOptions)
    histogram_bins: int = 1024  # first-pass log-spaced bins per gene
    collect_limit: int = 4096  # values per gene gathered exactly in the last pass

    def __post_init__(self) -> None:
        self.read, self.cluster = _check_common(self.inputs, self.layout, self.read, self.cluster)
        if self.min_cells < 1:
            raise InputError(f"min_cells {self.min_cells} must be >= 1")
        if self.histogram_bins < 16 or self.collect_limit < 2:
            raise InputError("histogram_bins must be >= 16 and collect_limit >= 2")


def _check_common(
    inputs: list[str],
    layout: str,
    read: ReadOptions | dict[str, Any],
    cluster: ClusterOptions | dict[str, Any],
) -> tuple[ReadOptions, ClusterOptions]:
    """Checks every corpus job shares; nested options may arrive as dicts (YAML, JSON)."""
    read = ReadOptions(**read) if isinstance(read, dict) else read
    cluster = ClusterOptions(**cluster) if isinstance(cluster, dict) else cluster
    if not inputs:
        raise InputError("no input files given")
    check_choice("layout", layout, tuple(LAYOUT_MAX_LENGTH))
    read.check()
    return read, cluster


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_mapping(cls: type[T], values: dict[str, Any]) -> T:
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - names)
    if unknown:
        raise InputError(f"unknown {cls.__name__} option(s) {unknown}; known: {sorted(names)}")
    return cls(**values)


def load_yaml(path: str) -> dict[str, Any]:
    from rankformer.io.fs import read_bytes

    try:
        doc = yaml.safe_load(read_bytes(path)) or {}
    except yaml.YAMLError as exc:
        raise InputError(
            f"--config {path} is not YAML ({' '.join(str(exc).split())}); a config is a YAML mapping of "
            "option: value"
        ) from None
    if not isinstance(doc, dict):
        raise InputError(f"{path}: a config file must be a YAML mapping of option: value")
    return doc
