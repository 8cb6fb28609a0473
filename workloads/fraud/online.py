"""The fraud transformer's input, served: the applicant's most recent events from the online
event state, cut into a window by the same kernel as the training sequences.

    for step in online_steps(platform, prefix="raw/fraud"):   # the workload runs these
        runner.run(step)
    inputs = model_inputs(platform.features, [
        {"applicant_id": 42, "merchant_id": 7, "amount": 129.0, "term": 4, "timestamp": now},
    ], max_events=16)
    logits = model(**{name: torch.from_numpy(a) for name, a in inputs.items()})

The events live in two streams (:mod:`workloads.fraud.features`): ``fraud_events``, the
applicant's applications and repayment events with exactly the fields the windows read, and
``merchant_profiles``, each merchant's category (a request names the merchant, not its
category). :func:`online_steps` publishes them the way live events are: the generated raw
tables become each stream's offline log (:func:`import_history`, the bus's acceptance time
being when an event was known: an application's ``application_ts``, a repayment event's
``known_ts``), and the log becomes the views' online event state. From then on the stream
processors keep both current as events are ingested.

:func:`model_inputs` reads the online state in one round trip per view for the whole batch
and cuts each request's window with :mod:`workloads.fraud.query_windows`, the NumPy twin of
the training kernel (:func:`workloads.fraud.windows.query_sequences`, equal to it bit for bit
and ~5 ms faster per call on a few dozen events), so a request at time ``t`` gets exactly the
row training cuts for an application at ``t`` from the same events: the events known strictly
before ``t``, their order and ties, right alignment and padding. One difference is inherent to serving: live, an
application's event reaches the bus after its decision, so it is known at that acceptance
time, where the raw tables (and the imported history) know it at ``application_ts``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mlplatform.errors import ConfigError, DataError
from mlplatform.features.event_log import append_events
from mlplatform.features.realtime import EventArrays, aggregate, retention, usable
from mlplatform.jobs.feature_steps import apply_step
from mlplatform.jobs.steps import Done, Step
from mlplatform.online.base import encode_key
from mlplatform.online.events import EventState
from workloads.fraud.features import (
    DEFINITIONS,
    applicant_behaviour,
    fraud_events,
    merchant_profile,
    merchant_profiles,
)
from workloads.fraud.query_windows import History, cut_windows
from workloads.fraud.windows import SEQUENCE_COLUMNS, utc_micros
from workloads.underwriting.event_history import history_table, load_online

if TYPE_CHECKING:
    from mlplatform.features.definitions import FeatureView, StreamSource
    from mlplatform.features.store import FeatureStore
    from mlplatform.models.flavors.base import Signature
    from mlplatform.platform import Platform
    from mlplatform.storage import DatasetStore, Storage

__all__ = [
    "HISTORY_TABLES",
    "REQUEST_FIELDS",
    "event_log_step",
    "import_history",
    "input_arrays",
    "model_inputs",
    "online_events_step",
    "online_steps",
    "serving_inputs",
]

#: The raw tables (under the data's prefix) each stream's history is imported from.
HISTORY_TABLES = {fraud_events.name: ("applications", "repayment_events"), merchant_profiles.name: ("merchants",)}
#: What a request must carry (others, e.g. ``term``, are ignored).
REQUEST_FIELDS = ("applicant_id", "merchant_id", "amount", "timestamp")

_COLUMNS = {
    "applications": ["application_id", "applicant_id", "merchant_category", "amount", "application_ts"],
    "repayment_events": [
        "event_id", "applicant_id", "event_type", "event_ts", "known_ts", "balance_delta", "is_late", "days_past_due",
    ],
    "merchants": ["merchant_id", "merchant_category", "onboarded_ts"],
}  # fmt: skip
_PART_ROWS = 500_000  # raw rows per log part: a file is read and written in pieces
_US = timedelta(microseconds=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_LONG_AGO = -(2**62)


# ------------------------------------------------------------------------ history
def _stream_events(table: str, batch: pa.Table) -> pa.Table:
    """Rows of the raw table ``table`` as events of its stream (``HISTORY_TABLES``): the
    stream's fields, ``event_id``, ``event_ts`` and ``known_ts`` (when the bus would have
    accepted it), ready for ``event_history.history_table``.

    - ``applications``: event ``<application_id>-application``, type ``application``, known
      at ``application_ts``.
    - ``repayment_events``: every row but ``origination`` (the application itself), its own
      ``event_id`` and times.
    - ``merchants``: event ``merchant-<merchant_id>``, the category as of ``onboarded_ts``.
    """
    n = batch.num_rows
    if table == "applications":
        ts = batch.column("application_ts")
        return pa.table({
            "event_id": pc.binary_join_element_wise(batch.column("application_id"), "-application", ""),
            "applicant_id": batch.column("applicant_id"), "event_type": pa.array(["application"] * n, pa.string()),
            "merchant_category": batch.column("merchant_category"), "amount": batch.column("amount"),
            "balance_delta": pa.nulls(n, pa.float64()), "is_late": pa.nulls(n, pa.int64()),
            "days_past_due": pa.nulls(n, pa.int64()), "event_ts": ts, "known_ts": ts,
        })  # fmt: skip
    if table == "repayment_events":
        batch = batch.filter(pc.not_equal(batch.column("event_type"), "origination"))
        n = batch.num_rows
        return pa.table({
            **{c: batch.column(c) for c in ("event_id", "applicant_id", "event_type")},
            "merchant_category": pa.nulls(n, pa.string()), "amount": pa.nulls(n, pa.float64()),
            **{c: batch.column(c) for c in ("balance_delta", "is_late", "days_past_due", "event_ts", "known_ts")},
        })  # fmt: skip
    if table == "merchants":
        ts = batch.column("onboarded_ts")
        return pa.table({
            "event_id": pc.binary_join_element_wise("merchant-", pc.cast(batch.column("merchant_id"), pa.string()), ""),
            "merchant_id": batch.column("merchant_id"), "merchant_category": batch.column("merchant_category"),
            "event_ts": ts, "known_ts": ts,
        })  # fmt: skip
    raise DataError(f"no stream is imported from raw table {table!r}; known: {sorted(_COLUMNS)}")


def import_history(
    storage: Storage, datasets: DatasetStore, source: StreamSource, prefix: str
) -> tuple[dict[str, int], int, list[str]]:
    """Make ``source``'s offline log the events of its raw tables under ``prefix`` (latest
    versions; ``HISTORY_TABLES``): the log's previous parts are deleted first (a new synthetic
    world must not mix with an older one's events), then the tables' events are appended in
    table, file and row order, stream positions 1, 2, ... Run it while no stream processor of
    ``source`` runs.

    Returns:
        ``{table: version}``, the number of events and the log's new part keys.

    Raises:
        NotFoundError: a raw table does not exist.
    """
    import pyarrow.parquet as pq

    versions = {t: datasets.get(f"{prefix}/{t}") for t in HISTORY_TABLES[source.name]}
    storage.delete(source.dataset, recursive=True)
    position, keys = 1, []
    for table, version in versions.items():
        for path in sorted(datasets.file_paths(version)):
            raw = pq.read_table(path, filesystem=storage.arrow_fs, columns=_COLUMNS[table])
            for start in range(0, raw.num_rows, _PART_ROWS):
                part = history_table(source, _stream_events(table, raw.slice(start, _PART_ROWS)), position)
                key = append_events(storage, source, part)
                if key is not None:
                    keys.append(key)
                position += part.num_rows
    return {t: v.version for t, v in versions.items()}, position - 1, keys


# -------------------------------------------------------------------------- steps
def online_steps(platform: Platform, *, prefix: str) -> Iterator[Step]:
    """Apply the fraud definitions, import each stream's history from the raw tables under
    ``prefix`` into its offline log, and load each view's online event state."""
    yield apply_step(platform.features, DEFINITIONS)
    for source in (fraud_events, merchant_profiles):
        yield event_log_step(platform, source, prefix=prefix)
    for view in (applicant_behaviour, merchant_profile):
        yield online_events_step(platform, view)


