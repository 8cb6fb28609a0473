"""Underwriting features: what the lender knows about an applicant and a merchant at checkout.

Applied with ``platform.features.apply(underwriting.features.DEFINITIONS)`` (``mlp apply``).
Every feature carries a ``reason``: the customer-facing text used when it pushes a decision
toward decline (adverse-action notices).

Two kinds of history:

- **daily** views (``applicant_history``, ``merchant_risk``, ``merchant_activity``) backfilled
  from the raw tables and materialized once a day;
- **real-time** views on the ``checkouts`` and ``repayments`` streams (``applicant_checkouts``,
  ``recent_repayments``), exact at the second: loan stacking (checkouts at any merchant in the
  last hour and 24 hours) and a missed installment in the last 7 days change a decision as soon
  as their event reaches the bus. Their ``last_k`` lists feed ``live_activity_features``.
"""

from __future__ import annotations

from mlplatform.features import (
    Aggregation,
    Entity,
    FeatureService,
    FeatureView,
    Field,
    ParquetSource,
    RequestSource,
    StreamSource,
    on_demand_feature_view,
)
from mlplatform.quality import Expectation, Quality

applicant = Entity(name="applicant", join_keys=["applicant_id"], description="A customer applying for credit at checkout.")
merchant = Entity(name="merchant", join_keys=["merchant_id"], description="A store that offers pay-later at checkout.")

repayment_events = ParquetSource(
    name="repayment_events",
    dataset="raw/underwriting/repayment_events",
    timestamp_field="event_ts",
    created_timestamp_field="known_ts",
    description="Originations, payments, missed installments and delinquencies, stamped with when they were known.",
)
loan_outcomes = ParquetSource(
    name="loan_outcomes",
    dataset="raw/underwriting/outcomes",
    timestamp_field="label_ts",
    description="Default outcome of each loan, knowable 120 days after origination.",
)
applications = ParquetSource(
    name="applications",
    dataset="raw/underwriting/applications",
    timestamp_field="application_ts",
    description="Checkout applications.",
)

checkouts = StreamSource(
    name="checkouts",
    dataset="events/underwriting/checkouts",
    timestamp_field="checkout_ts",
    schema=[
        Field(name="application_id", dtype="string", description="The checkout's application."),
        Field(name="applicant_id", dtype="int64", description="Who checked out."),
        Field(name="merchant_id", dtype="int64", description="Where."),
        Field(name="amount", dtype="float64", description="Order amount."),
    ],
    description="Checkouts at every merchant as they happen (sent once decided).",
)
repayments = StreamSource(
    name="repayments",
    dataset="events/underwriting/repayments",
    timestamp_field="event_ts",
    schema=[
        Field(name="application_id", dtype="string", description="The loan."),
        Field(name="applicant_id", dtype="int64", description="The borrower."),
        Field(name="event_type", dtype="string", description="origination, payment, missed or delinquency."),
        Field(name="is_late", dtype="int64", description="1 for a payment after its due time."),
        Field(name="is_missed", dtype="int64", description="1 for an installment unpaid when its grace period ended."),
        Field(name="days_past_due", dtype="int64", description="Days past due the event records."),
    ],
    description="Originations, payments, missed installments and delinquencies as they happen.",
)

_WINDOWS = {"30d": "30 days", "90d": "90 days", "365d": "12 months"}


def _history_aggregations() -> list[Aggregation]:
    aggs = []
    for window, words in _WINDOWS.items():
        aggs += [
            Aggregation(
                name=f"loans_{window}", column="is_loan", function="sum", window=window,
                description=f"Loans taken in the last {words}.",
                reason=f"Number of recent loans in the last {words}",
            ),
            Aggregation(
                name=f"late_installments_{window}", column="is_late", function="sum", window=window,
                description=f"Installments paid late in the last {words}.",
                reason=f"Late payments in the last {words}",
            ),
            Aggregation(
                name=f"missed_installments_{window}", column="is_missed", function="sum", window=window,
                description=f"Installments missed in the last {words}.",
                reason=f"Missed payments in the last {words}",
            ),
            Aggregation(
                name=f"max_days_past_due_{window}", column="days_past_due", function="max", window=window,
                description=f"Worst delinquency (days past due) in the last {words}.",
                reason=f"Serious delinquency in the last {words}",
            ),
        ]
    aggs += [
        Aggregation(
            name="outstanding_balance", column="balance_delta", function="sum", window="365d",
            description="Principal originated minus payments over the last 12 months.",
            reason="Amount currently owed on other loans",
        ),
        Aggregation(
            name="avg_loan_amount_365d", column="loan_amount", function="mean", window="365d",
            description="Average loan amount over the last 12 months.",
            reason="Limited history of loans of this size",
        ),
    ]
    return aggs


