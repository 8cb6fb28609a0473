"""The UI's session cookie: a key proves itself once at the login page, then a signed cookie
stands for it.

    sessions = Sessions(keys)                       # ((sha256 hex, roles), ...) from load_keys
    cookie = sessions.login("the-secret-key")       # None: not a key that may see the UI
    sessions.verify(cookie)                         # the Session, or None (forged, expired, key gone)

The cookie holds no secret: ``<key id>.<expiry>.<HMAC-SHA256>``, where the key id is a short
hash of the key's digest and the HMAC is keyed by that digest. So only a holder of the key (or
of its digest, which never leaves the server) can make one, and removing or rotating a key
ends every session it opened. A key may open a session if it holds one of ``UI_ROLES``:
``operate`` (an operator) or ``read_ui``, the read-only role made for people who only look.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["COOKIE", "SESSION_SECONDS", "UI_ROLES", "Session", "Sessions"]

COOKIE = "mlp_ui_session"
SESSION_SECONDS = 8 * 3600
UI_ROLES = frozenset({"operate", "read_ui"})


@dataclass(frozen=True)
class Session:
    """Who is looking: the key's id (not the key) and its roles, until ``expires`` (epoch seconds)."""

    key_id: str
    roles: tuple[str, ...]
    expires: int


class Sessions:
    """Signs and checks session cookies for the configured keys.

    Args:
        keys: ``(sha256 hex digest, roles)`` pairs, as ``mlplatform.serving.keys.load_keys`` returns.
        lifetime: seconds a session lasts.
    """

    def __init__(self, keys: Iterable[tuple[str, Iterable[str]]], *, lifetime: int = SESSION_SECONDS) -> None:
        self._by_id: dict[str, tuple[str, tuple[str, ...]]] = {}
        for digest, roles in keys:
            roles = tuple(roles)
            if UI_ROLES.intersection(roles):
                self._by_id[_key_id(digest)] = (digest, roles)
        self.lifetime = lifetime

    def login(self, key: str, *, now: float | None = None) -> str | None:
        """A signed cookie value for ``key``, or None when it is not a key allowed in the UI."""
        digest = hashlib.sha256(key.encode()).hexdigest()
        key_id = _key_id(digest)
        if key_id not in self._by_id or not hmac.compare_digest(self._by_id[key_id][0], digest):
            return None
        expires = int((time.time() if now is None else now) + self.lifetime)
        return f"{key_id}.{expires}.{_sign(digest, key_id, expires)}"

    def verify(self, cookie: str | None, *, now: float | None = None) -> Session | None:
        """The session ``cookie`` stands for, or None: malformed, forged, expired, or its key removed."""
        if not cookie or cookie.count(".") != 2:
            return None
        key_id, expires_text, signature = cookie.split(".")
        known = self._by_id.get(key_id)
        if known is None or not expires_text.isdigit():
            return None
        expires = int(expires_text)
        if not hmac.compare_digest(_sign(known[0], key_id, expires), signature):
            return None
        if expires < (time.time() if now is None else now):
            return None
        return Session(key_id, known[1], expires)


def _key_id(digest: str) -> str:
    return hashlib.sha256(("mlp-ui-key-id:" + digest).encode()).hexdigest()[:16]


def _sign(digest: str, key_id: str, expires: int) -> str:
    return hmac.new(digest.encode(), f"{key_id}.{expires}".encode(), hashlib.sha256).hexdigest()
