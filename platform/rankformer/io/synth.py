"""Synthetic single-cell corpora for tests and benchmarks: negative-binomial counts, a few "cell
types" with their own expression programmes, Ensembl-like gene ids. Writers for every input format
we read, the h5ad one in row chunks so million-cell files never sit in memory."""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass

import h5py
import numpy as np
import scipy.sparse as sp


@dataclass
class SynthSpec:
    n_cells: int = 1000
    n_genes: int = 2000
    genes_per_cell: int = 200  # mean nonzero genes per cell
    n_types: int = 3
    seed: int = 0


def gene_ids(n_genes: int, offset: int = 0) -> np.ndarray:
    return np.asarray([f"ENSG{offset + i + 1:011d}" for i in range(n_genes)], dtype=object)


def _programmes(spec: SynthSpec) -> np.ndarray:
    """(types, genes) expression probabilities: shared log-normal base times type-specific boosts."""
    rng = np.random.default_rng(spec.seed)
    base = rng.lognormal(0.0, 1.5, spec.n_genes)
    out = np.empty((spec.n_types, spec.n_genes))
    for t in range(spec.n_types):
        boost = np.ones(spec.n_genes)
        boost[rng.choice(spec.n_genes, max(1, spec.n_genes // 20), replace=False)] = 8.0
        p = base * boost
        out[t] = p / p.sum()
    return out


def _draw_cells(spec: SynthSpec, rng: np.random.Generator, n: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """Each cell draws ~genes_per_cell genes (with replacement, so frequent genes repeat and the
    nonzero count is a little lower) from its type's programme; counts are 1 + negative binomial.
    """
    prog = _programmes(spec)
    cdf = np.cumsum(prog, axis=1)
    types = rng.integers(spec.n_types, size=n)
    k = np.clip(rng.poisson(spec.genes_per_cell, n), 1, spec.n_genes)
    rows = np.repeat(np.arange(n), k)
    u = rng.random(len(rows))
    cols = np.empty(len(rows), np.int64)
    row_type = types[rows]
    for t in range(spec.n_types):
        sel = row_type == t
        cols[sel] = np.searchsorted(cdf[t], u[sel] * cdf[t, -1])
    np.clip(cols, 0, spec.n_genes - 1, out=cols)
    mean = 1.0 + 30.0 * prog[row_type, cols] * k[rows]
    vals = rng.negative_binomial(2, 2 / (2 + mean)) + 1
    x = sp.csr_matrix((vals.astype(np.int32), (rows, cols)), shape=(n, spec.n_genes))
    x.sum_duplicates()
    x.sort_indices()
    return x, types


TEMPLATE_CELLS = 1024


def counts_chunk(spec: SynthSpec, start: int, stop: int) -> tuple[sp.csr_matrix, np.ndarray]:
    """(CSR int32 counts, cell type) of cells [start, stop), deterministic in (spec, start, stop).

    Small chunks draw every cell; large corpora reuse a pool of drawn template cells (shared by all
    chunks) with fresh Poisson noise on every count, which keeps generation fast at 1M cells.
    """
    rng = np.random.default_rng((spec.seed, start, stop))
    n = stop - start
    if n <= TEMPLATE_CELLS:
        return _draw_cells(spec, rng, n)
    pool, pool_types = _draw_cells(spec, np.random.default_rng((spec.seed, 1 << 40)), TEMPLATE_CELLS)
    pick = rng.integers(TEMPLATE_CELLS, size=n)
    x = pool[pick]
    x.data = (x.data + rng.poisson(0.5, x.nnz)).astype(np.int32)
    return sp.csr_matrix(x), pool_types[pick]


def _string_dataset(group: h5py.Group, name: str, values: np.ndarray) -> None:
    ds = group.create_dataset(name, data=np.asarray(values, dtype=object), dtype=h5py.string_dtype())
    ds.attrs["encoding-type"] = "string-array"
    ds.attrs["encoding-version"] = "0.2.0"


def write_h5ad(
    path: str,
    spec: SynthSpec,
    chunk_rows: int = 20_000,
    with_n_counts: bool = True,
    obs_extra: dict[str, np.ndarray] | None = None,
) -> None:
    """An AnnData-readable .h5ad with CSR X written chunk by chunk (anndata's on-disk encoding)."""
    with h5py.File(path, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        n_counts, types = _write_x(f, spec, chunk_rows)
        columns = {"cell_type": np.asarray([f"type{t}" for t in types], dtype=object)}
        if with_n_counts:
            columns["n_counts"] = n_counts
        columns.update(obs_extra or {})
        _write_frame(f, "obs", np.asarray([f"cell{i}" for i in range(spec.n_cells)]), columns)
        index = np.asarray([f"GENE{i}" for i in range(spec.n_genes)])
        _write_frame(f, "var", index, {"ensembl_id": gene_ids(spec.n_genes)})
        for name in ("obsm", "varm", "obsp", "varp", "layers", "uns"):
            f.create_group(name).attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})


def _write_x(f: h5py.File, spec: SynthSpec, chunk_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """X as CSR, chunk by chunk; returns each cell's total count and type."""
    x = f.create_group("X")
    x.attrs.update(
        {
            "encoding-type": "csr_matrix",
            "encoding-version": "0.1.0",
            "shape": np.asarray([spec.n_cells, spec.n_genes]),
        }
    )
    data = x.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 16,))
    indices = x.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 16,))
    indptr = np.zeros(spec.n_cells + 1, np.int64)
    n_counts = np.zeros(spec.n_cells, np.int64)
    types = np.zeros(spec.n_cells, np.int64)
    for start in range(0, spec.n_cells, chunk_rows):
        stop = min(start + chunk_rows, spec.n_cells)
        c, t = counts_chunk(spec, start, stop)
        lo = data.shape[0]
        data.resize((lo + c.nnz,))
        indices.resize((lo + c.nnz,))
        data[lo:] = c.data
        indices[lo:] = c.indices
        indptr[start + 1 : stop + 1] = lo + c.indptr[1:]
        n_counts[start:stop] = np.asarray(c.sum(axis=1)).ravel()
        types[start:stop] = t
    # scipy (and so anndata) wants indices and indptr of one dtype unless nnz needs int64
    x.create_dataset("indptr", data=indptr.astype(np.int32 if indptr[-1] < 2**31 else np.int64))
    return n_counts, types


