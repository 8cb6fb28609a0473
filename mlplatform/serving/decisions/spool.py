"""The decision log's spool: a directory on a node's local disk, shared by its replicas, that
holds every decision until it is compacted into ``decisions/log``.

Layout::

    <replica>@<UTC start>@<nonce>.open    the segment a live replica is appending to
    <replica>@<UTC start>@<nonce>.jsonl   a closed segment (rolled: never written again)
    claims/<claim>/                       segments a compaction has taken, its lock and state

``decision_log.DecisionLog`` writes segments (lines: ``records``),
``compaction`` moves them into ``decisions/log``, ``lookup`` searches them.

Who may take a segment: the owner holds an exclusive ``flock`` on its ``.open`` segment for as
long as it may write it (a segment is created under a temporary name, locked, and only then
renamed to ``.open``, so no ``.open`` file is ever unlocked while its owner lives). The kernel
drops the lock when the owner dies, SIGKILL included, so a ``.open`` segment whose lock can be
taken belongs to a dead replica. A ``.jsonl`` segment is closed. Both may be claimed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
from collections.abc import Callable

__all__ = ["CLAIMS", "SEGMENT_NAME", "fsync_dir", "lock_if_dead"]

#: ``<replica>@<UTC start>@<nonce>.open`` (being written) or ``.jsonl`` (closed).
SEGMENT_NAME = re.compile(r"^[A-Za-z0-9_.+=-]{1,100}@\d{8}T\d{12}Z@[0-9a-f]{8}\.(open|jsonl)$")
#: The folder of the spool that holds claims (``claims/<claim>/``).
CLAIMS = "claims"


def lock_if_dead(path: str) -> int | None:
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


def fsync_dir(path: str, fsync: Callable[[int], None]) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fsync(fd)
    finally:
        os.close(fd)
