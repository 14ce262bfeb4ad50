"""Gene labels for gene classification, in the shapes users have them, mapped onto the vocabulary.

Accepted shapes:

* a long table (CSV, TSV or Parquet) with a gene column and a label column;
* a wide table with one column of genes per class (Geneformer's example files: the shorter
  columns padded with empty cells);
* one gene list per class (``--labels CLASS=FILE``, one gene per line).

Genes are Ensembl ids or symbols; symbols go through the vocabulary's alias table, then through its
gene names. Whatever cannot be mapped is reported, never silently dropped.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from rankformer.errors import InputError
from rankformer.io import fs
from rankformer.vocab.gene_vocab import GeneVocab

GENE_COLUMNS = ("gene", "gene_id", "ensembl_id", "symbol", "gene_symbol", "gene_name")
LABEL_COLUMNS = ("label", "class", "y")


@dataclass
class GeneLabels:
    """Labelled genes as tokens: ``classes[label[i]]`` is the class of token ``tokens[i]``."""

    classes: list[str]
    tokens: np.ndarray  # int64, one per labelled gene
    label: np.ndarray  # int64 class index per gene
    gene_ids: list[str]
    unmapped: dict[str, list[str]] = field(default_factory=dict)  # class -> input ids not in the vocab

    def token_to_class(self) -> dict[int, int]:
        return dict(zip(self.tokens.tolist(), self.label.tolist(), strict=True))

    def counts(self) -> dict[str, int]:
        return {c: int((self.label == i).sum()) for i, c in enumerate(self.classes)}

    def subset(self, keep: np.ndarray) -> GeneLabels:
        return GeneLabels(
            self.classes,
            self.tokens[keep],
            self.label[keep],
            [g for g, k in zip(self.gene_ids, keep, strict=True) if k],
            self.unmapped,
        )


def _read_table(uri: str) -> pd.DataFrame:
    if not fs.exists(uri):
        raise FileNotFoundError(f"--labels: label file {uri} not found; give a CSV, TSV or Parquet table")
    lower = uri.lower()
    kind = "CSV"
    if lower.endswith(".parquet"):
        kind = "Parquet"
    elif lower.endswith((".tsv", ".tab", ".txt")):
        kind = "TSV"
    try:
        with fs.open_input(uri) as f:
            if kind == "Parquet":
                table = pd.read_parquet(f)
            else:
                table = pd.read_csv(f, sep="\t" if kind == "TSV" else ",", dtype=str, keep_default_na=False)
    except (ValueError, OSError) as exc:  # pandas' and Arrow's parse and decode errors are ValueErrors
        raise InputError(
            f"--labels: {uri} is not a readable {kind} table ({type(exc).__name__}: {str(exc)[:200]}); give "
            "a table with a gene column and a label column (.csv, .tsv or .parquet), or one CLASS=FILE list "
            "per class"
        ) from None
    if table.empty or len(table.columns) == 0:
        raise InputError(f"--labels: {uri} holds no rows; give a table of labelled genes")
    return table


def _read_list(uri: str, name: str) -> list[str]:
    if not fs.exists(uri):
        raise FileNotFoundError(f"--labels {name}={uri}: gene list {uri} not found")
    try:
        text = fs.read_bytes(uri).decode()
    except UnicodeDecodeError:
        raise InputError(
            f"--labels {name}={uri}: the gene list is not text; give one gene id or symbol per line"
        ) from None
    return [line.split(",")[0].split("\t")[0].strip() for line in text.splitlines() if line.strip()]


def read_label_sets(
    specs: Sequence[str],
    gene_column: str | None = None,
    label_column: str | None = None,
) -> dict[str, list[str]]:
    """``{class: [gene ids as given]}`` from ``--labels`` values.

    ``CLASS=FILE`` items are gene lists; a single ``FILE`` is a long table (when it has a label
    column) or a wide table (one column per class).
    """
    if not specs:
        raise InputError("no labels given: pass --labels TABLE or --labels CLASS=FILE (one per class)")
    named = [s for s in specs if "=" in s and not s.startswith(("s3://", "/"))]
    if named:
        if len(named) != len(specs):
            raise InputError(
                "--labels mixes CLASS=FILE lists with a table; give either one table or a list per class"
            )
        sets: dict[str, list[str]] = {}
        for s in named:
            name, path = s.split("=", 1)
            if name in sets:
                raise InputError(f"--labels names class {name!r} twice")
            sets[name] = _read_list(path, name)
        return sets
    if len(specs) != 1:
        raise InputError("--labels takes one table, or one CLASS=FILE list per class")
    table = _read_table(specs[0])
    return _sets_from_table(table, specs[0], gene_column, label_column)


def _sets_from_table(
    table: pd.DataFrame, where: str, gene_column: str | None, label_column: str | None
) -> dict[str, list[str]]:
    cols = list(table.columns)
    label_col = label_column or next((c for c in cols if c.lower() in LABEL_COLUMNS), None)
    if label_column and label_column not in cols:
        raise InputError(f"{where}: label column {label_column!r} is missing; columns are {cols}")
    if label_col is None:  # wide: one column of genes per class
        if gene_column:
            raise InputError(
                f"{where}: no label column (looked for {list(LABEL_COLUMNS)}); pass --label-column, "
                "or give a wide table with one column of genes per class"
            )
        return {str(c): [str(v) for v in table[c] if str(v).strip() and str(v) != "nan"] for c in cols}
    gene_col = gene_column or next((c for c in cols if c.lower() in GENE_COLUMNS and c != label_col), None)
    if gene_column and gene_column not in cols:
        raise InputError(f"{where}: gene column {gene_column!r} is missing; columns are {cols}")
    if gene_col is None:
        others = [c for c in cols if c != label_col]
        if len(others) != 1:
            raise InputError(
                f"{where}: cannot tell the gene column among {others}; pass --gene-column "
                f"(looked for {list(GENE_COLUMNS)})"
            )
        gene_col = others[0]
    sets: dict[str, list[str]] = {}
    for gene, label in zip(table[gene_col].astype(str), table[label_col].astype(str), strict=True):
        if gene.strip() and label.strip() and label != "nan":
            sets.setdefault(label.strip(), []).append(gene.strip())
    return sets


def map_labels(sets: Mapping[str, Sequence[str]], vocab: GeneVocab) -> GeneLabels:
    """Map label sets onto vocabulary tokens; a gene in two classes is an error."""
    if len(sets) < 2:
        raise InputError(
            f"gene classification needs two or more classes; the labels hold {sorted(sets) or 'none'}"
        )
    names = vocab.symbol_index
    gene_of_token = vocab.gene_id_by_token
    classes = list(sets)
    owner: dict[int, int] = {}
    unmapped: dict[str, list[str]] = {}
    for ci, c in enumerate(classes):
        raw = list(dict.fromkeys(sets[c]))
        tokens = vocab.map_gene_ids(raw, extra_aliases=names)
        for gid, tok in zip(raw, tokens.tolist(), strict=True):
            if tok < 0:
                unmapped.setdefault(c, []).append(gid)
            elif owner.get(tok, ci) != ci:
                raise InputError(
                    f"gene {gid} ({gene_of_token[tok]}) is labelled both {classes[owner[tok]]!r} and {c!r}; "
                    "a gene takes one class: fix the label file"
                )
            else:
                owner[tok] = ci
    toks = np.asarray(sorted(owner), dtype=np.int64)
    return GeneLabels(
        classes,
        toks,
        np.asarray([owner[t] for t in toks.tolist()], dtype=np.int64),
        [gene_of_token[t] for t in toks.tolist()],
        unmapped,
    )


def check_enough(labels: GeneLabels, folds: int, what: str) -> None:
    """At least ``folds`` genes in every class (each test fold needs one of each), else an error."""
    counts = labels.counts()
    few = {c: n for c, n in counts.items() if n < max(folds, 1)}
    if few:
        raise InputError(
            f"too few labelled genes {what}: {few} (each class needs at least {folds}, one per "
            f"fold; all classes: {counts}). Add genes, lower --folds, or check the ids"
        )


def vocabulary_labels(cfg: Any, vocab: GeneVocab) -> GeneLabels:
    """A gene-classification job's labels (``cfg.labels``, its gene and label columns) read and
    mapped onto ``vocab``, each class holding at least one gene of it: what can be checked from
    the model's vocabulary alone, before any weights load."""
    labels = map_labels(read_label_sets(cfg.labels, cfg.gene_column, cfg.label_column), vocab)
    check_enough(labels, 1, "in the vocabulary")
    return labels


def describe(labels: GeneLabels) -> str:
    lost = sum(len(v) for v in labels.unmapped.values())
    return f"{labels.counts()} labelled genes" + (f"; {lost} not in the vocabulary" if lost else "")


def label_file_name(spec: str) -> str:
    return os.path.basename(spec.split("=", 1)[-1])