def event_log_step(platform: Platform, source: StreamSource, *, prefix: str) -> Step:
    """Import ``source``'s history (:func:`import_history`), unless its log already holds the
    current versions of its raw tables as imported for this definition of the source (value:
    the number of events)."""
    storage, datasets = platform.storage, platform.datasets
    names = [f"{prefix}/{t}" for t in HISTORY_TABLES[source.name]]

    def inputs() -> dict[str, Any]:
        return {"source": source.version, "tables": {n: datasets.get(n).version for n in names}}

    def run() -> Done:
        versions, events, keys = import_history(storage, datasets, source, prefix)
        return Done(
            summary=f"{events:,} events from {', '.join(f'{prefix}/{t} v{v}' for t, v in versions.items())}",
            where=storage.uri(source.dataset),
            output={"parts": keys, "events": events},
            value=events,
        )

    def reuse(output: Any) -> Done | None:
        parts = output.get("parts") if isinstance(output, dict) else None
        if not isinstance(parts, list) or not all(storage.exists(k) for k in parts):
            return None
        return Done(summary=f"{output.get('events', 0):,} events", where=storage.uri(source.dataset), value=output.get("events"))

    return Step("event log", run, target=source.name, inputs=inputs, reuse=reuse)


def online_events_step(platform: Platform, view: FeatureView) -> Step:
    """Rebuild ``view``'s online event state from its stream's log (``load_online``), unless
    the view and the log's parts are those of the last load and the online store still holds
    what it loaded (a probe key has at least its recorded events; value: events held)."""
    features, storage = platform.features, platform.storage
    source = view.source

    def inputs() -> dict[str, Any]:
        return {"view": view.version, "log": sorted(storage.walk_files(source.dataset))}

    def run() -> Done:
        held = load_online(features, view)
        return Done(
            summary=f"{held:,} events of {source.name} online",
            rows=held,
            output={"events": held, "probe": _probe(features, view)},
            value=held,
        )

    def reuse(output: Any) -> Done | None:
        probe = output.get("probe") if isinstance(output, dict) else None
        if not isinstance(probe, list) or len(probe) != 2:
            return None
        key, count = probe
        found = _event_state(features).fetch_events(view.name, [key], after_us=_LONG_AGO)[0]
        if len(found) < count:  # wiped, or another store configured
            return None
        return Done(summary=f"{output['events']:,} events of {source.name} online", value=output["events"])

    return Step("online events", run, target=view.name, inputs=inputs, reuse=reuse)