def _write_frame(f: h5py.File, name: str, index: np.ndarray, columns: dict[str, np.ndarray]) -> None:
    """An obs or var data frame in anndata's encoding: string or numeric columns."""
    group = f.create_group(name)
    group.attrs.update(
        {
            "_index": "_index",
            "column-order": np.asarray(list(columns), dtype=object),
            "encoding-type": "dataframe",
            "encoding-version": "0.2.0",
        }
    )
    _string_dataset(group, "_index", index)
    for col, values in columns.items():
        if values.dtype == object:
            _string_dataset(group, col, values)
        else:
            group.create_dataset(col, data=values).attrs.update(
                {"encoding-type": "array", "encoding-version": "0.2.0"}
            )


def write_loom(path: str, x: sp.csr_matrix, ids: np.ndarray, cell_ids: np.ndarray) -> None:
    with h5py.File(path, "w") as f:
        f.create_dataset("matrix", data=x.T.toarray(), chunks=True)
        rows = f.create_group("row_attrs")
        rows.create_dataset("ensembl_id", data=np.asarray(ids, dtype="S"))
        rows.create_dataset("Gene", data=np.asarray([f"SYM{i}" for i in range(len(ids))], dtype="S"))
        cols = f.create_group("col_attrs")
        cols.create_dataset("CellID", data=np.asarray(cell_ids, dtype="S"))
        f.create_group("layers")


