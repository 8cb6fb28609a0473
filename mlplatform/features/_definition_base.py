"""The base of every feature definition, and the leaf definitions views are built from.

    applicant = Entity(name="applicant", join_keys=["applicant_id"])
    amount = Field(name="amount", dtype="float64", reason="Order amount is high")

Holds the pydantic base (frozen, ``extra="forbid"``, a ``DefinitionError`` instead of a
``ValidationError``, versioned by the hash of its ``spec()``), the ``"view:feature"``
reference syntax, and the definitions that refer to no other definition but fields:
``Entity``, ``Field``, ``ParquetSource``, ``RequestSource`` and ``Aggregation``. Import
them from :mod:`mlplatform.features.definitions` (or ``mlplatform``), which re-exports them.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import timedelta
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic import Field as PydanticField

from mlplatform._duration import Duration, format_duration
from mlplatform.errors import DefinitionError

__all__ = [
    "REF_PATTERN",
    "Aggregation",
    "DType",
    "DefinitionBase",
    "Entity",
    "Field",
    "Name",
    "ParquetSource",
    "RequestSource",
    "StreamSource",
    "StrictModel",
    "content_hash",
    "parse_ref",
]

Name = Annotated[str, PydanticField(pattern=r"^[a-z][a-z0-9_]{0,62}$")]
DType = Literal["int64", "float64", "string", "bool", "timestamp", "list"]
REF_PATTERN = re.compile(r"^([a-z][a-z0-9_]*):([a-z][a-z0-9_]*)$")


def parse_ref(ref: str) -> tuple[str, str]:
    """Split ``"view:feature"`` into its parts.

    Raises:
        DefinitionError: the reference is not of the form ``view:feature``.
    """
    match = REF_PATTERN.match(ref) if isinstance(ref, str) else None
    if not match:
        raise DefinitionError(f"bad feature reference {ref!r}: write 'view:feature', e.g. 'applicant_history:loans_90d'")
    return match.group(1), match.group(2)


class StrictModel(BaseModel):
    """Raises DefinitionError (a PlatformError) instead of pydantic's ValidationError."""

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as exc:
            from mlplatform.config import format_validation_error

            what = f"{type(self).__name__} {data.get('name')!r}" if data.get("name") else type(self).__name__
            raise DefinitionError(format_validation_error(exc, what).replace("invalid config ", "invalid ", 1)) from None


class DefinitionBase(StrictModel):
    """A named definition the registry stores, versioned by the hash of its ``spec()``."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)
    kind: ClassVar[str]

    name: Name
    description: str = ""

    def spec(self) -> dict[str, Any]:
        """The JSON the registry stores for this object (hashed into its version)."""
        return self.model_dump(mode="json")

    @property
    def version(self) -> str:
        return content_hash(self.spec())


def content_hash(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]


class Entity(DefinitionBase):
    """Who or what features describe, and the columns that identify it."""

    kind: ClassVar[str] = "entity"
    join_keys: tuple[Name, ...] = PydanticField(min_length=1)
    value_type: Literal["int64", "string"] = "int64"

    @model_validator(mode="before")
    @classmethod
    def _default_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "join_keys" not in data and "name" in data:
            data = {**data, "join_keys": (f"{data['name']}_id",)}
        return data


class Field(DefinitionBase):
    """A feature or request field. ``reason`` is the customer-facing adverse-action text used
    when this feature pushes a decision toward decline."""

    kind: ClassVar[str] = "field"
    dtype: DType = "float64"
    reason: str | None = None


class ParquetSource(DefinitionBase):
    """Event data in a dataset under the storage root.

    ``timestamp_field`` is when the fact happened; ``created_timestamp_field`` is when the lender
    knew it (a missed installment is known at due date plus grace). Without one, facts are
    taken as known when they happened.
    """

    kind: ClassVar[str] = "source"
    dataset: str = PydanticField(min_length=1, description="Dataset name under the storage root.")
    timestamp_field: Name
    created_timestamp_field: Name | None = None


class StreamSource(DefinitionBase):
    """Events that arrive live on the event bus and are kept offline, e.g. checkouts.

    ``schema`` lists the payload fields (entity keys included); every event also carries
    ``event_id_field`` (a string unique per event: copies with one id are one event) and
    ``timestamp_field`` (when it happened). The bus stamps the time it accepted the event
    (``created_timestamp``, when the platform knew it). The processors append every accepted
    event to ``dataset`` under the storage root, so backfills and training sets read exactly the
    events serving saw. ``allowed_lateness``: an event known more than this after it happened is
    *late* and counted nowhere, online or offline (see :mod:`mlplatform.features.realtime`).
    """

    kind: ClassVar[str] = "stream_source"
    dataset: str = PydanticField(min_length=1, description="Dataset under the storage root where processed events are kept.")
    timestamp_field: Name
    event_id_field: Name = "event_id"
    schema_: tuple[Field, ...] = PydanticField(alias="schema", min_length=1)
    allowed_lateness: Duration = timedelta(hours=1)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _check(self) -> StreamSource:
        names = [f.name for f in self.schema_]
        reserved = {self.timestamp_field, self.event_id_field, "created_timestamp"} & set(names)
        if reserved:
            raise ValueError(f"schema must not list {sorted(reserved)}: the event id and times are given separately")
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate field names in schema: {sorted({n for n in names if names.count(n) > 1})}")
        if self.allowed_lateness < timedelta(0):
            raise ValueError(f"allowed_lateness must not be negative, got {self.allowed_lateness!r}")
        return self

    def field(self, name: str) -> Field | None:
        return next((f for f in self.schema_ if f.name == name), None)

    def spec(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


class Aggregation(StrictModel):
    """A windowed aggregation of a source column per entity.

    At each cadence boundary ``T`` (for a view on a ``StreamSource``: at any time ``T``) the
    value covers source events with event time in ``(T - window, T]``. ``count`` counts non-null
    values (rows if ``column`` is None); ``sum``/``mean``/``min``/``max`` skip nulls and are null
    when the window holds no value, except ``sum``, which is 0 over an empty window.
    ``last_k`` (stream views only) is the list of the ``k`` most recent non-null values, oldest
    first (empty over an empty window).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    column: Name | None = None
    function: Literal["count", "sum", "mean", "min", "max", "last_k"]
    window: Duration
    k: int | None = PydanticField(default=None, ge=1, le=1000)
    name: Name | None = None
    description: str = ""
    reason: str | None = None

    @model_validator(mode="after")
    def _check(self) -> Aggregation:
        if self.window <= timedelta(0):
            raise ValueError(f"window must be positive, got {self.window!r}")
        if self.column is None and self.function != "count":
            raise ValueError(f"function {self.function!r} needs a column (only 'count' counts rows)")
        if (self.function == "last_k") != (self.k is not None):
            raise ValueError("give k exactly for function 'last_k' (the number of most recent values kept)")
        return self

    @property
    def feature_name(self) -> str:
        if self.name:
            return self.name
        function = f"last{self.k}" if self.function == "last_k" else self.function
        return f"{self.column or 'rows'}_{function}_{format_duration(self.window)}"

    @property
    def dtype(self) -> str:
        return {"count": "int64", "last_k": "list"}.get(self.function, "float64")

class RequestSource(DefinitionBase):
    """Fields that arrive with the request (e.g. the checkout amount), not from a store."""

    kind: ClassVar[str] = "request_source"
    schema_: tuple[Field, ...] = PydanticField(alias="schema", min_length=1)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def spec(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)
