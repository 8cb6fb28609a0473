"""Fraud features: the streams the fraud transformer's input is served from.

Applied by the fraud workload's ``apply`` step (``platform.features.apply(DEFINITIONS)``); the
events get into the streams' offline logs and the online event state as described in
:mod:`workloads.fraud.online`, which also builds the model's input from them.

- ``fraud_events`` (stream) / ``applicant_behaviour`` (real-time view, entity applicant): the
  applicant's applications and repayment events with exactly the fields
  :mod:`workloads.fraud.windows` reads. The bus's acceptance time (``created_timestamp``) is
  when an event was known, the windows' ``known_ts``. The view's online state keeps each
  applicant's raw events for ``retention`` = its 3650-day window plus the 3650-day allowed
  lateness, so it never trims history the sequences would use (they read the most recent K
  events known before the application). Its aggregations are cheap and rarely read: their
  point is that a real-time view's online events carry exactly the columns its aggregations
  name, so together they name every field the sequences need.
- ``merchant_profiles`` (stream) / ``merchant_profile`` (real-time view, entity merchant): the
  merchant's category, because a checkout request names the merchant and not its category.
  No existing view serves it online (the underwriting views give merchant risk and activity
  only). A stream with one ``last_k`` (k=1) aggregation is the smallest thing that does: one
  event per merchant (its onboarding, or a later change of category), so its online state is
  tiny; the value at a time ``t`` is the category known at ``t`` (point in time, exact to the
  second like any real-time view); it loads through the same event log and online load as
  ``fraud_events``; and it asks no backfill or materialization of this or any other workload
  (a batch view on the merchants table would have been backfilled by every workload's backfill
  of all registered views). Its window is a century: a profile holds until a newer one.
"""

from __future__ import annotations

from mlplatform.features import Aggregation, FeatureView, Field, StreamSource
from workloads.underwriting.features import applicant, merchant

__all__ = [
    "DEFINITIONS",
    "HISTORY_WINDOW",
    "applicant_behaviour",
    "fraud_events",
    "merchant_profile",
    "merchant_profiles",
]

#: How far back the applicant's events are kept online (with as much allowed lateness).
HISTORY_WINDOW = "3650d"

fraud_events = StreamSource(
    name="fraud_events",
    dataset="events/fraud/fraud_events",
    timestamp_field="event_ts",
    schema=[
        Field(name="applicant_id", dtype="int64", description="Whose event."),
        Field(
            name="event_type",
            dtype="string",
            description="application, payment, missed or delinquency (repayment_events' types; origination is the application).",
        ),
        Field(name="merchant_category", dtype="string", description="Merchant category of an application (null otherwise)."),
        Field(name="amount", dtype="float64", description="Loan amount of an application (null otherwise)."),
        Field(name="balance_delta", dtype="float64", description="Balance change of a repayment event: minus the installment paid."),
        Field(name="is_late", dtype="int64", description="1 for a payment after its due time."),
        Field(name="days_past_due", dtype="int64", description="Days past due the repayment event records."),
    ],
    # The sequences order and date events by when they were known, whatever happened when: no
    # event the windows would use may count as late (see the module doc).
    allowed_lateness=HISTORY_WINDOW,
    description="The applicant's checkout applications and repayment events, as the fraud sequences read them.",
)

merchant_profiles = StreamSource(
    name="merchant_profiles",
    dataset="events/fraud/merchant_profiles",
    timestamp_field="event_ts",
    schema=[
        Field(name="merchant_id", dtype="int64", description="The merchant."),
        Field(name="merchant_category", dtype="string", description="Its category from this event on."),
    ],
    description="A merchant's profile when it is onboarded and whenever its category changes.",
)

applicant_behaviour = FeatureView(
    name="applicant_behaviour",
    entities=[applicant],
    source=fraud_events,
    aggregations=[
        Aggregation(
            name="events_3650d", column="event_type", function="count", window=HISTORY_WINDOW,
            description="The applicant's applications and repayment events in the last 10 years.",
        ),
        Aggregation(
            name="applications_3650d", column="merchant_category", function="count", window=HISTORY_WINDOW,
            description="Applications in the last 10 years (only they carry a merchant category).",
        ),
        Aggregation(
            name="loan_amount_3650d", column="amount", function="sum", window=HISTORY_WINDOW,
            description="Amount borrowed in the last 10 years.",
        ),
        Aggregation(
            name="balance_delta_3650d", column="balance_delta", function="sum", window=HISTORY_WINDOW,
            description="Balance change of the repayment events in the last 10 years (minus what was repaid).",
        ),
        Aggregation(
            name="late_payments_3650d", column="is_late", function="sum", window=HISTORY_WINDOW,
            description="Payments made after their due time in the last 10 years.",
        ),
        Aggregation(
            name="max_days_past_due_3650d", column="days_past_due", function="max", window=HISTORY_WINDOW,
            description="Worst days past due in the last 10 years.",
        ),
    ],
    description="The applicant's raw behaviour events online: the fraud transformer's input.",
    owner="fraud",
)

merchant_profile = FeatureView(
    name="merchant_profile",
    entities=[merchant],
    source=merchant_profiles,
    aggregations=[
        Aggregation(
            name="merchant_category", column="merchant_category", function="last_k", k=1, window="36500d",
            description="The merchant's category: a one-element list, empty for an unknown merchant.",
        ),
    ],
    description="The merchant's current category (the fraud model's application token).",
    owner="fraud",
)

DEFINITIONS = [fraud_events, merchant_profiles, applicant_behaviour, merchant_profile]
