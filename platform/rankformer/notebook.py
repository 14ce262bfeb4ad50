"""In-memory inference for notebooks and scripts: the `embed` and `perturb` jobs' own code on cells
held in memory, with the model loaded once.

    model = rankformer.load_model("gf-v2/")      # folder, s3:// prefix or models:/NAME@ALIAS
    cells = model.tokenize(adata, counts="raw", carry=["disease"])  # tokenize_anndata for this model
    X = model.embed(cells)                        # (cells, hidden) float32
    genes = model.embed_genes(cells)              # gene_id, symbol, n_occurrences, embedding
    states = model.state_embeddings(cells, cells.column("disease"))
    rows = model.perturb(cells, ["GATA4", "TBX5"], states=states)
    table = model.perturb_stats(rows, goal_state="nf")

The numbers are the jobs' numbers (the same classes compute them; tested equal). For a corpus on
disk, or more cells than memory holds, run the jobs (`rankformer embed`, `rankformer perturb`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from rankformer import schema
from rankformer.config.infer import check_layer, check_perturbation, check_precision
from rankformer.config.types import Layout, PerturbKind, PerturbMode, Pooling, Precision, as_layout
from rankformer.errors import InputError


class _TakesCells:
    """What a model held in memory needs to tokenize cells for itself."""

    vocab: Any
    layout: Layout
    max_length: int

    def tokenize(self, adata: Any, **options: Any) -> pa.Table:
        """``adata`` rank-value encoded for this model: :func:`rankformer.tokenize_anndata` with
        the model's vocabulary, layout and length. ``options``: its other arguments (``counts``
        "X", "raw" or "layers/NAME"; ``carry`` obs columns; ``gene_ids`` for a matrix; ...).
        Cells without a vocabulary gene are dropped; ``source_row`` says which row each one is."""
        from rankformer.corpus.memory import tokenize_anndata

        fixed = [k for k in ("vocab", "layout", "max_length") if k in options]
        if fixed:
            raise InputError(f"tokenize: {', '.join(fixed)} come from the model; leave them out")
        return tokenize_anndata(adata, self.vocab, layout=self.layout, max_length=self.max_length, **options)


class Model(_TakesCells):
    """A model for in-memory work: embeddings and perturbation at one layer (``layer``: penultimate,
    last or an index into ``hidden_states``)."""

    def __init__(
        self,
        uri: str,
        *,
        layer: str | int = "penultimate",
        use_gpu: bool = False,
        precision: Precision = "float32",
        max_tokens: int | None = None,
        tracking_uri: str | None = None,
    ) -> None:
        from rankformer import tracking
        from rankformer.perturb.perturber import Perturber

        precision = check_precision(precision, use_gpu)
        check_layer(str(layer))
        self.uri = uri
        self._w = Perturber.on_demand(
            uri, tracking.resolve_uri(tracking_uri), use_gpu, precision, str(layer), max_tokens
        )
        self.vocab = self._w.vocab
        self.layout = as_layout(self._w.meta["layout"])
        self.max_length = self._w.max_length
        self.hidden_size = int(self._w.model.config.hidden_size)

    def __repr__(self) -> str:
        return f"Model({self.uri!r}, layout={self.layout}, layer={self._w.layer}, dim={self.hidden_size})"

    def _cells(self, cells: Any) -> tuple[list[np.ndarray], list[str]]:
        arrays, ids, _ = token_cells(cells, self.vocab, self.max_length)
        return arrays, ids

    # --- embeddings ----------------------------------------------------------------------------
    def embed(self, cells: Any, pooling: Pooling = "mean") -> np.ndarray:
        """Each cell's vector, (cells, hidden) float32 in input order: the mean of the layer's
        gene-token states, or the ``<cls>`` state (``pooling="cls"``, v2 models)."""
        if pooling not in ("mean", "cls"):
            raise InputError(f"pooling {pooling!r} must be mean or cls")
        if pooling == "cls" and self._w.cls is None:
            raise InputError(
                f"pooling cls needs a v2-layout model (<cls> first); {self.uri} is {self.layout}"
            )
        return self._vectors(self._cells(cells)[0], pooling)

    def _vectors(self, arrays: list[np.ndarray], pooling: Pooling) -> np.ndarray:
        self._w.spec = replace(self._w.spec, level="cell", pooling=pooling)
        vecs, _ = self._w.embed(arrays)
        return vecs

    def embed_genes(self, cells: Any) -> pd.DataFrame:
        """Each gene's state averaged over all its occurrences in ``cells``: ``gene_id``,
        ``symbol``, ``n_occurrences``, ``embedding`` (float32 arrays), by token order."""
        arrays, _ = self._cells(cells)
        self._w.spec = replace(self._w.spec, level="gene", gene_stat="mean")
        _, sums = self._w.embed(arrays)
        tokens = self.vocab.gene_tokens_in(sums.seen())
        ids = self.vocab.gene_id_by_token[tokens].tolist()
        return pd.DataFrame(
            {
                "gene_id": ids,
                "symbol": [self.vocab.gene_names.get(g, "") for g in ids],
                "n_occurrences": sums.counts[tokens].numpy(),
                "embedding": list(sums.means(tokens).astype(np.float32)),
            }
        )

    def state_embeddings(self, cells: Any, labels: Sequence[Any] | Any) -> dict[str, np.ndarray]:
        """Each state's embedding: the mean of its cells' mean-pooled vectors (``labels``: one
        state per cell, e.g. a carried obs column), as the perturb job computes them."""
        values = labels.to_pylist() if hasattr(labels, "to_pylist") else list(labels)
        arrays, _ = self._cells(cells)
        if len(values) != len(arrays):
            raise InputError(f"labels: {len(values)} labels for {len(arrays)} cells; give one per cell")
        vecs = self._vectors(arrays, "mean")
        names = np.asarray([str(v) for v in values])
        return {s: vecs[names == s].astype(np.float64).mean(0) for s in dict.fromkeys(names.tolist())}

    # --- perturbation --------------------------------------------------------------------------
    def perturb(
        self,
        cells: Any,
        genes: Sequence[str] = (),
        *,
        kind: PerturbKind = "delete",
        mode: PerturbMode = "each",
        anchor: str | None = None,
        shift: float = 0.1,
        missing: str = "skip",
        states: Mapping[str, Any] | None = None,
        per_gene: bool = False,
    ) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
        """One row per (cell, perturbation), the `perturb` job's columns (``cell_id``,
        ``perturbed``, ``rank``, ``cell_cosine``, ``gene_mean_cosine``, ``shift_<state>`` for each
        of ``states``); with ``per_gene`` also the per-gene table. Options as `rankformer perturb`
        (genes as Ensembl ids or symbols; ``missing="skip"`` leaves out, with a warning, and names in
        ``rows.attrs["genes_not_in_vocabulary"]``, genes the vocabulary lacks)."""
        from rankformer.perturb.job import targets_of
        from rankformer.perturb.rows import GENE_SCHEMA, scores_schema

        listed = check_perturbation(kind, mode, list(genes), missing, shift)
        targets, anchor_token, not_found = targets_of(self.vocab, listed, anchor, mode, missing)
        arrays, ids = self._cells(cells)
        chosen = {str(k): np.asarray(v, dtype=np.float64) for k, v in (states or {}).items()}
        bad = [k for k, v in chosen.items() if v.shape != (self.hidden_size,)]
        if bad:
            raise InputError(
                f"states: {bad} are not vectors of {self.hidden_size} (use model.state_embeddings)"
            )
        self._w.configure(
            kind=kind,
            mode=mode,
            targets=targets,
            anchor=anchor_token,
            shift=shift,
            per_gene=per_gene,
            states={k: v.tolist() for k, v in chosen.items()},
        )
        gene_parts = [GENE_SCHEMA.empty_table()]
        parts = [scores_schema(list(chosen)).empty_table(), *self._w.scored(arrays, ids, gene_parts.append)]
        out = pa.concat_tables(parts).to_pandas()
        out.attrs["genes_not_in_vocabulary"] = not_found
        if not_found:
            _warn_skipped(not_found)
        if per_gene:
            return out, pa.concat_tables(gene_parts).to_pandas()
        return out

    def perturb_stats(
        self, rows: pd.DataFrame, goal_state: str | None = None, rank_window: int = 1
    ) -> pd.DataFrame:
        """`rankformer perturb stats` on rows from :meth:`perturb` (symbols from this vocabulary)."""
        from rankformer.perturb.stats import stats_table

        table = pa.Table.from_pandas(rows, preserve_index=False)
        return stats_table(
            [table], table.column_names, goal_state, "the rows", rank_window, self.vocab.gene_names
        )


def _warn_skipped(not_found: list[str]) -> None:
    import warnings

    from rankformer.words import listed

    warnings.warn(
        f"not in the model's vocabulary, skipped: {listed(not_found, 10)}"
        ' (all in rows.attrs["genes_not_in_vocabulary"]; missing="error" refuses them)',
        stacklevel=3,
    )


def token_cells(
    cells: Any, vocab: Any, max_length: int
) -> tuple[list[np.ndarray], list[str], pa.Table | None]:
    """Token arrays, cell ids and the table (None for token lists) from a table of corpus rows
    (``input_ids``; ``cell_id`` when present) or a sequence of token id lists, checked against
    the model's vocabulary and length."""
    from rankformer.job.cells import token_lists

    _refuse_counts(cells)
    table = None
    if isinstance(cells, pd.DataFrame):
        cells = pa.Table.from_pandas(cells, preserve_index=False)
    if isinstance(cells, pa.Table):
        if schema.INPUT_IDS not in cells.column_names:
            raise InputError(
                f"cells: a table needs an {schema.INPUT_IDS!r} column (rankformer.tokenize_anndata or "
                f"read_corpus rows); it has {cells.column_names}"
            )
        table = cells
        arrays = token_lists(cells)
        ids = (
            [str(x) for x in cells.column(schema.CELL_ID).to_pylist()]
            if schema.CELL_ID in cells.column_names
            else [str(i) for i in range(len(arrays))]
        )
    else:
        arrays = [np.asarray(c, dtype=np.int64) for c in cells]
        ids = [str(i) for i in range(len(arrays))]
    _check_tokens(arrays, ids, vocab, max_length)
    return arrays, ids, table


def _refuse_counts(cells: Any) -> None:
    """An AnnData or a counts matrix would otherwise read as token ids."""
    if hasattr(cells, "obs") and hasattr(cells, "var"):
        raise InputError(
            "cells: an AnnData holds counts, not this model's tokens; tokenize it first: "
            "cells = model.tokenize(adata) (counts='raw' for counts in .raw, carry=[...] for obs columns)"
        )
    if (isinstance(cells, np.ndarray) and cells.ndim == 2) or hasattr(cells, "tocsr"):
        raise InputError(
            "cells: a 2-D array or sparse matrix reads as counts, not token ids; tokenize it first: "
            "model.tokenize(matrix, gene_ids=[...]); token id lists go as a list of 1-D lists or arrays"
        )


def _check_tokens(arrays: list[np.ndarray], ids: list[str], vocab: Any, max_length: int) -> None:
    """Every cell a non-empty list of the model's token ids, without pad or mask, within its length."""
    n_tokens = vocab.n_tokens
    never = [vocab.specials[k] for k in (schema.PAD, schema.MASK) if k in vocab.specials]
    for i, a in enumerate(arrays):
        if not len(a) or a.ndim != 1 or a.min() < 0 or a.max() >= n_tokens:
            raise InputError(
                f"cells: cell {ids[i]} is not a list of this model's token ids (0..{n_tokens - 1}); "
                "tokenize with model.tokenize(adata)"
            )
        if np.isin(a, never).any():
            raise InputError(
                f"cells: cell {ids[i]} holds the pad or mask token ({never}); give each cell's tokens "
                "without padding, as model.tokenize(adata) or read_corpus rows have them"
            )
        if len(a) > max_length:
            raise InputError(
                f"cells: cell {ids[i]} has {len(a)} tokens, more than the model's {max_length}; "
                f"tokenize with max_length={max_length}"
            )


