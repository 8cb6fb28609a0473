"""Online rollback, end to end: under the live serving application (real Redis, two replicas,
real HTTP) a rollback switches what every replica answers at once, with no restart and no
failed or mixed answer; and after a rollback the next incremental materialization (real Ray
Data) writes into the restored generation, continuing from its own window."""

from __future__ import annotations

import json
import threading
import time
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import requests
from _serving_app import application, history, post

from mlplatform import Entity, FeatureView, Field, NotFoundError, ParquetSource, Platform
from mlplatform.features.materialize import read_state
from mlplatform.features.store import offline_dataset

APPLICANT = 900_777  # an applicant no other serving test uses
FEATURES = ["applicant_history:missed_installments_90d", "applicant_history:loans_30d"]


def _lookup(deployed, session=None) -> tuple[int, tuple | None]:
    response = post(f"{deployed.url}/get-online-features", {"features": FEATURES, "entities": {"applicant_id": [APPLICANT]}}, session=session)
    if response.status_code != 200:
        return response.status_code, None
    _, missed, loans = response.json()["results"]
    return 200, (missed["values"][0], loans["values"][0], missed["event_timestamps"][0])


def _keeping(store, keep: int):
    """The served platform's online store (same Redis, same keys) keeping ``keep`` generations,
    so the generation other modules' pushes live in survives this test's publishes."""
    state = store.__getstate__() | {"keep_generations": keep}
    other = type(store).__new__(type(store))
    other.__setstate__(state)
    return other


def test_rollback_under_live_serving_switches_every_replica_at_once(served):
    platform, deployed, _ = served
    view = platform.features.get_feature_view("applicant_history")
    online = _keeping(platform.features.online_store, 4)
    before = online.current_generation(view)  # what the other serving modules pushed into
    now = datetime.now(UTC) - timedelta(minutes=5)

    def publish(**values: float) -> str:
        generation = online.begin(view)
        online.write(view, generation, [history(APPLICANT, now, **values)])
        online.publish(view, generation)
        return generation

    good = publish(missed_installments_90d=0.0, loans_30d=1.0)
    good_answer = _lookup(deployed)
    assert good_answer[0] == 200 and good_answer[1][:2] == (0.0, 1.0)
    bad = publish(missed_installments_90d=9.0, loans_30d=7.0)  # a bad batch reaches serving
    bad_answer = _lookup(deployed)
    assert bad_answer[1][:2] == (9.0, 7.0)

    # readers hammer both routes while the rollback lands
    answers: list[tuple[int, tuple | None]] = []
    decisions: list[int] = []
    stop = threading.Event()

    def hammer() -> None:
        with requests.Session() as session:
            while not stop.is_set():
                answers.append(_lookup(deployed, session))
                decisions.append(post(f"{deployed.url}/v1/decisions", application(APPLICANT), session=session).status_code)

    readers = [threading.Thread(target=hammer) for _ in range(2)]
    for t in readers:
        t.start()
    time.sleep(1.0)
    result = platform.features.rollback("applicant_history")
    rolled_back_at = len(answers)
    time.sleep(1.0)
    stop.set()
    for t in readers:
        t.join(timeout=60)
    assert (result.previous, result.generation) == (bad, good)
    assert rolled_back_at > 0 and len(answers) > rolled_back_at
    assert all(code == 200 for code, _ in answers) and all(code == 200 for code in decisions)
    # every answer is one whole generation's row, never a mix; the last ones are all the restored one
    assert {value for _, value in answers} <= {good_answer[1], bad_answer[1]}
    assert answers[-1][1] == good_answer[1]
    # the very next lookups, spread over both replicas, all answer the restored values exactly
    assert {_lookup(deployed) for _ in range(8)} == {good_answer}
    decided = post(f"{deployed.url}/v1/decisions", application(APPLICANT)).json()
    logged = json.loads(platform.serving.decision(decided["decision_id"])["features"])
    assert (logged["missed_installments_90d"], logged["loans_30d"]) == (0.0, 1.0)

    listed = {g.generation: g.state for g in platform.features.generations("applicant_history")}
    assert listed[good] == "current" and listed[bad] == "withdrawn"
    with pytest.raises(NotFoundError, match="no kept generation 'nope'"):
        platform.features.rollback("applicant_history", "nope")
    assert _lookup(deployed) == good_answer
    if before is not None:  # leave the view as the other modules had it
        platform.features.rollback("applicant_history", before)
        assert online.current_generation(view) == before


