"""Readers of single-cell count files, each giving row chunks of cells as CSR without ever loading
the whole matrix (10x Matrix Market text is the one exception: the format has no row index).

One entry point, :func:`open_source`, dispatches on the file name; each reader answers the same
questions: how many cells, which gene ids, which per-cell columns, counts of rows [start, stop).
"""

from __future__ import annotations

import gzip
import io
import os
import posixpath
from abc import ABC, abstractmethod
from typing import IO, Any

import h5py
import numpy as np
import scipy.io
import scipy.sparse as sp

from rankformer import schema
from rankformer.errors import InputError
from rankformer.io import fs

FORMATS = "'.h5ad', '.loom', 10x '.h5', or a 10x folder holding matrix.mtx[.gz]"


class CellSource(ABC):
    """Cells (rows) x genes (columns) of one file."""

    fmt: str = ""

    def __init__(self, uri: str, gene_id_column: str) -> None:
        self.uri = uri
        self.gene_id_column = gene_id_column
        self.n_cells = 0
        self.gene_ids: np.ndarray = np.empty(0, dtype=object)

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

    def _missing_gene_column(self, available: list[str]) -> InputError:
        return InputError(
            f"{self.uri}: gene-id column {self.gene_id_column!r} not found; columns are: "
            f"{available}. Pass --gene-id-column with one of them ('index' for the row names)."
        )


def _open_hdf5(uri: str) -> tuple[h5py.File, IO[bytes] | None]:
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


def _decode(values: np.ndarray) -> np.ndarray:
    if values.dtype.kind in ("S", "O"):
        return np.asarray([v.decode() if isinstance(v, bytes) else v for v in values], dtype=object)
    return values


