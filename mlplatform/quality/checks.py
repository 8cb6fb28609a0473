"""Turn a profile into checks: each expectation of each feature, passed, failed or skipped.

    checks = evaluate(quality, {"loans_30d": "int64"}, profile, reference=ref, end=end_at)

Pure: no Ray, no storage. The semantics of every bound are in
:mod:`mlplatform.features.expectations`; PSI is computed as
:func:`mlplatform.evaluation.metrics.psi` does (shares floored at ``PSI_EPS``), from the bin
counts the profile holds over the reference's decile edges.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import numpy as np

from mlplatform.evaluation.metrics import PSI_EPS
from mlplatform.features.expectations import Quality
from mlplatform.quality.report import Check

__all__ = ["dtype_matches", "evaluate", "psi_from_counts"]


def evaluate(
    quality: Quality,
    dtypes: dict[str, str],
    profile: dict[str, Any],
    *,
    reference: dict[str, Any] | None,
    end: datetime | None,
    drift: bool = True,
) -> list[Check]:
    """Every check of a view: the dtype of each feature, its expectation's bounds, and the
    view's staleness against ``end`` (skipped when ``end`` is None, e.g. for a training set).

    ``reference``: ``{"features": {feature: {"edges": [...], "shares": [...]}}, ...}`` or None
    (no production model uses the view: drift checks are skipped). ``drift=False``: the rows
    are not comparable with a training set (a view's offline rows), drift checks are skipped."""
    rows = profile["rows"]
    checks: list[Check] = []
    for feature, dtype in dtypes.items():
        prof = profile["columns"].get(feature)
        if prof is None:
            continue
        checks.append(_dtype_check(feature, dtype, prof, rows))
        expect = quality.for_feature(feature)
        if expect is None:
            continue
        if expect.max_null_rate is not None:
            if rows == 0:
                checks.append(Check(feature, "max_null_rate", "skipped", detail="no rows"))
            else:
                rate = prof["nulls"] / rows
                status = "failed" if rate > expect.max_null_rate else "passed"
                checks.append(Check(feature, "max_null_rate", status, rate, expect.max_null_rate,
                                    f"{prof['nulls']:,} of {rows:,} rows null"))
        for side, bound, observed in (("min", expect.min, prof["min"]), ("max", expect.max, prof["max"])):
            if bound is None:
                continue
            if observed is None:
                checks.append(Check(feature, side, "skipped", detail="no non-null values"))
                continue
            bad = observed < bound if side == "min" else observed > bound
            checks.append(Check(feature, side, "failed" if bad else "passed", observed, bound,
                                f"{prof['out_of_range']:,} values outside the range" if bad else ""))
        if expect.allowed is not None:
            if not prof["values"]:
                checks.append(Check(feature, "allowed", "skipped", detail="no non-null values"))
            else:
                n = prof["disallowed"]
                checks.append(Check(feature, "allowed", "failed" if n else "passed", n, list(expect.allowed),
                                    f"{n:,} of {prof['values']:,} values not allowed" if n else ""))
        if expect.max_psi is not None and not drift:
            checks.append(Check(feature, "max_psi", "skipped", bound=expect.max_psi, detail=_NOT_COMPARABLE))
        elif expect.max_psi is not None:
            checks.append(_psi_check(feature, expect.max_psi, prof, reference))
    if quality.max_staleness is not None:
        checks.append(_staleness_check(quality.max_staleness, profile, end))
    return checks


# Offline rows are one per entity per change of its values (or per source event), not one per
# application: their distribution differs from a training set's even when nothing drifted
# (loans_90d of the underwriting view: PSI 0.53 between the two on the same data).
_NOT_COMPARABLE = "offline rows (one per change) are not comparable with a training set; drift is checked on training sets"


def dtype_matches(declared: str, types: list[str], non_integral: int) -> bool:
    """Whether stored Arrow types hold a feature declared ``declared``. An ``int64`` feature
    may be stored as floats when every value is whole (pandas turns integers with nulls into
    floats); a ``float64`` feature may be stored as integers."""
    def ok(t: str) -> bool:
        integer = t.startswith(("int", "uint"))
        floating = t in ("float", "double", "halffloat") or t.startswith("float")
        if declared == "int64":
            return integer or (floating and non_integral == 0)
        if declared == "float64":
            return integer or floating
        if declared == "string":
            return t in ("string", "large_string")
        if declared == "bool":
            return t == "bool"
        if declared == "timestamp":
            return t.startswith("timestamp")
        if declared == "list":
            return t.startswith(("list", "large_list", "fixed_size_list"))
        return False

    return all(ok(t) for t in types if t != "null")


def psi_from_counts(shares: list[float], counts: list[int]) -> float:
    """PSI of observed bin ``counts`` against reference bin ``shares`` (as metrics.psi)."""
    expected = np.maximum(np.asarray(shares, dtype=float), PSI_EPS)
    total = max(sum(counts), 1)
    actual = np.maximum(np.asarray(counts, dtype=float) / total, PSI_EPS)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def _dtype_check(feature: str, dtype: str, prof: dict[str, Any], rows: int) -> Check:
    types = prof["types"]
    if "missing" in types:
        return Check(feature, "dtype", "failed", "missing", dtype, "the column is not in the data")
    if not types or rows == 0:
        return Check(feature, "dtype", "skipped", bound=dtype, detail="no rows")
    if dtype_matches(dtype, types, prof["non_integral"]):
        return Check(feature, "dtype", "passed", ",".join(types), dtype)
    detail = f"{prof['non_integral']:,} values are not whole" if prof["non_integral"] else ""
    return Check(feature, "dtype", "failed", ",".join(types), dtype, detail)


def _psi_check(feature: str, bound: float, prof: dict[str, Any], reference: dict[str, Any] | None) -> Check:
    ref = (reference or {}).get("features", {}).get(feature)
    if ref is None:
        why = "no production model uses this view" if reference is None else "the reference has no values of it"
        return Check(feature, "max_psi", "skipped", bound=bound, detail=why)
    if not prof["values"] or prof["hist"] is None:
        return Check(feature, "max_psi", "skipped", bound=bound, detail="no non-null values")
    value = psi_from_counts(ref["shares"], prof["hist"])
    return Check(feature, "max_psi", "failed" if value > bound else "passed", value, bound,
                 f"against {reference.get('training_set', 'the reference')}" if reference else "")


def _staleness_check(bound: timedelta, profile: dict[str, Any], end: datetime | None) -> Check:
    limit = bound.total_seconds()
    if end is None:
        return Check("", "max_staleness", "skipped", bound=limit, detail="no range end (training set)")
    if profile["newest"] is None:
        return Check("", "max_staleness", "skipped", bound=limit, detail="no rows")
    newest = datetime.fromtimestamp(profile["newest"] / 1e6, tz=end.tzinfo)
    age = (end - newest).total_seconds()
    detail = f"newest value at {newest.isoformat()}, {_human(age)} before the end {end.isoformat()}"
    return Check("", "max_staleness", "failed" if age > limit else "passed", age, limit, detail)


def _human(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if abs(seconds) >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"
