"""Deterministic synthetic buy-now-pay-later data: applicants, merchants, loans, the repayment
ledger, repayment events stamped with when each fact became known, and default outcomes.

    config = DataConfig(applications=1_000_000, seed=7)
    versions = generate(platform, config)    # Ray Data: each shard writes its own Parquet files
    tables = generate_shard(config, 0)       # the same rows of shard 0, in this process, no Ray

Tables (all timestamps ``timestamp[us, tz=UTC]``; exact schemas in ``SCHEMAS``):

- ``applicants``: who signed up, when, through which channel.
- ``merchants``: stores and their category (``generate_merchants``; the same for every shard).
- ``applications``: one row per approved checkout loan: amount, merchant, plan (4 installments
  every 14 days, or 6 / 12 every 30 days).
- ``installments``: the repayment ledger **as of** ``config.end``: a payment after ``end`` has
  not happened yet (``paid_ts`` null). ``status`` is ``on_time`` (paid by the due time),
  ``late`` (paid less than ``GRACE`` after it), ``missed`` (unpaid at due + ``GRACE``, whether
  paid later or not) or ``pending`` (unpaid, and its grace period had not ended at ``end``).
- ``repayment_events``: one row per fact with ``event_ts`` (when it happened) and ``known_ts``
  (when the lender knew it); never a fact known after ``end``. Point-in-time features come
  from here.
- ``outcomes``: per loan, ``default`` = 1 when an installment with ``due_ts + 60d <=
  application_ts + 120d`` reached 60 days past due (unpaid then, or paid 60+ days late).
  ``label_ts`` = ``application_ts + 120d``; ``label_known`` = ``label_ts <= end``. Where the
  label is not known yet, ``default`` counts only what was visible at ``end`` (a lower bound).

"k days past due" means ``paid_ts - due_ts >= k days``, or unpaid at ``due_ts + k days``.

Hidden drivers (never written): each applicant has a latent risk and each merchant a latent
risk; an installment's lateness rises with both, with the order amount relative to the
applicant's own typical amount, with longer plans, and with the applicant's recent
delinquency (persistence, decaying over ~90 days). No protected attributes or proxies exist.

Determinism: the same config gives byte-identical tables. Randomness comes from blocks of
``BLOCK_APPLICATIONS`` applications, each seeded by ``SeedSequence(seed, spawn_key=(1, block))``
(merchants: ``spawn_key=(0,)``), and shards are contiguous runs of blocks, so the data does not
depend on how many shards generate it.
"""

from __future__ import annotations

import functools
import json
import math
import time
from datetime import UTC, datetime, timedelta
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    import pyarrow.fs as pafs

    from mlplatform.platform import Platform
    from mlplatform.storage import DatasetVersion

__all__ = [
    "BLOCK_APPLICATIONS",
    "DEFAULT_DPD",
    "GRACE",
    "OUTCOME_HORIZON",
    "SCHEMAS",
    "TABLES",
    "DataConfig",
    "generate",
    "generate_merchants",
    "generate_shard",
    "shard_count",
]

DEFAULT_DPD = 60  # days past due that make a loan a default
OUTCOME_HORIZON = timedelta(days=120)  # the default must happen this soon after origination
GRACE = timedelta(days=5)  # unpaid this long after the due time = a missed installment
DELINQUENCY_DPD = (30, 60, 90)  # a "delinquency" event at each of these days past due
APPLICATIONS_PER_SHARD = 250_000
BLOCK_APPLICATIONS = 1024

# category: (median order amount, risk offset, share of merchants)
CATEGORIES = {
    "electronics": (420.0, 0.15, 0.16),
    "fashion": (110.0, 0.0, 0.22),
    "travel": (650.0, 0.25, 0.08),
    "home": (280.0, -0.10, 0.14),
    "beauty": (70.0, -0.05, 0.12),
    "gaming": (90.0, 0.30, 0.08),
    "sports": (160.0, 0.0, 0.10),
    "health": (200.0, -0.15, 0.10),
}
CHANNELS = ("web", "app", "in_store")
_CHANNEL_P = (0.45, 0.40, 0.15)
_CHANNEL_RISK = np.array([0.1, -0.05, -0.1])

# The installment model: L = score + logistic noise; L < 0 on time, < _T_MISSED late within
# grace, < _T_SEVERE missed and cured within 60 days, else 60+ days late or never paid.
_MU = -3.6
_B_APPLICANT = 1.7
_B_MERCHANT = 0.6
_B_AMOUNT = 0.9
_B_LONG_PLAN = 0.2
_GAMMA = 0.7  # weight of the applicant's recent delinquency
_STATE_BUMP = np.array([0.0, 0.5, 1.5, 3.0])  # the state after an outcome of each tier (at least)
_STATE_DECAY_DAYS = 90.0
_T_MISSED, _T_SEVERE = 0.8, 2.0
_NEVER_PAID = 0.6  # share of severe installments never paid
_MEAN_LOANS = 4.5  # loans per applicant

_US = 1_000_000
_DAY = 86_400 * _US
_CAT_NAMES = tuple(CATEGORIES)
_CAT_MEDIAN = np.array([v[0] for v in CATEGORIES.values()])
_CAT_RISK = np.array([v[1] for v in CATEGORIES.values()])
_CAT_SHARE = np.array([v[2] for v in CATEGORIES.values()]) / sum(v[2] for v in CATEGORIES.values())


class DataConfig(BaseModel):
    """Size, period and seed of the synthetic data set (``data:`` in configs/underwriting.yaml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    applications: int = Field(default=20_000, gt=0, le=999_999_999, description="Number of loan applications.")
    merchants: int = Field(default=200, gt=0, le=1_000_000, description="Number of merchants.")
    start: datetime = Field(
        default=None,  # type: ignore[assignment]  # filled in from end by _period
        description="First possible signup/application (UTC; naive = UTC); default two years before end.",
    )
    end: datetime = Field(
        default=datetime(2025, 1, 1, tzinfo=UTC),
        description=(
            "The data's 'now' (exclusive for applications): nothing known later is written (UTC; naive = UTC). "
            "'today' = this UTC midnight, so the online features of a live endpoint are within their ttl "
            "(the data then changes daily; give a date for a reproducible set)."
        ),
    )
    seed: int = Field(default=7, ge=0, description="Random seed: the same config gives byte-identical tables.")
    shards: int | None = Field(
        default=None,
        gt=0,
        description=f"Parallel pieces (None = one per ~{APPLICATIONS_PER_SHARD:,} applications); the data is the same.",
    )
    currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$", description="ISO 4217 currency of every amount.")

    @field_validator("end", mode="before")
    @classmethod
    def _today(cls, value: Any) -> Any:
        if value == "today":
            return datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
        return value

    @field_validator("start", "end")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)

    @model_validator(mode="after")
    def _period(self) -> DataConfig:
        if self.start is None:
            end = self.end
            start = end.replace(year=end.year - 2, day=28 if (end.month, end.day) == (2, 29) else end.day)
            object.__setattr__(self, "start", start)  # frozen model: set once, while validating
        if self.end - self.start < timedelta(days=1):
            raise ValueError(
                f"end ({self.end.isoformat()}) must be at least one day after start ({self.start.isoformat()})"
            )
        return self


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
SHARD_TABLES = ("applicants", "applications", "installments", "repayment_events", "outcomes")


# ------------------------------------------------------------------------------ layout
def _us(value: datetime) -> int:
    return (value - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


def _blocks(config: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Offsets of each block's applications and applicants (arrays of n_blocks + 1)."""
    n_blocks = math.ceil(config.applications / BLOCK_APPLICATIONS)
    app_off = np.arange(n_blocks + 1, dtype=np.int64) * config.applications // n_blocks
    applicants = np.maximum(1, np.rint(np.diff(app_off) / _MEAN_LOANS)).astype(np.int64)
    return app_off, np.concatenate([[0], np.cumsum(applicants)])


def shard_count(config: DataConfig) -> int:
    """How many shards ``generate`` runs: ``config.shards`` (or one per ~250k applications),
    at most one per block of ``BLOCK_APPLICATIONS`` applications."""
    n_blocks = math.ceil(config.applications / BLOCK_APPLICATIONS)
    wanted = config.shards or math.ceil(config.applications / APPLICATIONS_PER_SHARD)
    return max(1, min(wanted, n_blocks))


