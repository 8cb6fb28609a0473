"""Feature routes' work off the event loop: merged ``/get-online-features`` lookups and the
frame a ``/push`` writes.

    answers = lookup_many(catalog, bodies)     # JSON bytes or the error, per body
    frame = push_frame(catalog, "applicant_history", body.df)
"""

import json
from typing import Any

from mlplatform.errors import DataError
from mlplatform.serving.schemas import FeatureRequest

__all__ = ["lookup_many", "push_frame"]


def lookup_many(catalog: Any, bodies: list[FeatureRequest]) -> list[bytes | Exception]:
    """Answer several ``/get-online-features`` bodies: those asking for the same features with
    the same entity columns in one ``get_online_features`` call (rows concatenated, results
    split back), the rest one by one. A merged call that fails is retried body by body, so each
    body gets its own answer or error. Returns JSON bytes or the ``PlatformError`` per body."""
    from mlplatform.features.online_lookup import get_online_features

    out: list[bytes | Exception | None] = [None] * len(bodies)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, body in enumerate(bodies):
        target = body.target()
        lengths = {len(v) for v in body.entities.values()}
        key = (target if isinstance(target, str) else tuple(target), body.full_feature_names, tuple(body.entities))
        groups.setdefault(key if len(lengths) == 1 else ("single", i), []).append(i)

    def one(i: int) -> bytes | Exception:
        body = bodies[i]
        try:
            response = get_online_features(catalog, body.target(), body.entities, full_feature_names=body.full_feature_names)
        except Exception as exc:  # this body's answer: a PlatformError is a 4xx/503, anything else a 500
            return exc
        return _encode_response(response.to_json_dict())

    for key, members in groups.items():
        if len(members) > 1:
            first = bodies[members[0]]
            entities = {k: [v for i in members for v in bodies[i].entities[k]] for k in first.entities}
            try:
                response = get_online_features(catalog, first.target(), entities, full_feature_names=first.full_feature_names)
            except Exception:
                response = None  # someone's rows are bad: find out whose, one by one
            if response is not None:
                doc = response.to_json_dict()
                start = 0
                for i in members:
                    n = len(next(iter(bodies[i].entities.values())))
                    part = {
                        "metadata": doc["metadata"],
                        "results": [{k: r[k][start : start + n] for k in ("values", "statuses", "event_timestamps")} for r in doc["results"]],
                    }
                    out[i] = _encode_response(part)
                    start += n
                continue
        for i in members:
            out[i] = one(i)
    return out  # type: ignore[return-value]


def _encode_response(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def push_frame(catalog: Any, view_name: str, df: dict[str, list[Any]]) -> Any:
    """The pushed columns as a DataFrame, timestamps parsed from ISO 8601 text (checked, so a
    bad one is a DataError naming its column and row)."""
    import pandas as pd

    from mlplatform.features.values import check_values

    lengths = {c: len(v) for c, v in df.items()}
    if len(set(lengths.values())) != 1:
        raise DataError(f"push: every df column must have one length, got {lengths}")
    view = catalog.resolve_view(view_name)
    stamps = {"event_timestamp"} | {f.name for f in getattr(view, "features", ()) if f.dtype == "timestamp"}
    columns = {}
    for name, values in df.items():
        if name in stamps:
            values = check_values(name, values, "timestamp", where=f"push to view {view_name!r}: column")
        columns[name] = pd.Series(values, dtype=object)
    return pd.DataFrame(columns)