def _read_elem_slice(elem: h5py.Dataset | h5py.Group, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of one anndata-encoded column (plain, string, or categorical)."""
    if isinstance(elem, h5py.Group):
        kind = elem.attrs.get("encoding-type", "")
        if kind == "categorical":
            codes = elem["codes"][start:stop]
            cats = _decode(elem["categories"][:])
            out = np.empty(len(codes), dtype=object)
            out[codes >= 0] = cats[codes[codes >= 0]]
            out[codes < 0] = None
            return out
        if kind in ("nullable-integer", "nullable-boolean"):
            values = elem["values"][start:stop]
            mask = elem["mask"][start:stop]
            return np.where(mask, np.nan, values.astype(np.float64))
        raise InputError(f"column {elem.name} has unsupported encoding {kind!r}")
    return _decode(elem[start:stop])


class _Hdf5Source(CellSource):
    """An HDF5-based format: the file is opened here, checked by ``_setup``, closed on failure."""

    def __init__(self, uri: str, gene_id_column: str) -> None:
        super().__init__(uri, gene_id_column)
        self._file, self._handle = _open_hdf5(uri)
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


class H5adSource(_Hdf5Source):
    fmt = "h5ad"

    def _setup(self) -> None:
        uri, gene_id_column = self.uri, self.gene_id_column
        f = self._file
        for key in ("X", "obs", "var"):
            if key not in f:
                raise InputError(f"{uri}: no '{key}' in the file; it is not an AnnData .h5ad file")
        x = f["X"]
        if isinstance(x, h5py.Group):
            enc = x.attrs.get("encoding-type", x.attrs.get("h5sparse_format", ""))
            enc = enc.decode() if isinstance(enc, bytes) else str(enc)
            if enc not in ("csr_matrix", "csr"):
                raise InputError(
                    f"{uri}: X is stored as {enc or 'an unknown encoding'}; row chunks need CSR or "
                    "dense X. Rewrite it with adata.X = adata.X.tocsr(); adata.write_h5ad(...)"
                )
            shape = x.attrs.get("shape", x.attrs.get("h5sparse_shape"))
            self.n_cells = int(shape[0])
            n_vars = int(shape[1])
        else:
            self.n_cells, n_vars = (int(s) for s in x.shape)
        self._obs_index = self._index_name(f["obs"])
        var = f["var"]
        var_index = self._index_name(var)
        cols = [k for k in var if k != var_index]
        if gene_id_column == "index":
            self.gene_ids = _read_elem_slice(var[var_index], 0, n_vars)
        elif gene_id_column in var:
            self.gene_ids = _read_elem_slice(var[gene_id_column], 0, n_vars)
        else:
            raise self._missing_gene_column(cols)

    @staticmethod
    def _index_name(group: h5py.Group) -> str:
        name = group.attrs.get("_index", "_index")
        return name.decode() if isinstance(name, bytes) else str(name)

    def obs_columns(self) -> list[str]:
        return [k for k in self._file["obs"] if k != self._obs_index]

    def read_obs(self, name: str, start: int, stop: int) -> np.ndarray:
        return _read_elem_slice(self._file["obs"][name], start, stop)

    def cell_ids(self, start: int, stop: int) -> np.ndarray:
        return _read_elem_slice(self._file["obs"][self._obs_index], start, stop)

    def read_counts(self, start: int, stop: int) -> sp.csr_matrix:
        x = self._file["X"]
        if isinstance(x, h5py.Dataset):
            return sp.csr_matrix(x[start:stop])
        indptr = x["indptr"][start : stop + 1].astype(np.int64)
        lo, hi = int(indptr[0]), int(indptr[-1])
        data = x["data"][lo:hi]
        indices = x["indices"][lo:hi]
        return sp.csr_matrix((data, indices, indptr - lo), shape=(stop - start, self.n_genes))


class LoomSource(_Hdf5Source):
    """Loom: /matrix is genes x cells; gene attributes in /row_attrs, cell attributes in /col_attrs."""

    fmt = "loom"

    def _setup(self) -> None:
        uri, gene_id_column = self.uri, self.gene_id_column
        f = self._file
        if "matrix" not in f or "row_attrs" not in f or "col_attrs" not in f:
            raise InputError(f"{uri}: missing /matrix, /row_attrs or /col_attrs: not a loom file")
        n_genes, self.n_cells = (int(s) for s in f["matrix"].shape)
        rows = f["row_attrs"]
        if gene_id_column not in rows:
            raise self._missing_gene_column(sorted(rows))
        self.gene_ids = _decode(rows[gene_id_column][:])
        if len(self.gene_ids) != n_genes:
            raise InputError(
                f"{uri}: row_attrs/{gene_id_column} has {len(self.gene_ids)} entries for {n_genes} genes"
            )
        cols = f["col_attrs"]
        self._id_col = next((c for c in ("CellID", "obs_names", "cell_id") if c in cols), None)

    def obs_columns(self) -> list[str]:
        return [c for c in self._file["col_attrs"] if c != self._id_col]

    def read_obs(self, name: str, start: int, stop: int) -> np.ndarray:
        return _decode(self._file["col_attrs"][name][start:stop])

    def cell_ids(self, start: int, stop: int) -> np.ndarray:
        if self._id_col is None:
            return np.asarray([str(i) for i in range(start, stop)], dtype=object)
        return _decode(self._file["col_attrs"][self._id_col][start:stop])

    def read_counts(self, start: int, stop: int) -> sp.csr_matrix:
        return sp.csr_matrix(self._file["matrix"][:, start:stop].T)


_TENX_ID_COLUMNS = {
    "ensembl_id": "id",
    "id": "id",
    "gene_ids": "id",
    "name": "name",
    "gene_symbols": "name",
    "index": "id",
}


class TenxH5Source(_Hdf5Source):
    """Cell Ranger .h5: a CSC genes x cells matrix, i.e. CSR over cells (v3 /matrix, v2 /<genome>)."""

    fmt = "10x-h5"

    def _setup(self) -> None:
        uri, gene_id_column = self.uri, self.gene_id_column
        f = self._file
        if "matrix" in f:
            g = f["matrix"]
            feats = g["features"]
            ids = {"id": feats["id"], "name": feats["name"]}
        elif len(f) == 1 and "genes" in next(iter(f.values())):
            g = next(iter(f.values()))
            ids = {"id": g["genes"], "name": g["gene_names"]}
        else:
            raise InputError(f"{uri}: no /matrix group: not a Cell Ranger feature-barcode .h5 file")
        which = _TENX_ID_COLUMNS.get(gene_id_column)
        if which is None:
            raise self._missing_gene_column(["id", "name"])
        self._g = g
        self.gene_ids = _decode(ids[which][:])
        self.n_cells = int(g["shape"][1])

    def obs_columns(self) -> list[str]:
        return []

    def read_obs(self, name: str, start: int, stop: int) -> np.ndarray:
        raise InputError(f"{self.uri}: 10x files carry no per-cell column {name!r}")

    def cell_ids(self, start: int, stop: int) -> np.ndarray:
        return _decode(self._g["barcodes"][start:stop])

    def read_counts(self, start: int, stop: int) -> sp.csr_matrix:
        indptr = self._g["indptr"][start : stop + 1].astype(np.int64)
        lo, hi = int(indptr[0]), int(indptr[-1])
        return sp.csr_matrix(
            (self._g["data"][lo:hi], self._g["indices"][lo:hi], indptr - lo),
            shape=(stop - start, self.n_genes),
        )


def _read_text_maybe_gz(uri: str) -> bytes:
    raw = fs.read_bytes(uri)
    return gzip.decompress(raw) if uri.endswith(".gz") else raw


def _first_existing(folder: str, names: tuple[str, ...]) -> str | None:
    present = set(fs.listdir(folder))
    return next((fs.join(folder, n) for n in names if n in present), None)


class TenxMtxSource(CellSource):
    """A Cell Ranger matrix folder: matrix.mtx(.gz) genes x cells, features/genes.tsv, barcodes.tsv.

    Matrix Market is text with no row index, so the matrix is parsed once, whole, per file.
    """

    fmt = "10x-mtx"

    def __init__(self, uri: str, gene_id_column: str) -> None:
        super().__init__(uri, gene_id_column)
        mtx = _first_existing(uri, ("matrix.mtx.gz", "matrix.mtx"))
        feats = _first_existing(uri, ("features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv"))
        codes = _first_existing(uri, ("barcodes.tsv.gz", "barcodes.tsv"))
        if mtx is None or feats is None or codes is None:
            raise InputError(
                f"{uri}: a 10x folder needs matrix.mtx[.gz], features.tsv[.gz] (or "
                f"genes.tsv) and barcodes.tsv[.gz]; found {fs.listdir(uri)}"
            )
        which = _TENX_ID_COLUMNS.get(gene_id_column)
        if which is None:
            raise self._missing_gene_column(["id", "name"])
        rows = [ln.split("\t") for ln in _read_text_maybe_gz(feats).decode().splitlines() if ln]
        col = 0 if which == "id" or any(len(r) < 2 for r in rows) else 1
        self.gene_ids = np.asarray([r[col] for r in rows], dtype=object)
        self._barcodes = np.asarray(_read_text_maybe_gz(codes).decode().split(), dtype=object)
        try:
            genes_by_cells = scipy.io.mmread(io.BytesIO(_read_text_maybe_gz(mtx)))
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(
                f"{mtx} is not a readable Matrix Market file ({exc}); it is corrupt or truncated"
            ) from exc
        self._x = sp.csr_matrix(genes_by_cells.T)
        self.n_cells = self._x.shape[0]
        if self._x.shape[1] != len(self.gene_ids) or self.n_cells != len(self._barcodes):
            raise InputError(
                f"{uri}: matrix is {self._x.shape[1]} genes x {self.n_cells} cells "
                f"but {feats} lists {len(self.gene_ids)} genes and {codes} "
                f"{len(self._barcodes)} barcodes"
            )

    def obs_columns(self) -> list[str]:
        return []

    def read_obs(self, name: str, start: int, stop: int) -> np.ndarray:
        raise InputError(f"{self.uri}: 10x files carry no per-cell column {name!r}")

    def cell_ids(self, start: int, stop: int) -> np.ndarray:
        return self._barcodes[start:stop]

    def read_counts(self, start: int, stop: int) -> sp.csr_matrix:
        return self._x[start:stop]


def detect_format(uri: str) -> str:
    name = posixpath.basename(uri.rstrip("/")).lower()
    if name.endswith(".h5ad"):
        return "h5ad"
    if name.endswith(".loom"):
        return "loom"
    if name.endswith(".h5"):
        return "10x-h5"
    if name.endswith((".mtx", ".mtx.gz")) or (fs.exists(uri) and fs.is_dir(uri)):
        return "10x-mtx"
    if not fs.exists(uri):
        raise FileNotFoundError(
            f"{uri} not found; check the path (for s3:// also the bucket and AWS_ENDPOINT_URL)"
        )
    raise InputError(f"{uri}: unknown input format; expected {FORMATS}")


def open_source(uri: str, gene_id_column: str = schema.DEFAULT_GENE_ID_COLUMN) -> CellSource:
    fmt = detect_format(uri)
    if fmt == "10x-mtx" and uri.rstrip("/").lower().endswith((".mtx", ".mtx.gz")):
        uri = posixpath.dirname(uri.rstrip("/")) if fs.is_remote(uri) else os.path.dirname(uri)
    readers: dict[str, Any] = {
        "h5ad": H5adSource,
        "loom": LoomSource,
        "10x-h5": TenxH5Source,
        "10x-mtx": TenxMtxSource,
    }
    source: CellSource = readers[fmt](uri, gene_id_column)
    if source.n_cells == 0:
        source.close()
        raise InputError(f"{uri} holds no cells (0 rows); check the file or drop it from the inputs")
    if source.n_genes == 0:
        source.close()
        raise InputError(f"{uri} holds no genes (0 columns); check the file or drop it")
    return source