def write_10x_h5(
    path: str, x: sp.csr_matrix, ids: np.ndarray, barcodes: np.ndarray, version: int = 3
) -> None:
    """Cell Ranger layout: CSC genes x cells (= CSR cells x genes) under /matrix (v3) or under
    /<genome> with genes/gene_names (v2)."""
    if version == 2:
        with h5py.File(path, "w") as f:
            g = f.create_group("GRCh38")
            for name, data in (("data", x.data), ("indices", x.indices), ("indptr", x.indptr)):
                g.create_dataset(name, data=data)
            g.create_dataset("shape", data=np.asarray([x.shape[1], x.shape[0]], np.int32))
            g.create_dataset("barcodes", data=np.asarray(barcodes, dtype="S"))
            g.create_dataset("genes", data=np.asarray(ids, dtype="S"))
            g.create_dataset("gene_names", data=np.asarray([f"SYM{i}" for i in range(len(ids))], dtype="S"))
        return
    with h5py.File(path, "w") as f:
        m = f.create_group("matrix")
        m.create_dataset("data", data=x.data)
        m.create_dataset("indices", data=x.indices)
        m.create_dataset("indptr", data=x.indptr)
        m.create_dataset("shape", data=np.asarray([x.shape[1], x.shape[0]], np.int32))
        m.create_dataset("barcodes", data=np.asarray(barcodes, dtype="S"))
        feats = m.create_group("features")
        feats.create_dataset("id", data=np.asarray(ids, dtype="S"))
        feats.create_dataset("name", data=np.asarray([f"SYM{i}" for i in range(len(ids))], dtype="S"))
        feats.create_dataset("feature_type", data=np.asarray(["Gene Expression"] * len(ids), dtype="S"))


def write_10x_mtx(
    folder: str, x: sp.csr_matrix, ids: np.ndarray, barcodes: np.ndarray, gz: bool = True
) -> None:
    import scipy.io

    os.makedirs(folder, exist_ok=True)
    op = gzip.open if gz else open
    ext = ".gz" if gz else ""
    with op(os.path.join(folder, "matrix.mtx" + ext), "wb") as f:
        scipy.io.mmwrite(f, sp.coo_matrix(x.T), field="integer")
    with op(os.path.join(folder, "features.tsv" + ext), "wt") as f:
        f.writelines(f"{g}\tSYM{i}\tGene Expression\n" for i, g in enumerate(ids))
    with op(os.path.join(folder, "barcodes.tsv" + ext), "wt") as f:
        f.writelines(f"{b}\n" for b in barcodes)


def ordered_cells(n_cells: int, n_genes: int, n_types: int, length: int, seed: int) -> list[np.ndarray]:
    """Token sequences (v2 layout: <cls>=2 ... <eos>=3, genes from token 4) with a learnable order:
    each type has its own ranked gene list; a cell is its type's list with a few adjacent swaps,
    cut to a random length between length/2 and length."""
    rng = np.random.default_rng(seed)
    orders = [rng.choice(n_genes, length, replace=False) + 4 for _ in range(n_types)]
    cells = []
    for _ in range(n_cells):
        cell = orders[rng.integers(n_types)].copy()
        for i in rng.integers(0, length - 1, size=max(1, length // 10)):
            cell[i], cell[i + 1] = cell[i + 1], cell[i]
        keep = rng.integers(length // 2, length + 1)
        cells.append(np.concatenate([[2], cell[:keep], [3]]).astype(np.int32))
    return cells


def programme_cells(
    n_cells: int, n_types: int, genes_per_type: int, n_shared: int, length: int, seed: int
) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray]]:
    """Cells of planted gene programmes (v2 layout, genes from token 4): each type owns a disjoint
    set of genes, ranked in a type-specific order; shared genes (every type expresses them) are
    interleaved at random ranks. Returns (cells, type of each cell, programme tokens per type;
    the shared genes are tokens 4 .. 4 + n_shared)."""
    rng = np.random.default_rng(seed)
    shared = np.arange(4, 4 + n_shared)
    programmes = [4 + n_shared + t * genes_per_type + rng.permutation(genes_per_type) for t in range(n_types)]
    types = rng.integers(n_types, size=n_cells)
    cells = []
    for t in types:
        own = programmes[t][
            np.sort(rng.choice(genes_per_type, max(2, int(genes_per_type * 0.7)), replace=False))
        ]
        common = rng.choice(shared, min(n_shared, max(1, length // 3)), replace=False)
        body = list(own)
        for g in common:
            body.insert(int(rng.integers(len(body) + 1)), g)
        keep = int(rng.integers(length // 2, length + 1))
        cells.append(np.asarray([2, *body[:keep], 3], dtype=np.int32))
    return cells, types, programmes
