"""How good a probability-of-default score is: discrimination, calibration, stability.

    ev = evaluate(test["default"], test_scores, segments={"term": test["term"]},
                  reference_score=train_scores)
    ev.auc, ev.ks, ev.psi
    ev.calibration            # per score decile: mean predicted vs observed default rate
    ev.metrics()              # the scalars, JSON-ready, for the model registry

Definitions (``y`` is 1 for default, ``s`` the score, higher = riskier):

- **AUC**: the probability that a random defaulter scores above a random non-defaulter,
  ties counting one half (Mann–Whitney U / (n₁·n₀), with average ranks). NaN with one class.
- **KS**: ``max over thresholds t of |TPR(t) − FPR(t)|`` where ``TPR(t) = P(s ≥ t | y=1)``;
  the two-sample Kolmogorov–Smirnov statistic between the scores of defaulters and
  non-defaulters. NaN with one class.
- **Brier score**: ``mean((s − y)²)``.
- **Log loss**: ``−mean(y·ln p + (1−y)·ln(1−p))`` with ``p = clip(s, 1e-15, 1 − 1e-15)``.
- **Deciles** (calibration, lift): edges are the 10%, 20%, …, 90% quantiles of the scores
  being evaluated (linear interpolation, duplicate edges dropped). Bin ``i`` holds scores in
  ``[edge[i−1], edge[i])``, the first and last bins are open-ended; so tied scores always
  share a bin and a bin may hold more or fewer than a tenth of the rows. Bins are numbered
  from 1 (lowest scores) up; empty bins are left out.
- **Lift** of a decile: its observed default rate divided by the overall default rate.
- **PSI** of ``s`` against ``reference_score`` (e.g. the training split's scores):
  ``Σ (aᵢ − eᵢ)·ln(aᵢ/eᵢ)`` over the *reference's* decile bins (defined as above from the
  reference), ``eᵢ``/``aᵢ`` the shares of reference/evaluated scores in bin ``i``, each floored
  at 1e-4 so an empty bin adds a large finite term instead of infinity. 0 for identical
  distributions; < 0.1 is usually read as stable, > 0.25 as a material shift.
- **Segment AUC**: AUC within each value of a segment column; missing values (None/NaN)
  form their own segment ``"missing"``; NaN where the segment holds one class.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from mlplatform.errors import DataError

__all__ = ["LOGLOSS_EPS", "PSI_EPS", "Evaluation", "auc", "decile_bins", "decile_edges", "evaluate", "ks", "psi"]

LOGLOSS_EPS = 1e-15
PSI_EPS = 1e-4
N_BINS = 10
_ROC_POINTS = 1000
_HIST_BINS = 40


@dataclass(frozen=True)
class Evaluation:
    """The evaluation of one split. Tables are pandas DataFrames (see the module docstring
    for every definition); ``roc`` holds at most ~1000 points of the curve for plotting and
    ``score_histogram`` the score counts per label in 40 equal-width bins."""

    n: int
    positives: int
    base_rate: float
    auc: float
    ks: float
    brier: float
    log_loss: float
    psi: float | None
    calibration: pd.DataFrame = field(repr=False)
    lift: pd.DataFrame = field(repr=False)
    segments: dict[str, pd.DataFrame] = field(repr=False)
    roc: pd.DataFrame = field(repr=False)
    score_histogram: pd.DataFrame = field(repr=False)

    def metrics(self) -> dict[str, float | int | None]:
        """The scalar metrics: ``n, positives, base_rate, auc, ks, brier, log_loss, psi``."""
        return {
            "n": self.n,
            "positives": self.positives,
            "base_rate": self.base_rate,
            "auc": self.auc,
            "ks": self.ks,
            "brier": self.brier,
            "log_loss": self.log_loss,
            "psi": self.psi,
        }

    def to_json(self) -> dict[str, Any]:
        """Scalars and tables as JSON-ready values (NaN becomes None)."""

        def records(df: pd.DataFrame) -> list[dict[str, Any]]:
            return [{k: _clean(v) for k, v in row.items()} for row in df.to_dict("records")]

        return {
            **{k: _clean(v) for k, v in self.metrics().items()},
            "calibration": records(self.calibration),
            "lift": records(self.lift),
            "segments": {name: records(df) for name, df in self.segments.items()},
        }


def evaluate(
    y_true: Any,
    score: Any,
    *,
    segments: Mapping[str, Any] | None = None,
    reference_score: Any = None,
) -> Evaluation:
    """Evaluate scores ``score`` against 0/1 outcomes ``y_true`` (see the module docstring).

    Args:
        y_true: 1 = default, 0 = repaid (bools accepted); array-like.
        score: predicted probability of default, same length; finite.
        segments: ``{name: values}`` of the same length, e.g. ``{"term": df["term"]}``; an
            AUC per distinct value is reported in ``Evaluation.segments[name]``.
        reference_score: scores of the reference population (the training split) for PSI;
            ``psi`` is None without it.

    Raises:
        DataError: lengths differ, labels are not 0/1, scores are not finite, or no rows.
    """
    y, s = _check(y_true, score)
    positives = int(y.sum())
    base_rate = positives / len(y)
    fpr, tpr, thresholds = roc_curve(y, s)
    calibration, lift = _decile_tables(y, s, base_rate, positives)
    seg_tables = {}
    for name, values in (segments or {}).items():
        seg_tables[name] = _segment_table(y, s, values, name)
    return Evaluation(
        n=len(y),
        positives=positives,
        base_rate=base_rate,
        auc=auc(y, s),
        ks=float(np.max(np.abs(tpr - fpr))) if 0 < positives < len(y) else float("nan"),
        brier=float(np.mean((s - y) ** 2)),
        log_loss=_log_loss(y, s),
        psi=None if reference_score is None else psi(reference_score, s),
        calibration=calibration,
        lift=lift,
        segments=seg_tables,
        roc=_thin(pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": thresholds})),
        score_histogram=_histogram(y, s),
    )


# ------------------------------------------------------------------------ definitions
def auc(y_true: Any, score: Any) -> float:
    """Area under the ROC curve from average ranks (ties count one half); NaN with one class."""
    y, s = _check(y_true, score)
    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = _average_ranks(s)
    return float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def ks(y_true: Any, score: Any) -> float:
    """The KS statistic ``max |TPR − FPR|`` over all thresholds; NaN with one class."""
    y, s = _check(y_true, score)
    if not 0 < y.sum() < len(y):
        return float("nan")
    fpr, tpr, _ = roc_curve(y, s)
    return float(np.max(np.abs(tpr - fpr)))


def roc_curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, threshold)`` at every distinct score, from ``(0, 0, +inf)`` to ``(1, 1, min)``:
    the rates of predicting default for ``s >= threshold``. NaN rates for a missing class."""
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_value = np.r_[np.flatnonzero(s_sorted[1:] != s_sorted[:-1]), len(s) - 1]
    tps = np.cumsum(y_sorted)[last_of_value].astype(float)
    fps = (last_of_value + 1) - tps
    n1, n0 = tps[-1], fps[-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.r_[0.0, tps / n1]
        fpr = np.r_[0.0, fps / n0]
    return fpr, tpr, np.r_[np.inf, s_sorted[last_of_value]]


def decile_edges(score: Any, n_bins: int = N_BINS) -> np.ndarray:
    """Interior bin edges: the ``1/n_bins … (n_bins−1)/n_bins`` quantiles, duplicates dropped."""
    s = np.asarray(score, dtype=float)
    return np.unique(np.quantile(s, np.arange(1, n_bins) / n_bins))


def decile_bins(score: Any, edges: np.ndarray) -> np.ndarray:
    """0-based bin of each score: bin ``i`` is ``[edges[i−1], edges[i])``, open at both ends."""
    return np.searchsorted(edges, np.asarray(score, dtype=float), side="right")


def psi(reference_score: Any, score: Any, n_bins: int = N_BINS) -> float:
    """Population stability index of ``score`` against ``reference_score`` over the reference's
    decile bins, shares floored at ``PSI_EPS``."""
    ref = _finite(reference_score, "reference_score")
    cur = _finite(score, "score")
    edges = decile_edges(ref, n_bins)
    k = len(edges) + 1
    expected = np.maximum(np.bincount(decile_bins(ref, edges), minlength=k) / len(ref), PSI_EPS)
    actual = np.maximum(np.bincount(decile_bins(cur, edges), minlength=k) / len(cur), PSI_EPS)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


# --------------------------------------------------------------------------- internals
def _check(y_true: Any, score: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    s = _finite(score, "score")
    if y.ndim != 1 or len(y) != len(s):
        raise DataError(f"y_true and score must be 1-D of the same length, got shapes {y.shape} and {s.shape}")
    if len(y) == 0:
        raise DataError("cannot evaluate zero rows")
    if y.dtype == bool:
        y = y.astype(np.int8)
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        raise DataError(f"y_true must hold only 0 and 1 (1 = default), found {np.unique(y[bad])[:5].tolist()}")
    return y.astype(np.int8), s


def _finite(values: Any, what: str) -> np.ndarray:
    s = np.asarray(values, dtype=float).ravel()
    if len(s) == 0:
        raise DataError(f"{what} is empty")
    if not np.isfinite(s).all():
        raise DataError(f"{what} holds {int((~np.isfinite(s)).sum())} NaN or infinite values; score every row")
    return s


def _average_ranks(s: np.ndarray) -> np.ndarray:
    order = np.argsort(s, kind="mergesort")
    s_sorted = s[order]
    starts_mask = np.r_[True, s_sorted[1:] != s_sorted[:-1]]
    starts = np.flatnonzero(starts_mask)
    ends = np.r_[starts[1:], len(s)]
    # Tied values occupy ranks start+1 … end (1-based); each gets their mean.
    avg = (starts + 1 + ends) / 2.0
    ranks = np.empty(len(s))
    ranks[order] = avg[np.cumsum(starts_mask) - 1]
    return ranks


def _log_loss(y: np.ndarray, s: np.ndarray) -> float:
    p = np.clip(s, LOGLOSS_EPS, 1 - LOGLOSS_EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def _decile_tables(y: np.ndarray, s: np.ndarray, base_rate: float, positives: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    bins = decile_bins(s, decile_edges(s))
    grouped = (
        pd.DataFrame({"bin": bins + 1, "y": y, "s": s})
        .groupby("bin", sort=True)
        .agg(count=("y", "size"), positives=("y", "sum"), mean_score=("s", "mean"), score_min=("s", "min"), score_max=("s", "max"))
        .reset_index()
    )
    grouped["observed_rate"] = grouped["positives"] / grouped["count"]
    calibration = grouped[["bin", "count", "positives", "score_min", "score_max", "mean_score", "observed_rate"]]
    lift = grouped[["bin", "count", "positives", "observed_rate"]].copy()
    with np.errstate(invalid="ignore", divide="ignore"):
        lift["lift"] = lift["observed_rate"] / base_rate if base_rate > 0 else np.nan
        lift["share_of_defaults"] = lift["positives"] / positives if positives else np.nan
    return calibration, lift


def _segment_table(y: np.ndarray, s: np.ndarray, values: Any, name: str) -> pd.DataFrame:
    v = pd.Series(np.asarray(values, dtype=object) if not isinstance(values, pd.Series) else values.to_numpy(dtype=object))
    if len(v) != len(y):
        raise DataError(f"segment {name!r} has {len(v)} values for {len(y)} rows")
    v = v.where(v.notna(), "missing")
    rows = []
    for value, idx in v.groupby(v, sort=False).indices.items():
        ys, ss = y[idx], s[idx]
        rows.append(
            {
                "value": value,
                "count": len(idx),
                "positives": int(ys.sum()),
                "default_rate": float(ys.mean()),
                "auc": auc(ys, ss),
            }
        )
    table = pd.DataFrame(rows, columns=["value", "count", "positives", "default_rate", "auc"])
    return table.sort_values("count", ascending=False, kind="mergesort").reset_index(drop=True)


def _thin(roc: pd.DataFrame) -> pd.DataFrame:
    if len(roc) <= _ROC_POINTS:
        return roc
    keep = np.unique(np.linspace(0, len(roc) - 1, _ROC_POINTS).round().astype(int))
    return roc.iloc[keep].reset_index(drop=True)


def _histogram(y: np.ndarray, s: np.ndarray) -> pd.DataFrame:
    lo, hi = float(s.min()), float(s.max())
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, _HIST_BINS + 1)
    neg, _ = np.histogram(s[y == 0], bins=edges)
    pos, _ = np.histogram(s[y == 1], bins=edges)
    return pd.DataFrame({"left": edges[:-1], "right": edges[1:], "negatives": neg, "positives": pos})


def _clean(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