class Classifier(_TakesCells):
    """A classifier from `rankformer finetune genes|cells` for cells in memory: the prediction
    tables `rankformer predict` writes, for the given cells."""

    def __init__(
        self,
        uri: str,
        *,
        use_gpu: bool = False,
        max_tokens: int | None = None,
        tracking_uri: str | None = None,
    ) -> None:
        from rankformer import tracking
        from rankformer.model.device import device_token_budget, pick_device
        from rankformer.model.loader import load_model as load
        from rankformer.model.loader import model_meta
        from rankformer.model.store import CLASSIFIED_BY_TASK, max_length_of
        from rankformer.train.classifier import classifier_class

        resolved = tracking.resolve_uri(tracking_uri)
        meta = model_meta(uri, resolved)
        if meta.get("task") not in CLASSIFIED_BY_TASK:
            raise InputError(
                f"model {uri} is a {meta.get('task')!r} model, not a classifier; give a model from "
                "`rankformer finetune genes|cells` (rankformer.load_model embeds and perturbs)"
            )
        self.uri = uri
        self.kind = CLASSIFIED_BY_TASK[meta["task"]]
        head = classifier_class("token" if self.kind == "genes" else "sequence", meta.get("head_class"))
        self._loaded = load(uri, head=head, tracking_uri=resolved)
        device = pick_device(use_gpu)
        model: Any = self._loaded.model
        self._model = model.to(device).eval()
        self.vocab = self._loaded.vocab
        self.layout = as_layout(meta["layout"])
        self.classes = [str(c) for c in meta["classes"]]
        self.label_column = meta.get("label_column")
        config: Any = self._model.config
        self.max_length = max_length_of(meta, config)
        self.max_tokens = device_token_budget(max_tokens, self._model, device, self.max_length)

    def __repr__(self) -> str:
        return f"Classifier({self.uri!r}, {self.kind}, classes={self.classes})"

    def predict(self, cells: Any) -> pd.DataFrame:
        """Cell classifiers: per cell ``cell_id``, ``label`` (from the training label column when
        the table carries it), ``predicted``, ``prob_<class>``. Gene classifiers: per gene seen in
        the cells, mean class probabilities over its occurrences, ranked as `predict genes` ranks."""
        from rankformer.classify.predict import cell_predictions, gene_predictions

        arrays, ids, table = token_cells(cells, self.vocab, self.max_length)
        pad, gene_lo = self.vocab.token_layout()
        if self.kind == "genes":
            return gene_predictions(
                self._model, arrays, pad, gene_lo, self._loaded, self.classes, self.max_tokens
            )
        col = self.label_column
        labels = table.column(col).to_pylist() if table is not None and col in table.column_names else None
        return cell_predictions(self._model, arrays, ids, labels, pad, self.classes, self.max_tokens)


def load_classifier(uri: str, **options: Any) -> Classifier:
    """A fine-tuned classifier for in-memory predictions (options: :class:`Classifier`)."""
    return Classifier(uri, **options)


def load_model(uri: str, **options: Any) -> Model:
    """A model for in-memory embeddings and perturbation (options: :class:`Model`)."""
    return Model(uri, **options)