def _history_quality() -> Quality:
    """Counts are never null (a sum over an empty window is 0) and never negative; a worst
    delinquency beyond ten years or a negative loan amount is a broken upstream batch. The
    history is rewritten every day, so its newest row is at most two days old. Drift of the
    features the model leans on is measured against its training set."""
    counts = Expectation(max_null_rate=0.0, min=0, max=10_000)
    features = {f"{kind}_{w}": counts for kind in ("loans", "late_installments", "missed_installments") for w in _WINDOWS}
    features |= {f"max_days_past_due_{w}": Expectation(min=0, max=3650) for w in _WINDOWS}
    features |= {
        "loans_90d": Expectation(max_null_rate=0.0, min=0, max=10_000, max_psi=0.25),
        "missed_installments_90d": Expectation(max_null_rate=0.0, min=0, max=10_000, max_psi=0.25),
        "outstanding_balance": Expectation(max_null_rate=0.0, max_psi=0.25),
        "avg_loan_amount_365d": Expectation(min=0, max_psi=0.25),
    }
    return Quality(policy="strict", max_staleness="2d", features=features)


applicant_history = FeatureView(
    name="applicant_history",
    entities=[applicant],
    source=repayment_events,
    aggregations=_history_aggregations(),
    ttl="400d",
    description="The applicant's repayment history as known at each day's end.",
    owner="credit-risk",
    quality=_history_quality(),
)

merchant_risk = FeatureView(
    name="merchant_risk",
    entities=[merchant],
    source=loan_outcomes,
    aggregations=[
        Aggregation(
            name="default_rate_90d", column="default", function="mean", window="90d",
            description="Share of this merchant's loans whose outcome became known in the last 90 days that defaulted.",
            reason="Elevated risk at this merchant",
        ),
        Aggregation(
            name="outcomes_90d", column="default", function="count", window="90d",
            description="Loan outcomes that became known in the last 90 days.",
            reason="Limited history at this merchant",
        ),
    ],
    ttl="120d",
    description="How loans at this merchant have turned out.",
    owner="credit-risk",
    quality=Quality(
        policy="strict",
        max_staleness="7d",
        features={
            "default_rate_90d": Expectation(min=0, max=1, max_psi=0.25),
            "outcomes_90d": Expectation(max_null_rate=0.0, min=0),
        },
    ),
)

merchant_activity = FeatureView(
    name="merchant_activity",
    entities=[merchant],
    source=applications,
    aggregations=[
        Aggregation(
            name="applications_90d", function="count", window="90d",
            description="Checkout applications at this merchant in the last 90 days.",
            reason="Limited history at this merchant",
        ),
    ],
    ttl="120d",
    description="Checkout volume at this merchant.",
    owner="credit-risk",
    quality=Quality(
        policy="warn",
        max_staleness="2d",
        features={"applications_90d": Expectation(max_null_rate=0.0, min=0, max_psi=0.25)},
    ),
)

applicant_checkouts = FeatureView(
    name="applicant_checkouts",
    entities=[applicant],
    source=checkouts,
    aggregations=[
        Aggregation(
            name="checkouts_1h", function="count", window="1h",
            description="The applicant's checkouts at any merchant in the last hour (this one not included).",
            reason="Several applications in the last hour",
        ),
        Aggregation(
            name="checkouts_24h", function="count", window="24h",
            description="The applicant's checkouts at any merchant in the last 24 hours: loan stacking.",
            reason="Several loans taken in the last 24 hours",
        ),
        Aggregation(
            name="checkout_amount_24h", column="amount", function="sum", window="24h",
            description="Amount of the applicant's checkouts in the last 24 hours.",
            reason="Amount borrowed in the last 24 hours is high",
        ),
        Aggregation(
            name="recent_checkout_amounts", column="amount", function="last_k", k=5, window="30d",
            description="Amounts of the applicant's last 5 checkouts in the last 30 days, oldest first.",
            reason="Order amount is high compared with your recent purchases",
        ),
    ],
    description="The applicant's checkouts, exact at the second.",
    owner="credit-risk",
)

