"""Pipeline files, schedules, run state and leases, and the Airflow DAG's tasks — without Ray."""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from mlplatform.config import StorageConfig
from mlplatform.errors import ConfigError
from mlplatform.integrations.airflow import AIRFLOW_DS, dag_tasks
from mlplatform.pipelines import Schedule, Scheduler, load_pipeline, submission_id
from mlplatform.pipelines.spec import render
from mlplatform.pipelines.state import RunState
from mlplatform.storage import Storage

DS = date(2025, 1, 6)


def _pipeline(tmp_path, **changes):
    spec = {
        "pipeline": "daily",
        "platform": {"storage": {"root": str(tmp_path / "root")}},
        "start": "2025-01-01",
        "defaults": {"retries": 2, "retry_delay": "30s", "timeout": "1h"},
        "steps": [
            {"name": "a", "kind": "command", "command": "echo {{ ds }} {{ ds_nodash }} {{ next_ds }}"},
            {"name": "b", "kind": "command", "command": "echo b", "depends_on": ["a"], "retries": 0, "timeout": "5m"},
            {"name": "c", "kind": "validate", "depends_on": ["a"], "when": "* * 1"},
        ],
    }
    spec.update(changes)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return load_pipeline(path)


def test_the_shipped_underwriting_pipeline_loads():
    pipeline = load_pipeline("configs/pipelines/underwriting_daily.yaml")
    assert [s.name for s in pipeline.order()] == ["ingest", "validate", "materialize", "train", "gate", "promote"]
    assert pipeline.workload and pipeline.overrides["data.end"] == "{{ next_ds }}T00:00:00Z"