T0 = datetime(2024, 1, 1, tzinfo=UTC)
applicant = Entity(name="applicant", join_keys=["applicant_id"])
scores = FeatureView(
    name="scores",
    entities=[applicant],
    source=ParquetSource(name="ev", dataset="raw/ev", timestamp_field="ts"),
    schema=[Field(name="score"), Field(name="n", dtype="int64")],
)


def _offline(platform: Platform, frame: pd.DataFrame) -> None:
    """Offline data as a backfill writes it: UTC µs event and created times, by event date."""
    frame = frame.assign(created_timestamp=frame["event_timestamp"], date=frame["event_timestamp"].dt.strftime("%Y-%m-%d"))
    table = pa.Table.from_pandas(frame, preserve_index=False)
    for column in ("event_timestamp", "created_timestamp"):
        table = table.set_column(table.schema.get_field_index(column), column, table.column(column).cast(pa.timestamp("us", tz="UTC")))
    platform.datasets.publish(offline_dataset("scores"), table, partition_by="date", metadata={"data_version": scores.data_version})


def _rows(keys: range, days: range, offset: float) -> pd.DataFrame:
    rows = [(k, T0 + timedelta(days=d, hours=k % 5), float(k * 100 + d) + offset, k + d) for k in keys for d in days]
    return pd.DataFrame(rows, columns=["applicant_id", "event_timestamp", "score", "n"])


def _online(platform: Platform, keys: list[int], now: datetime) -> dict:
    got = platform.features.get_online_features(["scores:score", "scores:n"], {"applicant_id": keys}, now=now)
    return got.to_dict()


def test_after_a_rollback_incremental_materialization_continues_in_the_restored_generation(tmp_path, ray_session):
    platform = Platform.from_config({"project": "rollback", "storage": {"root": str(tmp_path / "root")}})
    platform.features.apply([applicant, scores])
    keys = list(range(12))
    good = _rows(range(12), range(0, 10), 0.0)
    _offline(platform, good)
    end1 = T0 + timedelta(days=10)
    (first,) = platform.features.materialize(None, end1, ["scores"])
    restored_values = _online(platform, keys + [99], end1)

    bad = pd.concat([good, _rows(range(0, 12, 2), range(9, 10), 1e6).assign(event_timestamp=lambda f: f["event_timestamp"] + timedelta(hours=6))])
    _offline(platform, bad)  # a bad batch: half the keys jump by a million on day 9
    (second,) = platform.features.materialize(None, end1, ["scores"])
    assert _online(platform, keys, end1)["score"] != restored_values["score"][:12]

    result = platform.features.rollback("scores")
    assert (result.previous, result.generation, result.end) == (second.generation, first.generation, end1)
    assert _online(platform, keys + [99], end1) == restored_values  # bit for bit, the missing key too
    state = read_state(platform.features, "scores")
    assert (state["generation"], state["end"], state["rolled_back_from"]) == (first.generation, end1.isoformat(), second.generation)

    # the bad batch is fixed offline and new days arrive; the incremental run continues from
    # the restored generation's own end, into it
    fixed = pd.concat([good, _rows(range(12), range(10, 13), 0.0)])
    _offline(platform, fixed)
    end2 = T0 + timedelta(days=13)
    (third,) = platform.features.materialize_incremental(end2, ["scores"])
    assert (third.mode, third.generation, third.start) == ("incremental", first.generation, end1)
    latest = fixed.sort_values("event_timestamp").groupby("applicant_id").last()
    got = _online(platform, keys, end2)
    assert got["score"] == latest.loc[keys, "score"].tolist() and got["n"] == latest.loc[keys, "n"].tolist()
    assert not np.any(np.asarray(got["score"]) >= 1e6)
    assert read_state(platform.features, "scores")["generation"] == first.generation
