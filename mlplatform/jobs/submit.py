"""Submitting work to a Ray cluster as a Ray job (``mlp submit``, ``platform.jobs.submit``).

    result = platform.jobs.submit("mlp run configs/underwriting.yaml",
                                  address="http://127.0.0.1:8265", wait=True)

A thin layer over Ray's job submission SDK: it packs the working directory (minus the
virtualenv, local storage and caches), forwards the platform's own ``MLP_*`` environment
variables (never credentials: nodes use their instance role or their own environment),
streams the job's logs while it runs and reports its final status.

The cluster must hold what the job imports: either mlplatform installed on every node
(``cluster.yaml`` does that), or ``pip`` in the runtime environment. With token
authentication on (``RAY_AUTH_MODE=token``) the SDK sends the token from ``RAY_AUTH_TOKEN``
or ``~/.ray/auth_token``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from mlplatform.errors import JobError

__all__ = ["JobResult", "Jobs", "default_runtime_env"]

EXCLUDES = [".venv", ".git", ".mlplatform", "**/__pycache__", ".pytest_cache", ".hypothesis", "benchmarks/_data"]
_TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
log = logging.getLogger(__name__)


_AGENT_WAIT_S = 60.0  # how long submit waits for a just-started head to take jobs


@dataclass(frozen=True)
class JobResult:
    job_id: str
    status: str
    address: str
    logs: str = ""

    @property
    def succeeded(self) -> bool:
        return self.status == "SUCCEEDED"


def default_runtime_env(working_dir: str = ".", extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Working directory (without local-only folders) and the ``MLP_*`` variables of this shell."""
    env = {k: v for k, v in os.environ.items() if k.startswith("MLP_")}
    env.update(extra_env or {})
    return {"working_dir": working_dir, "excludes": list(EXCLUDES), "env_vars": env}


def _dashboard_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise JobError(
            "no Ray cluster address: pass --address http://HEAD:8265 (the dashboard / job API) or set RAY_ADDRESS"
        )
    if not address.startswith(("http://", "https://")):
        raise JobError(f"job submission needs the dashboard URL (http://HEAD:8265), got {address!r}")
    return address


class Jobs:
    """``platform.jobs``: submit, follow and inspect Ray jobs."""

    def __init__(self, platform: Any | None = None) -> None:
        self.platform = platform

    def client(self, address: str | None = None) -> Any:
        from ray.job_submission import JobSubmissionClient

        url = _dashboard_address(address)
        # The cluster's token goes in explicitly when the environment holds one: Ray decides
        # whether to send it from a process-wide setting fixed when this process first used
        # Ray, so a process already connected to a Ray without authentication (a notebook, a
        # scheduler's own local Ray) would otherwise call an authenticated job API with none.
        token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
        headers = {"Authorization": f"Bearer {token}"} if token else None
        try:
            return JobSubmissionClient(url, headers=headers)
        except Exception as exc:  # connection refused, auth failure, version mismatch
            raise JobError(f"cannot reach the Ray job API at {url}: {exc}") from None

    def submit(
        self,
        entrypoint: str,
        *,
        address: str | None = None,
        working_dir: str = ".",
        runtime_env: dict[str, Any] | None = None,
        entrypoint_num_cpus: float | None = None,
        wait: bool = True,
        timeout_s: float | None = None,
    ) -> JobResult:
        """Submit ``entrypoint`` (a shell command run by the job's driver on the cluster).

        With ``wait`` the job's log lines go to the ``mlplatform.jobs.submit`` logger (INFO)
        until it ends (see :meth:`follow`); to handle them yourself, submit without ``wait``
        and iterate :meth:`tail`.

        Raises:
            JobError: the cluster is unreachable, the submission is refused, or (with ``wait``)
                the job fails or outlives ``timeout_s``.
        """
        client = self.client(address)
        env = runtime_env or default_runtime_env(working_dir)
        # A cluster that has just started answers "No available agent" until its head's job
        # agent registers (seconds); that is worth waiting for, anything else is not.
        ready_by = time.monotonic() + _AGENT_WAIT_S
        while True:
            try:
                job_id = client.submit_job(
                    entrypoint=entrypoint, runtime_env=env, entrypoint_num_cpus=entrypoint_num_cpus
                )
                break
            except Exception as exc:
                if "No available agent" in str(exc) and time.monotonic() < ready_by:
                    time.sleep(1.0)
                    continue
                raise JobError(f"job submission refused: {exc}") from None
        log.info("submitted job %s to %s: %s", job_id, client.get_address(), entrypoint)
        if not wait:
            return JobResult(job_id=job_id, status=str(client.get_job_status(job_id)), address=client.get_address())
        return self.follow(job_id, address=address, timeout_s=timeout_s)

    def tail(self, job_id: str, *, address: str | None = None, timeout_s: float | None = None) -> Iterator[str]:
        """The job's log lines as they come, until its logs end.

            for line in jobs.tail(job_id):
                print(line)

        Raises:
            JobError: the logs did not end within ``timeout_s`` (the job is then stopped).
        """
        client = self.client(address)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        loop = asyncio.new_event_loop()
        chunks = client.tail_job_logs(job_id).__aiter__()
        try:
            while True:
                remaining = None if deadline is None else max(deadline - time.monotonic(), 0.0)
                try:
                    chunk = loop.run_until_complete(asyncio.wait_for(chunks.__anext__(), timeout=remaining))
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    client.stop_job(job_id)
                    raise JobError(f"job {job_id} did not finish within {timeout_s:.0f}s; it was stopped") from None
                yield from chunk.rstrip("\n").split("\n")
        finally:
            loop.run_until_complete(chunks.aclose())
            loop.close()

    def wait(self, job_id: str, *, address: str | None = None, timeout_s: float | None = None) -> JobResult:
        """Wait until the job has ended; raise JobError unless it succeeded."""
        client = self.client(address)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        status = str(client.get_job_status(job_id)).split(".")[-1]
        while status not in _TERMINAL and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.5)
            status = str(client.get_job_status(job_id)).split(".")[-1]
        logs = client.get_job_logs(job_id)
        if status != "SUCCEEDED":
            info = client.get_job_info(job_id)
            raise JobError(f"job {job_id} ended {status}: {info.message or 'see its logs'}")
        return JobResult(job_id=job_id, status=status, address=client.get_address(), logs=logs)

    def follow(self, job_id: str, *, address: str | None = None, timeout_s: float | None = None) -> JobResult:
        """Log the job's lines (``mlplatform.jobs.submit``, INFO) until it ends; raise JobError
        unless it succeeded."""
        for line in self.tail(job_id, address=address, timeout_s=timeout_s):
            log.info("%s", line)
        return self.wait(job_id, address=address, timeout_s=timeout_s)

    def status(self, job_id: str | None = None, *, address: str | None = None) -> list[dict[str, Any]]:
        """One job's status, or every job the cluster knows (newest first)."""
        client = self.client(address)
        jobs = [client.get_job_info(job_id)] if job_id else client.list_jobs()
        rows = [
            {
                "job_id": j.submission_id or j.job_id,
                "status": str(j.status).split(".")[-1],
                "entrypoint": j.entrypoint,
                "start_time": j.start_time,
                "message": j.message,
            }
            for j in jobs
        ]
        return sorted(rows, key=lambda r: r["start_time"] or 0, reverse=True)
