"""Serving: the feature server and the checkout decision endpoint on Ray Serve.

    export MLP_API_KEY=$(openssl rand -hex 24)
    deployed = platform.serving.deploy("underwriting")      # production alias of the model
    # POST {deployed.url}/v1/decisions        X-API-Key: $MLP_API_KEY
    # POST {deployed.url}/get-online-features  (Feast-compatible), POST /push, GET /health

Parts: ``api`` (``platform.serving``), ``app`` (the Serve deployment and its routes),
``guard`` (keys, roles, body size), ``keys`` (API keys and their digests), ``schemas`` (the
HTTP documents), ``engine`` (features → score → policy → record; the policy itself, thresholds, limits and
fallback, is ``mlplatform.decision_policy``), ``scoring`` (models and alias rollout), ``catalog`` (definitions cached for
the request path), ``idempotency`` (one decision per application), ``ingress`` (HAProxy),
``metrics``; and ``decisions/``, the decision log (append, spool, compaction, records,
lookup, replay, unconfirmed answers).

Running it on a cluster (paste into the README)
-----------------------------------------------

1. **Ingress.** Install HAProxy on every node (``apt-get install haproxy`` or
   ``pip install "ray[serve,haproxy]"``). With ``serving.fast_ingress: auto`` (the default)
   ``deploy`` then starts Serve with ``RAY_SERVE_ENABLE_HA_PROXY=1`` and
   ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` in the Serve controller's environment: HAProxy
   listens on ``serving.host:serving.port`` and forwards straight to the replicas' own ports
   (30000–31000), with no Python proxy in the path. Without HAProxy it warns and uses Serve's
   default proxy (about 15x fewer requests per second). Serve reads these settings when its
   controller starts: if Serve already runs in the cluster, ``deploy`` keeps its ingress and
   warns; ``serve shutdown`` and deploy again to switch. For a long-lived cluster you can
   instead export both variables on every node before ``ray start``. Set ``serving.host:
   0.0.0.0`` to accept traffic from outside the head node, and put TLS in front (HAProxy here
   speaks plain HTTP).
2. **Secrets.** ``export MLP_API_KEY=…`` (the variable ``serving.api_key_env`` names; several
   keys comma-separated for rotation) where ``deploy`` runs. Only SHA-256 digests reach the
   replicas. Redis takes ``REDIS_PASSWORD`` from each node's environment.
3. **Stores.** Use ``online_store: {type: redis, url: redis://…}`` beyond one machine: the
   online features and the idempotency keys (``<prefix>:<project>:decision:<id>``) live there.
   ``storage.root: s3://…`` holds the model registry and the compacted decision log.
4. **Decision log.** Each replica fsyncs every decision to a spool on its node's local disk
   (``deploy(spool_dir=…)``; put it on a persistent volume) before answering, and compacts the
   node's spool into ``decisions/log`` every minute, including segments of replicas that died.
5. **Rollout.** ``platform.models.set_alias("underwriting", "production", n)``: replicas poll
   the alias every second, load version ``n`` in the background and swap it in; no restart,
   no dropped request. ``serving.policy.shadow_alias: candidate`` also scores each request with
   the ``candidate`` version and logs that score beside the decision.
6. **Metrics.** Ray's metrics agent exports ``ray_mlp_*`` (see ``mlplatform.serving.metrics``)
   with Serve's own metrics on each node's Prometheus endpoint.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mlplatform.decision_policy import DecisionPolicy

if TYPE_CHECKING:
    from mlplatform.serving.api import DeployedApp, Serving

__all__ = ["DecisionPolicy", "DeployedApp", "Serving"]


def __getattr__(name: str) -> Any:
    # Lazy, so that importing the config (which needs DecisionPolicy) loads nothing else.
    if name in ("Serving", "DeployedApp"):
        from mlplatform.serving import api

        return getattr(api, name)
    raise AttributeError(f"module 'mlplatform.serving' has no attribute {name!r}")
