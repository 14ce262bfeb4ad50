"""Readers of single-cell count files, each giving row chunks of cells as CSR without ever loading
the whole matrix (10x Matrix Market text is the one exception: the format has no row index).

One entry point, :func:`open_source`, dispatches on the file name; each reader answers the same
questions: how many cells, which gene ids, which per-cell columns, counts of rows [start, stop).
"""

from __future__ import annotations

import os
import posixpath
from typing import Any

import numpy as np
import scipy.sparse as sp

from rankformer import schema
from rankformer.errors import InputError
from rankformer.io import fs
from rankformer.io.base import (
    RECIPROCAL,
    SYMBOL_COLUMNS,
    CellSource,
    Hdf5Source,
    decode,
    gene_ids_from_index,
    h5_integral,
    id_column,
    is_group,
    looks_like_ensembl,
    read_elem_slice,
)

FORMATS = "'.h5ad', an AnnData '.zarr' store, '.loom', 10x '.h5', or a 10x folder holding matrix.mtx[.gz]"


class H5adSource(Hdf5Source):
    fmt = "h5ad"
    matrices = ("X", "raw", "raw/X", "layers/*")

    def _matrix(self) -> tuple[Any, Any]:
        """The chosen count matrix and the var table that names its columns."""
        f, counts = self._file, self.counts
        if counts == "X":
            return f["X"], f["var"]
        if counts in ("raw", "raw/X"):
            if "raw" not in f or "X" not in f["raw"]:
                raise InputError(f"{self.uri}: --counts raw, but the file has no raw/X; {self._choices()}")
            return f["raw/X"], f["raw/var"]
        name = counts.split("/", 1)[1]
        if "layers" not in f or name not in f["layers"]:
            raise InputError(f"{self.uri}: --counts {counts}, but there is no such layer; {self._choices()}")
        return f["layers"][name], f["var"]

    def _choices(self) -> str:
        return f"matrices in the file: {self._available()}"

    def _available(self) -> list[str]:
        f = self._file
        out = ["X"]
        if "raw" in f and "X" in f["raw"]:
            out.append("raw")
        if "layers" in f:
            out += [f"layers/{k}" for k in f["layers"]]
        return out

    def integer_alternatives(self) -> list[str]:
        f = self._file
        nodes = {a: "raw/X" if a == "raw" else a for a in self._available() if a != "X"}
        current = "raw" if self.counts == "raw/X" else self.counts
        return [name for name, key in nodes.items() if name != current and h5_integral(f[key])]

    def _setup(self) -> None:
        uri = self.uri
        f = self._file
        for key in ("X", "obs", "var"):
            if key not in f:
                raise InputError(f"{uri}: no '{key}' in the file; it is not an AnnData .h5ad file")
        x, var = self._matrix()
        self._x = x
        if is_group(x):
            enc = x.attrs.get("encoding-type", x.attrs.get("h5sparse_format", ""))
            enc = enc.decode() if isinstance(enc, bytes) else str(enc)
            if enc not in ("csr_matrix", "csr"):
                raise InputError(
                    f"{uri}: {self.counts} is stored as {enc or 'an unknown encoding'}; row chunks need "
                    "CSR or dense. Rewrite it with adata.X = adata.X.tocsr(); adata.write_h5ad(...)"
                )
            shape = x.attrs.get("shape", x.attrs.get("h5sparse_shape"))
            if shape is None:
                raise InputError(f"{uri}: {self.counts} has no shape attribute; not an AnnData matrix")
            self.n_cells = int(shape[0])
            n_vars = int(shape[1])
            self.arithmetic = RECIPROCAL
        else:
            self.n_cells, n_vars = (int(s) for s in x.shape)
        self._obs_index = self._index_name(f["obs"])
        self.gene_ids = self._gene_ids(var, n_vars)

    def _gene_ids(self, var: Any, n_vars: int) -> np.ndarray:
        var_index = self._index_name(var)
        columns = [k for k in var if k != var_index]
        col = self.gene_id_column
        col, self.id_note = id_column(col, columns, lambda c: read_elem_slice(var[c], 0, n_vars))
        named = next((c for c in SYMBOL_COLUMNS if c in columns and c != col), None)
        if named is not None:
            self.gene_symbols = read_elem_slice(var[named], 0, n_vars)
        if col in columns:
            if named is None:  # ids in a column: the var names are often the symbols (scanpy's default)
                index = read_elem_slice(var[var_index], 0, n_vars)
                numbered = all(str(v).isdigit() for v in index[:100])  # AnnData's default names
                self.gene_symbols = None if numbered or looks_like_ensembl(index) else index
            return read_elem_slice(var[col], 0, n_vars)
        ids, self.id_note = gene_ids_from_index(self, read_elem_slice(var[var_index], 0, n_vars), columns)
        return ids

    @staticmethod
    def _index_name(group: Any) -> str:
        name = group.attrs.get("_index", "_index")
        return name.decode() if isinstance(name, bytes) else str(name)

    def obs_columns(self) -> list[str]:
        return [k for k in self._file["obs"] if k != self._obs_index]

    def read_obs(self, name: str, start: int, stop: int) -> np.ndarray:
        return read_elem_slice(self._file["obs"][name], start, stop)

    def cell_ids(self, start: int, stop: int) -> np.ndarray:
        return read_elem_slice(self._file["obs"][self._obs_index], start, stop)

    def read_counts(self, start: int, stop: int) -> sp.csr_matrix:
        x = self._x
        if not is_group(x):
            return sp.csr_matrix(x[start:stop])
        indptr = x["indptr"][start : stop + 1].astype(np.int64)
        lo, hi = int(indptr[0]), int(indptr[-1])
        data = x["data"][lo:hi]
        indices = x["indices"][lo:hi]
        return sp.csr_matrix((data, indices, indptr - lo), shape=(stop - start, self.n_genes))


