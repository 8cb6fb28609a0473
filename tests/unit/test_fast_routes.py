"""The fast routes answer exactly as FastAPI's routes do, for every body."""

import asyncio
import json
from datetime import UTC, datetime

import pytest
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from hypothesis import given, settings
from hypothesis import strategies as st

from mlplatform.serving.fast_routes import FastRoutes
from mlplatform.serving.http import _bug, _invalid
from mlplatform.serving.schemas import DecisionRequest, FeatureRequest

VALID = {"application_id": "app-1", "applicant_id": 42, "merchant_id": 7, "amount": 120.5,
         "currency": "USD", "term": 4, "timestamp": datetime.now(UTC).isoformat()}
LOOKUP = {"feature_service": "underwriting_v1", "entities": {"applicant_id": [1, 2], "merchant_id": [7, 7]}}
SCHEMAS = {"/v1/decisions": DecisionRequest, "/get-online-features": FeatureRequest}


class Calls:
    """What each way did: ``direct`` (the fast route called the handler) or ``routed`` (FastAPI did)."""

    def __init__(self) -> None:
        self.direct, self.routed = [], []

    async def handler(self, body) -> Response:
        self.direct.append(body)
        return JSONResponse({"echo": json.loads(body.model_dump_json())})

    def routes(self):
        return {path: (schema, self.handler) for path, schema in SCHEMAS.items()}


def build(calls: Calls, *, fast: bool) -> FastAPI:
    app = FastAPI()
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(Exception, _bug)

    @app.post("/v1/decisions")
    async def decide(body: DecisionRequest) -> Response:
        calls.routed.append(body)
        return JSONResponse({"echo": json.loads(body.model_dump_json())})

    @app.post("/get-online-features")
    async def lookup(body: FeatureRequest) -> Response:
        calls.routed.append(body)
        return JSONResponse({"echo": json.loads(body.model_dump_json())})

    @app.post("/v1/other")
    async def other(body: DecisionRequest) -> Response:
        return JSONResponse({"other": body.application_id})

    if fast:
        app.add_middleware(FastRoutes)
    return app


def call(app, body: bytes, *, path="/v1/decisions", method="POST", content_type=b"application/json", chunks=1):
    headers = [(b"content-type", content_type)] if content_type is not None else []
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    size = max(1, -(-len(body) // chunks))
    parts = [body[i:i + size] for i in range(0, len(body), size)] or [b""]
    messages = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    async def run():
        try:
            await app(scope, receive, send)
        except Exception:  # ServerErrorMiddleware re-raises after answering
            pass

    asyncio.run(run())
    start = next(m for m in sent if m["type"] == "http.response.start")
    out = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], sorted(start["headers"]), out


@pytest.fixture
def calls():
    calls = Calls()
    FastRoutes.serve(calls.routes())
    yield calls
    FastRoutes.serve({})


def both(calls: Calls, body: bytes, **kw):
    return call(build(calls, fast=False), body, **kw), call(build(calls, fast=True), body, **kw)


@pytest.mark.parametrize(("path", "doc", "schema"), [("/v1/decisions", VALID, DecisionRequest),
                                                     ("/get-online-features", LOOKUP, FeatureRequest)])
def test_a_valid_request_skips_fastapi_and_answers_the_same(calls, path, doc, schema):
    body = json.dumps(doc).encode()
    slow, fast = both(calls, body, path=path)
    assert fast == slow and slow[0] == 200
    assert len(calls.routed) == 1 and len(calls.direct) == 1  # the fast app called the handler itself
    assert calls.direct[0] == calls.routed[0] == schema.model_validate(doc)
    # a body in several chunks too
    assert call(build(calls, fast=True), body, path=path, chunks=5) == slow and len(calls.direct) == 2


@pytest.mark.parametrize(
    ("body", "kw"),
    [
        (json.dumps(VALID).encode(), {"content_type": b"application/json; charset=utf-8"}),
        (json.dumps(VALID).encode(), {"content_type": None}),
        (json.dumps(VALID).encode(), {"content_type": b"text/plain"}),
        (json.dumps(VALID).encode(), {"path": "/v1/other"}),
        (json.dumps(VALID).encode(), {"method": "PUT"}),
        (b"", {}),
        (b"{not json", {}),
        (b"[" * 100_000 + b"]" * 100_000, {}),  # too deep for json: FastAPI's 400, not a 500
        (json.dumps({**VALID, "amount": "NaN"}).encode(), {}),
        (json.dumps({**VALID, "applicant_id": 42.0}).encode(), {}),
        (json.dumps({**VALID, "extra": 1}).encode(), {}),
        (b'{"application_id": "a", "amount": NaN}', {}),
        (json.dumps([VALID]).encode(), {}),
        (json.dumps({**LOOKUP, "features": ["v:f"]}).encode(), {"path": "/get-online-features"}),  # both targets
        (json.dumps({"feature_service": "s", "entities": {}}).encode(), {"path": "/get-online-features"}),
        (json.dumps(VALID).encode(), {"path": "/get-online-features"}),
    ],
)
def test_anything_else_gets_fastapis_own_answer(calls, body, kw):
    slow, fast = both(calls, body, **kw)
    assert fast == slow
    assert not calls.direct  # never answered by a fast route


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(VALID) + ["x"]),
                       st.none() | st.booleans() | st.integers(-5, 10**20) | st.floats(allow_nan=False) | st.text(max_size=12),
                       max_size=9),
       st.booleans())
def test_generated_applications_get_the_same_answer_either_way(fields, over_valid):
    calls = Calls()
    FastRoutes.serve(calls.routes())
    doc = {**VALID, **fields} if over_valid else fields
    slow, fast = both(calls, json.dumps(doc).encode())
    assert fast == slow
    assert len(calls.direct) == (1 if slow[0] == 200 else 0)


@settings(max_examples=100, deadline=None)
@given(st.fixed_dictionaries({}, optional={
    "features": st.none() | st.lists(st.text(max_size=8), max_size=3),
    "feature_service": st.none() | st.text(max_size=8) | st.integers(),
    "entities": st.dictionaries(st.text(max_size=4), st.lists(st.integers(-3, 3) | st.text(max_size=3) | st.none(), max_size=3), max_size=3),
    "full_feature_names": st.booleans() | st.integers(0, 2) | st.text(max_size=3),
}))
def test_generated_lookups_get_the_same_answer_either_way(doc):
    calls = Calls()
    FastRoutes.serve(calls.routes())
    slow, fast = both(calls, json.dumps(doc).encode(), path="/get-online-features")
    assert fast == slow
    assert len(calls.direct) == (1 if slow[0] == 200 else 0)


def test_without_a_replica_everything_goes_to_fastapi(calls):
    FastRoutes.serve({})
    assert call(build(calls, fast=True), json.dumps(VALID).encode())[0] == 200
    assert len(calls.routed) == 1 and not calls.direct
