"""Reason codes: which features pushed an applicant's score toward default, in words.

    texts = reason_texts_from_definitions(service, platform.features.registry)
    reason_codes(booster, applicants_df, reasons=texts)        # offline: a list per row
    coder = ReasonCoder(booster, texts)                         # online: build once…
    explained = coder.explain_row({"loans_90d": 3, ...})        # …then per request
    explained.reasons, explained.probability

The same code runs for the model card and for the decision endpoint, so the reasons a
customer is sent are the ones an auditor can reproduce.

Definition, per row:
  1. Contributions are LightGBM's SHAP values, ``booster.predict(X, pred_contrib=True)``, in
     log-odds; the bias (expected value) column is ignored. They are computed by
     ``treeshap.FastTreeShap`` (the same values, 2-4x faster) where the model allows, else by
     LightGBM itself.
  2. Only features with a contribution ``> 0`` (toward default) are candidates; they are
     taken in descending order of contribution, ties by the feature's position in the model.
  3. Each feature is mapped to its text ``reasons[feature]``. A feature without a text is
     skipped (it takes no slot) unless ``default_text`` is given, in which case it is
     reported under that text.
  4. Texts are deduplicated: when several features share a text, the first (largest
     contribution) is reported and the others skipped.
  5. At most ``max_reasons`` (default 4) are returned, largest first. A row with no positive
     contribution gets no reasons.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from mlplatform.errors import DataError, ModelError
from mlplatform.models.encoding import encode_frame, encode_values, is_missing, model_info
from mlplatform.models.treeshap import FastTreeShap

if TYPE_CHECKING:
    import lightgbm
    import pandas as pd

    from mlplatform.features.definitions import FeatureService

__all__ = ["Explained", "Reason", "ReasonCoder", "reason_codes", "reason_texts_from_definitions"]

MAX_REASONS = 4


@dataclass(frozen=True, slots=True)
class Reason:
    """One reason: the feature, its customer-facing text, how far it pushed the score toward
    default (log-odds) and the feature's value (None when missing)."""

    feature: str
    text: str
    contribution: float
    value: Any


class Explained(NamedTuple):
    """One row explained: its reasons and its raw score (the sum of all contributions)."""

    reasons: list[Reason]
    raw_score: float

    @property
    def probability(self) -> float:
        """``sigmoid(raw_score)``: the predicted probability for a binary-logistic model."""
        return 1.0 / (1.0 + math.exp(-self.raw_score))


def reason_codes(
    booster: lightgbm.Booster,
    features: pd.DataFrame | Mapping[str, Any],
    *,
    reasons: Mapping[str, str],
    max_reasons: int = MAX_REASONS,
    default_text: str | None = None,
) -> list[list[Reason]]:
    """The reasons for each row (see the module docstring for the exact rule).

        reason_codes(booster, df, reasons={"missed_installments_90d": "Missed payments in the last 90 days"})
        # [[Reason(feature='missed_installments_90d', text='Missed payments…', contribution=0.83, value=2.0)], …]

    Args:
        booster: a binary LightGBM model.
        features: a DataFrame holding (at least) the model's features, or one row as a mapping
            feature → value (the fast path for serving).
        reasons: feature name → customer-facing text (``reason_texts_from_definitions``).
        max_reasons: at most this many reasons per row.
        default_text: the text for features without one; None skips them.

    Returns:
        One list of ``Reason`` per row, in row order, largest contribution first.

    Raises:
        DataError: a model feature is missing from ``features``.
        ModelError: the model is not a single-output (binary) model.
    """
    coder = ReasonCoder(booster, reasons, max_reasons=max_reasons, default_text=default_text)
    if isinstance(features, Mapping):
        return [coder.explain_row(features).reasons]
    return coder.explain(features)


