"""The same pipeline as an Airflow DAG: one task per step, each submitting the step's Ray jobs.

    # dags/underwriting_daily.py, in Airflow's DAGs folder
    from mlplatform.integrations.airflow import build_dag

    dag = build_dag("/opt/risk/configs/pipelines/underwriting_daily.yaml",
                    mlp="/opt/risk/.venv/bin/mlp", address="http://ray-head:8265")

Each task is a ``BashOperator`` running ``mlp pipeline run FILE --step STEP --ds DS --attempt
TRY`` — the scheduler's own code for exactly one attempt: the same submission id
(``mlp-<pipeline>-<step>-<ds>-a<try>``, looked up before submitting), the same lease and the
same run records under the storage root, so ``mlp pipeline status`` shows Airflow's runs and
a day half run by Airflow can be finished by ``mlp pipeline run`` (or the other way round).
Airflow owns ordering and retries: a task's ``retries``, ``retry_delay`` (doubled per retry,
``retry_exponential_backoff`` 2) and ``execution_timeout`` come from the step, and each Airflow
try is the next attempt. A step that is skipped (its ``when`` does not match, a dependency
was skipped, or the day is not in the schedule) exits 99, which the operator turns into a
skipped task, so its downstream tasks are skipped too.

Days: the DAG triggers at the schedule's time every day (``CronTriggerTimetable``) and a run
triggered on day D handles ``ds`` = D - 1, as ``mlp pipeline serve`` does; days outside the
schedule's day fields skip. The DAG starts at the pipeline's ``start`` (catch-up on) and runs
at most ``concurrency`` days at once.

Airflow is imported only when :func:`build_dag` is called; :func:`dag_tasks` (what the DAG
holds, as plain data) needs no Airflow.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any

from mlplatform.errors import DependencyError
from mlplatform.pipelines.spec import Pipeline, load_pipeline

__all__ = ["AIRFLOW_DS", "TaskSpec", "build_dag", "dag_tasks"]

#: The day a run handles, in Airflow's templates: the day before the one that triggered it.
AIRFLOW_DS = "{{ macros.ds_add(ds, -1) }}"
SKIPPED_EXIT = 99  # as mlplatform.pipelines.cli.SKIPPED_EXIT (not imported: that module is the CLI's)


@dataclass(frozen=True)
class TaskSpec:
    """One Airflow task of a pipeline's DAG, as plain data."""

    task_id: str
    bash_command: str
    upstream: tuple[str, ...]
    retries: int
    retry_delay: timedelta
    execution_timeout: timedelta


def dag_tasks(pipeline: Pipeline, *, mlp: str = "mlp", address: str | None = None) -> list[TaskSpec]:
    """The tasks :func:`build_dag` creates for ``pipeline``, in dependency order."""
    tasks = []
    for step in pipeline.order():
        retries, delay, timeout = pipeline.settings(step)
        args = [mlp, "pipeline", "run", pipeline.source, "--step", step.name]
        if address or pipeline.address:
            args += ["--address", address or pipeline.address]
        # Jinja fields stay outside the quoting: Airflow renders them before bash runs the line.
        command = shlex.join(args) + f" --ds {AIRFLOW_DS} --attempt {{{{ ti.try_number }}}}"
        tasks.append(
            TaskSpec(
                task_id=step.name,
                bash_command=command,
                upstream=tuple(step.depends_on),
                retries=retries,
                retry_delay=timedelta(seconds=delay),
                # the scheduler stops the job at the step's timeout and records it; Airflow's
                # own limit is a backstop with room for that
                execution_timeout=timedelta(seconds=timeout + 300),
            )
        )
    return tasks


def build_dag(
    pipeline_file: str | os.PathLike[str],
    *,
    mlp: str = "mlp",
    address: str | None = None,
    dag_id: str | None = None,
    env: dict[str, str] | None = None,
    **dag_kwargs: Any,
) -> Any:
    """An Airflow ``DAG`` for the pipeline file (see the module docstring).

    Args:
        pipeline_file: the pipeline YAML (an absolute path: Airflow's workers read it).
        mlp: the ``mlp`` executable the tasks run (in the environment mlplatform is installed in).
        address: the Ray job API URL; default the pipeline's ``address`` or the workers' RAY_ADDRESS.
        dag_id: default the pipeline's name.
        env: extra environment for the tasks (added to the worker's).
        dag_kwargs: more ``DAG`` arguments (tags, owner links, ...).

    Raises:
        DependencyError: Airflow is not installed here.
        ConfigError: the pipeline file is invalid.
    """
    try:
        from airflow.providers.standard.operators.bash import BashOperator
        from airflow.sdk import DAG
        from airflow.timetables.trigger import CronTriggerTimetable
    except ImportError:
        raise DependencyError.missing("airflow", "apache-airflow>=3", "building an Airflow DAG") from None
    pipeline = load_pipeline(pipeline_file)
    schedule = pipeline.parsed_schedule
    daily = CronTriggerTimetable(f"{schedule.minute} {schedule.hour} * * *", timezone="UTC")
    first = datetime.combine(pipeline.start + timedelta(days=1), time(schedule.hour, schedule.minute), tzinfo=UTC)
    last = None
    if pipeline.end is not None:
        last = datetime.combine(pipeline.end + timedelta(days=1), time(schedule.hour, schedule.minute), tzinfo=UTC)
    dag = DAG(
        dag_id=dag_id or pipeline.pipeline,
        schedule=daily,
        start_date=first,
        end_date=last,
        catchup=True,
        max_active_runs=pipeline.concurrency,
        tags=["mlplatform", "pipeline"],
        doc_md=f"mlplatform pipeline `{pipeline.pipeline}` from `{pipeline.source}`: each task runs one step's Ray jobs.",
        **dag_kwargs,
    )
    with dag:
        operators = {}
        for task in dag_tasks(pipeline, mlp=mlp, address=address):
            operators[task.task_id] = BashOperator(
                task_id=task.task_id,
                bash_command=task.bash_command,
                retries=task.retries,
                retry_delay=task.retry_delay,
                retry_exponential_backoff=2.0,  # doubled per retry, as the scheduler does
                execution_timeout=task.execution_timeout,
                env=env,
                append_env=True,
                skip_on_exit_code=SKIPPED_EXIT,
            )
            for upstream in task.upstream:
                operators[upstream] >> operators[task.task_id]
    return dag
