"""The platform on a real multi-node Ray cluster started here with `ray start`: the main job
submitted with `ray job submit` (storage on the S3-compatible test server), work visibly on
both nodes, and the quickstart notebook executed by a real Jupyter kernel attached to it."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from _ray_cluster import free_port, kill_cluster

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))




def _check(started: subprocess.CompletedProcess) -> None:
    if started.returncode != 0:
        pytest.fail(f"{' '.join(started.args[:3])} failed:\n{(started.stdout + started.stderr)[-4000:]}")


@pytest.fixture(scope="module")
def cluster(s3_server, redis_server):
    """Head (2 CPUs, resource `head`) + a second node (2 CPUs, resource `node2`) on loopback,
    configs/cluster.yaml's backends: storage in a fresh bucket on the moto S3 server, the
    online store in the test redis-server. Yields the environment a client of this cluster uses."""
    import boto3

    s3_bucket = f"mlp-cluster-{secrets.token_hex(6)}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=s3_bucket)
    gcs_port, dash_port, serve_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "MLP_S3_ROOT": f"s3://{s3_bucket}/cluster",
        "MLP_S3_ENDPOINT_URL": s3_server,
        "MLP_REDIS_URL": redis_server.url,
        "MLP_SERVING_PORT": str(serve_port),
        "MLP_API_KEY": secrets.token_urlsafe(24),
        "RAY_ADDRESS": "",
        # The nodes run this environment, as a cluster's nodes run the one cluster.yaml installs:
        # a job's entrypoint (`mlp run …`) finds `mlp` on the PATH of the node that runs it.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        # Token authentication, as cluster.yaml turns it on: every node, the job client and the
        # notebook's kernel carry this cluster's own token (never ~/.ray/auth_token).
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
    }
    env.pop("RAY_ADDRESS")
    common = ["--disable-usage-stats", "--num-gpus=0"]
    node2_tmp = tempfile.mkdtemp(prefix="mlp-node2-", dir="/tmp")  # short: Ray's socket paths live here
    try:
        head = subprocess.run(
            [RAY, "start", "--head", f"--port={gcs_port}", f"--dashboard-port={dash_port}",
             "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=2",
             # The job API runs in the head's dashboard agent; its HTTP port defaults to 52365,
             # which the test session's own Ray already holds.
             f"--dashboard-agent-listen-port={free_port()}",
             '--resources={"head": 1}', *common],
            env=env, capture_output=True, text=True, timeout=180,
        )
        _check(head)
        # Its own temp dir, as a second machine has its own disk: nodes sharing one would share
        # runtime_resources/, and one node's runtime-env agent would delete the job's working
        # directory from under the other node's driver once its own tasks were done with it.
        worker = subprocess.run(
            [RAY, "start", f"--address=127.0.0.1:{gcs_port}", "--num-cpus=2", '--resources={"node2": 1}',
             f"--dashboard-agent-listen-port={free_port()}",
             f"--temp-dir={node2_tmp}", *common],
            env=env, capture_output=True, text=True, timeout=180,
        )
        _check(worker)
        yield {
            **env,
            "RAY_ADDRESS": f"127.0.0.1:{gcs_port}",
            "DASHBOARD": f"http://127.0.0.1:{dash_port}",
            "SERVE_PORT": str(serve_port),
        }
    finally:
        kill_cluster(gcs_port)
        shutil.rmtree(node2_tmp, ignore_errors=True)


def test_mlp_submit_streams_logs_forwards_settings_and_reports_failure(cluster):
    # First in the module: the head has only just started, so this also covers submit waiting
    # for its job agent instead of failing with "No available agent".
    env = {k: v for k, v in cluster.items() if k not in ("DASHBOARD", "SERVE_PORT", "RAY_ADDRESS")}
    mlp = [str(Path(sys.executable).with_name("mlp")), "submit", "--address", cluster["DASHBOARD"], "--"]
    ok = subprocess.run(
        [*mlp, "python", "-c", "import os; print('root on the cluster:', os.environ['MLP_S3_ROOT'])"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert ok.returncode == 0, (ok.stdout + ok.stderr)[-3000:]
    assert f"root on the cluster: {cluster['MLP_S3_ROOT']}" in ok.stdout  # streamed, MLP_* forwarded
    assert ok.stdout.rstrip().endswith("SUCCEEDED")

    failed = subprocess.run(
        [*mlp, "python", "-c", "raise SystemExit(3)"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert failed.returncode == 1
    assert "FAILED" in failed.stderr and "Traceback" not in failed.stderr

    status = subprocess.run(
        [str(Path(sys.executable).with_name("mlp")), "status", "--address", cluster["DASHBOARD"]],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout and "FAILED" in status.stdout


def test_ray_job_submit_runs_main_job_on_both_nodes(cluster):
    env = {k: v for k, v in cluster.items() if k not in ("DASHBOARD", "SERVE_PORT")}
    env.pop("RAY_ADDRESS")
    runtime_env = {"env_vars": {k: v for k, v in env.items() if k.startswith(("MLP_", "AWS_"))}}
    proc = subprocess.run(
        [RAY, "job", "submit", "--address", cluster["DASHBOARD"], "--working-dir", ".",
         "--runtime-env-json", json.dumps(runtime_env), "--",
         "mlp", "run", "tests/data/cluster_underwriting.yaml"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "[training set]" in out and "[register]" in out
    assert "[decide]" in out and "model card:" in out
    assert "stays live on the cluster" in out

    # Asked from a process that carries the cluster's token (this one talks to the test
    # session's own Ray with another).
    count_nodes = (
        "from ray.util.state import list_tasks; import sys; "
        "tasks = list_tasks(address=sys.argv[1], filters=[('state', '=', 'FINISHED')], limit=10000, "
        "raise_on_missing_output=False); print(len({t.node_id for t in tasks if t.node_id}))"
    )
    nodes = subprocess.run(
        [sys.executable, "-c", count_nodes, cluster["DASHBOARD"]], env=env, capture_output=True, text=True, timeout=120
    )
    assert nodes.returncode == 0, nodes.stderr[-3000:]
    assert nodes.stdout.strip().splitlines()[-1] == "2", f"finished tasks ran on {nodes.stdout.strip()} node(s)"


def test_quickstart_notebook_runs_attached_to_the_cluster(cluster):
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    kernel_env = {
        **{k: v for k, v in cluster.items() if k not in ("DASHBOARD", "SERVE_PORT")},
        "MLP_PLATFORM_CONFIG": "configs/cluster.yaml",
        "MLP_SERVING_PORT": cluster["SERVE_PORT"],
    }
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    client.execute(env=kernel_env)
    outputs = "".join(
        o.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
    )
    assert '"decision"' in outputs
