"""The end of the main job: one fresh event changes a decision within a second.

    shown = run(platform, deployed, "underwriting")
    shown.summary()   # 'applicant 812: APPROVE (PD 0.071) -> DECLINE (PD 0.304) once a missed installment ...'

1. **Choose.** Among the recent applications (``serve.recent_applications``, each applicant's
   latest), predict with the production model on the online features as of now what each
   decision is, and what it would be after one more missed installment now (the real-time
   features recomputed as the views count it: ``with_missed_installment``). Take the first
   whose decision changes, most striking change first (approve -> decline, review -> decline,
   approve -> review), then by application id: a deterministic search. The prediction only
   chooses; both decisions shown are the endpoint's.
2. **Before.** The endpoint decides that applicant's checkout.
3. **Ingest.** A ``missed`` event for the applicant's latest loan, happening now, goes onto the
   bus (``platform.features.ingest("repayments", ...)``); the stream processors apply it.
4. **Online.** Poll the online read of ``recent_repayments:missed_installments_7d`` until it
   shows the event; the freshness is the time from the bus accepting the event to that read.
5. **After.** The endpoint decides the same checkout again under a new application id.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from workloads.underwriting.features import live_activity_features, recent_repayments
from workloads.underwriting.tables import GRACE

if TYPE_CHECKING:
    from mlplatform.decision_policy import DecisionPolicy
    from mlplatform.platform import Platform
    from mlplatform.serving.api import DeployedApp

__all__ = ["EVENT_REASONS", "INPUTS", "Choice", "LiveEvent", "choose", "run", "wait_online", "with_missed_installment"]

log = logging.getLogger(__name__)

SOURCE = "repayments"
MISSED = "missed_installments_7d"
MISSED_REF = f"{recent_repayments.name}:{MISSED}"
DAYS = "recent_days_past_due"
#: The ``last_k`` lists ``live_activity_features`` is computed from (not model features).
LISTS = ["applicant_checkouts:recent_checkout_amounts", f"{recent_repayments.name}:{DAYS}"]
#: The reasons of the features a missed installment changes.
EVENT_REASONS = {
    f.reason
    for f in (*recent_repayments.features, *live_activity_features.features)
    if f.name in (MISSED, "worst_recent_days_past_due") and f.reason
}
#: What ``live_activity_features`` reads: its request fields and its source views' features.
INPUTS = [f.name for source in live_activity_features.sources for f in getattr(source, "features", source.schema_)]
_CHANGES = [("approve", "decline"), ("review", "decline"), ("approve", "review")]
_TIMEOUT_S = 30.0
_POLL_S = 0.02


@dataclass(frozen=True)
class Choice:
    """The applicant whose decision a missed installment would change, as predicted."""

    application: Any  # a row of serve.recent_applications
    loan: str  # the applicant's latest loan: the installment missed is one of its
    before: tuple[str, float]  # predicted (decision, PD) now
    after: tuple[str, float]  # ... after the missed installment


@dataclass(frozen=True)
class LiveEvent:
    """What the live event did: the event, how soon it was online, both decisions."""

    applicant_id: int
    event_id: str
    freshness_ms: float
    before: dict[str, Any]
    after: dict[str, Any]

    def summary(self) -> str:
        def shown(answer: dict[str, Any]) -> str:
            pd_ = answer.get("probability_of_default")
            return answer["decision"].upper() + ("" if pd_ is None else f" (PD {pd_:.3f})")

        # the reasons that name what the event changed, else whatever reasons are new
        before = {r["text"] for r in self.before.get("reasons", [])}
        after = [r["text"] for r in self.after.get("reasons", [])]
        new = [t for t in after if t in EVENT_REASONS] or [t for t in after if t not in before]
        same = " (unchanged)" if self.before["decision"] == self.after["decision"] else ""
        return (
            f"applicant {self.applicant_id}: {shown(self.before)} -> {shown(self.after)}{same} once a missed "
            f"installment was online ({self.freshness_ms:.0f} ms)" + (f"; new reasons: {'; '.join(new)}" if new else "")
        )


def with_missed_installment(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` (online features of one applicant, the ``LISTS`` and the request fields
    included) as it reads once one more installment is missed now: ``missed_installments_7d``
    one higher, the missed event's days past due the newest of ``recent_days_past_due``, and
    ``live_activity_features`` computed again from them by its own function."""
    k = next(a.k for a in recent_repayments.aggregations if a.feature_name == DAYS)
    out = dict(row)
    out[MISSED] = (out[MISSED] or 0) + 1
    out[DAYS] = [*list(out[DAYS] or []), GRACE.days][-k:]  # type: ignore[misc]
    inputs = {name: [out[name]] for name in INPUTS}
    out.update({name: values[0] for name, values in live_activity_features.transform_rows(inputs, 1).items()})
    return out


def _decision(policy: DecisionPolicy, application: Any, probability: float) -> str:
    knocked = policy.knockouts(amount=float(application.amount), currency=application.currency, term=int(application.term))
    return "decline" if knocked else policy.by_score(probability)


