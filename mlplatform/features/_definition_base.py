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
    "StrictModel",
    "content_hash",
    "parse_ref",
]

Name = Annotated[str, PydanticField(pattern=r"^[a-z][a-z0-9_]{0,62}$")]
DType = Literal["int64", "float64", "string", "bool", "timestamp"]
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


class Aggregation(StrictModel):
    """A windowed aggregation of a source column per entity.

    At each cadence boundary ``T`` the value covers source events with event time in
    ``(T - window, T]``. ``count`` counts non-null values (rows if ``column`` is None);
    ``sum``/``mean``/``min``/``max`` skip nulls and are null when the window holds no value,
    except ``sum``, which is 0 over an empty window.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    column: Name | None = None
    function: Literal["count", "sum", "mean", "min", "max"]
    window: Duration
    name: Name | None = None
    description: str = ""
    reason: str | None = None

    @model_validator(mode="after")
    def _check(self) -> Aggregation:
        if self.window <= timedelta(0):
            raise ValueError(f"window must be positive, got {self.window!r}")
        if self.column is None and self.function != "count":
            raise ValueError(f"function {self.function!r} needs a column (only 'count' counts rows)")
        return self

    @property
    def feature_name(self) -> str:
        if self.name:
            return self.name
        return f"{self.column or 'rows'}_{self.function}_{format_duration(self.window)}"

    @property
    def dtype(self) -> str:
        return "int64" if self.function == "count" else "float64"

class RequestSource(DefinitionBase):
    """Fields that arrive with the request (e.g. the checkout amount), not from a store."""

    kind: ClassVar[str] = "request_source"
    schema_: tuple[Field, ...] = PydanticField(alias="schema", min_length=1)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def spec(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)
