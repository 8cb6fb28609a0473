"""Training/serving skew, measured on logged decisions: were the served values the training values?

    report = consistency_report(store, records, "underwriting_v1", sample=1000)
    report.per_feature        # feature, compared, exact_match_rate, missing_online, extra_online, ...
    report.flagged            # the features whose served values differ from the offline ones
    report.write(storage, "reports/consistency/2026-12-04T10-00-00")   # Parquet, summary.md, PNG

Each logged decision holds the features it was scored with, the time they were read at
(``created_at``: the online lookup's ``now``) and the request (join keys, request fields).
The report recomputes the same features offline for the same entities **as known at** that
time (``get_historical_features(..., as_known_at=True)``: what training would have used for
a row at that instant) and compares them value by value:

- **exact match**: both null, or equal (numbers as float64, lists element by element);
- **missing online**: served null where the offline value exists (e.g. a key not materialized);
- **extra online**: served a value where the offline value is null (e.g. an event applied
  online that never reached the offline log);
- **mean absolute difference** over the numeric pairs where both exist;
- the **worst examples** per feature (largest difference first), with the decision id.

A stale materialization, a dropped event and an on-demand function changed after the
decision each show up on the feature they affect. Fallback decisions (scored without
features) and copies not returned to the caller are left out.
"""

from __future__ import annotations

import io
import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mlplatform.errors import DataError

if TYPE_CHECKING:
    import pandas as pd

    from mlplatform.features.definitions import FeatureService
    from mlplatform.features.store import FeatureStore
    from mlplatform.storage import Storage

__all__ = ["ConsistencyReport", "consistency_report", "same_value"]

_TS = "decision_ts"
_ID = "decision_id"
WORST_PER_FEATURE = 5


