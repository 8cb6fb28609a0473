"""Model input encoding: how feature values become a LightGBM model's input matrix. One rule
for the decision service, replay, reason codes and batch scoring, so that a score can be
recomputed exactly wherever it was made.

    x = encode_features(booster, {"loans_90d": 2.0, "category": "travel", "income": None})
    p = float(booster.predict(x)[0])
    x = encode_frame(booster, features_df)          # many rows, the same rule column-wise

The rule: columns in ``booster.feature_name()`` order; None, NaN and pandas' NA/NaT are
missing (NaN); a feature trained as a pandas categorical is coded as its position in the
model's category list (``pandas_categorical``), and a value not in that list is missing, as
LightGBM's pandas path codes it; every other value must be a number.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from mlplatform.errors import DataError, ModelError

if TYPE_CHECKING:
    import lightgbm
    import pandas as pd

__all__ = ["ModelInfo", "encode_features", "encode_frame", "encode_values", "is_missing", "model_info"]


class ModelInfo(NamedTuple):
    """What encoding needs of a model: its feature names, and per categorical feature index
    the ``{category: code}`` it was trained with."""

    names: list[str]
    categories: dict[int, dict[Any, int]]


_INFO: weakref.WeakKeyDictionary[Any, ModelInfo] = weakref.WeakKeyDictionary()


def model_info(booster: lightgbm.Booster) -> ModelInfo:
    """The booster's ``ModelInfo`` (computed once per booster, then cached).

    Raises:
        ModelError: the model has more than one output per iteration (not a binary model), or
            its categorical features cannot be matched to its category lists.
    """
    info = _INFO.get(booster)
    if info is None:
        if booster.num_model_per_iteration() != 1:
            raise ModelError(
                f"reason codes need a single-output (binary) model; this one has "
                f"{booster.num_model_per_iteration()} outputs per iteration"
            )
        info = ModelInfo(list(booster.feature_name()), _categories(booster))
        _INFO[booster] = info
    return info


def is_missing(value: Any) -> bool:
    """None, NaN, and pandas' NA / NaT (compared by type name so pandas need not be imported)."""
    return value is None or (isinstance(value, float) and math.isnan(value)) or type(value).__name__ in ("NAType", "NaTType")


def encode_values(info: ModelInfo, values: Sequence[Any]) -> np.ndarray:
    """One row given as values in ``info.names`` order, as a ``(1, n_features)`` float matrix.

    Raises:
        DataError: a numeric feature's value is not a number (the message names the feature).
    """
    names, categories = info.names, info.categories
    x = np.empty((1, len(names)))
    for j, value in enumerate(values):
        if is_missing(value):
            x[0, j] = np.nan
            continue
        cats = categories.get(j)
        try:
            x[0, j] = cats.get(value, np.nan) if cats is not None else value  # unseen category: missing
        except (TypeError, ValueError):
            raise DataError(f"feature {names[j]!r} has value {value!r}, which is not a number") from None
    return x


def encode_features(booster: lightgbm.Booster, features: Mapping[str, Any]) -> np.ndarray:
    """One row given as ``{feature: value}`` (extra keys ignored) as the model's
    ``(1, n_features)`` float matrix.

    Raises:
        DataError: ``features`` is not a mapping, lacks a model feature (pass None for a
            missing value), or a numeric feature's value is not a number.
    """
    info = model_info(booster)
    if not isinstance(features, Mapping):
        raise DataError(f"features must be a mapping of feature name to value, got {type(features).__name__}")
    missing = [n for n in info.names if n not in features]
    if missing:
        raise DataError(f"the features lack model features {missing}; a missing value is logged as null")
    return encode_values(info, [features[name] for name in info.names])


def encode_frame(booster: lightgbm.Booster, features: pd.DataFrame) -> np.ndarray:
    """Every row of a DataFrame (its other columns ignored) as the model's input matrix.

    Raises:
        DataError: a model feature is not a column.
        ValueError: a numeric column holds something that is not a number.
    """
    import pandas as pd

    info = model_info(booster)
    missing = [n for n in info.names if n not in features.columns]
    if missing:
        raise DataError(f"features lack model columns {missing}; they have {list(features.columns)}")
    x = np.empty((len(features), len(info.names)))
    for j, name in enumerate(info.names):
        column = features[name]
        cats = info.categories.get(j)
        if cats is not None:
            codes = pd.Categorical(column, categories=list(cats)).codes.astype(float)
            codes[codes < 0] = np.nan
            x[:, j] = codes
        else:
            x[:, j] = pd.to_numeric(column, errors="raise").to_numpy(dtype=float, na_value=np.nan)
    return x


def _categories(booster: Any) -> dict[int, dict[Any, int]]:
    """Encodings of features trained as pandas categoricals: LightGBM stores each one's
    category list (``pandas_categorical``) in the order of the model's categorical features,
    and codes a value as its position in that list."""
    lists = getattr(booster, "pandas_categorical", None)
    if not lists:
        return {}
    names = list(booster.feature_name())
    text = booster.model_to_string(num_iteration=1)
    declared = next((line for line in text.splitlines() if line.startswith("[categorical_feature: ")), None)
    if declared is not None:
        # The training parameters: indices "1,4", or "name:a,b" when given by name.
        value = declared[len("[categorical_feature: ") : -1]
        items = value.removeprefix("name:").split(",")
        categorical = sorted(names.index(i) if value.startswith("name:") else int(i) for i in items if i)
    else:
        # Numeric features read "[min:max]" (or "none" when unused); categorical ones list codes "1:5:7".
        infos = next(line for line in text.splitlines() if line.startswith("feature_infos="))
        categorical = [j for j, i in enumerate(infos.split("=", 1)[1].split(" ")) if i != "none" and not i.startswith("[")]
    if len(categorical) != len(lists):
        raise ModelError(
            f"cannot match the model's {len(categorical)} categorical features to its {len(lists)} pandas category lists"
        )
    return {j: {cat: code for code, cat in enumerate(cats)} for j, cats in zip(categorical, lists, strict=True)}
