"""The web UI (``mlplatform.ui``) as mounted in the Serve application, at ``/ui`` of its FastAPI app.

    app.mount("/ui", UiMount())              # at import, before serve.ingress freezes the app
    UiMount.configure(lambda: build_app(…))  # in each replica's constructor

Serve copies the FastAPI app when the deployment is defined, before any replica knows its
config, so the mount holds no app of its own: each replica configures the class with a factory
(as ``Guard.configure`` does for keys) and the UI is built on the first request. Until then,
or when the deployment has no UI, ``/ui`` answers 404.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, ClassVar

__all__ = ["UiMount"]


class UiMount:
    """ASGI app that forwards to the UI built by the configured factory."""

    factory: ClassVar[Callable[[], Any] | None] = None
    built: ClassVar[Any] = None
    _lock: ClassVar[threading.Lock] = threading.Lock()

    @classmethod
    def configure(cls, factory: Callable[[], Any] | None) -> None:
        cls.factory, cls.built = factory, None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        cls = type(self)
        if cls.built is None and cls.factory is not None:
            with cls._lock:
                if cls.built is None:
                    cls.built = cls.factory()
        if cls.built is None or scope["type"] != "http":
            await send({"type": "http.response.start", "status": 404, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"no UI in this deployment"})
            return
        await cls.built(scope, receive, send)
