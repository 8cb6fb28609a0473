"""The promotion gate's comparison: a candidate and the production version scored on the same
out-of-time rows, three figures against their bounds.

    evaluator = PromotionEvaluator(datasets, config.models.promotion_gate)
    registry = ModelRegistry(storage, evaluate_promotion=evaluator)      # Platform wires this
    registry.promote("underwriting", 7)                                   # calls evaluator(...)

What is compared, on which rows, and every bound is stated in ``mlplatform.models.gate`` (the
gate's flow: what moves, what is recorded, the refusal). This part reads the training set and
computes the figures, so the registry depends on neither the datasets nor the metrics.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from mlplatform.errors import DataError, ModelError, NotFoundError
from mlplatform.models.gate import GATED_ALIAS, GateCheck, PromotionDecision

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

    from mlplatform.config import PromotionGateConfig
    from mlplatform.models.registry import ModelRegistry
    from mlplatform.storage import DatasetStore

__all__ = ["PromotionEvaluator", "compare_scores"]

_SPLIT_COLUMN = "split"  # the column save_training_set tags splits in
_TRAINING_SETS = "training_sets"  # the dataset prefix save_training_set publishes under
_FLOAT_TYPES = ("FP16", "FP32", "FP64")
_PROBABILITY = "probability"


class PromotionEvaluator:
    """``evaluator(registry, name, candidate, production) -> PromotionDecision``: the gate's
    comparison (see ``mlplatform.models.gate``).

    Args:
        datasets: the versioned datasets the candidate's training set is read from (no Ray:
            one Arrow read of the split's files).
        config: the gate's bounds and evidence size.
    """

    def __init__(self, datasets: DatasetStore, config: PromotionGateConfig) -> None:
        self.datasets = datasets
        self.config = config

    def __repr__(self) -> str:
        return f"PromotionEvaluator({self.config!r})"

    def __call__(self, registry: ModelRegistry, name: str, version: int, production: int) -> PromotionDecision:
        base = {"model": name, "version": version, "alias": GATED_ALIAS, "production": production}
        try:
            predictors = {v: registry.load_predictor(name, version=v)[1] for v in (version, production)}
            rows, evidence = _rows(registry, self.datasets, self.config, name, version, predictors.values())
            label = evidence.pop("label")
            scores = {v: _score(predictor, name, v, rows) for v, predictor in predictors.items()}
            y = rows.column(label).to_numpy(zero_copy_only=False)
            checks = compare_scores(y, scores[version], scores[production], self.config)
        except (DataError, ModelError, NotFoundError) as exc:
            return PromotionDecision(**base, passed=False, problem=str(exc))
        return PromotionDecision(**base, passed=all(c.passed for c in checks), checks=checks, evidence=evidence)


def compare_scores(
    label: Sequence[Any], candidate: Sequence[float], production: Sequence[float], config: PromotionGateConfig
) -> tuple[GateCheck, ...]:
    """The gate's three checks on scores of the same rows (see the module doc).

    Raises:
        DataError: lengths differ, labels are not 0/1 or hold one class, or scores are not finite.
    """
    import numpy as np

    from mlplatform.evaluation.metrics import auc, psi

    y = np.asarray(label, dtype=float)
    cand, prod = np.asarray(candidate, dtype=float), np.asarray(production, dtype=float)
    if not (len(y) == len(cand) == len(prod)):
        raise DataError(f"labels and scores differ in length: {len(y)}, {len(cand)}, {len(prod)}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise DataError("labels must be 0 or 1")
    if not (np.isfinite(cand).all() and np.isfinite(prod).all()):
        raise DataError("scores must be finite")
    rate = float(y.mean()) if len(y) else float("nan")
    if not 0 < rate < 1:
        raise DataError(f"the rows hold one class only (default rate {rate:.4f}): AUC and calibration are undefined")
    auc_c, auc_p = auc(y, cand), auc(y, prod)
    change = auc_c - auc_p
    shift = psi(prod, cand)
    cal_c, cal_p = abs(float(cand.mean()) / rate - 1), abs(float(prod.mean()) / rate - 1)
    ok = {
        "auc": change >= -config.auc_margin,
        "score_psi": shift <= config.max_score_psi,
        "calibration": cal_c <= config.max_calibration_error,
    }

    def verdict(name: str) -> str:
        return "ok" if ok[name] else "FAIL"

    return (
        GateCheck(
            "auc", change, -config.auc_margin, ok["auc"],
            f"out-of-time AUC: candidate {auc_c:.4f} vs production {auc_p:.4f}, change {change:+.4f} "
            f"(allowed down to {-config.auc_margin:+.4f}) {verdict('auc')}",
        ),
        GateCheck(
            "score_psi", shift, config.max_score_psi, ok["score_psi"],
            f"score PSI candidate vs production on the same rows: {shift:.4f} (bound {config.max_score_psi:.4f}) "
            f"{verdict('score_psi')}",
        ),
        GateCheck(
            "calibration", cal_c, config.max_calibration_error, ok["calibration"],
            f"calibration |mean score / default rate - 1|: candidate {cal_c:.4f} (mean {cand.mean():.4f} vs rate "
            f"{rate:.4f}), production {cal_p:.4f} (bound {config.max_calibration_error:.4f}) {verdict('calibration')}",
        ),
    )


# ---------------------------------------------------------------------------- evidence


def _rows(
    registry: ModelRegistry, datasets: DatasetStore, config: PromotionGateConfig, name: str, version: int, predictors: Iterable[Any]
) -> tuple[pa.Table, dict[str, Any]]:
    """The latest ``max_rows`` rows of the candidate's out-of-time split, with every column
    either version needs, the label and the timestamp."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    candidate = registry.get(name, version=version)
    ts = candidate.lineage.get("training_set") or {}
    if not ts.get("name") or not ts.get("label") or not ts.get("timestamp_column"):
        raise ModelError(f"model {name!r} v{version} records no training_set (name, label, timestamp) in its lineage")
    needed: list[str] = []
    for predictor in predictors:
        for spec in predictor.signature.inputs:
            if spec.name not in needed:
                needed.append(spec.name)
    label, stamp = ts["label"], ts["timestamp_column"]
    manifest = datasets.get(f"{_TRAINING_SETS}/{ts['name']}", ts.get("version"))
    dataset = pads.dataset(datasets.file_paths(manifest), format="parquet", filesystem=datasets.storage.arrow_fs)
    columns = list(dict.fromkeys([*needed, label, stamp]))
    missing = [c for c in [*columns, _SPLIT_COLUMN] if c not in dataset.schema.names]
    if missing:
        raise DataError(f"training set {ts['name']!r} v{manifest.version} lacks columns {missing} that the versions need")
    table = dataset.to_table(columns=columns, filter=pc.field(_SPLIT_COLUMN) == config.split)
    if table.num_rows > config.max_rows:
        order = np.argsort(pc.cast(table.column(stamp), "int64").to_numpy(zero_copy_only=False), kind="stable")
        table = table.take(order[-config.max_rows :])
    if table.num_rows < config.min_rows:
        raise DataError(
            f"split {config.split!r} of training set {ts['name']!r} v{manifest.version} has {table.num_rows} rows; "
            f"the gate needs at least {config.min_rows}"
        )
    times = table.column(stamp)
    evidence = {
        "training_set": ts["name"],
        "training_set_version": manifest.version,
        "split": config.split,
        "rows": table.num_rows,
        "first": str(pc.min(times).as_py()),
        "last": str(pc.max(times).as_py()),
        "label": label,
    }
    return table, evidence


