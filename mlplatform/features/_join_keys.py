"""Join keys of both sides of an as-of join as one shared int64 code per row.

Each key column is factorised over the entity and feature rows together (compact integer
ids by offset, others by hashing, strings by dictionary), composite keys are combined
column by column, and a null in any key gives -1, which never matches.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from mlplatform.errors import DataError

__all__ = ["factorize_keys"]

# Composite key codes are int64; stay clear of the sign bit with a margin.
_INT64_BUDGET = 1 << 62


def factorize_keys(entities: pa.Table, features: pa.Table, join_keys: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    """Dense-ish int64 codes for the join keys, shared by both sides; -1 where any key is null."""
    n = entities.num_rows
    code: np.ndarray | None = None
    cardinality = 1
    for name in join_keys:
        c, card = _factorize_column(name, entities.column(name), features.column(name))
        if code is None:
            code, cardinality = c, card
            continue
        if cardinality * card >= _INT64_BUDGET:
            code, cardinality = _densify(code)
        null = (code < 0) | (c < 0)
        code = code * card + c
        cardinality *= card
        code[null] = -1
    assert code is not None
    if cardinality > code.size + 1:
        code, cardinality = _densify(code)
    return code[:n], code[n:], max(cardinality, 1)


def _densify(code: np.ndarray) -> tuple[np.ndarray, int]:
    dense, uniques = pd.factorize(code, use_na_sentinel=False)
    dense = dense.astype(np.int64)
    # Keep -1 (null) as -1; its factor code is some non-negative number otherwise.
    null = code < 0
    if null.any():
        dense[null] = -1
    return dense, len(uniques)


def _factorize_column(name: str, left: pa.ChunkedArray, right: pa.ChunkedArray) -> tuple[np.ndarray, int]:
    left, right = _decode(left), _decode(right)
    lt, rt = left.type, right.type
    if pa.types.is_integer(lt) and pa.types.is_integer(rt):
        both = pa.chunked_array([*left.cast(pa.int64()).chunks, *right.cast(pa.int64()).chunks], pa.int64())
        valid = both.is_valid().to_numpy() if both.null_count else None
        values = (pc.fill_null(both, 0) if valid is not None else both).to_numpy()
        present = values if valid is None else values[valid]
        if present.size == 0:
            return np.full(values.size, -1, dtype=np.int64), 1
        lo, hi = int(present.min()), int(present.max())
        if hi - lo <= 4 * values.size + 1024:
            # Compact integer ids need no hashing: the offset is already a dense-enough code.
            code = values - lo
            card = hi - lo + 1
        else:
            factor, uniques = pd.factorize(values)
            code, card = factor.astype(np.int64), len(uniques)
        if valid is not None:
            code[~valid] = -1
        return code, card
    if _is_text(lt) and _is_text(rt):
        both = pa.chunked_array(
            [*left.cast(pa.large_string()).chunks, *right.cast(pa.large_string()).chunks], pa.large_string()
        )
        encoded = both.dictionary_encode()
        indices = pa.chunked_array([chunk.indices for chunk in encoded.chunks], encoded.type.index_type)
        code = pc.fill_null(indices, -1).to_numpy().astype(np.int64, copy=False)
        card = len(encoded.chunks[0].dictionary) if encoded.num_chunks else 0
        return code, max(card, 1)
    raise DataError(
        f"join key {name!r} has type {lt} in the entity table but {rt} in the feature table; "
        "cast one side so both are integers or both are strings"
    )


def _decode(column: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_dictionary(column.type):
        return column.cast(column.type.value_type)
    return column


def _is_text(typ: pa.DataType) -> bool:
    return pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_string_view(typ)
