"""Prometheus metrics of the serving application, exported through Ray's metrics agent.

Every Ray node's metrics agent serves them with Ray's own metrics on its Prometheus port
(``ray start --metrics-export-port=8080``; locally ``ray.init(_metrics_export_port=...)``).
Names (Ray prefixes each with ``ray_``):

======================================  =========  ==========================================
``mlp_decisions_total``                 counter    decisions answered, by ``outcome``
                                                   (approve, decline, review) and ``fallback``
                                                   (true/false); idempotent replays excluded
``mlp_decision_replays_total``          counter    retries answered from a stored decision
``mlp_decision_fallbacks_total``        counter    fallback decisions, by ``cause``
                                                   (feature_store_unavailable, deadline_exceeded,
                                                   model_unavailable, …)
``mlp_decision_log_failures_total``     counter    decisions not answered because logging failed
``mlp_feature_lookup_seconds``          histogram  online feature lookup (one per micro-batch)
``mlp_scoring_seconds``                 histogram  model scoring and reasons (one per micro-batch)
``mlp_decision_seconds``                histogram  a decision end to end in the replica,
                                                   including the durable log append
``mlp_feature_server_seconds``          histogram  a ``/get-online-features`` request
======================================  =========  ==========================================

Every series carries the ``model`` tag (the model name). Each replica also has Serve's own
``ray_serve_*`` request metrics.
"""

from __future__ import annotations

__all__ = ["ServingMetrics"]

# Seconds: 0.25 ms … 1 s, dense where a decision should land (1–20 ms).
_BUCKETS = [0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0]


class ServingMetrics:
    """The metric objects of one replica (create one per process)."""

    def __init__(self, model: str) -> None:
        from ray.util.metrics import Counter, Histogram

        tags = {"model": model}
        self.decisions = Counter(
            "mlp_decisions_total", description="Decisions answered.", tag_keys=("model", "outcome", "fallback")
        ).set_default_tags(tags)
        self.replays = Counter(
            "mlp_decision_replays_total", description="Retries answered with the stored decision.", tag_keys=("model",)
        ).set_default_tags(tags)
        self.fallbacks = Counter(
            "mlp_decision_fallbacks_total", description="Fallback decisions by cause.", tag_keys=("model", "cause")
        ).set_default_tags(tags)
        self.log_failures = Counter(
            "mlp_decision_log_failures_total",
            description="Decisions refused (503) because the decision log could not record them.",
            tag_keys=("model",),
        ).set_default_tags(tags)
        self.lookup_seconds = Histogram(
            "mlp_feature_lookup_seconds", description="Online feature lookup per micro-batch.", boundaries=_BUCKETS, tag_keys=("model",)
        ).set_default_tags(tags)
        self.scoring_seconds = Histogram(
            "mlp_scoring_seconds", description="Scoring and reason codes per micro-batch.", boundaries=_BUCKETS, tag_keys=("model",)
        ).set_default_tags(tags)
        self.decision_seconds = Histogram(
            "mlp_decision_seconds", description="A decision end to end in the replica.", boundaries=_BUCKETS, tag_keys=("model",)
        ).set_default_tags(tags)
        self.feature_server_seconds = Histogram(
            "mlp_feature_server_seconds",
            description="A /get-online-features request in the replica.",
            boundaries=_BUCKETS,
            tag_keys=("model",),
        ).set_default_tags(tags)

    def decided(self, outcome: str, fallback_reason: str | None, seconds: float) -> None:
        self.decisions.inc(tags={"outcome": outcome, "fallback": "true" if fallback_reason else "false"})
        if fallback_reason:
            self.fallbacks.inc(tags={"cause": fallback_reason})
        self.decision_seconds.observe(seconds)
