"""The HTTP documents of the serving application, as pydantic models.

Requests are strict about shape: unknown keys, wrong types, non-finite numbers, negative or
absurd amounts and over-long strings are refused with a 422 naming the field. Feature-server
documents follow Feast's Python feature server so Feast clients work unchanged.

Decision request (``POST /v1/decisions``)::

    {"application_id": "app-1", "applicant_id": 42, "merchant_id": 7, "amount": 120.0,
     "currency": "USD", "term": 4, "timestamp": "2026-01-31T09:00:00Z"}

Decision response::

    {"decision_id": "3f2a…", "application_id": "app-1", "decision": "decline",
     "probability_of_default": 0.31,
     "reasons": [{"code": "missed_installments_90d", "text": "Missed payments in the last 90 days"}],
     "model": {"name": "underwriting", "version": 3}, "fallback": false, "fallback_reason": null}
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

__all__ = [
    "DecisionRequest",
    "DecisionResponse",
    "ErrorResponse",
    "EventsRequest",
    "EventsResponse",
    "FeatureRequest",
    "FeatureResponse",
    "HealthResponse",
    "ModelRef",
    "Problem",
    "PushRequest",
    "PushResponse",
    "ReasonOut",
]

# JSON numbers can be 1e309 (inf) and Python's json accepts NaN: both are refused everywhere.
_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False, str_max_length=256, frozen=True)
_ID = r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$"
MAX_ENTITY_ROWS = 1000
MAX_ID = 2**63 - 1


def _utc(value: datetime) -> datetime:
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except (OverflowError, ValueError):  # e.g. 0001-01-01T00:00:00+01:00 is before year 1 in UTC
        raise ValueError("the time in UTC must fall within the years 1-9999") from None


class DecisionRequest(BaseModel):
    """One checkout application. ``timestamp`` is when the customer applied (naive = UTC); it
    must be within ``serving.max_clock_skew`` (5 minutes) of the server clock: an online
    decision uses the features as of now, so an application from another time is refused
    rather than silently decided on today's features."""

    model_config = ConfigDict(**_STRICT, coerce_numbers_to_str=True)

    application_id: Annotated[str, Field(pattern=_ID, description="The checkout's id; retries reuse it.")]
    applicant_id: Annotated[StrictInt, Field(ge=0, le=MAX_ID, description="The customer (entity applicant).")]
    merchant_id: Annotated[StrictInt, Field(ge=0, le=MAX_ID, description="The store (entity merchant).")]
    amount: Annotated[float, Field(gt=0, le=1e9, description="Order amount in currency units.")]
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$", description="ISO 4217 code, e.g. USD.")]
    term: Annotated[StrictInt, Field(ge=1, le=120, description="Number of installments.")]
    timestamp: Annotated[datetime, AfterValidator(_utc), Field(description="When the customer applied (ISO 8601).")]


class ReasonOut(BaseModel):
    """Why a decision went against the applicant: a feature (model reason) or a policy rule."""

    code: str
    text: str


class ModelRef(BaseModel):
    name: str
    version: int


class OfferOut(BaseModel):
    """The credit-line offer of an approved decision: the tier, its line and the plan's installments."""

    tier: str
    amount: float
    installments: int


class DecisionResponse(BaseModel):
    """The answer to a checkout. ``fallback`` is true when it came from the configured fallback
    (then ``fallback_reason`` says why and ``probability_of_default`` is null)."""

    decision_id: str
    application_id: str
    decision: Literal["approve", "decline", "review"]
    probability_of_default: float | None
    reasons: list[ReasonOut]
    model: ModelRef | None
    fallback: bool
    fallback_reason: str | None
    offer: OfferOut | None = Field(
        default=None, description="The credit line offered (approved decisions, when serving.offers is configured); null otherwise."
    )


class Problem(BaseModel):
    """One problem with a request: the field (dotted path) and what is wrong with it."""

    field: str
    message: str
    type: str | None = None