def _score(predictor: Any, name: str, version: int, rows: pa.Table) -> np.ndarray:
    import numpy as np

    outputs = predictor.predict({spec.name: _column(spec, rows.column(spec.name)) for spec in predictor.signature.inputs})
    if _PROBABILITY not in outputs:
        raise ModelError(f"model {name!r} v{version} has no {_PROBABILITY!r} output to compare (outputs: {sorted(outputs)})")
    return np.asarray(outputs[_PROBABILITY], dtype=float).reshape(-1)


def _column(spec: Any, column: Any) -> np.ndarray:
    """A table column as a model input of shape ``[-1]``: numbers (and bools) as float64 with
    null as NaN (LightGBM's missing value), strings as objects with null as None, integers as
    they are; the predictor casts within the kind. (Batch scoring's ``arrow_inputs`` does the
    same and more; the gate stays out of the batch part so no import cycle forms.)"""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if list(spec.shape) != [-1]:
        raise ModelError(f"the gate compares models whose inputs are table columns; input {spec.name!r} has shape {list(spec.shape)}")
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if spec.datatype in _FLOAT_TYPES:
        if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_boolean(column.type) or pa.types.is_null(column.type)):
            raise DataError(f"column {spec.name!r} holds {column.type}; the model's input {spec.name!r} ({spec.datatype}) needs numbers")
        return pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
    if spec.datatype == "BYTES":
        return np.asarray(column.to_pylist(), dtype=object)
    if column.null_count:
        raise DataError(f"column {spec.name!r} has nulls, which the model's input type {spec.datatype} cannot hold")
    return column.to_numpy(zero_copy_only=False)