class ZarrSource(H5adSource):
    """An AnnData zarr store (``adata.write_zarr``), local or ``s3://``: the same layout as
    ``.h5ad`` in zarr arrays, read by row chunks as the h5ad reader reads them."""

    fmt = "zarr"

    def __init__(self, uri: str, gene_id_column: str, counts: str = "X") -> None:
        CellSource.__init__(self, uri, gene_id_column, counts)
        self._file, self._handle = open_zarr(uri), None
        self._setup()

    def close(self) -> None:  # a zarr group holds no open file
        pass


def open_zarr(uri: str) -> Any:
    import zarr

    try:
        if fs.is_remote(uri):
            from zarr.storage import FsspecStore

            store = FsspecStore.from_url(uri, storage_options=fs.storage_options(uri), read_only=True)
            return zarr.open_group(store, mode="r")
        if not os.path.isdir(uri):
            raise FileNotFoundError(f"{uri} not found; check the path (a .zarr store is a folder)")
        return zarr.open_group(uri, mode="r")
    except (FileNotFoundError, InputError):
        raise
    except Exception as exc:
        if not fs.exists(uri):
            raise FileNotFoundError(
                f"{uri} not found; check the path (for s3:// also the bucket and AWS_ENDPOINT_URL)"
            ) from exc
        raise InputError(
            f"{uri} is not a readable zarr store ({type(exc).__name__}: {exc}); write it with "
            "adata.write_zarr(...)"
        ) from exc


