"""What each kind of step does inside its Ray job (``mlp pipeline step FILE STEP --ds DS``).

Workload kinds run the pipeline's workload's own steps (those ``mlp run`` runs), with the
pipeline's ``overrides`` rendered for the day (e.g. ``data.end: "{{ next_ds }}"``), through
the same :class:`~mlplatform.jobs.steps.StepRunner`, so a step already up to date is reused:

====================  ==========================================================
kind                  workload steps (``params.steps`` replaces the list)
====================  ==========================================================
generate              generate
backfill              apply, event log, backfill
materialize           materialize
train, tune           training set, train
workload              ``params.steps`` (required)
====================  ==========================================================

The other kinds use the platform directly:

- ``validate``: ``platform.quality.validate(view, start=..., end=...)`` for each view in
  ``params.views`` (default every daily view), over ``params.start``/``params.end``
  (default the day: ``start < event_timestamp <= end`` with start = ds, end = next_ds). A
  strict view's failure (``QualityError``) fails the step, and so do fewer than
  ``params.min_rows`` (default 1) rows in the range; ``params.fail_on_failed: true`` fails it
  on any failed check.
- ``gate``: the model version an earlier step of the run trained (``params.from_step``,
  default the first dependency that recorded a model) against ``params.min`` / ``params.max``
  thresholds on its metrics, e.g. ``min: {test_auc: 0.6}``; a miss fails the step, so the
  steps after it (promote) do not run.
- ``promote``: ``platform.models.promote(name, version, alias, reason=..., by=...)`` for
  that version: the registry's promotion gate compares it with the production version and
  refuses (``PromotionRefused``, failing the step) when it is worse; ``params.alias``
  (default production), ``params.force`` with ``params.reason`` to override.
- ``command``: the job runs the step's shell command; nothing here is involved.

Every kind records its **outcome** under the run (see :mod:`mlplatform.pipelines.state`):
what it read (the feature registry revision, the model versions it used) and what it wrote
(each workload step's output: dataset versions, the training-set snapshot, the model version).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Any

from mlplatform.config import PlatformConfig
from mlplatform.errors import ConfigError, ModelError
from mlplatform.pipelines.spec import Pipeline, PipelineStep, render
from mlplatform.pipelines.state import RunState

__all__ = ["WORKLOAD_STEPS", "run_in_job"]

# under mlplatform.jobs: the job's console (its Ray log) shows these lines without --verbose
log = logging.getLogger("mlplatform.jobs.pipeline")
WORKLOAD_STEPS: dict[str, tuple[str, ...]] = {
    "generate": ("generate",),
    "backfill": ("apply", "event log", "backfill"),
    "materialize": ("materialize",),
    "train": ("training set", "train"),
    "tune": ("training set", "train"),
}


def run_in_job(
    pipeline: Pipeline,
    name: str,
    ds: date,
    attempt: int,
    *,
    open_platform: Callable[[PlatformConfig], Any],
    root: str | None = None,
) -> dict[str, Any]:
    """Run step ``name`` for ``ds`` in this process (the job's driver) and record its outcome.

    Args:
        open_platform: builds the Platform (a context manager) from the pipeline's config.
        root: the storage root to use instead of the config's (the scheduler's, resolved).

    Raises:
        PlatformError: the step's work failed (the job then fails and the scheduler retries).
    """
    from mlplatform.jobs.workload import load_workload

    step = pipeline.step(name)
    if step.kind == "command":
        raise ConfigError(f"step {name!r} is a command step: its job runs {step.command!r}, not mlp pipeline step")
    params = render(step.params, ds, pipeline.pipeline)
    workload = None
    if pipeline.workload is not None:
        overrides = render(pipeline.overrides, ds, pipeline.pipeline)
        workload = load_workload(pipeline.resolve(pipeline.workload), overrides)
    config = workload.platform_config if workload is not None and pipeline.platform is None else pipeline.platform_config()
    if root is not None:
        config = config.model_copy(update={"storage": config.storage.model_copy(update={"root": root})})
    state_platform = open_platform(config)
    state = RunState(state_platform.storage, pipeline.pipeline)
    # Lineage: a model registered by this job names the run (models.registry.complete_lineage).
    os.environ["MLP_PIPELINE_RUN"] = f"{pipeline.pipeline}/{ds.isoformat()}"
    with state_platform as platform:
        revision = platform.features.registry.revision()
        if step.kind in WORKLOAD_STEPS or step.kind == "workload":
            outcome = _workload(platform, workload, step, params)
        elif step.kind == "validate":
            outcome = _validate(platform, params, ds)
        elif step.kind == "gate":
            outcome = _gate(platform, state, pipeline, step, params, ds)
        else:  # promote
            outcome = _promote(platform, state, pipeline, step, params, ds)
    outcome = {
        "step": name,
        "kind": step.kind,
        "ds": ds.isoformat(),
        "attempt": attempt,
        "finished_at": datetime.now(UTC).isoformat(),
        "read": {"feature_registry_revision": revision, **outcome.get("read", {})},
        "wrote": outcome.get("wrote", {}),
        **({"model": outcome["model"]} if "model" in outcome else {}),
    }
    state.write_outcome(ds, name, attempt, json.loads(json.dumps(outcome, default=str)))
    return outcome


def _workload(platform: Any, workload: Any, step: PipelineStep, params: dict[str, Any]) -> dict[str, Any]:
    from mlplatform.jobs.steps import StepRunner

    names = params.get("steps") or WORKLOAD_STEPS.get(step.kind)
    if not names:
        raise ConfigError(f"step {step.name!r} (kind workload) needs params.steps: the workload steps to run")
    if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"step {step.name!r}: params.steps must be a list of workload step names, got {names!r}")
    wrote: dict[str, Any] = {}
    model = None
    runner = StepRunner(platform.storage, force=bool(params.get("force", False)))
    for workload_step in workload.steps(platform, only=set(names)):
        done = runner.run(workload_step)
        wrote[workload_step.label] = {"output": done.output, "summary": done.summary, "where": done.where, "rows": done.rows}
        value = done.value
        if hasattr(value, "lineage") and hasattr(value, "version") and hasattr(value, "name"):
            model = {"name": value.name, "version": value.version}
    out: dict[str, Any] = {"wrote": wrote}
    if model is not None:
        out["model"] = model
    return out


def _validate(platform: Any, params: dict[str, Any], ds: date) -> dict[str, Any]:
    views = params.get("views") or [v.name for v in platform.features.list_feature_views() if not v.is_realtime]
    start = params.get("start", ds.isoformat())
    end = params.get("end", date.fromordinal(ds.toordinal() + 1).isoformat())
    min_rows = int(params.get("min_rows", 1))
    reports = {}
    failed = []
    for view in views:
        report = platform.quality.validate(view, start=start, end=end)  # QualityError: strict and failed
        log.info("[validate] %s", report.line())
        reports[view] = {"rows": report.rows, "passed": report.passed, "failed": len(report.failed), "report": report.key}
        if report.failed:
            failed.append(view)
        if report.rows < min_rows:
            from mlplatform.errors import QualityError

            # every check of an empty range is skipped, so "passed" would say nothing: a day
            # without data is a failure of the day
            raise QualityError(
                f"{view}: {report.rows} row(s) with {start} < event_timestamp <= {end}, fewer than min_rows {min_rows}"
            )
    if failed and params.get("fail_on_failed"):
        from mlplatform.errors import QualityError

        raise QualityError(f"validation failed for {', '.join(failed)} (fail_on_failed is set); see the reports")
    return {"read": {"views": views, "start": start, "end": end}, "wrote": {"quality_reports": reports}}


def _candidate(state: RunState, pipeline: Pipeline, step: PipelineStep, params: dict[str, Any], ds: date) -> dict[str, Any]:
    """The model version an earlier step of this run recorded (``params.from_step`` or the
    first dependency with one)."""
    sources = [params["from_step"]] if params.get("from_step") else list(step.depends_on)
    for source in sources:
        record = state.step(ds, source) or {}
        model = (record.get("outcome") or {}).get("model")
        if model:
            return model
    raise ModelError(
        f"step {step.name!r}: no model version recorded by {', '.join(sources) or 'its dependencies'} for {ds}; "
        "depend on the train step or set params.from_step"
    )


def _gate(
    platform: Any, state: RunState, pipeline: Pipeline, step: PipelineStep, params: dict[str, Any], ds: date
) -> dict[str, Any]:
    model = _candidate(state, pipeline, step, params, ds)
    version = platform.models.get(model["name"], model["version"])
    misses = []
    for bound, ok in (("min", lambda v, t: v >= t), ("max", lambda v, t: v <= t)):
        for metric, threshold in (params.get(bound) or {}).items():
            value = version.metrics.get(metric)
            if value is None or not ok(value, threshold):
                misses.append(f"{metric} {value} (needs {'>=' if bound == 'min' else '<='} {threshold})")
    if misses:
        raise ModelError(f"{model['name']} v{model['version']} fails the pipeline's gate: {'; '.join(misses)}")
    return {"read": {"model": model, "metrics": {k: version.metrics.get(k) for b in ("min", "max") for k in (params.get(b) or {})}}, "model": model}


def _promote(
    platform: Any, state: RunState, pipeline: Pipeline, step: PipelineStep, params: dict[str, Any], ds: date
) -> dict[str, Any]:
    model = _candidate(state, pipeline, step, params, ds)
    alias = params.get("alias", "production")
    before = platform.models.aliases(model["name"])
    reason = params.get("reason") or f"pipeline {pipeline.pipeline} run {ds.isoformat()}"
    # the registry's promotion gate: PromotionRefused (every figure and bound) fails the step
    platform.models.promote(
        model["name"], model["version"], alias,
        force=bool(params.get("force", False)), reason=reason, by=f"mlp pipeline {pipeline.pipeline}",
    )  # fmt: skip
    after = platform.models.aliases(model["name"])
    return {"read": {"model": model, "aliases_before": before}, "wrote": {"aliases": after}, "model": model}