def _probe(features: FeatureStore, view: FeatureView) -> list[Any] | None:
    """A key of the log's last part and how many events the online state holds for it, or
    None when it holds none (then the step never counts as up to date)."""
    import io

    import pyarrow.parquet as pq

    parts = sorted(k for k in features.storage.walk_files(view.source.dataset) if k.endswith(".parquet"))
    if not parts:
        return None
    keys = pq.read_table(io.BytesIO(features.storage.read_bytes(parts[-1])), columns=list(view.join_keys))
    if keys.num_rows == 0:
        return None
    key = encode_key([keys.column(k)[keys.num_rows - 1].as_py() for k in view.join_keys])
    held = len(_event_state(features).fetch_events(view.name, [key], after_us=_LONG_AGO)[0])
    return [key, held] if held else None


# -------------------------------------------------------------------------- input
def model_inputs(
    features: FeatureStore, requests: Iterable[Mapping[str, Any]], *, max_events: int
) -> dict[str, np.ndarray]:
    """The fraud model's input for each checkout request, from the online event state.

        inputs = model_inputs(platform.features, [
            {"applicant_id": 42, "merchant_id": 7, "amount": 129.0, "timestamp": datetime.now(UTC)},
        ], max_events=16)
        inputs["event_type"].shape          # (1, 16)

    For request ``i`` at time ``t`` (its ``timestamp``; naive = UTC), row ``i`` is what
    :mod:`workloads.fraud.windows` defines for an application at ``t``:

    - the history is the applicant's events in ``applicant_behaviour``'s online state known
      (accepted by the bus) strictly before ``t`` — an event known at ``t`` exactly is not in
      it, nor is the request's own application if it was already ingested —, the most recent
      ``K = max_events`` of them, oldest first, right-aligned, padding on the left; ties in
      known time ordered by event time, then event type, then amount; ``days_before`` counted
      from ``t``. Events a request of the same batch makes are never in another's history.
    - an applicant the online state does not know has an empty history (all padding): a
      first-time applicant, not an error.
    - ``app_category`` is the merchant's category known at ``t`` (``merchant_profile``); an
      unknown merchant, or a category the model's vocabulary does not list, is ``<other>``;
      ``app_log_amount`` is ``log1p(amount)``.

    The online state keeps an applicant's events for the view's retention (20 years), so the
    window equals training's for any applicant whose K-th most recent event is younger.

    Args:
        features: the platform's feature store (``platform.features``); its online store holds
            the event state (loaded by :func:`online_steps`, kept current by the processors).
        requests: mappings with ``applicant_id``, ``merchant_id``, ``amount`` and
            ``timestamp`` (a datetime); other fields are ignored.
        max_events: K, as the model was trained with.

    Returns:
        ``event_type``, ``category`` ``[B, K]`` int64; ``log_amount``, ``days_before``,
        ``days_past_due`` ``[B, K]`` float32; ``mask`` ``[B, K]`` bool; ``app_category``
        ``[B]`` int64; ``app_log_amount`` ``[B]`` float32 — the names and types
        ``workloads.fraud.sequences.to_tensors`` gives, as NumPy arrays.

    Raises:
        DataError: a request lacks a field or holds a bad value (the message names it), or a
            stored event has a type the sequences do not know.
        OnlineStoreUnavailable: the online store did not answer.
    """
    applicants, merchants, amounts, at = _requests(requests)
    online = _event_state(features)
    distinct: list[int] = list(dict.fromkeys(applicants.tolist()))
    found, categories = [], []
    if distinct:  # one round trip per view for the whole batch
        after_us = int(at.min()) - retention(applicant_behaviour) // _US
        found = online.fetch_events(applicant_behaviour.name, [encode_key([a]) for a in distinct], after_us=after_us)
        categories = _categories(online, merchants, at)
    histories = {a: _history(encoded) for a, encoded in zip(distinct, found, strict=True)}
    return cut_windows([histories[a] for a in applicants.tolist()], at, categories, amounts, max_events=max_events)


