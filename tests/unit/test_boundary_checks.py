"""Checks at the service's boundary, without Ray: value types, keys and roles, reservations,
unconfirmed answers and event-time bounds."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mlplatform.config import load_config
from mlplatform.errors import DataError, ServingError
from mlplatform.features.values import INT64_MAX, INT64_MIN, check_value, check_values
from mlplatform.features.push import check_event_times
from mlplatform.serving.guard import Guard, role_for
from mlplatform.serving.idempotency import SqliteIdempotencyStore, is_pending, pending_marker
from mlplatform.serving.keys import load_keys, new_key, parse_digest_entries
from mlplatform.serving.decisions.unconfirmed import UnconfirmedAnswers


# ------------------------------------------------------------------------------ values
@pytest.mark.parametrize(
    ("value", "dtype", "expected"),
    [
        (5, "int64", 5),
        (5.0, "int64", 5),
        (INT64_MAX, "int64", INT64_MAX),
        (INT64_MIN, "int64", INT64_MIN),
        (float("nan"), "int64", None),
        (None, "float64", None),
        (3, "float64", 3.0),
        (1e308, "float64", 1e308),
        ("x", "string", "x"),
        (True, "bool", True),
        ("2026-01-02T03:04:05Z", "timestamp", datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)),
        (datetime(2026, 1, 2), "timestamp", datetime(2026, 1, 2, tzinfo=UTC)),
    ],
)
def test_values_that_fit_their_dtype_pass(value, dtype, expected):
    assert check_value(value, dtype) == expected


@pytest.mark.parametrize(
    ("value", "dtype"),
    [
        (INT64_MAX + 1, "int64"),
        (INT64_MIN - 1, "int64"),
        (1e308, "int64"),
        (10**400, "int64"),
        (5.5, "int64"),
        (True, "int64"),
        ("7", "int64"),
        (10**400, "float64"),
        (float("inf"), "float64"),
        ("abc", "float64"),
        (False, "float64"),
        ([1.0], "float64"),
        ({"a": 1}, "string"),
        (1, "bool"),
        ("yesterday", "timestamp"),
        ("0001-01-01T00:00:00+01:00", "timestamp"),
        ("9999-12-31T23:59:59-01:00", "timestamp"),
        (12, "timestamp"),
    ],
)
def test_values_that_do_not_fit_are_refused(value, dtype):
    with pytest.raises(ValueError):
        check_value(value, dtype)


def test_a_refused_column_names_itself_the_row_and_the_value():
    with pytest.raises(DataError, match=r"request field 'amount' must hold numbers, got 'abc' \(str\) at row 1"):
        check_values("amount", [1.0, "abc"], "float64", where="request field")
    with pytest.raises(DataError, match="must not be null"):
        check_values("applicant_id", [1, None], "int64", where="entity key", nullable=False)
    with pytest.raises(DataError) as info:  # a huge int is shown cut, not printed whole
        check_values("loans", [10**400], "int64", where="column")
    assert len(str(info.value)) < 300


@given(st.one_of(st.integers(), st.floats(), st.text(max_size=20), st.booleans(), st.none(), st.lists(st.integers(), max_size=2)))
def test_any_value_is_accepted_or_refused_with_a_value_error(value):
    for dtype in ("int64", "float64", "string", "bool", "timestamp"):
        try:
            out = check_value(value, dtype)
        except ValueError:
            continue
        if dtype == "int64" and out is not None:
            assert INT64_MIN <= out <= INT64_MAX
        if dtype == "float64" and out is not None:
            assert out == out and abs(out) != float("inf")


# -------------------------------------------------------------------------- event times
def test_event_times_beyond_the_skew_or_before_the_floor_are_refused():
    now = datetime(2026, 6, 1, tzinfo=UTC)
    ok = pa.array([now - timedelta(days=1), now + timedelta(minutes=4)], pa.timestamp("us", tz="UTC"))
    check_event_times("v", ok, now=now, max_future=timedelta(minutes=5), floor=datetime(2000, 1, 1, tzinfo=UTC))
    future = pa.array([now, datetime(2262, 1, 1, tzinfo=UTC)], pa.timestamp("us", tz="UTC"))
    with pytest.raises(DataError, match="2262-01-01.*in the future"):
        check_event_times("v", future, now=now, max_future=timedelta(minutes=5), floor=datetime(2000, 1, 1, tzinfo=UTC))
    old = pa.array([datetime(1999, 12, 31, tzinfo=UTC)], pa.timestamp("us", tz="UTC"))
    with pytest.raises(DataError, match="min_event_time"):
        check_event_times("v", old, now=now, max_future=timedelta(minutes=5), floor=datetime(2000, 1, 1, tzinfo=UTC))


# ------------------------------------------------------------------------ keys and roles
def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def test_keys_come_from_the_environment_with_their_roles(monkeypatch, tmp_path):
    plain, pusher, operator = "p" * 20, "w" * 20, "o" * 20
    monkeypatch.setenv("MLP_API_KEY", plain)
    monkeypatch.setenv("MLP_API_KEY_DIGESTS", f"write_features:{_digest(pusher)}\n")
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"# operators\noperate+read_features:{_digest(operator)}\n\n")
    config = load_config({"serving": {"api_key_digests_file": str(keys_file)}})
    keys = dict(load_keys(config.serving))
    assert keys == {
        _digest(plain): ("decide", "predict", "read_features"),
        _digest(pusher): ("write_features",),
        _digest(operator): ("operate", "read_features"),
    }


def test_bad_key_configuration_is_refused_without_echoing_secrets(monkeypatch):
    monkeypatch.delenv("MLP_API_KEY", raising=False)
    monkeypatch.delenv("MLP_API_KEY_DIGESTS", raising=False)
    with pytest.raises(ServingError, match="no API key"):
        load_keys(load_config({}).serving)
    monkeypatch.setenv("MLP_API_KEY", "short")
    with pytest.raises(ServingError, match="shorter than 16"):
        load_keys(load_config({}).serving)
    roles = ("decide", "operate")
    with pytest.raises(ServingError, match="unknown role"):
        parse_digest_entries([f"admin:{'a' * 64}"], source="x", roles=roles)
    with pytest.raises(ServingError, match="64 hex") as info:
        parse_digest_entries(["decide:secretsecret"], source="x", roles=roles)
    assert "secretsecret" not in str(info.value)
    with pytest.raises(ServingError, match="role\\+role:sha256hex"):
        parse_digest_entries(["justakey"], source="x", roles=roles)
    key, entry = new_key(["decide", "read_features"])
    assert entry == f"decide+read_features:{_digest(key)}" and len(key) >= 32


def test_each_route_needs_its_role():
    assert role_for("/v1/decisions") == "decide"
    assert role_for("/get-online-features") == "read_features"
    assert role_for("/push") == "write_features"
    assert role_for("/v1/internal/replica") == "operate"
    assert role_for("/openapi.json") is None


def _call(path: str, key: str | None) -> tuple[int, bytes]:
    sent: list[dict] = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        sent.append(message)

    headers = [(b"content-length", b"2")] + ([(b"x-api-key", key.encode())] if key else [])
    scope = {"type": "http", "path": path, "method": "POST", "headers": headers}
    asyncio.run(Guard(app)(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def test_the_guard_checks_the_key_then_the_role():
    checkout, admin = "c" * 20, "a" * 20
    Guard.configure(((_digest(checkout), ("decide",)), (_digest(admin), ("decide", "write_features", "operate"))))
    try:
        assert _call("/v1/decisions", checkout)[0] == 200
        status, body = _call("/push", checkout)
        assert status == 403 and b"write_features" in body
        assert _call("/v1/internal/replica", checkout)[0] == 403
        assert _call("/push", admin)[0] == 200
        assert _call("/openapi.json", checkout)[0] == 200
        assert _call("/openapi.json", None)[0] == 401
        assert _call("/v1/decisions", "c" * 19 + "x")[0] == 401
    finally:
        Guard.configure(())


# ---------------------------------------------------------------- reservations, answers
def test_a_reservation_makes_copies_wait_and_the_answer_replaces_it(tmp_path):
    store = SqliteIdempotencyStore(tmp_path / "d.db")
    mine, theirs = pending_marker("replica-a:1"), pending_marker("replica-b:2")
    assert store.reserve_many([("app-1", mine)]) == [None]
    found = store.reserve_many([("app-1", theirs), ("app-2", theirs)])
    assert found[0] == mine and is_pending(found[0]) and found[1] is None
    assert store.put_if_absent_many([("app-1", '{"answer":1}')]) == [None]  # replaces our reservation
    assert store.put_if_absent_many([("app-2", '{"answer":2}')]) == [None]  # replaces theirs: first answer wins
    assert store.put_if_absent_many([("app-1", '{"answer":3}')]) == ['{"answer":1}']
    assert store.reserve_many([("app-1", mine)]) == ['{"answer":1}']
    assert store.get_many(["app-1", "app-2", "app-3"]) == ['{"answer":1}', '{"answer":2}', None]


def test_a_reservation_lapses_after_its_ttl(tmp_path):
    store = SqliteIdempotencyStore(tmp_path / "d.db", pending_ttl=timedelta(milliseconds=1))
    assert store.reserve_many([("app-1", pending_marker("a"))]) == [None]
    threading.Event().wait(0.01)
    assert store.reserve_many([("app-1", pending_marker("b"))]) == [None]


def test_unconfirmed_answers_survive_until_the_store_takes_them(tmp_path):
    kept = UnconfirmedAnswers(tmp_path / "unconfirmed")
    assert not kept.any() and kept.get("app-1") is None
    kept.add_many([("app-1", '{"answer":1}')])
    kept.add_many([("app-2", '{"answer":2}')])
    again = UnconfirmedAnswers(tmp_path / "unconfirmed")  # another replica of the node, or a restart
    assert again.any() and again.get("app-1") == '{"answer":1}'
    store = SqliteIdempotencyStore(tmp_path / "d.db")
    store.put_if_absent_many([("app-2", '{"answer":"other"}')])
    assert again.sync(store) == (1, 1)
    assert store.get_many(["app-1", "app-2"]) == ['{"answer":1}', '{"answer":"other"}']
    assert not again.waiting() and again.sync(store) == (0, 0)
    # kept readable after the sync, for a retry during a later outage, until the retention passes
    assert again.get("app-1") == '{"answer":1}' and kept.get("app-2") == '{"answer":2}'
    expired = UnconfirmedAnswers(tmp_path / "unconfirmed", retention_s=0.0)
    threading.Event().wait(0.01)
    expired.sync(store)
    assert expired.get("app-1") is None and not expired.any()


def test_unconfirmed_answers_added_by_another_replica_are_found_at_once(tmp_path):
    """A retry reaching this replica right after another replica of the node answered it finds
    that answer, whether the folders changed a moment ago (listed again) or settled long ago
    (the unchanged-mtime shortcut)."""
    writer = UnconfirmedAnswers(tmp_path / "unconfirmed")
    writer.add_many([("first", "{}")])  # an outage under way (an empty folder is looked at every 0.2 s)
    reader = UnconfirmedAnswers(tmp_path / "unconfirmed", settled_s=0.05)
    for i in range(60):
        assert reader.get(f"missing-{i}") is None
        writer.add_many([(f"app-{i}", f'{{"answer":{i}}}')])
        assert reader.get(f"app-{i}") == f'{{"answer":{i}}}', i
        if i % 10 == 9:
            threading.Event().wait(0.06)  # settled: the next lookups may take the shortcut
    store = SqliteIdempotencyStore(tmp_path / "d.db")
    assert writer.sync(store) == (61, 0)  # moved to synced/: still found, by both
    threading.Event().wait(0.06)
    assert reader.get("app-0") == '{"answer":0}' and reader.get("app-59") == '{"answer":59}'
    assert reader.get("never") is None and reader.any()


def test_unconfirmed_lookups_list_the_folders_only_after_a_counted_change(tmp_path, monkeypatch):
    """A new application (not in the index) costs one stat, not a listing of folders that can
    keep an hour of answers, even right after a change; a change is seen at the next lookup."""
    import mlplatform.serving.decisions.unconfirmed as unconfirmed

    listed = []
    real = unconfirmed._listdir
    monkeypatch.setattr(unconfirmed, "_listdir", lambda folder: listed.append(folder) or real(folder))
    writer = UnconfirmedAnswers(tmp_path / "unconfirmed")
    writer.add_many([("first", '{"a":1}')])
    reader = UnconfirmedAnswers(tmp_path / "unconfirmed")  # the folder changed a moment ago
    listed.clear()
    assert all(reader.get(f"new-{i}") is None for i in range(200)) and listed == []
    writer.add_many([("second", '{"a":2}')])
    assert reader.get("second") == '{"a":2}' and len(listed) == 2  # both folders, once
    assert reader.get("new-x") is None and len(listed) == 2
    store = SqliteIdempotencyStore(tmp_path / "d.db")
    assert writer.sync(store) == (2, 0)  # moved to synced/: a counted change, still found
    assert reader.get("first") == '{"a":1}'
    # A writer that does not count its changes (an older replica): ``any`` sees the folder's
    # mtime move within 0.2 s, and the answer is found from then on.
    (tmp_path / "unconfirmed" / "00000000000000000001-1-0.answers").write_text('third\t{"a":3}\n')
    threading.Event().wait(0.25)
    assert reader.any() and reader.get("third") == '{"a":3}'
