"""The feature store's operations as steps, so ``mlp run`` and the single-step commands
(``mlp apply``, ``mlp backfill``, ``mlp materialize``) share one notion of "up to date".

    runner = StepRunner(platform.storage)
    runner.run(apply_step(platform.features, definitions))
    for view in platform.features.list_feature_views():
        runner.run(backfill_step(platform.features, platform.datasets, view.name, start, end))

- ``apply`` always runs: applying unchanged definitions is itself a no-op.
- ``backfill`` of a view over ``(start, end]`` is up to date when the view's data definition
  (``data_version``), the range and the version of its source dataset are those of its last
  backfill over that range, and the offline dataset is still the version that backfill
  wrote (a backfill of another range, or new source data, makes it run again).
- ``materialize`` always runs: its incremental mode keeps its own watermark per view and
  does nothing when there is nothing new.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, date, datetime
from typing import Any

from mlplatform.errors import DataError
from mlplatform.jobs.steps import Done, Step

__all__ = ["apply_step", "backfill_step", "materialize_step"]


def apply_step(features: Any, definitions: Iterable[Any], *, force: bool = False, dry_run: bool = False) -> Step:
    """Register ``definitions`` (value: the ``ApplyResult``)."""
    definitions = list(definitions)

    def run() -> Done:
        result = features.apply(definitions, force=force, dry_run=dry_run)
        counts: dict[str, int] = {}
        for change in result.changes:
            counts[change.action] = counts.get(change.action, 0) + 1
        facts = ", ".join(f"{n} {action}" for action, n in sorted(counts.items()))
        if dry_run:
            head = "dry run"
        elif result.changed:
            head = f"revision {result.revision}"
        else:
            head = f"revision {features.registry.revision()}, no changes"
        return Done(summary=f"{head}: {facts}", where=features.registry.storage.uri("registry/features"), value=result)

    return Step("apply", run)


def backfill_step(features: Any, datasets: Any, view: str, start: Any, end: Any) -> Step:
    """Backfill ``view`` over ``(start, end]`` unless that is up to date (value: the
    ``BackfillResult``, or None when reused)."""
    from mlplatform.features.store import offline_dataset

    start_at, end_at = _instant(start, "start"), _instant(end, "end")
    target = offline_dataset(view)

    def inputs() -> dict[str, Any]:
        definition = features.registry.resolve_view(view)
        source = definition.source.dataset
        return {
            "view": view,
            "data_version": definition.data_version,
            "range": [start_at.isoformat(), end_at.isoformat()],
            "source": {source: datasets.get(source).version if datasets.exists(source) else None},
        }

    def run() -> Done:
        result = features.backfill(view, start_at, end_at)
        return Done(
            summary=f"{result.rows_in:,} events in",
            rows=result.rows_out,
            where=f"{datasets.storage.uri(target)} v{result.version.version}",
            output={"version": result.version.version},
            value=result,
        )

    def reuse(output: Any) -> Done | None:
        if not datasets.exists(target) or not isinstance(output, dict):
            return None
        current = datasets.get(target)
        if current.version != output.get("version"):
            return None
        return Done(where=f"{datasets.storage.uri(target)} v{current.version}")

    return Step("backfill", run, target=view, inputs=inputs, reuse=reuse)


def materialize_step(features: Any, end: Any, views: list[str] | None = None, start: Any = None) -> Step:
    """Load the latest feature values up to ``end`` into the online store: incrementally
    from each view's last run, or rebuilt from ``start`` (value: the ``MaterializeResult`` list)."""

    def run() -> Done:
        if start is not None:
            results = features.materialize(start, end, views)
        else:
            results = features.materialize_incremental(end, views)
        if not results:
            return Done(summary="nothing new", value=results)
        modes = sorted({r.mode for r in results})
        return Done(
            summary=f"{len(results)} views ({'/'.join(modes)})",
            rows=sum(r.rows for r in results),
            value=results,
        )

    return Step("materialize", run)


def _instant(value: Any, what: str) -> datetime:
    """A range end as an aware UTC datetime (naive = UTC; a date = its midnight)."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise DataError(f"backfill {what} {value!r} is not an ISO date or time (e.g. 2024-01-01)") from None
    if isinstance(value, date) and not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    if not isinstance(value, datetime):
        raise DataError(f"backfill {what} must be a date, time or ISO string, got {value!r}")
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
