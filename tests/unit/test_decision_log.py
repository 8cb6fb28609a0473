"""The decision log: acknowledged means fsynced, a SIGKILLed replica loses no acknowledged
decision, torn tails are dropped, and compaction publishes every record exactly once —
run twice, concurrently, or crashed between publish and delete. Local disk and S3."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from mlplatform import DataError, NotFoundError, StorageError
from mlplatform.config import StorageConfig
from mlplatform.serving.decisions.log import DecisionLog
from mlplatform.serving.decisions.records import DATASET, validate_record
from mlplatform.storage import DatasetStore, Storage

REPO = Path(__file__).resolve().parents[2]


def record(decision_id: str, **changes) -> dict:
    rec = {
        "decision_id": decision_id,
        "application_id": f"app-{decision_id}",
        "request": json.dumps({"amount": 120.5, "merchant_id": "m-1"}),
        "decision": "approve",
        "probability_of_default": 0.0731,
        "reasons": json.dumps([]),
        "model_name": "pd",
        "model_version": 3,
        "model_sha256": "ab" * 32,
        "feature_names": json.dumps(["loans_90d", "category"]),
        "features": json.dumps({"loans_90d": 2.0, "category": None}),
        "feature_event_timestamps": json.dumps({"applicant_history": "2025-01-30T00:00:00+00:00"}),
        "fallback": False,
        "fallback_reason": None,
        "latency_ms": 4.2,
        "created_at": datetime.now(UTC).isoformat(),
        "shadow": None,
        "rule_models": None,
        "offer": None,
        "returned": True,
        "confirmed": True,
    }
    rec.update(changes)
    return rec


def storage_for(kind: str, request, tmp_path) -> Storage:
    if kind == "local":
        return Storage(StorageConfig(root=str(tmp_path / "root")))
    endpoint = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return Storage(StorageConfig(root=f"s3://{bucket}/mlp", s3={"endpoint_url": endpoint}))


@pytest.fixture
def storage(tmp_path):
    return Storage(StorageConfig(root=str(tmp_path / "root")))


def compacted_ids(storage: Storage) -> list[str]:
    return DatasetStore(storage).read_table(DATASET, columns=["decision_id"]).column("decision_id").to_pylist()


def spool_segments(spool: Path) -> list[str]:
    return sorted(p.name for p in spool.rglob("*") if p.suffix in (".open", ".jsonl"))


# ------------------------------------------------------------------------- records
def test_round_trip_through_spool_and_compacted_dataset(storage, tmp_path):
    spool = tmp_path / "spool"
    fallback = record("d-2", fallback=True, fallback_reason="feature deadline", probability_of_default=None,
                      model_name=None, model_version=None, model_sha256=None, decision="refer")
    with DecisionLog(storage, spool_dir=spool, replica_id="r1") as log:
        log.append_sync(record("d-1"))
        asyncio.run(log.append(fallback))
        assert log.get("d-1") == record("d-1", created_at=log.get("d-1")["created_at"])
        assert log.get("d-2") == fallback

        result = log.compact()
        assert (result.rows, result.dropped_lines, len(result.segments), result.versions) == (2, 0, 1, (1,))
        assert spool_segments(spool) == []
        assert log.get("d-2") == fallback  # now from Parquet, with ints, floats, bools and nulls intact
        assert log.get("d-1")["probability_of_default"] == 0.0731
        with pytest.raises(NotFoundError, match="d-404"):
            log.get("d-404")

    version = DatasetStore(storage).get(DATASET)
    assert version.partitions == [fallback["created_at"][:10]]
    assert version.metadata["rows"] == 2 and len(version.metadata["segments"]) == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"latency_ms": "fast"}, "latency_ms must be float/int"),
        ({"fallback": 1}, "fallback must be bool"),
        ({"model_version": True}, "model_version must be int"),
        ({"features": "{not json"}, "features is not valid JSON"),
        ({"feature_names": '{"a": 1}'}, "feature_names must be a JSON list"),
        ({"created_at": "2025-01-31T09:00:00"}, "created_at must be ISO 8601 in UTC"),
        ({"created_at": "2025-01-31T09:00:00+01:00"}, "created_at must be ISO 8601 in UTC"),
        ({"probability_of_default": None}, "probability_of_default must not be None"),
        ({"probability_of_default": float("nan")}, "must be finite"),
        ({"merchant": "m-1"}, r"unknown keys \['merchant'\]"),
    ],
)
def test_invalid_records_are_refused(change, message):
    with pytest.raises(DataError, match=message):
        validate_record(record("d-1", **change))


def test_missing_key_is_refused(storage, tmp_path):
    rec = record("d-1")
    del rec["model_sha256"]
    with DecisionLog(storage, spool_dir=tmp_path / "spool", replica_id="r1") as log:
        with pytest.raises(DataError, match=r"lacks keys \['model_sha256'\]"):
            log.append_sync(rec)
        with pytest.raises(DataError, match="lacks keys"):
            asyncio.run(log.append(rec))
    assert spool_segments(tmp_path / "spool") == []


# -------------------------------------------------------------------- group commit
class RecordingFsync:
    """``os.fsync`` that also notes which decision ids each fsync made durable."""

    def __init__(self) -> None:
        self.durable: set[str] = set()
        self.file_syncs = 0
        self._offsets: dict[int, int] = {}
        self._lock = threading.Lock()

    def __call__(self, fd: int) -> None:
        os.fsync(fd)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not os.readlink(f"/proc/self/fd/{fd}").endswith(".open"):
            return  # a directory or a compaction's state file, not a spool segment
        with self._lock, open(f"/proc/self/fd/{fd}", "rb") as f:
            self.file_syncs += 1
            f.seek(self._offsets.get(st.st_ino, 0))
            data = f.read()
            self._offsets[st.st_ino] = f.tell()
        for line in data.splitlines():
            self.durable.add(json.loads(line[9:])["decision_id"])


async def append_all(log: DecisionLog, records: list[dict], concurrency: int, after=None) -> tuple[float, list[float]]:
    """Append ``records`` with ``concurrency`` in flight; (elapsed seconds, sorted latencies)."""
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(rec: dict) -> None:
        async with gate:
            start = time.perf_counter()
            await log.append(rec)
            latencies.append(time.perf_counter() - start)
            if after is not None:
                after(rec)

    start = time.perf_counter()
    await asyncio.gather(*(one(rec) for rec in records))
    return time.perf_counter() - start, sorted(latencies)


def test_concurrent_appends_are_acknowledged_only_after_their_fsync(storage, tmp_path):
    fsync = RecordingFsync()
    n = 2000
    early: list[str] = []

    def check(rec: dict) -> None:
        if rec["decision_id"] not in fsync.durable:
            early.append(rec["decision_id"])

    with DecisionLog(storage, spool_dir=tmp_path / "spool", replica_id="r1", fsync=fsync) as log:
        asyncio.run(append_all(log, [record(f"d-{i}") for i in range(n)], 64, after=check))
        assert early == []
        assert len(fsync.durable) == n
        assert fsync.file_syncs < n / 4  # group commit: many records share one fsync
        assert log.compact().rows == n
    assert sorted(compacted_ids(storage)) == sorted(f"d-{i}" for i in range(n))


# ---------------------------------------------------------------------- SIGKILL
VICTIM = r"""
import asyncio, json, sys
from datetime import UTC, datetime
from mlplatform.config import StorageConfig
from mlplatform.serving.decisions.log import DecisionLog
from mlplatform.storage import Storage

