"""Fixtures shared by every test: real servers on loopback, started once per session.

Unit tests (tests/unit) must not start Ray; integration tests (tests/integration) share one
session-scoped local Ray started by the ``ray_session`` fixture.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited early with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout}s")


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto in standalone server mode) on loopback.

    Yields the endpoint URL. Credentials are dummy values exported to the environment,
    as the platform reads credentials only from the environment / AWS chain. Set
    ``MLP_TEST_S3_LOG=/some/file`` to keep the server's request log.
    """
    port = free_port()
    # This interpreter's moto, never a ``moto_server`` found first on PATH: another Python's
    # older moto answered pyarrow's CompleteMultipartUpload in a way its SDK retried and failed.
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=open(os.environ.get("MLP_TEST_S3_LOG", os.devnull), "ab"),
        preexec_fn=_die_with_parent,
    )
    _wait_for_port(port, proc, "moto_server")
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket on the loopback S3 server; yields its name."""
    import boto3

    name = f"mlp-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


class RedisServer:
    """A running redis-server on loopback: ``url`` for clients, ``proc`` to pause or stop it."""

    def __init__(self, proc: subprocess.Popen, port: int) -> None:
        self.proc = proc
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"


def _die_with_parent() -> None:
    """In the child before exec: on Linux, get SIGTERM when the test process dies, so a test
    run that is killed (and never reaches its finalizers) leaves no server behind."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _start_redis(directory: Path, *extra: str) -> RedisServer:
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail(
            "redis-server is not installed; the Redis online store tests run against a real one: "
            "apt-get install redis-server (CI's setup script installs it)"
        )
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(directory), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,
    )
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server exited early with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return RedisServer(proc, port)
        except OSError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"redis-server did not answer PING on 127.0.0.1:{port} within 30s")


def _stop_redis(server: RedisServer) -> None:
    server.proc.terminate()
    try:
        server.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.proc.kill()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server on a free loopback port for the whole session (no persistence).

    Yields a ``RedisServer`` (``.url``, ``.proc``). Tests keep apart by key namespace (e.g. a
    unique project per test), not by flushing.
    """
    server = _start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        _stop_redis(server)


@pytest.fixture(scope="session")
def redis_cluster_server(tmp_path_factory):
    """A one-node Redis Cluster (all 16384 slots on one server): it refuses cross-slot
    commands exactly as a real cluster does, so it checks a key layout is cluster-safe."""
    import redis

    # The cluster bus needs a port too; by default port + 10000, which may be taken or > 65535.
    server = _start_redis(
        tmp_path_factory.mktemp("redis-cluster"), "--cluster-enabled", "yes", "--cluster-port", str(free_port())
    )
    try:
        client = redis.Redis(port=server.port, decode_responses=True)
        client.execute_command("CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        deadline = time.monotonic() + 30.0
        while "cluster_state:ok" not in client.execute_command("CLUSTER", "INFO"):
            if time.monotonic() > deadline:
                raise RuntimeError("the one-node Redis Cluster did not reach cluster_state:ok within 30s")
            time.sleep(0.05)
        client.close()
        yield server
    finally:
        _stop_redis(server)
