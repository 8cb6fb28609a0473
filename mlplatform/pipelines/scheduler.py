"""The scheduler: runs a pipeline's days as Ray jobs, resumably, one lease per step.

    scheduler = Scheduler(load_pipeline("configs/pipelines/underwriting_daily.yaml"))
    scheduler.run(date(2025, 1, 6))                      # one day: every step, in dependency order
    scheduler.backfill(date(2025, 1, 1), date(2025, 1, 5))   # each scheduled day, oldest first
    scheduler.serve()                                    # catch up missed days, then run each as it falls due

Each attempt of a step is one Ray job submitted through the Jobs API with the submission id
``mlp-<pipeline>-<step>-<ds as YYYYMMDD>-a<attempt>``. Before submitting, the scheduler looks
that id up: a job that already exists (a previous scheduler submitted it, then died) is
followed, never started again, and Ray itself refuses a second job with the same id.

Resuming: a step's final record is written once, after its job ended; a step with one is
never run again for that ds. Rerunning a day after a crash skips its finished steps, follows
the job of an attempt still running, and starts the next attempt only when the last one
failed. Retries wait ``retry_delay`` before the first retry and double it for each next one
(the time of the next attempt is recorded, so a restarted scheduler keeps to it). An attempt
that runs past its ``timeout`` is stopped and counts as failed.

A step whose dependency failed is ``upstream_failed`` and not run; one whose ``when`` does
not match the ds, or whose dependency was skipped, is ``skipped``. A day has succeeded when
every step succeeded or was skipped.

Two schedulers may work on the same storage root at once: a step runs under a lease (see
:mod:`mlplatform.pipelines.state`); a scheduler that finds a step leased by a live scheduler
goes on with other ready steps and waits for that one's record.
"""

from __future__ import annotations

import logging
import os
import shlex
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

from mlplatform.errors import ConfigError, JobError
from mlplatform.pipelines.schedule import Schedule
from mlplatform.pipelines.spec import Pipeline, PipelineStep, render
from mlplatform.pipelines.state import FINAL, RunState, owner_id
from mlplatform.storage import Storage

__all__ = ["RunResult", "Scheduler", "submission_id"]

# under mlplatform.jobs: the console shows its INFO lines (one per attempt) without --verbose
log = logging.getLogger("mlplatform.jobs.pipeline")
_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def submission_id(pipeline: str, step: str, ds: date, attempt: int) -> str:
    """The Ray job submission id of one attempt: the same for every scheduler and every rerun."""
    return f"mlp-{pipeline}-{step}-{ds:%Y%m%d}-a{attempt}"


@dataclass(frozen=True)
class RunResult:
    """How one day of a pipeline ended: ``status`` succeeded or failed, and each step's state."""

    ds: date
    status: str
    steps: dict[str, str] = field(default_factory=dict)

    @property
    def succeeded(self) -> bool:
        return self.status == "succeeded"


