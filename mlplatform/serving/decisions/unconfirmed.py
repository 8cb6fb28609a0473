"""Answers the idempotency store has not confirmed yet, kept on the node's disk until it has.

    pending = UnconfirmedAnswers("/var/lib/mlp/spool/unconfirmed")
    pending.add_many([("app-1", answer)])   # durable (one fsync a batch) before the decision is answered
    pending.get("app-1")                    # the answer, for a retry that reaches this node
    pending.sync(store)                     # into the store once it answers; (stored, conflicts)

A decision made while the shared idempotency store is unreachable (or too slow for the
request's deadline) is still logged and answered, but no other replica can know about it. So
before answering, its answer is written here, in a folder of the node's spool that every
replica of the node shares: one small file per micro-batch (``<time>-<pid>-<n>.answers``, a
line ``application_id<TAB>answer`` per decision, fsynced, renamed into place, the folder
fsynced), so an outage costs one fsync a batch, not one a decision. Every replica checks this
folder for a retried application before deciding it anew (``get``, from an index of the
files it has read; ``any`` keeps the check free while the folder is empty). The folders are
listed again only after a change: every writer, after adding, moving or removing files,
appends one byte to the folder's ``.changes`` file, whose size (exact, unlike an mtime of a
coarse clock) ``get`` compares with the size read before its last listing — one ``stat`` a
new application, however many files the folder keeps. ``any`` also lists them when a
folder's mtime moved (every 0.2 s at most), for a writer that does not count its changes.
Each replica's housekeeping writes the answers into the store as soon as it
answers again (``sync``), first writer wins: the store's ``put_if_absent_many`` keeps an
answer that is already there, and that case is counted as a conflict and logged. Synced files
move to ``synced/`` and stay readable for an hour, so a retry that reaches the node during a
later outage still finds its answer.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlplatform.serving.idempotency import IdempotencyStore

__all__ = ["UnconfirmedAnswers"]

log = logging.getLogger(__name__)

_SUFFIX = ".answers"
_SYNCED = "synced"
_CHANGES = ".changes"  # one byte appended per change of either folder (see the module docstring)
#: How long answers stay readable here after the store took them: a retry that reaches this
#: node while the store is unreachable again still finds its first answer.
RETENTION_S = 3600.0
#: Seconds after which a folder's mtime is trusted to show every later change (a change within
#: one tick of a coarse clock, or of a whole-second file system, may leave it as it was).
SETTLED_S = 2.0


class UnconfirmedAnswers:
    """A folder of ``.answers`` files shared by the replicas of one node (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike[str], *, retention_s: float = RETENTION_S, settled_s: float = SETTLED_S) -> None:
        self.folder = os.fspath(folder)
        self._settled_ns = int(settled_s * 1e9)
        self.synced = os.path.join(self.folder, _SYNCED)
        self.retention_s = retention_s
        os.makedirs(self.synced, mode=0o700, exist_ok=True)
        self._lock = threading.Lock()
        self._counter = itertools.count()
        self._index: dict[str, str] = {}  # application id -> answer, from the files read so far
        self._read: set[str] = set()  # file names read into the index
        self._nonempty = True  # until the first look says otherwise
        self._waiting = True
        self._looked = 0.0
        self._stamps: tuple[int, int] | None = None  # both folders' mtimes at the last listing, when settled
        self._changes = os.path.join(self.folder, _CHANGES)
        self._counted: tuple[int, int] | None = None  # the .changes file's (inode, size) before the last listing
        self.refresh()

    def add_many(self, entries: list[tuple[str, str]]) -> None:
        """Keep each ``(application_id, answer)`` durably, all in one file (one fsync of the
        file, one of the folder). Application ids and answers hold no newline or tab (ids are
        checked by the request schema; answers are compact JSON)."""
        if not entries:
            return
        name = f"{time.time_ns():020d}-{os.getpid()}-{next(self._counter)}{_SUFFIX}"
        path = os.path.join(self.folder, name)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write("".join(f"{application_id}\t{answer}\n" for application_id, answer in entries))
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._count_change()
        with self._lock:
            for application_id, answer in entries:
                self._index.setdefault(application_id, answer)
            self._read.add(name)
        self._nonempty = self._waiting = True

    def any(self) -> bool:
        """Whether the folder may hold answers (looked at again at most every 0.2 s)."""
        if time.monotonic() - self._looked > 0.2:
            if self._changed() or self._count() != self._counted:
                self.refresh()
            else:
                self._looked = time.monotonic()
        return self._nonempty

    def refresh(self) -> None:
        """Read files other replicas added since the last look (waiting and synced ones)."""
        # The count of changes and the folders' mtimes, read before listing them: a file added,
        # moved or removed later changes them, so ``get`` (the count) and ``any`` (both) can
        # skip the listing while they are unchanged.
        before = time.time_ns()
        counted = self._count()
        stamps = _mtimes(self.folder, self.synced)
        waiting = {n for n in _listdir(self.folder) if n.endswith(_SUFFIX)}
        kept = {os.path.join(_SYNCED, n) for n in _listdir(self.synced) if n.endswith(_SUFFIX)}
        names = waiting | kept
        with self._lock:
            if self._read - names:  # moved or expired: rebuild the index from what is there
                self._index, self._read = {}, set()
            for name in sorted(names - self._read):
                for application_id, answer in _entries(os.path.join(self.folder, name)):
                    self._index.setdefault(application_id, answer)
                self._read.add(name)
            self._nonempty = bool(names)
            self._waiting = bool(waiting)
            # Trust the mtimes only when both are older than ``settled_s``: a change within the
            # same tick of a coarse clock (or of a file system with whole-second times) could
            # leave an mtime as it was.
            settled = stamps is not None and max(stamps) < before - self._settled_ns
            self._stamps = stamps if settled else None
            self._counted = counted
        self._looked = time.monotonic()

    def _changed(self) -> bool:
        """Whether a file may have been added or moved since the last listing (two ``stat``s
        instead of two listings of folders that can hold an hour of files)."""
        return self._stamps is None or _mtimes(self.folder, self.synced) != self._stamps

    def waiting(self) -> bool:
        """Whether answers wait for the store (as of the last look)."""
        return self._waiting

    def get(self, application_id: str) -> str | None:
        """The kept answer of ``application_id``, or None (the folders are listed again first
        if the index does not have it and a change was counted since the last listing)."""
        answer = self._index.get(application_id)
        if answer is None and self._nonempty and self._count() != self._counted:
            self.refresh()
            answer = self._index.get(application_id)
        return answer

    def sync(self, store: IdempotencyStore) -> tuple[int, int]:
        """Write every waiting answer into ``store``, then move its file to ``synced/``, where
        it stays readable for ``retention_s``. Returns (stored, conflicts); a conflict is an
        application the store already had another answer for.

        Raises:
            IdempotencyUnavailable: the store did not answer (the answers stay waiting).
        """
        with self._lock:
            self._expire()
            files = sorted(n for n in _listdir(self.folder) if n.endswith(_SUFFIX))
        if not files:
            self.refresh()  # what expired is forgotten
            return 0, 0
        # The store call runs without the lock: a hung store must not block ``get``/``any``
        # (called on the replica's event loop) or ``add_many``. Files are immutable once
        # renamed in, and a file another replica moved first is skipped.
        entries: dict[str, str] = {}
        for name in files:
            for application_id, answer in _entries(os.path.join(self.folder, name)):
                entries.setdefault(application_id, answer)  # the first answer given wins
        pairs = list(entries.items())
        results = store.put_if_absent_many(pairs) if pairs else []
        conflicts = 0
        for (application_id, answer), existing in zip(pairs, results):
            if existing is not None and existing != answer:
                conflicts += 1
                log.error("application %r was answered twice while the idempotency store was unreachable", application_id)
        for name in files:
            try:
                os.replace(os.path.join(self.folder, name), os.path.join(self.synced, name))
            except FileNotFoundError:
                pass  # another replica of the node synced it
        self._count_change()
        self.refresh()
        return len(pairs) - conflicts, conflicts

    def _expire(self) -> None:
        cutoff = time.time() - self.retention_s
        removed = False
        for name in _listdir(self.synced):
            path = os.path.join(self.synced, name)
            try:
                if os.stat(path).st_mtime < cutoff:
                    os.remove(path)
                    removed = True
            except FileNotFoundError:
                pass
        if removed:
            self._count_change()

    def _count_change(self) -> None:
        """Tell the node's other replicas that a folder changed (after the change is made).
        Best effort: the change itself is already durable, and a replica that missed the count
        sees the folder's mtime move within ``any``'s 0.2 s."""
        try:
            fd = os.open(self._changes, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, b".")
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("could not count a change of %s: %s", self.folder, exc)

    def _count(self) -> tuple[int, int]:
        """The ``.changes`` file's (inode, size); (0, 0) before anyone counted a change."""
        try:
            st = os.stat(self._changes)
        except FileNotFoundError:
            return (0, 0)
        return (st.st_ino, st.st_size)


def _entries(path: str) -> list[tuple[str, str]]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        application_id, sep, answer = line.partition("\t")
        if sep and application_id and answer:
            out.append((application_id, answer))
    return out


def _mtimes(*folders: str) -> tuple[int, ...] | None:
    try:
        return tuple(os.stat(f).st_mtime_ns for f in folders)
    except FileNotFoundError:
        return None


def _listdir(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []
