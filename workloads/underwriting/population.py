"""The hidden world the synthetic underwriting data comes from: merchants, applicants, their
loans, and when each installment is really paid. Nothing here is written as is;
``workloads.underwriting.tables`` turns it into what the lender knew.

Hidden drivers (never written): each applicant has a latent risk and each merchant a latent
risk; an installment's lateness rises with both, with the order amount relative to the
applicant's own typical amount, with longer plans, and with the applicant's recent
delinquency (persistence, decaying over ~90 days). Two signals a lender can see live raise the
risk of every installment of a loan as well:

- **loan stacking**: the applicant's other checkouts in the 24 hours before this one (riskier
  applicants stack more: a share of their loans follows the previous one within hours, at
  another merchant);
- **a fresh missed installment**: installments of the applicant declared missed (unpaid at
  due + grace) in the 7 days before the checkout.

Both are counted exactly as the real-time features see them at the checkout (an event known
by then, in the window before it), so a model can learn them. No protected attributes or
proxies exist.

All the randomness is drawn here, in a fixed order: the merchants from
``SeedSequence(seed, spawn_key=(0,))`` (``_merchant_model``), and each block of applications
from ``SeedSequence(seed, spawn_key=(1, block))`` (``_draw_block``). Everything after the draws
is arithmetic, so a block's rows do not depend on which shard computes them.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from workloads.underwriting.generate import DataConfig

__all__ = ["CATEGORIES", "CHANNELS", "KNOWN_AFTER_DECISION"]

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
_MU = -3.8
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
# Loan stacking: a loan follows the applicant's previous one after an exponential gap (mean
# _STACK_GAP_H hours) with probability _STACK_P * 2 * sigmoid(applicant risk), not after a repeat
# visit to the same merchant; each other checkout in the 24 hours before adds _B_STACK (at most
# _STACK_CAP of them count). Each installment declared missed in the 7 days before the checkout
# adds _B_FRESH_MISS (at most _FRESH_MISS_CAP count).
_STACK_P = 0.08
_STACK_GAP_H = 3.0
_STACK_WINDOW = 24 * 3_600 * 1_000_000
_B_STACK = 0.5
_STACK_CAP = 3
_FRESH_MISS_WINDOW = 7 * 86_400 * 1_000_000
_B_FRESH_MISS = 1.1
_FRESH_MISS_CAP = 2
_MISS_MEMORY = 8  # missed installments remembered per applicant (the window holds fewer)
#: A checkout's own event reaches the bus this long after the checkout (after the decision),
#: so neither the decision nor a training row at the checkout's time sees it.
KNOWN_AFTER_DECISION = timedelta(seconds=1)
_KNOWN_US = KNOWN_AFTER_DECISION // timedelta(microseconds=1)

_US = 1_000_000
_DAY = 86_400 * _US
_CAT_NAMES = tuple(CATEGORIES)
_CAT_MEDIAN = np.array([v[0] for v in CATEGORIES.values()])
_CAT_RISK = np.array([v[1] for v in CATEGORIES.values()])
_CAT_SHARE = np.array([v[2] for v in CATEGORIES.values()]) / sum(v[2] for v in CATEGORIES.values())


def _us(value: datetime) -> int:
    return (value - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


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
    ts, stacked_on = _stack(ts, owner, first, risk, rng, latest=start + (span_s - 1) * _US)
    # merchant: by popularity among those already onboarded, often the previous loan's again
    # (but a stacked loan is taken elsewhere)
    open_ = np.searchsorted(merchants["onboarded"], ts, side="right")
    cw = merchants["cum_weight"]
    pick = np.minimum(np.searchsorted(cw, rng.random(a) * cw[open_ - 1], side="right"), open_ - 1)
    repeat = (rng.random(a) < 0.35) & ~first & ~stacked_on
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
        "term": term, "noise": noise, "stacked": _recent_checkouts(ts, owner),
    }  # fmt: skip


def _stack(
    ts: np.ndarray, owner: np.ndarray, first: np.ndarray, risk: np.ndarray, rng: np.random.Generator, *, latest: int
) -> tuple[np.ndarray, np.ndarray]:
    """Move some loans to within hours of the applicant's previous one (loan stacking).

    ``ts`` is sorted by (owner, time) and ``first`` marks each owner's first loan. Returns the
    new times, again sorted within each owner (none after ``latest``, the last checkout time
    whose event is known by the data's end), and which loans were moved."""
    a = len(ts)
    moved = (rng.random(a) < _STACK_P * 2 * _sigmoid(risk)[owner]) & ~first
    gap = np.where(moved, (rng.exponential(_STACK_GAP_H * 3_600, a) * _US).astype(np.int64), 0)
    # a run of moved loans follows the last unmoved one, each after its own gap
    anchor = np.maximum.accumulate(np.where(moved, 0, np.arange(a)))
    waited = np.cumsum(gap)
    new = np.minimum(ts[anchor] + waited - waited[anchor], latest)
    order = np.lexsort((new, owner))
    return new[order], moved[order]


def _recent_checkouts(ts: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """Per loan (sorted by owner, time): the owner's other checkouts a real-time feature sees
    at this one's time ``t``: checkout time in ``(t - 24h, t]`` and known (1 s later) by ``t``."""
    # owners are contiguous: offset each owner's times so one sorted array serves every owner
    spread = (ts.max() - ts.min() + 2 * _STACK_WINDOW) if len(ts) else 0
    key = (owner - owner.min() if len(owner) else owner) * spread + ts
    known = np.searchsorted(key, key - _KNOWN_US, side="right")  # known by t
    since = np.searchsorted(key, key - _STACK_WINDOW, side="right")  # after t - 24h
    return np.maximum(known - since, 0)


def _simulate(
    score: np.ndarray,
    owner: np.ndarray,
    due: np.ndarray,
    noise: np.ndarray,
    n_applicants: int,
    *,
    loan: np.ndarray,
    checkout: np.ndarray,
    grace: int,
) -> np.ndarray:
    """Outcome tier (0 on time, 1 late, 2 missed, 3 severe) of each installment, walking each
    applicant's installments in due order so that recent delinquency raises the next risk.

    ``loan`` is each installment's loan and ``checkout`` each loan's time: a loan's installments
    also get ``_B_FRESH_MISS`` per installment of the applicant declared missed (tier >= 2, at
    due + ``grace``) in the 7 days before its checkout. Those were due before the checkout, so
    before any of the loan's installments: they are decided by the time the loan's first
    installment is, where the count is taken once for the whole loan."""
    tier = np.empty(len(score), dtype=np.int64)
    if not len(score):
        return tier
    fresh = np.full(len(checkout), -1, dtype=np.int64)  # per loan, once its first installment comes
    missed_at = np.full((n_applicants, _MISS_MEMORY), np.iinfo(np.int64).min // 2)  # a ring per applicant
    slot = np.zeros(n_applicants, dtype=np.int64)
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
        loans = loan[idx]
        new = fresh[loans] < 0
        at = checkout[loans[new]][:, None]
        seen = missed_at[who[new]]
        fresh[loans[new]] = ((seen > at - _FRESH_MISS_WINDOW) & (seen <= at)).sum(axis=1)
        latent = score[idx] + _GAMMA * recent + _B_FRESH_MISS * np.minimum(fresh[loans], _FRESH_MISS_CAP) + logistic[idx]
        t = (latent >= 0).astype(np.int64) + (latent >= _T_MISSED) + (latent >= _T_SEVERE)
        tier[idx] = t
        state[who] = np.maximum(recent, _STATE_BUMP[t])
        last_due[who] = due[idx]
        hit = t >= 2
        missed_at[who[hit], slot[who[hit]] % _MISS_MEMORY] = due[idx[hit]] + grace
        slot[who[hit]] += 1
    return tier


def _repayment_delays(
    config: DataConfig, d: dict[str, np.ndarray], loan: np.ndarray, due: np.ndarray, *, grace: int, default_dpd: int
) -> tuple[np.ndarray, np.ndarray]:
    """When each installment is really paid: ``(delay, never)``, the microseconds from its due
    time to the payment (negative = early) and whether it is never paid at all.

    ``d`` is a shard's draws (``_draw_block``'s, concatenated), ``loan`` and ``due`` each ledger
    row's loan (an index into ``d``'s loans) and due time. The tiers are placed around the
    lender's definitions, passed in: ``grace`` (``GRACE`` in microseconds) and ``default_dpd``
    (``DEFAULT_DPD``), so a "late" payment lands inside the grace period and a "missed" one is
    cured before it would count as a default.
    """
    merchants = _merchant_model(config)
    owner, term = d["owner"], d["term"]
    score = (
        _MU
        + _B_APPLICANT * d["risk"][owner]
        + _B_MERCHANT * merchants["risk"][d["merchant"]]
        + _B_AMOUNT * d["deviation"]
        + _B_LONG_PLAN * (term > 4)
        + _CHANNEL_RISK[d["channel"]][owner]
        + _B_STACK * np.minimum(d["stacked"], _STACK_CAP)
    )
    noise = d["noise"]
    tier = _simulate(
        score[loan], owner[loan], due, noise[:, 0], len(d["risk"]), loan=loan, checkout=d["ts"], grace=grace
    )
    u, v = noise[:, 1], noise[:, 2]
    wait = -np.log1p(-u)  # a unit exponential
    delay = np.choose(
        tier,
        [
            np.where(v < 0.6, 0.0, -u * 7 * _DAY),  # on time: at the due time (autopay) or up to a week early
            _US + u * (grace - 2 * _US),  # late, inside the grace period
            grace + np.minimum(wait * 14 * _DAY, (default_dpd * _DAY - grace) - _US),  # missed, cured before 60 dpd
            default_dpd * _DAY + wait * 45 * _DAY,  # severe: 60+ days late ...
        ],
    ).astype(np.int64)
    return delay, (tier == 3) & (v < _NEVER_PAID)  # ... or never
