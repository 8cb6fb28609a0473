"""The decision itself, without HTTP: features, score, policy, reasons, and the log record.

    engine = DecisionEngine(watcher=watcher, catalog=catalog, policy=policy)
    outcomes, timings = engine.decide([Job(request, started=time.perf_counter())])
    engine.fallback(jobs, "deadline_exceeded")      # when the caller's deadline passed

``decide`` takes a micro-batch (the requests that arrived while the previous batch ran) and
does one round trip per feature view, one on-demand transform and one ``Booster.predict``
for all of them; it never raises for one application's sake: anything that goes wrong
becomes that batch's fallback decision, marked with its cause:

============================  ================================================================
``feature_store_unavailable``  the online store did not answer (down, or slower than its timeout)
``feature_computation_failed`` the lookup or the on-demand transform raised
``model_unavailable``          no loadable version under the ``production`` alias
``scoring_failed``             the model raised on this input
``deadline_exceeded``          lookup + scoring did not finish within ``serving.deadline``
============================  ================================================================

**Rule models** (``policy.model_rules``, e.g. fraud) are scored on threads of their own,
started before the decision model's lookup, each bounded by its own deadline (and the
decision's); a rule model that gives no score in time, or fails, leaves its rule to its
``on_unavailable`` and is logged with its status. Their scores, versions, artifact hashes and
inputs go to the record's ``rule_models``, so replay recomputes them too.

**Offers** (``serving.offers``, ``mlplatform.serving.offers``): each approved application
of a scored batch also gets a credit-line tier from the acting policy, under the risk cap its
PD sets; the response shows it (``offer``), the record keeps it with its propensity. Declines,
reviews and fallback decisions (no PD, so no cap) get none; an offer that cannot be made
leaves the decision standing without one.

Features are read as of the decision time (``created_at``), by the same ``get_online_features``
the feature server and training sets' on-demand code use. The model sees them in its own
``feature_name()`` order, a missing value as NaN. The record written to the decision log
holds that order, the values (null when missing) and their event times, so ``replay`` can
recompute the score exactly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from mlplatform.decision_policy import ModelRule
from mlplatform.errors import ModelError, NotFoundError
from mlplatform.features.online_lookup import get_online_features
from mlplatform.online.base import OnlineStoreUnavailable
from mlplatform.serving.offers import response_offer

if TYPE_CHECKING:
    from mlplatform.serving.catalog import FeatureCatalog
    from mlplatform.decision_policy import DecisionPolicy
    from mlplatform.serving.offers import DecisionOffers
    from mlplatform.serving.schemas import DecisionRequest
    from mlplatform.serving.scoring import ModelWatcher, Scorer

__all__ = ["DecisionEngine", "Job", "Outcome", "Timings", "answer_for", "fingerprint"]

log = logging.getLogger(__name__)
_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
# Feature values go to the log exactly as the model saw them, an infinite ratio included
# (Python's json reads ``Infinity`` back), so replay feeds the model the same input.
_dumps_values = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=True).encode


def fingerprint(request: DecisionRequest) -> str:
    """A digest of the validated request: a retry must carry the same application."""
    return hashlib.sha256(request.model_dump_json().encode()).hexdigest()[:32]


@dataclass
class Job:
    """One application waiting for a decision; ``started`` is ``time.perf_counter()`` at arrival."""

    request: DecisionRequest
    started: float
    fingerprint: str = ""

    def __post_init__(self) -> None:
        if not self.fingerprint:
            self.fingerprint = fingerprint(self.request)


@dataclass
class Outcome:
    """What to do with one job.

    ``stored`` set: the application was decided before; answer with that (``answer_for``).
    ``wait`` set: a copy of the request is being decided by another replica; wait for its answer.
    ``unconfirmable`` set: the idempotency store is unreachable and the request may be a retry:
    refuse it (503) rather than decide it anew.
    Otherwise ``record`` goes to the decision log, then ``answer`` to the idempotency store,
    then ``body`` to the client; ``confirmed`` is False when the idempotency store could not
    reserve the application (then the answer is kept by ``UnconfirmedAnswers`` until it can).
    """

    body: bytes = b""
    record: dict[str, Any] | None = None
    answer: str = ""
    stored: str | None = None
    wait: bool = False
    unconfirmable: bool = False
    confirmed: bool = True
    decision: str = ""
    fallback_reason: str | None = None


@dataclass
class Timings:
    lookup_s: float | None = None
    scoring_s: float | None = None
    notes: list[str] = field(default_factory=list)


def answer_for(stored: str, fingerprint: str) -> tuple[int, bytes]:
    """The HTTP status and body for a stored answer: 200 and the original response, or 409
    when the same application_id came with a different application."""
    entry = json.loads(stored)
    if entry.get("fingerprint") != fingerprint:
        message = {
            "error": "conflict",
            "message": "application_id was already decided for a different application; "
            "a retry must repeat the original request exactly (use a new application_id for a new checkout)",
            "decision_id": entry["response"]["decision_id"],
        }
        return 409, _dumps(message).encode()
    return 200, _dumps(entry["response"]).encode()


class DecisionEngine:
    """Decides micro-batches of applications (see the module docstring)."""

    def __init__(
        self,
        *,
        watcher: ModelWatcher,
        catalog: FeatureCatalog,
        policy: DecisionPolicy,
        rule_models: Mapping[str, Any] | None = None,
        rule_deadlines_s: Mapping[str, float] | None = None,
        observer: Callable[[Scorer, Mapping[str, Any], list[float], list[tuple[str, int, Any]]], None] | None = None,
        offers: DecisionOffers | None = None,
    ) -> None:
        self.watcher = watcher
        # Sees every scored micro-batch for the metrics: the decision model's served values and
        # scores, and each rule model's (name, version, scores) where it scored in time.
        self.observer = observer
        self.catalog = catalog
        self.policy = policy
        self.offers = offers  # the offer of approved applications (None: no offers configured)
        rule_models = dict(rule_models or {})
        missing = [r.model for r in policy.model_rules if r.model not in rule_models]
        if missing:
            raise ModelError(f"the policy's model_rules name models {missing} that are not served (add them to serving.models)")
        self.rule_models = rule_models
        self.rule_deadlines_s = dict(rule_deadlines_s or {})
        # Rule models score beside the decision model's lookup, on threads of their own, so a
        # slow one costs the decision no more than its own deadline.
        self._rules = ThreadPoolExecutor(max_workers=2 * len(policy.model_rules), thread_name_prefix="rule-models") if policy.model_rules else None

    # --------------------------------------------------------------------------- main
    def decide(self, jobs: list[Job], *, deadline_at: float | None = None) -> tuple[list[Outcome], Timings]:
        """Decide every job; the outcomes are in job order.

        ``deadline_at`` (a ``time.perf_counter()`` value): if the lookup or the scoring ends
        after it, the jobs get the fallback decision (``deadline_exceeded``) instead of a
        late score. Nothing here can interrupt a blocked call: a stuck online store is cut off
        by its own timeout (``online_store.timeout``), and the check follows.
        """
        timings = Timings()
        return self._decide_new(jobs, timings, deadline_at), timings

    def _decide_new(self, jobs: list[Job], timings: Timings, deadline_at: float | None) -> list[Outcome]:
        scorer = self.watcher.current(self.watcher.aliases[0])
        if scorer is None:
            return self.fallback(jobs, "model_unavailable")
        now = datetime.now(UTC)
        started = time.perf_counter()
        pending = self._start_rules(jobs, now, started)
        try:
            entities = {k: [getattr(j.request, k) for j in jobs] for k in scorer.inputs}
            response = get_online_features(self.catalog, list(scorer.refs), entities, now=now)
        except OnlineStoreUnavailable as exc:
            timings.notes.append(str(exc))
            return self.fallback(jobs, "feature_store_unavailable", scorer=scorer)
        except Exception as exc:
            log.exception("feature lookup failed for a batch of %d", len(jobs))
            timings.notes.append(repr(exc))
            return self.fallback(jobs, "feature_computation_failed", scorer=scorer)
        timings.lookup_s = time.perf_counter() - started
        if deadline_at is not None and time.perf_counter() > deadline_at:
            return self.fallback(jobs, "deadline_exceeded", scorer=scorer)

        started = time.perf_counter()
        columns = dict(zip(response.metadata.feature_names, response.results))
        rows = [{n: columns[n].values[i] for n in scorer.feature_names} for i in range(len(jobs))]
        stamps = [{n: _iso(columns[n].event_timestamps[i]) for n in scorer.feature_names} for i in range(len(jobs))]
        try:
            x = scorer.matrix(rows)
            probabilities = scorer.predict(x).tolist()
        except Exception as exc:
            log.exception("scoring failed for a batch of %d", len(jobs))
            timings.notes.append(repr(exc))
            return self.fallback(jobs, "scoring_failed", scorer=scorer)
        shadow = self._shadow(scorer, columns, len(jobs))
        rules = self._rule_results(pending, deadline_at)
        outcomes = self._scored(jobs, scorer, x, probabilities, rows, stamps, shadow, now, rules)
        timings.scoring_s = time.perf_counter() - started
        if deadline_at is not None and time.perf_counter() > deadline_at:
            return self.fallback(jobs, "deadline_exceeded", scorer=scorer)
        if self.observer is not None:
            try:
                self.observer(scorer, columns, probabilities,
                              [(r.rule.model, r.scores.version, r.scores.scores) for r in rules if r.scores is not None])
            except Exception:  # monitoring must never affect the decision
                log.exception("observing a scored batch failed")
        return outcomes

    def _scored(
        self,
        jobs: list[Job],
        scorer: Scorer,
        x: Any,
        probabilities: list[float],
        rows: list[dict[str, Any]],
        stamps: list[dict[str, str | None]],
        shadow: list[dict[str, Any]] | None,
        now: datetime,
        rules: list[RuleResult],
    ) -> list[Outcome]:
        """Policy per job; the reasons of every score-based decline in one ``ReasonCoder.explain_encoded`` call."""
        policy = self.policy
        decisions: list[str] = []
        reasons: list[list[dict[str, Any]]] = []
        explain: list[int] = []
        for i, (job, probability) in enumerate(zip(jobs, probabilities)):
            request = job.request
            knocked = policy.knockouts(amount=request.amount, currency=request.currency, term=request.term)
            if knocked:
                decisions.append("decline")
                reasons.append([{"code": r.code, "text": r.text} for r in knocked])
                continue
            decision = policy.by_score(probability)
            if decision == "decline":
                explain.append(i)
            added = []
            for result in rules:
                decision, reason = result.rule.apply(decision, result.score(i))
                if reason is not None:
                    added.append({"code": reason.code, "text": reason.text})
            decisions.append(decision)
            reasons.append(added)
        if explain:
            explained = scorer.coder.explain_encoded(x[explain], [rows[i] for i in explain])
            for i, e in zip(explain, explained):
                room = max(0, policy.max_reasons - len(reasons[i]))
                reasons[i] += [
                    {"code": r.feature, "text": r.text, "contribution": r.contribution, "value": r.value}
                    for r in e.reasons[:room]
                ]
        ids = [uuid.uuid4().hex for _ in jobs]
        offers = self._offers(ids, jobs, rows, probabilities, decisions)
        return [
            self._outcome(job, decisions[i], probabilities[i], reasons[i], scorer, rows[i], stamps[i], None,
                          shadow[i] if shadow else None, now, [r.logged(i) for r in rules], ids[i], offers.get(i))
            for i, job in enumerate(jobs)
        ]

    def _offers(self, ids: list[str], jobs: list[Job], rows: list[dict[str, Any]], probabilities: list[float],
                decisions: list[str]) -> dict[int, dict[str, Any]]:
        """The offer of each approved job; an offer that cannot be made leaves the decision without one."""
        approved = [i for i, d in enumerate(decisions) if d == "approve"]
        if self.offers is None or not approved:  # no request is dumped for a batch without approvals
            return {}
        try:
            return self.offers.choose(ids, rows, [j.request.model_dump() for j in jobs], probabilities, approved)
        except Exception:
            log.exception("choosing offers failed for a batch of %d", len(approved))
            return {}

    # ------------------------------------------------------------------- rule models
    def _start_rules(self, jobs: list[Job], now: datetime, started: float) -> list[tuple[ModelRule, Future[Any], float]]:
        """Submit every rule model's scoring of the batch; each gets its own deadline from ``started``."""
        if self._rules is None:
            return []
        entities: dict[str, list[Any]] = {k: [getattr(j.request, k) for j in jobs] for k in type(jobs[0].request).model_fields}
        entities["timestamp"] = [now] * len(jobs)  # features as of the decision, as for the decision model
        pending = []
        for rule in self.policy.model_rules:
            budget = self.rule_deadlines_s.get(rule.model, 0.05)
            model = self.rule_models[rule.model]
            future = self._rules.submit(model.score_rows, entities, rule.output, budget)
            pending.append((rule, future, started + budget))
        return pending

    def _rule_results(self, pending: list[tuple[ModelRule, Future[Any], float]], deadline_at: float | None) -> list[RuleResult]:
        """Each rule model's scores, or why it has none (``deadline_exceeded``, ``model_unavailable``, ``scoring_failed``)."""
        out = []
        for rule, future, rule_deadline in pending:
            until = rule_deadline if deadline_at is None else min(rule_deadline, deadline_at)
            try:
                out.append(RuleResult(rule, future.result(timeout=max(0.0, until - time.perf_counter()))))
            except FutureTimeout:
                out.append(RuleResult(rule, None, "deadline_exceeded"))
            except NotFoundError:
                out.append(RuleResult(rule, None, "model_unavailable"))
            except Exception as exc:
                log.warning("rule model %s failed on a batch: %r", rule.model, exc)
                out.append(RuleResult(rule, None, "scoring_failed"))
        return out

    def _shadow(self, production: Scorer, columns: dict[str, Any], n: int) -> list[dict[str, Any]] | None:
        if len(self.watcher.aliases) < 2:
            return None
        alias = self.watcher.aliases[1]
        candidate = self.watcher.current(alias)
        if candidate is None or candidate.version == production.version:
            return None
        head = {"alias": alias, "model_name": candidate.name, "model_version": candidate.version}
        if any(name not in columns for name in candidate.feature_names):
            return [{**head, "error": "the candidate reads features the production feature service does not provide"}] * n
        try:
            rows = [{name: columns[name].values[i] for name in candidate.feature_names} for i in range(n)]
            scores = candidate.predict(candidate.matrix(rows)).tolist()
        except Exception as exc:  # the shadow must never affect the decision
            return [{**head, "error": repr(exc)}] * n
        return [{**head, "probability_of_default": p} for p in scores]

    # ---------------------------------------------------------------------- fallback
    def fallback(self, jobs: list[Job], reason: str, *, scorer: Scorer | None = None) -> list[Outcome]:
        """The configured fallback decision for each job, marked with ``reason``."""
        now = datetime.now(UTC)
        out = []
        for job in jobs:
            r = job.request
            decision, knocked = self.policy.fallback(amount=r.amount, currency=r.currency, term=r.term)
            reasons = [{"code": k.code, "text": k.text} for k in knocked]
            out.append(self._outcome(job, decision, None, reasons, scorer, None, None, reason, None, now))
        return out

    # ------------------------------------------------------------------------ output
    def _outcome(
        self,
        job: Job,
        decision: str,
        probability: float | None,
        reasons: list[dict[str, Any]],
        scorer: Scorer | None,
        row: dict[str, Any] | None,
        stamps: dict[str, str | None] | None,
        fallback_reason: str | None,
        shadow: dict[str, Any] | None,
        now: datetime,
        rule_models: list[dict[str, Any]] | None = None,
        decision_id: str | None = None,
        offer: dict[str, Any] | None = None,
    ) -> Outcome:
        request = job.request
        decision_id = decision_id or uuid.uuid4().hex
        scored = fallback_reason is None
        response = {
            "decision_id": decision_id,
            "application_id": request.application_id,
            "decision": decision,
            "probability_of_default": probability,
            "reasons": [{"code": r["code"], "text": r["text"]} for r in reasons],
            "model": {"name": scorer.name, "version": scorer.version} if scored and scorer else None,
            "fallback": not scored,
            "fallback_reason": fallback_reason,
        }
        if self.offers is not None:
            response["offer"] = response_offer(offer, self.offers.config) if offer is not None else None
        body = _dumps(response)
        record = {
            "decision_id": decision_id,
            "application_id": request.application_id,
            "request": request.model_dump_json(),
            "decision": decision,
            "probability_of_default": probability,
            "reasons": _dumps_values(reasons),
            "model_name": scorer.name if scorer else None,
            "model_version": scorer.version if scorer else None,
            "model_sha256": scorer.sha256 if scorer else None,
            "feature_names": _dumps(list(scorer.feature_names) if scorer and row is not None else []),
            "features": _dumps_values(row if row is not None else {}),
            "feature_event_timestamps": _dumps(stamps if stamps is not None else {}),
            "fallback": not scored,
            "fallback_reason": fallback_reason,
            "latency_ms": (time.perf_counter() - job.started) * 1000.0,
            "created_at": now.isoformat(),
            "shadow": _dumps_values(shadow) if shadow is not None else None,
            "rule_models": _dumps_values(rule_models) if rule_models else None,
            "offer": _dumps(offer) if offer is not None else None,
            "returned": True,
            "confirmed": True,
        }
        answer = f'{{"fingerprint":"{job.fingerprint}","response":{body}}}'
        return Outcome(body=body.encode(), record=record, answer=answer, decision=decision, fallback_reason=fallback_reason)


@dataclass(frozen=True)
class RuleResult:
    """A rule model's scores for a batch (``scores`` None: ``status`` says why there are none)."""

    rule: ModelRule
    scores: Any  # ModelScores | None
    status: str = "scored"

    def score(self, i: int) -> float | None:
        return None if self.scores is None else self.scores.scores[i]

    def logged(self, i: int) -> dict[str, Any]:
        """What the decision log keeps of row ``i``: enough for replay to recompute the score."""
        doc: dict[str, Any] = {"model_name": self.rule.model, "output": self.rule.output, "status": self.status}
        if self.scores is not None:
            s = self.scores
            doc.update(model_version=s.version, model_sha256=s.sha256, flavor=s.flavor, score=s.scores[i], inputs=s.inputs[i], rows=s.rows)
            if s.shadow is not None:
                doc["shadow"] = s.shadow[i]
        return doc


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()