class ErrorResponse(BaseModel):
    """Every error answer: a machine-readable ``error`` kind and a ``message`` for people.
    ``problems`` lists each bad field of a 422; ``error_id`` identifies an internal error in the
    server's log; ``decision_id`` names the existing decision of a 409."""

    error: str
    message: str
    problems: list[Problem] | None = None
    error_id: str | None = None
    decision_id: str | None = None


class FeatureResultOut(BaseModel):
    """One output column: a value, status and event time (ISO 8601, ``1970-01-01T00:00:00Z``
    when none) per entity row."""

    values: list[Any]
    statuses: list[Literal["PRESENT", "NOT_FOUND", "NULL_VALUE", "OUTSIDE_MAX_AGE"]]
    event_timestamps: list[str]


class FeatureMetadataOut(BaseModel):
    feature_names: list[str]


class FeatureResponse(BaseModel):
    """Feast's ``/get-online-features`` answer: ``results[i]`` belongs to ``metadata.feature_names[i]``."""

    metadata: FeatureMetadataOut
    results: list[FeatureResultOut]


class PushResponse(BaseModel):
    pushed: int
    feature_view: str
    to: Literal["online", "offline", "online_and_offline"]


class HealthResponse(BaseModel):
    status: Literal["ok", "degraded"]
    model: ModelRef | None
    replica: str


EntityValue = StrictInt | float | str | StrictBool | None


class FeatureRequest(BaseModel):
    """Feast's ``/get-online-features`` body: ``features`` (refs) or ``feature_service``, and
    column-wise ``entities`` (join keys and request fields, lists of one length)."""

    model_config = ConfigDict(**_STRICT)

    features: Annotated[list[Annotated[str, Field(max_length=200)]], Field(min_length=1, max_length=500)] | None = None
    feature_service: Annotated[str, Field(max_length=200)] | None = None
    entities: Annotated[
        dict[Annotated[str, Field(max_length=100)], Annotated[list[EntityValue], Field(min_length=1, max_length=MAX_ENTITY_ROWS)]],
        Field(min_length=1, max_length=50),
    ]
    full_feature_names: bool = False

    @model_validator(mode="after")
    def _one_target(self) -> FeatureRequest:
        if (self.features is None) == (self.feature_service is None):
            raise ValueError("give exactly one of 'features' (a list of 'view:feature') or 'feature_service'")
        return self

    def target(self) -> str | list[str]:
        """The feature service name or the refs."""
        return self.feature_service if self.feature_service is not None else list(self.features or [])


class PushRequest(BaseModel):
    """Feast's ``/push`` body. ``push_source_name`` names the feature view pushed to (this
    platform has no separate push sources); ``feature_view`` is accepted as a clearer synonym.
    ``df`` is column-wise: the view's join keys, ``event_timestamp`` (ISO 8601) and features."""

    model_config = ConfigDict(**_STRICT)

    push_source_name: Annotated[str, Field(max_length=200)] | None = None
    feature_view: Annotated[str, Field(max_length=200)] | None = None
    df: Annotated[dict[Annotated[str, Field(max_length=100)], list[Any]], Field(min_length=1, max_length=200)]
    to: Literal["online", "offline", "online_and_offline"] = "online"

    @model_validator(mode="after")
    def _one_view(self) -> PushRequest:
        if (self.push_source_name is None) == (self.feature_view is None):
            raise ValueError("give exactly one of 'push_source_name' or 'feature_view' (the feature view's name)")
        return self

    def view(self) -> str:
        return self.push_source_name if self.push_source_name is not None else str(self.feature_view)


class EventsRequest(BaseModel):
    """A batch of events of one stream source (``POST /v1/events/{source}``): each event holds
    the source's event id field, its event time field (ISO 8601) and its schema fields; they
    are checked against the source's definition, and a bad one refuses the whole batch."""

    model_config = ConfigDict(**_STRICT)

    events: Annotated[list[dict[Annotated[str, Field(max_length=100)], Any]], Field(min_length=1, max_length=10_000)]


class EventsResponse(BaseModel):
    """What the event bus accepted: every event of the batch, durable on the bus (see
    ``mlplatform.streams``), with its stream positions and when the bus accepted them."""

    source: str
    accepted: int
    first_position: int
    last_position: int
    first_known_at: datetime
    last_known_at: datetime
