"""What every cell source shares: the :class:`CellSource` interface, gene-id detection, and the
HDF5 plumbing the h5ad, loom and 10x readers build on."""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import IO, Any

import h5py
import numpy as np
import scipy.sparse as sp

from rankformer import schema
from rankformer.errors import InputError
from rankformer.io import fs

ENSEMBL_ID_RE = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$")

# How the reference divides, by storage kind (see the README's exactness section): scipy's
# sparse-by-dense division is a reciprocal then a multiply; numpy's dense division is a true one.
DIVIDE = "divide"
RECIPROCAL = "reciprocal"

# var / row columns that hold gene symbols (CELLxGENE: feature_name; scanpy's 10x reader: gene_symbols)
SYMBOL_COLUMNS = ("feature_name", "gene_symbols", "gene_symbol", "symbol", "gene_name", "gene_names")


def looks_like_ensembl(values: np.ndarray) -> bool:
    sample = [str(v).strip().upper() for v in values[:2000] if v is not None]
    return bool(sample) and sum(bool(ENSEMBL_ID_RE.match(v)) for v in sample) > 0.5 * len(sample)


class CellSource(ABC):
    """Cells (rows) x genes (columns) of one file."""

    fmt: str = ""
    matrices: tuple[str, ...] = ("X",)  # the --counts choices this format has

    def __init__(self, uri: str, gene_id_column: str, counts: str = "X") -> None:
        self.uri = uri
        self.gene_id_column = gene_id_column
        self.counts = counts
        self.n_cells = 0
        self.gene_ids: np.ndarray = np.empty(0, dtype=object)
        self.arithmetic = DIVIDE  # how the reference normalises this storage kind
        self.id_note = ""  # said in the coverage line when ids come from somewhere unexpected
        self.gene_symbols: np.ndarray | None = None  # per column, when the file names genes by symbol too
        if counts not in self.matrices and not (counts.startswith("layers/") and "layers/*" in self.matrices):
            raise InputError(
                f"{uri}: --counts {counts!r} does not apply to {self.fmt or 'this'} files; "
                f"choose one of {list(self.matrices)}"
            )

    def integer_alternatives(self) -> list[str]:
        """Other matrices of this file (for --counts) whose stored values are integers."""
        return []

    @property
    def n_genes(self) -> int:
        return len(self.gene_ids)

    @abstractmethod
    def obs_columns(self) -> list[str]: ...

    @abstractmethod
    def read_obs(self, name: str, start: int, stop: int) -> np.ndarray: ...

    @abstractmethod
    def cell_ids(self, start: int, stop: int) -> np.ndarray: ...

    @abstractmethod
    def read_counts(self, start: int, stop: int) -> sp.csr_matrix: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def __enter__(self) -> CellSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def missing_gene_column(self, available: list[str]) -> InputError:
        return InputError(
            f"{self.uri}: gene-id column {self.gene_id_column!r} not found; columns are: "
            f"{available}. Pass --gene-id-column with one of them ('index' for the row names)."
        )


SCANPY_ID_COLUMN = "gene_ids"  # scanpy's 10x readers: Ensembl ids here, the symbols as the var names
SCANPY_ID_NOTE = "gene ids from var['gene_ids'] (scanpy's 10x layout; no 'ensembl_id' column)"


def id_column(requested: str, columns: Sequence[str], read: Callable[[str], np.ndarray]) -> tuple[str, str]:
    """(the var column to read gene ids from, the note that says so when unexpected): scanpy's
    ``gene_ids`` where the default column is asked for and absent and ``gene_ids`` holds Ensembl
    ids (``read``: a column's values), else the column asked for."""
    if requested != schema.DEFAULT_GENE_ID_COLUMN or requested in columns or SCANPY_ID_COLUMN not in columns:
        return requested, ""
    if looks_like_ensembl(read(SCANPY_ID_COLUMN)):
        return SCANPY_ID_COLUMN, SCANPY_ID_NOTE
    return requested, ""


def gene_ids_from_index(src: CellSource, index: np.ndarray, columns: list[str]) -> tuple[np.ndarray, str]:
    """(gene ids, note) when the gene-id column is not among ``columns``: the var index if asked
    for ('index'), or if the default column is absent and the index holds Ensembl ids (CELLxGENE
    and most scanpy pipelines), else the error that lists the columns."""
    col = src.gene_id_column
    if col == "index":
        return index, ""
    if col == schema.DEFAULT_GENE_ID_COLUMN and looks_like_ensembl(index):
        return index, f"gene ids from the var index (Ensembl ids; no {col!r} column)"
    raise src.missing_gene_column(columns)


def open_hdf5(uri: str) -> tuple[h5py.File, IO[bytes] | None]:
    handle = None
    try:
        if fs.is_remote(uri):
            handle = fs.open_input(uri)
            return h5py.File(handle, "r"), handle
        if not os.path.exists(uri):
            raise FileNotFoundError(f"{uri} not found; check the path")
        return h5py.File(uri, "r"), None
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise InputError(
            f"{uri} is not a readable HDF5 file ({exc}): it is corrupt or truncated; "
            "re-export or re-download it"
        ) from exc


def is_group(node: Any) -> bool:
    """An HDF5 or zarr group (an encoded element: sparse matrix, categorical...), not an array."""
    return not hasattr(node, "shape")


def decode(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind in ("S", "O", "T"):  # T: numpy's StringDType, as zarr gives strings
        return np.asarray([v.decode() if isinstance(v, bytes) else v for v in values], dtype=object)
    return values


def read_elem_slice(elem: Any, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of one anndata-encoded column (plain, string, or categorical), from an
    HDF5 or a zarr store."""
    if is_group(elem):
        kind = elem.attrs.get("encoding-type", "")
        if kind == "categorical":
            codes = elem["codes"][start:stop]
            cats = decode(elem["categories"][:])
            out = np.empty(len(codes), dtype=object)
            out[codes >= 0] = cats[codes[codes >= 0]]
            out[codes < 0] = None
            return out
        if kind in ("nullable-integer", "nullable-boolean"):
            values = elem["values"][start:stop]
            mask = elem["mask"][start:stop]
            return np.where(mask, np.nan, values.astype(np.float64))
        raise InputError(f"column {elem.name} has unsupported encoding {kind!r}")
    return decode(elem[start:stop])


class Hdf5Source(CellSource):
    """An HDF5-based format: the file is opened here, checked by ``_setup``, closed on failure."""

    def __init__(self, uri: str, gene_id_column: str, counts: str = "X") -> None:
        super().__init__(uri, gene_id_column, counts)
        self._file, self._handle = open_hdf5(uri)
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    @abstractmethod
    def _setup(self) -> None: ...

    def close(self) -> None:
        self._file.close()
        if self._handle is not None:
            self._handle.close()


def h5_integral(node: Any, n: int = 20_000) -> bool:
    """Whether the first ``n`` stored values of a dense or sparse matrix (HDF5 or zarr) are all
    integers."""
    data = node["data"] if is_group(node) else node
    if data.dtype.kind in "iu":
        return True
    head = data[:n] if data.ndim == 1 else data[: max(1, n // max(1, data.shape[1]))]
    return bool(np.all(np.isfinite(head)) and np.all(head == np.round(head)) and np.all(head >= 0))