class Scheduler:
    """Runs a pipeline's days (see the module docstring).

    Args:
        pipeline: the validated pipeline.
        storage: the storage root of the run state; default the pipeline's platform config's.
        address: the Ray job API URL; default the pipeline's ``address``, then ``RAY_ADDRESS``.
        owner: this scheduler's name in leases (default host:pid:random).
    """

    def __init__(
        self, pipeline: Pipeline, storage: Storage | None = None, *, address: str | None = None, owner: str | None = None
    ) -> None:
        self.pipeline = pipeline
        self.storage = storage or Storage(pipeline.platform_config().storage)
        self.state = RunState(self.storage, pipeline.pipeline)
        self.address = address or pipeline.address
        self.owner = owner or owner_id()
        self._client: Any = None

    # ----------------------------------------------------------------------- one day
    def run(self, ds: date, *, only: str | None = None) -> RunResult:
        """Run every step of day ``ds`` that has not finished, in dependency order; with
        ``only``, that step alone (its dependencies must have succeeded or been skipped).

        Raises:
            JobError: the Ray job API is unreachable or refuses a submission.
        """
        steps = self.pipeline.order() if only is None else [self.pipeline.step(only)]
        self.state.start_run(ds)
        statuses: dict[str, str] = {}
        while True:
            waiting = False
            for step in steps:
                status = self._advance(ds, step, statuses)
                if status is None:
                    waiting = True
                else:
                    statuses[step.name] = status
            if not waiting:
                break
            time.sleep(self.pipeline.poll)
        ok = all(s in ("succeeded", "skipped") for s in statuses.values())
        if only is None:
            self.state.finish_run(ds, "succeeded" if ok else "failed", statuses)
        log.debug("[%s] %s: %s", self.pipeline.pipeline, ds, ", ".join(f"{k} {v}" for k, v in statuses.items()))
        return RunResult(ds=ds, status="succeeded" if ok else "failed", steps=statuses)

    def _advance(self, ds: date, step: PipelineStep, statuses: dict[str, str], attempt: int | None = None) -> str | None:
        """The step's final state, running it if it is ready; None while it cannot finish yet."""
        record = self.state.step(ds, step.name)
        if record is not None:
            return record["status"]
        deps = {}
        for dep in step.depends_on:
            if dep not in statuses:
                rec = self.state.step(ds, dep)
                if rec is None:
                    return None
                statuses[dep] = rec["status"]
            deps[dep] = statuses[dep]
        if any(s in ("failed", "upstream_failed") for s in deps.values()):
            failed = ", ".join(d for d, s in deps.items() if s != "succeeded")
            return self._final(ds, step, "upstream_failed", reason=f"dependency failed: {failed}")
        if any(s == "skipped" for s in deps.values()):
            return self._final(ds, step, "skipped", reason="a dependency was skipped")
        if step.when is not None and not Schedule.parse_days(step.when).matches(ds):
            return self._final(ds, step, "skipped", reason=f"when {step.when!r} does not match {ds}")
        return self._run_step(ds, step, attempt=attempt)

    def _final(self, ds: date, step: PipelineStep, status: str, **extra: Any) -> str:
        self.state.finish_step(ds, step.name, {"status": status, **extra})
        return self.state.step(ds, step.name)["status"]  # the first writer's, if two raced

    # ----------------------------------------------------------------------- one step
    def _run_step(self, ds: date, step: PipelineStep, *, attempt: int | None = None) -> str | None:
        lease = self.state.acquire(ds, step.name, self.owner, self.pipeline.lease)
        if lease is None:
            return None
        with lease:
            record = self.state.step(ds, step.name)
            if record is not None:  # finished while we looked
                return record["status"]
            retries, delay, timeout = self.pipeline.settings(step)
            n, retry_at = 1, 0.0
            for previous in self.state.attempts(ds, step.name):
                if previous["status"] == "SUCCEEDED":
                    return self._succeeded(ds, step, previous)
                if previous["status"] in _TERMINAL or previous["status"] == "TIMED_OUT":
                    n, retry_at = previous["attempt"] + 1, previous.get("retry_at") or 0.0
                else:
                    n, retry_at = previous["attempt"], 0.0  # still running when its scheduler stopped: follow it
            if attempt is not None:
                n = attempt
            while True:
                if n > retries + 1 and attempt is None:
                    return self._final(ds, step, "failed", attempts=n - 1, reason=f"failed {n - 1} attempt(s)")
                if lease.lost:
                    return None
                wait = retry_at - time.time()
                if wait > 0:
                    log.info("[%s] %s %s: retry %d in %.0fs", self.pipeline.pipeline, ds, step.name, n, wait)
                    time.sleep(wait)
                result = self._attempt(ds, step, n, timeout, lease_lost=lambda: lease.lost)
                if result is None:
                    return None
                if result["status"] == "SUCCEEDED":
                    return self._succeeded(ds, step, result)
                if attempt is not None:  # one attempt asked for (Airflow): its own retries follow
                    if n > retries:
                        self._final(ds, step, "failed", attempts=n, reason=f"failed {n} attempt(s)")
                    raise JobError(f"{step.name} attempt {n} for {ds} ended {result['status']}: {result.get('message') or 'see its log'}")
                retry_at = time.time() + delay * (2 ** (n - 1))
                if n <= retries:
                    self.state.write_attempt(ds, step.name, n, {**result, "retry_at": retry_at})
                n += 1

    def _succeeded(self, ds: date, step: PipelineStep, attempt: dict[str, Any]) -> str:
        outcome = self.state.outcome(ds, step.name, attempt["attempt"])
        return self._final(
            ds, step, "succeeded", attempts=attempt["attempt"], job_id=attempt["job_id"],
            duration_s=attempt.get("duration_s"), log=attempt.get("log"), outcome=outcome,
        )  # fmt: skip

    def _attempt(self, ds: date, step: PipelineStep, n: int, timeout: float, lease_lost: Callable[[], bool]) -> dict[str, Any] | None:
        """Submit (or find) attempt ``n``'s job, follow it to its end and record it."""
        client = self.client()
        sid = submission_id(self.pipeline.pipeline, step.name, ds, n)
        info = _lookup(client, sid)
        if info is None:
            if lease_lost():
                return None
            self._submit(client, sid, step, ds, n)
            info = _lookup(client, sid)
            log.debug("[%s] %s %s: submitted %s", self.pipeline.pipeline, ds, step.name, sid)
        else:
            log.info("[%s] %s %s: following %s (submitted before)", self.pipeline.pipeline, ds, step.name, sid)
        started = (info.start_time / 1000.0) if info is not None and info.start_time else time.time()
        self.state.write_attempt(ds, step.name, n, {"job_id": sid, "status": "RUNNING", "started_at": started, "owner": self.owner})
        status, timed_out = _status(client, sid), False
        while status not in _TERMINAL:
            if time.time() > started + timeout and not timed_out:
                log.warning("[%s] %s %s: %s ran past %.0fs; stopping it", self.pipeline.pipeline, ds, step.name, sid, timeout)
                client.stop_job(sid)
                timed_out = True
            time.sleep(self.pipeline.poll)
            status = _status(client, sid)
        info = client.get_job_info(sid)
        ended = (info.end_time / 1000.0) if info.end_time else time.time()
        log_uri = self.state.write_log(ds, step.name, n, client.get_job_logs(sid))
        record = {
            "job_id": sid,
            "status": "TIMED_OUT" if timed_out else status,
            "started_at": started,
            "ended_at": ended,
            "duration_s": round(ended - started, 3),
            "message": info.message,
            "log": log_uri,
            "owner": self.owner,
        }
        self.state.write_attempt(ds, step.name, n, record)
        log.info("[%s] %s %s: attempt %d %s (%.1fs)", self.pipeline.pipeline, ds, step.name, n, record["status"], record["duration_s"])
        return {"attempt": n, **record}

    def _submit(self, client: Any, sid: str, step: PipelineStep, ds: date, n: int) -> None:
        runtime_env: dict[str, Any] = {
            "env_vars": {
                **{k: v for k, v in os.environ.items() if k.startswith("MLP_")},
                "MLP_PIPELINE_RUN": f"{self.pipeline.pipeline}/{ds.isoformat()}",
                "MLP_PIPELINE_STEP": step.name,
                "MLP_PIPELINE_ATTEMPT": str(n),
            }
        }
        if self.pipeline.working_dir is not None:
            from mlplatform.jobs.submit import EXCLUDES

            runtime_env.update(working_dir=self.pipeline.resolve(self.pipeline.working_dir), excludes=list(EXCLUDES))
        ready_by = time.monotonic() + 60.0
        while True:
            try:
                client.submit_job(
                    entrypoint=self.entrypoint(step, ds, n),
                    submission_id=sid,
                    runtime_env=runtime_env,
                    entrypoint_num_cpus=step.num_cpus,
                    metadata={"pipeline": self.pipeline.pipeline, "step": step.name, "ds": ds.isoformat(), "attempt": str(n)},
                )
                return
            except Exception as exc:
                text = str(exc)
                if "already exists" in text:  # another scheduler submitted it a moment ago: follow that one
                    return
                if "No available agent" in text and time.monotonic() < ready_by:
                    time.sleep(1.0)
                    continue
                raise JobError(f"job {sid} refused by the Ray job API: {text}") from None

    def entrypoint(self, step: PipelineStep, ds: date, attempt: int) -> str:
        """The shell command attempt ``attempt`` of ``step`` runs as its job's driver."""
        if step.kind == "command":
            return render(step.command, ds, self.pipeline.pipeline)
        source = self.pipeline.source
        if self.pipeline.working_dir is not None:
            source = os.path.relpath(source, self.pipeline.resolve(self.pipeline.working_dir))
        # --root: the job writes where this scheduler reads, whatever its working directory
        # (a relative local root such as ./.mlplatform would otherwise resolve elsewhere)
        return shlex.join(
            ["mlp", "pipeline", "step", source, step.name, "--ds", ds.isoformat(), "--attempt", str(attempt), "--root", self.storage.root]
        )

    def run_attempt(self, ds: date, name: str, attempt: int) -> str:
        """Run exactly attempt ``attempt`` of one step (what an Airflow task try does: Airflow
        orders the steps and owns the retries). Returns the step's final state: ``skipped``
        when ds is not a scheduled day, the step's ``when`` does not match or a dependency
        was skipped; ``upstream_failed`` when a dependency failed.

        Raises:
            JobError: the attempt's job did not succeed (so Airflow retries the task).
        """
        step = self.pipeline.step(name)
        if not self.pipeline.parsed_schedule.matches(ds):
            return self._final(ds, step, "skipped", reason=f"{ds} is not a day of schedule {self.pipeline.schedule!r}")
        while True:
            status = self._advance(ds, step, {}, attempt=attempt)
            if status is not None:
                return status
            time.sleep(self.pipeline.poll)

    def client(self) -> Any:
        if self._client is None:
            from mlplatform.jobs.submit import Jobs

            self._client = Jobs().client(self.address)
        return self._client

    # ----------------------------------------------------------------------- many days
    def backfill(self, start: date, end: date, *, concurrency: int | None = None) -> list[RunResult]:
        """Run each scheduled day from ``start`` to ``end`` (inclusive), oldest first, at most
        ``concurrency`` (default the pipeline's) at once. Days already finished are not redone.

        Raises:
            ConfigError: ``end`` is before ``start``.
        """
        if end < start:
            raise ConfigError(f"backfill end {end} is before its start {start}")
        days = list(self.pipeline.parsed_schedule.days(start, end))
        return self._run_days(days, concurrency or self.pipeline.concurrency)

    def _run_days(self, days: list[date], concurrency: int) -> list[RunResult]:
        if concurrency == 1 or len(days) <= 1:
            return [self.run(d) for d in days]
        with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="mlp-run") as pool:
            return list(pool.map(self.run, days))

    def due(self, now: datetime | None = None) -> list[date]:
        """Days whose run is due at ``now`` and has not finished (missed ones included)."""
        now = now or datetime.now(UTC)
        days = self.pipeline.parsed_schedule.due_days(self.pipeline.start, now)
        if self.pipeline.end is not None:
            days = [d for d in days if d <= self.pipeline.end]
        finished = {d for d in self.state.runs() if (self.state.run(d) or {}).get("status") in FINAL}
        return [d for d in days if d not in finished]

    def serve(self, *, stop: threading.Event | None = None, once: bool = False, tick: float = 30.0) -> list[RunResult]:
        """The scheduler loop: run every due day (catching up missed ones, oldest first), then
        wait for the next; with ``once``, return after catching up. Returns the runs it made."""
        stop = stop or threading.Event()
        results: list[RunResult] = []
        while not stop.is_set():
            due = self.due()
            if due:
                log.info("[%s] due: %s", self.pipeline.pipeline, ", ".join(d.isoformat() for d in due))
                results.extend(self._run_days(due, self.pipeline.concurrency))
            if once:
                break
            stop.wait(tick)
        return results


def _lookup(client: Any, sid: str) -> Any:
    try:
        return client.get_job_info(sid)
    except RuntimeError as exc:
        if "404" in str(exc) or "does not exist" in str(exc):
            return None
        raise JobError(f"cannot look up job {sid}: {exc}") from None


def _status(client: Any, sid: str) -> str:
    return str(client.get_job_status(sid)).split(".")[-1]
