"""A pipeline file: steps with dependencies, a schedule, retries and ``ds`` templates.

    pipeline: underwriting_daily
    workload: ../underwriting.yaml       # relative to this file; its platform config is used
    schedule: "0 2 * * *"               # the run for a day is due at 02:00 UTC the next day
    start: 2025-01-01                    # the first ds (catch-up starts here)
    overrides: {data.end: "{{ next_ds }}T00:00:00Z"}   # workload values, per run
    defaults: {retries: 2, retry_delay: 30s, timeout: 2h}
    steps:
      - {name: generate, kind: generate}
      - {name: features, kind: backfill, depends_on: [generate]}
      - {name: validate, kind: validate, depends_on: [features], params: {views: [applicant_history]}}
      - {name: train, kind: train, depends_on: [validate], when: "* * * * 1"}   # Mondays
      - {name: promote, kind: promote, depends_on: [train], params: {model: underwriting}}

Templates: ``{{ ds }}`` (2025-01-31), ``{{ ds_nodash }}`` (20250131), ``{{ prev_ds }}``,
``{{ next_ds }}`` and ``{{ pipeline }}`` anywhere in ``overrides``, ``params`` and a command
step's ``command``. Step kinds are listed in :data:`STEP_KINDS`; what each does is in
:mod:`mlplatform.pipelines.kinds`.
"""

from __future__ import annotations

import os
import re
from datetime import date, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mlplatform._duration import parse_duration
from mlplatform.config import PlatformConfig, format_validation_error, load_config, load_yaml
from mlplatform.errors import ConfigError
from mlplatform.pipelines.schedule import Schedule

__all__ = ["STEP_KINDS", "Pipeline", "PipelineStep", "StepDefaults", "load_pipeline", "render"]

#: What a step can be. Workload kinds run steps of the pipeline's workload (``mlp run``'s own
#: steps) with the run's overrides; ``command`` runs a shell command as the job.
STEP_KINDS = (
    "generate", "backfill", "materialize", "train", "tune", "workload",
    "validate", "gate", "promote", "command",
)  # fmt: skip
_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_TEMPLATE = re.compile(r"\{\{\s*([A-Za-z_]+)\s*\}\}")
TEMPLATE_NAMES = ("ds", "ds_nodash", "prev_ds", "next_ds", "pipeline")


def render(value: Any, ds: date, pipeline: str) -> Any:
    """``value`` with every ``{{ name }}`` in its strings replaced (dicts and lists recursively).

    Raises:
        ConfigError: a template names something other than TEMPLATE_NAMES.
    """
    if isinstance(value, str):
        values = {
            "ds": ds.isoformat(),
            "ds_nodash": ds.strftime("%Y%m%d"),
            "prev_ds": (ds - timedelta(days=1)).isoformat(),
            "next_ds": (ds + timedelta(days=1)).isoformat(),
            "pipeline": pipeline,
        }

        def one(match: re.Match[str]) -> str:
            if match.group(1) not in values:
                raise ConfigError(f"unknown template {match.group(0)!r} in {value!r}: use one of {', '.join(TEMPLATE_NAMES)}")
            return values[match.group(1)]

        return _TEMPLATE.sub(one, value)
    if isinstance(value, dict):
        return {k: render(v, ds, pipeline) for k, v in value.items()}
    if isinstance(value, list):
        return [render(v, ds, pipeline) for v in value]
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _seconds(value: Any) -> Any:
    if isinstance(value, str):
        return parse_duration(value).total_seconds()
    return value


class StepDefaults(_Model):
    """Retries, backoff and timeout of every step that does not set its own."""

    retries: int = Field(default=2, ge=0, le=20, description="Attempts after the first one fails.")
    retry_delay: float = Field(
        default=30.0, ge=0, description="Seconds (or '30s', '5m') before the first retry; doubled for each next."
    )
    timeout: float = Field(default=7200.0, gt=0, description="Seconds (or '2h') an attempt may run before it is stopped.")

    _durations = field_validator("retry_delay", "timeout", mode="before")(_seconds)