class LoomSource(Hdf5Source):
    """Loom: /matrix is genes x cells; gene attributes in /row_attrs, cell attributes in /col_attrs."""

    fmt = "loom"
    matrices = ("X", "layers/*")

    def _setup(self) -> None:
        uri, gene_id_column = self.uri, self.gene_id_column
        f = self._file
        if "matrix" not in f or "row_attrs" not in f or "col_attrs" not in f:
            raise InputError(f"{uri}: missing /matrix, /row_attrs or /col_attrs: not a loom file")
        self._m = f["matrix"]
        if self.counts != "X":
            name = self.counts.split("/", 1)[1]
            if "layers" not in f or name not in f["layers"]:
                have = [f"layers/{k}" for k in f.get("layers", {})]
                raise InputError(f"{uri}: --counts {self.counts}, but the loom layers are {have}")
            self._m = f["layers"][name]
        n_genes, self.n_cells = (int(s) for s in self._m.shape)
        rows = f["row_attrs"]
        if gene_id_column not in rows:
            raise self.missing_gene_column(sorted(rows))
        self.gene_ids = decode(rows[gene_id_column][:])
        if gene_id_column != "Gene" and "Gene" in rows:  # loompy's convention: Gene = symbol
            self.gene_symbols = decode(rows["Gene"][:])
        if len(self.gene_ids) != n_genes:
            raise InputError(
                f"{uri}: row_attrs/{gene_id_column} has {len(self.gene_ids)} entries for {n_genes} genes"
            )
        cols = f["col_attrs"]
        self._id_col = next((c for c in ("CellID", "obs_names", "cell_id") if c in cols), None)

    def obs_columns(self) -> list[str]:
        return [c for c in self._file["col_attrs"] if c != self._id_col]

    def read_obs(self, name: str, start: int, stop: int) -> np.ndarray:
        return decode(self._file["col_attrs"][name][start:stop])

    def cell_ids(self, start: int, stop: int) -> np.ndarray:
        if self._id_col is None:
            return np.asarray([str(i) for i in range(start, stop)], dtype=object)
        return decode(self._file["col_attrs"][self._id_col][start:stop])

    def read_counts(self, start: int, stop: int) -> sp.csr_matrix:
        return sp.csr_matrix(self._m[:, start:stop].T)

    def integer_alternatives(self) -> list[str]:
        layers = self._file.get("layers", {})
        names = [f"layers/{k}" for k in layers if f"layers/{k}" != self.counts]
        return [n for n in names if h5_integral(layers[n.split("/", 1)[1]], 2000)]


def detect_format(uri: str) -> str:
    name = posixpath.basename(uri.rstrip("/")).lower()
    if name.endswith(".h5ad"):
        return "h5ad"
    if name.endswith(".loom"):
        return "loom"
    if name.endswith(".zarr"):
        return "zarr"
    if name.endswith(".h5"):
        return "10x-h5"
    if name.endswith((".mtx", ".mtx.gz")) or (fs.exists(uri) and fs.is_dir(uri)):
        return "10x-mtx"
    if not fs.exists(uri):
        raise FileNotFoundError(
            f"{uri} not found; check the path (for s3:// also the bucket and AWS_ENDPOINT_URL)"
        )
    raise InputError(f"{uri}: unknown input format; expected {FORMATS}")


def open_source(
    uri: str, gene_id_column: str = schema.DEFAULT_GENE_ID_COLUMN, counts: str = "X"
) -> CellSource:
    fmt = detect_format(uri)
    if fmt == "10x-mtx" and uri.rstrip("/").lower().endswith((".mtx", ".mtx.gz")):
        uri = posixpath.dirname(uri.rstrip("/")) if fs.is_remote(uri) else os.path.dirname(uri)
    from rankformer.io.tenx import TenxH5Source, TenxMtxSource  # they build on this module's bases

    readers: dict[str, Any] = {
        "h5ad": H5adSource,
        "loom": LoomSource,
        "zarr": ZarrSource,
        "10x-h5": TenxH5Source,
        "10x-mtx": TenxMtxSource,
    }
    source: CellSource = readers[fmt](uri, gene_id_column, counts)
    if source.n_cells == 0:
        source.close()
        raise InputError(f"{uri} holds no cells (0 rows); check the file or drop it from the inputs")
    if source.n_genes == 0:
        source.close()
        raise InputError(f"{uri} holds no genes (0 columns); check the file or drop it")
    return source
