"""Embedding vectors as Arrow columns (``fixed_size_list<float32>``) and back."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

OCC_STEM = "occurrences-"  # gene level with the exact median: every occurrence's state, per shard


def vectors(rows: np.ndarray, kind: pa.DataType | None = None) -> pa.FixedSizeListArray:
    """A (n, dim) array as a ``fixed_size_list<float32>`` column (or of ``kind``)."""
    flat = pa.array(rows.reshape(-1), kind or pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, rows.shape[1])


def rows_of(column: pa.ChunkedArray) -> np.ndarray:
    """A ``fixed_size_list`` column as an (n, dim) array: the inverse of :func:`vectors`."""
    flat = column.combine_chunks().flatten()  # flatten(), not .values: it honours a slice's offset
    return flat.to_numpy(zero_copy_only=False).reshape(len(column), -1)
