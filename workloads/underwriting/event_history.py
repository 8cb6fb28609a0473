"""The streams' history: the generated events in each stream source's offline log, and the
log's recent events in the online event state.

    import_history(platform.storage, platform.datasets, checkouts, "raw/underwriting/checkout_events")
    load_online(platform.features, applicant_checkouts)

The generator writes each stream as a table (``checkout_events``, ``repayment_events``) with
the event id, the event time and ``known_ts``, when the bus would have accepted the event.
Live, the stream processors append every accepted event to the source's offline log with the
time the bus stamped (``created_timestamp``) and its stream position; importing the history
writes the generated events there the same way, so training sets
(``get_historical_features``) and the online state read one log, and a training row at time
``t`` sees exactly what serving would have seen at ``t``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa

from mlplatform.features.event_log import ARRIVAL, append_events, event_schema
from mlplatform.timestamps import CREATED_TIMESTAMP

if TYPE_CHECKING:
    from datetime import datetime

    from mlplatform.features.definitions import FeatureView, StreamSource
    from mlplatform.features.store import FeatureStore
    from mlplatform.storage import DatasetStore, DatasetVersion, Storage

__all__ = ["KNOWN", "STREAM_TABLES", "history_table", "import_history", "load_online"]

#: The generated table of each stream source (under the raw data's prefix).
STREAM_TABLES = {"checkouts": "checkout_events", "repayments": "repayment_events"}
#: The generated tables' column for when the bus accepted an event.
KNOWN = "known_ts"
_PART_ROWS = 500_000  # events per log part: a shard's table is read and written in pieces


def history_table(source: StreamSource, table: pa.Table, first_position: int) -> pa.Table:
    """Generated events of ``source`` as its log holds them (``event_log.event_schema``):
    ``created_timestamp`` is the table's ``known_ts``, and the stream positions are
    ``first_position``, ``first_position + 1``, ... in row order.

    Raises:
        KeyError: the table lacks a column of the source's events.
    """
    schema = event_schema(source)
    rows = table.num_rows
    positions = pa.array(range(first_position, first_position + rows), pa.int64())
    columns = {CREATED_TIMESTAMP: table.column(KNOWN), ARRIVAL: positions}
    arrays = [columns[f.name] if f.name in columns else table.column(f.name) for f in schema]
    return pa.Table.from_arrays([a.cast(f.type) for a, f in zip(arrays, schema, strict=True)], schema=schema)


def import_history(
    storage: Storage, datasets: DatasetStore, source: StreamSource, dataset: str
) -> tuple[DatasetVersion, int, list[str]]:
    """Make ``source``'s offline log the events of the generated table ``dataset`` (latest
    version): the log's previous parts are deleted first, then the events are appended in
    the table's order (its files in name order, so shards in order), stream positions 1, 2, ...

    Replacing rather than appending is what a new synthetic world needs: the events of an
    older one (and any event ingested live into it) must not mix with the new history. Run it
    while no stream processor of ``source`` is running (the workload deploys them later).

    Returns:
        The table's version, the number of events and the log's new part keys.
    """
    import pyarrow.parquet as pq

    version = datasets.get(dataset)
    storage.delete(source.dataset, recursive=True)
    position, keys = 1, []
    for path in sorted(datasets.file_paths(version)):
        table = pq.read_table(path, filesystem=storage.arrow_fs)
        for start in range(0, table.num_rows, _PART_ROWS):
            part = history_table(source, table.slice(start, _PART_ROWS), position)
            key = append_events(storage, source, part)
            if key is not None:
                keys.append(key)
            position += part.num_rows
    return version, position - 1, keys


def load_online(features: FeatureStore, view: FeatureView, now: datetime | None = None) -> int:
    """Rebuild ``view``'s online event state from its log: forget what it held, then apply
    the log's events within the view's retention of ``now`` (default: now; see
    ``load_online_events``). Returns how many events it holds now.

    Forgetting first keeps the online state exactly what the log holds, also after a new
    history replaced the log; reads see no events for the moment in between, so run it before
    the decision service takes traffic (the workload runs it before deploying).
    """
    from mlplatform.features.realtime_load import load_online_events

    online = features.online_store
    online.drop_events(view.name)  # type: ignore[union-attr]
    return load_online_events(features.storage, online, view, now)  # type: ignore[arg-type]