def choose(platform: Platform, model_name: str, now: datetime) -> Choice | None:
    """The applicant to show (see the module doc); None when there are no recent applications."""
    import numpy as np

    from mlplatform.models.encoding import encode_features
    from workloads.underwriting.serve import recent_applications

    recent, _ = recent_applications(platform)
    if not len(recent):
        return None
    # each applicant's latest application: its loan is the one whose installment is missed
    latest = recent.sort_values(["application_ts", "application_id"]).drop_duplicates("applicant_id", keep="last")
    latest = latest.sort_values("application_id", ignore_index=True)
    refs = [*platform.features.resolve_features("underwriting_v1"), *LISTS]
    request = {c: latest[c].tolist() for c in ("applicant_id", "merchant_id", "amount", "term")}
    online = platform.features.get_online_features(refs, request, now=now).to_dict()
    rows = [
        {**{name: values[i] for name, values in online.items()}, "amount": request["amount"][i], "term": request["term"][i]}
        for i in range(len(latest))
    ]
    booster = platform.models.load(model_name, alias="production").model
    before = booster.predict(np.vstack([encode_features(booster, row) for row in rows]))
    after = booster.predict(np.vstack([encode_features(booster, with_missed_installment(row)) for row in rows]))
    policy = platform.config.serving.policy
    apps = list(latest.itertuples())
    predicted = [(_decision(policy, a, p0), _decision(policy, a, p1)) for a, p0, p1 in zip(apps, before, after, strict=True)]

    def rank(i: int) -> tuple[int, float, int]:  # the change's kind (none last), the biggest rise in PD, row order
        change = predicted[i]
        return (_CHANGES.index(change) if change in _CHANGES else len(_CHANGES), -(after[i] - before[i]), i)

    i = min(range(len(apps)), key=rank)
    (was, will) = predicted[i]
    return Choice(apps[i], str(apps[i].application_id), (was, float(before[i])), (will, float(after[i])))


def wait_online(platform: Platform, applicant_id: int, at_least: float, timeout_s: float = _TIMEOUT_S) -> datetime:
    """Poll the online read of ``missed_installments_7d`` for ``applicant_id`` until it is at
    least ``at_least``; returns when the read that showed it returned.

    Raises:
        ServingError: it did not within ``timeout_s`` (are the stream processors running?).
    """
    from mlplatform.errors import ServingError

    deadline = time.monotonic() + timeout_s
    while True:
        value = platform.features.get_online_features([MISSED_REF], {"applicant_id": [applicant_id]}).to_dict()[MISSED][0]
        if value is not None and value >= at_least:
            return datetime.now(UTC)
        if time.monotonic() > deadline:
            raise ServingError(
                f"the missed installment of applicant {applicant_id} was not online after {timeout_s:.0f}s "
                f"({MISSED} reads {value}, expected {at_least:g}); are the stream processors running "
                "(platform.features.start_processors())?"
            )
        time.sleep(_POLL_S)


def run(platform: Platform, deployed: DeployedApp, model_name: str) -> LiveEvent | None:
    """Choose, decide, ingest, wait until online, decide again (see the module doc); logs a
    ``[decide]`` line per decision and one ``[ingest]`` line. None without recent applications."""
    from mlplatform.serving.client import api_key
    from workloads.underwriting.serve import as_checkout, decide_and_log

    choice = choose(platform, model_name, datetime.now(UTC))
    if choice is None:
        return None
    key = api_key(platform.storage, platform.config.serving.api_key_env)
    app, nonce = choice.application, secrets.token_hex(3)
    applicant = int(app.applicant_id)
    before = decide_and_log(deployed.url, key, as_checkout(app, f"live-{app.application_id}-{nonce}-before"))
    missed_now = platform.features.get_online_features([MISSED_REF], {"applicant_id": [applicant]}).to_dict()[MISSED][0] or 0
    event = {
        "event_id": f"{choice.loan}-miss-live-{nonce}",
        "application_id": choice.loan,
        "applicant_id": applicant,
        "event_type": "missed",
        "is_late": 0,
        "is_missed": 1,
        "days_past_due": GRACE.days,
        "event_ts": datetime.now(UTC),
    }
    accepted = platform.features.ingest(SOURCE, [event])
    seen = wait_online(platform, applicant, missed_now + 1)
    assert accepted.last_known_at is not None
    freshness_ms = max(0.0, (seen - accepted.last_known_at).total_seconds() * 1000)
    log.info(
        f"[ingest] missed installment of {choice.loan} (applicant {applicant}) onto '{SOURCE}' at position "
        f"{accepted.first_position}: online in {freshness_ms:.0f} ms"
    )
    after = decide_and_log(deployed.url, key, as_checkout(app, f"live-{app.application_id}-{nonce}-after"))
    return LiveEvent(applicant, event["event_id"], freshness_ms, before, after)
