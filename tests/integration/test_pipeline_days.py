"""Pipelines on a real local Ray with its job API (a head started here with ``ray start``): each
step a Ray job submitted through the Jobs API, run state under a local root and on the S3
test server.

The scheduling scenarios use cheap shell-command steps (a job that runs ``sh``, no Python
import) so that what is measured is the scheduler: retries with backoff, a SIGKILLed
scheduler resuming, two schedulers racing. The underwriting days run the workload's own steps
in their jobs on tiny data."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import pytest
import yaml

from mlplatform.pipelines import Scheduler, load_pipeline, submission_id
from mlplatform.pipelines.state import RunState

from _ray_cluster import free_port, kill_cluster

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DS = date(2025, 1, 6)




@pytest.fixture(scope="module")
def job_api():
    """A one-node Ray (2 CPUs) with its dashboard, whose job API the schedulers use; its jobs
    find `mlp` on the PATH as a cluster's nodes do. Yields the dashboard URL."""
    gcs_port, dash_port = free_port(), free_port()
    # Token authentication, as cluster.yaml turns it on: the head, the schedulers (this process
    # and the `mlp` it starts) and nothing else carry this cluster's own token.
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    saved = {k: os.environ.get(k) for k in auth}
    os.environ.update(auth)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    started = subprocess.run(
        [str(BIN / "ray"), "start", "--head", f"--port={gcs_port}", f"--dashboard-port={dash_port}",
         "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=2", "--num-gpus=0",
         f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180, cwd=ROOT,
    )  # fmt: skip
    try:
        if started.returncode != 0:
            pytest.fail(f"ray start failed:\n{(started.stdout + started.stderr)[-3000:]}")
        yield f"http://127.0.0.1:{dash_port}"
    finally:
        kill_cluster(gcs_port)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _write(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _mark(marker: Path, text: str = "ran") -> str:
    """A shell command that appends one line to ``marker`` (how a test counts a step's runs)."""
    return f"echo {text} >> {marker}"


def _jobs(job_api: str, pipeline: str) -> list[str]:
    from mlplatform.jobs.submit import Jobs

    return sorted(j.submission_id for j in Jobs().client(job_api).list_jobs() if (j.submission_id or "").startswith(f"mlp-{pipeline}-"))


def _mlp(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "mlp"), *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


# ------------------------------------------------------------------------ retries
def test_step_failing_twice_then_succeeding_is_retried_with_backoff(job_api, tmp_path):
    counter, after = tmp_path / "tries", tmp_path / "after"
    # fails on its first two runs, succeeds on the third
    flaky = f"n=$(cat {counter} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {counter}; test $n -ge 3"
    spec = {
        "pipeline": "retry",
        "platform": {"storage": {"root": str(tmp_path / "root")}},
        "start": "2025-01-01",
        "poll": 0.2,
        "defaults": {"retries": 2, "retry_delay": 1, "timeout": 60},
        "steps": [
            {"name": "flaky", "kind": "command", "command": flaky},
            {"name": "after", "kind": "command", "command": _mark(after), "depends_on": ["flaky"]},
        ],
    }
    pipeline = load_pipeline(_write(tmp_path / "p.yaml", spec))
    result = Scheduler(pipeline, address=job_api).run(DS)

    assert result.steps == {"flaky": "succeeded", "after": "succeeded"}
    state = RunState(Scheduler(pipeline, address=job_api).storage, "retry")
    attempts = state.attempts(DS, "flaky")
    assert [a["status"] for a in attempts] == ["FAILED", "FAILED", "SUCCEEDED"]
    assert [a["job_id"] for a in attempts] == [submission_id("retry", "flaky", DS, n) for n in (1, 2, 3)]
    # backoff: 1s before the first retry, 2s before the second (from each failure's end)
    assert attempts[1]["started_at"] - attempts[0]["ended_at"] >= 1.0
    assert attempts[2]["started_at"] - attempts[1]["ended_at"] >= 2.0
    assert state.step(DS, "flaky")["attempts"] == 3
    assert Path(attempts[0]["log"]).exists()
    assert after.read_text().splitlines() == ["ran"]
    assert _jobs(job_api, "retry") == sorted([*(a["job_id"] for a in attempts), submission_id("retry", "after", DS, 1)])


def test_exhausted_retries_fail_the_step_and_stop_its_dependents(job_api, tmp_path):
    after = tmp_path / "after"
    spec = {
        "pipeline": "fails",
        "platform": {"storage": {"root": str(tmp_path / "root")}},
        "start": "2025-01-01",
        "poll": 0.2,
        "defaults": {"retries": 1, "retry_delay": 0, "timeout": 60},
        "steps": [
            {"name": "broken", "kind": "command", "command": "exit 3"},
            {"name": "after", "kind": "command", "command": _mark(after), "depends_on": ["broken"]},
            {"name": "hangs", "kind": "command", "command": "sleep 60", "timeout": 2, "retries": 0},
        ],
    }
    pipeline = load_pipeline(_write(tmp_path / "p.yaml", spec))
    started = time.monotonic()
    result = Scheduler(pipeline, address=job_api).run(DS)
    assert time.monotonic() - started < 40  # the hanging job was stopped at its timeout
    assert result.status == "failed"
    assert result.steps == {"broken": "failed", "after": "upstream_failed", "hangs": "failed"}
    assert not after.exists()
    state = RunState(Scheduler(pipeline, address=job_api).storage, "fails")
    assert [a["status"] for a in state.attempts(DS, "hangs")] == ["TIMED_OUT"]
    # a rerun does not retry a failed day's steps again
    assert Scheduler(pipeline, address=job_api).run(DS).steps == result.steps
    assert _jobs(job_api, "fails") == sorted([*(submission_id("fails", "broken", DS, n) for n in (1, 2)), submission_id("fails", "hangs", DS, 1)])


# ------------------------------------------------------------------------ a killed scheduler
def test_sigkilled_scheduler_restarted_finishes_the_day_without_rerunning_or_duplicating(job_api, tmp_path):
    marks = {name: tmp_path / name for name in ("first", "slow", "last")}
    spec = {
        "pipeline": "killed",
        "platform": {"storage": {"root": str(tmp_path / "root")}},
        "start": "2025-01-01",
        "poll": 0.2,
        "lease": 2,
        "defaults": {"retries": 0, "timeout": 120},
        "steps": [
            {"name": "first", "kind": "command", "command": _mark(marks["first"])},
            {"name": "slow", "kind": "command", "command": f"{_mark(marks['slow'])}; sleep 6", "depends_on": ["first"]},
            {"name": "last", "kind": "command", "command": _mark(marks["last"]), "depends_on": ["slow"]},
        ],
    }
    path = _write(tmp_path / "p.yaml", spec)
    state = RunState(Scheduler(load_pipeline(path), address=job_api).storage, "killed")
    first = _mlp("pipeline", "run", str(path), "--ds", DS.isoformat(), "--address", job_api)
    deadline = time.monotonic() + 90
    while not marks["slow"].exists():  # the slow step's job has started
        assert first.poll() is None, first.stdout.read()
        assert time.monotonic() < deadline, "the slow step never started"
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert state.step(DS, "slow") is None  # killed mid-step

    second = _mlp("pipeline", "run", str(path), "--ds", DS.isoformat(), "--address", job_api)
    out, _ = second.communicate(timeout=120)
    assert second.returncode == 0, out
    assert "following mlp-killed-slow-20250106-a1" in out  # found the running job, did not resubmit
    assert {name: m.read_text().splitlines() for name, m in marks.items()} == {n: ["ran"] for n in marks}
    assert _jobs(job_api, "killed") == sorted(submission_id("killed", s, DS, 1) for s in marks)
    assert state.run(DS)["status"] == "succeeded"


# ------------------------------------------------------------------------ two schedulers
@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_schedulers_started_at_once_never_both_run_a_step(job_api, tmp_path, where, request):
    if where == "s3":
        s3_server = request.getfixturevalue("s3_server")
        bucket = request.getfixturevalue("s3_bucket")
        platform = {"storage": {"root": f"s3://{bucket}/runs", "s3": {"endpoint_url": s3_server}}}
    else:
        platform = {"storage": {"root": str(tmp_path / "root")}}
    names = ("a", "b", "c", "d")
    marks = {n: tmp_path / n for n in names}
    spec = {
        "pipeline": f"race-{where}",
        "platform": platform,
        "start": "2025-01-01",
        "poll": 0.2,
        "lease": 5,
        "defaults": {"retries": 0, "timeout": 60},
        "steps": [
            {"name": "a", "kind": "command", "command": _mark(marks["a"])},
            # b and c are independent: one scheduler may take each
            {"name": "b", "kind": "command", "command": f"{_mark(marks['b'])}; sleep 1", "depends_on": ["a"]},
            {"name": "c", "kind": "command", "command": f"{_mark(marks['c'])}; sleep 1", "depends_on": ["a"]},
            {"name": "d", "kind": "command", "command": _mark(marks["d"]), "depends_on": ["b", "c"]},
        ],
    }
    path = _write(tmp_path / "p.yaml", spec)
    both = [_mlp("pipeline", "run", str(path), "--ds", DS.isoformat(), "--address", job_api) for _ in range(2)]
    outs = [p.communicate(timeout=150)[0] for p in both]
    assert [p.returncode for p in both] == [0, 0], outs
    assert {n: m.read_text().splitlines() for n, m in marks.items()} == {n: ["ran"] for n in names}
    assert _jobs(job_api, f"race-{where}") == sorted(submission_id(f"race-{where}", n, DS, 1) for n in names)
    for out in outs:
        assert f"{DS} succeeded" in out


# ------------------------------------------------------------------------ the underwriting days
DAYS = [date(2025, 1, 4), date(2025, 1, 5), date(2025, 1, 6)]  # Saturday, Sunday, Monday (the training day)


@pytest.fixture(scope="module")
def underwriting_days(job_api, tmp_path_factory):
    """configs/pipelines/underwriting_daily.yaml on tiny data, run for three consecutive days
    (`mlp pipeline backfill`), each step a Ray job running the workload's own steps."""
    tmp = tmp_path_factory.mktemp("underwriting-days")
    root = tmp / "root"
    workload = {
        "workload": "underwriting",
        "platform": {"storage": {"root": str(root)}},
        "data": {"applications": 1500, "merchants": 20, "seed": 3},
        "model": {"train": {"num_workers": 1, "num_boost_round": 30, "report_every": 10}},
        "serve": {"deploy": False},
    }
    _write(tmp / "underwriting.yaml", workload)
    spec = yaml.safe_load((ROOT / "configs/pipelines/underwriting_daily.yaml").read_text())
    spec.update(workload="underwriting.yaml", poll=0.3, defaults={"retries": 0, "timeout": 600})
    # tiny data: a day holds a handful of rows, so validation looks back a month; one view (the
    # strict one) keeps the jobs few
    spec["steps"][1]["params"].update(start="2024-12-01", views=["applicant_history"])
    path = _write(tmp / "daily.yaml", spec)
    backfill = _mlp("pipeline", "backfill", str(path), "--start", DAYS[0].isoformat(), "--end", DAYS[-1].isoformat(), "--address", job_api)
    try:
        out, _ = backfill.communicate(timeout=1500)  # ~13 jobs; minutes on a loaded 2-core machine
    finally:
        backfill.kill()
    return {"path": path, "root": root, "spec": spec, "out": out, "returncode": backfill.returncode}


def test_three_days_produce_their_datasets_a_gated_promotion_and_a_lineage_chain(underwriting_days, job_api):
    from mlplatform import Platform

    assert underwriting_days["returncode"] == 0, underwriting_days["out"]
    pipeline = load_pipeline(underwriting_days["path"])
    platform = Platform.from_config({"storage": {"root": str(underwriting_days["root"])}})
    state = RunState(platform.storage, pipeline.pipeline)
    expected_steps = {"ingest", "validate", "materialize", "train", "gate", "promote"}
    generated = []
    for ds in DAYS:
        run = state.run(ds)
        assert run["status"] == "succeeded"
        trains = ds.isoweekday() == 1
        assert run["steps"] == {s: ("succeeded" if trains or s in ("ingest", "validate", "materialize") else "skipped") for s in expected_steps}
        ingest = state.step(ds, "ingest")["outcome"]
        generated.append(ingest["wrote"]["generate"]["output"])  # {table: dataset version}
        # every daily view backfilled up to the end of the day
        for view in ("applicant_history", "merchant_risk", "merchant_activity"):
            assert f"backfill {view}" in ingest["wrote"]
        validated = state.step(ds, "validate")["outcome"]["wrote"]["quality_reports"]
        assert validated["applicant_history"]["passed"] and validated["applicant_history"]["rows"] > 0
    # each day published a new version of every raw table (the data as known at its end)
    for table in generated[0]:
        assert [g[table] for g in generated] == sorted({g[table] for g in generated})
    # the training day: the version trained in its train job passed the gate and was promoted
    train = state.step(DAYS[-1], "train")["outcome"]
    model = train["model"]
    assert state.step(DAYS[-1], "promote")["outcome"]["wrote"]["aliases"]["production"] == model["version"]
    assert platform.models.aliases(model["name"])["production"] == model["version"]
    version = platform.models.get(model["name"], model["version"])
    # lineage chain: model -> the pipeline run -> its training set -> the day's feature data
    assert version.lineage["pipeline_run"] == f"{pipeline.pipeline}/{DAYS[-1].isoformat()}"
    snapshot = train["wrote"]["training set"]["output"]["version"]
    assert version.lineage["training_set"]["version"] == snapshot
    assert version.lineage["training_set"]["metadata"]["cutoff"].startswith("2025-01-07")  # labels known by the day's end
    # one job per step that ran, each submitted once
    ran = [(ds, s) for ds in DAYS for s, status in state.run(ds)["steps"].items() if status == "succeeded"]
    assert _jobs(job_api, pipeline.pipeline) == sorted(submission_id(pipeline.pipeline, s, ds, 1) for ds, s in ran)


def test_failing_validation_stops_the_steps_after_it_and_leaves_every_alias(underwriting_days, job_api, tmp_path):
    from mlplatform import Platform

    assert underwriting_days["returncode"] == 0, underwriting_days["out"]
    platform = Platform.from_config({"storage": {"root": str(underwriting_days["root"])}})
    spec = dict(underwriting_days["spec"])
    # the next day without new data: validated as of a month later, the history is stale
    # (applicant_history is strict with max_staleness 2d)
    spec["steps"] = [dict(s) for s in spec["steps"] if s["name"] != "ingest"]
    validate = {"views": ["applicant_history"], "start": "2024-12-01", "end": "2025-02-07"}
    spec["steps"][0] = {**spec["steps"][0], "depends_on": [], "params": validate}
    spec["steps"][2] = {**spec["steps"][2], "when": None}  # train any day: only the failed validation stops it
    path = _write(underwriting_days["path"].parent / "stale.yaml", spec)
    before = {name: platform.models.aliases(name) for name in platform.models.names()}
    day = date(2025, 1, 7)
    result = Scheduler(load_pipeline(path), address=job_api).run(day)
    assert result.steps == {
        "validate": "failed", "materialize": "upstream_failed", "train": "upstream_failed",
        "gate": "upstream_failed", "promote": "upstream_failed",
    }  # fmt: skip
    log_text = Path(RunState(platform.storage, spec["pipeline"]).attempts(day, "validate")[-1]["log"]).read_text()
    assert "validate of feature view 'applicant_history' refused (quality policy strict)" in log_text
    assert "max_staleness" in log_text
    assert {name: platform.models.aliases(name) for name in platform.models.names()} == before


# ------------------------------------------------------------------------ Airflow
AIRFLOW_PYTHON = Path(os.environ.get("MLP_AIRFLOW_PYTHON") or ROOT / ".venv-airflow/bin/python")
_DAG_FILE = """
import json, sys
from datetime import datetime, UTC
from mlplatform.integrations.airflow import build_dag

dag = build_dag({pipeline!r}, mlp={mlp!r}, address={address!r})

if __name__ == "__main__":
    run = dag.test(logical_date=datetime.fromisoformat(sys.argv[1]))
    print("DAGRUN " + json.dumps({{"state": str(run.state), "tasks": {{ti.task_id: str(ti.state) for ti in run.get_task_instances()}}}}))
"""


def test_airflow_dag_test_runs_the_same_jobs_and_records(job_api, tmp_path):
    """A real Airflow (3.x, in its own virtualenv made by .ci/setup: its pins are not ours)
    runs the DAG built from a pipeline file with ``dag.test()``: each task submits the step's
    Ray job under the scheduler's submission id and writes the scheduler's records."""
    assert AIRFLOW_PYTHON.exists(), f"no Airflow virtualenv at {AIRFLOW_PYTHON}: run .ci/setup (it creates .venv-airflow)"
    counter, marks = tmp_path / "tries", {n: tmp_path / n for n in ("a", "c", "d")}
    flaky = f"n=$(cat {counter} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {counter}; test $n -ge 2"
    spec = {
        "pipeline": "airflow",
        "platform": {"storage": {"root": str(tmp_path / "root")}},
        "schedule": "0 2 * * *",
        "start": "2025-01-01",
        "poll": 0.2,
        "defaults": {"retries": 0, "timeout": 60},
        "steps": [
            {"name": "a", "kind": "command", "command": _mark(marks["a"])},
            {"name": "b", "kind": "command", "command": flaky, "depends_on": ["a"], "retries": 1, "retry_delay": 1},
            {"name": "c", "kind": "command", "command": _mark(marks["c"]), "depends_on": ["a"], "when": "* * 2"},  # Tuesdays
            {"name": "d", "kind": "command", "command": _mark(marks["d"]), "depends_on": ["c"]},
        ],
    }
    path = _write(tmp_path / "p.yaml", spec)
    dags = tmp_path / "dags"
    dags.mkdir()
    dag_file = dags / "pipeline_dag.py"
    dag_file.write_text(_DAG_FILE.format(pipeline=str(path), mlp=str(BIN / "mlp"), address=job_api))
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(tmp_path / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PYTHONPATH": str(ROOT),  # the DAG file imports mlplatform from this checkout
    }
    template = AIRFLOW_PYTHON.parents[1] / "home" / "airflow.db"  # migrated by .ci/setup
    if template.exists():
        (tmp_path / "airflow").mkdir()
        shutil.copy(template, tmp_path / "airflow" / "airflow.db")
    else:
        migrated = subprocess.run(
            [str(AIRFLOW_PYTHON.with_name("airflow")), "db", "migrate"], env=env, capture_output=True, text=True, timeout=300
        )
        assert migrated.returncode == 0, migrated.stdout[-2000:] + migrated.stderr[-2000:]
    # triggered on Jan 7 at 02:00: the run for ds 2025-01-06, a Monday
    ran = subprocess.run(
        [str(AIRFLOW_PYTHON), str(dag_file), "2025-01-07T02:00:00+00:00"], env=env, capture_output=True, text=True, timeout=400
    )
    lines = [line for line in ran.stdout.splitlines() if line.startswith("DAGRUN ")]
    assert ran.returncode == 0 and lines, ran.stdout[-3000:] + ran.stderr[-3000:]
    import json

    dagrun = json.loads(lines[-1].removeprefix("DAGRUN "))
    assert dagrun["tasks"] == {"a": "success", "b": "success", "c": "skipped", "d": "skipped"}, dagrun
    assert dagrun["state"] == "success"
    # the scheduler's records and job ids: b's second Airflow try was its attempt 2
    state = RunState(Scheduler(load_pipeline(path), address=job_api).storage, "airflow")
    assert {s: state.step(DS, s)["status"] for s in "abc"} == {"a": "succeeded", "b": "succeeded", "c": "skipped"}
    assert state.step(DS, "d") is None  # Airflow skipped it downstream of c without running it
    assert [a["status"] for a in state.attempts(DS, "b")] == ["FAILED", "SUCCEEDED"]
    assert marks["a"].read_text().splitlines() == ["ran"] and not marks["c"].exists() and not marks["d"].exists()
    assert _jobs(job_api, "airflow") == sorted(
        [submission_id("airflow", "a", DS, 1), submission_id("airflow", "b", DS, 1), submission_id("airflow", "b", DS, 2)]
    )
