"""Answers the idempotency store has not confirmed yet, kept on the node's disk until it has.

    pending = UnconfirmedAnswers("/var/lib/mlp/spool/unconfirmed")
    pending.add("app-1", answer)         # durable (fsync) before the decision is answered
    pending.get("app-1")                 # the answer, for a retry that reaches this node
    pending.sync(store)                  # into the store once it answers; (stored, conflicts)

A decision made while the shared idempotency store is unreachable (or too slow for the
request's deadline) is still logged and answered, but no other replica can know about it. So
before answering, its answer is written here, one small file per application, in a folder of
the node's spool that every replica of the node shares. Every replica checks this folder for
a retried application before deciding it anew (``get``; ``any`` keeps that check free while
the folder is empty), and each one's housekeeping writes the answers into the store as soon
as it answers again (``sync``), first writer wins: the store's ``put_if_absent_many`` keeps an
answer that is already there, and that case is counted as a conflict and logged.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlplatform.serving.idempotency import IdempotencyStore

__all__ = ["UnconfirmedAnswers"]

log = logging.getLogger(__name__)

_SUFFIX = ".answer"


class UnconfirmedAnswers:
    """A folder of ``<sha256(application_id)>.answer`` files: the application id on the first
    line, the stored answer on the second."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = os.fspath(folder)
        os.makedirs(self.folder, mode=0o700, exist_ok=True)
        self._lock = threading.Lock()
        self._nonempty = True  # until the first look says otherwise
        self._looked = 0.0
        self.refresh()

    def _path(self, application_id: str) -> str:
        return os.path.join(self.folder, hashlib.sha256(application_id.encode()).hexdigest() + _SUFFIX)

    def add(self, application_id: str, answer: str) -> None:
        """Keep ``answer`` durably (written to a temporary file, fsynced, renamed, folder fsynced)."""
        path = self._path(application_id)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(application_id + "\n" + answer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self._nonempty = True

    def any(self) -> bool:
        """Whether the folder may hold answers (looked at again at most every 0.2 s)."""
        if time.monotonic() - self._looked > 0.2:
            self.refresh()
        return self._nonempty

    def refresh(self) -> None:
        self._nonempty = any(name.endswith(_SUFFIX) for name in _listdir(self.folder))
        self._looked = time.monotonic()

    def get(self, application_id: str) -> str | None:
        """The kept answer of ``application_id``, or None."""
        try:
            with open(self._path(application_id), encoding="utf-8") as f:
                stored_id, _, answer = f.read().partition("\n")
        except FileNotFoundError:
            return None
        return answer if stored_id == application_id and answer else None

    def sync(self, store: IdempotencyStore) -> tuple[int, int]:
        """Write every kept answer into ``store`` and forget it. Returns (stored, conflicts);
        a conflict is an application the store already had another answer for.

        Raises:
            IdempotencyUnavailable: the store did not answer (the answers stay here).
        """
        with self._lock:
            entries: list[tuple[str, str, str]] = []
            for name in _listdir(self.folder):
                if not name.endswith(_SUFFIX):
                    continue
                path = os.path.join(self.folder, name)
                try:
                    with open(path, encoding="utf-8") as f:
                        application_id, _, answer = f.read().partition("\n")
                except FileNotFoundError:
                    continue  # another replica of the node synced it
                if application_id and answer:
                    entries.append((path, application_id, answer))
            if not entries:
                self.refresh()
                return 0, 0
            results = store.put_if_absent_many([(a, answer) for _, a, answer in entries])
            conflicts = 0
            for (path, application_id, answer), existing in zip(entries, results):
                if existing is not None and existing != answer:
                    conflicts += 1
                    log.error("application %r was answered twice while the idempotency store was unreachable", application_id)
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass
            self.refresh()
            return len(entries) - conflicts, conflicts


def _listdir(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []
