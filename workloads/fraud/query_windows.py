"""The windows of a few applications being scored now, cut in NumPy: serving's fast path.

    history = History.of(applications, repayment_events)      # one applicant's events (columns)
    arrays = cut_windows([history, history], at_us, categories, amounts, max_events=16)
    arrays["event_type"].shape                                  # (2, 16)

:func:`workloads.fraud.windows.query_sequences` cuts the same windows with the training
kernel (Arrow tables, one shuffle-shaped sort of every row), which is right for millions of
rows and costs ~5 ms of fixed overhead for one request of a few dozen events. Here each
applicant's events are converted and sorted once, in the kernel's order; a query's history
is then a prefix of them (the events known strictly before its time, found by binary
search) and its window the last ``K`` of that prefix. Nothing else differs: the semantics are
those of the :mod:`workloads.fraud.windows` module doc, the numbers are computed by the same
NumPy operations in the same types, and ``tests/unit/test_fraud_query_windows.py`` checks the
arrays equal ``input_arrays(query_sequences(...))`` bit for bit on generated histories.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlplatform.errors import DataError
from workloads.fraud.windows import (
    APPLICATION,
    CATEGORIES,
    DELINQUENCY,
    LATE_PAYMENT,
    MISSED,
    PAYMENT,
)

__all__ = ["History", "category_ids", "cut_windows", "log_amounts"]

_DAY_US = 86_400 * 1_000_000
_OTHER = CATEGORIES.index("<other>")
_CATEGORY_ID = {name: i for i, name in enumerate(CATEGORIES)}
_REPAYMENT_TYPES = {"payment": PAYMENT, "missed": MISSED, "delinquency": DELINQUENCY}


def category_ids(names: Sequence[Any]) -> np.ndarray:
    """Category ids (int8) of merchant category names: an unlisted name or None is ``<other>``."""
    return np.fromiter((_CATEGORY_ID.get(n, _OTHER) if isinstance(n, str) else _OTHER for n in names), np.int8, len(names))


def log_amounts(amounts: Any) -> np.ndarray:
    """``log1p`` of amounts (negative ones as 0; None as NaN) as float32, as the kernel rounds them."""
    return np.log1p(np.maximum(np.array(amounts, dtype=np.float64), 0.0)).astype(np.float32)


def _nan_to_num(values: np.ndarray) -> np.ndarray:
    # np.nan_to_num costs ~10 µs of Python for a few values; most histories have nothing to replace
    return values if np.isfinite(values).all() else np.nan_to_num(values)


@dataclass(frozen=True)
class History:
    """One applicant's events as the windows read them, in the kernel's order: by known
    time, then event time, event type id, log amount; rows tied on all four keep their input
    order (applications first). Columns are typed as the kernel's timeline."""

    known_us: np.ndarray  # int64
    event_type: np.ndarray  # int8
    category: np.ndarray  # int8
    log_amount: np.ndarray  # float32
    days_past_due: np.ndarray  # float32

    @classmethod
    def of(cls, applications: Mapping[str, Any], repayment_events: Mapping[str, Any]) -> History:
        """One applicant's history from its columns (sequences or arrays, None for null).

        Args:
            applications: ``merchant_category``, ``amount``, ``application_ts`` (int64 µs,
                UTC; an application is known at this time).
            repayment_events: ``event_type``, ``event_ts``, ``known_ts`` (int64 µs, UTC),
                ``balance_delta``, ``is_late``, ``days_past_due``; ``origination`` rows are
                dropped, a ``payment`` with ``is_late == 1`` is a ``late_payment``.

        Raises:
            DataError: a repayment event type is not known to the sequences.
        """
        app_ts = np.asarray(applications["application_ts"], dtype=np.int64)
        kinds = np.asarray(repayment_events["event_type"], dtype=object)
        keep = kinds != "origination"
        if not keep.all():
            kinds = kinds[keep]
        type_id = np.fromiter((_REPAYMENT_TYPES.get(k, -1) for k in kinds), np.int8, len(kinds))
        if (type_id < 0).any():
            unknown = sorted({k for k in kinds if k not in _REPAYMENT_TYPES}, key=str)
            raise DataError(
                f"repayment_events holds event_type(s) {unknown} the sequences do not know; "
                f"known: {['origination', *_REPAYMENT_TYPES]}"
            )

        def rep(name: str, dtype: Any) -> np.ndarray:
            values = np.array(repayment_events[name], dtype=dtype)
            return values if keep.all() else values[keep]

        late = rep("is_late", np.float64) == 1
        type_id[(type_id == PAYMENT) & late] = LATE_PAYMENT
        # the same operations, in the same types, as windows.application_rows / repayment_rows
        paid = -_nan_to_num(rep("balance_delta", np.float64))
        is_payment = (type_id == PAYMENT) | (type_id == LATE_PAYMENT)
        rep_amount = np.where(is_payment, np.log1p(np.maximum(paid, 0.0)), 0.0).astype(np.float32)
        known = np.concatenate([app_ts, rep("known_ts", np.int64)])
        happened = np.concatenate([app_ts, rep("event_ts", np.int64)])
        types = np.concatenate([np.full(len(app_ts), APPLICATION, np.int8), type_id])
        amount = np.concatenate([log_amounts(applications["amount"]), rep_amount])
        order = np.lexsort((amount, types, happened, known))  # stable: full ties keep input order
        return cls(
            known_us=known[order],
            event_type=types[order],
            category=np.concatenate([category_ids(applications["merchant_category"]), np.zeros(len(type_id), np.int8)])[order],
            log_amount=amount[order],
            days_past_due=np.concatenate([
                np.zeros(len(app_ts), np.float32), _nan_to_num(rep("days_past_due", np.float64).astype(np.float32)),
            ])[order],  # fmt: skip
        )

    @classmethod
    def empty(cls) -> History:
        """An applicant without events (a first-time applicant)."""
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int8), np.zeros(0, np.int8), np.zeros(0, np.float32),
                   np.zeros(0, np.float32))  # fmt: skip

    def __len__(self) -> int:
        return len(self.known_us)


