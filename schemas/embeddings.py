"""Embedding columns: ``(n, d)`` arrays to and from Arrow ``list<float16>`` columns."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def float16_lists(matrix: np.ndarray) -> pa.ListArray:
    """An ``(n, d)`` array as an Arrow ``list<float16>`` column (``d`` may be 0)."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float16)
    n = matrix.shape[0]
    d = matrix.shape[1] if matrix.ndim == 2 else 0
    offsets = np.arange(0, (n + 1) * d, d, dtype=np.int32) if d else np.zeros(n + 1, np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(matrix.reshape(-1), pa.float16()))


def _single_chunk(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        if column.num_chunks == 0:
            return pa.array([], column.type)
        return column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    return column


def lists_to_matrix(column: pa.ChunkedArray | pa.Array, dtype=np.float32) -> np.ndarray:
    """A ``list<float16>`` column whose rows all have one length back to an ``(n, d)`` array."""
    column = _single_chunk(column)
    n = len(column)
    if n == 0:
        return np.zeros((0, 0), dtype)
    flat = column.flatten().to_numpy(zero_copy_only=False)
    if flat.size == 0:
        return np.zeros((n, 0), dtype)
    return flat.reshape(n, -1).astype(dtype, copy=False)


def lists_to_masked_matrix(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`lists_to_matrix` (float32), tolerating null or empty rows: they become zero
    rows, and the second array marks the valid ones. All valid rows must share one length."""
    column = _single_chunk(column)
    n = len(column)
    if n == 0:
        return np.zeros((0, 0), np.float32), np.zeros(0, bool)
    if pa.types.is_fixed_size_list(column.type):
        column = column.cast(pa.list_(column.type.value_type))
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
    valid = lengths > 0
    dims = set(np.unique(lengths[valid]).tolist())
    if len(dims) > 1:
        raise ValueError(f"embeddings of different lengths in one column: {sorted(dims)}")
    dim = dims.pop() if dims else 0
    if valid.all():
        return lists_to_matrix(column, np.float32).reshape(n, dim), valid
    out = np.zeros((n, dim), np.float32)
    if dim:
        out[valid] = lists_to_matrix(column.filter(pa.array(valid)), np.float32)
    return out, valid