# ---------------------------------------------------------------------------- merchants
@functools.lru_cache(maxsize=8)
def _merchant_model(config: DataConfig) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(0,)))
    m = config.merchants
    category = rng.choice(len(_CAT_NAMES), size=m, p=_CAT_SHARE)
    span_s = (_us(config.end) - _us(config.start)) // _US
    before = rng.random(m) < 0.8
    offset_s = np.where(before, -rng.random(m) * 3 * 365 * 86_400, rng.random(m) * 0.75 * span_s).astype(np.int64)
    offset_s[np.argmin(offset_s)] = min(offset_s.min(), -86_400)  # someone must be open from day one
    popularity = 1.0 / (1.0 + rng.permutation(m)) ** 0.9
    risk = rng.standard_normal(m) + _CAT_RISK[category]
    order = np.argsort(offset_s, kind="stable")  # merchant_id follows onboarding order
    weight = popularity[order]
    return {
        "category": category[order],
        "onboarded": _us(config.start) + offset_s[order] * _US,
        "cum_weight": np.cumsum(weight),
        "risk": risk[order],
    }


def generate_merchants(config: DataConfig) -> pa.Table:
    """The merchants table (ids 1..merchants in onboarding order); depends only on the seed,
    the number of merchants and the period."""
    model = _merchant_model(config)
    schema = SCHEMAS["merchants"]
    return pa.table(
        [
            pa.array(np.arange(1, config.merchants + 1, dtype=np.int64)),
            pa.array(np.array(_CAT_NAMES, dtype=object)[model["category"]], pa.string()),
            pa.array(model["onboarded"], schema.field("onboarded_ts").type),
        ],
        schema=schema,
    )


# -------------------------------------------------------------------------- simulation
def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _draw_block(config: DataConfig, block: int, n: int, a: int) -> dict[str, np.ndarray]:
    """All the randomness of one block: ``n`` applicants taking ``a`` loans in total."""
    rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(1, block)))
    merchants = _merchant_model(config)
    start = _us(config.start)
    span_s = (_us(config.end) - start) // _US
    # applicants
    risk = rng.standard_normal(n)
    channel = rng.choice(len(CHANNELS), size=n, p=_CHANNEL_P)
    signup_s = (rng.random(n) * span_s).astype(np.int64)
    scale = np.exp(0.5 * rng.standard_normal(n))  # the applicant's typical order, relative to the category's
    activity = rng.gamma(1.0, size=n)  # loans per applicant: 1 + a share of the rest, overdispersed
    loans = 1 + rng.multinomial(a - n, activity / activity.sum())
    active_s = ((30 + rng.exponential(300.0, n)) * 86_400).astype(np.int64)
    first_s = np.minimum(signup_s + (rng.exponential(2.0, n) * 86_400).astype(np.int64), span_s - 1)
    # loans: the first soon after signup, the rest spread over the applicant's active period
    owner = np.repeat(np.arange(n), loans)
    first = np.r_[True, owner[1:] != owner[:-1]]
    u = np.where(first, 0.0, rng.random(a))
    window = np.minimum(active_s, span_s - 1 - first_s)[owner]
    ts = start + (first_s[owner] + (u * window).astype(np.int64)) * _US
    ts = ts[np.lexsort((ts, owner))]
    # merchant: by popularity among those already onboarded, often the previous loan's again
    open_ = np.searchsorted(merchants["onboarded"], ts, side="right")
    cw = merchants["cum_weight"]
    pick = np.minimum(np.searchsorted(cw, rng.random(a) * cw[open_ - 1], side="right"), open_ - 1)
    repeat = (rng.random(a) < 0.35) & ~first
    merchant = pick[np.maximum.accumulate(np.where(repeat, 0, np.arange(a)))]
    category = merchants["category"][merchant]
    deviation = 0.6 * rng.standard_normal(a)  # log(amount / the applicant's typical amount)
    amount = np.maximum(np.round(_CAT_MEDIAN[category] * scale[owner] * np.exp(deviation), 2), 5.0)
    log_amount, u_term = np.log(amount), rng.random(a)
    p4 = _sigmoid(-2.0 * (log_amount - np.log(250.0)))
    p12 = (1 - p4) * _sigmoid(2.0 * (log_amount - np.log(900.0)))
    term = np.where(u_term < p4, 4, np.where(u_term < p4 + p12, 12, 6))
    noise = rng.random((int(term.sum()), 3))
    return {
        "risk": risk, "channel": channel, "signup": start + signup_s * _US,
        "owner": owner, "ts": ts, "merchant": merchant, "amount": amount, "deviation": deviation,
        "term": term, "noise": noise,
    }  # fmt: skip


