"""Compaction: the spool's closed segments moved into the Parquet dataset ``decisions/log``,
exactly once, whichever replicas run it and whenever they crash.

    result = Compactor(storage, spool_dir=spool, replica_id="decide-1").run()
    # usually through DecisionLog.compact(), which first rolls its own open segment

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
"""

from __future__ import annotations

import fcntl
import json
import os
import posixpath
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from mlplatform.errors import PlatformError, StorageError
from mlplatform.serving.decisions.records import DATASET, read_segments
from mlplatform.serving.decisions.spool import CLAIMS, SEGMENT_NAME, fsync_dir, lock_if_dead
from mlplatform.storage.datasets import DatasetStore

if TYPE_CHECKING:
    import pyarrow as pa

    from mlplatform.storage.blobs import Storage
    from mlplatform.storage.datasets import DatasetVersion

__all__ = ["CompactionResult", "Compactor"]

_MAX_CLAIM_BYTES = 256 << 20


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


class Compactor:
    """Compacts one spool into ``decisions/log`` (see the module docstring for the protocol).

        result = Compactor(storage, spool_dir=spool, replica_id="decide-1").run()

    Args:
        storage: the storage root that holds ``decisions/log``.
        spool_dir: the spool (see ``spool``); it must exist, with its ``claims/``.
        replica_id: names the claims this compactor makes.
        fsync: the function that makes a file descriptor durable (``os.fsync``).
        on_published: called with each committed ``DatasetVersion`` before the claimed
            segments are deleted (metrics; tests use it to crash a compaction there).
    """

    def __init__(
        self,
        storage: Storage,
        *,
        spool_dir: str,
        replica_id: str,
        fsync: Callable[[int], None] = os.fsync,
        on_published: Callable[[DatasetVersion], None] | None = None,
    ) -> None:
        self.storage = storage
        self.datasets = DatasetStore(storage)
        self.spool_dir = spool_dir
        self.replica_id = replica_id
        self._fsync = fsync
        self._on_published = on_published

    def run(self) -> CompactionResult:
        """Finish the claims of crashed compactors, then claim and publish closed segments
        until none is left (``DecisionLog.compact`` says which segments those are)."""
        result = CompactionResult()
        for claim in self._abandoned_claims():
            result += self._finish(claim, recovered=True)
        while True:
            claim = self._claim()
            if claim is None:
                return result
            result += self._finish(claim, recovered=False)

    def _abandoned_claims(self) -> Iterator[_Claim]:
        root = os.path.join(self.spool_dir, CLAIMS)
        for name in sorted(os.listdir(root)):
            path = os.path.join(root, name)
            if name.startswith(".") and time.time() - _mtime(path) < 60:
                # Being set up right now: its creator may not have locked it yet, and taking
                # the lock first would make the creator's own non-blocking lock fail.
                continue
            fd = lock_if_dead(os.path.join(path, "lock"))
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
                fd = lock_if_dead(path)
                if fd is not None:
                    _unlink(path)
                    os.close(fd)
            elif SEGMENT_NAME.match(name):
                candidates.append(name)
        if not candidates:
            return None
        claim_id = f"{self.replica_id}@{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}@{uuid.uuid4().hex[:8]}"
        root = os.path.join(self.spool_dir, CLAIMS)
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
                seg_fd = lock_if_dead(src)
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
        fsync_dir(self.spool_dir, self._fsync)
        fsync_dir(path, self._fsync)
        return claim

    def _finish(self, claim: _Claim, *, recovered: bool) -> CompactionResult:
        try:
            segments = claim.segments()
            state = claim.read_state()
            published = self._published(state["txids"])
            table, dropped = (None, 0) if published else read_segments([os.path.join(claim.path, n) for n in segments])
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


@dataclass
class _Claim:
    path: str
    fd: int

    def segments(self) -> list[str]:
        return sorted(n for n in os.listdir(self.path) if SEGMENT_NAME.match(n))

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
        fsync_dir(self.path, fsync)


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
