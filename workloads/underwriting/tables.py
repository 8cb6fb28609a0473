"""The synthetic underwriting data set's tables: their schemas, and how one shard's draws
(``workloads.underwriting.population``) become rows as the lender knew them at ``config.end``.

Tables (all timestamps ``timestamp[us, tz=UTC]``; exact schemas in ``SCHEMAS``):

- ``applicants``: who signed up, when, through which channel.
- ``merchants``: stores and their category (``generate_merchants``; the same for every shard).
- ``applications``: one row per approved checkout loan: amount, merchant, plan (4 installments
  every 14 days, or 6 / 12 every 30 days).
- ``installments``: the repayment ledger **as of** ``config.end``: a payment after ``end`` has
  not happened yet (``paid_ts`` null). ``status`` is ``on_time`` (paid by the due time),
  ``late`` (paid less than ``GRACE`` after it), ``missed`` (unpaid at due + ``GRACE``, whether
  paid later or not) or ``pending`` (unpaid, and its grace period had not ended at ``end``).
- ``checkout_events``: the checkout stream, one event per application: ``event_id``
  (``<application_id>-checkout``), applicant, merchant and amount, ``checkout_ts`` = the
  application's time and ``known_ts`` one second later (``KNOWN_AFTER_DECISION``: the bus
  accepts a checkout's event after its decision, so neither that decision nor a training row
  at the application's time sees its own checkout).
- ``repayment_events``: one row per fact with ``event_ts`` (when it happened) and ``known_ts``
  (when the lender knew it); never a fact known after ``end``. Point-in-time features come
  from here, and it is also the repayment stream (``event_id`` unique): an ``origination`` at
  the checkout, known one second later like the checkout; a ``payment`` when paid (``is_late``
  when after the due time); ``missed`` when an installment's grace period ends unpaid (due +
  ``GRACE``); a ``delinquency`` when it reaches 30, 60 and 90 days past due. Each of the last
  three is known as it happens.
- ``outcomes``: per loan, ``default`` = 1 when an installment with ``due_ts + 60d <=
  application_ts + 120d`` reached 60 days past due (unpaid then, or paid 60+ days late).
  ``label_ts`` = ``application_ts + 120d``; ``label_known`` = ``label_ts <= end``. Where the
  label is not known yet, ``default`` counts only what was visible at ``end`` (a lower bound).

"k days past due" means ``paid_ts - due_ts >= k days``, or unpaid at ``due_ts + k days``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from workloads.underwriting.population import (
    _CAT_NAMES,
    _DAY,
    CHANNELS,
    KNOWN_AFTER_DECISION,
    _merchant_model,
    _repayment_delays,
    _us,
)

if TYPE_CHECKING:
    from workloads.underwriting.generate import DataConfig

__all__ = [
    "DEFAULT_DPD",
    "DELINQUENCY_DPD",
    "GRACE",
    "KNOWN_AFTER_DECISION",
    "OUTCOME_HORIZON",
    "SCHEMAS",
    "SHARD_TABLES",
    "TABLES",
]

DEFAULT_DPD = 60  # days past due that make a loan a default
OUTCOME_HORIZON = timedelta(days=120)  # the default must happen this soon after origination
GRACE = timedelta(days=5)  # unpaid this long after the due time = a missed installment
DELINQUENCY_DPD = (30, 60, 90)  # a "delinquency" event at each of these days past due


# ------------------------------------------------------------------------------- schemas
_TS, _I64, _F64, _STR = pa.timestamp("us", tz="UTC"), pa.int64(), pa.float64(), pa.string()
SCHEMAS: dict[str, pa.Schema] = {
    "applicants": pa.schema([("applicant_id", _I64), ("signup_ts", _TS), ("channel", _STR)]),
    "merchants": pa.schema([("merchant_id", _I64), ("merchant_category", _STR), ("onboarded_ts", _TS)]),
    "applications": pa.schema([
        ("application_id", _STR), ("applicant_id", _I64), ("merchant_id", _I64), ("merchant_category", _STR),
        ("amount", _F64), ("currency", _STR), ("term", _I64), ("installment_period_days", _I64),
        ("application_ts", _TS),
    ]),
    "checkout_events": pa.schema([
        ("event_id", _STR), ("application_id", _STR), ("applicant_id", _I64), ("merchant_id", _I64),
        ("amount", _F64), ("checkout_ts", _TS), ("known_ts", _TS),
    ]),
    "installments": pa.schema([
        ("application_id", _STR), ("applicant_id", _I64), ("merchant_id", _I64), ("installment_no", _I64),
        ("due_ts", _TS), ("amount_due", _F64), ("paid_ts", _TS), ("days_past_due", _I64), ("status", _STR),
    ]),
    "repayment_events": pa.schema([
        ("event_id", _STR), ("applicant_id", _I64), ("merchant_id", _I64), ("application_id", _STR),
        ("event_type", _STR), ("event_ts", _TS), ("known_ts", _TS), ("loan_amount", _F64), ("balance_delta", _F64),
        ("is_loan", _I64), ("is_late", _I64), ("is_missed", _I64), ("days_past_due", _I64),
    ]),
    "outcomes": pa.schema([
        ("application_id", _STR), ("applicant_id", _I64), ("merchant_id", _I64), ("merchant_category", _STR),
        ("application_ts", _TS), ("label_ts", _TS), ("default", _I64), ("label_known", pa.bool_()),
    ]),
}  # fmt: skip
TABLES = tuple(SCHEMAS)
SHARD_TABLES = ("applicants", "applications", "checkout_events", "installments", "repayment_events", "outcomes")


_KNOWN_US = KNOWN_AFTER_DECISION // timedelta(microseconds=1)
_STATUS = pa.array(["on_time", "late", "missed", "pending"])
_EVENT_TYPES = pa.array(["origination", "payment", "missed", "delinquency", "delinquency", "delinquency"])
_MAX_TERM = 12
# event_id suffix by (event code, installment_no): "-orig", "-pay-03", "-miss-03", "-dpd60-03"
_SUFFIX = pa.array(
    [
        "-orig" if code == 0 else f"-{kind}-{no:02d}"
        for code, kind in enumerate(["orig", "pay", "miss"] + [f"dpd{k}" for k in DELINQUENCY_DPD])
        for no in range(_MAX_TERM + 1)
    ]
)


def _ids(prefix: str, numbers: np.ndarray, width: int) -> pa.Array:
    digits = pc.utf8_lpad(pc.cast(pa.array(numbers), pa.string()), width, "0")
    return pc.binary_join_element_wise(prefix, digits, "")


def _table(name: str, columns: dict[str, Any]) -> pa.Table:
    schema = SCHEMAS[name]
    return pa.table([pa.array(columns[f.name], f.type) for f in schema], schema=schema)


def _event_rows(
    loan: np.ndarray,
    no: np.ndarray,
    due: np.ndarray,
    paid: np.ndarray,
    unpaid: np.ndarray,
    missed: np.ndarray,
    dpd: np.ndarray,
    app_ts: np.ndarray,
    loan_applicant: np.ndarray,
    reached: Callable[[int], np.ndarray],
    grace: int,
) -> tuple[np.ndarray, ...]:
    """(loan, installment_no, code, event_ts, known_ts, days_past_due) of every repayment event,
    sorted by applicant, known_ts, event_ts, loan, installment, code (codes index ``_EVENT_TYPES``)."""
    n_loans = len(app_ts)
    zeros = np.zeros(n_loans, np.int64)
    kinds = [(np.arange(n_loans), zeros, 0, app_ts, app_ts + _KNOWN_US, zeros)]
    kinds.append((loan[~unpaid], no[~unpaid], 1, paid[~unpaid], paid[~unpaid], dpd[~unpaid]))
    declared = due[missed] + grace  # an installment is missed when its grace period ends unpaid
    kinds.append((loan[missed], no[missed], 2, declared, declared, np.full(missed.sum(), grace // _DAY)))
    for code, days in enumerate(DELINQUENCY_DPD, start=3):
        m = reached(days)
        at = due[m] + days * _DAY
        kinds.append((loan[m], no[m], code, at, at, np.full(m.sum(), days)))
    columns = [np.concatenate([np.broadcast_to(k[i], k[0].shape) for k in kinds]) for i in range(6)]
    e_loan, e_no, e_code, e_ts, e_known, _ = columns
    order = np.lexsort((e_code, e_no, e_loan, e_ts, e_known, loan_applicant[e_loan]))
    return tuple(c[order] for c in columns)


def _tables(
    config: DataConfig, d: dict[str, np.ndarray], first_applicant: int, first_application: int
) -> dict[str, pa.Table]:
    """Turn one shard's random draws into its tables (deterministic; see the module docstring)."""
    merchants = _merchant_model(config)
    end = _us(config.end)
    grace, horizon = GRACE // timedelta(microseconds=1), OUTCOME_HORIZON // timedelta(microseconds=1)
    owner, term, app_ts = d["owner"], d["term"], d["ts"]
    n_loans = len(owner)
    applicant_id = first_applicant + np.arange(len(d["risk"]), dtype=np.int64)
    loan_applicant, merchant_id = applicant_id[owner], d["merchant"] + 1
    category = pa.array(np.array(_CAT_NAMES, dtype=object)[merchants["category"][d["merchant"]]], pa.string())
    period = np.where(term == 4, 14, 30)
    label_ts = app_ts + horizon
    app_id = _ids("app-", first_application + np.arange(n_loans, dtype=np.int64), 9)

    # the ledger: installment k is due k periods after the checkout
    loan = np.repeat(np.arange(n_loans), term)
    no = np.arange(len(loan)) - np.repeat(np.cumsum(term) - term, term) + 1
    due = app_ts[loan] + no * period[loan] * _DAY
    cents = np.rint(d["amount"] * 100).astype(np.int64)
    amount_due = (cents // term)[loan] + np.where(no == term[loan], (cents % term)[loan], 0)
    # when each installment is really paid (the hidden model), then what of it was known at `end`
    delay, never = _repayment_delays(config, d, loan, due, grace=grace, default_dpd=DEFAULT_DPD)
    paid = due + delay
    unpaid = never | (paid > end)  # nothing after `end` is known
    dpd = np.where(unpaid, np.maximum(end - due, 0), np.maximum(delay, 0)) // _DAY
    missed = np.where(unpaid, due + grace <= end, delay >= grace)
    status = np.select([missed, unpaid, delay > 0], [2, 3, 1], 0)

    def reached(days: int) -> np.ndarray:  # k days past due, as known at `end`
        return (due + days * _DAY <= end) & (unpaid | (delay >= days * _DAY))

    counted = reached(DEFAULT_DPD) & (due + DEFAULT_DPD * _DAY <= label_ts[loan])
    default = (np.bincount(loan, weights=counted, minlength=n_loans) > 0).astype(np.int64)

    e_loan, e_no, e_code, e_ts, e_known, e_dpd = _event_rows(
        loan, no, due, paid, unpaid, missed, dpd, app_ts, loan_applicant, reached, grace
    )
    is_orig, is_pay = e_code == 0, e_code == 1
    inst = (np.cumsum(term) - term)[e_loan] + np.maximum(e_no - 1, 0)  # ledger row of each event
    e_amount = np.where(is_orig, d["amount"][e_loan], np.nan)
    e_app_id = app_id.take(e_loan)

    return {
        "applicants": _table("applicants", {
            "applicant_id": applicant_id, "signup_ts": d["signup"],
            "channel": pa.array(CHANNELS).take(d["channel"]),
        }),
        "applications": _table("applications", {
            "application_id": app_id, "applicant_id": loan_applicant, "merchant_id": merchant_id,
            "merchant_category": category, "amount": d["amount"],
            "currency": pa.array([config.currency]).take(np.zeros(n_loans, np.int64)),
            "term": term.astype(np.int64), "installment_period_days": period.astype(np.int64),
            "application_ts": app_ts,
        }),
        "checkout_events": _table("checkout_events", {
            "event_id": pc.binary_join_element_wise(app_id, "-checkout", ""), "application_id": app_id,
            "applicant_id": loan_applicant, "merchant_id": merchant_id, "amount": d["amount"],
            "checkout_ts": app_ts, "known_ts": app_ts + _KNOWN_US,
        }),
        "installments": _table("installments", {
            "application_id": app_id.take(loan), "applicant_id": loan_applicant[loan],
            "merchant_id": merchant_id[loan], "installment_no": no.astype(np.int64), "due_ts": due,
            "amount_due": amount_due / 100, "paid_ts": pa.array(paid, _TS, mask=unpaid),
            "days_past_due": dpd.astype(np.int64), "status": _STATUS.take(status),
        }),
        "repayment_events": _table("repayment_events", {
            "event_id": pc.binary_join_element_wise(e_app_id, _SUFFIX.take(e_code * (_MAX_TERM + 1) + e_no), ""),
            "applicant_id": loan_applicant[e_loan], "merchant_id": merchant_id[e_loan],
            "application_id": e_app_id, "event_type": _EVENT_TYPES.take(e_code),
            "event_ts": e_ts, "known_ts": e_known,
            "loan_amount": pa.array(e_amount, _F64, mask=~is_orig),
            "balance_delta": np.where(is_orig, e_amount, np.where(is_pay, -amount_due[inst] / 100, 0.0)),
            "is_loan": is_orig.astype(np.int64), "is_late": (is_pay & (delay[inst] > 0)).astype(np.int64),
            "is_missed": (e_code == 2).astype(np.int64), "days_past_due": e_dpd.astype(np.int64),
        }),
        "outcomes": _table("outcomes", {
            "application_id": app_id, "applicant_id": loan_applicant, "merchant_id": merchant_id,
            "merchant_category": category, "application_ts": app_ts,
            "label_ts": label_ts, "default": default, "label_known": label_ts <= end,
        }),
    }  # fmt: skip
