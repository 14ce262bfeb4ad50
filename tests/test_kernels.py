"""The rank-value kernel on hand-worked cells and against a plain numpy restatement."""

import numpy as np
import pytest
import scipy.sparse as sp

from helpers import reference_rank, split_packed
from rankformer.corpus.kernels import rank_chunk, work_dtype

# token:  4     5     6     7        (0-3 are <pad> <mask> <cls> <eos>)
MEDIAN = np.array([np.nan, np.nan, np.nan, np.nan, 2.0, 0.5, 1.0, 4.0])


def _rank(rows, n_counts, col_token, max_genes=10, prefix=-1, suffix=-1):
    x = sp.csr_matrix(np.asarray(rows))
    ids, lengths = rank_chunk(
        x, np.asarray(n_counts), np.asarray(col_token, np.int32), MEDIAN, max_genes, prefix, suffix
    )
    return split_packed(ids, lengths)


def test_hand_worked_cell_with_a_tie():
    # values: A 4/100*1e4/2 = 200, B 3/100*1e4/0.5 = 600, C 2/100*1e4/1 = 200, D 1/100*1e4/4 = 25
    # A and C tie exactly at 200.0: ascending token id decides (4 before 6).
    assert _rank([[4, 3, 2, 1]], [100], [4, 5, 6, 7]) == [[5, 4, 6, 7]]
    assert _rank([[4, 3, 2, 1]], [100], [4, 5, 6, 7], prefix=2, suffix=3) == [[2, 5, 4, 6, 7, 3]]


def test_tie_order_does_not_depend_on_column_order():
    # the same cell with its columns permuted: ties still come out by token id
    assert _rank([[2, 1, 4, 3]], [100], [6, 7, 4, 5]) == [[5, 4, 6, 7]]


def test_unmapped_and_zero_genes_are_skipped_and_empty_cells_get_length_zero():
    rows = [[0, 5, 0, 9], [0, 0, 0, 7]]
    out = _rank(rows, [50, 50], [4, 5, 6, -1])
    assert out == [[5], []]


def test_duplicate_columns_of_one_gene_are_summed():
    # columns 0 and 2 both map to token 4: counts 1 + 5 = 6 -> 6/100*1e4/2 = 300 > B's 200
    assert _rank([[1, 1, 5]], [100], [4, 5, 4]) == [[4, 5]]


def test_truncation_keeps_the_highest_values():
    assert _rank([[4, 3, 2, 1]], [100], [4, 5, 6, 7], max_genes=2) == [[5, 4]]
    assert _rank([[4, 3, 2, 1]], [100], [4, 5, 6, 7], max_genes=2, prefix=2, suffix=3) == [[2, 5, 4, 3]]


def test_work_dtype_follows_numpy_promotion():
    assert work_dtype(np.dtype(np.int32), np.dtype(np.int64)) == np.float64
    assert work_dtype(np.dtype(np.float32), np.dtype(np.float32)) == np.float32
    assert work_dtype(np.dtype(np.int32), np.dtype(np.float32)) == np.float64
    assert work_dtype(np.dtype(np.float32), np.dtype(np.float64)) == np.float64


# Two real Geneformer V2 medians: their ratio is not a power of two.
REAL_MEDIAN = np.array([np.nan] * 4 + [1.7629378614450941, 0.7785260715031078])


def _float32_order_flip() -> tuple[list[float], float]:
    """Two counts whose order (or tie) differs between float32 and float64 arithmetic: their
    ratio approximates the medians' ratio closer than float32 can resolve."""
    med = REAL_MEDIAN[4:]
    c = np.arange(1, 2_000_000, dtype=np.float64)
    a = np.round(c * med[0] / med[1])
    for n in (1e7, 3e7, 12345678.0):
        v32 = ((np.stack([a, c]).astype(np.float32) / np.float32(n)) * np.float32(10000)) / med[:, None]
        v64 = (np.stack([a, c]) / n * 10000) / med[:, None]
        flip = np.flatnonzero(np.sign(v32[0] - v32[1]) != np.sign(v64[0] - v64[1]))
        if len(flip):
            return [float(a[flip[0]]), float(c[flip[0]])], n
    raise AssertionError("no flip found")


def test_float32_counts_keep_float32_arithmetic_like_the_reference():
    counts, n = _float32_order_flip()
    x = sp.csr_matrix(np.array([counts], np.float32))
    nc = np.array([n], np.float32)
    ids, lengths = rank_chunk(x, nc, np.array([4, 5], np.int32), REAL_MEDIAN, 10)
    ours = split_packed(ids, lengths)
    assert ours == reference_rank(x.toarray(), nc, np.array([4, 5]), REAL_MEDIAN, 10)
    # float64 arithmetic would have given another order: the dtype decides
    assert ours != reference_rank(
        x.toarray().astype(np.float64), nc.astype(np.float64), np.array([4, 5]), REAL_MEDIAN, 10
    )


@pytest.mark.parametrize(
    "dtype,nc_dtype",
    [(np.int32, np.int64), (np.float32, np.float32), (np.float64, np.float64), (np.int64, np.float32)],
)
def test_random_cells_match_the_numpy_restatement(dtype, nc_dtype):
    rng = np.random.default_rng(7)
    counts = rng.poisson(0.6, size=(60, 8)).astype(dtype)  # small counts: many exact ties
    n_counts = counts.sum(axis=1).astype(nc_dtype) + 1
    col_token = np.array([4, 5, 6, 7, -1, 4, 7, -1], np.int32)
    has_dup = len(set(col_token[col_token >= 0])) != int((col_token >= 0).sum())
    assert has_dup
    # the numpy restatement does not merge duplicates: give it the merged matrix
    merged = np.zeros((60, 8), dtype)
    for j, t in enumerate(col_token):
        if t >= 0:
            merged[:, t - 4] += counts[:, j]
    expect = reference_rank(merged, n_counts, np.array([4, 5, 6, 7, -1, -1, -1, -1]), MEDIAN, 3)
    assert _rank(counts, n_counts, col_token, max_genes=3) == expect


def test_values_differing_in_the_lowest_bits_keep_their_exact_order():
    # token 4's median is one ulp above token 5's: with equal counts its value is a hair lower.
    # The packed sort key drops the low bits (where token ids go), so the tie-break must see the
    # full values: 5 before 4, although 4 has the lower token id.
    median = np.array([np.nan] * 4 + [np.nextafter(1.0, 2.0), 1.0, 3.0])
    x = sp.csr_matrix(np.array([[7.0, 7.0, 7.0]]))
    ids, lengths = rank_chunk(x, np.array([100.0]), np.array([4, 5, 6], np.int32), median, 10)
    v = 7.0 / 100.0 * 10000 / median[4:]
    assert v[1] > v[0] and np.float64(v[1]).view(np.uint64) - np.float64(v[0]).view(np.uint64) < 8
    assert split_packed(ids, lengths) == [[5, 4, 6]]
    # and exactly equal values still go by token id
    median = np.array([np.nan] * 4 + [1.0, 1.0, 3.0])
    ids, lengths = rank_chunk(x, np.array([100.0]), np.array([5, 4, 6], np.int32), median, 10)
    assert split_packed(ids, lengths) == [[4, 5, 6]]


def test_long_runs_of_nearly_equal_values_are_ordered_exactly():
    # 400 genes whose values differ by ~1e-9 relative: one key prefix, one long fix-up run;
    # plus exact duplicates of medians (exact ties) mixed in.
    rng = np.random.default_rng(3)
    n_genes = 400
    med = 1.0 + rng.integers(0, 50, n_genes) * 1e-9
    median = np.concatenate([[np.nan] * 4, med])
    counts = np.full((3, n_genes), 5.0)
    counts[1, ::7] = 6.0  # a second cluster of values
    col = np.arange(4, 4 + n_genes, dtype=np.int32)
    ids, lengths = rank_chunk(sp.csr_matrix(counts), np.array([1000.0] * 3), col, median, 4094)
    expect = reference_rank(counts, np.array([1000.0] * 3), col, median, 4094)
    assert split_packed(ids, lengths) == expect