def serving_inputs(features: Any, requests: Iterable[Mapping[str, Any]], signature: Signature) -> dict[str, np.ndarray]:
    """``model_inputs`` as the model server calls an input builder (``input_builder`` of a
    served model, recorded with the fraud model's versions): K is the width of the version's
    ``event_type`` input, so a version trained with another K gets its own.

    Raises:
        DataError, OnlineStoreUnavailable: as ``model_inputs``.
    """
    widths = {t.name: t.shape for t in signature.inputs}
    shape = widths.get("event_type")
    if shape is None or len(shape) != 2 or shape[1] < 1:
        raise DataError(f"the model's signature has no event_type input [-1, K] to size the history by: {signature.inputs}")
    return model_inputs(features, requests, max_events=shape[1])


def _event_state(features: FeatureStore) -> EventState:
    online = features.online_store
    if not isinstance(online, EventState):
        raise ConfigError(f"the online store {online!r} keeps no event state; the fraud input needs one (SQLite or Redis)")
    return online


def _requests(requests: Iterable[Mapping[str, Any]]) -> tuple[np.ndarray, list[Any], np.ndarray, np.ndarray]:
    """Checked request fields: applicant ids (int64), merchant ids, amounts (float64), times (µs)."""
    applicants, merchants, amounts, times = [], [], [], []
    for i, request in enumerate(requests):
        if not isinstance(request, Mapping):
            raise DataError(f"request {i} must be a mapping with {list(REQUEST_FIELDS)}, got {type(request).__name__}")
        missing = [f for f in REQUEST_FIELDS if f not in request]
        if missing:
            raise DataError(f"request {i} lacks {missing}; a request needs {list(REQUEST_FIELDS)}")
        applicant, amount, when = request["applicant_id"], request["amount"], request["timestamp"]
        if isinstance(applicant, bool) or not isinstance(applicant, (int, np.integer)):
            raise DataError(f"request {i}: applicant_id must be an integer, got {applicant!r}")
        if isinstance(amount, bool) or not isinstance(amount, (int, float, np.number)) or not math.isfinite(amount):
            raise DataError(f"request {i}: amount must be a finite number, got {amount!r}")
        if not isinstance(when, datetime):
            raise DataError(f"request {i}: timestamp must be a datetime (naive = UTC), got {when!r}")
        applicants.append(int(applicant))
        merchants.append(request["merchant_id"])
        amounts.append(float(amount))
        times.append(when)
    return np.array(applicants, np.int64), merchants, np.array(amounts, np.float64), _micros(times)


