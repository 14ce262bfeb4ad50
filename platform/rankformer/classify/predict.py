"""`rankformer predict genes|cells`: apply a fine-tuned classifier (a folder, ``s3://`` prefix or
``models:/NAME@ALIAS``) to another corpus and write the same prediction tables as the job that made
it, recording the model (and its registry version) and the vocabulary hash."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from rankformer import schema, tracking
from rankformer.config.infer import PredictConfig
from rankformer.errors import InputError
from rankformer.job.cells import corpus_columns, load_cells, parse_where
from rankformer.job.door import open_model_and_corpus
from rankformer.job.output import JobOutput
from rankformer.model.budget import token_budget
from rankformer.model.store import CLASSIFIER_TASKS


def run_predict(what: str, cfg: PredictConfig) -> dict[str, Any]:
    from rankformer.model.loader import model_meta

    uri = tracking.resolve_uri(cfg.tracking_uri)
    meta = model_meta(cfg.model, uri)
    task = CLASSIFIER_TASKS[what]
    if meta.get("task") != task:
        raise InputError(
            f"model {cfg.model} is a {meta.get('task')!r} model, not {task!r}; predict with a "
            f"model from `rankformer finetune {what}`"
        )
    from rankformer.train.classifier import classifier_class  # torch: after the checks above

    head = classifier_class("token" if what == "genes" else "sequence", meta.get("head_class"))
    loaded, manifest = open_model_and_corpus(cfg.model, cfg.corpus, uri, head=head)
    model = loaded.model.eval()
    classes = list(meta["classes"])
    extra = [meta["label_column"]] if what == "cells" and meta.get("label_column") else []
    if what == "cells" and meta.get("tasks"):  # a multi-task classifier: each task's label column
        extra = [t["name"] for t in meta["tasks"]]
    names = set(corpus_columns(cfg.corpus))
    cells = load_cells(
        cfg.corpus,
        parse_where(cfg.cells_where),
        [c for c in extra if c in names],
        manifest["vocab_hash"],
        cfg.limit_cells,
        cfg.seed,
    )
    out = JobOutput(cfg.out, f"predict-{what}", cfg)
    budget = token_budget(cfg.max_tokens)  # predictions run on the CPU
    table = _predictions(what, model, cells, extra, loaded, classes, budget)
    out.write_table(f"{'gene' if what == 'genes' else 'cell'}_predictions", table)
    version = None
    if cfg.model.startswith("models:/"):
        version = tracking.model_version_info(uri, cfg.model)["version"]
    summary = {
        "model": cfg.model,
        "model_version": version,
        "vocab_hash": loaded.vocab.content_hash,
        "corpus": cfg.corpus,
        "classes": classes,
        "rows": len(table),
    }
    out.write_json("predict.json", summary)
    out.finish(summary)
    print(
        f"predicted {len(table):,} {what} with {cfg.model}"
        + (f" (v{version})" if version else "")
        + f" -> {cfg.out}"
    )
    return summary


def _predictions(
    what: str, model: Any, cells: Any, extra: list[str], loaded: Any, classes: list[str], max_tokens: int
) -> pd.DataFrame:
    """The prediction table: per gene over the cells' occurrences, or per cell (with its label
    column when the corpus carries it)."""
    pad, gene_lo = loaded.vocab.token_layout()
    if what == "genes":
        return gene_predictions(model, cells.ids, pad, gene_lo, loaded, classes, max_tokens)
    names = cells.table.column_names
    ids = cells.column(schema.CELL_ID) if schema.CELL_ID in names else None
    if loaded.meta.get("tasks"):
        labels = {c: cells.column(c) for c in extra if c in names}
        return multitask_predictions(model, cells.ids, ids, labels, pad, loaded.meta["tasks"], max_tokens)
    return cell_predictions(
        model,
        cells.ids,
        ids,
        cells.column(extra[0]) if extra and extra[0] in names else None,
        pad,
        classes,
        max_tokens,
    )


def gene_predictions(
    model: Any,
    ids: list[np.ndarray],
    pad: int,
    gene_lo: int,
    loaded: Any,
    classes: list[str],
    max_tokens: int,
) -> pd.DataFrame:
    """The gene prediction table: each gene's mean class probabilities over its occurrences in
    ``ids``, whether it was a training gene, ranked by the positive class."""
    from rankformer.classify.genes import gene_table
    from rankformer.model.forward import token_probs

    training = {g for gs in loaded.meta.get("labelled_genes", {}).values() for g in gs}
    positive = classes.index(loaded.meta.get("positive_class", classes[0]))
    return gene_table(
        token_probs(model, ids, pad, gene_lo, max_tokens), gene_lo, loaded.vocab, classes, training, positive
    )


def cell_predictions(
    model: Any,
    ids: list[np.ndarray],
    cell_ids: Any,
    labels: Any,
    pad: int,
    classes: list[str],
    max_tokens: int,
) -> pd.DataFrame:
    """The cell prediction table: ``cell_id`` (0.. when None), ``label`` (the known class, when
    given), ``predicted``, ``split`` and a ``prob_<class>`` column per class."""
    from rankformer.train.finetune import cell_probs

    prob = cell_probs(model, ids, pad, max_tokens)
    df = pd.DataFrame(
        {
            schema.CELL_ID: cell_ids if cell_ids is not None else np.arange(len(prob)).astype(str),
            "label": labels,
            "predicted": [classes[i] for i in prob.argmax(1)],
            "split": "predict",
        }
    )
    for i, c in enumerate(classes):
        df[f"prob_{c}"] = prob[:, i]
    return df


def multitask_predictions(
    model: Any,
    ids: list[np.ndarray],
    cell_ids: Any,
    labels: dict[str, Any],
    pad: int,
    tasks: list[dict[str, Any]],
    max_tokens: int,
) -> pd.DataFrame:
    """A multi-task classifier's table: ``cell_id``, then per task ``<task>_label`` (when the
    cells carry its column), ``<task>_predicted`` and ``<task>_prob_<class>``."""
    from rankformer.train.finetune import cell_probs

    prob = cell_probs(model, ids, pad, max_tokens)
    df = pd.DataFrame(
        {schema.CELL_ID: cell_ids if cell_ids is not None else np.arange(len(prob)).astype(str)}
    )
    at = 0
    for task in tasks:
        name, classes = task["name"], list(task["classes"])
        p = prob[:, at : at + len(classes)]
        at += len(classes)
        if name in labels:
            df[f"{name}_label"] = labels[name]
        df[f"{name}_predicted"] = [classes[i] for i in p.argmax(1)] if len(p) else []
        for i, c in enumerate(classes):
            df[f"{name}_prob_{c}"] = p[:, i]
    df["split"] = "predict"
    return df
