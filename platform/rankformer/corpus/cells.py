"""What every pass over the corpus shares: the plan of row-range shards, checks of the counts, each
cell's total counts and filter, and the mapping of a file's genes onto vocabulary genes."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from rankformer import schema
from rankformer.config.corpus import ReadOptions
from rankformer.errors import InputError
from rankformer.io.base import CellSource
from rankformer.io.sources import open_source
from rankformer.vocab.gene_vocab import GeneVocab, read_gene_table

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """Rows [start, stop) of input file number ``file_index``: the unit of work and of output."""

    file_index: int
    uri: str
    shard_index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"part-f{self.file_index:05d}-s{self.shard_index:06d}.parquet"


@dataclass
class FileInfo:
    uri: str
    fmt: str
    n_cells: int
    n_genes: int
    gene_ids: list[str]
    obs_columns: list[str]
    sample_counts: np.ndarray  # per gene, summed over the first chunk's cells (coverage report)
    id_note: str = ""  # where the gene ids came from, when not the named column
    gene_symbols: list[str] | None = None  # per column, when the file names its genes by symbol too


def inspect_inputs(inputs: list[str], read: ReadOptions) -> list[FileInfo]:
    """Open every input once (header only) so bad files fail before any work starts."""
    infos: list[FileInfo] = []
    for uri in inputs:
        with open_source(uri, read.gene_id_column, read.counts) as src:
            infos.append(inspect_source(src, read, len(infos)))
    return infos


def input_symbols(infos: list[FileInfo], resolved: list[list[str | None]]) -> dict[str, str]:
    """Gene id -> symbol from the inputs that name their genes both ways (the first file's
    symbol for an id wins)."""
    names: dict[str, str] = {}
    for info, res in zip(infos, resolved, strict=True):
        for gid, sym in zip(res, info.gene_symbols or [], strict=False):
            if gid is not None and sym.strip() and sym != gid:
                names.setdefault(gid, sym.strip())
    return names


def inspect_source(src: CellSource, read: ReadOptions, file_index: int = 0) -> FileInfo:
    """Gene ids, obs columns and the first chunk of one source, with every check a worker makes
    run on that chunk, so most mistakes stop here."""
    ids = ["" if g is None else str(g) for g in src.gene_ids]
    if not any(i.strip() for i in ids):
        raise InputError(
            f"{src.uri}: every gene id in column {read.gene_id_column!r} is empty; point "
            "--gene-id-column at the column holding Ensembl ids"
        )
    first = Shard(file_index, src.uri, 0, 0, min(src.n_cells, read.chunk_rows))
    chunk = next(iter_chunks(src, first, read))
    sample = np.asarray(chunk.counts.sum(axis=0), dtype=np.float64).ravel()
    symbols = None if src.gene_symbols is None else ["" if g is None else str(g) for g in src.gene_symbols]
    return FileInfo(
        src.uri, src.fmt, src.n_cells, src.n_genes, ids, src.obs_columns(), sample, src.id_note, symbols
    )


_TABLES: dict[str, dict[str, str]] = {}


def column_tokens(vocab: GeneVocab, gene_ids: Sequence[object], read: ReadOptions) -> np.ndarray:
    """Token id of each input column (-1: not in the vocabulary), through the user's gene table
    when one is given (read once per process), else the vocabulary's aliases, else its symbols."""
    extra: dict[str, str] = {}
    if read.gene_table:
        if read.gene_table not in _TABLES:
            _TABLES[read.gene_table] = read_gene_table(read.gene_table)[0]
        extra = _TABLES[read.gene_table]
    return vocab.map_gene_ids(gene_ids, extra, names=True)


def warn_if_normalized(read: ReadOptions) -> None:
    if read.allow_normalized:
        msg = (
            "--allow-normalized: non-integer values are accepted as they are; medians and "
            "rankings then describe normalised data, not raw counts"
        )
        warnings.warn(msg, stacklevel=2)
        print(f"warning: {msg}")


def plan_shards(infos: list[FileInfo], rows_per_shard: int) -> list[Shard]:
    shards = []
    for fi, info in enumerate(infos):
        for si, start in enumerate(range(0, info.n_cells, rows_per_shard)):
            shards.append(Shard(fi, info.uri, si, start, min(start + rows_per_shard, info.n_cells)))
    return shards