root, endpoint, spool, prefix = sys.argv[1:5]
storage = Storage(StorageConfig(root=root, s3={"endpoint_url": endpoint or None}))
log = DecisionLog(storage, spool_dir=spool, replica_id="victim")
RECORD = json.loads(sys.argv[5])

async def writer(w):
    i = 0
    while True:
        decision_id = f"{prefix}-{w}-{i}"
        await log.append(RECORD | {"decision_id": decision_id, "created_at": datetime.now(UTC).isoformat()})
        print(decision_id, flush=True)  # only once durable
        i += 1

async def main():
    await asyncio.gather(*(writer(w) for w in range(8)))

asyncio.run(main())
"""


def run_victim(storage: Storage, spool: Path, *, until: int) -> set[str]:
    """Append in a subprocess, SIGKILL it mid-stream after ``until`` acknowledgements; the
    ids it printed (acknowledged) before dying."""
    proc = subprocess.Popen(
        [sys.executable, "-c", VICTIM, storage.config.root,
         storage.config.s3.endpoint_url or "", str(spool), "k", json.dumps(record("x"))],
        stdout=subprocess.PIPE, cwd=REPO, env=dict(os.environ),
    )
    acked: set[str] = set()
    try:
        for line in proc.stdout:
            acked.add(line.decode().strip())
            if len(acked) >= until:
                os.kill(proc.pid, signal.SIGKILL)
                break
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the victim exited with {proc.returncode}"
    acked.update(line for line in rest.decode().splitlines() if line.endswith(tuple("0123456789")))
    return acked


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_sigkill_loses_no_acknowledged_decision(kind, request, tmp_path):
    storage = storage_for(kind, request, tmp_path)
    spool = tmp_path / "spool"
    acked = run_victim(storage, spool, until=400)
    assert len(acked) >= 400
    assert [p.suffix for p in spool.iterdir() if p.is_file()] == [".open"]  # it died holding its segment

    with DecisionLog(storage, spool_dir=spool, replica_id="survivor") as survivor:
        result = survivor.compact()
        some = sorted(acked)[len(acked) // 2]
        assert survivor.get(some)["decision_id"] == some  # from Parquet on local disk or S3
    ids = compacted_ids(storage)
    assert acked <= set(ids), f"{len(acked - set(ids))} acknowledged decisions were lost"
    assert len(ids) == len(set(ids)) == result.rows
    assert spool_segments(spool) == []


def test_a_live_replicas_open_segment_is_left_alone(storage, tmp_path):
    spool = tmp_path / "spool"
    with DecisionLog(storage, spool_dir=spool, replica_id="live") as live, \
            DecisionLog(storage, spool_dir=spool, replica_id="other") as other:
        live.append_sync(record("d-live"))
        assert other.compact().rows == 0  # live still holds the lock on its open segment
        assert other.get("d-live")["decision_id"] == "d-live"  # found in the spool
        assert live.compact().rows == 1  # its own compact rolls the segment first
    assert compacted_ids(storage) == ["d-live"]


def test_an_idle_replica_rolls_its_segment_so_others_can_compact_it(storage, tmp_path):
    spool = tmp_path / "spool"
    with DecisionLog(storage, spool_dir=spool, replica_id="idle", segment_seconds=0.2) as idle:
        idle.append_sync(record("d-1"))
        deadline = time.monotonic() + 10
        while not list(spool.glob("*.jsonl")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [p.suffix for p in spool.glob("idle@*")] == [".jsonl"]  # the window closed without a write
        with DecisionLog(storage, spool_dir=spool, replica_id="other") as other:
            assert other.compact().rows == 1
        idle.append_sync(record("d-2"))  # and the idle one carries on in a new segment
        assert idle.compact().rows == 1
    assert sorted(compacted_ids(storage)) == ["d-1", "d-2"]


def test_torn_last_line_is_dropped(storage, tmp_path):
    spool = tmp_path / "spool"
    with DecisionLog(storage, spool_dir=spool, replica_id="writer") as log:
        for i in range(3):
            log.append_sync(record(f"d-{i}"))
    (segment,) = spool.glob("*.jsonl")
    data = segment.read_bytes()
    segment.write_bytes(data[: len(data) - 40])  # the third line was cut short by a crash

    with DecisionLog(storage, spool_dir=spool, replica_id="compactor") as log:
        result = log.compact()
    assert (result.rows, result.dropped_lines) == (2, 1)
    assert sorted(compacted_ids(storage)) == ["d-0", "d-1"]


# ------------------------------------------------------------------ exactly once
def test_compaction_twice_and_concurrently_never_duplicates(storage, tmp_path):
    spool = tmp_path / "spool"
    expected = set()
    for r in range(4):  # four replicas that each wrote some decisions and stopped
        with DecisionLog(storage, spool_dir=spool, replica_id=f"r{r}", segment_bytes=4096) as log:
            for i in range(60):
                log.append_sync(record(f"r{r}-{i}"))
                expected.add(f"r{r}-{i}")
    assert len(spool_segments(spool)) > 8

    compactors = [DecisionLog(storage, spool_dir=spool, replica_id=f"c{c}") for c in range(4)]
    barrier = threading.Barrier(len(compactors))
    results, errors = [], []

    def run(log: DecisionLog) -> None:
        try:
            barrier.wait()
            results.append(log.compact())
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(c,)) for c in compactors]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    again = compactors[0].compact()
    for c in compactors:
        c.close()

    ids = compacted_ids(storage)
    assert sorted(ids) == sorted(expected)  # every record once
    assert sum(r.rows for r in results) == len(expected) and again.rows == 0
    assert sorted(s for r in results for s in r.segments) == sorted(set(s for r in results for s in r.segments))
    assert spool_segments(spool) == [] and list((spool / "claims").iterdir()) == []


def test_a_claim_being_set_up_is_not_taken_for_a_dead_one(storage, tmp_path):
    # A compactor sets a claim up under a hidden name and locks it a moment later; a second
    # compactor looking in between must not take the unlocked lock (the first one's own
    # non-blocking lock would then fail), but a hidden claim left by a long-dead one goes.
    spool = tmp_path / "spool"
    with DecisionLog(storage, spool_dir=spool, replica_id="r0") as log:
        log.append_sync(record("d-1"))
    claims = spool / "claims"
    young, old = claims / ".young@1", claims / ".old@1"
    for folder in (young, old):
        folder.mkdir()
        (folder / "lock").touch()
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))

    with DecisionLog(storage, spool_dir=spool, replica_id="c0") as compactor:
        assert compactor.compact().rows == 1
    assert young.exists() and (young / "lock").exists()
    assert not old.exists()
    assert compacted_ids(storage) == ["d-1"]


CRASHING_COMPACTOR = r"""
import os, signal, sys
from mlplatform.config import StorageConfig
from mlplatform.serving.decisions.log import DecisionLog
from mlplatform.storage import Storage

