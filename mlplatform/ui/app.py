"""The web UI as an ASGI app: server-rendered pages (Jinja2), plain forms, no JavaScript.

    app = build_app(platform)                  # keys from the serving config's key sources
    uvicorn.run(app, host="127.0.0.1", port=8090)               # what `mlp ui` does
    fastapi_app.mount("/ui", build_app(platform))                # what the Serve application does

Every route but ``/login`` needs a session (``mlplatform.ui.session``): a page asked for
without one redirects to the login page, anything else answers 401. Links are built from the
request's ``root_path``, so the app works under any path prefix (a mount, or a proxy that
passes ``--root-path``). Pages read the platform only through its parts' public APIs. Messages
shown on a page pass ``shown``: no filesystem path outside the storage root reaches a page.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from mlplatform.errors import NotFoundError, PlatformError
from mlplatform.ui.session import COOKIE, Sessions

__all__ = ["build_app"]

log = logging.getLogger(__name__)

_TEMPLATES = Path(__file__).with_name("templates")
_MAX_FORM = 8 * 1024
_PATH = re.compile(r"(?<![\w.:/])(?:/[\w.@+-]+){2,}/?")
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def build_app(platform: Any, keys: tuple[tuple[str, tuple[str, ...]], ...] | None = None) -> Any:
    """The UI app over ``platform``.

    Args:
        platform: a ``Platform``; its storage root is what the pages show.
        keys: ``(sha256 hex, roles)`` pairs allowed to log in (those holding ``operate`` or
            ``read_ui``); by default ``load_keys(platform.config.serving)``.

    Raises:
        ServingError: no key is configured (the message says how to set one).
    """
    from jinja2 import Environment, FileSystemLoader, select_autoescape
    from markupsafe import Markup
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse, RedirectResponse, Response
    from starlette.routing import Route

    from mlplatform.ui import catalog, decisions, lineage, models, operations
    from mlplatform.ui.markdown import render_markdown

    if keys is None:
        from mlplatform.serving.keys import load_keys

        keys = load_keys(platform.config.serving)
    sessions = Sessions(keys)
    root = os.path.abspath(platform.storage.root) if not platform.storage.is_s3 else platform.storage.root
    env = Environment(loader=FileSystemLoader(_TEMPLATES), autoescape=select_autoescape(["html"]), auto_reload=False)
    env.filters["shown"] = lambda text: shown(str(text), root)
    env.filters["when"] = _when
    env.filters["num"] = _num
    env.filters["q"] = lambda s: quote(str(s), safe="")
    env.filters["markdown"] = lambda text, files=None: Markup(render_markdown(shown(str(text), root), files=files))

    def base(request: Any) -> str:
        return request.scope.get("root_path", "").rstrip("/")

    def render(request: Any, template: str, status: int = 200, **context: Any) -> Any:
        html = env.get_template(template).render(base=base(request), page=template.split(".")[0], **context)
        return HTMLResponse(html, status_code=status, headers=_HEADERS)

    def page(build: Callable[..., Any]) -> Callable[[Any], Any]:
        """A route that needs a session; a PlatformError becomes a page with a 4xx status."""

        def endpoint(request: Any) -> Any:
            if sessions.verify(request.cookies.get(COOKIE)) is None:
                if request.method == "GET" and "text/html" in request.headers.get("accept", "text/html"):
                    return RedirectResponse(f"{base(request)}/login", status_code=303, headers=_HEADERS)
                return Response("log in first", status_code=401, media_type="text/plain", headers=_HEADERS)
            try:
                return build(request)
            except NotFoundError as exc:
                return render(request, "error.html", 404, message=str(exc))
            except PlatformError as exc:
                return render(request, "error.html", 422, message=str(exc))

        return endpoint

    async def login(request: Any) -> Any:
        error = None
        if request.method == "POST":
            body = await request.body()
            if len(body) > _MAX_FORM:
                return render(request, "login.html", 413, error="the form is too large")
            key = (parse_qs(body.decode("utf-8", "replace")).get("key") or [""])[0]
            cookie = sessions.login(key.strip())
            if cookie is not None:
                response = RedirectResponse(f"{base(request)}/catalog", status_code=303, headers=_HEADERS)
                response.set_cookie(COOKIE, cookie, max_age=sessions.lifetime, path=base(request) or "/", httponly=True,
                                    samesite="strict", secure=_tls(request))
                return response
            log.warning("ui: a login with an unknown key or a key without role operate/read_ui")
            error = "That key is not valid here (the UI needs a key holding role operate or read_ui)."
        return render(request, "login.html", 401 if error else 200, error=error)

    def logout(request: Any) -> Any:
        response = RedirectResponse(f"{base(request)}/login", status_code=303, headers=_HEADERS)
        response.delete_cookie(COOKIE, path=base(request) or "/", httponly=True, samesite="strict", secure=_tls(request))
        return response

    def home(request: Any) -> Any:
        return RedirectResponse(f"{base(request)}/catalog", status_code=303)

    def catalog_page(request: Any) -> Any:
        return render(request, "catalog.html", **catalog.catalog(platform))

    def view_page(request: Any) -> Any:
        return render(request, "view.html", view=catalog.view_detail(platform, request.path_params["name"]))

    def lineage_page(request: Any) -> Any:
        return render(request, "lineage.html", **lineage.lineage(platform, base(request)))

    def models_page(request: Any) -> Any:
        return render(request, "models.html", **models.models_index(platform))

    def model_page(request: Any) -> Any:
        return render(request, "model.html", model=models.model_detail(platform, request.path_params["name"]))

    def version_page(request: Any) -> Any:
        p = request.path_params
        return render(request, "version.html", mv=models.version_detail(platform, p["name"], p["version"]))

    def version_file(request: Any) -> Any:
        p = request.path_params
        data, kind = models.version_file(platform, p["name"], p["version"], p["file"])
        return Response(data, media_type=kind, headers={**_HEADERS, "Cache-Control": "private, max-age=3600"})

    def decisions_page(request: Any) -> Any:
        query = request.query_params.get("q", "").strip()
        found = decisions.search(platform, query) if query else []
        if query and len(found) == 1:
            return RedirectResponse(f"{base(request)}/decisions/{quote(found[0]['decision_id'], safe='')}", status_code=303)
        return render(request, "decisions.html", query=query, found=found, searched=bool(query))

    def decision_page(request: Any) -> Any:
        decision_id = request.path_params["decision_id"]
        replayed = decisions.replay(platform, decision_id) if request.method == "POST" else None
        return render(request, "decision.html", d=decisions.decision_detail(platform, decision_id), replayed=replayed)

    def operations_page(request: Any) -> Any:
        return render(request, "operations.html", **operations.operations(platform))

    def consistency_page(request: Any) -> Any:
        return render(request, "consistency.html", nav="operations", **operations.consistency_detail(platform, request.path_params["name"]))

    def monitoring_page(request: Any) -> Any:
        return render(request, "monitoring.html", nav="operations", m=operations.monitoring_detail(platform, request.path_params["model"]))

    def monitoring_file(request: Any) -> Any:
        data = operations.monitoring_file(platform, request.path_params["model"], request.path_params["file"])
        return Response(data, media_type="image/png", headers={**_HEADERS, "Cache-Control": "private, max-age=3600"})

    def consistency_file(request: Any) -> Any:
        data = operations.consistency_png(platform, request.path_params["name"])
        return Response(data, media_type="image/png", headers={**_HEADERS, "Cache-Control": "private, max-age=3600"})

    routes = [
        Route("/login", login, methods=["GET", "POST"]),
        Route("/logout", page(logout), methods=["POST"]),
        Route("/", page(home)),
        Route("/catalog", page(catalog_page)),
        Route("/catalog/views/{name}", page(view_page)),
        Route("/lineage", page(lineage_page)),
        Route("/models", page(models_page)),
        Route("/models/{name}", page(model_page)),
        Route("/models/{name}/{version:int}", page(version_page)),
        Route("/models/{name}/{version:int}/files/{file}", page(version_file)),
        Route("/decisions", page(decisions_page)),
        Route("/decisions/{decision_id}", page(decision_page), methods=["GET", "POST"]),
        Route("/operations", page(operations_page)),
        Route("/operations/consistency/{name}", page(consistency_page)),
        Route("/operations/consistency/{name}/match_rate.png", page(consistency_file)),
        Route("/operations/monitoring/{model}", page(monitoring_page)),
        Route("/operations/monitoring/{model}/files/{file}", page(monitoring_file)),
    ]
    app = Starlette(routes=routes)
    app.state.platform = platform
    return app


def shown(text: str, root: str) -> str:
    """``text`` with every filesystem path outside the storage root ``root`` replaced by ``<path>``
    (a path under the root is shown relative to it, as ``<root>/...``)."""

    def replace(match: re.Match[str]) -> str:
        path = match.group(0)
        if root and (path == root or path.startswith(root.rstrip("/") + "/")):
            return "<root>" + path[len(root.rstrip("/")):]
        return "<path>"

    return _PATH.sub(replace, text)


def _tls(request: Any) -> bool:
    return request.url.scheme == "https" or request.headers.get("x-forwarded-proto", "") == "https"


def _when(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, (int, float)):
        value = datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        try:  # an ISO instant as the records keep it; naive is UTC
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return value
        value = parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    if isinstance(value, datetime):
        return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return str(value)


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "-" if value is None else str(value)
