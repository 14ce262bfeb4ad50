"""Cell Ranger's outputs: the feature-barcode matrix .h5 (v3 /matrix, v2 /<genome>) and the
matrix folder (matrix.mtx[.gz], features.tsv or genes.tsv, barcodes.tsv). Opened through
:func:`rankformer.io.sources.open_source`."""

from __future__ import annotations

import gzip
import io

import numpy as np
import scipy.io
import scipy.sparse as sp

from rankformer.errors import InputError
from rankformer.io import fs
from rankformer.io.base import CellSource, Hdf5Source, decode

_TENX_ID_COLUMNS = {
    "ensembl_id": "id",
    "id": "id",
    "gene_ids": "id",
    "name": "name",
    "gene_symbols": "name",
    "index": "id",
}


class TenxH5Source(Hdf5Source):
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
            raise self.missing_gene_column(["id", "name"])
        self._g = g
        self.gene_ids = decode(ids[which][:])
        self.gene_symbols = decode(ids["name"][:]) if which == "id" else None
        self.n_cells = int(g["shape"][1])

    def obs_columns(self) -> list[str]:
        return []

    def read_obs(self, name: str, start: int, stop: int) -> np.ndarray:
        raise InputError(f"{self.uri}: 10x files carry no per-cell column {name!r}")

    def cell_ids(self, start: int, stop: int) -> np.ndarray:
        return decode(self._g["barcodes"][start:stop])

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

    def __init__(self, uri: str, gene_id_column: str, counts: str = "X") -> None:
        super().__init__(uri, gene_id_column, counts)
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
            raise self.missing_gene_column(["id", "name"])
        rows = [ln.split("\t") for ln in _read_text_maybe_gz(feats).decode().splitlines() if ln]
        col = 0 if which == "id" or any(len(r) < 2 for r in rows) else 1
        self.gene_ids = np.asarray([r[col] for r in rows], dtype=object)
        if col == 0 and all(len(r) > 1 for r in rows):
            self.gene_symbols = np.asarray([r[1] for r in rows], dtype=object)
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
