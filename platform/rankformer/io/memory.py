"""Cells already in memory (an AnnData, or a matrix with its gene ids) behind the same
:class:`CellSource` interface as the file readers, so the Python API runs the job's own checks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

from rankformer import schema
from rankformer.errors import InputError
from rankformer.io.base import (
    DIVIDE,
    RECIPROCAL,
    CellSource,
    gene_ids_from_index,
    id_column,
)

MEMORY_URI = "<memory>"


class MemorySource(CellSource):
    """An in-memory AnnData (X, raw or a layer) or a cells x genes matrix with ``gene_ids``."""

    fmt = "anndata (in memory)"
    matrices = ("X", "raw", "raw/X", "layers/*")

    def __init__(
        self,
        data: Any,
        gene_id_column: str = schema.DEFAULT_GENE_ID_COLUMN,
        counts: str = "X",
        gene_ids: Sequence[str] | None = None,
    ) -> None:
        super().__init__(MEMORY_URI, gene_id_column, counts)
        if sp.issparse(data) or isinstance(data, np.ndarray):
            if gene_ids is None:
                raise InputError("a bare matrix needs gene_ids=[...] (one Ensembl id or symbol per column)")
            if counts != "X":
                raise InputError(f"counts={counts!r} needs an AnnData; a bare matrix is its own X")
            self._x, self._obs = data, None
            self.gene_ids = np.asarray(list(gene_ids), dtype=object)
            self._names = np.asarray([str(i) for i in range(data.shape[0])], dtype=object)
        else:
            self._x, var = self._matrix(data)
            self._obs, self._names = data.obs, np.asarray(data.obs_names, dtype=object)
            self.gene_ids = self._ids(var, gene_ids)
        if self.gene_ids.shape[0] != self._x.shape[1]:
            raise InputError(f"{len(self.gene_ids)} gene ids for a matrix of {self._x.shape[1]} columns")
        self.n_cells = int(self._x.shape[0])
        if self.n_cells == 0 or self.n_genes == 0:
            raise InputError(f"no cells or no genes to tokenize (matrix shape {self._x.shape})")
        sparse = sp.issparse(self._x) or _backed_sparse(self._x)
        self.arithmetic = RECIPROCAL if sparse else DIVIDE  # as the file readers do for the same matrix
        if sparse and self._x.format != "csr":
            raise InputError(f"{counts} is {self._x.format.upper()}; pass it as CSR (matrix.tocsr())")

    def _matrix(self, adata: Any) -> tuple[Any, Any]:
        if self.counts == "X":
            return adata.X, adata.var
        if self.counts in ("raw", "raw/X"):
            if adata.raw is None:
                raise InputError("counts='raw', but the AnnData has no .raw; use X or a layer")
            return adata.raw.X, adata.raw.var
        name = self.counts.split("/", 1)[1]
        if name not in adata.layers:
            raise InputError(f"counts={self.counts!r}: no such layer; layers are {list(adata.layers)}")
        return adata.layers[name], adata.var

    def _ids(self, var: Any, given: Sequence[str] | None) -> np.ndarray:
        if given is not None:
            return np.asarray(list(given), dtype=object)
        columns = [str(c) for c in var.columns]
        col, self.id_note = id_column(self.gene_id_column, columns, lambda c: np.asarray(var[c].astype(str)))
        if col in var.columns:
            return np.asarray(var[col].astype(object), dtype=object)
        index = np.asarray(var.index.astype(str), dtype=object)
        ids, self.id_note = gene_ids_from_index(self, index, list(var.columns))
        return ids

    def missing_gene_column(self, available: list[str]) -> InputError:
        return InputError(
            f"AnnData var: gene-id column {self.gene_id_column!r} not found; columns are: {available}. "
            "Pass gene_id_column= with one of them ('index' for the var names), or gene_ids=[...]."
        )

    def integer_alternatives(self) -> list[str]:
        return []

    def obs_columns(self) -> list[str]:
        return [] if self._obs is None else [str(c) for c in self._obs.columns]

    def read_obs(self, name: str, start: int, stop: int) -> np.ndarray:
        if self._obs is None or name not in self._obs.columns:
            raise InputError(f"obs has no column {name!r}; columns are {self.obs_columns()}")
        col = self._obs[name].iloc[start:stop]
        if col.dtype.kind in "biuf":
            return col.to_numpy()
        return np.asarray([None if v is None or v != v else v for v in col.astype(object)], dtype=object)

    def cell_ids(self, start: int, stop: int) -> np.ndarray:
        return self._names[start:stop]

    def read_counts(self, start: int, stop: int) -> sp.csr_matrix:
        # a backed AnnData (backed="r") reads only these rows from its file
        return sp.csr_matrix(self._x[start:stop])


def _backed_sparse(x: Any) -> bool:
    """A sparse matrix of a backed AnnData (read on demand from its file, sliced by rows)."""
    try:
        from anndata.abc import CSCDataset, CSRDataset
    except ImportError:  # anndata before 0.11
        return hasattr(x, "format") and hasattr(x, "group")
    return isinstance(x, CSRDataset | CSCDataset)
