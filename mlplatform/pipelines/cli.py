"""``mlp pipeline``: run, backfill, watch and serve pipelines (handlers; ``mlp`` registers them).

    mlp pipeline run configs/pipelines/underwriting_daily.yaml --ds 2025-01-06
    mlp pipeline backfill configs/pipelines/underwriting_daily.yaml --start 2025-01-01 --end 2025-01-05
    mlp pipeline status configs/pipelines/underwriting_daily.yaml
    mlp pipeline serve configs/pipelines/underwriting_daily.yaml      # the scheduler, until Ctrl-C
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

__all__ = ["SKIPPED_EXIT", "register"]

SKIPPED_EXIT = 99  # `mlp pipeline run --step S --attempt N` when the step is skipped


def _scheduler(args: argparse.Namespace) -> Any:
    from mlplatform.pipelines.scheduler import Scheduler
    from mlplatform.pipelines.spec import load_pipeline

    return Scheduler(load_pipeline(args.pipeline), address=args.address)


def _print_run(result: Any) -> None:
    steps = ", ".join(f"{name} {status}" for name, status in result.steps.items())
    print(f"{result.ds} {result.status}: {steps}")


def cmd_run(args: argparse.Namespace) -> int:
    from mlplatform.pipelines.schedule import parse_ds

    scheduler = _scheduler(args)
    ds = parse_ds(args.ds)
    if args.attempt is not None:
        if not args.step:
            from mlplatform.errors import ConfigError

            raise ConfigError("--attempt runs one attempt of one step: give --step too")
        status = scheduler.run_attempt(ds, args.step, args.attempt)
        print(f"{ds} {args.step}: {status}")
        # 99: skipped, which Airflow's BashOperator turns into a skipped task (and skips its downstream)
        return {"succeeded": 0, "skipped": SKIPPED_EXIT}.get(status, 1)
    result = scheduler.run(ds, only=args.step)
    _print_run(result)
    return 0 if result.succeeded else 1


def cmd_backfill(args: argparse.Namespace) -> int:
    from mlplatform.pipelines.schedule import parse_ds

    results = _scheduler(args).backfill(parse_ds(args.start), parse_ds(args.end), concurrency=args.concurrency)
    for result in results:
        _print_run(result)
    print(f"{sum(r.succeeded for r in results)} of {len(results)} day(s) succeeded")
    return 0 if all(r.succeeded for r in results) else 1


def cmd_serve(args: argparse.Namespace) -> int:
    scheduler = _scheduler(args)
    print(f"scheduler for {scheduler.pipeline.pipeline} ({scheduler.pipeline.schedule}) on {scheduler.storage.root}", flush=True)
    results = scheduler.serve(once=args.once, tick=args.tick)
    for result in results:
        _print_run(result)
    return 0 if all(r.succeeded for r in results) else 1


def cmd_status(args: argparse.Namespace) -> None:
    from mlplatform.pipelines.schedule import parse_ds
    from mlplatform.pipelines.spec import load_pipeline
    from mlplatform.pipelines.state import RunState
    from mlplatform.storage import Storage

    pipeline = load_pipeline(args.pipeline)
    storage = Storage(pipeline.platform_config().storage)  # status reads the records only: no Ray
    state = RunState(storage, pipeline.pipeline)
    days = [parse_ds(args.ds)] if args.ds else state.runs()[-args.last :]
    if not days:
        print(f"{pipeline.pipeline}: no runs under {storage.root}")
    for ds in days:
        run = state.run(ds) or {}
        print(f"{ds} {run.get('status', 'not started')}" + _span(run.get("started_at"), run.get("finished_at")))
        for step in pipeline.order():
            record = state.step(ds, step.name)
            attempts = state.attempts(ds, step.name)
            status = record["status"] if record else (attempts[-1]["status"].lower() if attempts else "pending")
            took = sum(a.get("duration_s") or 0 for a in attempts)
            line = f"  {step.name:<16} {status:<16} attempts {len(attempts)}"
            if attempts:
                line += f"  {took:7.1f}s  log {attempts[-1].get('log') or '-'}"
            elif record and record.get("reason"):
                line += f"  ({record['reason']})"
            print(line)


def _span(started: float | None, finished: float | None) -> str:
    if not started:
        return ""
    text = f"  started {datetime.fromtimestamp(started, UTC):%Y-%m-%d %H:%M:%S}Z"
    end = finished or time.time()
    return text + (f", {end - started:.0f}s" if finished else ", running")


def cmd_step(args: argparse.Namespace) -> None:
    from mlplatform.pipelines.kinds import run_in_job
    from mlplatform.pipelines.schedule import parse_ds
    from mlplatform.pipelines.spec import load_pipeline

    pipeline = load_pipeline(args.pipeline)
    outcome = run_in_job(pipeline, args.step, parse_ds(args.ds), args.attempt, open_platform=args.open_platform, root=args.root)
    print(f"{args.step} {args.ds}: wrote {', '.join(outcome['wrote']) or 'nothing'}")


def register(sub: Any, *, open_platform: Callable[[Any], Any]) -> None:
    """Add ``mlp pipeline ACTION`` to the ``mlp`` parser's subcommands; ``open_platform``
    builds the Platform a step's job works with from a ``PlatformConfig`` (the front door's)."""
    text = "Run pipelines of Ray jobs: one day, a backfill, the scheduler, their status."
    pipeline = sub.add_parser("pipeline", help=text, description=text)
    actions = pipeline.add_subparsers(dest="pipeline_command", metavar="ACTION", required=True, help="run, backfill, status, serve or step")

    def add(name: str, handler: Any, help_text: str) -> argparse.ArgumentParser:
        p = actions.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(handler=handler)
        p.add_argument("pipeline", help="pipeline YAML, e.g. configs/pipelines/underwriting_daily.yaml")
        return p

    p = add("run", cmd_run, "Run one day of the pipeline (its unfinished steps, as Ray jobs) and wait for it.")
    p.add_argument("--ds", required=True, help="the day to run, YYYY-MM-DD")
    p.add_argument("--step", help="run only this step (its dependencies must be done)")
    p.add_argument(
        "--attempt", type=int, help="with --step: run exactly this attempt (Airflow's try number); exit 99 if skipped"
    )
    p.add_argument("--address", help="Ray job API URL, e.g. http://127.0.0.1:8265 (or RAY_ADDRESS)")

    p = add("backfill", cmd_backfill, "Run each scheduled day from --start to --end, oldest first.")
    p.add_argument("--start", required=True, help="first day, YYYY-MM-DD")
    p.add_argument("--end", required=True, help="last day (inclusive), YYYY-MM-DD")
    p.add_argument("--concurrency", type=int, help="days at once (default the pipeline's concurrency)")
    p.add_argument("--address", help="Ray job API URL (or RAY_ADDRESS)")

    p = add("status", cmd_status, "Show runs, steps, attempts, durations and log locations.")
    p.add_argument("--ds", help="one day; default the latest runs")
    p.add_argument("--last", type=int, default=7, help="how many of the latest runs (default 7)")

    p = add("serve", cmd_serve, "The scheduler loop: catch up missed days, then run each day as it falls due.")
    p.add_argument("--once", action="store_true", help="exit after catching up")
    p.add_argument("--tick", type=float, default=30.0, help="seconds between checks for due days (default 30)")
    p.add_argument("--address", help="Ray job API URL (or RAY_ADDRESS)")

    p = add("step", cmd_step, "Run one step in this process: what each step's Ray job runs.")
    p.set_defaults(open_platform=open_platform)
    p.add_argument("step", help="step name")
    p.add_argument("--ds", required=True, help="the day, YYYY-MM-DD")
    p.add_argument("--attempt", type=int, default=1, help="the attempt this job is (recorded with its outcome)")
    p.add_argument("--root", help="storage root to use instead of the config's (the scheduler passes its own)")