def cut_windows(
    histories: Sequence[History],
    at_us: np.ndarray,
    categories: Sequence[Any],
    amounts: Any,
    *,
    max_events: int,
) -> dict[str, np.ndarray]:
    """The model's input for queries ``i``: the window of ``histories[i]`` at ``at_us[i]``.

        arrays = cut_windows([History.of(apps, events)], np.array([t_us]), ["fashion"], [129.0], max_events=16)

    Query ``i``'s window holds the most recent ``K = max_events`` events of ``histories[i]``
    known strictly before ``at_us[i]`` (an event known at ``at_us[i]`` exactly is not in it),
    oldest first, right-aligned with padding (all zeros, ``mask`` False) on the left;
    ``days_before`` is ``(at - known) / 1 day``. Queries never see each other, and several
    queries may share one ``History``.

    Args:
        histories: one per query.
        at_us: the queries' times, int64 µs UTC.
        categories: the queries' merchant category names (unlisted or None: ``<other>``).
        amounts: the queries' amounts (``app_log_amount`` is ``log1p``; negative as 0).
        max_events: K.

    Returns:
        ``event_type``, ``category`` ``[B, K]`` int64; ``log_amount``, ``days_before``,
        ``days_past_due`` ``[B, K]`` float32; ``mask`` ``[B, K]`` bool; ``app_category``
        ``[B]`` int64; ``app_log_amount`` ``[B]`` float32: ``online.input_arrays`` of
        ``windows.query_sequences``'s rows, value for value.
    """
    k, n = max_events, len(histories)
    at = np.asarray(at_us, dtype=np.int64)
    # All histories end to end after one zero row, which padded slots read (then zero them).
    parts: dict[int, int] = {}
    used: list[History] = []
    start = np.empty(n, np.int64)
    end = np.empty(n, np.int64)
    offset = 1
    for i, history in enumerate(histories):
        first = parts.get(id(history))
        if first is None:
            first = parts[id(history)] = offset
            used.append(history)
            offset += len(history)
        start[i] = first
        end[i] = first + np.searchsorted(history.known_us, at[i], side="left")  # known < at: a prefix

    def joined(name: str, dtype: Any) -> np.ndarray:
        return np.concatenate([np.zeros(1, dtype), *(getattr(h, name) for h in used)])

    idx = end[:, None] - k + np.arange(k)[None, :]
    mask = idx >= start[:, None]
    safe = np.where(mask, idx, 0)
    known = joined("known_us", np.int64)
    return {
        "event_type": np.where(mask, joined("event_type", np.int8)[safe], 0).astype(np.int8).astype(np.int64),
        "category": np.where(mask, joined("category", np.int8)[safe], 0).astype(np.int8).astype(np.int64),
        "log_amount": np.where(mask, joined("log_amount", np.float32)[safe], 0).astype(np.float32),
        "days_before": np.where(mask, (at[:, None] - known[safe]) / _DAY_US, 0.0).astype(np.float32),
        "days_past_due": np.where(mask, joined("days_past_due", np.float32)[safe], 0).astype(np.float32),
        "mask": mask,
        "app_category": category_ids(list(categories)).astype(np.int64),
        "app_log_amount": log_amounts(amounts),
    }