def _micros(times: list[datetime]) -> np.ndarray:
    """``utc_micros`` of datetimes (naive = UTC), in plain Python for plain datetimes: a
    request's one or few times cost ~0.1 ms through Arrow's conversion, a tenth of the builder."""
    if not all(type(t) is datetime for t in times):  # e.g. pandas Timestamps: nanoseconds truncated there
        return utc_micros(times) if times else np.zeros(0, np.int64)
    return np.array([((t if t.tzinfo is not None else t.replace(tzinfo=UTC)) - _EPOCH) // _US for t in times], np.int64)


def _history(encoded: list[Any]) -> History:
    """One applicant's online events as the windows read them: the events that count
    (``usable``: late ones dropped, one copy per event id, in its order), applications known
    at their acceptance time."""
    events = usable(applicant_behaviour, EventArrays.from_encoded(applicant_behaviour, encoded))
    cols = events.columns
    is_app = cols["event_type"] == "application"
    rep = ~is_app
    return History.of(
        {"merchant_category": cols["merchant_category"][is_app], "amount": cols["amount"][is_app],
         "application_ts": events.known_us[is_app]},
        {"event_type": cols["event_type"][rep], "event_ts": events.event_us[rep], "known_ts": events.known_us[rep],
         **{c: cols[c][rep] for c in ("balance_delta", "is_late", "days_past_due")}},
    )  # fmt: skip


def _categories(online: EventState, merchants: list[Any], at: np.ndarray) -> list[str | None]:
    """Each request's merchant category known at its time (None: unknown merchant)."""
    out: list[str | None] = [None] * len(merchants)
    wanted: dict[str, list[int]] = {}
    for i, merchant in enumerate(merchants):
        if merchant is not None:
            wanted.setdefault(encode_key([merchant]), []).append(i)
    if not wanted:
        return out
    keys = list(wanted)
    found = online.fetch_events(merchant_profile.name, keys, after_us=int(at.min()) - retention(merchant_profile) // _US)
    for key, encoded in zip(keys, found, strict=True):
        rows = wanted[key]
        values = aggregate(merchant_profile, EventArrays.from_encoded(merchant_profile, encoded), at[rows])
        for i, latest in zip(rows, values["merchant_category"], strict=True):
            out[i] = latest[-1] if latest else None
    return out


def input_arrays(table: pa.Table) -> dict[str, np.ndarray]:
    """The model's inputs of sequence rows (``windows.output_schema`` or ``query_sequences``
    columns) as NumPy arrays, named and typed as ``workloads.fraud.sequences.to_tensors``
    makes them, without ``label``; writable copies.

        arrays = input_arrays(query_sequences(apps, events, queries, max_events=16))
    """
    dtypes = {"event_type": np.int64, "category": np.int64, "log_amount": np.float32, "days_before": np.float32,
              "days_past_due": np.float32, "mask": np.bool_}  # fmt: skip
    out: dict[str, np.ndarray] = {}
    for name in SEQUENCE_COLUMNS:
        column = table.column(name).combine_chunks()
        k = column.type.list_size
        out[name] = np.array(column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), k), dtype=dtypes[name])
    out["app_category"] = table.column("app_category").to_numpy().astype(np.int64)
    out["app_log_amount"] = table.column("app_log_amount").to_numpy().astype(np.float32)
    return out
