"""The guard in front of every route: API key and body size, checked before any parsing.

    app.add_middleware(Guard)
    Guard.configure(key_digests)      # in each replica: SHA-256 hex digests of the valid keys

- ``X-API-Key`` must be one of the configured keys (401 otherwise). Keys are compared as
  SHA-256 digests with ``hmac.compare_digest``, against every configured key, so the time
  taken says nothing about the key or which one matched. Only the digests reach replicas.
  ``GET /health`` is open, for load balancers.
- Bodies are limited (413): 16 KiB for ``/v1/decisions`` (an application is ~300 bytes),
  4 MiB elsewhere (feature lookups, pushes). A declared ``Content-Length`` is checked before
  reading; a chunked body is read up to the limit, then handed on.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

__all__ = ["DECISION_MAX_BYTES", "MAX_BODY_BYTES", "Guard"]

DECISION_MAX_BYTES = 16 * 1024
MAX_BODY_BYTES = 4 * 1024 * 1024
_OPEN_PATHS = frozenset({"/health"})


class Guard:
    """ASGI middleware (see the module docstring); the keys come from ``configure``."""

    digests: tuple[bytes, ...] = ()

    def __init__(self, app: Any) -> None:
        self.app = app

    @classmethod
    def configure(cls, digests: tuple[str, ...]) -> None:
        cls.digests = tuple(bytes.fromhex(d) for d in digests)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in _OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if not self._authorized(headers.get(b"x-api-key")):
            return await _send_json(send, 401, {"error": "unauthorized", "message": "missing or wrong X-API-Key header"})
        limit = DECISION_MAX_BYTES if scope["path"] == "/v1/decisions" else MAX_BODY_BYTES
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > limit:
                return await _send_json(send, 413, _too_large(limit))
            return await self.app(scope, receive, send)
        if scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        # No Content-Length (chunked): read the body up to the limit, then hand it on.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                return await _send_json(send, 413, _too_large(limit))
            if not message.get("more_body"):
                break
        body: bytes | None = b"".join(chunks)

        async def replay() -> dict[str, Any]:
            nonlocal body
            if body is None:  # the body was handed on: what follows (a disconnect) comes from the client
                return await receive()
            out, body = {"type": "http.request", "body": body, "more_body": False}, None
            return out

        return await self.app(scope, replay, send)

    def _authorized(self, key: bytes | None) -> bool:
        if not key or not self.digests:
            return False
        digest = hashlib.sha256(key).digest()
        ok = False
        for expected in self.digests:  # compare with every key: timing says nothing about which
            ok |= hmac.compare_digest(digest, expected)
        return ok


def _too_large(limit: int) -> dict[str, Any]:
    return {"error": "payload_too_large", "message": f"request body is larger than {limit} bytes"}


async def _send_json(send: Any, status: int, content: dict[str, Any]) -> None:
    body = json.dumps(content).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
