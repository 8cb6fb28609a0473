"""Prometheus metrics of the serving application, exported through Ray's metrics agent.

Every Ray node's metrics agent serves them with Ray's own metrics on its Prometheus port
(``ray start --metrics-export-port=8080``; locally ``ray.init(_metrics_export_port=...)``;
``configs/prometheus/prometheus.yml`` scrapes it). Names (Ray prefixes each with ``ray_``):

==============================================  =========  ==================================
``mlp_decisions_total``                         counter    decisions answered, by ``outcome``
                                                           (approve, decline, review) and
                                                           ``fallback`` (true/false);
                                                           idempotent replays excluded
``mlp_decision_replays_total``                  counter    retries answered from a stored decision
``mlp_decision_fallbacks_total``                counter    fallback decisions, by ``cause``
                                                           (feature_store_unavailable,
                                                           deadline_exceeded, model_unavailable, …)
``mlp_decision_log_failures_total``             counter    decisions not answered because logging failed
``mlp_feature_lookup_seconds``                  histogram  online feature lookup (one per micro-batch)
``mlp_scoring_seconds``                         histogram  model scoring and reasons (one per micro-batch)
``mlp_decision_seconds``                        histogram  a decision end to end in the replica,
                                                           including the durable log append
``mlp_feature_server_seconds``                  histogram  a ``/get-online-features`` request
``mlp_feature_newest_event_timestamp_seconds``  gauge      per ``view``: the event time (Unix
                                                           seconds) of the newest value the
                                                           decision model was served in the last
                                                           flush interval; freshness is
                                                           ``time() -`` this
``mlp_feature_values_total``                    counter    per ``feature``: values served to the
                                                           decision model
``mlp_feature_missing_total``                   counter    per ``feature``: of those, missing (null)
``mlp_score``                                   histogram  per ``model`` and ``version``: the
                                                           decision model's probability of default
                                                           in every scored (non-fallback) decision,
                                                           and each rule model's score (e.g. fraud)
``mlp_psi``                                     gauge      per ``version`` and ``feature``
                                                           (``feature="score"`` for the score):
                                                           the latest ``mlp monitor`` report's PSI
==============================================  =========  ==================================

Every series carries the ``model`` tag (the decision model's name; for ``mlp_score`` the
model that gave the score). Each replica also has Serve's own
``ray_serve_*`` request metrics.

The request path only queues each scored micro-batch (``ServedValues.add``, one deque append);
a daemon thread counts them and hands the sums to Ray's metric objects every ``flush_s``
seconds (Ray's agent exports them every few seconds anyway), so per-feature and per-score
series add no work to a decision's latency path (BENCHMARKS.md, "Monitoring metrics").
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["SCORE_BUCKETS", "ServedValues", "ServingMetrics"]

log = logging.getLogger(__name__)

# Seconds: 0.25 ms … 1 s, dense where a decision should land (1–20 ms).
_BUCKETS = [0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0]
#: Probability-of-default buckets: dense at the low end where most applicants and the
#: approve/decline thresholds lie.
SCORE_BUCKETS = [0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0]


class ServedValues:
    """What the decision model was served since the last ``take``, per micro-batch.

        served = ServedValues()
        served.add(scorer, columns, probabilities, rule_scores)   # request path: one deque append
        snapshot = served.take()                     # on the flush thread: the counting

    ``columns`` maps each feature name to its lookup result (``.values``, ``.event_timestamps``);
    a value is missing when it is None; ``rule_scores`` holds ``(model, version, scores)`` of
    each rule model that scored the batch. ``add`` only queues the batch (its lists are not
    changed after the decision), so the request path pays a microsecond and the counting
    happens on the flush thread. At most ``max_batches`` wait; if the flush thread falls that
    far behind, the oldest are dropped (and counted in ``dropped``). Thread-safe.
    """

    def __init__(self, max_batches: int = 100_000) -> None:
        # maxlen: appending to a full deque drops the oldest entry atomically
        self._queue: deque[tuple[Any, Mapping[str, Any], Sequence[float], Sequence[tuple[str, int, Any]]]] = deque(maxlen=max_batches)
        self.dropped = 0
        self._views: dict[tuple[str, int], tuple[tuple[str, str], ...]] = {}  # (model, version) -> (view, first feature)

    def add(
        self, scorer: Any, columns: Mapping[str, Any], probabilities: Sequence[float], rule_scores: Sequence[tuple[str, int, Any]] = ()
    ) -> None:
        """Queue one scored micro-batch for the next ``take``."""
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
        self._queue.append((scorer, columns, probabilities, rule_scores))

    def take(self) -> dict[str, Any]:
        """Sums over the batches queued since the last call: values and nulls per feature
        (``values``, ``missing``), the newest event time per view (``newest``, Unix seconds),
        and the scores per ``(model, version)`` (``scores``: the decision model's and each rule model's)."""
        values: dict[str, int] = {}
        missing: dict[str, int] = {}
        newest: dict[str, float] = {}
        scores: dict[tuple[str, int], list[float]] = {}
        while self._queue:
            try:
                scorer, columns, probabilities, rule_scores = self._queue.popleft()
            except IndexError:  # drained by another caller meanwhile
                break
            n = len(probabilities)
            for name in scorer.feature_names:
                column = columns.get(name)
                if column is None:
                    continue
                values[name] = values.get(name, 0) + n
                nulls = column.values.count(None)
                if nulls:
                    missing[name] = missing.get(name, 0) + nulls
            for view, feature in self._first_features(scorer):
                column = columns.get(feature)
                if column is None:
                    continue
                stamps = [t for t in column.event_timestamps if t is not None]
                if stamps:
                    t = max(stamps).timestamp()
                    if t > newest.get(view, float("-inf")):
                        newest[view] = t
            scores.setdefault((scorer.name, scorer.version), []).extend(probabilities)
            for model, version, rule_values in rule_scores:
                scores.setdefault((model, version), []).extend(rule_values)
        return {"values": values, "missing": missing, "newest": newest, "scores": scores}

    def _first_features(self, scorer: Any) -> tuple[tuple[str, str], ...]:
        views = self._views.get((scorer.name, scorer.version))
        if views is None:
            views = self._views[(scorer.name, scorer.version)] = _first_feature_per_view(scorer.refs)
        return views


class ServingMetrics:
    """The metric objects of one replica (create one per process).

    Args:
        model: the decision model's name (the ``model`` tag of every series).
        flush_s: how often the flush thread hands ``served`` to Ray's metrics.
        psi_reader: returns the latest monitoring report's PSI figures for ``model``
            (``{"version": int, "psi": {feature or "score": value}}``, or None); read every
            ``psi_refresh_s`` seconds by the flush thread and exported as ``mlp_psi``.
    """

    def __init__(
        self,
        model: str,
        *,
        flush_s: float = 1.0,
        psi_reader: Callable[[], Mapping[str, Any] | None] | None = None,
        psi_refresh_s: float = 30.0,
    ) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

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
        self.feature_newest = Gauge(
            "mlp_feature_newest_event_timestamp_seconds",
            description="Event time (Unix seconds) of the newest value of each view served to the decision model.",
            tag_keys=("model", "view"),
        ).set_default_tags(tags)
        self.feature_values = Counter(
            "mlp_feature_values_total", description="Feature values served to the decision model.", tag_keys=("model", "feature")
        ).set_default_tags(tags)
        self.feature_missing = Counter(
            "mlp_feature_missing_total", description="Feature values served missing (null).", tag_keys=("model", "feature")
        ).set_default_tags(tags)
        self.scores = Histogram(
            "mlp_score", description="Probability of default of scored decisions.", boundaries=SCORE_BUCKETS, tag_keys=("model", "version")
        ).set_default_tags(tags)
        self.psi = Gauge(
            "mlp_psi", description="PSI of the latest monitoring report, per feature and for the score.", tag_keys=("model", "version", "feature")
        ).set_default_tags(tags)
        self.served = ServedValues()
        self._psi_reader = psi_reader
        self._psi_series: set[tuple[str, str]] = set()
        self._psi_refresh_s = psi_refresh_s
        self._stop = threading.Event()
        self._flush_s = flush_s
        self._thread = threading.Thread(target=self._run, name="serving-metrics", daemon=True)
        self._thread.start()

    def decided(self, outcome: str, fallback_reason: str | None, seconds: float) -> None:
        self.decisions.inc(tags={"outcome": outcome, "fallback": "true" if fallback_reason else "false"})
        if fallback_reason:
            self.fallbacks.inc(tags={"cause": fallback_reason})
        self.decision_seconds.observe(seconds)

    def flush(self) -> None:
        """Hand what ``served`` counted to Ray's metric objects."""
        taken = self.served.take()
        for name, n in taken["values"].items():
            self.feature_values.inc(n, tags={"feature": name})
        for name, n in taken["missing"].items():
            self.feature_missing.inc(n, tags={"feature": name})
        for view, t in taken["newest"].items():
            self.feature_newest.set(t, tags={"view": view})
        for (model, version), scores in taken["scores"].items():
            tags = {"model": model, "version": str(version)}
            for s in scores:
                if s is not None:
                    self.scores.observe(s, tags=tags)

    def refresh_psi(self) -> None:
        """Export the latest monitoring report's PSI figures (if a reader was given)."""
        if self._psi_reader is None:
            return
        latest = self._psi_reader()
        if not latest:
            return
        version = str(latest.get("version"))
        current = {(version, f): float(v) for f, v in (latest.get("psi") or {}).items() if v is not None}
        # A Ray gauge cannot drop a series: figures the latest report no longer has (an older
        # version's, say) become NaN, which no alert threshold matches.
        for gone in self._psi_series - current.keys():
            self.psi.set(float("nan"), tags={"version": gone[0], "feature": gone[1]})
        for (v, feature), value in current.items():
            self.psi.set(value, tags={"version": v, "feature": feature})
        self._psi_series = set(current)

    def close(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        next_psi = 0.0
        while not self._stop.wait(self._flush_s):
            try:
                self.flush()
            except Exception:
                log.exception("exporting served-value metrics failed")
            if self._psi_reader is not None and time.monotonic() >= next_psi:
                next_psi = time.monotonic() + self._psi_refresh_s
                try:
                    self.refresh_psi()
                except Exception as exc:  # storage briefly unreachable: keep the last figures
                    log.warning("reading the latest monitoring report failed: %r", exc)


def _first_feature_per_view(refs: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """One feature per view: the features of a view share their row's event time."""
    seen: dict[str, str] = {}
    for ref in refs:
        view, _, feature = ref.partition(":")
        seen.setdefault(view, feature)
    return tuple(seen.items())
