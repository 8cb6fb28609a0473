"""The hot JSON routes without FastAPI's routing and middleware: ``POST /v1/decisions`` (the
checkout) and ``POST /get-online-features`` (the feature server).

    app.add_middleware(FastRoutes)         # inside Guard: key, role and body size are checked first
    FastRoutes.serve({"/v1/decisions": (DecisionRequest, replica.decide)})   # in each replica

A well-formed request to one of these paths — ``POST``, ``Content-Type: application/json`` and
a JSON body its schema accepts — goes straight to the replica's handler, the same coroutine
FastAPI's route calls, validated as FastAPI validates it (``json.loads``, then the model in
Python mode), and the ``Response`` the handler returns is sent as FastAPI sends it. Everything
else is handed to FastAPI unchanged, the body as it was read: another path or method, another
content type, a body that is not JSON or that the schema refuses (FastAPI's 422 names each bad
field, as before). An exception from the handler reaches the application's 500 handler, which
sits outside this middleware. The routes stay FastAPI's for the OpenAPI document.

Why: in a decision replica the event loop holds the GIL about two thirds of the time, and a
quarter of that went to FastAPI's and Starlette's layers around the handler (route matching
over every route, five middlewares, dependency solving): ~180 µs of CPU a request.
BENCHMARKS.md has the figures (``benchmarks/fast_routes.py``).

One serving replica per process: the routes are a class attribute, as ``Guard``'s keys are.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from pydantic import BaseModel

from mlplatform.serving.guard import replay_body

__all__ = ["FastRoutes"]

Handler = Callable[[Any], Awaitable[Any]]


class FastRoutes:
    """ASGI middleware (see the module docstring)."""

    routes: Mapping[str, tuple[type[BaseModel], Handler]] = {}

    def __init__(self, app: Any) -> None:
        self.app = app

    @classmethod
    def serve(cls, routes: Mapping[str, tuple[type[BaseModel], Handler]]) -> None:
        """Send valid requests to these paths to their handlers (``{}``: everything goes to FastAPI)."""
        cls.routes = dict(routes)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        route = type(self).routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        if route is None or _content_type(scope["headers"]) != b"application/json":
            return await self.app(scope, receive, send)
        schema, handler = route
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
                request = schema.model_validate(json.loads(body))
            except Exception:  # not JSON, or refused by the schema: FastAPI answers it, as before
                request = None
        if request is None:
            return await self.app(scope, replay_body(body, receive), send)
        response = await handler(request)
        await response(scope, receive, send)


def _content_type(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    """The first Content-Type header, as Starlette's ``Request.headers.get`` reads it."""
    for name, value in headers:
        if name == b"content-type":
            return value
    return None

