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

    def tokenize(
        self,
        adata: Any,
        *,
        counts: str = "X",
        gene_ids: Sequence[str] | None = None,
        gene_id_column: str = schema.DEFAULT_GENE_ID_COLUMN,
        carry: Mapping[str, str] | Sequence[str] | None = None,
        coverage_floor: float = 0.5,
        allow_normalized: bool = False,
        report: bool = True,
    ) -> pa.Table:
        """``adata`` rank-value encoded for this model: :func:`rankformer.tokenize_anndata` with
        the model's vocabulary, layout and length.

        Parameters
        ----------
        adata
            An AnnData (in memory or backed) or a CSR/dense cells x genes count matrix.
        counts
            Where the raw counts are: ``"X"``, ``"raw"`` or ``"layers/NAME"``.
        gene_ids
            One gene id (Ensembl or symbol) per column, for a bare matrix.
        gene_id_column
            The var column of gene ids (``"index"``: the var names).
        carry
            obs columns to keep (a list, or a mapping obs name -> output name).
        coverage_floor, allow_normalized, report
            As :func:`rankformer.tokenize_anndata`.

        Returns
        -------
        pyarrow.Table
            One row per cell kept (``source_row`` says which input row; cells without a
            vocabulary gene or with obs ``filter_pass`` 0 are left out, and counted).
        """
        from rankformer.corpus.memory import tokenize_anndata

        return tokenize_anndata(
            adata,
            self.vocab,
            layout=self.layout,
            max_length=self.max_length,
            counts=counts,
            gene_ids=gene_ids,
            gene_id_column=gene_id_column,
            carry=dict(carry) if isinstance(carry, Mapping) else carry,
            coverage_floor=coverage_floor,
            allow_normalized=allow_normalized,
            report=report,
        )

    def _tokens_of(self, data: Any, counts: str, gene_id_column: str) -> tuple[Any, np.ndarray | None]:
        """(cells, the AnnData rows they are) for an AnnData; (data, None) for tokenized cells."""
        if not is_anndata(data):
            return data, None
        table = self.tokenize(data, counts=counts, gene_id_column=gene_id_column)
        return table, np.asarray(table.column(schema.SOURCE_ROW).to_numpy(), dtype=np.int64)


def is_anndata(data: Any) -> bool:
    return hasattr(data, "obs") and hasattr(data, "var") and hasattr(data, "obsm")


CHUNK_CELLS = 256  # cells per step of a progress bar


