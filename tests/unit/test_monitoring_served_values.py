"""What the serving metrics count per micro-batch (``ServedValues``), without Ray: values and
nulls per feature, the newest event time per view, scores per model version."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from mlplatform.features.online_lookup import FeatureResult
from mlplatform.serving.metrics import ServedValues

T0 = datetime(2026, 1, 5, 12, tzinfo=UTC)


@dataclass(frozen=True)
class Scorer:
    name: str
    version: int
    feature_names: tuple[str, ...]
    refs: tuple[str, ...]


SCORER = Scorer("uw", 3, ("loans_30d", "missed_90d", "default_rate"),
                ("history:loans_30d", "history:missed_90d", "merchant:default_rate", "checkout:ratio"))


def column(values, stamps):
    return FeatureResult(values=list(values), statuses=["PRESENT"] * len(values), event_timestamps=list(stamps))


def test_a_batch_counts_nulls_per_feature_the_newest_event_per_view_and_the_scores():
    served = ServedValues()
    columns = {
        "loans_30d": column([1.0, None, 2.0], [T0, None, T0 - timedelta(hours=1)]),
        "missed_90d": column([0.0, None, None], [T0, None, T0 - timedelta(hours=1)]),
        "default_rate": column([0.1, 0.2, 0.3], [T0 - timedelta(days=1)] * 3),
        "ratio": column([1.5, 2.0, 0.5], [None] * 3),  # on-demand: no event time
    }
    served.add(SCORER, columns, [0.1, 0.5, 0.9])
    later = {**columns, "loans_30d": column([3.0], [T0 + timedelta(minutes=5)]), "missed_90d": column([None], [None]),
             "default_rate": column([None], [None])}
    served.add(SCORER, later, [0.2], [("fraud", 2, [0.7])])
    taken = served.take()
    assert taken["values"] == {"loans_30d": 4, "missed_90d": 4, "default_rate": 4}
    assert taken["missing"] == {"loans_30d": 1, "missed_90d": 3, "default_rate": 1}
    assert taken["newest"] == {"history": (T0 + timedelta(minutes=5)).timestamp(), "merchant": (T0 - timedelta(days=1)).timestamp()}
    assert taken["scores"] == {("uw", 3): [0.1, 0.5, 0.9, 0.2], ("fraud", 2): [0.7]}
    # take() starts afresh: a flush never exports the same values twice
    assert served.take() == {"values": {}, "missing": {}, "newest": {}, "scores": {}}


def test_the_newest_event_is_per_flush_window_so_a_rollback_to_older_values_shows():
    served = ServedValues()
    served.add(SCORER, {"loans_30d": column([1.0], [T0])}, [0.1])
    assert served.take()["newest"] == {"history": pytest.approx(T0.timestamp())}
    served.add(SCORER, {"loans_30d": column([1.0], [T0 - timedelta(days=2)])}, [0.1])
    assert served.take()["newest"] == {"history": pytest.approx((T0 - timedelta(days=2)).timestamp())}


def test_a_flush_thread_that_falls_behind_loses_the_oldest_batches_and_counts_them():
    served = ServedValues(max_batches=3)
    for i in range(5):
        served.add(SCORER, {}, [i / 10])
    assert served.dropped == 2
    assert served.take()["scores"] == {("uw", 3): [0.2, 0.3, 0.4]}
