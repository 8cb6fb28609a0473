"""Steps: the unit a workload is made of, and the one place that decides whether a step is
up to date.

    step = Step(
        "backfill", target="applicant_history",
        inputs=lambda: {"definition": view.data_version, "sources": {...}, "range": [...]},
        run=lambda: Done(rows=result.rows, where=uri, output={"version": result.version}),
        reuse=lambda output: Done(...) if datasets.get(name).version == output["version"] else None,
    )
    results = StepRunner(platform.storage).run_all([step, ...])

A step with ``inputs`` is skipped when it is up to date: the runner hashes what ``inputs()``
returns (a JSON-able description of everything the output is a function of: configs,
definition versions, the versions of the datasets it reads) and compares it with the record
of the step's last completed run, kept under ``jobs/steps/<name>/<target>.json`` of the
storage root. When the hash is the same, the runner hands the recorded ``output`` to
``reuse``, which returns the step's result if that output is still there and current, or
None (then the step runs again). A step without ``inputs`` always runs (it is cheap or
idempotent on its own, e.g. ``apply``). Records are keyed by the step's name and target, not
by the workload, so ``mlp run`` and single-step commands (``mlp backfill``, ``mlp train``)
agree on what is current. A record is written only after the step succeeded.

Console: the runner logs to ``mlplatform.jobs`` — at DEBUG when a step starts (with
``extra={"mlp_step": "start"}``, which the CLI turns into a progress bar on a terminal) and
at INFO one summary line when it ends: ``[name] target: summary (rows, seconds) -> where``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from mlplatform.errors import ConfigError

__all__ = ["Done", "Step", "StepRunner", "fingerprint"]

log = logging.getLogger("mlplatform.jobs")
RECORDS = "jobs/steps"


@dataclass(frozen=True)
class Done:
    """What a finished (or reused) step reports.

    Args:
        summary: one line for a person, without the step's name (the runner adds it).
        rows: rows written, when that means something.
        where: where the output went (a URI or path).
        output: JSON-able identity of the output (a dataset version, a model version), kept
            in the step's record and handed back to ``reuse`` on the next run.
        value: what later steps or the caller use (a snapshot, a model version); not recorded.
    """

    summary: str = ""
    rows: int | None = None
    where: str | None = None
    output: Any = None
    value: Any = None


@dataclass(frozen=True)
class Step:
    """One step of a workload: a name the console shows, what it is about (``target``), and
    how it runs and knows it is up to date (see the module docstring)."""

    name: str
    run: Callable[[], Done]
    target: str = ""
    inputs: Callable[[], Any] | None = None
    reuse: Callable[[Any], Done | None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.inputs is None) != (self.reuse is None):
            raise ConfigError(f"step {self.label!r}: 'inputs' and 'reuse' go together (both or neither)")

    @property
    def label(self) -> str:
        return f"{self.name} {self.target}".strip()

    @property
    def key(self) -> str:
        """Where this step's record lives (relative to the storage root)."""
        return f"{RECORDS}/{_safe(self.name)}/{_safe(self.target) or '_'}.json"


def fingerprint(inputs: Any) -> str:
    """The hash the runner compares: sha256 of the canonical JSON of ``inputs`` (16 hex)."""
    text = json.dumps(inputs, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class StepRunner:
    """Run steps in order, skipping those that are up to date.

        runner = StepRunner(platform.storage)
        results = runner.run_all(workload_steps)   # {"generate": value, "backfill/applicant_history": value, ...}

    Args:
        storage: the storage root the step records live under.
        force: run every step even when it is up to date (its record is then rewritten).
    """

    def __init__(self, storage: Any, *, force: bool = False) -> None:
        self.storage = storage
        self.force = force

    def run(self, step: Step, *, index: int | None = None) -> Done:
        """Run one step (or reuse its output) and log its summary line."""
        log.debug("[%s] ...", step.label, extra={"mlp_step": "start", "mlp_label": step.label, "mlp_index": index})
        started = time.monotonic()
        digest = fingerprint(step.inputs()) if step.inputs is not None else None
        if digest is not None and not self.force:
            reused = self._reuse(step, digest)
            if reused is not None:
                log.info(_line(step, reused, None), extra={"mlp_step": "done"})
                return reused
        done = step.run()
        seconds = time.monotonic() - started
        if digest is not None:
            self.storage.write_json(
                step.key,
                {
                    "step": step.name,
                    "target": step.target,
                    "inputs": digest,
                    "output": done.output,
                    "summary": done.summary,
                    "rows": done.rows,
                    "where": done.where,
                    "seconds": round(seconds, 3),
                    "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                },
            )
        log.info(_line(step, done, seconds), extra={"mlp_step": "done"})
        return done

    def run_all(self, steps: Iterable[Step]) -> dict[str, Any]:
        """Run ``steps`` in order (an iterable is advanced only after the previous step ran,
        so a later step may depend on what an earlier one wrote). Returns each step's
        ``value`` by ``name`` (``name/target`` for steps with a target)."""
        results: dict[str, Any] = {}
        for i, step in enumerate(steps):
            done = self.run(step, index=i)
            results[f"{step.name}/{step.target}" if step.target else step.name] = done.value
        return results

    def _reuse(self, step: Step, digest: str) -> Done | None:
        if not self.storage.exists(step.key):
            return None
        record = self.storage.read_json(step.key)
        if record.get("inputs") != digest:
            return None
        assert step.reuse is not None
        done = step.reuse(record.get("output"))
        if done is None:
            return None
        return Done(
            summary=done.summary or record.get("summary", ""),
            rows=done.rows if done.rows is not None else record.get("rows"),
            where=done.where or record.get("where"),
            output=record.get("output"),
            value=done.value,
        )


def _line(step: Step, done: Done, seconds: float | None) -> str:
    head = f"[{step.name}] " + (f"{step.target}: " if step.target else "")
    if seconds is None:
        text = head + "up to date" + (f": {done.summary}" if done.summary else "")
    else:
        rows = [] if done.rows is None else [f"{done.rows:,} row" + ("" if done.rows == 1 else "s")]
        facts = [*rows, f"{seconds:.1f}s"]
        text = head + (f"{done.summary} " if done.summary else "") + f"({', '.join(facts)})"
    return text + (f" -> {done.where}" if done.where else "")


def _safe(part: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in part)