def check_counts(x: sp.csr_matrix, src: CellSource, row0: int, allow_normalized: bool) -> None:
    """Raw counts only: negative, NaN/inf or (unless allowed) non-integer values are errors."""
    data = x.data
    if data.dtype.kind in "iu":
        bad = np.flatnonzero(data < 0) if data.dtype.kind == "i" else np.empty(0, int)
        what = "a negative count"
    else:
        bad = np.flatnonzero(~np.isfinite(data))
        what = "a NaN or infinite count"
        if not len(bad):
            bad = np.flatnonzero(data < 0)
            what = "a negative count"
        if not len(bad) and not allow_normalized:
            bad = np.flatnonzero(data != np.round(data))
            what = "a non-integer count"
    if len(bad):
        k = int(bad[0])
        row = int(np.searchsorted(x.indptr, k, side="right") - 1) + row0
        hint = ""
        if what == "a non-integer count":
            better = src.integer_alternatives()
            hint = (
                f" The file holds integer counts in {better[0]}: pass --counts {better[0]} to use them."
                if better
                else " Pass --allow-normalized to accept normalised values (medians then describe "
                "normalised data, not counts)."
            )
        raise InputError(
            f"{src.uri}: row {row} has {what} ({data[k].item()!r}) in {src.counts}; rankformer expects "
            f"raw UMI counts.{hint}"
        )


def cell_totals(src: CellSource, start: int, stop: int, x: sp.csr_matrix) -> np.ndarray:
    """obs n_counts as given (the reference never recomputes it), else the row sums of X."""
    if schema.N_COUNTS not in src.obs_columns():
        return np.asarray(x.sum(axis=1)).ravel()
    n = src.read_obs(schema.N_COUNTS, start, stop)
    if n.dtype == object:
        raise InputError(
            f"{src.uri}: obs['n_counts'] is not numeric; fix it or drop the column "
            "so rankformer computes totals from X"
        )
    has_counts = np.diff(x.indptr) > 0
    bad = has_counts & ~(np.isfinite(n) & (n > 0))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"{src.uri}: obs['n_counts'] is {n[row].item()!r} at row {start + row}, a cell with counts; "
            "fix the column, or drop it so rankformer computes totals from X"
        )
    return n


def keep_mask(src: CellSource, start: int, stop: int) -> np.ndarray:
    """Cells to use: filter_pass == 1 when that obs column exists, else all."""
    if schema.FILTER_PASS not in src.obs_columns():
        return np.ones(stop - start, dtype=bool)
    values = src.read_obs(schema.FILTER_PASS, start, stop)
    return np.asarray([v == 1 or v is True for v in values], dtype=bool)


@dataclass
class Chunk:
    start: int  # first row, in file coordinates
    counts: sp.csr_matrix  # kept cells only
    n_counts: np.ndarray
    rows: np.ndarray  # file row of each kept cell
    n_read: int
    n_filtered: int


def iter_chunks(src: CellSource, shard: Shard, read: ReadOptions) -> Iterator[Chunk]:
    for start in range(shard.start, shard.stop, read.chunk_rows):
        stop = min(start + read.chunk_rows, shard.stop)
        x = src.read_counts(start, stop)
        check_counts(x, src, start, read.allow_normalized)
        keep = keep_mask(src, start, stop)
        n = cell_totals(src, start, stop, x)
        rows = np.arange(start, stop, dtype=np.int64)
        if not keep.all():
            x, n, rows = x[keep], n[keep], rows[keep]
        if not x.has_sorted_indices:
            x = x.sorted_indices()
        yield Chunk(start, x, n, rows, stop - start, int((~keep).sum()))


def coverage(info: FileInfo, col_map: np.ndarray) -> dict[str, Any]:
    """Share of genes, and of counts in the file's first chunk, that map to the vocabulary."""
    total = info.sample_counts.sum()
    mapped = col_map >= 0
    return {
        "genes": float(mapped.mean()),
        "counts": float(info.sample_counts[mapped].sum() / total) if total > 0 else 0.0,
        "n_genes": len(col_map),
        "n_genes_mapped": int(mapped.sum()),
        "n_empty_ids": sum(1 for g in info.gene_ids if not g.strip()),
        "id_note": info.id_note,
    }


def check_coverage(
    uri: str, cov: dict[str, Any], floor: float, describe_ids: Callable[[], str], report: bool = True
) -> None:
    log.info(
        "%s: %.1f%% of genes (%d/%d) and %.1f%% of counts map to the vocabulary",
        uri,
        100 * cov["genes"],
        cov["n_genes_mapped"],
        cov["n_genes"],
        100 * cov["counts"],
    )
    note = f"; {cov['id_note']}" if cov.get("id_note") else ""
    if report:
        print(
            f"coverage {uri}: genes {100 * cov['genes']:.1f}% ({cov['n_genes_mapped']}/"
            f"{cov['n_genes']}), counts {100 * cov['counts']:.1f}%{note}"
        )
    if cov["counts"] < floor:
        raise InputError(
            f"{uri}: only {100 * cov['counts']:.1f}% of counts map to the vocabulary (floor "
            f"{100 * floor:.0f}%); the gene ids look like {describe_ids()}. Lower --coverage-floor "
            "only if that is expected."
        )
