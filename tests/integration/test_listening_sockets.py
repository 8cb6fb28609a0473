"""Nothing listens that should not: a local deployment (the platform's own local Ray, Serve
with HAProxy ingress) opens TCP listeners on loopback only, besides serving.host:serving.port,
keeps HAProxy's admin socket private and leaves nothing behind.

The platform's local Ray is not the session Ray of conftest.py (that one is started by the
tests, not by ``mlplatform._ray.connect``), so ``_listening_app.py`` runs in a subprocess that
starts its own. The sockets inspected are those of that subprocess and its descendants: its
GCS, raylet, dashboard, agents and workers, and the HAProxy that Serve starts. Other Rays and
servers on this machine are ignored.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

from mlplatform.serving.ingress import haproxy_binary

REPO = Path(__file__).resolve().parents[2]
KEY = "listen-test-key-" + "y" * 24
READY_TIMEOUT_S = 420

# Ray Serve 2.60 starts each replica's inter-deployment gRPC server on "[::]:0" whatever the
# node IP or serving.host (ray/serve/_private/replica.py, _on_initialized) and has no setting
# for it; Ray's token authentication guards it. Tolerated here, one per replica process, on
# an ephemeral port (outside Serve's direct-ingress ranges), so that anything else still fails.
KNOWN_WILDCARD = "ray::ServeReplica:"
DIRECT_INGRESS_RANGES = (range(30000, 31001), range(40000, 41001))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _name(proc: psutil.Process) -> str:
    try:
        return " ".join(proc.cmdline()) or proc.name()  # whole: a long checkout path must not cut the names checked
    except psutil.Error:
        return "?"


def _listeners(root: psutil.Process) -> list[tuple[str, int, int, str]]:
    """(address, port, pid, command line) of every listening TCP socket in ``root``'s tree."""
    found = []
    for proc in _tree(root):
        try:
            conns = proc.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        found += [(c.laddr.ip, c.laddr.port, proc.pid, _name(proc)) for c in conns if c.status == psutil.CONN_LISTEN]
    return found


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1, how Ray's C++ servers report it
    return (mapped or ip).is_loopback


def _haproxies(root: psutil.Process) -> list[tuple[psutil.Process, str]]:
    """HAProxy processes in the tree and the config file each runs (``-f``)."""
    found = []
    for proc in _tree(root):
        try:
            args = proc.cmdline()
        except psutil.Error:
            continue
        if args and os.path.basename(args[0]) == "haproxy" and "-f" in args[:-1]:
            found.append((proc, args[args.index("-f") + 1]))
    return found


def _read_until(proc: subprocess.Popen, prefix: str, timeout_s: float) -> str:
    """The first stdout line of ``proc`` that starts with ``prefix`` (the rest is Ray's chatter)."""
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"the app process exited (rc={proc.wait()}) before printing {prefix!r}")
        if line.startswith(prefix):
            return line[len(prefix):].strip()
    raise AssertionError(f"no {prefix!r} from the app process within {timeout_s:.0f}s")


