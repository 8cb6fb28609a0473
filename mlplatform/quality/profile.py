"""Profiles: what a validation measures about a view's rows, computed one Arrow batch at a
time and merged, so a pass over any amount of data holds one batch per worker.

    spec = ProfileSpec(columns=[ColumnSpec(feature="loans_30d", column="loans_30d", dtype="int64", min=0.0)],
                       timestamp="event_timestamp")
    total = merge(profile_table(batch_1, spec), profile_table(batch_2, spec))

A profile is plain JSON: rows, the newest timestamp (UTC microseconds) and per feature the
nulls (NaN counts as null), non-null values, min, max, values outside ``[min, max]``, values
not in ``allowed``, non-whole values of an ``int64`` feature stored as floats, the Arrow
types seen and, when reference ``edges`` are given, the counts per bin (bin ``i`` is
``[edges[i-1], edges[i])``, as :func:`mlplatform.evaluation.metrics.decile_bins`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["ColumnSpec", "ProfileSpec", "merge", "profile_table"]


@dataclass(frozen=True)
class ColumnSpec:
    """One feature to profile: its column in the data, declared dtype and bounds."""

    feature: str
    column: str
    dtype: str
    min: float | None = None
    max: float | None = None
    allowed: tuple[Any, ...] | None = None
    edges: tuple[float, ...] | None = None


@dataclass(frozen=True)
class ProfileSpec:
    """The features to profile, the timestamp column (for staleness), and whether rows
    where every feature is null are left out and counted as ``uncovered`` (a training set:
    there such a row is an entity the view had no value for at that time, e.g. a first-time
    applicant; that is the population, not the view's data)."""

    columns: list[ColumnSpec] = field(default_factory=list)
    timestamp: str | None = None
    skip_uncovered: bool = False


def empty(spec: ProfileSpec) -> dict[str, Any]:
    return {"rows": 0, "uncovered": 0, "newest": None, "columns": {c.feature: _empty_column(c) for c in spec.columns}}


def _empty_column(c: ColumnSpec) -> dict[str, Any]:
    return {
        "nulls": 0, "values": 0, "min": None, "max": None, "out_of_range": 0, "disallowed": 0, "non_integral": 0,
        "types": [], "hist": [0] * (len(c.edges) + 1) if c.edges is not None else None,
    }


def profile_table(table: pa.Table | pa.RecordBatch, spec: ProfileSpec) -> dict[str, Any]:
    """The profile of one batch of rows (columns the spec names but the batch lacks count as
    all-null, typed ``missing``)."""
    out = empty(spec)
    names = table.schema.names
    if spec.skip_uncovered:
        covered = _any_value(table, [c.column for c in spec.columns if c.column in names])
        out["uncovered"] = table.num_rows - int(pc.sum(covered).as_py() or 0) if table.num_rows else 0
        table = table.filter(covered)
    out["rows"] = n = table.num_rows
    if spec.timestamp and spec.timestamp in names and n:
        ts = table.column(spec.timestamp)
        if pa.types.is_timestamp(ts.type):
            newest = pc.max(ts.cast(pa.timestamp("us", tz=ts.type.tz)).cast(pa.int64())).as_py()
            out["newest"] = newest
    for c in spec.columns:
        prof = out["columns"][c.feature]
        if c.column not in names:
            prof["nulls"] = n
            prof["types"] = ["missing"]
            continue
        _profile_column(table.column(c.column), c, prof, n)
    return out


def _profile_column(col: Any, c: ColumnSpec, prof: dict[str, Any], n: int) -> None:
    typ = col.type
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if pa.types.is_dictionary(typ):
        col = col.dictionary_decode()
        typ = col.type
    prof["types"] = [str(typ)]
    numeric = pa.types.is_integer(typ) or pa.types.is_floating(typ)
    if numeric:
        values = col.to_numpy(zero_copy_only=False).astype(float)  # nulls become NaN
        valid = values[~np.isnan(values)]
        prof["nulls"] = int(n - len(valid))
        prof["values"] = len(valid)
        if len(valid):
            prof["min"], prof["max"] = float(valid.min()), float(valid.max())
            if c.min is not None or c.max is not None:
                lo = c.min if c.min is not None else -np.inf
                hi = c.max if c.max is not None else np.inf
                prof["out_of_range"] = int(((valid < lo) | (valid > hi)).sum())
            if c.dtype == "int64" and pa.types.is_floating(typ):
                prof["non_integral"] = int((valid != np.floor(valid)).sum())
            if c.allowed is not None:
                allowed = np.array([float(a) for a in c.allowed if not isinstance(a, str)])
                prof["disallowed"] = int((~np.isin(valid, allowed)).sum())
            if c.edges is not None:
                bins = np.searchsorted(np.asarray(c.edges, dtype=float), valid, side="right")
                prof["hist"] = np.bincount(bins, minlength=len(c.edges) + 1).tolist()
        return
    prof["nulls"] = int(col.null_count)
    prof["values"] = int(n - col.null_count)
    if c.allowed is not None and prof["values"]:
        valid = col.drop_null()
        try:
            allowed = pa.array(list(c.allowed)).cast(valid.type)
            prof["disallowed"] = int(pc.sum(pc.invert(pc.is_in(valid, value_set=allowed))).as_py() or 0)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            prof["disallowed"] = len(valid)


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two profiles of disjoint rows as one (order-free: ``merge(a, b) == merge(b, a)``)."""
    newest = [x for x in (a["newest"], b["newest"]) if x is not None]
    columns = {}
    for name, pa_ in a["columns"].items():
        pb = b["columns"][name]
        columns[name] = {
            "nulls": pa_["nulls"] + pb["nulls"],
            "values": pa_["values"] + pb["values"],
            "min": _pick(min, pa_["min"], pb["min"]),
            "max": _pick(max, pa_["max"], pb["max"]),
            "out_of_range": pa_["out_of_range"] + pb["out_of_range"],
            "disallowed": pa_["disallowed"] + pb["disallowed"],
            "non_integral": pa_["non_integral"] + pb["non_integral"],
            "types": sorted(set(pa_["types"]) | set(pb["types"])),
            "hist": None if pa_["hist"] is None else [x + y for x, y in zip(pa_["hist"], pb["hist"], strict=True)],
        }
    out = {
        "rows": a["rows"] + b["rows"],
        "uncovered": a.get("uncovered", 0) + b.get("uncovered", 0),
        "newest": max(newest) if newest else None,
        "columns": columns,
    }
    if "seconds" in a or "seconds" in b:  # CPU time spent profiling, when the caller timed it
        out["seconds"] = a.get("seconds", 0.0) + b.get("seconds", 0.0)
    return out


def _any_value(table: Any, columns: list[str]) -> Any:
    """Rows where at least one of ``columns`` holds a value (not null, not NaN)."""
    mask = pa.array([False] * table.num_rows, pa.bool_())
    for name in columns:
        col = table.column(name)
        valid = pc.is_valid(col)
        if pa.types.is_floating(col.type):
            valid = pc.and_(valid, pc.invert(pc.fill_null(pc.is_nan(col), True)))
        mask = pc.or_(mask, valid)
    return mask


def _pick(fn: Any, x: Any, y: Any) -> Any:
    if x is None:
        return y
    if y is None:
        return x
    return fn(x, y)
