"""The guard in front of every route: API key, its role, and body size, checked before any parsing.

    app.add_middleware(Guard)
    Guard.configure(keys)      # in each replica: ((sha256 hex digest, (role, ...)), ...)

- ``X-API-Key`` must be one of the configured keys (401 otherwise). Keys are compared as
  SHA-256 digests with ``hmac.compare_digest``, against every configured key, so the time
  taken says nothing about the key or which one matched. Only the digests reach replicas.
  ``GET /health`` is open, for load balancers.
- The key must hold the role of the route (403 otherwise, naming the role):

  ========================  ==================  =============================================
  role                      routes              who holds it
  ========================  ==================  =============================================
  ``decide``                ``/v1/decisions``   checkout
  ``predict``               ``/v2/models/…``,   any model's scores (Open Inference Protocol,
                            ``/v1/models/…``    and feature-aware predict)
  ``read_features``         ``/get-online-features``  models, analysts' tools
  ``write_features``        ``/push``,          feature pipelines, event producers
                            ``/v1/events/…``
  ``operate``               ``/v1/internal/…``  operators
  ========================  ==================  =============================================

  Any valid key may read the OpenAPI document (``/openapi.json``); other paths need a valid
  key too (and then get a 404), so nothing about the service answers an anonymous caller but
  ``/health`` and the V2 ``/v2/health/live`` and ``/v2/health/ready``.
- Bodies are limited (413): 16 KiB for ``/v1/decisions`` (an application is ~300 bytes),
  4 MiB elsewhere (feature lookups, pushes). A declared ``Content-Length`` is checked before
  reading; a chunked body is read up to the limit, then handed on.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["DECISION_MAX_BYTES", "MAX_BODY_BYTES", "ROUTE_ROLES", "Guard", "replay_body", "role_for"]

DECISION_MAX_BYTES = 16 * 1024
MAX_BODY_BYTES = 4 * 1024 * 1024
# Liveness and readiness are open, for load balancers and orchestrators (the V2 ones too).
_OPEN_PATHS = frozenset({"/health", "/v2/health/live", "/v2/health/ready"})
#: The role each route needs: exact paths, then prefixes (ending in "/").
ROUTE_ROLES: dict[str, str] = {
    "/v1/decisions": "decide",
    "/v2": "predict",
    "/v2/models/": "predict",
    "/v1/models/": "predict",
    "/get-online-features": "read_features",
    "/push": "write_features",
    "/v1/events/": "write_features",
    "/v1/internal/": "operate",
}


def role_for(path: str) -> str | None:
    """The role ``path`` needs; None when any valid key will do."""
    role = ROUTE_ROLES.get(path)
    if role is not None:
        return role
    for prefix, role in ROUTE_ROLES.items():
        if prefix.endswith("/") and path.startswith(prefix):
            return role
    return None


class Guard:
    """ASGI middleware (see the module docstring); the keys come from ``configure``."""

    keys: tuple[tuple[bytes, frozenset[str]], ...] = ()

    def __init__(self, app: Any) -> None:
        self.app = app

    @classmethod
    def configure(cls, keys: tuple[tuple[str, tuple[str, ...]], ...]) -> None:
        cls.keys = tuple((bytes.fromhex(digest), frozenset(roles)) for digest, roles in keys)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        # /ui/...: the web UI asks for its own session cookie (mlplatform.ui.session).
        if scope["type"] != "http" or scope["path"] in _OPEN_PATHS or scope["path"].startswith("/ui/") or scope["path"] == "/ui":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        roles = self._roles(headers.get(b"x-api-key"))
        if roles is None:
            return await _send_json(send, 401, {"error": "unauthorized", "message": "missing or wrong X-API-Key header"})
        needed = role_for(scope["path"])
        if needed is not None and needed not in roles:
            message = f"this API key lacks the role {needed!r} that {scope['path']} needs; use a key that holds it"
            return await _send_json(send, 403, {"error": "forbidden", "message": message})
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
        return await self.app(scope, replay_body(b"".join(chunks), receive), send)

    def _roles(self, key: bytes | None) -> frozenset[str] | None:
        """The roles of ``key``; None when it is not a configured key."""
        if not key or not self.keys:
            return None
        digest = hashlib.sha256(key).digest()
        found: frozenset[str] | None = None
        for expected, roles in self.keys:  # compare with every key: timing says nothing about which
            if hmac.compare_digest(digest, expected):
                found = roles if found is None else found | roles
        return found


def replay_body(body: bytes, receive: Any) -> Callable[[], Awaitable[dict[str, Any]]]:
    """A ``receive`` that gives ``body`` (already read) first, then whatever the client sends
    (a disconnect), for an app that reads the body again."""
    pending: bytes | None = body

    async def replay() -> dict[str, Any]:
        nonlocal pending
        if pending is None:
            return await receive()
        out, pending = {"type": "http.request", "body": pending, "more_body": False}, None
        return out

    return replay


def _too_large(limit: int) -> dict[str, Any]:
    return {"error": "payload_too_large", "message": f"request body is larger than {limit} bytes"}


async def _send_json(send: Any, status: int, content: dict[str, Any]) -> None:
    body = json.dumps(content).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