@pytest.mark.integration
def test_local_deployment_listens_on_loopback_only_and_keeps_haproxy_private(tmp_path):
    if haproxy_binary() is None:
        pytest.fail("haproxy is not installed (apt-get install haproxy; .ci/setup installs it): without it the "
                    "deployment would use Serve's default proxy, and the HAProxy lockdown this test checks would go untested")
    port = _free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        "MLP_LISTEN_TEST_KEY": KEY,
        # Serve's fixed host ports, moved so this runs beside another Serve with HAProxy.
        "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port()),
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(_free_port()),
    }
    for name in ("RAY_ADDRESS", "RAY_SERVE_HAPROXY_SOCKET_PATH", "RAY_SERVE_HAPROXY_BINARY_PATH"):
        env.pop(name, None)
    app = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("_listening_app.py")), str(tmp_path), str(port)],
        cwd=tmp_path, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    root = psutil.Process(app.pid)
    try:
        ready = json.loads(_read_until(app, "READY ", READY_TIMEOUT_S))
        assert ready["ingress"] == "haproxy", ready
        url = ready["url"]

        # -- TCP listeners: loopback only, except the ingress itself (serving.host is loopback here).
        listeners = _listeners(root)
        report = "\n".join(f"  {a}:{p} pid={pid} {cmd[:160]}" for a, p, pid, cmd in sorted(listeners))
        print(f"listening sockets of the local deployment:\n{report}")
        exposed = [entry for entry in listeners if not _is_loopback(entry[0])]
        per_replica: dict[int, int] = {}
        unexpected = []
        for address, lport, pid, cmd in exposed:
            known = cmd.startswith(KNOWN_WILDCARD) and not any(lport in r for r in DIRECT_INGRESS_RANGES)
            per_replica[pid] = per_replica.get(pid, 0) + known
            if not known or per_replica[pid] > 1:
                unexpected.append(f"{address}:{lport} pid={pid} {cmd}")
        assert not unexpected, "listening beyond loopback:\n" + "\n".join(unexpected)
        ports = {p for _, p, _, _ in listeners}
        assert port in ports, f"HAProxy is not listening on serving.port {port}"
        for name in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT"):
            assert int(env[name]) in ports, f"HAProxy's {name} port is not open on loopback"
        for part in ("gcs_server", "raylet", "dashboard.py", "ray::DashboardAgent", "haproxy"):
            assert any(part in cmd for _, _, _, cmd in listeners), f"no {part} among the listeners: wrong process tree?"

        # -- HAProxy's admin socket: 0600, in a directory only this user can enter.
        haproxies = _haproxies(root)
        assert haproxies, "no HAProxy process in the deployment's process tree"
        config = Path(haproxies[0][1]).read_text()
        socket_line = next(line.split() for line in config.splitlines() if line.strip().startswith("stats socket"))
        admin = Path(socket_line[2])
        mode = os.stat(admin).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600, oct(mode)
        private_dir = admin.parent.parent  # Serve adds <node id>/ below the configured directory
        assert stat.S_IMODE(os.stat(private_dir).st_mode) == 0o700 and os.stat(private_dir).st_uid == os.getuid()
        assert not str(admin).startswith("/tmp/haproxy-serve/")

        # -- /-/routes: HAProxy answered it itself, with the route table and no key; now off.
        for headers in ({}, {"X-API-Key": KEY}):
            response = requests.get(f"{url}/-/routes", headers=headers, timeout=30)
            assert response.status_code == 404, (response.status_code, response.text[:200])
            assert "mlplatform" not in response.text
        assert requests.get(f"{url}/health", timeout=30).status_code == 200

        # -- platform.serving.shutdown() deletes the application; Serve and its HAProxy keep
        # running for other applications, and HAProxy keeps its (private) socket.
        app.stdin.write("delete\n")
        app.stdin.flush()
        _read_until(app, "DONE delete", 120)
        assert admin.is_socket() and stat.S_IMODE(os.stat(admin).st_mode) == 0o600

        # -- The process ends (its local Ray, Serve and HAProxy with it): nothing is left.
        haproxies = [proc for proc, _ in _haproxies(root)]
        app.communicate(timeout=180)  # closes stdin: the app process returns and exits
        assert app.returncode == 0
        alive = [proc.pid for proc in haproxies if _running(proc)]
        assert not alive, f"HAProxy outlived the deployment: {alive}"
        assert not admin.exists() and not private_dir.exists(), f"left behind: {private_dir}"
    finally:
        if app.poll() is None:  # a failed assertion: stop what this test started, by PID
            procs = _tree(root)
            for proc in reversed(procs):
                try:
                    proc.terminate()
                except psutil.Error:
                    pass
            _, still = psutil.wait_procs(procs, timeout=20)
            for proc in still:
                try:
                    proc.kill()
                except psutil.Error:
                    pass
