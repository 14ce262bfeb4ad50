"""The plain approach to per-gene medians (whole corpus in memory, concatenate each gene's nonzero
normalized values, numpy.median), plus a merging t-digest built per shard and merged, the way
Geneformer approximated its medians. Writes exact and t-digest medians to an .npz; prints one JSON
line with seconds and peak memory."""

from __future__ import annotations

import argparse
import json
import resource
import time

import anndata as ad
import numba
import numpy as np
import scipy.sparse as sp


@numba.njit(cache=True)
def _compress(means, weights, delta):  # type: ignore[no-untyped-def]
    """One merging pass with the k1 scale function k(q) = delta / (2 pi) asin(2q - 1)."""
    order = np.argsort(means, kind="mergesort")
    total = weights.sum()
    out_m = np.empty(len(means))
    out_w = np.empty(len(means))
    n = 0
    done = 0.0
    cur_m = means[order[0]]
    cur_w = weights[order[0]]
    k_left = delta / (2 * np.pi) * np.arcsin(2 * 0.0 - 1)
    for j in range(1, len(order)):
        i = order[j]
        q_right = (done + cur_w + weights[i]) / total
        if delta / (2 * np.pi) * np.arcsin(min(2 * q_right - 1, 1.0)) - k_left <= 1.0:
            cur_m += (means[i] - cur_m) * weights[i] / (cur_w + weights[i])
            cur_w += weights[i]
        else:
            out_m[n] = cur_m
            out_w[n] = cur_w
            n += 1
            done += cur_w
            k_left = delta / (2 * np.pi) * np.arcsin(min(2 * done / total - 1, 1.0))
            cur_m = means[i]
            cur_w = weights[i]
    out_m[n] = cur_m
    out_w[n] = cur_w
    return out_m[: n + 1], out_w[: n + 1]


@numba.njit(cache=True)
def _quantile(means, weights, q):  # type: ignore[no-untyped-def]
    total = weights.sum()
    target = q * total
    if len(means) == 1:
        return means[0]
    centers = np.cumsum(weights) - weights / 2
    if target <= centers[0]:
        return means[0]
    for i in range(1, len(means)):
        if target <= centers[i]:
            f = (target - centers[i - 1]) / (centers[i] - centers[i - 1])
            return means[i - 1] + f * (means[i] - means[i - 1])
    return means[-1]


@numba.njit(cache=True)
def tdigest_medians(indptr, values, rows, rows_per_shard, delta):  # type: ignore[no-untyped-def]
    out = np.full(len(indptr) - 1, np.nan)
    for g in range(len(indptr) - 1):
        lo, hi = indptr[g], indptr[g + 1]
        if hi == lo:
            continue
        v = values[lo:hi]
        shard = rows[lo:hi] // rows_per_shard
        parts_m = np.empty(0)
        parts_w = np.empty(0)
        s0 = 0
        while s0 < len(v):  # rows are sorted within a column, so shards are contiguous runs
            s1 = s0
            while s1 < len(v) and shard[s1] == shard[s0]:
                s1 += 1
            m, w = _compress(v[s0:s1].copy(), np.ones(s1 - s0), delta)
            parts_m = np.concatenate((parts_m, m))
            parts_w = np.concatenate((parts_w, w))
            s0 = s1
        m, w = _compress(parts_m, parts_w, delta)
        out[g] = _quantile(m, w, 0.5)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--input", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--rows-per-shard", type=int, default=25_000)
    p.add_argument("--delta", type=float, default=100.0)
    args = p.parse_args()
    t0 = time.perf_counter()
    a = ad.read_h5ad(args.input)
    x = sp.csr_matrix(a.X)
    n = a.obs["n_counts"].to_numpy().astype(np.float64)
    norm = sp.csr_matrix(
        (x.data / np.repeat(n, np.diff(x.indptr)) * 10000, x.indices, x.indptr), shape=x.shape
    )
    csc = norm.tocsc()
    csc.sort_indices()
    exact = np.full(x.shape[1], np.nan)
    for g in range(x.shape[1]):
        lo, hi = csc.indptr[g], csc.indptr[g + 1]
        if hi > lo:
            exact[g] = np.median(csc.data[lo:hi])
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t1 = time.perf_counter()
    td = tdigest_medians(
        csc.indptr.astype(np.int64), csc.data, csc.indices.astype(np.int64), args.rows_per_shard, args.delta
    )
    np.savez(args.out, exact=exact, tdigest=td)
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak_rss_mb": peak,
                "tdigest_seconds": time.perf_counter() - t1,
                "nnz": int(x.nnz),
            }
        )
    )


if __name__ == "__main__":
    main()
