"""Connecting to Ray the same way in three places.

- In a ``ray job submit`` driver, Ray sets RAY_ADDRESS: we join that cluster.
- In a Jupyter kernel on the cluster, the config says ``address: auto`` (or host:port).
- On a laptop with neither, we start a local Ray sized to the machine, with its dashboard
  bound to 127.0.0.1 so nothing is exposed beyond this host.
"""

from __future__ import annotations

import logging
import os

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
    common = {"namespace": config.namespace, "runtime_env": runtime_env, "log_to_driver": True}
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
        ray.init(address="local", **kwargs, **common)
    except ValueError as exc:
        raise ConfigError(f"ray: cannot start a local Ray with {kwargs}: {exc}") from None
    log.info("started a local Ray with %s CPUs (dashboard on %s)", num_cpus, config.dashboard_host)
    return True