class ReasonCoder:
    """Reason codes for one model and one set of texts, prepared once and reused per request.

    What depends only on the model (feature order, categorical encodings) is computed once per
    booster and cached; a coder itself costs a dict lookup per feature to build.
    """

    def __init__(
        self,
        booster: lightgbm.Booster,
        reasons: Mapping[str, str],
        *,
        max_reasons: int = MAX_REASONS,
        default_text: str | None = None,
    ) -> None:
        if max_reasons < 1:
            raise ModelError(f"max_reasons must be at least 1, got {max_reasons}")
        self.booster = booster
        self.max_reasons = max_reasons
        self._model = model_info(booster)
        self._texts = [reasons.get(name, default_text) for name in self._model.names]
        self._shap = FastTreeShap.for_booster(booster)  # built once per booster, then cached

    @property
    def feature_names(self) -> list[str]:
        return list(self._model.names)

    def explain_row(self, row: Mapping[str, Any]) -> Explained:
        """Reasons and raw score for one row given as ``{feature: value}`` (extra keys ignored;
        None or NaN is a missing value).

        Raises:
            DataError: a model feature is not a key of ``row``.
        """
        names = self._model.names
        try:
            values = [row[name] for name in names]
        except KeyError:
            missing = [n for n in names if n not in row]
            raise DataError(f"the row lacks model features {missing}; pass None for a missing value") from None
        x = encode_values(self._model, values)
        contrib = self._contributions(x)[0]
        return Explained(self._rank(contrib, values), float(contrib.sum()))

    def explain_encoded(self, x: np.ndarray, rows: Sequence[Mapping[str, Any]]) -> list[Explained]:
        """``explain_row`` for many rows in one ``pred_contrib`` call: ``x`` holds the rows
        already encoded the way ``explain_row`` encodes one (``encoding.encode_features``, as the
        decision service scores them) and ``rows`` the same rows as ``{feature: value}``, whose
        values the reasons report."""
        if len(x) != len(rows):
            raise DataError(f"{len(x)} encoded rows but {len(rows)} rows of values")
        if not len(rows):
            return []
        contrib = self._contributions(x)
        names = self._model.names
        return [Explained(self._rank(c, [row[n] for n in names]), float(c.sum())) for c, row in zip(contrib, rows)]

    def explain(self, features: pd.DataFrame) -> list[list[Reason]]:
        """Reasons for every row of a DataFrame (its other columns are ignored)."""
        missing = [n for n in self._model.names if n not in features.columns]
        if missing:
            raise DataError(f"features lack model columns {missing}; they have {list(features.columns)}")
        x = self.matrix(features)
        contrib = self._contributions(x, threads=None)
        frame = features[self._model.names]
        values = frame.astype(object).where(frame.notna(), None).to_numpy()
        return [self._rank(contrib[i], values[i]) for i in range(len(x))]

    def matrix(self, features: pd.DataFrame) -> np.ndarray:
        """The model's input matrix (``mlplatform.models.encoding.encode_frame``), encoded
        exactly as ``explain_row`` encodes one row."""
        return encode_frame(self.booster, features)

    def _contributions(self, x: np.ndarray, threads: int | None = 1) -> np.ndarray:
        """SHAP values of the encoded rows ``x``: (rows, features + 1), the last column the bias."""
        if self._shap is not None:
            return self._shap.contributions(x)
        if threads is None:
            return self.booster.predict(x, pred_contrib=True)
        return self.booster.predict(x, pred_contrib=True, num_threads=threads)

    def _rank(self, contrib: np.ndarray, values: Sequence[Any]) -> list[Reason]:
        features = contrib[:-1]  # the last column is the bias (expected value)
        positive = np.flatnonzero(features > 0)
        order = positive[np.argsort(-features[positive], kind="stable")]
        out: list[Reason] = []
        seen: set[str] = set()
        for j in order.tolist():
            text = self._texts[j]
            if text is None or text in seen:
                continue
            seen.add(text)
            out.append(Reason(self._model.names[j], text, float(features[j]), _plain(values[j])))
            if len(out) == self.max_reasons:
                break
        return out


def reason_texts_from_definitions(
    features: FeatureService | Iterable[str], registry: Any, *, full_feature_names: bool = False
) -> dict[str, str]:
    """Map the model's feature columns to the ``reason`` texts of their registered definitions.

        texts = reason_texts_from_definitions(["applicant_history:missed_installments_90d"],
                                              platform.features.registry)
        # {"missed_installments_90d": "Missed payments in the last 90 days"}

    Args:
        features: a ``FeatureService`` or ``"view:feature"`` references.
        registry: the feature registry (``platform.features.registry``).
        full_feature_names: key by ``view__feature`` (as training sets built with
            ``full_feature_names=True`` name their columns) instead of ``feature``.

    Returns:
        Column → text for every feature that has a reason; features without one are left out
        (``reason_codes`` then skips them).

    Raises:
        DefinitionError / NotFoundError: a reference is malformed or names an unknown view or feature.
    """
    from mlplatform.features.definitions import parse_ref

    refs = getattr(features, "features", features)
    out: dict[str, str] = {}
    views: dict[str, Any] = {}
    for ref in refs:
        view_name, feature = parse_ref(ref)
        if view_name not in views:
            views[view_name] = registry.resolve_view(view_name)
        text = views[view_name].feature(feature).reason
        if text:
            out[f"{view_name}__{feature}" if full_feature_names else feature] = text
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    return None if is_missing(value) else value
