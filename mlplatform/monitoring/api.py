"""``platform.monitoring``: PSI of live decisions against the model's training snapshot.

    report = platform.monitoring.report("underwriting", window="1d")
    report.flagged          # ["income"]: columns whose PSI is at or above the bound
    report.key              # monitoring/underwriting/reports/20260105T101500…Z (report.md, PNGs)

Reads the decision log and the training snapshot directly (Arrow on this process, no Ray):
a report compares a window of decisions with at most ``reference_rows`` training rows.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from mlplatform.errors import DataError, ModelError
from mlplatform.monitoring.drift import DEFAULT_BOUND

if TYPE_CHECKING:
    from mlplatform.models.registry import ModelRegistry
    from mlplatform.monitoring.report import MonitoringReport
    from mlplatform.storage import DatasetStore, Storage

__all__ = ["Monitoring"]

_SPLIT_COLUMN = "split"


class Monitoring:
    """Monitoring reports for registered models.

    Args:
        storage: the storage root (reports are written under ``monitoring/``).
        datasets: its datasets (the training snapshots).
        models: the model registry (versions, aliases, lineage).
        decisions: ``since → decision-log records`` (``platform.serving.decisions``).
    """

    def __init__(
        self,
        storage: Storage,
        datasets: DatasetStore,
        models: ModelRegistry,
        decisions: Callable[[datetime | None], list[dict[str, Any]]],
    ) -> None:
        self.storage = storage
        self.datasets = datasets
        self.models = models
        self._decisions = decisions

    def report(
        self,
        model: str,
        *,
        window: timedelta | str = timedelta(days=1),
        version: int | None = None,
        alias: str = "production",
        now: datetime | None = None,
        reference_split: str = "train",
        reference_rows: int = 200_000,
        bound: float = DEFAULT_BOUND,
        write: bool = True,
    ) -> MonitoringReport:
        """PSI per feature and for the score: decisions made in ``[now - window, now]`` by
        ``model`` ``version`` (default the version ``alias`` points at) against the rows of
        ``reference_split`` of the training snapshot the version's lineage names, and the
        version's scores on them. Only scored, returned decisions of that version count.

        Args:
            window: how far back from ``now`` (a timedelta, or ``"1d"``, ``"6h"`` …).
            now: the window's end (default the current time; naive is UTC).
            reference_rows: training rows used at most (a fixed-seed sample beyond that).
            bound: PSI at or above it flags a column (0.25 is the usual credit-risk bound).
            write: write the report and ``latest.json`` under the storage root.

        Raises:
            NotFoundError: no such model, version or alias, or the snapshot is gone.
            ModelError: the version's lineage names no training set, or it is not a LightGBM model.
            DataError: the window or bound is invalid, or the snapshot lacks the model's features.
        """
        from mlplatform._duration import parse_duration
        from mlplatform.monitoring.report import build_report, write_report

        try:
            span = parse_duration(window) if not isinstance(window, timedelta) else window
        except ValueError as exc:
            raise DataError(f"window: {exc}") from None
        if span <= timedelta(0):
            raise DataError(f"window must be positive, got {window!r}")
        if not 0 < bound:
            raise DataError(f"bound must be a positive PSI, got {bound!r}")
        end = (now or datetime.now(UTC)).astimezone(UTC) if (now is None or now.tzinfo) else now.replace(tzinfo=UTC)
        start = end - span
        loaded = self.models.load(model, version=version, alias=None if version is not None else alias)
        mv = loaded.version
        if mv.flavor != "lightgbm":
            raise ModelError(f"model {model} v{mv.version} is a {mv.flavor!r} model; monitoring reports cover LightGBM models")
        booster = loaded.model
        ts = mv.lineage.get("training_set") or {}
        if not ts.get("name"):
            raise ModelError(f"model {model} v{mv.version} records no training_set in its lineage; register it with one to monitor it")
        frame = self._reference(ts, booster.feature_name(), reference_split, reference_rows)
        from mlplatform.models.encoding import encode_frame

        scores = booster.predict(encode_frame(booster, frame))
        reference = {name: _values(frame[name]) for name in booster.feature_name()}
        report = build_report(
            model=model,
            version=mv.version,
            reference=reference,
            reference_scores=scores,
            records=self._decisions(start),
            window=(start, end),
            reference_name={"name": ts["name"], "version": ts.get("version"), "split": reference_split, "rows": len(frame)},
            bound=bound,
        )
        return write_report(self.storage, report) if write else report

    def _reference(self, ts: dict[str, Any], features: list[str], split: str, limit: int) -> Any:
        import numpy as np
        import pyarrow.compute as pc
        import pyarrow.dataset as pads

        from mlplatform.features.training_sets import PREFIX

        manifest = self.datasets.get(f"{PREFIX}/{ts['name']}", ts.get("version"))
        dataset = pads.dataset(self.datasets.file_paths(manifest), format="parquet", filesystem=self.storage.arrow_fs)
        missing = [f for f in features if f not in dataset.schema.names]
        if missing:
            raise DataError(f"training set {ts['name']!r} v{manifest.version} lacks the model's features {missing}")
        table = dataset.to_table(columns=features, filter=pc.field(_SPLIT_COLUMN) == split)
        if table.num_rows == 0:
            raise DataError(f"training set {ts['name']!r} v{manifest.version} has no {split!r} rows; pass reference_split")
        if table.num_rows > limit:
            table = table.take(np.sort(np.random.default_rng(0).choice(table.num_rows, size=limit, replace=False)))
        return table.to_pandas()


def _values(column: Any) -> Any:
    """A numeric column as floats (NaN missing), anything else as Python objects (None missing)."""
    import numpy as np

    if column.dtype.kind in "fiub":
        return column.to_numpy(dtype=float, na_value=np.nan) if column.dtype.kind != "b" else column.astype(object).tolist()
    return [None if v is None or (isinstance(v, float) and v != v) else v for v in column.tolist()]
