"""A one-node or multi-node Ray started with `ray start` by a test, and stopped by it alone:
a free loopback port, and killing exactly that cluster's processes."""

from __future__ import annotations

import socket
from pathlib import Path

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_cluster(gcs_port: int) -> None:
    """Stop only the Ray processes of this cluster (never `ray stop`: it stops every Ray here)."""
    mine = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if f":{gcs_port}" in cmd or f"--gcs_server_port={gcs_port}" in cmd or f"--port={gcs_port}" in cmd:
            mine.append(proc)
    # With their children: Serve's HAProxy runs under an actor's worker but its command line
    # names no Ray port, and an orphaned one keeps 8404/9101 from every later Serve here.
    for proc in list(mine):
        try:
            mine.extend(c for c in proc.children(recursive=True) if c not in mine)
        except psutil.NoSuchProcess:
            pass
    for proc in mine:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(mine, timeout=10)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    # `ray start --head` recorded this cluster as the machine's current one; like `ray stop`,
    # forget it, or a later plain ray.init() would try to join the dead cluster.
    from ray._common.utils import get_ray_address_file

    current = Path(get_ray_address_file(None))
    if current.exists() and current.read_text().strip().endswith(f":{gcs_port}"):
        current.unlink(missing_ok=True)