def _simulate(
    score: np.ndarray, owner: np.ndarray, due: np.ndarray, noise: np.ndarray, n_applicants: int
) -> np.ndarray:
    """Outcome tier (0 on time, 1 late, 2 missed, 3 severe) of each installment, walking each
    applicant's installments in due order so that recent delinquency raises the next risk."""
    tier = np.empty(len(score), dtype=np.int64)
    if not len(score):
        return tier
    order = np.lexsort((due, owner))
    sorted_owner = owner[order]
    starts = np.flatnonzero(np.r_[True, sorted_owner[1:] != sorted_owner[:-1]])
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    by_rank = order[np.argsort(rank, kind="stable")]
    bounds = np.r_[0, np.cumsum(np.bincount(rank))]
    state = np.zeros(n_applicants)
    last_due = np.zeros(n_applicants, dtype=np.int64)
    logistic = np.log(noise) - np.log1p(-noise)
    for r in range(len(bounds) - 1):
        idx = by_rank[bounds[r] : bounds[r + 1]]
        who = owner[idx]
        recent = state[who] * np.exp(-(due[idx] - last_due[who]) / (_STATE_DECAY_DAYS * _DAY)) if r else 0.0
        latent = score[idx] + _GAMMA * recent + logistic[idx]
        t = (latent >= 0).astype(np.int64) + (latent >= _T_MISSED) + (latent >= _T_SEVERE)
        tier[idx] = t
        state[who] = np.maximum(recent, _STATE_BUMP[t])
        last_due[who] = due[idx]
    return tier


