"""Online rollback: make a kept generation of a view current again, with no serving restart.

    platform.features.generations("applicant_history")         # kept generations, current first
    platform.features.rollback("applicant_history")             # back to the previous one
    platform.features.rollback("applicant_history", generation="12")

Every full materialization writes a new generation; the online store keeps the last
``online_store.keep_generations`` of them (the current one included). A rollback switches the
view's pointer to a kept generation in one atomic step in the store (one SQLite transaction,
one Lua script on Redis). Serving replicas read the pointer on every lookup, so running
replicas answer from the restored generation from their next request on: nothing restarts,
and no request sees a mix of the two generations.

What a rollback restores, exactly:

- The restored generation's rows as they were when it stopped being current — its full
  materialization plus every upsert (incremental run, push, stream) made while it was current.
- Upserts made *after* it stopped being current (incremental runs, pushes and stream updates
  into the generation rolled back from) are not in it. Values pushed since then are absent
  online until pushed again; offline rows are picked up again by the next incremental run.
- The materialization state (``online/state/<view>.json``) is pointed back at the restored
  generation's own record (its window end), so the next ``materialize_incremental`` upserts
  ``(its end, new end]`` into the restored generation, and never into the one rolled back
  from. Where the restored generation has no record (it was created by a push, or before
  records were kept per generation), the state is removed and the next incremental run
  rebuilds the view from the beginning of its data.
- A rollback does not touch offline data: if the offline rows themselves are bad, the next
  materialization over their range brings them back. Fix or re-backfill them first.
- A full materialization in progress is not stopped; when it publishes, its generation becomes
  current as usual.

The generation rolled back from stays kept (``withdrawn``) and can be restored by naming it;
a rollback without a name never goes back to it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from mlplatform.errors import DataError, NotFoundError
from mlplatform.features.materialize import STATE_PREFIX

if TYPE_CHECKING:
    from mlplatform.features.store import FeatureStore

__all__ = ["GenerationInfo", "RollbackResult", "generations", "rollback"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationInfo:
    """A kept generation of a view. ``state``: ``current``, ``kept`` (a plain rollback's
    target) or ``withdrawn`` (rolled back from; restorable by name). ``rows``: entity keys it
    holds. ``start``/``end``: the event-time window its materialization covered (None when it
    has no record, e.g. it was created by a push)."""

    view: str
    generation: str
    state: str
    published_at: datetime | None
    rows: int | None
    start: datetime | None
    end: datetime | None

    def summary(self) -> str:
        published = self.published_at.isoformat(timespec="seconds") if self.published_at else "-"
        window = "-" if self.end is None else f"({self.start.isoformat() if self.start else '-inf'}, {self.end.isoformat()}]"
        rows = "-" if self.rows is None else f"{self.rows:,}"
        return f"{self.view} generation {self.generation} ({self.state}): published {published}, {rows} keys, events in {window}"


@dataclass(frozen=True)
class RollbackResult:
    """What a rollback did: ``previous`` was current, ``generation`` is now."""

    view: str
    previous: str | None
    generation: str
    end: datetime | None

    def summary(self) -> str:
        if self.previous == self.generation:
            return f"{self.view}: generation {self.generation} is already current; nothing changed"
        upto = f" (events up to {self.end.isoformat()})" if self.end else " (no materialization record: the next incremental run rebuilds it)"
        return f"rolled back {self.view} from generation {self.previous} to generation {self.generation}{upto}"


def generations(store: FeatureStore, view: str) -> list[GenerationInfo]:
    """The kept generations of ``view``, the current one first, then newest first.

    Raises:
        NotFoundError: ``view`` is not a registered feature view.
        DataError: ``view`` is real-time (its online state is not kept in generations).
    """
    name = _materialized_view(store, view)
    out = []
    for g in store.online_store.generations(name):
        record = _record(store, name, g.generation) or {}
        out.append(
            GenerationInfo(
                view=name,
                generation=g.generation,
                state=g.state,
                published_at=g.published_at,
                rows=g.rows,
                start=_instant(record.get("start")),
                end=_instant(record.get("end")),
            )
        )
    return out


def rollback(store: FeatureStore, view: str, generation: str | int | None = None) -> RollbackResult:
    """Make the previous (or a named) kept generation of ``view`` current again, atomically.

        platform.features.rollback("applicant_history")                   # the previous one
        platform.features.rollback("applicant_history", generation="12")  # a named one

    "Previous" is the newest kept generation older than the current one, skipping generations
    already rolled back from. See the module doc for exactly what is restored, what happens
    to pushed and incrementally materialized values, and to the materialization state.

    Args:
        view: a registered (batch) feature view.
        generation: a kept generation (``generations(view)`` lists them); None = the previous.

    Returns:
        A ``RollbackResult``; its summary is logged at INFO.

    Raises:
        NotFoundError: the view is not registered, ``generation`` is not kept (the message
            lists the kept ones), or there is no previous generation to go back to.
        DataError: the view is real-time, or ``generation`` is not a string or integer.
        OnlineStoreUnavailable / StorageError: the online store failed; nothing changed.
    """
    name = _materialized_view(store, view)
    if generation is not None and (isinstance(generation, bool) or not isinstance(generation, (str, int))):
        raise DataError(f"generation must be a generation id such as '12', got {type(generation).__name__} {generation!r}")
    online = store.online_store
    previous = online.current_generation(name)
    target = online.rollback(name, None if generation is None else str(generation))
    record = _record(store, name, target)
    if target != previous:
        _point_state_at(store, name, target, previous, record)
        _forget_dropped(store, name)
    result = RollbackResult(view=name, previous=previous, generation=target, end=_instant((record or {}).get("end")))
    log.info("%s", result.summary())
    return result


# ---------------------------------------------------------------------------- internals


def _materialized_view(store: FeatureStore, view: Any) -> str:
    if not isinstance(view, str):
        raise DataError(f"view must be a feature view name, got {type(view).__name__} {view!r}")
    found = store.get_feature_view(view)
    if found.is_realtime:
        raise DataError(
            f"feature view {view!r} is real-time: its online state comes from the stream, not from "
            "materialized generations, so it cannot be rolled back"
        )
    return found.name


def _record_key(view: str, generation: str) -> str:
    return f"{STATE_PREFIX}/{view}/generations/{generation}.json"


def _record(store: FeatureStore, view: str, generation: str) -> dict[str, Any] | None:
    try:
        return store.storage.read_json(_record_key(view, generation))
    except NotFoundError:
        return None


def _point_state_at(store: FeatureStore, view: str, target: str, previous: str | None, record: dict[str, Any] | None) -> None:
    """The view's materialization state becomes the restored generation's record, so the next
    incremental run continues from its end into it; without a record, no state (a full rebuild)."""
    key = f"{STATE_PREFIX}/{view}.json"
    if record is None:
        if store.storage.exists(key):
            store.storage.delete(key)
        return
    store.storage.write_json(
        key,
        {**record, "rolled_back_from": previous, "rolled_back_at": datetime.now(UTC).isoformat()},
    )


def _forget_dropped(store: FeatureStore, view: str) -> None:
    """Delete the records of generations the store dropped: those older than the oldest kept
    one (generation ids only grow, so a generation published meanwhile is never touched)."""
    kept = [int(g.generation) for g in store.online_store.generations(view)]
    if not kept:
        return
    prefix = f"{STATE_PREFIX}/{view}/generations"
    for entry in store.storage.list(prefix):
        stem = entry[:-5] if entry.endswith(".json") else ""
        if stem.isdigit() and int(stem) < min(kept):
            store.storage.delete(f"{prefix}/{entry}")


def _instant(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)
