"""``platform.quality``: validate a view's data against its expectations, and the gate the
feature store calls before it publishes anything.

    report = platform.quality.validate("applicant_history", start="2024-06-01", end="2024-07-01")
    print(report.line())      # applicant_history: 12,040 rows, 57 passed, 0 failed, 14 skipped
    platform.quality.reports("applicant_history")[-1]

Where validation runs, and what a ``strict`` failure stops:

* **backfill**: the rows the range computed are profiled as they stream to the staged write
  (the same pass, no second read); a strict failure leaves the staged files uncommitted, so
  the previous offline version stays current.
* **materialize**: the offline rows of the window to be loaded are profiled *before* the
  online generation begins (one read of just those rows). Checking before any write is what
  keeps an incremental run (upserts into the current generation, which cannot be undone)
  safe; a strict failure writes nothing online.
* **training sets**: the joined rows are profiled per view before the snapshot is published;
  the reports' summaries are kept with the snapshot (and so in a model's lineage and card).

Each validation is written as one JSON report under ``quality/<view>/`` of the storage root
(created atomically, never overwritten) and logged as one line on ``mlplatform.quality``.
Profiling is a Ray Data ``map_batches`` over Arrow batches whose partial profiles merge in
any order (:mod:`mlplatform.quality.profile`): memory per worker is one batch, and nothing
is shuffled. We chose that over ``Dataset.aggregate`` with custom aggregations because the
backfill's rows can only be seen once, as they stream to the write; an aggregation would
need them read twice.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from mlplatform.errors import DataError, NotFoundError, QualityError
from mlplatform.quality.checks import evaluate
from mlplatform.quality.profile import ColumnSpec, ProfileSpec, empty, merge, profile_table
from mlplatform.quality.report import QualityReport

if TYPE_CHECKING:
    import ray.data

    from mlplatform.features.definitions import FeatureView
    from mlplatform.models.registry import ModelRegistry
    from mlplatform.storage import DatasetStore, Storage

__all__ = ["DataQuality", "GatePlan"]

log = logging.getLogger(__name__)
PREFIX = "quality"
_REFERENCES = f"{PREFIX}/_references"
_EVENT_TIMESTAMP = "event_timestamp"


@dataclass(frozen=True)
class GatePlan:
    """What to profile for one view and what to compare drift with."""

    view: FeatureView
    spec: ProfileSpec
    reference: dict[str, Any] | None


class DataQuality:
    """Validation of feature data against the expectations declared with each view.

    Args:
        storage: where reports (``quality/<view>/``) and reference profiles are kept.
        datasets: the offline datasets and training-set snapshots read.
        models: the model registry (or a callable returning it): the production model's
            training set is the drift reference.
        connect_ray: connects to Ray and returns the module.
        resolve_view: a registered view by name (the feature store's ``resolve_view``).
    """

    def __init__(
        self,
        storage: Storage,
        datasets: DatasetStore,
        *,
        models: ModelRegistry | Callable[[], ModelRegistry],
        connect_ray: Callable[[], Any],
        resolve_view: Callable[[str], Any],
    ) -> None:
        self.storage = storage
        self.datasets = datasets
        self._models = models if callable(models) and not hasattr(models, "names") else (lambda: models)
        self._connect_ray = connect_ray
        self._resolve_view = resolve_view

    # ------------------------------------------------------------------------ public
    def validate(self, view: str, *, start: Any = None, end: Any = None) -> QualityReport:
        """Check the view's offline rows with ``start < event_timestamp <= end`` against its
        expectations, record the report and return it.

        ``end`` defaults to the end of the view's last backfill (its offline dataset's
        metadata), else now; it is also what staleness is measured against.

        Raises:
            NotFoundError: the view is not registered. DataError: it has no offline data or
                declares no expectations. QualityError: a check failed and the policy is strict.
        """
        from mlplatform.features.definitions import FeatureView
        from mlplatform.features.store import offline_dataset
        from mlplatform.timestamps import parse_instant

        definition = self._resolve_view(view)
        if not isinstance(definition, FeatureView):
            raise DataError(f"{view!r} is an on-demand view: it has no stored data to validate")
        name = offline_dataset(definition.name)
        if not self.datasets.exists(name):
            raise DataError(f"feature view {view!r} has no offline data to validate; backfill it first")
        manifest = self.datasets.get(name)
        start_at = None if start is None else parse_instant(start, "validate start")
        if end is not None:
            end_at = parse_instant(end, "validate end")
        elif manifest.metadata.get("end"):
            end_at = parse_instant(manifest.metadata["end"], "offline end")
        else:
            end_at = datetime.now(UTC)
        plan = self.plan(definition)
        if plan is None:
            raise DataError(f"feature view {view!r} declares no quality expectations (FeatureView(quality=...))")
        return self.check_offline(plan, manifest, start_at, end_at, stage="validate")

    def reports(self, view: str) -> list[QualityReport]:
        """Every recorded report of ``view``, oldest first."""
        names = [n for n in self.storage.list(f"{PREFIX}/{view}") if n.endswith(".json")]
        return [QualityReport.from_json(self.storage.read_json(f"{PREFIX}/{view}/{n}")) for n in names]

    def latest(self, view: str, stage: str | None = None) -> QualityReport | None:
        """The newest report of ``view`` (of ``stage``, if given), or None."""
        for name in reversed([n for n in self.storage.list(f"{PREFIX}/{view}") if n.endswith(".json")]):
            if stage is None or name[:-5].endswith(f"-{stage}"):
                return QualityReport.from_json(self.storage.read_json(f"{PREFIX}/{view}/{name}"))
        return None

    # ------------------------------------------------------- the feature store's gate
    def plan(self, view: FeatureView, columns: list[str] | None = None) -> GatePlan | None:
        """What validating ``view`` measures, or None when it declares no expectations.

        ``columns``: the columns of a training set (features may be named ``view__feature``;
        rows where the view had no value are left out, see ``ProfileSpec``); by default, the
        view's own offline rows, where a feature's column is its name."""
        if view.quality is None:
            return None
        # drift is measured on training sets only (see checks._NOT_COMPARABLE)
        reference = self._reference(view) if columns is not None else None
        specs = []
        for f in view.features:
            expect = view.quality.for_feature(f.name)
            column = f.name
            if columns is not None and f"{view.name}__{f.name}" in columns:
                column = f"{view.name}__{f.name}"
            if columns is not None and column not in columns:
                continue  # a training set holds only the features its service names
            ref = (reference or {}).get("features", {}).get(f.name)
            specs.append(ColumnSpec(
                feature=f.name, column=column, dtype=f.dtype,
                min=expect.min if expect else None, max=expect.max if expect else None,
                allowed=expect.allowed if expect else None,
                edges=tuple(ref["edges"]) if ref and expect and expect.max_psi is not None else None,
            ))
        spec = ProfileSpec(columns=specs, timestamp=_EVENT_TIMESTAMP, skip_uncovered=columns is not None)
        return GatePlan(view, spec, reference)

    def observe(self, ds: ray.data.Dataset, plan: GatePlan) -> tuple[ray.data.Dataset, Callable[[], dict[str, Any]]]:
        """``ds`` unchanged, profiled as its batches pass (in the pass that consumes it), and
        a function that returns the merged profile once that pass has run."""
        ray = self._connect_ray()
        sink = ray.remote(num_cpus=0)(_Sink).remote(plan.spec)
        spec = plan.spec

        def observed(batch: Any) -> Any:
            import ray as ray_

            began = time.process_time()
            partial = profile_table(batch, spec)
            partial["seconds"] = time.process_time() - began
            ray_.get(sink.add.remote(partial))
            return batch

        out = ds.map_batches(observed, batch_format="pyarrow", batch_size=None, zero_copy_batch=True)
        return out, lambda: ray.get(sink.total.remote())

    def profile(self, ds: ray.data.Dataset, plan: GatePlan, start: datetime | None = None,
                end: datetime | None = None) -> dict[str, Any]:
        """The profile of ``ds`` (rows with ``start < event_timestamp <= end`` when given), in
        one streaming pass."""
        import json

        import pyarrow as pa

        spec = plan.spec

        def partial(batch: pa.Table) -> pa.Table:
            began = time.process_time()
            profile = profile_table(_in_range(batch, start, end), spec)
            profile["seconds"] = time.process_time() - began
            return pa.table({"p": [json.dumps(profile)]})

        total = empty(spec)
        for row in ds.map_batches(partial, batch_format="pyarrow", batch_size=None).iter_rows():
            total = merge(total, json.loads(row["p"]))
        return total

    def check_offline(self, plan: GatePlan, manifest: Any, start: datetime | None, end: datetime, *,
                      stage: str, partitions: Any = None) -> QualityReport:
        """Profile the offline rows of ``manifest`` in ``(start, end]`` and check them."""
        self._connect_ray()
        columns = [c.column for c in plan.spec.columns] + [_EVENT_TIMESTAMP]
        known = _schema_names(manifest.schema)
        if known is not None:
            columns = [c for c in columns if c in known]
        ds = self.datasets.read(manifest.name, manifest.version, columns=columns, partitions=partitions)
        profile = self.profile(ds, plan, start, end)
        return self.check(plan, profile, stage=stage, start=start, end=end)

    def check(self, plan: GatePlan, profile: dict[str, Any], *, stage: str, start: datetime | None,
              end: datetime | None) -> QualityReport:
        """Evaluate ``profile``, record the report and log its line; under ``strict``, raise
        ``QualityError`` when a check failed (the caller then publishes nothing)."""
        view = plan.view
        assert view.quality is not None
        dtypes = {c.feature: c.dtype for c in plan.spec.columns}
        training = plan.spec.skip_uncovered
        checks = evaluate(view.quality, dtypes, profile, reference=plan.reference,
                          end=None if training else end, drift=training)
        now = datetime.now(UTC)
        report = QualityReport(
            view=view.name, stage=stage, policy=view.quality.policy, rows=profile["rows"],
            created_at=now.isoformat(), start=start.isoformat() if start else None,
            end=end.isoformat() if end else None, checks=checks, uncovered=profile.get("uncovered", 0),
            profile_seconds=round(profile.get("seconds", 0.0), 4),
            reference={k: v for k, v in plan.reference.items() if k != "features"} if plan.reference else None,
        )
        report = self._write(report, now)
        level = logging.WARNING if not report.passed else logging.INFO
        log.log(level, "quality (%s) %s", stage, report.line())
        if not report.passed and view.quality.policy == "strict":
            failed = report.failed
            more = f"; {len(failed) - 1} more failed" if len(failed) > 1 else ""
            raise QualityError(
                f"{stage} of feature view {view.name!r} refused (quality policy strict): {failed[0].describe()}{more}; "
                f"nothing was published, the previous version stays current; report: {self.storage.uri(report.key)}"
            )
        return report

    # ---------------------------------------------------------------------- internals
    def _write(self, report: QualityReport, now: datetime) -> QualityReport:
        from dataclasses import replace

        stamp = now.strftime("%Y%m%dT%H%M%S%fZ")
        for attempt in range(100):
            key = f"{PREFIX}/{report.view}/{stamp}{attempt:02d}-{report.stage}.json"
            stored = replace(report, key=key)
            if self.storage.create_json(key, stored.to_json()):
                return stored
        raise DataError(f"could not record a quality report for {report.view!r}: every key was taken")

    def _reference(self, view: FeatureView) -> dict[str, Any] | None:
        """The drift reference: the training set of the production model that uses ``view``
        (the first such model by name), as decile edges and shares per feature with a
        ``max_psi``; None when no production model uses the view."""
        wanted = [f.name for f in view.features if (e := view.quality.for_feature(f.name)) and e.max_psi is not None] \
            if view.quality else []
        if not wanted:
            return None
        models = self._models()
        for name in models.names():
            version = models.aliases(name).get("production")
            if version is None:
                continue
            ts = models.get(name, version=version).lineage.get("training_set") or {}
            used = {r.split(":", 1)[1] for r in ts.get("features", []) if r.split(":", 1)[0] == view.name}
            if not used or not ts.get("name"):
                continue
            meta = {"model": name, "model_version": version, "training_set": f"{ts['name']} v{ts['version']}"}
            return {**meta, "features": self._reference_bins(view.name, ts, sorted(used & set(wanted)))}
        return None

    def _reference_bins(self, view: str, ts: dict[str, Any], features: list[str]) -> dict[str, Any]:
        import numpy as np
        import pyarrow.compute as pc

        from mlplatform.evaluation.metrics import decile_bins, decile_edges

        key = f"{_REFERENCES}/{ts['name']}/{int(ts['version']):012d}/{view}.json"
        try:
            cached = self.storage.read_json(key)
            if set(features) <= set(cached):
                return cached
        except NotFoundError:
            cached = {}
        dataset = f"training_sets/{ts['name']}"
        names = _schema_names(self.datasets.get(dataset, ts["version"]).schema) or []
        columns = {f: (f"{view}__{f}" if f"{view}__{f}" in names else f) for f in features}
        read = [c for c in columns.values() if c in names] + (["split"] if "split" in names else [])
        table = self.datasets.read_table(dataset, ts["version"], columns=read)
        if "split" in names:  # the model learnt from the train split
            table = table.filter(pc.equal(table.column("split"), "train"))
        out = dict(cached)
        for feature, column in columns.items():
            if column not in table.column_names:
                continue
            values = table.column(column).to_numpy(zero_copy_only=False).astype(float)
            values = values[np.isfinite(values)]
            if not len(values):
                continue
            edges = decile_edges(values)
            counts = np.bincount(decile_bins(values, edges), minlength=len(edges) + 1)
            out[feature] = {"edges": edges.tolist(), "shares": (counts / len(values)).tolist()}
        self.storage.write_json(key, out)
        return out


class _Sink:
    """Partial profiles merged as the tasks that computed them report (a tiny actor)."""

    def __init__(self, spec: ProfileSpec) -> None:
        self._total = empty(spec)

    def add(self, partial: dict[str, Any]) -> None:
        self._total = merge(self._total, partial)

    def total(self) -> dict[str, Any]:
        return self._total


def _in_range(batch: Any, start: datetime | None, end: datetime | None) -> Any:
    import pyarrow as pa
    import pyarrow.compute as pc

    if (start is None and end is None) or _EVENT_TIMESTAMP not in batch.schema.names:
        return batch
    ts = batch.column(_EVENT_TIMESTAMP)
    ts = ts.cast(pa.timestamp("us", tz="UTC")) if ts.type.tz is not None else ts.cast(pa.timestamp("us")).cast(
        pa.timestamp("us", tz="UTC"))
    keep = None
    if start is not None:
        keep = pc.greater(ts, pa.scalar(start, pa.timestamp("us", tz="UTC")))
    if end is not None:
        upper = pc.less_equal(ts, pa.scalar(end, pa.timestamp("us", tz="UTC")))
        keep = upper if keep is None else pc.and_(keep, upper)
    return batch.filter(keep)


def _schema_names(text: str) -> list[str] | None:
    if not text:
        return None
    import pyarrow as pa

    return list(pa.ipc.read_schema(pa.py_buffer(base64.b64decode(text))).names)
