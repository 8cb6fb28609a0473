"""``POST /v1/decisions`` without FastAPI's routing and middleware: the checkout's hot path.

    app.add_middleware(DecisionRoute)      # inside Guard: key, role and body size are checked first
    DecisionRoute.serve(replica.decide)    # in each replica: the function FastAPI routes to

A well-formed application — ``Content-Type: application/json`` and a JSON body the request
schema accepts — goes straight to the replica's handler, the same coroutine FastAPI's route
calls, and the ``Response`` it returns is sent as FastAPI sends it. Everything else is handed
to FastAPI unchanged, the body as it was read: another path or method, another content type,
a body that is not JSON or that the schema refuses (FastAPI's 422 names each bad field, as
before). An exception from the handler reaches the application's 500 handler, which sits
outside this middleware. The route stays FastAPI's for the OpenAPI document.

Why: in a decision replica the event loop holds the GIL about two thirds of the time, and a
quarter of that went to FastAPI's and Starlette's layers around the handler (route matching
over every route, five middlewares, dependency solving). BENCHMARKS.md has the figures.

One serving replica per process: the handler is a class attribute, as ``Guard``'s keys are.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from mlplatform.serving.schemas import DecisionRequest

__all__ = ["DECISIONS_PATH", "DecisionRoute"]

DECISIONS_PATH = "/v1/decisions"


class DecisionRoute:
    """ASGI middleware (see the module docstring)."""

    handler: Callable[[DecisionRequest], Awaitable[Any]] | None = None

    def __init__(self, app: Any) -> None:
        self.app = app

    @classmethod
    def serve(cls, handler: Callable[[DecisionRequest], Awaitable[Any]] | None) -> None:
        """Route valid applications to ``handler`` (None: everything goes to FastAPI)."""
        cls.handler = handler

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        handler = type(self).handler
        if handler is None or scope["type"] != "http" or scope["path"] != DECISIONS_PATH or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if _content_type(scope["headers"]) != b"application/json":
            return await self.app(scope, receive, send)
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before its body arrived
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body = b"".join(chunks)
        request = None
        if body:
            try:
                request = DecisionRequest.model_validate(json.loads(body))
            except Exception:  # not JSON, or refused by the schema: FastAPI answers it, as before
                request = None
        if request is None:
            return await self.app(scope, _replay(body, receive), send)
        response = await handler(request)
        await response(scope, receive, send)


def _content_type(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The first Content-Type header, as Starlette's ``Request.headers.get`` reads it."""
    for name, value in headers:
        if name == b"content-type":
            return value
    return None


def _replay(body: bytes, receive: Any) -> Callable[[], Awaitable[dict[str, Any]]]:
    """A ``receive`` that gives ``body`` (already read) first, then whatever the client sends."""
    pending: bytes | None = body

    async def replay() -> dict[str, Any]:
        nonlocal pending
        if pending is None:
            return await receive()
        out, pending = {"type": "http.request", "body": pending, "more_body": False}, None
        return out

    return replay
