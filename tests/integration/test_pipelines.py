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
import signal
import socket
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import psutil
import pytest
import yaml

from mlplatform.pipelines import Scheduler, load_pipeline, submission_id
from mlplatform.pipelines.state import RunState

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DS = date(2025, 1, 6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_cluster(gcs_port: int) -> None:
    """Stop only this head's processes (never `ray stop`: it stops every Ray on the machine)."""
    mine = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if f":{gcs_port}" in cmd or f"--gcs_server_port={gcs_port}" in cmd or f"--port={gcs_port}" in cmd:
            mine.append(proc)
    for proc in list(mine):
        try:
            mine.extend(c for c in proc.children(recursive=True) if c not in mine)
        except psutil.NoSuchProcess:
            pass
    for proc in mine:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(mine, timeout=10)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    from ray._common.utils import get_ray_address_file

    current = Path(get_ray_address_file(None))
    if current.exists() and current.read_text().strip().endswith(f":{gcs_port}"):
        current.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def job_api():
    """A one-node Ray (2 CPUs) with its dashboard, whose job API the schedulers use; its jobs
    find `mlp` on the PATH as a cluster's nodes do. Yields the dashboard URL."""
    gcs_port, dash_port = _free_port(), _free_port()
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
         f"--dashboard-agent-listen-port={_free_port()}", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180, cwd=ROOT,
    )  # fmt: skip
    try:
        if started.returncode != 0:
            pytest.fail(f"ray start failed:\n{(started.stdout + started.stderr)[-3000:]}")
        yield f"http://127.0.0.1:{dash_port}"
    finally:
        _kill_cluster(gcs_port)
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
    from ray.job_submission import JobSubmissionClient

    return sorted(j.submission_id for j in JobSubmissionClient(job_api).list_jobs() if (j.submission_id or "").startswith(f"mlp-{pipeline}-"))


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
        ],
    }
    pipeline = load_pipeline(_write(tmp_path / "p.yaml", spec))
    result = Scheduler(pipeline, address=job_api).run(DS)
    assert result.status == "failed"
    assert result.steps == {"broken": "failed", "after": "upstream_failed"}
    assert not after.exists()
    # a rerun does not retry a failed day's steps again
    assert Scheduler(pipeline, address=job_api).run(DS).steps == result.steps
    assert _jobs(job_api, "fails") == [submission_id("fails", "broken", DS, n) for n in (1, 2)]


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
