"""Pipelines: the platform's daily run as a scheduled, resumable pipeline of Ray jobs.

    pipeline = load_pipeline("configs/pipelines/underwriting_daily.yaml")
    Scheduler(pipeline).run(date(2025, 1, 6))

The file format is :mod:`~mlplatform.pipelines.spec`, schedules and ``ds`` are
:mod:`~mlplatform.pipelines.schedule`, run state and leases under the storage root are
:mod:`~mlplatform.pipelines.state`, the scheduler is :mod:`~mlplatform.pipelines.scheduler`
and what each kind of step does in its job is :mod:`~mlplatform.pipelines.kinds`. The same
pipeline as an Airflow DAG: :mod:`mlplatform.integrations.airflow`.
"""

from mlplatform.pipelines.schedule import Schedule, parse_ds
from mlplatform.pipelines.scheduler import RunResult, Scheduler, submission_id
from mlplatform.pipelines.spec import STEP_KINDS, Pipeline, PipelineStep, load_pipeline

__all__ = [
    "STEP_KINDS",
    "Pipeline",
    "PipelineStep",
    "RunResult",
    "Schedule",
    "Scheduler",
    "load_pipeline",
    "parse_ds",
    "submission_id",
]