@dataclass(frozen=True)
class ConsistencyReport:
    """The comparison: ``rows`` (one per decision and feature), ``per_feature`` (the rates)
    and ``examples`` (the worst mismatches per feature)."""

    feature_service: str
    decisions: int
    rows: pd.DataFrame
    per_feature: pd.DataFrame
    examples: pd.DataFrame

    @property
    def flagged(self) -> list[str]:
        """Features whose served values are not all equal to the offline ones."""
        return self.per_feature.loc[self.per_feature["exact_match_rate"] < 1.0, "feature"].tolist()

    def summary(self) -> str:
        """A readable summary (Markdown): the rates per feature, then the worst examples."""
        lines = [
            f"# Training/serving consistency: {self.feature_service}",
            "",
            f"{self.decisions:,} logged decisions; served values recomputed offline as known at each decision's time.",
            "",
            "| feature | compared | exact match | missing online | extra online | mean abs diff |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in self.per_feature.itertuples():
            mad = "-" if r.mean_abs_diff is None or r.mean_abs_diff != r.mean_abs_diff else f"{r.mean_abs_diff:.6g}"
            lines.append(f"| {r.ref} | {r.compared:,} | {r.exact_match_rate:.2%} | {r.missing_online:,} | {r.extra_online:,} | {mad} |")
        flagged = self.flagged
        lines += ["", f"**Flagged**: {', '.join(flagged)}" if flagged else "**All features match exactly.**"]
        if len(self.examples):
            lines += ["", "## Worst examples", "", "| feature | decision | served | offline | abs diff |", "|---|---|---|---|---:|"]
            for r in self.examples.itertuples():
                diff = "-" if r.abs_diff != r.abs_diff else f"{r.abs_diff:.6g}"
                lines.append(f"| {r.ref} | {r.decision_id} | {r.served} | {r.offline} | {diff} |")
        return "\n".join(lines) + "\n"

    def write(self, storage: Storage, prefix: str) -> dict[str, str]:
        """Write ``rows.parquet``, ``per_feature.parquet``, ``summary.md``, ``report.json``
        (service, decisions, flagged) and ``match_rate.png`` under ``prefix``; returns their URIs
        by name. ``mlplatform.features.consistency_reports`` lists what is written."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        out = {}
        for name, frame in (("rows", self.rows), ("per_feature", self.per_feature)):
            buffer = io.BytesIO()
            pq.write_table(pa.Table.from_pandas(frame.astype({c: str for c in ("served", "offline") if c in frame}), preserve_index=False), buffer)
            storage.write_bytes(f"{prefix}/{name}.parquet", buffer.getvalue())
            out[name] = storage.uri(f"{prefix}/{name}.parquet")
        storage.write_bytes(f"{prefix}/summary.md", self.summary().encode())
        out["summary"] = storage.uri(f"{prefix}/summary.md")
        # the figures a listing shows without parsing the Markdown (consistency_reports)
        storage.write_json(f"{prefix}/report.json", {"feature_service": self.feature_service, "decisions": self.decisions,
                                                     "flagged": self.flagged})
        out["report"] = storage.uri(f"{prefix}/report.json")
        storage.write_bytes(f"{prefix}/match_rate.png", self._png())
        out["png"] = storage.uri(f"{prefix}/match_rate.png")
        return out

    def _png(self) -> bytes:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        frame = self.per_feature.sort_values("exact_match_rate")
        fig, ax = plt.subplots(figsize=(7, 0.3 * len(frame) + 1.2))
        colors = ["#c0392b" if r < 1 else "#27ae60" for r in frame["exact_match_rate"]]
        ax.barh(frame["ref"], frame["exact_match_rate"] * 100, color=colors)
        ax.set_xlim(0, 100)
        ax.set_xlabel("exact match with offline recomputation (%)")
        ax.set_title(f"{self.feature_service}: served vs training values ({self.decisions:,} decisions)")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")  # a long title is not cut
        plt.close(fig)
        return buffer.getvalue()


def consistency_report(
    store: FeatureStore,
    records: Sequence[Mapping[str, Any]],
    feature_service: FeatureService | str,
    *,
    sample: int | None = 1000,
    seed: int = 0,
) -> ConsistencyReport:
    """Compare the features served in logged decision ``records`` with their offline values
    as known at each decision's time (see the module doc).

    Args:
        records: decision log records (``mlplatform.serving.decisions.records``).
        feature_service: the service (or its name) the decisions were scored with.
        sample: compare at most this many decisions, drawn with ``seed`` (None: all).

    Raises:
        DataError: no record was scored with features (all fallbacks, or none given).
    """
    import pandas as pd

    service_name = feature_service if isinstance(feature_service, str) else feature_service.name
    refs = store.resolve_features(feature_service)
    scored = [r for r in records if not r.get("fallback") and r.get("returned", True)]
    if not scored:
        raise DataError(f"no logged decision was scored with features (of {len(records)} records); nothing to compare")
    if sample is not None and len(scored) > sample:
        scored = random.Random(seed).sample(scored, sample)
    served = {r[_ID]: _loads(r["features"]) for r in scored}
    entities = pd.DataFrame([_entity_row(r) for r in scored])
    offline = store.get_historical_features(entities, refs, entity_timestamp=_TS, as_known_at=True).to_pandas()
    offline = offline.set_index(_ID)
    rows = []
    for ref in refs:
        name = ref.split(":", 1)[1]
        if name not in offline.columns:
            continue
        for decision_id, features in served.items():
            if name not in features:
                continue  # the model did not read this feature of the service
            online, recomputed = features[name], _plain(offline.at[decision_id, name])
            rows.append({
                "ref": ref, "feature": name, "decision_id": decision_id,
                "served": online, "offline": recomputed, "match": same_value(online, recomputed),
                "missing_online": _missing(online) and not _missing(recomputed),
                "extra_online": not _missing(online) and _missing(recomputed),
                "abs_diff": _abs_diff(online, recomputed),
            })
    frame = pd.DataFrame(rows, columns=["ref", "feature", "decision_id", "served", "offline", "match", "missing_online", "extra_online", "abs_diff"])
    per_feature = (
        frame.groupby(["ref", "feature"], sort=False)
        .agg(compared=("match", "size"), exact_matches=("match", "sum"), missing_online=("missing_online", "sum"),
             extra_online=("extra_online", "sum"), mean_abs_diff=("abs_diff", "mean"))
        .reset_index()
    )
    per_feature["exact_match_rate"] = per_feature["exact_matches"] / per_feature["compared"]
    wrong = frame[~frame["match"]].copy()
    wrong["order"] = wrong["abs_diff"].fillna(math.inf)
    examples = (
        wrong.sort_values(["ref", "order"], ascending=[True, False]).groupby("ref").head(WORST_PER_FEATURE).drop(columns="order")
    )
    return ConsistencyReport(service_name, len(scored), frame, per_feature, examples.reset_index(drop=True))


def same_value(a: Any, b: Any) -> bool:
    """Equal as served and as recomputed: both null, equal numbers (as float64), equal
    lists element by element, or equal otherwise."""
    if _missing(a) or _missing(b):
        return _missing(a) and _missing(b)
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        a, b = list(a), list(b)
        return len(a) == len(b) and all(same_value(x, y) for x, y in zip(a, b))
    if _number(a) and _number(b):
        return float(a) == float(b)
    return a == b


def _entity_row(record: Mapping[str, Any]) -> dict[str, Any]:
    import pandas as pd

    request = _loads(record["request"])
    row = {k: v for k, v in request.items() if k != "timestamp"}
    row[_ID] = record[_ID]
    row[_TS] = pd.Timestamp(record["created_at"])
    return row


def _loads(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _plain(value: Any) -> Any:
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    elif hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    return value


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _abs_diff(a: Any, b: Any) -> float:
    if _missing(a) or _missing(b) or not (_number(a) and _number(b)):
        return math.nan
    return abs(float(a) - float(b))
