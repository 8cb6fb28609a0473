"""Parts of a decision's path measured on their own, to decide what is worth changing (issue 13
item 6): each prints the cost of the current way beside the alternative, per decision.

    python benchmarks/decision_path_parts.py                          # all three
    python benchmarks/decision_path_parts.py --part unconfirmed --baseline-rev 1221cd4
    python benchmarks/decision_path_parts.py --part commit --dir /mnt/volume

- ``unconfirmed``: a new application's check of the node's unconfirmed answers
  (``UnconfirmedAnswers.any`` then ``get``, as every decision does) while 10 and 1,000 answer
  files are kept after an idempotency-store outage. With ``--baseline-rev`` the same calls on
  ``unconfirmed.py`` as of that git revision (loaded with ``git show``), side by side.
- ``commit``: the decision log's durability step, one small record a commit: ``write`` +
  ``fsync`` on an ``O_APPEND`` segment (what ``DecisionLog`` does) against ``pwrite`` +
  ``fdatasync`` into a segment pre-allocated with ``posix_fallocate`` (so a commit changes no
  file size), on the file system of ``--dir``.
- ``json``: ``json`` (the standard library, what the serving path uses) against ``orjson``
  (if installed: ``pip install orjson``) on a decision's response and on a two-model decision's
  log record: encode and decode.

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def per_call_us(call: Callable[[], Any], n: int) -> tuple[float, float]:
    """Wall and CPU microseconds per call over ``n`` calls."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        call()
    return (time.perf_counter() - wall) / n * 1e6, (time.process_time() - cpu) / n * 1e6


# ------------------------------------------------------------------------------ unconfirmed
def unconfirmed_class(rev: str | None) -> type:
    if rev is None:
        from mlplatform.serving.decisions.unconfirmed import UnconfirmedAnswers

        return UnconfirmedAnswers
    source = subprocess.run(["git", "show", f"{rev}:mlplatform/serving/decisions/unconfirmed.py"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / f"unconfirmed_{rev}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.UnconfirmedAnswers


def part_unconfirmed(args: argparse.Namespace) -> None:
    from mlplatform.serving.idempotency import SqliteIdempotencyStore

    kinds = [("current", None)] + ([(args.baseline_rev, args.baseline_rev)] if args.baseline_rev else [])
    for files in (10, 1000):
        folder = Path(tempfile.mkdtemp(dir=args.dir)) / "unconfirmed"
        writer = unconfirmed_class(None)(folder)
        for i in range(files):  # one file a micro-batch of 4 answers, as an outage leaves them
            writer.add_many([(f"app-{i}-{j}", '{"decision":"approve"}') for j in range(4)])
        writer.sync(SqliteIdempotencyStore(folder.parent / "idempotency.db"))  # kept in synced/ for an hour
        time.sleep(2.1)  # past the current code's settling time for mtimes
        for label, rev in kinds:
            reader = unconfirmed_class(rev)(folder)
            counter = iter(range(10**9))

            def check() -> None:
                if reader.any():
                    reader.get(f"new-{next(counter)}")

            check()
            wall, cpu = per_call_us(check, args.calls)
            print(f"unconfirmed  {files:5d} files kept  {label:10s}  {wall:9.1f} us wall  {cpu:9.1f} us CPU per new application")


# ----------------------------------------------------------------------------------- commit
def part_commit(args: argparse.Namespace) -> None:
    line = json.dumps({"decision_id": uuid.uuid4().hex, "features": {f"f{i}": random.random() for i in range(27)}}).encode() + b"\n"
    for rnd in range(2):
        for mode in ("append + fsync", "preallocated pwrite + fdatasync"):
            path = Path(tempfile.mkdtemp(dir=args.dir)) / "segment"
            if mode.startswith("append"):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            else:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
                os.posix_fallocate(fd, 0, 64 << 20)
                os.fsync(fd)
            offset = 0

            def commit() -> None:
                nonlocal offset
                if mode.startswith("append"):
                    os.write(fd, line)
                    os.fsync(fd)
                else:
                    os.pwrite(fd, line, offset)
                    offset += len(line)
                    os.fdatasync(fd)

            wall, cpu = per_call_us(commit, args.commits)
            os.close(fd)
            path.unlink()
            print(f"commit  round {rnd + 1}  {mode:32s}  {wall:7.1f} us wall  {cpu:6.1f} us CPU per commit ({len(line)} B)")


# ------------------------------------------------------------------------------------- json
def part_json(args: argparse.Namespace) -> None:
    try:
        import orjson
    except ImportError:
        print("json: orjson is not installed (pip install orjson); only the standard library measured")
        orjson = None
    rng = random.Random(0)
    response = {
        "decision_id": uuid.uuid4().hex, "application_id": "app-123456", "decision": "decline", "probability_of_default": 0.71234,
        "reasons": [{"code": "missed_installments_90d", "text": "Missed payments in the last 90 days", "contribution": 0.31, "value": 2.0}] * 4,
        "model": {"name": "underwriting", "version": 3}, "fallback": None, "offer": None,
    }
    record = {
        **response,
        "features": {f"feature_{i}": rng.random() for i in range(27)},
        "feature_timestamps": {f"feature_{i}": "2026-12-05T06:00:00.123456+00:00" for i in range(27)},
        "request": {"amount": 120.0, "currency": "EUR", "term": 4, "merchant_id": 17},
        # the fraud model's logged input: K=16 events of 6 values, and its request columns
        "rule_models": [{"model_name": "fraud", "score": 0.1, "inputs": {"events": [[rng.random() for _ in range(6)] for _ in range(16)]}}],
    }
    for name, doc in (("response", response), ("two-model log record", record)):
        text = json.dumps(doc, separators=(",", ":"))
        figures = [f"json.dumps {per_call_us(lambda: json.dumps(doc, separators=(',', ':')), args.calls)[1]:6.1f} us",
                   f"json.loads {per_call_us(lambda: json.loads(text), args.calls)[1]:6.1f} us"]
        if orjson is not None:
            figures += [f"orjson.dumps {per_call_us(lambda: orjson.dumps(doc), args.calls)[1]:6.1f} us",
                        f"orjson.loads {per_call_us(lambda: orjson.loads(text), args.calls)[1]:6.1f} us"]
        print(f"json  {name} ({len(text):,} B): CPU per call: " + ", ".join(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("unconfirmed", "commit", "json"), nargs="+", default=["unconfirmed", "commit", "json"])
    parser.add_argument("--baseline-rev", default=None, help="unconfirmed: also time unconfirmed.py as of this git revision")
    parser.add_argument("--dir", default=None, help="where temporary folders and segments go (default: the system's)")
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--commits", type=int, default=2000)
    args = parser.parse_args()
    for part in args.part:
        globals()[f"part_{part}"](args)


if __name__ == "__main__":
    main()
