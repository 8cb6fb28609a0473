"""Connecting to Ray the same way in three places.

- In a ``ray job submit`` driver, Ray sets RAY_ADDRESS: we join that cluster.
- In a Jupyter kernel on the cluster, the config says ``address: auto`` (or host:port).
- On a laptop with neither, we start a local Ray sized to the machine, with its dashboard
  bound to 127.0.0.1 so nothing is exposed beyond this host (``dashboard_host``), and with
  127.0.0.1 as its node IP address, so that every other server it starts listens on loopback
  too: GCS, raylet, object manager, workers, the dashboard and autoscaler metrics ports, the
  dashboard agent (gRPC, HTTP, metrics export) and the runtime env agent. Ray binds all of
  those to all interfaces unless the node's IP is a loopback address (see ``_loopback_node``).
  Connecting to a cluster changes none of this.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from mlplatform.config import RayConfig
from mlplatform.errors import ConfigError, PlatformError

log = logging.getLogger(__name__)


def connect(config: RayConfig, *, runtime_env: dict | None = None) -> bool:
    """Make sure this process is connected to Ray. Returns True if this call started a local Ray.

    Reuses an existing connection (``ray.init`` already called by the user or a Ray job).
    """
    import ray

    if ray.is_initialized():
        return False
    address = config.address or os.environ.get("RAY_ADDRESS") or None
    # log_to_driver is left to Ray: it streams workers' output to this process unless
    # RAY_LOG_TO_DRIVER=0, which the CLI sets without --verbose (mlplatform.jobs.console).
    common = {"namespace": config.namespace, "runtime_env": runtime_env}
    if address:
        try:
            ray.init(address=address, **common)
        except ConnectionError as exc:
            raise PlatformError(
                f"cannot connect to Ray at {address!r}: {exc}; check ray.address in the config or RAY_ADDRESS"
            ) from None
        return False
    num_cpus = config.num_cpus or os.cpu_count() or 1
    kwargs = {
        "num_cpus": num_cpus,
        "include_dashboard": True,
        "dashboard_host": config.dashboard_host,
    }
    if config.num_gpus is not None:
        kwargs["num_gpus"] = config.num_gpus
    if config.object_store_memory_mb:
        kwargs["object_store_memory"] = config.object_store_memory_mb * 1024 * 1024
    try:
        # "local" explicitly: with no address Ray would join the cluster named in
        # /tmp/ray/ray_current_cluster, which any earlier `ray start` leaves behind — even
        # one that has since died — and then refuse num_cpus.
        with _loopback_node():
            ray.init(address="local", _node_ip_address=LOOPBACK, **kwargs, **common)
    except ValueError as exc:
        raise ConfigError(f"ray: cannot start a local Ray with {kwargs}: {exc}") from None
    node_ip = ray.util.get_node_ip_address()
    if node_ip != LOOPBACK:  # a Ray that no longer honours the switch below: say so, keep going
        log.warning("the local Ray's node IP is %s, not %s: its servers listen on all interfaces", node_ip, LOOPBACK)
    log.info("started a local Ray with %s CPUs (dashboard on %s)", num_cpus, config.dashboard_host)
    return True


LOOPBACK = "127.0.0.1"
# Ray's switch for "this Ray is one machine": with it off, a node's IP is the loopback address,
# and GCS, raylet, workers and agents then bind to loopback instead of all interfaces. On Linux
# it is on, and ray.init(_node_ip_address="127.0.0.1") alone is turned back into this host's
# outward IP (ray._private.services.resolve_ip_for_localhost).
_CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def _loopback_node() -> Iterator[None]:
    """Start the local Ray with its cluster switch off, then put the switch back.

    Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, into
    ``ray._private.ray_constants.ENABLE_RAY_CLUSTER``, when ``ray`` is first imported, which
    may be long before this (a notebook, a test session). So both are set: the environment for
    the processes ``ray.init`` starts (they inherit it), the constant for this process while
    it picks the node IP. Both are restored afterwards, so a later ``ray.init`` in this process
    that joins a real cluster still finds this host's outward IP.
    """
    from ray._private import ray_constants

    previous_env = os.environ.get(_CLUSTER_SWITCH)
    previous_constant = getattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    os.environ[_CLUSTER_SWITCH] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = previous_constant
        if previous_env is None:
            os.environ.pop(_CLUSTER_SWITCH, None)
        else:
            os.environ[_CLUSTER_SWITCH] = previous_env
