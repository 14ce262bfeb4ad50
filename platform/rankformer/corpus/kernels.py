"""Pure numeric kernels over CSR row chunks (numba). No I/O, no Ray: unit-tested on hand-worked cells.

Rank value encoding of one cell, as Geneformer defines it:
    value(g) = count(g) / n_counts * 10_000 / median(g)       for vocabulary genes with count > 0
    tokens   = genes sorted by value, highest first; exactly equal values by ascending token id.

The arithmetic follows the reference's ``X / n_counts * 10000 / median`` operation for operation,
in one of two ways depending on how the input is stored:

- ``divide`` (dense X, loom): numpy's true division. ``count / n_counts`` and ``* 10000`` run in
  ``result_type(counts, n_counts)`` (float64 for integer counts, float32 when both are float32),
  the division by the float64 median in float64.
- ``reciprocal`` (CSR X of an h5ad): scipy divides a sparse matrix by a dense array as
  ``X.multiply(1 / other)``: ``1 / n_counts`` in the dtype of ``n_counts``, the product in the
  promoted dtype of counts and that reciprocal, ``* 10000`` in the same dtype, then a multiply by
  ``1 / median`` (float64).

Values one ulp apart can sort differently under the two, so each storage kind gets its own.
"""

from __future__ import annotations

import numba
import numpy as np
import scipy.sparse as sp

from rankformer.schema import TARGET_SUM


def work_dtype(counts_dtype: np.dtype, n_counts_dtype: np.dtype) -> np.dtype:
    """The dtype numpy would use for ``counts / n_counts * 10000`` (true division)."""
    dt = np.result_type(counts_dtype, n_counts_dtype)
    return np.dtype(np.float32) if dt == np.float32 else np.dtype(np.float64)


@numba.njit(cache=True, nogil=True)
def _radix_sort(keys, tmp, n, counts, n_digits):  # type: ignore[no-untyped-def]
    """LSD radix sort of keys[:n] (uint64, 8-bit digits, constant digits skipped). Branch-free
    in the data, unlike quicksort, whose mispredictions dominate on real cells. Returns the
    buffer (``keys`` or ``tmp``) that holds the sorted keys."""
    src, dst = keys, tmp
    for p in range(n_digits):
        sh = np.uint64(8 * p)
        counts[:] = 0
        for i in range(n):
            counts[(src[i] >> sh) & np.uint64(255)] += 1
        if counts[(src[0] >> sh) & np.uint64(255)] == n:
            continue
        total = 0
        for b in range(256):
            c = counts[b]
            counts[b] = total
            total += c
        for i in range(n):
            d = (src[i] >> sh) & np.uint64(255)
            dst[counts[d]] = src[i]
            counts[d] += 1
        src, dst = dst, src
    return src


