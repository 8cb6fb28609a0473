"""The underwriting main job as steps (``mlp run configs/underwriting.yaml``).

    generate → apply → event log (each stream source) → backfill (each daily view)
    → training set → train → promote → materialize → online events → deploy → decide
    → live event

``event log`` writes the generated stream history into each stream source's offline log, which
training sets read for the real-time views; ``online events`` loads the log's recent events
into the online store before the decision service and its stream processors start;
``live event`` ends the job with one fresh event that changes a decision.

Each step with inputs is skipped when they are unchanged and its output is still there (the
library's :class:`~mlplatform.jobs.steps.StepRunner` decides), so re-running the job resumes
where it stopped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mlplatform.jobs.feature_steps import apply_step, backfill_step, materialize_step
from mlplatform.jobs.quality_steps import quality_steps
from mlplatform.jobs.steps import Done, Step, StepRunner
from mlplatform.platform import Platform
from workloads.underwriting.generate import TABLES, DataConfig
from workloads.underwriting.model import ModelConfig
from workloads.underwriting.serve import ServeConfig
from workloads.underwriting.training_set import TrainingSetConfig

log = logging.getLogger(__name__)
RAW_PREFIX = "raw/underwriting"


class Config(BaseModel):
    """The underwriting workload file's sections (configs/underwriting.yaml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: DataConfig = Field(default_factory=DataConfig, description="Synthetic data size, period and seed.")
    training_set: TrainingSetConfig = Field(default_factory=TrainingSetConfig, description="Training-set cut and splits.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Training, tuning and registration.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="Deployment and sample decisions.")


def definitions() -> list[Any]:
    from workloads.underwriting.features import DEFINITIONS

    return list(DEFINITIONS)


# ----------------------------------------------------------------------------- steps
def generate_step(platform: Platform, data: DataConfig, *, prefix: str = RAW_PREFIX, target: str = "") -> Step:
    """Generate the synthetic data under ``prefix``, unless the same data (same config) is
    already published there (value: None)."""
    datasets = platform.datasets
    where = platform.storage.uri(prefix)
    summary = f"{data.applications:,} applications, {data.merchants:,} merchants"

    def run() -> Done:
        from workloads.underwriting.generate import generate

        versions = generate(platform, data, prefix=prefix)
        return Done(
            summary=summary,
            rows=sum(v.rows for v in versions.values()),
            where=where,
            output={t: v.version for t, v in versions.items()},
        )

    def reuse(output: Any) -> Done | None:
        names = {t: f"{prefix}/{t}" for t in TABLES}
        if not isinstance(output, dict) or not all(datasets.exists(n) for n in names.values()):
            return None
        if any(datasets.get(n).version != output.get(t) for t, n in names.items()):
            return None
        return Done(summary=summary, where=where)

    inputs = {"data": json.loads(data.model_dump_json()), "prefix": prefix}
    return Step("generate", run, target=target, inputs=lambda: inputs, reuse=reuse)


def event_log_step(platform: Platform, source: str, *, prefix: str = RAW_PREFIX) -> Step:
    """Make stream source ``source``'s offline log its generated history (the table
    ``STREAM_TABLES[source]`` under ``prefix``), unless the log already holds that table's
    version as imported for this definition of the source (value: the number of events)."""
    from workloads.underwriting import event_history

    features, storage, datasets = platform.features, platform.storage, platform.datasets
    table = f"{prefix}/{event_history.STREAM_TABLES[source]}"

    def inputs() -> dict[str, Any]:
        return {"source": features.get_stream_source(source).version, "table": {table: datasets.get(table).version}}

    def run() -> Done:
        stream = features.get_stream_source(source)
        version, events, keys = event_history.import_history(storage, datasets, stream, table)
        return Done(
            summary=f"{events:,} events from {table} v{version.version}",
            where=storage.uri(stream.dataset),
            output={"parts": keys, "events": events},
            value=events,
        )

    def reuse(output: Any) -> Done | None:
        parts = output.get("parts") if isinstance(output, dict) else None
        if not isinstance(parts, list) or not all(storage.exists(k) for k in parts):
            return None
        return Done(where=storage.uri(features.get_stream_source(source).dataset), value=output.get("events"))

    return Step("event log", run, target=source, inputs=inputs, reuse=reuse)


def event_log_steps(platform: Platform) -> Iterator[Step]:
    """One event-log step per registered stream source the data has a table for."""
    from workloads.underwriting.event_history import STREAM_TABLES

    for source in platform.features.list_stream_sources():
        if source.name in STREAM_TABLES:
            yield event_log_step(platform, source.name)


def backfill_steps(platform: Platform, config: Config) -> Iterator[Step]:
    """One backfill step per registered daily view over the data period (a real-time view
    has nothing to backfill: it is computed from its stream's log at any time)."""
    for view in platform.features.list_feature_views():
        if not view.is_realtime:
            yield backfill_step(platform.features, platform.datasets, view.name, config.data.start, config.data.end)


def online_events_step(platform: Platform) -> Step:
    """Rebuild every real-time view's online event state from its log (always runs: it
    applies the events within a view's retention of now, which moves)."""
    from workloads.underwriting.event_history import load_online

    def run() -> Done:
        views = [v for v in platform.features.list_feature_views() if v.is_realtime]
        held = {v.name: load_online(platform.features, v) for v in views}
        summary = ", ".join(f"{name} {n:,}" for name, n in held.items()) or "no real-time views"
        return Done(summary=summary, rows=sum(held.values()))

    return Step("online events", run)


def training_set_step(platform: Platform, config: Config) -> Step:
    """The point-in-time training set (value: its ``TrainingSetSnapshot``)."""
    from mlplatform.errors import NotFoundError
    from mlplatform.features.training_sets import get_training_set
    from workloads.underwriting import training_set

    cut = config.training_set
    cutoff = cut.cutoff or config.data.end

    def done(snapshot: Any) -> Done:
        splits = ", ".join(f"{k}={v['rows']:,}" for k, v in snapshot.splits.items())
        return Done(
            summary=f"{snapshot.name} v{snapshot.version} ({splits}; hash {snapshot.content_hash})",
            rows=snapshot.rows,
            where=snapshot.uri,
            output={"version": snapshot.version},
            value=snapshot,
        )

    def reuse(output: Any) -> Done | None:
        try:
            return done(get_training_set(platform.features, cut.name, output["version"]))
        except (NotFoundError, KeyError, TypeError):
            return None

    return Step(
        "training set",
        lambda: done(training_set.build(platform, cut, config.data.end)),
        inputs=lambda: training_set.build_inputs(platform, cut, cutoff),
        reuse=reuse,
    )


def train_step(platform: Platform, config: Config) -> Step:
    """Train (or tune), evaluate, write the model card and register, on the latest training
    set (value: the ``ModelVersion``)."""
    from mlplatform.errors import NotFoundError
    from mlplatform.features.training_sets import get_training_set
    from workloads.underwriting import model

    snapshot = None

    def latest() -> Any:
        nonlocal snapshot
        if snapshot is None:
            snapshot = get_training_set(platform.features, config.training_set.name)
        return snapshot

    def done(version: Any) -> Done:
        metrics = version.metrics
        return Done(
            summary=(
                f"{version.name} v{version.version}: validation AUC {metrics.get('validation_auc', float('nan')):.4f}, "
                f"test AUC {metrics.get('test_auc', float('nan')):.4f}"
            ),
            where=f"model card: {model.model_card_uri(platform, version)}",
            output={"version": version.version},
            value=version,
        )

    def reuse(output: Any) -> Done | None:
        try:
            return done(platform.models.get(config.model.name, output["version"]))
        except (NotFoundError, KeyError, TypeError):
            return None

    return Step(
        "train",
        lambda: done(model.train_and_register(platform, config.model, latest())),
        inputs=lambda: model.spec_inputs(config.model, latest()),
        reuse=reuse,
    )


def promote_step(platform: Platform, config: Config) -> Step:
    """Point ``production`` at the version trained from the latest training set and spec."""
    from mlplatform.features.training_sets import get_training_set
    from workloads.underwriting import model

    def run() -> Done:
        snapshot = get_training_set(platform.features, config.training_set.name)
        version = model.current_version(platform, config.model, snapshot)
        if version is None:
            from mlplatform.errors import NotFoundError

            raise NotFoundError(
                f"no {config.model.name!r} version was trained on training set {snapshot.name} v{snapshot.version} "
                "with this spec; run the train step first"
            )
        state = model.promote(platform, config.model, version)
        return Done(summary=f"{config.model.name}: {state}", value=version)

    return Step("promote", run)


def serve_steps(platform: Platform, config: Config) -> Iterator[Step]:
    """Deploy the decision service, then send it the sample checkouts."""
    from workloads.underwriting import serve

    live: dict[str, Any] = {}

    def deploy() -> Done:
        deployed = live["app"] = serve.deploy(platform, config.model.name, config.serve)
        return Done(
            summary=f"{deployed.name}: {config.model.name} v{deployed.model_version} ({deployed.ingress} ingress)",
            where=deployed.url,
            value=deployed,
        )

    def decide() -> Done:
        decisions = serve.decide_samples(platform, live["app"], config.model.name, config.serve)
        declined = sum(d.get("decision") == "decline" for d in decisions)
        return Done(summary=f"{len(decisions)} sample decisions, {declined} declined", value=decisions)

    def live_event() -> Done:
        from workloads.underwriting import live_event

        shown = live_event.run(platform, live["app"], config.model.name)
        return Done(summary=shown.summary(), value=shown)

    yield Step("deploy", deploy)
    if config.serve.sample_decisions:
        yield Step("decide", decide)
    if config.serve.live_event:
        yield Step("live event", live_event)


def steps(platform: Platform, config: Config) -> Iterator[Step]:
    """The workload's steps, in order (the workload contract: see ``mlplatform.jobs.workload``)."""
    platform.storage.check_reachable()
    yield generate_step(platform, config.data)
    yield apply_step(platform.features, definitions())
    yield from event_log_steps(platform)
    yield from backfill_steps(platform, config)
    yield from quality_steps(platform.quality, platform.features, platform.datasets)
    yield training_set_step(platform, config)
    yield train_step(platform, config)
    yield promote_step(platform, config)
    yield materialize_step(platform.features, config.data.end)
    yield online_events_step(platform)
    if config.serve.deploy:
        yield from serve_steps(platform, config)


# ------------------------------------------------------------------ as functions
def generate_data(platform: Platform, config: Config) -> None:
    """The generate step alone (skipped when up to date)."""
    StepRunner(platform.storage).run(generate_step(platform, config.data))


def backfill_views(platform: Platform, config: Config) -> None:
    """Every daily view's backfill step over the data period (each skipped when up to date)."""
    StepRunner(platform.storage).run_all(backfill_steps(platform, config))


def import_event_history(platform: Platform) -> None:
    """Every stream source's event-log step (each skipped when up to date)."""
    StepRunner(platform.storage).run_all(event_log_steps(platform))


def run(platform: Platform, config: Config) -> dict[str, Any]:
    """Run every step; returns what the steps produced: ``apply`` (the ``ApplyResult``),
    ``training_set``, ``model``, ``deployed`` (None without ``serve.deploy``), ``decisions`` and
    ``live_event`` (the ``LiveEvent``, or None)."""
    results = StepRunner(platform.storage).run_all(steps(platform, config))
    return {
        "apply": results["apply"],
        "training_set": results["training set"],
        "model": results["train"],
        "deployed": results.get("deploy"),
        "decisions": results.get("decide") or [],
        "live_event": results.get("live event"),
    }
