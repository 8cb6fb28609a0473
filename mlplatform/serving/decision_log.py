"""The decision log: every decision durable on local disk before it is answered, then
compacted, exactly once, into the Parquet dataset ``decisions/log`` under the storage root.

    log = DecisionLog(storage, spool_dir="/var/lib/mlp/decision-spool", replica_id="decide-1")
    await log.append(record)     # returns once the record is fsynced (group commit)
    log.compact()                # spool segments (this replica's and dead ones') -> decisions/log
    log.get("d-123")             # from the spool or the compacted data
    log.close()

Spool (a directory on the replica's local disk, shared by the replicas of one node)::

    <replica>@<UTC start>@<nonce>.open    the segment a live replica is appending to
    <replica>@<UTC start>@<nonce>.jsonl   a closed segment (rolled: never written again)
    claims/<claim>/                       segments a compaction has taken, its lock and state

A segment holds one record per line: ``<crc32 of the JSON, 8 hex> <JSON>\\n``. A line whose
CRC does not match (the torn tail of a write cut short by a crash) is dropped: its record was
never acknowledged, because acknowledgement comes only after the whole write is fsynced.

Appending (group commit): ``append`` validates and encodes the record and queues it; one
writer thread takes everything queued — waiting at most ``group_commit_ms`` after the oldest
queued record for more to arrive — writes it with one ``write``, ``fsync``s, and only then
resolves every waiter (asyncio futures through ``loop.call_soon_threadsafe``, one call per
loop and batch). A replica killed with SIGKILL therefore loses no decision it returned.
A segment is rolled after ``segment_seconds`` or ``segment_bytes``, and by ``compact``/``close``.

Who may take a segment: the owner holds an exclusive ``flock`` on its ``.open`` segment for as
long as it may write it (a segment is created under a temporary name, locked, and only then
renamed to ``.open``, so no ``.open`` file is ever unlocked while its owner lives). The kernel
drops the lock when the owner dies, SIGKILL included, so a ``.open`` segment whose lock can be
taken belongs to a dead replica. A ``.jsonl`` segment is closed. Both may be claimed.

Compaction, exactly once:
  1. Claim: create ``claims/<claim>/`` (built under a hidden name with its ``lock`` already
     flocked, then renamed into place) and ``rename`` each candidate segment into it. A rename
     is atomic, so of two compactors racing for a segment exactly one gets it.
  2. Record intent: the data is published with ``DatasetStore.publish(..., replace="append",
     partition_by="date")``, whose staging folder ``_data/<txid>/`` is unique. Before any
     Parquet byte is written, ``<txid>`` is appended to ``claims/<claim>/state.json``
     (fsynced). The manifest commit is the single atomic step that makes the rows visible;
     its metadata also names the segments, for audits.
  3. Delete the claimed segments and the claim.
A compactor that dies anywhere leaves its claim folder with the lock released; the next
``compact`` (any replica of the node) takes such a claim over and first checks whether the
latest manifest lists files under one of the recorded txids. Appends never drop files of a
previous version, so the latest manifest answers "was this claim published?" exactly: if yes
the segments are only deleted, if no they are published again (under a fresh txid; the
half-written folder of the dead attempt is unreferenced and ``vacuum`` removes it). Hence
every spooled record reaches ``decisions/log`` once. This assumes ``decisions/log`` is only
ever appended to while claims are pending (a retention job that rewrites partitions with
``replace="partitions"`` must not run against a node with a crashed compaction), and that the
spool is on a local filesystem with working ``flock`` and ``rename`` (not NFS).

Records: see ``validate_record`` for the keys and their types.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import math
import os
import posixpath
import re
import threading
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from mlplatform.errors import DataError, NotFoundError, PlatformError, ServingError, StorageError
from mlplatform.storage.datasets import DatasetStore

if TYPE_CHECKING:
    import pyarrow as pa

    from mlplatform.storage.blobs import Storage
    from mlplatform.storage.datasets import DatasetVersion

__all__ = ["DATASET", "CompactionResult", "DecisionLog", "find_decision", "validate_record"]

#: The compacted decision log, a dataset under the storage root partitioned by UTC ``date``.
DATASET = "decisions/log"

_REPLICA = re.compile(r"^[A-Za-z0-9_.+=-]{1,100}$")
_SEGMENT = re.compile(r"^[A-Za-z0-9_.+=-]{1,100}@\d{8}T\d{12}Z@[0-9a-f]{8}\.(open|jsonl)$")
_CLAIMS = "claims"
_MAX_BATCH = 4096
_MAX_CLAIM_BYTES = 256 << 20

# key -> (types allowed, nullable, JSON-encoded string whose decoded value must be of this type)
_STR, _JSON = (str,), (str,)
_FIELDS: dict[str, tuple[tuple[type, ...], bool, type | None]] = {
    "decision_id": (_STR, False, None),
    "application_id": (_STR, False, None),
    "request": (_JSON, False, object),
    "decision": (_STR, False, None),
    "probability_of_default": ((float, int), False, None),
    "reasons": (_JSON, False, object),
    "model_name": (_STR, False, None),
    "model_version": ((int,), True, None),
    "model_sha256": (_STR, False, None),
    "feature_names": (_JSON, False, list),
    "features": (_JSON, False, dict),
    "feature_event_timestamps": (_JSON, False, object),
    "fallback": ((bool,), False, None),
    "fallback_reason": (_STR, True, None),
    "latency_ms": ((float, int), False, None),
    "created_at": (_STR, False, None),
    "shadow": (_JSON, True, object),
}
# A fallback decision may have been made without a model, hence without a score.
_NULLABLE_IN_FALLBACK = {"probability_of_default", "model_name", "model_sha256"}


def _schema() -> pa.Schema:
    import pyarrow as pa

    kinds = {str: pa.string(), bool: pa.bool_(), int: pa.int64(), float: pa.float64()}
    return pa.schema([pa.field(k, kinds[types[0]]) for k, (types, _, _) in _FIELDS.items()])


def validate_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """Check a decision record and return it as a plain dict (ints in float fields as floats).

    Keys, all required (no others allowed): ``decision_id``, ``application_id``, ``decision``,
    ``model_name``, ``model_sha256`` (str); ``request``, ``reasons``,
    ``feature_event_timestamps`` (JSON text); ``feature_names`` (JSON list, the model's feature
    order); ``features`` (JSON object name -> value, null when missing); ``shadow`` (JSON text
    or None); ``probability_of_default``, ``latency_ms`` (finite float); ``model_version``
    (int or None); ``fallback`` (bool); ``fallback_reason`` (str or None); ``created_at`` (ISO
    8601 in UTC, e.g. ``2025-01-31T09:00:00.123456+00:00``). When ``fallback`` is true,
    ``probability_of_default``, ``model_name`` and ``model_sha256`` may be None.

    Raises:
        DataError: a key is missing or unknown, or a value has the wrong type or is not valid
            JSON / UTC ISO time; the message names the key and the value.
    """
    # On the request path: the common case (a dict of exact types) takes the cheap checks.
    if type(record) is not dict and not isinstance(record, Mapping):
        raise DataError(f"a decision record must be a mapping, got {type(record).__name__}")
    missing = [k for k in _FIELDS if k not in record]
    if missing:
        raise DataError(f"decision record {record.get('decision_id')!r} lacks keys {missing}")
    unknown = sorted(set(record) - set(_FIELDS)) if len(record) != len(_FIELDS) else None
    if unknown:
        raise DataError(f"decision record {record.get('decision_id')!r} has unknown keys {unknown}; allowed: {list(_FIELDS)}")
    out: dict[str, Any] = {}
    fallback = record["fallback"]
    for key, (types, nullable, decoded) in _FIELDS.items():
        value = record[key]
        if value is None:
            if nullable or (fallback is True and key in _NULLABLE_IN_FALLBACK):
                out[key] = None
                continue
            raise DataError(f"decision record {record['decision_id']!r}: {key} must not be None")
        kind = type(value)
        if kind not in types and (kind is bool or not isinstance(value, types)):
            raise DataError(
                f"decision record {record['decision_id']!r}: {key} must be {'/'.join(t.__name__ for t in types)}, "
                f"got {type(value).__name__} {value!r:.80}"
            )
        if float in types:
            value = float(value)
            if not math.isfinite(value):
                raise DataError(f"decision record {record['decision_id']!r}: {key} must be finite, got {value!r}")
        if decoded is not None:
            try:
                parsed = json.loads(value)
            except ValueError:
                raise DataError(f"decision record {record['decision_id']!r}: {key} is not valid JSON: {value!r:.80}") from None
            if not isinstance(parsed, decoded):
                raise DataError(f"decision record {record['decision_id']!r}: {key} must be a JSON {decoded.__name__}, got {value!r:.80}")
        out[key] = value
    if not out["decision_id"]:
        raise DataError("decision record has an empty decision_id")
    try:
        created = datetime.fromisoformat(out["created_at"])
    except ValueError:
        created = None
    if created is None or created.utcoffset() is None or created.utcoffset().total_seconds() != 0:
        raise DataError(
            f"decision record {out['decision_id']!r}: created_at must be ISO 8601 in UTC "
            f"(e.g. '2025-01-31T09:00:00+00:00'), got {out['created_at']!r}"
        )
    return out


@dataclass(frozen=True)
class CompactionResult:
    """What one ``compact`` did: the segments it moved into ``decisions/log`` (including those
    of claims abandoned by crashed compactors it finished), the rows published, torn lines
    dropped, the dataset versions it committed, and the claims it recovered."""

    segments: tuple[str, ...] = ()
    rows: int = 0
    dropped_lines: int = 0
    versions: tuple[int, ...] = ()
    recovered_claims: int = 0

    def __add__(self, other: CompactionResult) -> CompactionResult:
        return CompactionResult(
            self.segments + other.segments,
            self.rows + other.rows,
            self.dropped_lines + other.dropped_lines,
            self.versions + other.versions,
            self.recovered_claims + other.recovered_claims,
        )


class _SyncWaiter:
    __slots__ = ("error", "event")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.error: BaseException | None = None


class DecisionLog:
    """The decision log of one replica (see the module docstring for the design).

        log = DecisionLog(storage, spool_dir=spool, replica_id="decide-1")
        await log.append(record)          # durable when it returns
        log.compact()

    Args:
        storage: the storage root that holds the compacted dataset ``decisions/log``.
        spool_dir: a directory on local disk (created if missing); the replicas of a node
            should share one, so that a live replica compacts what a dead one left.
        replica_id: names this replica's segments: letters, digits, ``_ . + = -``.
        group_commit_ms: how long the writer waits, after the oldest queued record, for more
            records to share its fsync. Under load batches form anyway while an fsync runs.
        segment_seconds, segment_bytes: roll the open segment after this age or size.
        fsync: the function that makes a file descriptor durable (``os.fsync``); an explicit
            seam so tests can observe when data reaches disk.
        on_published: called with each committed ``DatasetVersion`` before the claimed
            segments are deleted (metrics; tests use it to crash a compaction there).
    """

    def __init__(
        self,
        storage: Storage,
        *,
        spool_dir: str | os.PathLike[str],
        replica_id: str,
        group_commit_ms: float = 2.0,
        segment_seconds: float = 60.0,
        segment_bytes: int = 64 << 20,
        fsync: Callable[[int], None] = os.fsync,
        on_published: Callable[[DatasetVersion], None] | None = None,
    ) -> None:
        if not isinstance(replica_id, str) or not _REPLICA.match(replica_id):
            raise ServingError(f"bad replica_id {replica_id!r}: use 1-100 letters, digits, '_', '.', '+', '=' or '-'")
        if group_commit_ms < 0:
            raise ServingError(f"group_commit_ms must be >= 0, got {group_commit_ms}")
        self.storage = storage
        self.datasets = DatasetStore(storage)
        self.spool_dir = os.path.abspath(os.fspath(spool_dir))
        self.replica_id = replica_id
        self._group_commit_s = group_commit_ms / 1000.0
        self._segment_seconds = segment_seconds
        self._segment_bytes = segment_bytes
        self._fsync = fsync
        self._on_published = on_published
        os.makedirs(os.path.join(self.spool_dir, _CLAIMS), exist_ok=True)

        self._queue: deque[tuple[bytes, float, Any]] = deque()
        self._cv = threading.Condition()
        self._closing = False
        self._closed = False
        self._io_lock = threading.Lock()  # the open segment: writer thread vs compact/close
        self._fd: int | None = None
        self._path = ""
        self._opened_at = 0.0
        self._size = 0
        self._thread = threading.Thread(target=self._run, name=f"decision-log-{replica_id}", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"DecisionLog(replica_id={self.replica_id!r}, spool_dir={self.spool_dir!r})"

    def __enter__(self) -> DecisionLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------ append
    async def append(self, record: Mapping[str, Any]) -> None:
        """Log ``record``; return once it is fsynced to the spool.

        If the awaiting task is cancelled the record may still be written.

        Raises:
            DataError: the record is invalid (``validate_record``).
            StorageError: the spool could not be written; the record is not durable.
            ServingError: the log is closed.
        """
        line = _encode(validate_record(record))
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._enqueue(line, (loop, future))
        await future

    def append_sync(self, record: Mapping[str, Any]) -> None:
        """``append`` for threads without an event loop: blocks until the record is fsynced."""
        line = _encode(validate_record(record))
        waiter = _SyncWaiter()
        self._enqueue(line, waiter)
        waiter.event.wait()
        if waiter.error is not None:
            raise waiter.error

    def _enqueue(self, line: bytes, waiter: Any) -> None:
        with self._cv:
            if self._closing:
                raise ServingError(f"{self!r} is closed; records can no longer be appended")
            self._queue.append((line, time.monotonic(), waiter))
            self._cv.notify()

    def _run(self) -> None:
        tick = max(0.05, min(1.0, self._segment_seconds / 4))
        while True:
            with self._cv:
                if not self._queue and not self._closing:
                    self._cv.wait(tick)
                if not self._queue:
                    if self._closing:
                        return
                    batch = None
                else:
                    # Group commit: give later records until ``group_commit_ms`` after the oldest
                    # one to join its fsync. Under load the oldest has usually waited that long
                    # already (it arrived during the previous fsync), so this adds no latency.
                    deadline = self._queue[0][1] + self._group_commit_s
                    while len(self._queue) < _MAX_BATCH and not self._closing:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        self._cv.wait(remaining)
                    n = min(len(self._queue), _MAX_BATCH)
                    batch = [self._queue.popleft() for _ in range(n)]
            if batch is None:
                with self._io_lock:
                    if self._fd is not None and time.monotonic() - self._opened_at >= self._segment_seconds:
                        self._roll()
                continue
            self._settle(batch, self._write(b"".join(item[0] for item in batch)))

    def _write(self, data: bytes) -> BaseException | None:
        with self._io_lock:
            try:
                now = time.monotonic()
                if self._fd is not None and (
                    now - self._opened_at >= self._segment_seconds or self._size + len(data) > self._segment_bytes
                ):
                    self._roll()
                if self._fd is None:
                    self._open_segment()
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view) :]
                self._fsync(self._fd)
                self._size += len(data)
                return None
            except Exception as exc:  # the waiters must hear of any failure, or they wait forever
                # After a failed write or fsync the file's state is unknown: start a new segment
                # (a torn line in this one is dropped by its CRC at compaction).
                try:
                    self._roll()
                except OSError:
                    self._fd = None
                return StorageError(f"could not write the decision log spool {self.spool_dir!r}: {exc!r}")

    @staticmethod
    def _settle(batch: list[tuple[bytes, float, Any]], error: BaseException | None) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        for _, _, waiter in batch:
            if isinstance(waiter, _SyncWaiter):
                waiter.error = error
                waiter.event.set()
            else:
                by_loop.setdefault(waiter[0], []).append(waiter[1])
        for loop, futures in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, futures, error)
            except RuntimeError:  # the loop was closed: nobody is waiting any more
                pass

    # ---------------------------------------------------------------------- segments
    def _open_segment(self) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        name = f"{self.replica_id}@{stamp}@{uuid.uuid4().hex[:8]}"
        creating = os.path.join(self.spool_dir, f".{name}.creating")
        fd = os.open(creating, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
        try:
            # Locked before it gets a name compactors look at: an unlocked .open file means a dead owner.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            path = os.path.join(self.spool_dir, f"{name}.open")
            os.rename(creating, path)
            _fsync_dir(self.spool_dir, self._fsync)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._path, self._opened_at, self._size = fd, path, time.monotonic(), 0

    def _roll(self) -> None:
        """Close the open segment (caller holds ``_io_lock``): rename it ``.jsonl``, then unlock."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.rename(self._path, self._path[: -len(".open")] + ".jsonl")
        finally:
            os.close(fd)

    def close(self) -> None:
        """Write what is queued, close the open segment and stop the writer. Idempotent."""
        with self._cv:
            if self._closed:
                return
            self._closing = True
            self._cv.notify_all()
        self._thread.join()
        with self._io_lock:
            self._roll()
        self._closed = True

    # --------------------------------------------------------------------- compaction
    def compact(self) -> CompactionResult:
        """Move every closed spool segment into ``decisions/log``, exactly once.

        Rolls this replica's open segment first, finishes claims left by crashed compactors,
        then claims the closed segments (this replica's, other replicas' rolled ones and the
        open segments of dead replicas) and publishes their valid lines. Segments of live
        replicas that are still open are left alone. Safe to run concurrently from any number
        of replicas and processes on the node; see the module docstring for why it never
        duplicates a record.

        Returns:
            A ``CompactionResult``; ``rows == 0`` when there was nothing to do.

        Raises:
            StorageError: publishing failed; the claim stays and the next ``compact`` retries it.
        """
        with self._io_lock:
            self._roll()
        result = CompactionResult()
        for claim in self._abandoned_claims():
            result += self._finish(claim, recovered=True)
        while True:
            claim = self._claim()
            if claim is None:
                return result
            result += self._finish(claim, recovered=False)

    def _abandoned_claims(self) -> Iterator[_Claim]:
        root = os.path.join(self.spool_dir, _CLAIMS)
        for name in sorted(os.listdir(root)):
            path = os.path.join(root, name)
            if name.startswith(".") and time.time() - _mtime(path) < 60:
                # Being set up right now: its creator may not have locked it yet, and taking
                # the lock first would make the creator's own non-blocking lock fail.
                continue
            fd = _lock_if_dead(os.path.join(path, "lock"))
            if fd is None:
                continue
            if name.startswith("."):  # died while setting up, before taking any segment
                _remove_claim(path, fd)
                continue
            yield _Claim(path, fd)

    def _claim(self) -> _Claim | None:
        candidates = []
        for name in sorted(os.listdir(self.spool_dir)):
            path = os.path.join(self.spool_dir, name)
            if name.endswith(".creating"):
                # A replica died creating it: empty and unreferenced. Young ones are left alone:
                # their creator may not have locked them yet.
                if time.time() - _mtime(path) < 60:
                    continue
                fd = _lock_if_dead(path)
                if fd is not None:
                    _unlink(path)
                    os.close(fd)
            elif _SEGMENT.match(name):
                candidates.append(name)
        if not candidates:
            return None
        claim_id = f"{self.replica_id}@{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}@{uuid.uuid4().hex[:8]}"
        root = os.path.join(self.spool_dir, _CLAIMS)
        hidden, path = os.path.join(root, f".{claim_id}"), os.path.join(root, claim_id)
        os.mkdir(hidden)
        fd = os.open(os.path.join(hidden, "lock"), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(hidden, path)
        claim = _Claim(path, fd)
        taken = 0
        for name in candidates:
            src = os.path.join(self.spool_dir, name)
            seg_fd = None
            if name.endswith(".open"):
                seg_fd = _lock_if_dead(src)
                if seg_fd is None:
                    continue  # its replica is alive and may still append
            try:
                size = os.stat(src).st_size
                os.rename(src, os.path.join(path, name))
            except FileNotFoundError:
                continue  # another compactor took it first
            finally:
                if seg_fd is not None:
                    os.close(seg_fd)
            taken += size
            if taken >= _MAX_CLAIM_BYTES:
                break
        if not claim.segments():
            _remove_claim(path, fd)
            return None
        _fsync_dir(self.spool_dir, self._fsync)
        _fsync_dir(path, self._fsync)
        return claim

    def _finish(self, claim: _Claim, *, recovered: bool) -> CompactionResult:
        try:
            segments = claim.segments()
            state = claim.read_state()
            published = self._published(state["txids"])
            table, dropped = (None, 0) if published else _read_segments([os.path.join(claim.path, n) for n in segments])
            rows = 0 if table is None else table.num_rows
            versions: tuple[int, ...] = ()
            if rows:
                try:
                    version = self._publish(claim, state, segments, table)
                except PlatformError:
                    raise
                except Exception as exc:  # the filesystem's own errors (OSError, botocore…)
                    raise StorageError(
                        f"could not publish {rows} decisions to {self.storage.uri(DATASET)!r}: {exc}; "
                        "they stay claimed in the spool and the next compact() retries them"
                    ) from exc
                versions = (version.version,)
                if self._on_published is not None:
                    self._on_published(version)
            for name in segments:
                _unlink(os.path.join(claim.path, name))
            _remove_claim(claim.path, claim.fd)
            claim.fd = -1
            return CompactionResult(tuple(segments), rows, dropped, versions, int(recovered))
        finally:
            if claim.fd >= 0:
                os.close(claim.fd)  # the claim stays; a later compact takes it over

    def _published(self, txids: list[str]) -> bool:
        """Whether the latest ``decisions/log`` manifest holds files of one of ``txids``."""
        if not txids or not self.datasets.exists(DATASET):
            return False
        listed = {f.path.split("/")[1] for f in self.datasets.get(DATASET).files}
        return bool(listed.intersection(txids))

    def _publish(self, claim: _Claim, state: dict[str, Any], segments: list[str], table: pa.Table) -> DatasetVersion:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        table = table.append_column("date", pc.utf8_slice_codeunits(table["created_at"], 0, 10))  # UTC: checked on append

        def write(staging: str) -> None:
            # Recorded before any byte is staged: if this process dies after the commit, the
            # txid is how the next compactor knows these segments are already published.
            state["txids"].append(posixpath.basename(staging.rstrip("/")))
            claim.write_state(state, self._fsync)
            pq.write_to_dataset(
                table, staging, partition_cols=["date"], filesystem=self.storage.arrow_fs,
                basename_template="part-{i}.parquet",
            )

        return self.datasets.publish(
            DATASET, write, partition_by="date", replace="append",
            metadata={"segments": segments, "claim": os.path.basename(claim.path), "rows": table.num_rows},
        )

    # ------------------------------------------------------------------------- lookup
    def get(self, decision_id: str) -> dict[str, Any]:
        """The record of ``decision_id``, from the spool (live or claimed) or ``decisions/log``.

        Raises:
            NotFoundError: no such decision was logged (or its segment was lost with its disk).
        """
        return find_decision(self.storage, decision_id, spool_dir=self.spool_dir)


@dataclass
class _Claim:
    path: str
    fd: int

    def segments(self) -> list[str]:
        return sorted(n for n in os.listdir(self.path) if _SEGMENT.match(n))

    def read_state(self) -> dict[str, Any]:
        try:
            with open(os.path.join(self.path, "state.json"), "rb") as f:
                return json.load(f)
        except FileNotFoundError:
            return {"txids": []}

    def write_state(self, state: dict[str, Any], fsync: Callable[[int], None]) -> None:
        target = os.path.join(self.path, "state.json")
        tmp = f"{target}.tmp"
        with open(tmp, "wb") as f:
            f.write(json.dumps(state).encode())
            f.flush()
            fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(self.path, fsync)


# ---------------------------------------------------------------------------- lookup
def find_decision(storage: Storage, decision_id: str, *, spool_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Look a decision up: in ``spool_dir`` (if given) first, then in ``decisions/log``.

        record = find_decision(platform.storage, "d-123", spool_dir="/var/lib/mlp/decision-spool")

    A segment only moves forward (spool -> claim -> dataset), and the places are searched in
    that order, so a record being compacted meanwhile is still found. The dataset search
    reads the ``decision_id`` column of every file: fine for audits, not for a hot path.

    Raises:
        NotFoundError: not in the spool nor in the compacted log.
    """
    needle = json.dumps({"decision_id": decision_id}, separators=(",", ":"), ensure_ascii=False)[1:-1].encode()
    if spool_dir is not None:
        spool_dir = os.fspath(spool_dir)
        claims = os.path.join(spool_dir, _CLAIMS)
        for folder in (spool_dir, *(os.path.join(claims, c) for c in _listdir(claims))):
            for name in _listdir(folder):
                if not _SEGMENT.match(name):
                    continue
                try:
                    with open(os.path.join(folder, name), "rb") as f:
                        data = f.read()
                except FileNotFoundError:
                    continue  # moved on to a claim or compacted: searched next
                if needle not in data:
                    continue
                for record in _parse_lines(data)[0]:
                    if record["decision_id"] == decision_id:
                        return record
    datasets = DatasetStore(storage)
    if datasets.exists(DATASET):
        import pyarrow.compute as pc
        import pyarrow.dataset as pads

        paths = datasets.file_paths(datasets.get(DATASET))
        if paths:
            found = pads.dataset(paths, schema=_schema(), format="parquet", filesystem=storage.arrow_fs).to_table(
                filter=pc.field("decision_id") == decision_id
            )
            if found.num_rows:
                return found.slice(0, 1).to_pylist()[0]
    where = f"the spool {spool_dir!r} nor " if spool_dir is not None else ""
    raise NotFoundError(f"decision {decision_id!r} is in neither {where}{storage.uri(DATASET)!r}")


# ------------------------------------------------------------------------- encoding
def _encode(record: dict[str, Any]) -> bytes:
    payload = json.dumps(record, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def _parse_lines(data: bytes) -> tuple[list[dict[str, Any]], int]:
    """Records of the lines whose CRC matches, and how many lines were dropped."""
    records, dropped = [], 0
    for line in data.split(b"\n"):
        if not line:
            continue
        payload = line[9:]
        try:
            ok = len(line) > 9 and line[8:9] == b" " and int(line[:8], 16) == zlib.crc32(payload)
            record = json.loads(payload) if ok else None
        except ValueError:
            record = None
        if record is None:
            dropped += 1
        else:
            records.append(record)
    return records, dropped


def _read_segments(paths: list[str]) -> tuple[pa.Table | None, int]:
    """The valid lines of ``paths`` as one table (None if there are none), and how many lines
    were dropped. Only the CRC check runs in Python; Arrow parses the JSON, off the GIL, so a
    compaction on a serving replica costs its request path little."""
    import pyarrow as pa
    import pyarrow.json as pajson

    payloads, dropped, longest = [], 0, 0
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        for line in data.split(b"\n"):
            if not line:
                continue
            payload = line[9:]
            try:
                ok = line[8:9] == b" " and int(line[:8], 16) == zlib.crc32(payload)
            except ValueError:
                ok = False
            if ok:
                payloads.append(payload)
                longest = max(longest, len(payload))
            else:
                dropped += 1
    if not payloads:
        return None, dropped
    table = pajson.read_json(
        pa.BufferReader(b"\n".join(payloads)),
        read_options=pajson.ReadOptions(block_size=max(1 << 20, 2 * longest + 2)),
        parse_options=pajson.ParseOptions(explicit_schema=_schema(), unexpected_field_behavior="error"),
    )
    return table, dropped


# ------------------------------------------------------------------------ filesystem
def _resolve(futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for future in futures:
        if not future.done():
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)


def _lock_if_dead(path: str) -> int | None:
    """Open and exclusively lock ``path`` if no live process holds it; the fd, or None."""
    try:
        fd = os.open(path, os.O_RDWR)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # The file may have been renamed or removed between open and lock: then it is not
        # the one at ``path`` any more, and whoever did that owns what is there now.
        if os.fstat(fd).st_ino != os.stat(path).st_ino:
            raise FileNotFoundError(path)
    except (BlockingIOError, FileNotFoundError):
        os.close(fd)
        return None
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fd


def _remove_claim(path: str, fd: int) -> None:
    for name in os.listdir(path):
        if name != "lock":
            _unlink(os.path.join(path, name))
    _unlink(os.path.join(path, "lock"))  # last: until now the lock kept others out
    os.close(fd)
    try:
        os.rmdir(path)
    except OSError:
        pass


def _fsync_dir(path: str, fsync: Callable[[int], None]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fsync(fd)
    finally:
        os.close(fd)


def _mtime(path: str) -> float:
    try:
        return os.stat(path).st_mtime
    except FileNotFoundError:
        return time.time()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []
