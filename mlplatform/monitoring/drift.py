"""Population stability of one distribution against a reference: PSI with a bin for missing values.

    d = column_drift("income", reference=train["income"], current=live["income"])
    d.psi, d.status            # 0.41, "shift"
    d.bins                      # labels, reference and current shares: what the report plots

**Bins.** A numeric column is cut at the reference's deciles (``evaluation.metrics.decile_edges``,
duplicate edges dropped, so a column with few distinct values gets fewer bins); a column of
strings (or booleans) gets one bin per reference category plus ``(other)`` for categories the
reference never had. Either way missing values (None, NaN) are a bin of their own, so a feature
that goes null shows up as drift rather than vanishing from both sides. Shares are floored at
``PSI_EPS`` as in ``evaluation.metrics.psi``, which this equals when neither side has a missing value.

**Status.** The usual credit-risk reading: PSI below 0.1 is ``stable``, 0.1 to ``bound`` (0.25 by
default) ``watch``, at or above ``bound`` ``shift``. With no current values the PSI is None and
the status ``no_data``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlplatform.errors import DataError
from mlplatform.evaluation.metrics import PSI_EPS, decile_bins, decile_edges

__all__ = ["DEFAULT_BOUND", "WATCH", "Drift", "column_drift"]

DEFAULT_BOUND = 0.25
WATCH = 0.1
MISSING = "(missing)"
OTHER = "(other)"


@dataclass(frozen=True)
class Drift:
    """One column's PSI and the binned shares behind it."""

    name: str
    psi: float | None
    status: str  # stable | watch | shift | no_data
    reference_rows: int
    current_rows: int
    reference_missing: float  # share of missing values
    current_missing: float | None
    labels: list[str]
    reference_shares: list[float]
    current_shares: list[float]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "psi": self.psi,
            "status": self.status,
            "reference_rows": self.reference_rows,
            "current_rows": self.current_rows,
            "reference_missing": self.reference_missing,
            "current_missing": self.current_missing,
            "bins": {"labels": self.labels, "reference": self.reference_shares, "current": self.current_shares},
        }


def column_drift(name: str, *, reference: Sequence[Any], current: Sequence[Any], bound: float = DEFAULT_BOUND) -> Drift:
    """PSI of ``current`` against ``reference`` (see the module docstring for bins and status).

    Raises:
        DataError: the reference is empty.
    """
    ref = list(reference) if not isinstance(reference, np.ndarray) else reference
    cur = list(current) if not isinstance(current, np.ndarray) else current
    if len(ref) == 0:
        raise DataError(f"no reference values for {name!r}: the training snapshot has no rows for it")
    if _is_categorical(ref):
        labels, ref_counts, cur_counts = _categorical_counts(ref, cur)
    else:
        labels, ref_counts, cur_counts = _numeric_counts(name, ref, cur)
    ref_total, cur_total = len(ref), len(cur)
    ref_shares = (ref_counts / ref_total).tolist()
    cur_shares = (cur_counts / cur_total).tolist() if cur_total else [0.0] * len(labels)
    if cur_total:
        expected = np.maximum(ref_counts / ref_total, PSI_EPS)
        actual = np.maximum(cur_counts / cur_total, PSI_EPS)
        value: float | None = float(np.sum((actual - expected) * np.log(actual / expected)))
        status = "shift" if value >= bound else "watch" if value >= WATCH else "stable"
    else:
        value, status = None, "no_data"
    return Drift(
        name=name,
        psi=value,
        status=status,
        reference_rows=ref_total,
        current_rows=cur_total,
        reference_missing=float(ref_counts[-1] / ref_total),
        current_missing=float(cur_counts[-1] / cur_total) if cur_total else None,
        labels=labels,
        reference_shares=ref_shares,
        current_shares=cur_shares,
    )


def _is_categorical(values: Sequence[Any]) -> bool:
    if isinstance(values, np.ndarray) and values.dtype.kind in "fiu":
        return False
    return any(isinstance(v, (str, bool, np.bool_)) for v in values if v is not None)


def _numeric(name: str, values: Sequence[Any]) -> np.ndarray:
    try:
        out = np.array([np.nan if v is None else v for v in values], dtype=float) if not isinstance(values, np.ndarray) else values.astype(float)
    except (TypeError, ValueError):
        raise DataError(f"feature {name!r} mixes numbers with values that are not numbers; PSI needs one kind") from None
    out[np.isinf(out)] = np.nan  # an infinite ratio has no decile: count it with the missing
    return out


def _numeric_counts(name: str, ref: Sequence[Any], cur: Sequence[Any]) -> tuple[list[str], np.ndarray, np.ndarray]:
    r, c = _numeric(name, ref), _numeric(name, cur)
    r_ok, c_ok = r[~np.isnan(r)], c[~np.isnan(c)]
    edges = decile_edges(r_ok) if len(r_ok) else np.array([])
    k = len(edges) + 1
    ref_counts = np.append(np.bincount(decile_bins(r_ok, edges), minlength=k), len(r) - len(r_ok)).astype(float)
    cur_counts = np.append(np.bincount(decile_bins(c_ok, edges), minlength=k), len(c) - len(c_ok)).astype(float)
    bounds = [-np.inf, *edges.tolist(), np.inf]
    labels = [f"[{_short(lo)}, {_short(hi)})" for lo, hi in zip(bounds[:-1], bounds[1:])] + [MISSING]
    return labels, ref_counts, cur_counts


def _categorical_counts(ref: Sequence[Any], cur: Sequence[Any]) -> tuple[list[str], np.ndarray, np.ndarray]:
    def key(v: Any) -> str | None:
        if v is None or (isinstance(v, float) and v != v):
            return None
        return str(v)

    categories = sorted({k for k in map(key, ref) if k is not None})
    index = {c: i for i, c in enumerate(categories)}
    k = len(categories)

    def counts(values: Sequence[Any]) -> np.ndarray:
        out = np.zeros(k + 2)  # categories, (other), (missing)
        for v in map(key, values):
            out[k + 1 if v is None else index.get(v, k)] += 1
        return out

    return [*categories, OTHER, MISSING], counts(ref), counts(cur)


def _short(x: float) -> str:
    if np.isinf(x):
        return "-inf" if x < 0 else "inf"
    return f"{x:.4g}"