log = DecisionLog(Storage(StorageConfig(root=sys.argv[1])), spool_dir=sys.argv[2], replica_id="crasher",
                  on_published=lambda version: os.kill(os.getpid(), signal.SIGKILL))
log.compact()
"""


def test_compaction_killed_between_publish_and_delete_does_not_duplicate(storage, tmp_path):
    spool = tmp_path / "spool"
    with DecisionLog(storage, spool_dir=spool, replica_id="r1") as log:
        for i in range(50):
            log.append_sync(record(f"d-{i}"))

    proc = subprocess.run([sys.executable, "-c", CRASHING_COMPACTOR, storage.root, str(spool)], cwd=REPO, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    datasets = DatasetStore(storage)
    assert datasets.versions(DATASET) == [1]  # published…
    (claim,) = (spool / "claims").iterdir()
    assert len(list(claim.glob("*.jsonl"))) == 1  # …but its segment was not deleted

    with DecisionLog(storage, spool_dir=spool, replica_id="r2") as log:
        result = log.compact()
        assert (result.recovered_claims, result.rows, result.versions) == (1, 0, ())
        assert log.compact().rows == 0
    assert datasets.versions(DATASET) == [1]
    assert sorted(compacted_ids(storage)) == sorted(f"d-{i}" for i in range(50))
    assert spool_segments(spool) == [] and list((spool / "claims").iterdir()) == []


def test_compaction_that_failed_before_its_commit_is_retried(storage, tmp_path):
    """A publish that raised (e.g. S3 down) leaves the claim; the next compact publishes it once."""
    spool = tmp_path / "spool"
    with DecisionLog(storage, spool_dir=spool, replica_id="r1") as log:
        for i in range(5):
            log.append_sync(record(f"d-{i}"))
    broken = Storage(StorageConfig(root=str(tmp_path / "root-is-a-file")))
    (tmp_path / "root-is-a-file").write_text("not a directory")
    with DecisionLog(broken, spool_dir=spool, replica_id="r2") as log, \
            pytest.raises(StorageError, match="could not publish 5 decisions.*next compact"):
        log.compact()
    assert len(list((spool / "claims").iterdir())) == 1

    with DecisionLog(storage, spool_dir=spool, replica_id="r3") as log:
        result = log.compact()
    assert (result.recovered_claims, result.rows) == (1, 5)
    assert sorted(compacted_ids(storage)) == [f"d-{i}" for i in range(5)]
