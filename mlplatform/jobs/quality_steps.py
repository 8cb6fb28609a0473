"""Data quality as a step: one line per view in a workload's console.

    runner.run(quality_step(platform.quality, platform.datasets, "applicant_history"))
    # [quality] applicant_history: 48,120 rows, 57 passed, 0 failed, 14 skipped (2.1s) -> .../quality/...json

The step validates the view's current offline data over its last backfilled range (see
``DataQuality.validate``). It is up to date while the view's definition (its expectations
included) and its offline dataset version are those of its last run, and then shows that
run's report again rather than reading the data twice. Under a ``strict`` policy a failed
check stops the job with the ``QualityError``.
"""

from __future__ import annotations

from typing import Any

from mlplatform.jobs.steps import Done, Step

__all__ = ["quality_step", "quality_steps"]


def quality_step(quality: Any, features: Any, datasets: Any, view: str) -> Step:
    """Validate ``view``'s offline data (value: the ``QualityReport``)."""
    from mlplatform.features.store import offline_dataset
    from mlplatform.quality.report import QualityReport

    target = offline_dataset(view)

    def inputs() -> dict[str, Any]:
        return {
            "view": view,
            "definition": features.registry.resolve_view(view).version,
            "offline": datasets.get(target).version if datasets.exists(target) else None,
        }

    def done(report: QualityReport) -> Done:
        return Done(summary=report.findings(), where=quality.storage.uri(report.key), output={"key": report.key},
                    value=report)

    def reuse(output: Any) -> Done | None:
        key = output.get("key") if isinstance(output, dict) else None
        if not key or not quality.storage.exists(key):
            return None
        return done(QualityReport.from_json(quality.storage.read_json(key)))

    return Step("quality", lambda: done(quality.validate(view)), target=view, inputs=inputs, reuse=reuse)


def quality_steps(quality: Any, features: Any, datasets: Any) -> list[Step]:
    """A quality step per registered daily view that declares expectations and has offline data."""
    from mlplatform.features.store import offline_dataset

    return [
        quality_step(quality, features, datasets, view.name)
        for view in features.list_feature_views()
        if view.quality is not None and not view.is_realtime and datasets.exists(offline_dataset(view.name))
    ]