class PipelineStep(_Model):
    """One step: a Ray job of some kind, after the steps it depends on."""

    name: str = Field(description="Unique in the pipeline: lowercase letters, digits, _ and -.")
    kind: Literal[STEP_KINDS] = Field(description="What the job does (see mlplatform.pipelines.kinds).")  # type: ignore[valid-type]
    depends_on: list[str] = Field(default_factory=list, description="Steps that must have succeeded first.")
    when: str | None = Field(
        default=None, description="Cron day fields this step runs on, e.g. '* * * * 1' (Mondays); other days skip it."
    )
    params: dict[str, Any] = Field(default_factory=dict, description="The kind's parameters (templated by ds).")
    command: str | None = Field(default=None, description="kind command: the shell command the job runs (templated).")
    retries: int | None = Field(default=None, ge=0, le=20, description="Overrides defaults.retries.")
    retry_delay: float | None = Field(default=None, ge=0, description="Overrides defaults.retry_delay.")
    timeout: float | None = Field(default=None, gt=0, description="Overrides defaults.timeout.")
    num_cpus: float | None = Field(default=None, ge=0, description="CPUs reserved for the job's driver.")

    _durations = field_validator("retry_delay", "timeout", mode="before")(_seconds)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"step name {value!r}: use lowercase letters, digits, _ and - (a letter first)")
        return value

    @field_validator("when")
    @classmethod
    def _when(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                Schedule.parse_days(value)
            except ConfigError as exc:
                raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _command(self) -> PipelineStep:
        if (self.kind == "command") != (self.command is not None):
            raise ValueError(f"step {self.name!r}: 'command' is required for kind command and only allowed there")
        return self


class Pipeline(_Model):
    """A pipeline file, validated (see the module docstring)."""

    pipeline: str = Field(description="The pipeline's name: lowercase letters, digits, _ and -.")
    workload: str | None = Field(default=None, description="Workload file (relative to this file) the steps run.")
    platform: str | dict[str, Any] | None = Field(
        default=None, description="Platform config file or mapping; default the workload's."
    )
    schedule: str = Field(default="0 0 * * *", description="Cron: which days run and when (see pipelines.schedule).")
    start: date = Field(description="The first ds the scheduler runs (catch-up starts here).")
    end: date | None = Field(default=None, description="The last ds to schedule; none = no end.")
    concurrency: int = Field(default=1, ge=1, le=64, description="Runs (days) at once in a backfill or catch-up.")
    lease: float = Field(
        default=60.0, ge=1, description="Seconds a scheduler's claim on a step lasts unless renewed (it renews every third)."
    )
    poll: float = Field(default=1.0, gt=0, le=60, description="Seconds between job status checks.")
    address: str | None = Field(default=None, description="Ray job API URL; default --address or RAY_ADDRESS.")
    working_dir: str | None = Field(
        default=None, description="Directory shipped with each job (relative to this file); none = the nodes' install."
    )
    overrides: dict[str, Any] = Field(default_factory=dict, description="Workload values by dotted key (templated).")
    defaults: StepDefaults = Field(default_factory=StepDefaults, description="Retries, backoff and timeout.")
    steps: list[PipelineStep] = Field(min_length=1, description="The steps; order does not matter, dependencies do.")
    source: str = Field(default="", description="Set on load: the file this pipeline was read from.")

    _durations = field_validator("lease", "poll", mode="before")(_seconds)

    @field_validator("pipeline")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"pipeline name {value!r}: use lowercase letters, digits, _ and - (a letter first)")
        return value

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, value: str) -> str:
        try:
            Schedule.parse(value)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return value

    @model_validator(mode="after")
    def _graph(self) -> Pipeline:
        names = [s.name for s in self.steps]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"step names must be unique, repeated: {', '.join(dupes)}")
        for step in self.steps:
            unknown = [d for d in step.depends_on if d not in names]
            if unknown:
                raise ValueError(f"step {step.name!r} depends on unknown step(s) {', '.join(unknown)}")
        self.order()  # raises on a cycle
        try:
            for step in self.steps:
                render({"p": step.params, "c": step.command}, self.start, self.pipeline)
            render(self.overrides, self.start, self.pipeline)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        if self.workload is None and self.platform is None:
            raise ValueError("give 'workload' (whose platform config is used) or 'platform'")
        needs_workload = [s.name for s in self.steps if s.kind in ("generate", "backfill", "materialize", "train", "tune", "workload")]
        if needs_workload and self.workload is None:
            raise ValueError(f"step(s) {', '.join(needs_workload)} run workload steps: set 'workload'")
        return self

    # ------------------------------------------------------------------------- derived
    @property
    def parsed_schedule(self) -> Schedule:
        return Schedule.parse(self.schedule)

    def step(self, name: str) -> PipelineStep:
        """Raises: ConfigError: no such step."""
        for step in self.steps:
            if step.name == name:
                return step
        raise ConfigError(f"pipeline {self.pipeline!r} has no step {name!r}; its steps: {', '.join(s.name for s in self.steps)}")

    def order(self) -> list[PipelineStep]:
        """Steps in dependency order (file order among the ready ones).

        Raises:
            ValueError: the dependencies form a cycle.
        """
        done: list[str] = []
        left = list(self.steps)
        while left:
            ready = [s for s in left if all(d in done for d in s.depends_on)]
            if not ready:
                raise ValueError(f"dependency cycle among steps {', '.join(s.name for s in left)}")
            done.append(ready[0].name)
            left.remove(ready[0])
        return [self.step(n) for n in done]

    def settings(self, step: PipelineStep) -> tuple[int, float, float]:
        """(retries, retry_delay, timeout) of ``step`` with the defaults filled in."""
        d = self.defaults
        return (
            d.retries if step.retries is None else step.retries,
            d.retry_delay if step.retry_delay is None else step.retry_delay,
            d.timeout if step.timeout is None else step.timeout,
        )

    def resolve(self, relative: str) -> str:
        """A path named in this file, relative to the file's folder."""
        if os.path.isabs(relative) or not self.source:
            return relative
        return str(Path(self.source).parent / relative)

    def platform_config(self) -> PlatformConfig:
        """The platform config the pipeline's state and steps use.

        Raises:
            ConfigError: the config (or the workload file naming it) is invalid.
        """
        if self.platform is None:
            from mlplatform.jobs.workload import load_workload

            return load_workload(self.resolve(self.workload or "")).platform_config
        if isinstance(self.platform, str):
            return load_config(self.resolve(self.platform))
        return load_config(self.platform)


def load_pipeline(path: str | os.PathLike[str]) -> Pipeline:
    """Read and validate a pipeline file.

        pipeline = load_pipeline("configs/pipelines/underwriting_daily.yaml")

    Raises:
        ConfigError: the file is missing or malformed, a field is invalid (the message names it
            and echoes the value), a dependency is unknown or circular, or a template is unknown.
    """
    path = Path(path)
    data = load_yaml(path)
    try:
        return Pipeline.model_validate({**data, "source": str(path.resolve())})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, repr(str(path)))) from None