def in_chunks(n: int, progress: bool | None, desc: str) -> Any:
    """Slices of ``range(n)`` in steps of :data:`CHUNK_CELLS`, behind a progress bar (tqdm's
    notebook widget in Jupyter, text elsewhere) when ``progress`` is True, or None and the work
    takes more than one step."""
    from tqdm.auto import tqdm

    steps = [slice(i, min(i + CHUNK_CELLS, n)) for i in range(0, n, CHUNK_CELLS)]
    show = progress if progress is not None else len(steps) > 1
    return tqdm(steps, desc=desc, unit="chunk", disable=not show, leave=False)


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
    def embed(
        self,
        cells: Any,
        pooling: Pooling = "mean",
        *,
        key_added: str | None = None,
        counts: str = "X",
        gene_id_column: str = schema.DEFAULT_GENE_ID_COLUMN,
        progress: bool | None = None,
    ) -> np.ndarray:
        """Each cell's vector: the mean of the layer's gene-token states, or the ``<cls>`` state.

        Parameters
        ----------
        cells
            Tokenized cells (:meth:`tokenize`, ``read_corpus`` rows, or token id lists), or an
            AnnData, tokenized here (``counts``, ``gene_id_column`` as for :meth:`tokenize`).
        pooling
            ``"mean"`` over gene tokens, or ``"cls"`` (v2-layout models).
        key_added
            With an AnnData: also write the vectors to ``adata.obsm[key_added]`` (and what made
            them to ``adata.uns[key_added]``), scanpy-style, e.g. ``"X_rankformer"``.
        progress
            Show a progress bar (default: when there is more than one chunk of cells).

        Returns
        -------
        numpy.ndarray
            (cells, hidden) float32 in input order; for an AnnData, row for row with it, NaN rows
            for the cells the tokenizer left out (it says how many, and why).
        """
        if pooling not in ("mean", "cls"):
            raise InputError(f"pooling {pooling!r} must be mean or cls")
        if pooling == "cls" and self._w.cls is None:
            raise InputError(
                f"pooling cls needs a v2-layout model (<cls> first); {self.uri} is {self.layout}"
            )
        if key_added is not None and not is_anndata(cells):
            raise InputError("key_added writes into an AnnData; pass the AnnData itself (not tokens)")
        table, rows = self._tokens_of(cells, counts, gene_id_column)
        vecs = self._vectors(self._cells(table)[0], pooling, progress)
        if rows is None:
            return vecs
        if key_added is None:
            from rankformer.annotate import full_rows

            return full_rows(vecs, rows, cells.n_obs)
        from rankformer.annotate import put_cell_vectors

        info = {"model": self.uri, "layer": str(self._w.layer), "pooling": pooling, "layout": self.layout}
        return put_cell_vectors(cells, key_added, vecs, rows, info)

    def _vectors(
        self, arrays: list[np.ndarray], pooling: Pooling, progress: bool | None = False
    ) -> np.ndarray:
        self._w.spec = replace(self._w.spec, level="cell", pooling=pooling)
        parts = [np.zeros((0, self.hidden_size), dtype=np.float32)]
        for part in in_chunks(len(arrays), progress, "embedding cells"):
            parts.append(self._w.embed(arrays[part])[0])
        return np.concatenate(parts)

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
        progress: bool | None = None,
    ) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
        """One row per (cell, perturbation), the `perturb` job's columns (``cell_id``,
        ``perturbed``, ``rank``, ``cell_cosine``, ``gene_mean_cosine``, ``shift_<state>`` for each
        of ``states``); with ``per_gene`` also the per-gene table. Options as `rankformer perturb`
        (genes as Ensembl ids or symbols; ``missing="skip"`` leaves out, with a warning, and names in
        ``rows.attrs["genes_not_in_vocabulary"]``, genes the vocabulary lacks). ``progress``: a
        progress bar over the cells (default: for more than one chunk of cells)."""
        from tqdm.auto import tqdm

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
        show = progress if progress is not None else len(arrays) > CHUNK_CELLS
        scored = tqdm(
            self._w.scored(arrays, ids, gene_parts.append),
            total=len(arrays),
            desc="perturbing cells",
            unit="cell",
            disable=not show,
            leave=False,
        )
        parts = [scores_schema(list(chosen)).empty_table(), *scored]
        out = pa.concat_tables(parts).to_pandas()
        out.attrs["genes_not_in_vocabulary"] = not_found
        if not_found:
            _warn_skipped(not_found)
        if per_gene:
            return out, pa.concat_tables(gene_parts).to_pandas()
        return out

    def perturb_stats(
        self, rows: pd.DataFrame, goal_state: str | None = None, rank_window: int = 1, mixture: bool = False
    ) -> pd.DataFrame:
        """`rankformer perturb stats` on rows from :meth:`perturb` (symbols from this vocabulary);
        ``mixture``: each perturbation's posterior of being impactful (``--mixture``)."""
        from rankformer.perturb.stats import stats_table

        table = pa.Table.from_pandas(rows, preserve_index=False)
        res = stats_table(
            [table], table.column_names, goal_state, "the rows", rank_window, self.vocab.gene_names
        )
        if mixture:
            from rankformer.perturb.mixture import impact_mixture

            res = impact_mixture(res)
        return res

    def affected_genes(self, gene_rows: pd.DataFrame, top: int = 100) -> pd.DataFrame:
        """`rankformer perturb stats --by affected-gene` on the per-gene table of
        :meth:`perturb` (``per_gene=True``): for each perturbation, the ``top`` genes whose
        states moved most (0: all), with cells, mean shift and its 95% interval."""
        from rankformer.perturb.affected import affected_table

        table = pa.Table.from_pandas(gene_rows, preserve_index=False)
        return affected_table(iter([table]), table.num_rows, top, symbols=self.vocab.gene_names)


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
        self.tasks: list[dict[str, Any]] = list(meta.get("tasks") or [])  # a multi-task classifier's
        config: Any = self._model.config
        self.max_length = max_length_of(meta, config)
        self.max_tokens = device_token_budget(max_tokens, self._model, device, self.max_length)

    def __repr__(self) -> str:
        return f"Classifier({self.uri!r}, {self.kind}, classes={self.classes})"

    def predict(
        self,
        cells: Any,
        *,
        key_added: str | None = None,
        counts: str = "X",
        gene_id_column: str = schema.DEFAULT_GENE_ID_COLUMN,
        progress: bool | None = None,
    ) -> pd.DataFrame:
        """The prediction table `rankformer predict` writes, for these cells.

        Parameters
        ----------
        cells
            Tokenized cells (:meth:`tokenize`, ``read_corpus`` rows, or token id lists), or an
            AnnData, tokenized here (``counts``, ``gene_id_column`` as for :meth:`tokenize`).
        key_added
            With an AnnData: also write the predictions into it, scanpy-style: a cell
            classifier's ``<key>_predicted`` and ``<key>_prob_<class>`` into ``adata.obs`` (NaN
            for cells the tokenizer left out); a gene classifier's per-gene columns into
            ``adata.var`` by gene id.
        progress
            Show a progress bar (default: when there is more than one chunk of cells).

        Returns
        -------
        pandas.DataFrame
            Cell classifiers: per cell ``cell_id``, ``label`` (from the training label column when
            the table carries it), ``predicted``, ``prob_<class>``. Gene classifiers: per gene seen
            in the cells, mean class probabilities over its occurrences, ranked as `predict genes`.
        """
        from rankformer.classify.predict import gene_predictions

        if key_added is not None and not is_anndata(cells):
            raise InputError("key_added writes into an AnnData; pass the AnnData itself (not tokens)")
        data, rows = self._tokens_of(cells, counts, gene_id_column)
        arrays, ids, table = token_cells(data, self.vocab, self.max_length)
        pad, gene_lo = self.vocab.token_layout()
        info = {"model": self.uri, "classes": self.classes}
        if self.kind == "genes":
            genes = gene_predictions(
                self._model, arrays, pad, gene_lo, self._loaded, self.classes, self.max_tokens
            )
            if key_added is not None:
                from rankformer.annotate import put_gene_table

                put_gene_table(cells, key_added, genes, gene_id_column, self.vocab, info)
            return genes
        # the labels the cells carry (the training label column, or each task's), kept beside
        wanted = [str(t["name"]) for t in self.tasks] if self.tasks else [str(self.label_column)]
        carried = {
            c: table.column(c).to_pylist() for c in wanted if table is not None and c in table.column_names
        }
        parts = [
            self._predict_cells(arrays[part], ids[part], {k: v[part] for k, v in carried.items()}, pad)
            for part in in_chunks(len(arrays), progress, "predicting cells")
        ]
        out = pd.concat(parts, ignore_index=True) if parts else self._predict_cells([], [], {}, pad)
        if key_added is not None and rows is not None:
            from rankformer.annotate import put_cell_table

            put_cell_table(cells, key_added, out, rows, info)
        return out

    def _predict_cells(
        self, arrays: list[np.ndarray], ids: list[str], carried: dict[str, list[Any]], pad: int
    ) -> pd.DataFrame:
        from rankformer.classify.predict import cell_predictions, multitask_predictions

        if self.tasks:
            return multitask_predictions(self._model, arrays, ids, carried, pad, self.tasks, self.max_tokens)
        labels = carried.get(str(self.label_column))
        return cell_predictions(self._model, arrays, ids, labels, pad, self.classes, self.max_tokens)