recent_repayments = FeatureView(
    name="recent_repayments",
    entities=[applicant],
    source=repayments,
    aggregations=[
        Aggregation(
            name="missed_installments_7d", column="is_missed", function="sum", window="7d",
            description="Installments declared missed in the last 7 days.",
            reason="Missed payments in the last 7 days",
        ),
        Aggregation(
            name="late_payments_7d", column="is_late", function="sum", window="7d",
            description="Payments made after their due time in the last 7 days.",
            reason="Late payments in the last 7 days",
        ),
        Aggregation(
            name="recent_days_past_due", column="days_past_due", function="last_k", k=3, window="30d",
            description="Days past due of the applicant's last 3 repayment events in the last 30 days, oldest first.",
            reason="A recent payment was past due",
        ),
    ],
    description="The applicant's repayment events of the last days, exact at the second.",
    owner="credit-risk",
)

checkout = RequestSource(
    name="checkout",
    schema=[
        Field(name="amount", dtype="float64", description="Order amount."),
        Field(name="term", dtype="int64", description="Number of installments."),
    ],
    description="Fields of the checkout application itself.",
)


@on_demand_feature_view(
    sources=[checkout, applicant_history],
    schema=[
        Field(name="order_amount", dtype="float64", description="Order amount.", reason="Order amount is high"),
        Field(name="term_installments", dtype="int64", description="Installments in the plan.", reason="Length of the payment plan"),
        Field(
            name="amount_to_avg_prior",
            dtype="float64",
            description="Order amount divided by the applicant's average loan over the last 12 months (null without history).",
            reason="Order amount is high compared with your previous purchases",
        ),
    ],
    # Python mode: a checkout scores one row, where building pandas frames would cost more
    # CPU than the rest of the feature lookup (see OnDemandFeatureView).
    mode="python",
)
def checkout_features(inputs: dict[str, list]) -> dict[str, list]:
    """Request-time features of the checkout, relative to the applicant's history."""
    amounts = [None if a is None else float(a) for a in inputs["amount"]]
    priors = inputs["avg_loan_amount_365d"]
    return {
        "order_amount": amounts,
        "term_installments": [None if t is None else int(t) for t in inputs["term"]],
        "amount_to_avg_prior": [
            a / float(p) if a is not None and p is not None and p > 0 else None for a, p in zip(amounts, priors, strict=True)
        ],
    }


@on_demand_feature_view(
    sources=[checkout, applicant_checkouts, recent_repayments],
    schema=[
        Field(
            name="amount_to_recent_checkouts",
            dtype="float64",
            description="Order amount divided by the mean of the applicant's last 5 checkouts in 30 days (null without any).",
            reason="Order amount is high compared with your recent purchases",
        ),
        Field(
            name="worst_recent_days_past_due",
            dtype="float64",
            description="Most days past due among the applicant's last 3 repayment events in 30 days (null without any).",
            reason="A recent payment was past due",
        ),
    ],
    mode="python",
)
def live_activity_features(inputs: dict[str, list]) -> dict[str, list]:
    """Request-time features from the real-time views' recent values (``last_k`` lists)."""
    # A list arrives as a Python list online and as a numpy array from a training set's batch.
    amounts = [None if a is None else float(a) for a in inputs["amount"]]
    recent = [[] if r is None else [float(v) for v in r] for r in inputs["recent_checkout_amounts"]]
    days = [[] if r is None else [float(v) for v in r] for r in inputs["recent_days_past_due"]]
    return {
        "amount_to_recent_checkouts": [
            a * len(r) / sum(r) if a is not None and r and sum(r) > 0 else None for a, r in zip(amounts, recent, strict=True)
        ],
        "worst_recent_days_past_due": [max(d) if d else None for d in days],
    }


#: The real-time features the model uses (the ``last_k`` lists reach it through
#: ``live_activity_features``: a model takes numbers).
REALTIME_FEATURES = [
    "applicant_checkouts:checkouts_1h",
    "applicant_checkouts:checkouts_24h",
    "applicant_checkouts:checkout_amount_24h",
    "recent_repayments:missed_installments_7d",
    "recent_repayments:late_payments_7d",
]

underwriting_v1 = FeatureService(
    name="underwriting_v1",
    features=[
        applicant_history, merchant_risk, merchant_activity, checkout_features, *REALTIME_FEATURES, live_activity_features,
    ],
    description="Features of the checkout underwriting model.",
    owner="credit-risk",
)

DEFINITIONS = [
    applicant,
    merchant,
    repayment_events,
    loan_outcomes,
    applications,
    checkouts,
    repayments,
    applicant_history,
    merchant_risk,
    merchant_activity,
    applicant_checkouts,
    recent_repayments,
    checkout,
    checkout_features,
    live_activity_features,
    underwriting_v1,
]