def test_steps_are_ordered_by_dependency_and_settings_default(tmp_path):
    pipeline = _pipeline(tmp_path)
    assert [s.name for s in pipeline.order()] == ["a", "b", "c"]
    assert pipeline.settings(pipeline.step("a")) == (2, 30.0, 3600.0)
    assert pipeline.settings(pipeline.step("b")) == (0, 30.0, 300.0)
    scheduler = Scheduler(pipeline, address="http://127.0.0.1:8265")
    assert scheduler.entrypoint(pipeline.step("a"), DS, 1) == "echo 2025-01-06 20250106 2025-01-07"
    assert submission_id("daily", "a", DS, 3) == "mlp-daily-a-20250106-a3"
    # other kinds run `mlp pipeline step` in the job, told the scheduler's (resolved) storage root
    assert scheduler.entrypoint(pipeline.step("c"), DS, 2) == (
        f"mlp pipeline step {pipeline.source} c --ds 2025-01-06 --attempt 2 --root {tmp_path / 'root'}"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"steps": [{"name": "a", "kind": "spark", "command": "x"}]}, "steps.0.kind"),
        ({"steps": [{"name": "a", "kind": "command", "command": "x", "depends_on": ["zz"]}]}, "unknown step(s) zz"),
        (
            {"steps": [
                {"name": "a", "kind": "command", "command": "x", "depends_on": ["b"]},
                {"name": "b", "kind": "command", "command": "x", "depends_on": ["a"]},
            ]},
            "dependency cycle",
        ),
        ({"steps": [{"name": "a", "kind": "command", "command": "x"}] * 2}, "repeated: a"),
        ({"steps": [{"name": "a", "kind": "command"}]}, "'command' is required"),
        ({"steps": [{"name": "a", "kind": "validate", "command": "x"}]}, "only allowed there"),
        ({"steps": [{"name": "a", "kind": "command", "command": "echo {{ tomorrow }}"}]}, "unknown template"),
        ({"steps": [{"name": "a", "kind": "train"}]}, "set 'workload'"),
        ({"schedule": "*/5 * * * *"}, "single numbers"),
        ({"schedule": "0 25 * * *"}, "out of range"),
        ({"retries": 3}, "retries"),
        ({"pipeline": "Daily Run"}, "pipeline name"),
        ({"start": "yesterday"}, "start"),
        ({"steps": []}, "steps"),
    ],
)
def test_bad_pipeline_files_are_refused_naming_the_problem(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _pipeline(tmp_path, **change)


def test_templates_render_recursively_and_refuse_unknown_names():
    assert render({"a": ["{{ prev_ds }}", {"b": "{{pipeline}}-{{ ds }}"}], "n": 3}, DS, "p") == {
        "a": ["2025-01-05", {"b": "p-2025-01-06"}],
        "n": 3,
    }
    with pytest.raises(ConfigError, match="unknown template"):
        render("{{ execution_date }}", DS, "p")


# ----------------------------------------------------------------------------- schedules
def test_a_day_is_due_at_the_schedules_time_on_the_next_day_with_catch_up():
    schedule = Schedule.parse("30 2 * * *")
    assert schedule.due(DS) == datetime(2025, 1, 7, 2, 30, tzinfo=UTC)
    now = datetime(2025, 1, 7, 2, 29, tzinfo=UTC)
    assert schedule.due_days(date(2025, 1, 1), now) == [date(2025, 1, d) for d in range(1, 6)]
    assert schedule.due_days(date(2025, 1, 1), now + timedelta(minutes=1))[-1] == DS


def test_day_fields_select_days_and_dom_or_dow_when_both_are_restricted():
    mondays = Schedule.parse("0 2 * * 1")
    assert list(mondays.days(date(2025, 1, 1), date(2025, 1, 20))) == [date(2025, 1, 6), date(2025, 1, 13), date(2025, 1, 20)]
    either = Schedule.parse("0 0 1 * 0")  # the 1st of a month or a Sunday, as cron does
    assert list(either.days(date(2025, 1, 1), date(2025, 1, 12))) == [date(2025, 1, 1), date(2025, 1, 5), date(2025, 1, 12)]
    assert Schedule.parse_days("* * 7").matches(date(2025, 1, 5))  # 7 is Sunday too
    assert Schedule.parse("@daily").matches(DS)


@settings(max_examples=200, deadline=None)
@given(
    dom=st.sets(st.integers(1, 31), min_size=1, max_size=4),
    month=st.sets(st.integers(1, 12), min_size=1, max_size=4),
    dow=st.sets(st.integers(0, 6), min_size=1, max_size=3),
    restrict=st.sampled_from(["dom", "dow", "both", "neither"]),
    start=st.dates(date(2020, 1, 1), date(2030, 1, 1)),
)
def test_scheduled_days_equal_a_brute_force_cron_reading(dom, month, dow, restrict, start):
    dom_text = ",".join(map(str, sorted(dom))) if restrict in ("dom", "both") else "*"
    dow_text = ",".join(map(str, sorted(dow))) if restrict in ("dow", "both") else "*"
    schedule = Schedule.parse(f"0 3 {dom_text} {','.join(map(str, sorted(month)))} {dow_text}")
    end = start + timedelta(days=90)

    def brute(day: date) -> bool:
        in_dom, in_dow = day.day in dom, day.isoweekday() % 7 in dow
        if day.month not in month:
            return False
        return {"dom": in_dom, "dow": in_dow, "both": in_dom or in_dow, "neither": True}[restrict]

    expected = [start + timedelta(days=i) for i in range(91) if brute(start + timedelta(days=i))]
    assert list(schedule.days(start, end)) == expected


# ----------------------------------------------------------------------------- leases
def _state(tmp_path) -> RunState:
    return RunState(Storage(StorageConfig(root=str(tmp_path / "root"))), "daily")


def test_one_scheduler_holds_a_step_until_its_lease_expires(tmp_path):
    state = _state(tmp_path)
    first = state.acquire(DS, "a", "one", ttl=0.5)
    assert first is not None and first.generation == 1
    assert state.acquire(DS, "a", "two", ttl=0.5) is None  # live: not taken over
    assert state.acquire(DS, "b", "two", ttl=0.5) is not None  # another step is free
    time.sleep(0.6)
    second = state.acquire(DS, "a", "two", ttl=5)  # expired: taken over by the next generation
    assert second is not None and second.generation == 2
    assert not first.renew() and first.lost  # the old owner finds out and stops
    assert state.lease_holder(DS, "a")["owner"] == "two"


def test_of_two_schedulers_racing_for_a_generation_exactly_one_wins(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    state = _state(tmp_path)
    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(lambda i: state.acquire(DS, "a", f"owner{i}", ttl=30), range(8)))
    assert sum(lease is not None for lease in won) == 1


def test_a_lease_is_renewed_while_held_and_released_on_exit(tmp_path):
    state = _state(tmp_path)
    lease = state.acquire(DS, "a", "one", ttl=0.6)
    with lease:
        time.sleep(1.0)  # longer than the ttl: the heartbeat renewed it
        assert state.acquire(DS, "a", "two", ttl=1) is None
    assert state.acquire(DS, "a", "two", ttl=1) is not None  # released: no need to wait a ttl


def test_step_records_are_written_once(tmp_path):
    state = _state(tmp_path)
    assert state.finish_step(DS, "a", {"status": "succeeded"})
    assert not state.finish_step(DS, "a", {"status": "failed"})
    assert state.step(DS, "a")["status"] == "succeeded"


# ----------------------------------------------------------------------------- Airflow
def test_the_airflow_dag_has_a_task_per_step_with_the_steps_retries_and_order(tmp_path):
    pipeline = _pipeline(tmp_path)
    tasks = {t.task_id: t for t in dag_tasks(pipeline, mlp="/opt/mlp", address="http://head:8265")}
    assert list(tasks) == ["a", "b", "c"]
    assert tasks["b"].upstream == ("a",) and tasks["c"].upstream == ("a",)
    assert (tasks["a"].retries, tasks["a"].retry_delay) == (2, timedelta(seconds=30))
    assert tasks["b"].retries == 0 and tasks["b"].execution_timeout > timedelta(minutes=5)
    assert tasks["a"].bash_command == (
        f"/opt/mlp pipeline run {pipeline.source} --step a --address http://head:8265 "
        f"--ds {AIRFLOW_DS} --attempt {{{{ ti.try_number }}}}"
    )


# ----------------------------------------------------------------------------- CLI
def test_pipeline_commands_answer_bad_input_with_one_line_and_status_reads_records(tmp_path, capsys):
    from mlplatform.cli import main

    pipeline = _pipeline(tmp_path)
    assert main(["pipeline", "run", pipeline.source, "--ds", "06/01/2025"]) == 1
    assert capsys.readouterr().err == "error: bad ds '06/01/2025': give a day as YYYY-MM-DD, e.g. 2025-01-31\n"
    assert main(["pipeline", "backfill", pipeline.source, "--start", "2025-01-05", "--end", "2025-01-01"]) == 1
    assert "before its start" in capsys.readouterr().err
    assert main(["pipeline", "run", pipeline.source, "--ds", "2025-01-06", "--attempt", "2"]) == 1
    assert "give --step too" in capsys.readouterr().err

    assert main(["pipeline", "status", pipeline.source]) == 0
    assert capsys.readouterr().out.startswith("daily: no runs under ")
    state = _state(tmp_path)
    state.start_run(DS)
    state.write_attempt(DS, "a", 1, {"job_id": "mlp-daily-a-20250106-a1", "status": "FAILED", "duration_s": 1.5, "log": "/x/1.log"})
    state.write_attempt(DS, "a", 2, {"job_id": "mlp-daily-a-20250106-a2", "status": "SUCCEEDED", "duration_s": 2.0, "log": "/x/2.log"})
    state.finish_step(DS, "a", {"status": "succeeded"})
    state.finish_step(DS, "c", {"status": "skipped", "reason": "when '* * 1' does not match"})
    assert main(["pipeline", "status", pipeline.source]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("2025-01-06 running")
    assert lines[1].split() == ["a", "succeeded", "attempts", "2", "3.5s", "log", "/x/2.log"]
    assert lines[2].split() == ["b", "pending", "attempts", "0"]
    assert lines[3].split()[:4] == ["c", "skipped", "attempts", "0"] and "does not match" in lines[3]


def test_the_scheduler_finds_due_days_catching_up_and_leaving_finished_ones(tmp_path):
    pipeline = _pipeline(tmp_path, schedule="0 2 * * *", end="2025-01-05")
    scheduler = Scheduler(pipeline, address="http://127.0.0.1:8265")  # no Ray is contacted to find due days
    now = datetime(2025, 1, 5, 3, 0, tzinfo=UTC)  # Jan 4's run is due (02:00 on Jan 5)
    assert scheduler.due(now) == [date(2025, 1, d) for d in range(1, 5)]
    scheduler.state.finish_run(date(2025, 1, 2), "succeeded", {})
    scheduler.state.finish_run(date(2025, 1, 3), "failed", {})  # finished too: a rerun is by hand
    assert scheduler.due(now) == [date(2025, 1, 1), date(2025, 1, 4)]
    assert scheduler.due(datetime(2025, 2, 1, tzinfo=UTC))[-1] == date(2025, 1, 5)  # the pipeline's end