@numba.njit(cache=True, nogil=True)
def _rank_tokens(val, tok, m, shift, keys, tmp, counts, val_by_tok, out):  # type: ignore[no-untyped-def]
    """Tokens of val[:m] by value descending, exactly equal values by token ascending, into out.

    One 64-bit key per gene: the top 24 bits of the value's float32 rounding (monotone in the
    value), complemented so larger values sort first, then the token id in the low ``shift``
    bits (ascending among equal prefixes). Radix-sorting these few bytes is the fast part; genes
    whose values share a prefix (exact ties, or values within ~1e-5 of each other) form short runs
    that are re-ordered on the full float64 values afterwards, so the result is exact.
    """
    s = np.uint64(shift)
    for i in range(m):
        # top 24 bits of the float32 rounding (monotone in the value), complemented: descending
        prefix = np.uint64(~(np.float32(val[i]).view(np.uint32) >> np.uint32(8)) & np.uint32(0xFFFFFF))
        keys[i] = (prefix << s) | np.uint64(tok[i])
        val_by_tok[tok[i]] = val[i]
    ranked = _radix_sort(keys, tmp, m, counts, (24 + shift + 7) // 8)
    mask = (np.uint64(1) << s) - np.uint64(1)
    for i in range(m):
        out[i] = np.int32(ranked[i] & mask)
    i = 0
    while i < m:
        j = i + 1
        while j < m and (ranked[j] >> s) == (ranked[i] >> s):
            j += 1
        for a in range(i + 1, j):  # rare, short runs: insertion sort on (-value, token)
            cur = out[a]
            b = a - 1
            while b >= i and (
                val_by_tok[out[b]] < val_by_tok[cur]
                or (val_by_tok[out[b]] == val_by_tok[cur] and out[b] > cur)
            ):
                out[b + 1] = out[b]
                b -= 1
            out[b + 1] = cur
        i = j


@numba.njit(cache=True, nogil=True)
def _gather_row(data, indices, lo, hi, col_token, has_dups, acc, seen, tok, cnt):  # type: ignore[no-untyped-def]
    """Vocabulary genes of one row with count > 0; several columns of one gene are summed."""
    m = 0
    for k in range(lo, hi):
        t = col_token[indices[k]]
        if t < 0 or data[k] == 0:
            continue
        if has_dups:
            if not seen[t]:
                seen[t] = True
                tok[m] = t
                m += 1
            acc[t] += data[k]
        else:
            tok[m] = t
            cnt[m] = data[k]
            m += 1
    if has_dups:
        for i in range(m):
            t = tok[i]
            cnt[i] = acc[t]
            acc[t] = 0
            seen[t] = False
    return m


@numba.njit(cache=True, nogil=True)
def rank_rows(  # type: ignore[no-untyped-def]
    data,
    indices,
    indptr,
    n_counts,
    col_token,
    has_dups,
    median_by_token,
    target,
    max_genes,
    prefix,
    suffix,
    out_ids,
    out_len,
    reciprocal,
):
    """Rank-value encode every row; write tokens packed into ``out_ids`` and lengths to ``out_len``.

    ``n_counts``/``target`` are in the work dtype; ``data`` in its own (promotion happens per
    division, as in numpy). With ``reciprocal``, ``n_counts`` holds ``1 / n_counts`` and
    ``median_by_token`` ``1 / median`` and both are multiplied, as scipy's sparse division does;
    ``data`` is then already in the product's dtype. ``prefix``/``suffix`` are token ids added
    around each kept cell's genes (-1 for none). A row with no vocabulary gene gets length 0.
    """
    n_rows = len(indptr) - 1
    width = 0
    for r in range(n_rows):
        width = max(width, indptr[r + 1] - indptr[r])
    tok = np.empty(width, np.int32)
    cnt = np.empty(width, data.dtype)
    val = np.empty(width, np.float64)
    ranked = np.empty(width, np.int32)
    keys = np.empty(width, np.uint64)
    tmp = np.empty(width, np.uint64)
    counts = np.zeros(256, np.int64)
    n_tokens = len(median_by_token)
    shift = 1
    while (1 << shift) < n_tokens:
        shift += 1
    acc = np.zeros(n_tokens, data.dtype)
    seen = np.zeros(n_tokens, np.bool_)
    val_by_tok = np.zeros(n_tokens, np.float64)
    pos = 0
    for r in range(n_rows):
        m = _gather_row(data, indices, indptr[r], indptr[r + 1], col_token, has_dups, acc, seen, tok, cnt)
        if m == 0:
            out_len[r] = 0
            continue
        _scale(cnt, m, n_counts[r], target, median_by_token, tok, reciprocal, val)
        _rank_tokens(val, tok, m, shift, keys, tmp, counts, val_by_tok, ranked)
        end = _emit(ranked, min(m, max_genes), prefix, suffix, out_ids, pos)
        out_len[r] = end - pos
        pos = end
    return pos


@numba.njit(cache=True, nogil=True, inline="always")
def _scale(cnt, m, n, target, median_by_token, tok, reciprocal, val):  # type: ignore[no-untyped-def]
    """``val[:m]``: each gathered count over the cell's total, times the target sum, over the
    gene's median (or times the reciprocals, see :func:`rank_rows`)."""
    if reciprocal:
        for i in range(m):
            q = cnt[i] * n
            q = q * target[0]
            val[i] = np.float64(q) * median_by_token[tok[i]]
    else:
        for i in range(m):
            q = cnt[i] / n
            q = q * target[0]
            val[i] = np.float64(q) / median_by_token[tok[i]]


@numba.njit(cache=True, nogil=True, inline="always")
def _emit(ranked, k, prefix, suffix, out_ids, pos):  # type: ignore[no-untyped-def]
    """Write ``prefix``, the first ``k`` ranked tokens and ``suffix`` (each -1: none) at ``pos``;
    returns the position after them."""
    if prefix >= 0:
        out_ids[pos] = prefix
        pos += 1
    for i in range(k):
        out_ids[pos] = ranked[i]
        pos += 1
    if suffix >= 0:
        out_ids[pos] = suffix
        pos += 1
    return pos


def rank_chunk(
    counts: sp.csr_matrix,
    n_counts: np.ndarray,
    col_token: np.ndarray,
    median_by_token: np.ndarray,
    max_genes: int,
    prefix: int = -1,
    suffix: int = -1,
    arithmetic: str = "divide",
) -> tuple[np.ndarray, np.ndarray]:
    """(packed int32 token ids, int32 length per row; 0 = no vocabulary gene) for a CSR chunk.
    ``arithmetic``: ``divide`` (numpy's true division) or ``reciprocal`` (scipy's sparse division)."""
    has_dups = bool(_has_duplicates(col_token))
    reciprocal = arithmetic == "reciprocal"
    if reciprocal:
        with np.errstate(divide="ignore"):  # a cell of no counts: inf, never used (it has no entry)
            scale = np.divide(1, n_counts)  # in the dtype of n_counts (integers: float64)
        wd = np.result_type(counts.dtype, scale.dtype)
        wd = np.dtype(np.float32) if wd == np.float32 else np.dtype(np.float64)
        data = counts.data.astype(wd, copy=False)
        median_by_token = np.divide(1.0, median_by_token)
    else:
        wd = work_dtype(counts.dtype, n_counts.dtype)
        scale = n_counts
        # Counts stay in their own dtype: numba promotes ``count / n`` exactly as numpy does
        # (integer or float32 counts over float64 totals -> float64; float32 over float32 -> float32).
        data = counts.data if counts.data.dtype.kind in "iuf" else counts.data.astype(wd)
    extra = int(prefix >= 0) + int(suffix >= 0)
    out_ids = np.empty(counts.nnz + extra * counts.shape[0], np.int32)
    out_len = np.empty(counts.shape[0], np.int32)
    used = rank_rows(
        data,
        counts.indices,
        counts.indptr.astype(np.int64),
        scale.astype(wd),
        col_token,
        has_dups,
        median_by_token,
        np.asarray([TARGET_SUM], wd),
        max_genes,
        prefix,
        suffix,
        out_ids,
        out_len,
        reciprocal,
    )
    return out_ids[:used], out_len


def ranking_values(
    counts: np.ndarray, n_counts: np.generic | float, median: np.ndarray, arithmetic: str = "divide"
) -> np.ndarray:
    """One cell's ranking values in plain numpy, the same operations as :func:`rank_rows`
    (for reports such as `rankformer corpus show`, and as the kernel's specification)."""
    n = np.asarray(n_counts)[()]  # a numpy scalar keeps its dtype in the promotions below
    if arithmetic == "reciprocal":
        q = counts * np.divide(1, n)
        return np.asarray((q * TARGET_SUM) * np.divide(1.0, np.asarray(median, np.float64)))
    return np.asarray(counts / n * TARGET_SUM / np.asarray(median, np.float64))


def _has_duplicates(col_token: np.ndarray) -> bool:
    mapped = col_token[col_token >= 0]
    return len(np.unique(mapped)) != len(mapped)


# --- exact medians: per-gene normalized values, histograms and collection ------------------------


@numba.njit(cache=True, nogil=True)
def gene_values(data, indices, indptr, n_counts, col_gene, has_dups, n_genes):  # type: ignore[no-untyped-def]
    """(gene index, count / n_counts * 10_000 in float64) for every nonzero of every row."""
    nnz = indptr[-1] - indptr[0]
    genes = np.empty(nnz, np.int32)
    values = np.empty(nnz, np.float64)
    width = 0
    for r in range(len(indptr) - 1):
        width = max(width, indptr[r + 1] - indptr[r])
    tok = np.empty(width, np.int32)
    cnt = np.empty(width, np.float64)
    acc = np.zeros(n_genes, np.float64)
    seen = np.zeros(n_genes, np.bool_)
    pos = 0
    for r in range(len(indptr) - 1):
        m = _gather_row(data, indices, indptr[r], indptr[r + 1], col_gene, has_dups, acc, seen, tok, cnt)
        for i in range(m):
            genes[pos] = tok[i]
            values[pos] = cnt[i] / n_counts[r] * 10000.0
            pos += 1
    return genes[:pos], values[:pos]


@numba.njit(cache=True, nogil=True)
def _linear_bin(v, lo, hi, n_bins):  # type: ignore[no-untyped-def]
    """Bin of v in [lo, hi) split into n_bins; edges computed by one formula, checked exactly."""
    width = hi - lo
    j = int((v - lo) / width * n_bins)
    j = min(max(j, 0), n_bins - 1)
    while j > 0 and v < linear_edge(lo, hi, n_bins, j):
        j -= 1
    while j < n_bins - 1 and v >= linear_edge(lo, hi, n_bins, j + 1):
        j += 1
    return j


@numba.njit(cache=True, nogil=True)
def linear_edge(lo, hi, n_bins, j):  # type: ignore[no-untyped-def]
    if j >= n_bins:
        return hi
    return min(lo + (hi - lo) * (j / n_bins), hi)


@numba.njit(cache=True, nogil=True)
def _bin_of(v, s, lo, hi, global_edges, n_bins):  # type: ignore[no-untyped-def]
    if len(global_edges) > 0:
        b = np.searchsorted(global_edges, v, side="right") - 1
        return min(max(b, 0), n_bins - 1)
    return _linear_bin(v, lo[s], hi[s], n_bins)


@numba.njit(cache=True, nogil=True)
def histogram_values(genes, values, slot_a, slot_b, lo, hi, global_edges, n_bins, acc, gmax):  # type: ignore[no-untyped-def]
    """Count values into per-slot bins: global explicit edges when ``global_edges`` is non-empty,
    else ``n_bins`` linear bins of the slot's interval [lo, hi). A gene feeds up to two slots
    (``slot_a``/``slot_b``, -1 for none: one per middle rank). Tracks each gene's max value."""
    for i in range(len(values)):
        g = genes[i]
        v = values[i]
        if v > gmax[g]:
            gmax[g] = v
        for s in (slot_a[g], slot_b[g]):
            if s >= 0 and lo[s] <= v < hi[s]:
                acc[s * n_bins + _bin_of(v, s, lo, hi, global_edges, n_bins)] += 1


@numba.njit(cache=True, nogil=True)
def select_in_interval(genes, values, slot_a, slot_b, lo, hi):  # type: ignore[no-untyped-def]
    """(slot, value) of every value inside an interval [lo, hi) of one of its gene's slots."""
    n = 0
    slots = np.empty(2 * len(values), np.int32)
    out = np.empty(2 * len(values), np.float64)
    for i in range(len(values)):
        g = genes[i]
        v = values[i]
        for s in (slot_a[g], slot_b[g]):
            if s >= 0 and lo[s] <= v < hi[s]:
                slots[n] = s
                out[n] = v
                n += 1
    return slots[:n], out[:n]