def generate_shard(config: DataConfig, shard: int) -> dict[str, pa.Table]:
    """Tables ``applicants``, ``applications``, ``installments``, ``repayment_events`` and
    ``outcomes`` for the applicants of ``shard`` (0 <= shard < ``shard_count(config)``).

    Pure: no Ray, no I/O. Shards partition the applicants (and so everything else); the
    concatenation of every shard is the data set, whatever the number of shards.

    Raises:
        ValueError: ``shard`` is out of range.
    """
    n_shards = shard_count(config)
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard {shard} out of range: this config has {n_shards} shards (0..{n_shards - 1})")
    app_off, appl_off = _blocks(config)
    n_blocks = len(app_off) - 1
    lo, hi = shard * n_blocks // n_shards, (shard + 1) * n_blocks // n_shards
    parts = [
        _draw_block(config, b, int(appl_off[b + 1] - appl_off[b]), int(app_off[b + 1] - app_off[b]))
        for b in range(lo, hi)
    ]
    local = np.concatenate([[0], np.cumsum([len(p["risk"]) for p in parts])])
    cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    cat["owner"] = np.concatenate([p["owner"] + local[i] for i, p in enumerate(parts)])
    return _tables(config, cat, first_applicant=int(appl_off[lo]) + 1, first_application=int(app_off[lo]) + 1)


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
    kinds = [(np.arange(n_loans), zeros, 0, app_ts, app_ts, zeros)]
    kinds.append((loan[~unpaid], no[~unpaid], 1, paid[~unpaid], paid[~unpaid], dpd[~unpaid]))
    kinds.append((loan[missed], no[missed], 2, due[missed], due[missed] + grace, np.full(missed.sum(), grace // _DAY)))
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
    score = (
        _MU
        + _B_APPLICANT * d["risk"][owner]
        + _B_MERCHANT * merchants["risk"][d["merchant"]]
        + _B_AMOUNT * d["deviation"]
        + _B_LONG_PLAN * (term > 4)
        + _CHANNEL_RISK[d["channel"]][owner]
    )
    noise = d["noise"]
    tier = _simulate(score[loan], owner[loan], due, noise[:, 0], len(applicant_id))
    u, v = noise[:, 1], noise[:, 2]
    wait = -np.log1p(-u)  # a unit exponential
    delay = np.choose(
        tier,
        [
            np.where(v < 0.6, 0.0, -u * 7 * _DAY),  # on time: at the due time (autopay) or up to a week early
            _US + u * (grace - 2 * _US),  # late, inside the grace period
            grace + np.minimum(wait * 14 * _DAY, (DEFAULT_DPD * _DAY - grace) - _US),  # missed, cured before 60 dpd
            DEFAULT_DPD * _DAY + wait * 45 * _DAY,  # severe: 60+ days late ...
        ],
    ).astype(np.int64)
    paid = due + delay
    unpaid = ((tier == 3) & (v < _NEVER_PAID)) | (paid > end)  # ... or never; nothing after `end` is known
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


# ------------------------------------------------------------------------------- Ray
def _write_shards(
    batch: dict[str, np.ndarray], *, config: DataConfig, filesystem: pafs.FileSystem, paths: dict[str, str]
) -> dict[str, np.ndarray]:
    import pyarrow.parquet as pq

    stats: dict[str, list] = {"shard": [], "seconds": [], **{t: [] for t in SHARD_TABLES}}
    for shard in batch["id"].tolist():
        started = time.perf_counter()
        for name, table in generate_shard(config, shard).items():
            # A retried task rewrites the same file name, so a retry cannot duplicate rows.
            pq.write_table(table, f"{paths[name]}/shard-{shard:05d}.parquet", filesystem=filesystem)
            stats[name].append(table.num_rows)
        stats["shard"].append(shard)
        stats["seconds"].append(time.perf_counter() - started)
    return {k: np.asarray(v) for k, v in stats.items()}


def generate(platform: Platform, config: DataConfig, *, prefix: str = "raw/underwriting") -> dict[str, DatasetVersion]:
    """Generate the data set with Ray Data and publish each table as a new dataset version.

        versions = generate(platform, DataConfig(applications=1_000_000))
        platform.datasets.read("raw/underwriting/repayment_events")

    Each of ``shard_count(config)`` Ray tasks generates one shard (memory is bounded by a
    shard, ~250k applications by default) and writes one Parquet file per table under that
    table's staging folder; then every table is committed, so readers never see part of a run.
    Works the same with the storage root on local disk or on S3. Each manifest's metadata holds
    ``data_config`` (the config as JSON), ``rows`` and ``shards``. Prints one summary line:
    rows per table, seconds, the fastest and slowest shard.

    Returns:
        ``{table: DatasetVersion}`` for every table in ``TABLES``, named ``f"{prefix}/{table}"``.
    """
    ray = platform.ray()
    started = time.perf_counter()
    n_shards = shard_count(config)
    meta = {"data_config": json.loads(config.model_dump_json()), "generator": __name__, "shards": n_shards}
    staged = {t: platform.datasets.begin(f"{prefix}/{t}") for t in SHARD_TABLES}
    for write in staged.values():
        platform.storage.arrow_fs.create_dir(write.path, recursive=True)
    # The pyarrow filesystem, not the Storage, travels to the tasks: it carries static
    # credentials from this process's environment, which the workers may not have.
    fn = functools.partial(
        _write_shards, config=config, filesystem=platform.storage.arrow_fs, paths={t: w.path for t, w in staged.items()}
    )
    stats = (
        ray.data.range(n_shards, override_num_blocks=n_shards)
        .map_batches(fn, batch_size=1, batch_format="numpy")
        .take_all()
    )
    if sorted(int(s["shard"]) for s in stats) != list(range(n_shards)):
        done = sorted(int(s["shard"]) for s in stats)
        raise RuntimeError(f"generation returned shards {done}, expected 0..{n_shards - 1}")
    rows = {t: sum(int(s[t]) for s in stats) for t in SHARD_TABLES}
    versions = {
        "merchants": platform.datasets.publish(
            f"{prefix}/merchants", generate_merchants(config), metadata={**meta, "rows": config.merchants}
        )
    }
    for table, write in staged.items():
        versions[table] = write.commit(metadata={**meta, "rows": rows[table]})
    elapsed = time.perf_counter() - started
    shard_s = [float(s["seconds"]) for s in stats]
    print(
        f"generated {config.applications:,} applications in {n_shards} shards in {elapsed:.1f}s "
        f"(a shard {min(shard_s):.1f}-{max(shard_s):.1f}s) under {platform.storage.uri(prefix)}: "
        + ", ".join(f"{t} {versions[t].rows:,}" for t in TABLES)
    )
    return {t: versions[t] for t in TABLES}
