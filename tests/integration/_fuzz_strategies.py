"""Generated bad requests for the serving application: what the fuzz test and the long run send.

    from _fuzz_strategies import KNOWN, REQUESTS
    from _fuzz_runner import Fuzzer

    fuzzer = Fuzzer(deployed.url, key)              # sends from 4 threads, tallies the answers
    for request in KNOWN:
        fuzzer.submit(request)
    fuzzer.drive(REQUESTS["/push"], examples=250)   # 250 distinct requests, the same every run
    fuzzer.close()
    assert not fuzzer.tally.server_errors, fuzzer.tally.table()

``REQUESTS`` maps each route to a hypothesis strategy of ``FuzzRequest``: for the POST routes a
valid body with one to three mutations (a field replaced by an extreme number, an odd
timestamp, odd unicode, a deep nesting, a huge string or list, a wrong type; a field dropped;
an unknown key), or a whole body that is not a JSON object at all, an odd content type, a
chunked body or a query string; for the GET routes odd methods, paths, query strings and
keys. ``KNOWN`` holds the hand-written requests of the bug classes found before (timestamps
whose UTC conversion leaves the years 1-9999 or that lie beyond the allowed clock skew,
non-numeric or absurd request fields of an on-demand feature, push keys and values outside
int64, push event times in the future or before the floor).

Bodies are trees of plain JSON values plus ``Raw`` (JSON text inserted verbatim: ``1e400``,
a 400-digit integer, ``"\\ud800"``, ``[[[…]]]``) and ``Now`` (a timestamp relative to the
clock at send time, so "within the allowed skew" stays true however long generation took).
``encode`` writes them out the way a client would, as bytes.

Entity ids in ``RESERVED`` are never pushed to: the checks after the fuzzing (and the other
modules sharing the application) rely on their values.

benchmarks/fuzz_serving.py imports this module by path (tests/integration is not a package).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from hypothesis import strategies as st

__all__ = [
    "CHECK_APPLICANT",
    "CHECK_MERCHANT",
    "GET_ROUTES",
    "KNOWN",
    "POST_ROUTES",
    "REQUESTS",
    "RESERVED",
    "VIEWS",
    "FuzzRequest",
    "Now",
    "Raw",
    "encode",
]

POST_ROUTES = ("/v1/decisions", "/get-online-features", "/push")
GET_ROUTES = ("/health", "/v1/internal/replica", "/openapi.json")
# Ids the fixtures and the after-fuzz checks read (test_serving's applicants and merchant 7, the
# fuzz test's own applicant and merchant): never pushed to. Decisions and lookups may use them.
RESERVED = frozenset({7, 900_001, 900_002, 123_456_789, 7_301_001, 7_301_002})
CHECK_APPLICANT, CHECK_MERCHANT = 7_301_001, 7_301_002
VIEWS = {
    "applicant_history": ("applicant_id", [f"{k}_{w}" for w in ("30d", "90d", "365d")
                                           for k in ("loans", "late_installments", "missed_installments", "max_days_past_due")]
                          + ["outstanding_balance", "avg_loan_amount_365d"]),
    "merchant_risk": ("merchant_id", ["default_rate_90d", "outcomes_90d"]),
    "merchant_activity": ("merchant_id", ["applications_90d"]),
}


# ------------------------------------------------------------------------ documents
class Raw(str):
    """JSON text written into the body as it is (numbers and strings json.dumps would not write)."""


@dataclass(frozen=True)
class Now:
    """An ISO 8601 timestamp ``offset`` from the clock at the moment the body is encoded.
    ``tz`` is the UTC offset it is written in (None: no offset, naive)."""

    offset: timedelta
    tz: timedelta | None = timedelta(0)

    def render(self) -> str:
        when = datetime.now(UTC) + self.offset
        if self.tz is None:
            return when.replace(tzinfo=None).isoformat()
        return when.astimezone(timezone(self.tz)).isoformat()


def encode(doc: Any, ascii_only: bool = True) -> bytes:
    """``doc`` as JSON bytes; ``Raw`` leaves verbatim, ``Now`` rendered now. With
    ``ascii_only=False`` strings are written as UTF-8 (lone surrogates pass through as the
    invalid UTF-8 they make), otherwise as ``\\uXXXX`` escapes."""
    parts: list[str] = []
    _write(doc, parts, ascii_only)
    return "".join(parts).encode("utf-8", "surrogatepass")


def _write(doc: Any, out: list[str], ascii_only: bool) -> None:
    if isinstance(doc, Raw):
        out.append(str(doc))
    elif isinstance(doc, Now):
        out.append(json.dumps(doc.render()))
    elif isinstance(doc, Mapping):
        out.append("{")
        for i, (k, v) in enumerate(doc.items()):
            if i:
                out.append(",")
            out.append(str(k) if isinstance(k, Raw) else json.dumps(k, ensure_ascii=ascii_only))
            out.append(":")
            _write(v, out, ascii_only)
        out.append("}")
    elif isinstance(doc, (list, tuple)):
        out.append("[")
        for i, v in enumerate(doc):
            if i:
                out.append(",")
            _write(v, out, ascii_only)
        out.append("]")
    elif isinstance(doc, float) and not math.isfinite(doc):
        out.append("NaN" if math.isnan(doc) else ("Infinity" if doc > 0 else "-Infinity"))
    else:
        out.append(json.dumps(doc, ensure_ascii=ascii_only))


@dataclass(frozen=True)
class FuzzRequest:
    """One request: ``body`` is a document (see ``encode``), ``bytes`` sent as they are, or
    None. ``headers`` change the defaults (``X-API-Key``, ``Content-Type: application/json``);
    a value of None drops that header. ``must_reject``: the request is certainly invalid, so
    a 2xx answer is as wrong as a 5xx. ``label`` says what was done to it."""

    method: str
    path: str
    body: Any = None
    headers: tuple[tuple[str, Any], ...] = ()
    query: str = ""
    label: str = ""
    must_reject: bool = False
    ascii_only: bool = True
    chunked: bool = False

    @property
    def route(self) -> str:
        """The route this request fuzzes (for counting), whatever its path became."""
        return self.label.split(":", 1)[0]

    def payload(self) -> bytes | None:
        if self.body is None or isinstance(self.body, bytes):
            return self.body
        return encode(self.body, self.ascii_only)


# --------------------------------------------------------------------------- values
def _raw(*tokens: str) -> st.SearchStrategy[Raw]:
    return st.sampled_from([Raw(t) for t in tokens])


# Numbers JSON allows (and a few Python's json also reads) that do not fit the obvious type.
EXTREME_TOKENS = (
    "1" + "0" * 400, "-1" + "0" * 400, "1e400", "-1e400", "1E+400", "1e308", "-1e308", "1.7976931348623157e308",
    "1.7976931348623159e308", "9223372036854775807", "9223372036854775808", "-9223372036854775808",
    "-9223372036854775809", "18446744073709551616", "9007199254740993", "1" + "0" * 5000, "-0.0", "-0", "0",
    "0.0", "0e0", "5e-324", "1e-400", "-1e-400", "NaN", "Infinity", "-Infinity", "1.5", "4.0", "1e2", "2e0",
)
def _number_token(f: float) -> Raw:
    if math.isnan(f):
        return Raw("NaN")
    if math.isinf(f):
        return Raw("Infinity" if f > 0 else "-Infinity")
    return Raw(repr(f))


extreme_numbers = st.one_of(
    _raw(*EXTREME_TOKENS),
    st.integers(min_value=2**63 - 3, max_value=2**64 + 3).flatmap(lambda n: st.sampled_from([n, -n])),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.integers(min_value=0, max_value=400).map(lambda d: Raw("9" * max(1, d))),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda f: _number_token(f)),
    st.floats(allow_nan=False, allow_infinity=False),
)

_offsets = st.one_of(
    st.sampled_from([timedelta(hours=h, minutes=m) for h, m in ((0, 0), (1, 0), (-1, 0), (14, 0), (-14, 0), (23, 59), (-23, 59), (5, 30))]),
    st.integers(min_value=-(24 * 60 - 1), max_value=24 * 60 - 1).map(lambda m: timedelta(minutes=m)),
)
EDGE_TIMESTAMPS = (
    "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00Z", "0001-01-01T00:00:00",
    "9999-12-31T23:59:59.999999Z", "9999-12-31T23:59:59.999999+14:00", "0001-01-01T00:00:00-23:59",
    "1970-01-01T00:00:00Z", "1969-12-31T23:59:59Z", "1677-09-21T00:12:43Z", "2262-04-11T23:47:16.854775807Z",
    "2262-04-12T00:00:00Z", "1900-01-01", "0000-01-01T00:00:00Z", "10000-01-01T00:00:00Z", "2026-02-30T00:00:00Z",
    "2026-13-01T00:00:00Z", "2026-01-01T24:00:00Z", "2026-01-01T00:00:60Z", "2026-01-01T00:00:00+24:00",
    "2026-01-01T00:00:00+99:99", "2026-01-01T00:00:00 UTC", "yesterday", "now", "", " ", "T", "Z", "2026",
    "2026-01-01T00:00:00.0000000001Z", "+002026-01-01T00:00:00Z", "2026-W01-1", "2026-001", "١٩٧٠-٠١-٠١",
)
_years = st.integers(min_value=1, max_value=9999)
far_datetimes = st.builds(
    lambda d, off: d.replace(tzinfo=timezone(off)).isoformat() if off is not None else d.isoformat(),
    st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59)),
    st.one_of(st.none(), _offsets),
)
relative = st.builds(
    Now,
    st.one_of(
        st.sampled_from([timedelta(seconds=s) for s in (0, -1, 1, 299, 301, -299, -301, 3600, -3600, 86400 * 365, -86400 * 3650)]),
        st.integers(min_value=-(10**9), max_value=10**9).map(lambda s: timedelta(seconds=s)),
    ),
    st.one_of(st.none(), _offsets),
)
timestamps = st.one_of(
    _raw(*(json.dumps(t, ensure_ascii=False) for t in EDGE_TIMESTAMPS)),
    far_datetimes,
    relative,
    # numbers: pydantic reads them as Unix seconds or milliseconds
    _raw("-62135596801", "-62135596800", "253402300799", "253402300800", "1e20", "-1e20", "1e400", "0", "-1"),
    st.integers(min_value=-(2**70), max_value=2**70),
)

SPECIAL_STRINGS = (
    "\u0000", "a\u0000b", "\u202eevil\u202c", "مرحبا", "\u200f\u200e", "\ufeff", "\uffff", "\U0001f4a9", "e\u0301",
    "\u2028\u2029", "../../etc/passwd", "${jndi:x}", "%s%n", "'; DROP TABLE x; --", "USD\u0000", "usd", "ＵＳＤ",
    "applicant_history:missed_installments_90d\u0000", "applicant_history:", ":", "::", "a:b:c", "__proto__",
)
unicode_strings = st.one_of(
    st.sampled_from(SPECIAL_STRINGS),
    # lone and swapped surrogates, escaped as a JSON client would write them
    _raw('"\\ud800"', '"\\udfff"', '"\\udfff\\ud800"', '"a\\ud83d"', '"\\u0000"', '"x\\u0000y"', '"\\ud800:x"',
         '"applicant_history:\\ud800"'),
    st.text(st.characters(codec="utf-8"), max_size=40),
    st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=4),  # as \u escapes
)


def _deep(n: int, kind: str) -> Raw:
    if kind == "list":
        return Raw("[" * n + "]" * n)
    if kind == "dict":
        return Raw('{"a":' * n + "1" + "}" * n)
    return Raw("[" * n + "1" + "]" * n)


nestings = st.one_of(
    st.builds(_deep, st.sampled_from([2, 30, 100, 500, 999, 1001, 3000, 5000]), st.sampled_from(["list", "dict", "one"])),
    st.recursive(st.none() | st.integers() | st.text(max_size=5), lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3), max_leaves=20),
)
sizes = st.one_of(
    st.sampled_from([257, 1000, 16 * 1024, 100_000]).map(lambda n: "x" * n),
    st.sampled_from([1001, 5000]).map(lambda n: [1] * n),
    st.sampled_from([[], {}, ""]),
)
wrong_types = st.sampled_from([None, True, False, 0, -1, 1.5, "", "x", "1", [], {}, [1], {"a": 1}, [None], ["1"]])

anything = st.one_of(extreme_numbers, timestamps, unicode_strings, nestings, sizes, wrong_types)
keys = st.one_of(unicode_strings, st.sampled_from(["unexpected", "", "applicant_id", "__class__", "x" * 300]))


def _numeric_field() -> st.SearchStrategy[Any]:
    return st.one_of(extreme_numbers, extreme_numbers, wrong_types, unicode_strings, nestings, sizes)


def _time_field() -> st.SearchStrategy[Any]:
    return st.one_of(timestamps, timestamps, timestamps, wrong_types, extreme_numbers, unicode_strings)


def _text_field() -> st.SearchStrategy[Any]:
    return st.one_of(unicode_strings, unicode_strings, sizes, wrong_types, extreme_numbers, nestings)


# ---------------------------------------------------------------------------- bodies
_ids = st.integers(min_value=0, max_value=2**63 - 1).filter(lambda i: i not in RESERVED)
_app_ids = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_.:", min_size=8, max_size=40).map(lambda s: "fuzz-" + s)


def _mutations(draw: Any) -> int:
    """How many changes to make to a valid body: 1-3, and about one body in ten left valid."""
    return 0 if draw(st.integers(min_value=0, max_value=9)) == 9 else draw(st.integers(min_value=1, max_value=3))


def _mutate(draw: Any, body: dict[str, Any], fields: dict[str, st.SearchStrategy[Any]], required: set[str]) -> tuple[str, bool]:
    """Apply ``_mutations`` changes to ``body`` in place; returns a label and whether the body is
    certainly invalid afterwards."""
    labels = []
    for _ in range(_mutations(draw)):
        kind = draw(st.sampled_from(["replace", "replace", "replace", "replace", "drop", "unknown", "replace_any"]))
        name = draw(st.sampled_from(sorted(fields)))
        if kind == "drop":
            body.pop(name, None)
            labels.append(f"drop {name}")
        elif kind == "unknown":
            key = draw(keys)
            if key not in fields and key not in body:
                body[key] = draw(anything)
                labels.append("unknown key")
        else:
            body[name] = draw(anything if kind == "replace_any" else fields[name])
            labels.append(f"{name}={_kind(body[name])}")
    return ", ".join(labels) or "valid", _certainly_bad(body, set(fields), required)


def _certainly_bad(body: dict[str, Any], known: set[str], required: set[str]) -> bool:
    """A top-level key missing or unknown: refused whatever the values."""
    return not required <= set(body) or not set(body) <= known


def _kind(value: Any) -> str:
    if isinstance(value, Raw):
        return "raw:" + (value[:12] + "…" if len(value) > 12 else value)
    if isinstance(value, Now):
        return f"now{value.offset.total_seconds():+.0f}s"
    if isinstance(value, str) and len(value) > 32:
        return f"str[{len(value)}]"
    if isinstance(value, (list, dict)) and len(value) > 5:
        return f"{type(value).__name__}[{len(value)}]"
    return repr(value)[:24]


@st.composite
def decision_requests(draw: Any) -> FuzzRequest:
    body: dict[str, Any] = {
        "application_id": draw(_app_ids),
        "applicant_id": draw(st.sampled_from([900_001, 900_002, 123_456_789, 1, 0])),
        "merchant_id": draw(st.sampled_from([7, 1, 0])),
        "amount": draw(st.floats(min_value=1, max_value=2000)),
        "currency": "USD",
        "term": draw(st.integers(min_value=1, max_value=12)),
        "timestamp": Now(timedelta(seconds=draw(st.integers(min_value=-120, max_value=60)))),
    }
    fields = {
        "application_id": _text_field(), "applicant_id": _numeric_field(), "merchant_id": _numeric_field(),
        "amount": _numeric_field(), "currency": _text_field(), "term": _numeric_field(), "timestamp": _time_field(),
    }
    label, certain = _mutate(draw, body, fields, set(fields))
    return FuzzRequest("POST", "/v1/decisions", body, label=f"/v1/decisions:{label}", must_reject=certain,
                       ascii_only=draw(st.booleans()))


@st.composite
def feature_requests(draw: Any) -> FuzzRequest:
    rows = draw(st.integers(min_value=1, max_value=3))
    body: dict[str, Any] = {}
    if draw(st.booleans()):
        body["feature_service"] = "underwriting_v1"
    else:
        refs = ["applicant_history:missed_installments_90d", "checkout_features:amount_to_avg_prior",
                "checkout_features:order_amount", "checkout_features:term_installments", "merchant_risk:default_rate_90d"]
        body["features"] = draw(st.lists(st.sampled_from(refs), min_size=1, max_size=5, unique=True))
    body["entities"] = {
        "applicant_id": draw(st.lists(st.sampled_from([900_001, 900_002, 7_301_001, 1, 0]), min_size=rows, max_size=rows)),
        "merchant_id": draw(st.lists(st.sampled_from([7, 7_301_002, 1]), min_size=rows, max_size=rows)),
        "amount": draw(st.lists(st.floats(min_value=0, max_value=1e6), min_size=rows, max_size=rows)),
        "term": draw(st.lists(st.integers(min_value=1, max_value=24), min_size=rows, max_size=rows)),
    }
    if draw(st.booleans()):
        body["full_feature_names"] = draw(st.booleans())
    entities = body["entities"]
    # the request fields of the on-demand view and the join keys: one cell or the whole column
    cell = st.one_of(extreme_numbers, extreme_numbers, extreme_numbers, wrong_types, unicode_strings, timestamps, nestings)
    labels = []
    for _ in range(_mutations(draw)):
        what = draw(st.sampled_from(["cell", "cell", "cell", "column", "length", "drop", "extra", "top", "drop_top"]))
        column = draw(st.sampled_from(sorted(entities) or ["applicant_id"]))
        if what == "cell" and isinstance(entities.get(column), list) and entities[column]:
            i = draw(st.integers(min_value=0, max_value=len(entities[column]) - 1))
            entities[column][i] = draw(cell)
            labels.append(f"{column}[{i}]={_kind(entities[column][i])}")
        elif what == "column":
            entities[column] = draw(st.one_of(anything, st.lists(cell, min_size=0, max_size=3)))
            labels.append(f"{column}={_kind(entities[column])}")
        elif what == "length" and column in entities and isinstance(entities[column], list):
            entities[column] = entities[column] + draw(st.lists(cell, min_size=1, max_size=2))
            labels.append(f"{column} longer")
        elif what == "drop":
            entities.pop(column, None)
            labels.append(f"drop {column}")
        elif what == "extra":
            entities[draw(keys)] = draw(st.one_of(anything, st.lists(cell, min_size=1, max_size=3)))
            labels.append("extra entity")
        elif what == "top":
            name = draw(st.sampled_from(["features", "feature_service", "entities", "full_feature_names"]))
            body[name] = draw(st.one_of(anything, st.lists(unicode_strings, min_size=1, max_size=3)))
            labels.append(f"{name}={_kind(body[name])}")
        elif what == "drop_top":
            body.pop("entities", None)
            labels.append("drop entities")
    known = {"features", "feature_service", "entities", "full_feature_names"}
    if draw(st.integers(min_value=0, max_value=9)) == 0:
        key = draw(keys)
        if key not in known:
            body[key] = draw(anything)
            labels.append("unknown key")
    return FuzzRequest("POST", "/get-online-features", body, label="/get-online-features:" + (", ".join(labels) or "valid"),
                       must_reject=_certainly_bad(body, known, {"entities"}), ascii_only=draw(st.booleans()))


@st.composite
def push_requests(draw: Any) -> FuzzRequest:
    view = draw(st.sampled_from(sorted(VIEWS)))
    key, features = VIEWS[view]
    rows = draw(st.integers(min_value=1, max_value=3))
    df: dict[str, Any] = {
        key: draw(st.lists(_ids, min_size=rows, max_size=rows)),
        "event_timestamp": [Now(-timedelta(seconds=draw(st.integers(min_value=60, max_value=86400)))) for _ in range(rows)],
    }
    for name in features:
        df[name] = draw(st.lists(st.floats(min_value=0, max_value=1000), min_size=rows, max_size=rows))
    body: dict[str, Any] = {"push_source_name": view, "df": df, "to": draw(st.sampled_from(["online", "online", "online", "offline", "online_and_offline"]))}
    if draw(st.integers(min_value=0, max_value=4)) == 0:
        body["feature_view"] = body.pop("push_source_name")
    # a cell of a key column: anything except a reserved id
    key_cell = st.one_of(extreme_numbers, wrong_types, unicode_strings, nestings).filter(_not_reserved)
    value_cell = st.one_of(extreme_numbers, extreme_numbers, wrong_types, unicode_strings, timestamps, nestings)
    time_cell = st.one_of(timestamps, timestamps, wrong_types, extreme_numbers)
    labels = []
    for _ in range(_mutations(draw)):
        what = draw(st.sampled_from(["key", "key", "time", "time", "value", "value", "column", "length", "drop", "extra", "top", "drop_top"]))
        if what in ("key", "time", "value"):
            column = key if what == "key" else "event_timestamp" if what == "time" else draw(st.sampled_from(features))
            if isinstance(df.get(column), list) and df[column]:
                i = draw(st.integers(min_value=0, max_value=len(df[column]) - 1))
                df[column][i] = draw(key_cell if what == "key" else time_cell if what == "time" else value_cell)
                labels.append(f"{column}[{i}]={_kind(df[column][i])}")
        elif what == "column":
            column = draw(st.sampled_from(sorted(df)))
            df[column] = draw(st.one_of(anything, st.lists(value_cell, min_size=0, max_size=3)))
            if column == key:  # a whole key column replaced: keep reserved ids out of it
                df[column] = df[column] if _not_reserved(df[column]) else [1]
            labels.append(f"{column}={_kind(df[column])}")
        elif what == "length":
            column = draw(st.sampled_from(sorted(df)))
            if isinstance(df[column], list) and column != key:
                df[column] = df[column] + draw(st.lists(value_cell, min_size=1, max_size=2))
                labels.append(f"{column} longer")
        elif what == "drop":
            column = draw(st.sampled_from(sorted(df)))
            df.pop(column)
            labels.append(f"drop {column}")
        elif what == "extra":
            df[draw(keys.filter(lambda k: k not in df))] = draw(st.lists(value_cell, min_size=rows, max_size=rows))
            labels.append("extra column")
        elif what == "top":
            name = draw(st.sampled_from(["push_source_name", "feature_view", "to", "df"]))
            body[name] = draw(st.one_of(anything, unicode_strings, st.sampled_from(["applicant", "checkout", "checkout_features", "underwriting_v1"])))
            labels.append(f"{name}={_kind(body[name])}")
        elif what == "drop_top":
            body.pop("df", None)
            labels.append("drop df")
    known = {"push_source_name", "feature_view", "df", "to"}
    if draw(st.integers(min_value=0, max_value=9)) == 0:
        extra = draw(keys)
        if extra not in known:
            body[extra] = draw(anything)
            labels.append("unknown key")
    return FuzzRequest("POST", "/push", body, label="/push:" + (", ".join(labels) or "valid"),
                       must_reject=_certainly_bad(body, known, {"df"}), ascii_only=draw(st.booleans()))


def _not_reserved(value: Any) -> bool:
    if isinstance(value, list):
        return all(_not_reserved(v) for v in value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return True
    try:
        return float(value) not in RESERVED
    except OverflowError:
        return True


# Whole bodies that are not a JSON object, and odd content types: the same for every POST route.
NOT_OBJECTS = (
    b"", b"null", b"[]", b"{}", b'"x"', b"1", b"1e400", b"{not json", b"{", b"}", b'{"a":}', b"[1, 2]", b'{"a":1,}',
    b'{"a":1}{"b":2}', b'{"a":1} trailing', b"\xef\xbb\xbf{}", b'{"a":"\xff"}', b"\xff\xfe{\x00}\x00", b'{"a":"\\ud800"}',
    b'{"\\ud800":1}', b"NaN", b"Infinity", b"\x00", b'{"a":1, "a":2}', ("[" * 100_000 + "]" * 100_000).encode(),
    ('{"a":' * 50_000 + "1" + "}" * 50_000).encode(), b'{"a":' + b"1" + b"0" * 5000 + b"}",
)
CONTENT_TYPES = (
    None, "text/plain", "application/json; charset=latin-1", "application/json; charset=utf-16", "application/json;;",
    "multipart/form-data; boundary=x", "application/x-www-form-urlencoded", "application/xml", "*/*", "application/json\u00e9",
)


@st.composite
def raw_bodies(draw: Any, route: str) -> FuzzRequest:
    base = draw(REQUESTS_BY_ROUTE[route])
    choice = draw(st.sampled_from(["bytes", "bytes", "content_type", "chunked", "query"]))
    if choice == "bytes":
        body = draw(st.sampled_from(NOT_OBJECTS))
        return FuzzRequest("POST", route, body, label=f"{route}:body {body[:16]!r}", must_reject=True)
    if choice == "content_type":
        ctype = draw(st.sampled_from(CONTENT_TYPES))
        return FuzzRequest("POST", route, base.body, headers=(("Content-Type", ctype),), label=f"{route}:content-type {ctype!r}")
    if choice == "chunked":
        return FuzzRequest("POST", route, base.body, chunked=True, label=f"{route}:chunked {base.label.split(':', 1)[1]}",
                           ascii_only=base.ascii_only, must_reject=base.must_reject)
    query = draw(st.sampled_from(["a=1", "features=x", "%ff", "a=" + "x" * 5000, "\u202e=1", "a&a&a", "%00"]))
    return FuzzRequest("POST", route, base.body, query=query, label=f"{route}:query", ascii_only=base.ascii_only, must_reject=base.must_reject)


@st.composite
def get_requests(draw: Any, route: str) -> FuzzRequest:
    method = draw(st.sampled_from(["GET", "GET", "GET", "HEAD", "OPTIONS", "POST", "PUT", "DELETE", "PATCH"]))
    path = draw(st.sampled_from([route, route, route, route + "/", "/" + route, route + "%00", route + "/..", route + "%2e",
                                 route.upper(), route + ";x", route + "/" + "x" * 3000]))
    query = draw(st.sampled_from(["", "", "a=1", "%ff%fe", "x=" + "y" * 3000, "\u202e", "a[]=1&a[]=2", "=&=&", "%00"]))
    key = draw(st.sampled_from([None, "keep", "keep", "keep", "", "wrong", "x" * 4000, b"\xff\xfe", "test-key-\u00e9"]))
    headers: list[tuple[str, Any]] = []
    if key != "keep":
        headers.append(("X-API-Key", key))
    if draw(st.booleans()):
        headers.append(draw(st.sampled_from([("Accept", "application/xml"), ("Range", "bytes=0-1"), ("Accept-Encoding", "br, gzip"),
                                             ("If-None-Match", "*"), ("Content-Type", "text/plain")])))
    body = draw(st.sampled_from([None, None, b"", b"{}", b"garbage", b"\xff"]))
    return FuzzRequest(method, path, body, headers=tuple(headers), query=query, label=f"{route}:{method} {path[:30]} key={key!r:.12}")


REQUESTS_BY_ROUTE: dict[str, st.SearchStrategy[FuzzRequest]] = {
    "/v1/decisions": decision_requests(),
    "/get-online-features": feature_requests(),
    "/push": push_requests(),
}
REQUESTS: dict[str, st.SearchStrategy[FuzzRequest]] = {
    **{route: st.one_of(strategy, strategy, strategy, raw_bodies(route)) for route, strategy in REQUESTS_BY_ROUTE.items()},
    **{route: get_requests(route) for route in GET_ROUTES},
}


# ------------------------------------------------------------------ known bug classes
def _known() -> list[FuzzRequest]:
    """The requests of the three classes of 500 found before, written out by hand."""
    out = []
    # outside the years 1-9999 once in UTC; beyond the allowed clock skew (5 minutes by default)
    for i, stamp in enumerate(("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", Now(timedelta(minutes=6)), Now(-timedelta(minutes=6)),
                  Now(timedelta(days=1), tz=None), "2020-01-01T00:00:00")):
        body = {"application_id": f"fuzz-known-ts-{i}", "applicant_id": 1, "merchant_id": 1, "amount": 10.0, "currency": "USD",
                "term": 4, "timestamp": stamp}
        out.append(FuzzRequest("POST", "/v1/decisions", body, label=f"/v1/decisions:known timestamp {_kind(stamp)}", must_reject=True))
    for name, value in (("amount", "abc"), ("term", "x"), ("amount", Raw("1" + "0" * 400)), ("term", Raw("1" + "0" * 400))):
        entities = {"applicant_id": [1], "merchant_id": [1], "amount": [10.0], "term": [4], name: [value]}
        for target in ({"feature_service": "underwriting_v1"}, {"features": ["checkout_features:amount_to_avg_prior"]}):
            out.append(FuzzRequest("POST", "/get-online-features", {**target, "entities": entities},
                                   label=f"/get-online-features:known {name}={_kind(value)}", must_reject=True))
    huge, big = Raw("1" + "0" * 400), 9223372036854775808
    cases = [("applicant_history", "applicant_id", v, True) for v in (big, Raw("1e308"), huge, Raw("-9223372036854775809"))]
    # float64 features: 2**63 and 1e308 are finite floats there, only 10**400 is certainly refused
    cases += [("applicant_history", "loans_30d", v, v is huge) for v in (big, Raw("1e308"), huge)]
    cases += [("merchant_activity", c, v, True) for c in ("merchant_id", "applications_90d") for v in (big, Raw("1e308"), huge)]
    cases += [("merchant_risk", "outcomes_90d", v, True) for v in (big, Raw("1e308"), huge)]
    for view, column, value, certain in cases:
        df = _push_row(view, 55)
        df[column] = [value]
        out.append(FuzzRequest("POST", "/push", {"push_source_name": view, "df": df, "to": "online"},
                               label=f"/push:known {view}.{column}={_kind(value)}", must_reject=certain))
    # outside the years 1-9999 in UTC; after the clock plus the allowed skew; before the floor (2000 by default)
    for stamp in ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", Now(timedelta(days=1)), Now(timedelta(minutes=6)),
                  "1999-12-31T23:59:59Z", "1970-01-01T00:00:00Z"):
        df = _push_row("applicant_history", 56)
        df["event_timestamp"] = [stamp]
        out.append(FuzzRequest("POST", "/push", {"push_source_name": "applicant_history", "df": df},
                               label=f"/push:known event_timestamp={_kind(stamp)}", must_reject=True))
    return out


def _push_row(view: str, key_value: int) -> dict[str, list[Any]]:
    key, features = VIEWS[view]
    return {key: [key_value], "event_timestamp": [Now(-timedelta(minutes=10))], **{f: [1] for f in features}}


KNOWN: list[FuzzRequest] = _known()
