"""A redis-server of a test's own, with AOF persistence, that the test may kill and restart on
the same port and directory (the session ``redis_server`` fixture has no persistence and must
stay up for everyone else)."""

from __future__ import annotations

import ctypes
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class PersistentRedis:
    """``redis-server --appendonly yes --appendfsync <fsync>`` in ``directory``; ``kill()``
    SIGKILLs it (nothing is flushed on the way out), ``start()`` brings it back."""

    def __init__(self, directory: Path, *, fsync: str = "always", extra: tuple[str, ...] = ()) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.fail("redis-server is not installed: apt-get install redis-server (CI's setup script installs it)")
        self.exe = exe
        self.directory = directory
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.args = ["--save", "", "--appendonly", "yes", "--appendfsync", fsync, *extra]
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> PersistentRedis:
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory), *self.args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited early with code {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):  # answers PONG only once the AOF is loaded
                        return self
            except OSError:
                pass
            time.sleep(0.02)
        self.proc.kill()
        raise RuntimeError(f"redis-server did not answer PING on 127.0.0.1:{self.port} within {timeout}s")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
