"""The serving application's HTTP surface shared by every route: the FastAPI app, its error
bodies, and the handlers that turn validation errors and bugs into JSON.

    @app.post("/v1/thing", responses=ERROR_RESPONSES)        # in a replica class (serve.ingress)
    return error_response(404, "unknown_model", "no model 'x' is served")
    return platform_error_response(exc)                       # a PlatformError → 422 or 503

Errors are JSON (``schemas.ErrorResponse``: ``error``, a kind; ``message``, for a person):
401/403 for a missing key or role, 404 for an unknown resource, 413 for a body too large,
422 naming each bad field, 503 when a store is unavailable. No error body holds a URL, path
or address. Anything else is a bug: it answers 500 with an ``error_id`` logged with the
traceback. (The Open Inference Protocol's error body is ``{"error": "..."}``; ours carries
that key too, so V2 clients read it.)
"""

import logging
import re
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from mlplatform.errors import DataError, DefinitionError, NotFoundError, PlatformError
from mlplatform.online.base import OnlineStoreUnavailable
from mlplatform.serving.fast_routes import FastRoutes
from mlplatform.serving.guard import Guard
from mlplatform.serving.schemas import ErrorResponse
from mlplatform.serving.ui_mount import UiMount

__all__ = ["ERROR_RESPONSES", "app", "document_schema", "error_response", "platform_error_response", "shown"]

log = logging.getLogger(__name__)

app = FastAPI(
    title="mlplatform serving",
    summary="Checkout decisions, models on the Open Inference Protocol (V2), online features (Feast-compatible) and pushes.",
    version="1",
    docs_url=None,
    redoc_url=None,
    openapi_url="/openapi.json",
)
app.add_middleware(FastRoutes)  # inside Guard (added last, so outermost): keys and sizes are checked first
app.add_middleware(Guard)
app.mount("/ui", UiMount())  # the web UI (mlplatform.ui), built in each replica from its config
_EXTRA_SCHEMAS: list[type[BaseModel]] = []


def document_schema(model: type[BaseModel]) -> dict[str, str]:
    """Put ``model`` (and the models it uses) in the OpenAPI document's components, for a
    route that reads its body itself (e.g. to accept binary data too); returns the ``$ref``."""
    _EXTRA_SCHEMAS.append(model)
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _openapi() -> dict[str, Any]:
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        doc = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for model in _EXTRA_SCHEMAS:
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            for name, sub in schema.pop("$defs", {}).items():
                schemas.setdefault(name, sub)
            schemas[model.__name__] = schema
        app.openapi_schema = doc
    return app.openapi_schema


app.openapi = _openapi  # type: ignore[method-assign]

#: The error answers every keyed route can give, for the OpenAPI document.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or wrong X-API-Key."},
    403: {"model": ErrorResponse, "description": "The key lacks the route's role."},
    413: {"model": ErrorResponse, "description": "The body is too large."},
    422: {"model": ErrorResponse, "description": "The request is invalid; the message names each bad field."},
    503: {"model": ErrorResponse, "description": "A store or the decision log is unavailable; retry."},
}
# URLs and absolute paths never reach a client: a store's error may name its address.
_SECRET_LOOKING = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+|(?<![\w.])/(?:[\w.@-]+/)+[\w.@-]*")


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = []
    for err in exc.errors():
        loc = list(err.get("loc", ()))
        loc = ".".join(str(p) for p in (loc[1:] if loc[:1] == ["body"] else loc)) or "body"
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        problems.append({"field": loc, "message": msg, "type": err.get("type")})
        if err.get("type") not in ("missing", "json_invalid"):
            problems[-1]["message"] = f"{msg} (got {shown(err.get('input'))})"
    summary = "; ".join(f"{p['field']}: {p['message']}" for p in problems)
    return JSONResponse({"error": "invalid_request", "message": summary, "problems": problems}, status_code=422)


@app.exception_handler(Exception)
async def _bug(request: Request, exc: Exception) -> JSONResponse:
    """Anything that escapes a route is a bug: log it with an id the client can quote."""
    error_id = uuid.uuid4().hex[:16]
    log.error("internal error %s on %s %s", error_id, request.method, request.url.path, exc_info=exc)
    message = f"internal error {error_id}: the server failed on this request; it is logged under this id"
    return JSONResponse({"error": "internal_error", "message": message, "error_id": error_id}, status_code=500)


def shown(value: Any) -> str:
    """A value as an error message shows it: its repr, cut at 80 characters."""
    try:
        text = repr(value)
    except Exception:  # a value whose repr fails (e.g. an int too long to print)
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


def error_response(status: int, kind: str, message: str, **extra: Any) -> JSONResponse:
    """An error answer: ``{"error": kind, "message": message, **extra}`` with URLs and paths redacted."""
    return JSONResponse({"error": kind, "message": _SECRET_LOOKING.sub("<redacted>", message), **extra}, status_code=status)


def platform_error_response(exc: Exception) -> JSONResponse:
    """The HTTP answer to a ``PlatformError``: 422 for bad input, 503 for a store that failed
    (its detail, which may hold an address, goes to the log under an error id, not to the
    client). Anything else is a bug and is raised (the 500 handler answers it)."""
    if isinstance(exc, (DataError, DefinitionError)) or (isinstance(exc, NotFoundError) and "registered" in str(exc)):
        return error_response(422, "invalid_request", str(exc))
    if isinstance(exc, PlatformError):
        error_id = uuid.uuid4().hex[:16]
        log.warning("unavailable %s: %s", error_id, exc)
        if isinstance(exc, OnlineStoreUnavailable):
            return error_response(
                503, "feature_store_unavailable", f"the online feature store did not answer; retry (error {error_id})", error_id=error_id
            )
        return error_response(503, "unavailable", f"a store this request needs is unavailable; retry (error {error_id})", error_id=error_id)
    raise exc
