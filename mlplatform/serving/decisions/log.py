"""The decision log: every decision durable on local disk before it is answered, then
compacted, exactly once, into the Parquet dataset ``decisions/log`` under the storage root.

    log = DecisionLog(storage, spool_dir="/var/lib/mlp/decision-spool", replica_id="decide-1")
    await log.append(record)     # returns once the record is fsynced (group commit)
    log.compact()                # spool segments (this replica's and dead ones') -> decisions/log
    log.get("d-123")             # from the spool or the compacted data
    log.close()

The spool's layout and who may take a segment: ``spool``. The records and their
lines: ``records``. Compaction, exactly once: ``compaction``. Lookup:
``lookup``.

Appending (group commit): ``append`` validates and encodes the record and queues it; one
writer thread takes everything queued — waiting at most ``group_commit_ms`` after the oldest
queued record for more to arrive — writes it with one ``write``, ``fsync``s, and only then
resolves every waiter (asyncio futures through ``loop.call_soon_threadsafe``, one call per
loop and batch). A replica killed with SIGKILL therefore loses no decision it returned.
A segment is rolled after ``segment_seconds`` or ``segment_bytes``, and by ``compact``/``close``.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from mlplatform.errors import ServingError, StorageError
from mlplatform.serving.decisions.compaction import CompactionResult, Compactor
from mlplatform.serving.decisions.lookup import find_decision
from mlplatform.serving.decisions.records import encode_line, validate_record
from mlplatform.serving.decisions.spool import CLAIMS, fsync_dir

if TYPE_CHECKING:
    from mlplatform.storage.blobs import Storage
    from mlplatform.storage.datasets import DatasetVersion

__all__ = ["DecisionLog"]

_REPLICA = re.compile(r"^[A-Za-z0-9_.+=-]{1,100}$")
_MAX_BATCH = 4096


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
        self.spool_dir = os.path.abspath(os.fspath(spool_dir))
        self.replica_id = replica_id
        self._group_commit_s = group_commit_ms / 1000.0
        self._segment_seconds = segment_seconds
        self._segment_bytes = segment_bytes
        self._fsync = fsync
        os.makedirs(os.path.join(self.spool_dir, CLAIMS), exist_ok=True)
        self._compactor = Compactor(
            storage, spool_dir=self.spool_dir, replica_id=replica_id, fsync=fsync, on_published=on_published
        )

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
        line = encode_line(validate_record(record))
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._enqueue(line, (loop, future))
        await future

    def append_sync(self, record: Mapping[str, Any]) -> None:
        """``append`` for threads without an event loop: blocks until the record is fsynced."""
        line = encode_line(validate_record(record))
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
            fsync_dir(self.spool_dir, self._fsync)
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
        of replicas and processes on the node; see ``compaction`` for why it never
        duplicates a record.

        Returns:
            A ``CompactionResult``; ``rows == 0`` when there was nothing to do.

        Raises:
            StorageError: publishing failed; the claim stays and the next ``compact`` retries it.
        """
        with self._io_lock:
            self._roll()
        return self._compactor.run()

    # ------------------------------------------------------------------------- lookup
    def get(self, decision_id: str) -> dict[str, Any]:
        """The record of ``decision_id``, from the spool (live or claimed) or ``decisions/log``.

        Raises:
            NotFoundError: no such decision was logged (or its segment was lost with its disk).
        """
        return find_decision(self.storage, decision_id, spool_dir=self.spool_dir)


def _resolve(futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for future in futures:
        if not future.done():
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)