def load_classifier(
    uri: str,
    *,
    use_gpu: bool = False,
    max_tokens: int | None = None,
    tracking_uri: str | None = None,
) -> Classifier:
    """A fine-tuned classifier for in-memory predictions.

    Parameters
    ----------
    uri
        A model folder, an ``s3://`` prefix or ``models:/NAME@ALIAS`` from `rankformer finetune
        genes|cells`.
    use_gpu
        Run on CUDA (refused with a clear error where there is none).
    max_tokens
        Tokens per forward batch (default: sized from the device's free memory).
    tracking_uri
        The MLflow store of a ``models:/`` URI (default ``MLFLOW_TRACKING_URI``, else sqlite).
    """
    return Classifier(uri, use_gpu=use_gpu, max_tokens=max_tokens, tracking_uri=tracking_uri)


def load_model(
    uri: str,
    *,
    layer: str | int = "penultimate",
    use_gpu: bool = False,
    precision: Precision = "float32",
    max_tokens: int | None = None,
    tracking_uri: str | None = None,
) -> Model:
    """A model for in-memory embeddings and perturbation.

    Parameters
    ----------
    uri
        A model folder, an ``s3://`` prefix or ``models:/NAME@ALIAS``.
    layer
        Which hidden states: ``"penultimate"`` (Geneformer's default), ``"last"``, or an index
        into ``hidden_states``.
    use_gpu
        Run on CUDA (refused with a clear error where there is none).
    precision
        ``"float32"``, or ``"bfloat16"``/``"float16"`` on a GPU.
    max_tokens
        Tokens per forward batch (default: sized from the device's free memory).
    tracking_uri
        The MLflow store of a ``models:/`` URI (default ``MLFLOW_TRACKING_URI``, else sqlite).
    """
    return Model(
        uri,
        layer=layer,
        use_gpu=use_gpu,
        precision=precision,
        max_tokens=max_tokens,
        tracking_uri=tracking_uri,
    )
