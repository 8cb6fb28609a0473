"""Point-in-time windows of behaviour events: the pure Arrow/NumPy kernel that cuts, for
each labelled application, the applicant's most recent events before it into a fixed-length
sequence. No Ray and no torch here: :mod:`workloads.fraud.sequences` runs these functions on
Ray Data and publishes the result.

    table = sequences_from_tables(applications, outcomes, repayment_events, max_events=32, cutoff=end)
    rows = application_rows(applications, buckets=8)   # one batch's rows of the shared timeline
    table = bucket_sequences(timeline, max_events=32, boundaries=split_boundaries(first_us, last_us, 0.7, 0.15))

Semantics, exactly:

- The **events** of an applicant are their checkout applications (known at their
  ``application_ts``) and their repayment events other than ``origination`` (an origination
  is the application itself), each known at its ``known_ts``.
- The **history** of an application is the applicant's events known *strictly before* the
  application: ``known_ts < application_ts``. An event known at the same microsecond as the
  application is not in it, nor is the application itself.
- The sequence holds the most recent ``K = max_events`` of them in time order, oldest first,
  **right-aligned**: position ``K - 1`` is the most recent event and padding fills the left.
  Ties in ``known_ts`` are ordered by ``event_ts``, then event type id, then amount.
- A row exists for each application whose label is known by the cutoff
  (``label_ts <= cutoff``); its target is the application's ``default``.
- ``split`` is out of time: the labelled applications' ``[first, last]`` application time is
  cut into ``train`` / ``validation`` / ``test`` shares, each ``[start, end)`` (the last one
  includes the latest application).

Columns (``K`` = ``max_events``; list columns are ``fixed_size_list<K>``; ids index
``EVENT_TYPES`` / ``CATEGORIES``, 0 = padding):

=====================  ==============  ========================================================
column                 type            meaning
=====================  ==============  ========================================================
application_id         string
applicant_id           int64
application_ts         timestamp[us]   UTC
default                int8            the target, 1 = default
split                  string          train / validation / test
app_category           int8            merchant category id of this application
app_log_amount         float32         ``log1p(amount)`` of this application
event_type             list<int8>      event type id per position
category               list<int8>      merchant category id (applications; 0 otherwise)
log_amount             list<float32>   ``log1p`` of the loan amount (applications) or the
                                       installment paid (payments); 0 otherwise
days_before            list<float32>   ``(application_ts - known_ts)`` in days, > 0
days_past_due          list<float32>   days past due the event records (0 for applications)
mask                   list<bool>      True where a real event sits
=====================  ==============  ========================================================

Every input row (application, label, repayment event) becomes a row of one timeline schema
carrying a hash bucket of its ``applicant_id`` (:func:`application_rows`, :func:`label_rows`,
:func:`repayment_rows`); :func:`bucket_sequences` takes rows of whole applicants, sorts them
and cuts every application's window with array operations. :func:`sequences_from_tables`
runs the same functions on in-memory tables (used by the unit tests); :func:`query_sequences`
runs them for applications being scored now (no label, each with its own history: serving's
path, see :mod:`workloads.fraud.online`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mlplatform.errors import DataError
from mlplatform.timestamps import to_utc
from workloads.underwriting.generate import CATEGORIES as _GENERATED_CATEGORIES

__all__ = [
    "APPLICATION",
    "CATEGORIES",
    "CURRENT_APPLICATION",
    "DELINQUENCY",
    "EVENT_TYPES",
    "LATE_PAYMENT",
    "MISSED",
    "PAD",
    "PAYMENT",
    "SEQUENCE_COLUMNS",
    "SPLITS",
    "application_rows",
    "bucket_sequences",
    "label_rows",
    "output_schema",
    "query_sequences",
    "repayment_rows",
    "sequences_from_tables",
    "split_boundaries",
    "utc_micros",
]

SPLITS = ("train", "validation", "test")

#: Event type ids. ``current_application`` is never stored: the model adds it as the token
#: of the application being scored.
EVENT_TYPES = ("<pad>", "application", "payment", "late_payment", "missed", "delinquency", "current_application")
PAD, APPLICATION, PAYMENT, LATE_PAYMENT, MISSED, DELINQUENCY, CURRENT_APPLICATION = range(len(EVENT_TYPES))
#: Merchant category ids: 0 = none (padding, repayment events), 1 = a category not listed.
CATEGORIES = ("<none>", "<other>", *_GENERATED_CATEGORIES)
SEQUENCE_COLUMNS = ("event_type", "category", "log_amount", "days_before", "days_past_due", "mask")

_DAY_US = 86_400 * 1_000_000
_CATEGORY_ID = {name: i for i, name in enumerate(CATEGORIES)}
# repayment_events.event_type -> id; origination rows are the applications themselves
_REPAYMENT_TYPES = {"payment": PAYMENT, "missed": MISSED, "delinquency": DELINQUENCY}
_SOURCE_EVENT, _SOURCE_LABEL = 0, 1

# One schema for every input row, so applications, outcomes and repayment events can travel
# through one shuffle. Label rows use (application_id, label, label_ts); event rows the rest.
_TIMELINE = pa.schema([
    ("bucket", pa.int64()), ("source", pa.int8()), ("applicant_id", pa.int64()),
    ("application_id", pa.string()), ("known_us", pa.int64()), ("event_us", pa.int64()),
    ("event_type", pa.int8()), ("category", pa.int8()), ("log_amount", pa.float32()),
    ("days_past_due", pa.float32()), ("label", pa.int8()),
])  # fmt: skip


def output_schema(max_events: int) -> pa.Schema:
    """The schema of the published sequences for ``K = max_events``."""
    k = max_events
    return pa.schema([
        ("application_id", pa.string()), ("applicant_id", pa.int64()),
        ("application_ts", pa.timestamp("us", tz="UTC")), ("default", pa.int8()), ("split", pa.string()),
        ("app_category", pa.int8()), ("app_log_amount", pa.float32()),
        ("event_type", pa.list_(pa.int8(), k)), ("category", pa.list_(pa.int8(), k)),
        ("log_amount", pa.list_(pa.float32(), k)), ("days_before", pa.list_(pa.float32(), k)),
        ("days_past_due", pa.list_(pa.float32(), k)), ("mask", pa.list_(pa.bool_(), k)),
    ])  # fmt: skip


# ------------------------------------------------------------------------- per-batch steps
def utc_micros(column: Any) -> np.ndarray:
    """Timestamps (any unit or zone; naive = UTC) as int64 microseconds since the epoch, UTC."""
    return to_utc(column).cast(pa.int64()).to_numpy(zero_copy_only=False)


def _bucket(applicant_id: np.ndarray, buckets: int) -> np.ndarray:
    # splitmix64 finaliser: consecutive ids spread evenly over the buckets
    with np.errstate(over="ignore"):
        h = applicant_id.astype(np.uint64)
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return (h % np.uint64(buckets)).astype(np.int64)


def _timeline(columns: dict[str, Any], buckets: int) -> pa.Table:
    n = len(columns["applicant_id"])
    out = []
    for field in _TIMELINE:
        value = columns.get(field.name)
        if field.name == "bucket":
            value = _bucket(np.asarray(columns["applicant_id"], dtype=np.int64), buckets)
        if value is None:
            out.append(pa.nulls(n, field.type))
        elif isinstance(value, (pa.Array, pa.ChunkedArray)):
            value = value.combine_chunks() if isinstance(value, pa.ChunkedArray) else value
            out.append(value.cast(field.type))
        else:
            out.append(pa.array(value, field.type))
    return pa.Table.from_arrays(out, schema=_TIMELINE)


def _category_ids(names: Any) -> np.ndarray:
    values = pa.array(names) if not isinstance(names, (pa.Array, pa.ChunkedArray)) else names
    ids = pc.index_in(values, value_set=pa.array(CATEGORIES)).fill_null(1)  # unknown -> <other>
    return ids.to_numpy(zero_copy_only=False).astype(np.int8)


def application_rows(batch: pa.Table, *, buckets: int) -> pa.Table:
    """Every application as an event of its applicant, known at its ``application_ts``."""
    ts = utc_micros(batch.column("application_ts"))
    amount = batch.column("amount").to_numpy(zero_copy_only=False).astype(np.float64)
    return _timeline(
        {
            "source": np.full(len(ts), _SOURCE_EVENT, np.int8),
            "applicant_id": batch.column("applicant_id"),
            "application_id": batch.column("application_id"),
            "known_us": ts,
            "event_us": ts,
            "event_type": np.full(len(ts), APPLICATION, np.int8),
            "category": _category_ids(batch.column("merchant_category")),
            "log_amount": np.log1p(np.maximum(amount, 0.0)).astype(np.float32),
            "days_past_due": np.zeros(len(ts), np.float32),
        },
        buckets,
    )


def label_rows(batch: pa.Table, *, cutoff_us: int, buckets: int) -> pa.Table:
    """The label of each application whose ``label_ts <= cutoff``; the others are dropped."""
    label_us = utc_micros(batch.column("label_ts"))
    keep = label_us <= cutoff_us
    batch = batch.filter(pa.array(keep))
    return _timeline(
        {
            "source": np.full(batch.num_rows, _SOURCE_LABEL, np.int8),
            "applicant_id": batch.column("applicant_id"),
            "application_id": batch.column("application_id"),
            "label": batch.column("default").cast(pa.int8()),
        },
        buckets,
    )


def repayment_rows(batch: pa.Table, *, buckets: int) -> pa.Table:
    """Repayment events (not originations), known at ``known_ts``; a payment made after its
    due time (``is_late``) is a ``late_payment``."""
    kinds = batch.column("event_type").to_numpy(zero_copy_only=False)
    keep = kinds != "origination"
    unknown = set(np.unique(kinds[keep]).tolist()) - set(_REPAYMENT_TYPES)
    if unknown:
        raise DataError(
            f"repayment_events holds event_type(s) {sorted(unknown)} the sequences do not know; "
            f"known: {['origination', *_REPAYMENT_TYPES]}"
        )
    batch = batch.filter(pa.array(keep))
    kinds = kinds[keep]
    type_id = np.zeros(len(kinds), np.int8)
    for name, i in _REPAYMENT_TYPES.items():
        type_id[kinds == name] = i
    late = batch.column("is_late").to_numpy(zero_copy_only=False) == 1
    type_id[(type_id == PAYMENT) & late] = LATE_PAYMENT
    paid = -np.nan_to_num(batch.column("balance_delta").to_numpy(zero_copy_only=False).astype(np.float64))
    is_payment = (type_id == PAYMENT) | (type_id == LATE_PAYMENT)
    return _timeline(
        {
            "source": np.full(batch.num_rows, _SOURCE_EVENT, np.int8),
            "applicant_id": batch.column("applicant_id"),
            "known_us": utc_micros(batch.column("known_ts")),
            "event_us": utc_micros(batch.column("event_ts")),
            "event_type": type_id,
            "category": np.zeros(batch.num_rows, np.int8),
            "log_amount": np.where(is_payment, np.log1p(np.maximum(paid, 0.0)), 0.0).astype(np.float32),
            "days_past_due": np.nan_to_num(
                batch.column("days_past_due").to_numpy(zero_copy_only=False).astype(np.float32)
            ),
        },
        buckets,
    )


def _assign_split(ts_us: np.ndarray, boundaries: dict[str, tuple[int, int]]) -> np.ndarray:
    out = np.full(len(ts_us), None, dtype=object)
    for name, (lo, hi) in boundaries.items():
        out[(ts_us >= lo) & (ts_us < hi)] = name
    return out


def bucket_sequences(timeline: pa.Table, *, max_events: int, boundaries: dict[str, tuple[int, int]]) -> pa.Table:
    """The sequences of every labelled application in ``timeline`` (rows of whole applicants).

    The kernel of the build: it needs every row of an applicant and no other bucket. Rows
    are returned in (applicant_id, application_ts) order; an application outside every split
    boundary is dropped.

    Args:
        timeline: rows made by ``application_rows``, ``label_rows`` and ``repayment_rows``.
        max_events: K.
        boundaries: ``{split: (start_us, end_us)}``, each ``[start, end)``.
    """
    k = max_events
    source = timeline.column("source").to_numpy(zero_copy_only=False)
    events = timeline.filter(pa.array(source == _SOURCE_EVENT))
    labels = timeline.filter(pa.array(source == _SOURCE_LABEL)).select(["application_id", "label"])
    # The applications with a known label are the queries.
    apps = events.filter(pc.equal(events.column("event_type"), APPLICATION)).drop_columns(["label"])
    queries = apps.join(labels, "application_id", join_type="inner")
    if queries.num_rows == 0:
        return output_schema(k).empty_table()

    def col(table: pa.Table, name: str, dtype: Any = None) -> np.ndarray:
        values = table.column(name).to_numpy(zero_copy_only=False)
        return values if dtype is None else values.astype(dtype)

    # Events in (applicant, known, event time, type, amount) order: a total, deterministic order.
    e_app, e_known, e_time = col(events, "applicant_id"), col(events, "known_us"), col(events, "event_us")
    e_type, e_amount = col(events, "event_type"), col(events, "log_amount")
    order = np.lexsort((e_amount, e_type, e_time, e_known, e_app))
    e_app, e_known = e_app[order], e_known[order]
    e_type, e_amount = e_type[order], e_amount[order]
    e_cat, e_dpd = col(events, "category")[order], col(events, "days_past_due")[order]

    q_order = np.lexsort((col(queries, "known_us"), col(queries, "applicant_id")))
    queries = queries.take(pa.array(q_order))
    q_app, q_ts = col(queries, "applicant_id"), col(queries, "known_us")

    # How many events precede each query in (applicant, known_ts) order, counting only events
    # known strictly earlier: sort queries and events together with a query first among equal
    # (applicant, time), then count the events before it.
    n_e, n_q = len(e_app), len(q_app)
    is_event = np.r_[np.ones(n_e, np.int8), np.zeros(n_q, np.int8)]
    merged = np.lexsort((is_event, np.r_[e_known, q_ts], np.r_[e_app, q_app]))
    events_before = np.cumsum(is_event[merged]) - is_event[merged]
    end = np.empty(n_q, np.int64)
    end[merged[merged >= n_e] - n_e] = events_before[merged >= n_e]
    first = np.searchsorted(e_app, q_app, side="left")  # the applicant's first event

    # The window: K slots ending just before `end`, right-aligned; slots before `first` are padding.
    idx = end[:, None] - k + np.arange(k)[None, :]
    mask = idx >= first[:, None]
    safe = np.where(mask, idx, 0)

    def window(values: np.ndarray, dtype: Any) -> pa.Array:
        cut = np.where(mask, values[safe], 0).astype(dtype)
        return pa.FixedSizeListArray.from_arrays(pa.array(cut.ravel()), k)

    days_before = np.where(mask, (q_ts[:, None] - e_known[safe]) / _DAY_US, 0.0)
    split = _assign_split(q_ts, boundaries)
    out = pa.Table.from_arrays(
        [
            queries.column("application_id"),
            pa.array(q_app, pa.int64()),
            pa.array(q_ts, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            queries.column("label").cast(pa.int8()),
            pa.array(split, pa.string()),
            queries.column("category").cast(pa.int8()),
            queries.column("log_amount").cast(pa.float32()),
            window(e_type, np.int8),
            window(e_cat, np.int8),
            window(e_amount, np.float32),
            pa.FixedSizeListArray.from_arrays(pa.array(days_before.astype(np.float32).ravel()), k),
            window(e_dpd, np.float32),
            pa.FixedSizeListArray.from_arrays(pa.array(mask.ravel()), k),
        ],
        schema=output_schema(k),
    )
    return out.filter(pc.is_valid(out.column("split")))


def split_boundaries(first_us: int, last_us: int, train: float, validation: float) -> dict[str, tuple[int, int]]:
    """Out-of-time ``[start, end)`` microsecond boundaries over ``[first_us, last_us]``."""
    span = last_us - first_us
    train_end = first_us + int(span * train)
    valid_end = first_us + int(span * (train + validation))
    return {"train": (first_us, train_end), "validation": (train_end, valid_end), "test": (valid_end, last_us + 1)}


# -------------------------------------------------------------------------------- no Ray
def sequences_from_tables(
    applications: pa.Table,
    outcomes: pa.Table,
    repayment_events: pa.Table,
    *,
    max_events: int = 32,
    cutoff: datetime,
    train: float = 0.70,
    validation: float = 0.15,
) -> pa.Table:
    """The sequences of in-memory raw tables (no Ray): what ``build_sequences`` publishes,
    in (applicant_id, application_ts) order. For tests and small data."""
    cutoff_us = int(utc_micros(pa.array([cutoff]))[0])
    labels = label_rows(outcomes, cutoff_us=cutoff_us, buckets=1)
    timeline = pa.concat_tables([
        application_rows(applications, buckets=1), labels, repayment_rows(repayment_events, buckets=1)
    ])  # fmt: skip
    labelled = pc.is_in(applications.column("application_id"), value_set=labels.column("application_id"))
    ts = utc_micros(applications.filter(labelled).column("application_ts"))
    if len(ts) == 0:
        return output_schema(max_events).empty_table()
    boundaries = split_boundaries(int(ts.min()), int(ts.max()), train, validation)
    return bucket_sequences(timeline, max_events=max_events, boundaries=boundaries)


def query_sequences(
    applications: pa.Table, repayment_events: pa.Table, queries: pa.Table, *, max_events: int
) -> pa.Table:
    """The window of each query application, cut by the same functions and with the same
    semantics as a labelled application's in training, but without a label: what serving
    scores.

        table = query_sequences(history_apps, history_events, queries, max_events=16)   # row i: queries' row i

    Each query sees the events of ``applications`` and ``repayment_events`` with its
    ``applicant_id`` that were known strictly before its ``application_ts`` (the module doc's
    history), never another query: two queries of one applicant each see only the history
    tables. An application in the history at the query's own time (the query itself, already
    logged) is not before it, so it is left out as in training. An applicant without rows in
    the history tables gets an all-padding window; a category not in ``CATEGORIES`` (or null)
    is ``<other>``.

    Args:
        applications: past applications: ``applicant_id``, ``merchant_category``, ``amount``,
            ``application_ts`` (other columns are ignored).
        repayment_events: past repayment events, as the raw table: ``applicant_id``,
            ``event_type``, ``event_ts``, ``known_ts``, ``balance_delta``, ``is_late``,
            ``days_past_due`` (``origination`` rows are dropped, as in training).
        queries: the applications to cut a window for: ``applicant_id``,
            ``merchant_category``, ``amount``, ``application_ts``.
        max_events: K.

    Returns:
        One row per query, in the queries' order: ``applicant_id``, ``application_ts``,
        ``app_category``, ``app_log_amount`` and the sequence columns, typed as in
        ``output_schema(max_events)``.

    Raises:
        DataError: a repayment event type is unknown.
    """
    n = queries.num_rows
    keep = ["applicant_id", "application_ts", "app_category", "app_log_amount", *SEQUENCE_COLUMNS]
    schema = pa.schema([output_schema(max_events).field(c) for c in keep])
    if n == 0:
        return schema.empty_table()
    # Query i becomes applicant i of the timeline, with a copy of its applicant's history: so
    # no query sees another, and the kernel's output order (applicant, time) is query order.
    ids = pa.array(range(n), pa.int64())
    owner = queries.column("applicant_id").to_numpy(zero_copy_only=False).astype(np.int64)
    by_owner = np.argsort(owner, kind="stable")
    sorted_owner = owner[by_owner]

    def rekeyed(history: pa.Table, columns: list[str]) -> pa.Table:
        applicant = history.column("applicant_id").to_numpy(zero_copy_only=False).astype(np.int64)
        lo = np.searchsorted(sorted_owner, applicant, side="left")
        copies = np.searchsorted(sorted_owner, applicant, side="right") - lo
        rows = np.repeat(np.arange(len(applicant)), copies)  # each row once per query of its applicant
        nth = np.arange(len(rows)) - np.repeat(np.cumsum(copies) - copies, copies)
        query = by_owner[np.repeat(lo, copies) + nth]
        return history.select(columns).take(pa.array(rows)).append_column("applicant_id", pa.array(query, pa.int64()))

    app_columns = ["merchant_category", "amount", "application_ts"]
    past = rekeyed(applications, app_columns)
    past = past.append_column("application_id", pa.nulls(past.num_rows, pa.string()))  # never a query
    current = pa.table({
        "application_id": pc.cast(ids, pa.string()), "applicant_id": ids,
        **{c: queries.column(c) for c in app_columns},
    })  # fmt: skip
    events = rekeyed(
        repayment_events, ["event_type", "event_ts", "known_ts", "balance_delta", "is_late", "days_past_due"]
    )
    labels = _timeline(
        {
            "source": np.full(n, _SOURCE_LABEL, np.int8),
            "applicant_id": ids,
            "application_id": pc.cast(ids, pa.string()),
            "label": np.zeros(n, np.int8),  # a placeholder: it marks the query, nothing reads it
        },
        1,
    )
    timeline = pa.concat_tables([
        application_rows(past, buckets=1), application_rows(current, buckets=1), labels,
        repayment_rows(events, buckets=1),
    ])  # fmt: skip
    ts = utc_micros(queries.column("application_ts"))
    table = bucket_sequences(timeline, max_events=max_events, boundaries={"query": (int(ts.min()), int(ts.max()) + 1)})
    if table.column("applicant_id").to_pylist() != list(range(n)):  # one row per query, in order
        raise AssertionError("query_sequences lost or reordered a query")
    table = table.set_column(table.schema.get_field_index("applicant_id"), "applicant_id", pa.array(owner, pa.int64()))
    return table.select(keep).cast(schema)

