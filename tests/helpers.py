"""Test helpers: small AnnData files and a plain restatement of the reference arithmetic."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp


def write_anndata(
    path: str,
    x: sp.csr_matrix | np.ndarray,
    ids: list[str],
    obs: dict[str, object] | None = None,
    id_column: str = "ensembl_id",
) -> str:
    x = sp.csr_matrix(x)
    obs_df = pd.DataFrame(obs or {}, index=[f"c{i}" for i in range(x.shape[0])])
    var = pd.DataFrame({id_column: ids}, index=[f"g{i}" for i in range(x.shape[1])])
    ad.AnnData(X=x, obs=obs_df, var=var).write_h5ad(path)
    return path


def reference_rank(
    counts: np.ndarray,
    n_counts: np.ndarray,
    col_token: np.ndarray,
    median_by_token: np.ndarray,
    max_genes: int,
) -> list[list[int]]:
    """The reference's dense arithmetic ``X / n_counts * 10000 / median``, ties by token id."""
    med = np.where(col_token >= 0, median_by_token[np.maximum(col_token, 0)], np.nan)
    values = counts / n_counts[:, None] * 10000 / med[None, :]
    out = []
    for r in range(counts.shape[0]):
        cols = np.flatnonzero((counts[r] > 0) & (col_token >= 0))
        toks = col_token[cols]
        order = np.lexsort((toks, -values[r, cols]))
        out.append(toks[order][:max_genes].tolist())
    return out


def split_packed(ids: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
    off = np.concatenate([[0], np.cumsum(lengths)])
    return [ids[off[i] : off[i + 1]].tolist() for i in range(len(lengths))]
