"""The model routes of the serving application: the Open Inference Protocol (KServe V2) and
feature-aware predict. A mixin of the ingress replica class (``serving.app.ServingReplica``),
which sets ``self.model_server``.

=================================================  =======  =========================================
``GET  /v2/health/live``, ``/v2/health/ready``     (none)   liveness; ready when every model has a version
``GET  /v2``                                       predict  server metadata (extensions: binary_tensor_data)
``GET  /v2/models/{name}[/versions/{v}]``          predict  versions served, platform, input/output signature
``GET  /v2/models/{name}[/versions/{v}]/ready``    predict  200 when a version is loaded, else 503
``POST /v2/models/{name}[/versions/{v}]/infer``    predict  tensors in, tensors out (see ``model_server.oip``)
``POST /v1/models/{name}/predict``                 predict  entity keys (and request fields) in; features
                                                            looked up online; outputs with the features
=================================================  =======  =========================================

A ``versions/{v}`` route answers only for the version the model's alias points at now (a
404 names the one served): each replica holds one version per model, and a client that pins
a version must not silently get another.
"""

from __future__ import annotations

import asyncio
import json
from importlib import metadata as _metadata
from typing import Annotated, Any

from fastapi import Path, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from mlplatform.errors import DataError, NotFoundError, PlatformError
from mlplatform.serving.http import ERROR_RESPONSES, app, document_schema, error_response, platform_error_response
from mlplatform.serving.model_server.oip import (
    HEADER_LENGTH,
    InferRequest,
    InferResponse,
    ModelMetadata,
    ModelReady,
    ServerLive,
    ServerMetadata,
    ServerReady,
    decode_infer,
    encode_infer,
    metadata,
)
from mlplatform.serving.schemas import ErrorResponse

__all__ = ["ModelRoutes", "PredictRequest", "PredictResponse"]

_ModelName = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$", description="The served model's name.")]
_Version = Annotated[int, Path(ge=1, le=2**31, description="A version number; only the one served now answers.")]
_Scalar = str | int | float | bool | None
_NOT_SERVED = {404: {"model": ErrorResponse, "description": "No such model (or version) is served here."}}
_INFER_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": document_schema(InferRequest)},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": f"Binary tensor data: the JSON request (its length in {HEADER_LENGTH}) followed by the inputs' bytes.",
            },
        },
    }
}
_INFER_RESPONSES = {
    **ERROR_RESPONSES,
    **_NOT_SERVED,
    200: {
        "description": "The outputs; binary tensor data when the request asks for it (its JSON part's length in "
        f"{HEADER_LENGTH}).",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    },
}
_BINARY_DECODE = 64 * 1024  # bodies above this are decoded off the event loop


class PredictRequest(BaseModel):
    """``POST /v1/models/{name}/predict``: column-wise entity keys and request fields, as in
    Feast's ``/get-online-features``; ``timestamp`` (ISO 8601, default now) is when to score."""

    model_config = ConfigDict(extra="forbid")

    entities: Annotated[
        dict[Annotated[str, Field(min_length=1, max_length=128)], Annotated[list[_Scalar], Field(min_length=1, max_length=1000)]],
        Field(min_length=1, max_length=64, description="Column name → one value per row (entity keys, request fields)."),
    ]


class PredictFeature(BaseModel):
    name: str
    values: list[Any]
    statuses: list[str] | None = None
    event_timestamps: list[str | None] | None = None


class PredictResponse(BaseModel):
    model_name: str
    model_version: str
    outputs: dict[str, list[Any]]
    features: list[PredictFeature]


def _package_version() -> str:
    try:
        return _metadata.version("mlplatform")
    except _metadata.PackageNotFoundError:
        return "0"


class ModelRoutes:
    """Routes of every served model (see the module docstring); ``self.model_server`` is a
    ``ModelServer``."""

    model_server: Any

    @app.get("/v2/health/live", response_model=ServerLive)
    async def v2_live(self) -> dict[str, Any]:
        """The server is alive (no key needed)."""
        return {"live": True}

    @app.get("/v2/health/ready", response_model=ServerReady, responses={503: {"model": ServerReady}})
    async def v2_ready(self) -> Response:
        """Every served model has a loaded version (no key needed); 503 otherwise."""
        ready = True
        for name in self.model_server.names():
            ready = ready and await self.model_server.describe(name) is not None
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/v2", response_model=ServerMetadata, responses=ERROR_RESPONSES)
    async def v2_metadata(self) -> dict[str, Any]:
        """Server metadata: name, version, protocol extensions."""
        return {"name": "mlplatform", "version": _package_version(), "extensions": ["binary_tensor_data"]}

    @app.get("/v2/models/{name}", response_model=ModelMetadata, responses={**ERROR_RESPONSES, **_NOT_SERVED})
    async def v2_model(self, name: _ModelName) -> Response:
        """The model's served version, platform (its flavor) and signature."""
        return await self._metadata(name, None)

    @app.get("/v2/models/{name}/versions/{version}", response_model=ModelMetadata, responses={**ERROR_RESPONSES, **_NOT_SERVED})
    async def v2_model_version(self, name: _ModelName, version: _Version) -> Response:
        """As ``/v2/models/{name}``, for the version served now only."""
        return await self._metadata(name, version)

    @app.get("/v2/models/{name}/ready", response_model=ModelReady, responses={**ERROR_RESPONSES, **_NOT_SERVED})
    async def v2_model_ready(self, name: _ModelName) -> Response:
        """200 when the model has a loaded version, 503 when not (yet)."""
        return await self._ready(name, None)

    @app.get("/v2/models/{name}/versions/{version}/ready", response_model=ModelReady, responses={**ERROR_RESPONSES, **_NOT_SERVED})
    async def v2_model_version_ready(self, name: _ModelName, version: _Version) -> Response:
        """200 when this version is the one loaded."""
        return await self._ready(name, version)

    @app.post("/v2/models/{name}/infer", response_model=InferResponse, responses=_INFER_RESPONSES, openapi_extra=_INFER_BODY)
    async def v2_infer(self, name: _ModelName, request: Request) -> Response:
        """Tensors in, tensors out, with dynamic batching (see ``mlplatform.serving.model_server.oip``)."""
        return await self._infer(name, None, request)

    @app.post(
        "/v2/models/{name}/versions/{version}/infer",
        response_model=InferResponse,
        responses=_INFER_RESPONSES,
        openapi_extra=_INFER_BODY,
    )
    async def v2_infer_version(self, name: _ModelName, version: _Version, request: Request) -> Response:
        """As ``/v2/models/{name}/infer``, answered only by the version served now."""
        return await self._infer(name, version, request)

    @app.post("/v1/models/{name}/predict", response_model=PredictResponse, responses={**ERROR_RESPONSES, **_NOT_SERVED})
    async def model_predict(self, name: _ModelName, body: PredictRequest) -> Response:
        """The model's prediction for entity keys (and request fields): its input looked up in
        the online store (its feature service, or its input builder), the outputs beside the
        feature values and their event timestamps."""
        try:
            doc = await self.model_server.predict(name, body.entities)
        except NotFoundError as exc:
            return _not_served(exc)
        except PlatformError as exc:
            return platform_error_response(exc)
        return JSONResponse(doc)

    # ------------------------------------------------------------------------ helpers
    async def _served(self, name: str, version: int | None) -> dict[str, Any] | Response:
        try:
            described = await self.model_server.describe(name)
        except NotFoundError as exc:
            return _v2_error(404, "unknown_model", str(exc))
        if described is None:
            return _v2_error(503, "model_unavailable", f"model {name!r} has no loadable version yet; retry")
        if version is not None and described["version"] != version:
            return _v2_error(404, "version_not_served", f"model {name!r} serves version {described['version']}, not {version}")
        return described

    async def _metadata(self, name: str, version: int | None) -> Response:
        described = await self._served(name, version)
        if isinstance(described, Response):
            return described
        doc = metadata(name, described["version"], described["flavor"], described["signature"], {"sha256": described["sha256"]})
        return JSONResponse(doc)

    async def _ready(self, name: str, version: int | None) -> Response:
        described = await self._served(name, version)
        if isinstance(described, Response):
            if described.status_code == 503:
                return JSONResponse({"name": name, "ready": False}, status_code=503)
            return described
        return JSONResponse({"name": name, "ready": True})

    async def _infer(self, name: str, version: int | None, request: Request) -> Response:
        described = await self._served(name, version)
        if isinstance(described, Response):
            return described
        body = await request.body()
        header = request.headers.get(HEADER_LENGTH)
        try:
            if len(body) > _BINARY_DECODE:
                loop = asyncio.get_running_loop()
                parsed, inputs = await loop.run_in_executor(
                    None, lambda: decode_infer(body, header_length=header, signature=described["signature"])
                )
            else:
                parsed, inputs = decode_infer(body, header_length=header, signature=described["signature"])
            scored, outputs = await self.model_server.infer(name, inputs)
            if version is not None and scored["version"] != version:  # the alias moved meanwhile
                return _v2_error(404, "version_not_served", f"model {name!r} now serves version {scored['version']}, not {version}")
            content, headers = encode_infer(name=name, version=scored["version"], request=parsed, outputs=outputs)
        except NotFoundError as exc:
            return _not_served(exc)
        except DataError as exc:
            return _v2_error(422, "invalid_request", str(exc))
        except PlatformError as exc:
            return platform_error_response(exc)
        media = "application/octet-stream" if headers else "application/json"
        return Response(content, media_type=media, headers=headers)


def _v2_error(status: int, kind: str, message: str) -> Response:
    """An error of a V2 route: the protocol's clients show only ``error``, so it carries the
    message too (``kind: message``); ``message`` is as on every other route."""
    response = error_response(status, kind, message)
    doc = json.loads(response.body)
    doc["error"] = f"{kind}: {doc['message']}"
    return JSONResponse(doc, status_code=status)


def _not_served(exc: NotFoundError) -> Response:
    if "no model" in str(exc):
        return _v2_error(404, "unknown_model", str(exc))
    return _v2_error(503, "model_unavailable", str(exc))
