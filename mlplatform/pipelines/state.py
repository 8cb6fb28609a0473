"""Run state under the storage root: runs, steps, attempts, logs and leases.

    pipelines/<pipeline>/runs/<ds>/run.json                       the run: started, finished, status
    pipelines/<pipeline>/runs/<ds>/steps/<step>/step.json         the step's final state (written once)
    pipelines/<pipeline>/runs/<ds>/steps/<step>/attempt-<n>.json  one attempt: job id, status, times
    pipelines/<pipeline>/runs/<ds>/steps/<step>/attempt-<n>.log   the attempt's Ray job logs
    pipelines/<pipeline>/runs/<ds>/steps/<step>/outcome-<n>.json  what the job read and wrote (kinds that run mlplatform)
    pipelines/<pipeline>/runs/<ds>/steps/<step>/lease-<g>.json    who is running the step, until when

Everything is in the storage root (a local directory or S3), so a scheduler on another
machine sees the same state. **Leases** keep two schedulers from running the same step of
the same day: a scheduler owns a step while it holds the newest lease generation. It claims
generation 1 with an exclusive create (``O_EXCL``-like hard link locally, ``If-None-Match: *``
on S3): of two schedulers racing, exactly one wins. The owner renews its lease (a plain
overwrite of its own generation); a lease not renewed for ``ttl`` seconds has expired — its
owner died or hung — and another scheduler takes the step over by creating the next
generation, again exclusively. An owner that finds a newer generation has lost the step and
stops. Expiry compares wall clocks, so schedulers' clocks must agree within a small part of
the ttl. The last line of defence is Ray's: an attempt's submission id is derived from
pipeline, step, ds and attempt, and Ray refuses a second job with the same id.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from mlplatform.storage import Storage

__all__ = ["FINAL", "Lease", "RunState"]

log = logging.getLogger(__name__)
PREFIX = "pipelines"
#: Step states that are final: the step is not run again for this ds.
FINAL = ("succeeded", "failed", "skipped", "upstream_failed")


def _now() -> float:
    return time.time()


def owner_id() -> str:
    """This scheduler's identity in leases: host, process and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class Lease:
    """A held claim on one step of one run (see the module docstring). ``lost`` turns True when
    a renewal finds that another scheduler took the step over."""

    state: RunState
    key_prefix: str
    generation: int
    owner: str
    ttl: float
    lost: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _key(self, generation: int) -> str:
        return f"{self.key_prefix}/lease-{generation:06d}.json"

    def renew(self) -> bool:
        """Extend the lease by ``ttl`` unless a newer generation exists (then ``lost``)."""
        if self.lost or self.state.storage.exists(self._key(self.generation + 1)):
            self.lost = True
            return False
        self.state.storage.write_json(self._key(self.generation), {"owner": self.owner, "expires_at": _now() + self.ttl})
        return True

    def __enter__(self) -> Lease:
        def beat() -> None:
            while not self._stop.wait(self.ttl / 3):
                try:
                    if not self.renew():
                        log.warning("lease on %s lost to another scheduler", self.key_prefix)
                        return
                except Exception:  # a storage hiccup: the next beat tries again before expiry
                    log.warning("could not renew the lease on %s", self.key_prefix, exc_info=True)

        self._thread = threading.Thread(target=beat, name=f"lease {self.key_prefix}", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self.lost:
            # Expire it now, so a scheduler waiting on an unfinished step need not wait a ttl.
            self.state.storage.write_json(self._key(self.generation), {"owner": self.owner, "expires_at": 0.0})


class RunState:
    """The run records of one pipeline under a storage root (see the module docstring).

    Args:
        storage: the storage root.
        pipeline: the pipeline's name.
    """

    def __init__(self, storage: Storage, pipeline: str) -> None:
        self.storage = storage
        self.pipeline = pipeline

    # ------------------------------------------------------------------------- keys
    def run_key(self, ds: date) -> str:
        return f"{PREFIX}/{self.pipeline}/runs/{ds.isoformat()}"

    def step_key(self, ds: date, step: str) -> str:
        return f"{self.run_key(ds)}/steps/{step}"

    # ------------------------------------------------------------------------- runs
    def runs(self) -> list[date]:
        """Every ds with a run record, oldest first."""
        return [date.fromisoformat(d) for d in self.storage.list(f"{PREFIX}/{self.pipeline}/runs")]

    def run(self, ds: date) -> dict[str, Any] | None:
        key = f"{self.run_key(ds)}/run.json"
        return self.storage.read_json(key) if self.storage.exists(key) else None

    def start_run(self, ds: date) -> None:
        """Record that the run started (the first scheduler's time is kept)."""
        self.storage.create_json(
            f"{self.run_key(ds)}/run.json", {"pipeline": self.pipeline, "ds": ds.isoformat(), "status": "running", "started_at": _now()}
        )

    def finish_run(self, ds: date, status: str, steps: dict[str, str]) -> None:
        record = self.run(ds) or {"pipeline": self.pipeline, "ds": ds.isoformat(), "started_at": _now()}
        record.update(status=status, finished_at=_now(), steps=steps)
        self.storage.write_json(f"{self.run_key(ds)}/run.json", record)

    # ------------------------------------------------------------------------- steps
    def step(self, ds: date, step: str) -> dict[str, Any] | None:
        """The step's final record, or None while it has not finished."""
        key = f"{self.step_key(ds, step)}/step.json"
        return self.storage.read_json(key) if self.storage.exists(key) else None

    def finish_step(self, ds: date, step: str, record: dict[str, Any]) -> bool:
        """Write the step's final record (once: a second writer's is dropped; returns whether this one won)."""
        return self.storage.create_json(f"{self.step_key(ds, step)}/step.json", {"finished_at": _now(), **record})

    def attempts(self, ds: date, step: str) -> list[dict[str, Any]]:
        """The step's attempt records, in order."""
        prefix = self.step_key(ds, step)
        names = [n for n in self.storage.list(prefix) if n.startswith("attempt-") and n.endswith(".json")]
        return [self.storage.read_json(f"{prefix}/{n}") for n in sorted(names)]

    def write_attempt(self, ds: date, step: str, attempt: int, record: dict[str, Any]) -> None:
        self.storage.write_json(f"{self.step_key(ds, step)}/attempt-{attempt:03d}.json", {"attempt": attempt, **record})

    def write_log(self, ds: date, step: str, attempt: int, text: str) -> str:
        key = f"{self.step_key(ds, step)}/attempt-{attempt:03d}.log"
        self.storage.write_bytes(key, text.encode())
        return self.storage.uri(key)

    def outcome(self, ds: date, step: str, attempt: int) -> dict[str, Any] | None:
        """What attempt ``attempt`` of the step recorded from inside its job (None: nothing)."""
        key = f"{self.step_key(ds, step)}/outcome-{attempt:03d}.json"
        return self.storage.read_json(key) if self.storage.exists(key) else None

    def write_outcome(self, ds: date, step: str, attempt: int, outcome: dict[str, Any]) -> None:
        self.storage.write_json(f"{self.step_key(ds, step)}/outcome-{attempt:03d}.json", outcome)

    # ------------------------------------------------------------------------- leases
    def acquire(self, ds: date, step: str, owner: str, ttl: float) -> Lease | None:
        """Claim the step for ``owner``: a new lease, a takeover of an expired one, or None
        while another scheduler's lease is live."""
        prefix = self.step_key(ds, step)
        generations = sorted(int(n[6:12]) for n in self.storage.list(prefix) if n.startswith("lease-") and n.endswith(".json"))
        if generations:
            current = generations[-1]
            held = self.storage.read_json(f"{prefix}/lease-{current:06d}.json")
            if held.get("owner") != owner and held.get("expires_at", 0) > _now():
                return None
            if held.get("owner") != owner:
                log.info("taking over %s/%s from %s (lease expired)", ds, step, held.get("owner"))
            generation = current + 1
        else:
            generation = 1
        lease = Lease(self, prefix, generation, owner, ttl)
        if not self.storage.create_json(lease._key(generation), {"owner": owner, "expires_at": _now() + ttl}):
            return None  # another scheduler claimed this generation first
        return lease

    def lease_holder(self, ds: date, step: str) -> dict[str, Any] | None:
        """The newest lease record of the step (owner, expires_at), or None."""
        prefix = self.step_key(ds, step)
        names = sorted(n for n in self.storage.list(prefix) if n.startswith("lease-") and n.endswith(".json"))
        return self.storage.read_json(f"{prefix}/{names[-1]}") if names else None
