"""Data-quality expectations, declared with a feature view (checked by :mod:`mlplatform.quality`,
which uses the feature store; they live here so definitions need not import it).

    history = FeatureView(
        name="applicant_history", ...,
        quality=Quality(
            policy="strict",                      # refuse bad data; "warn" publishes and records
            max_staleness="2d",                   # newest value at most 2 days before the range end
            default=Expectation(max_null_rate=0.05),
            features={"loans_30d": Expectation(min=0, max=100, max_psi=0.25)},
        ),
    )

A view's ``quality`` is part of its definition: it is stored and versioned by the feature
registry with the view (a change is a new view version), but it is not part of the view's
*data* version, so tightening an expectation needs no backfill.

Every feature of a view with ``quality`` is also checked for its declared ``dtype`` (the
stored column must hold that type; an ``int64`` feature stored as floats, as pandas does with
nulls, passes when every value is whole). What each bound means, exactly:

* ``max_null_rate``: nulls (and NaN) / rows must be ``<=`` the bound.
* ``min`` / ``max``: every non-null value must lie in ``[min, max]`` (inclusive).
* ``allowed``: every non-null value must be one of these.
* ``max_psi``: population stability index of the non-null values against the reference (the
  training-set snapshot of the production model that uses the view), over the reference's
  deciles, must be ``<=`` the bound. Without such a model the check is *skipped*, not failed.
  It is checked on training sets, whose rows (one per application) are the reference's
  population; a view's offline rows (one per change of an entity's values) are not, so
  backfills and materializations report it skipped rather than flag a difference in sampling.
* ``max_staleness`` (per view): ``end - newest event_timestamp`` must be ``<=`` the bound,
  where ``end`` is the end of the range that was backfilled, materialized or validated.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, model_validator
from pydantic import Field as PydanticField

from mlplatform._duration import Duration
from mlplatform.features._definition_base import Name, StrictModel

__all__ = ["Expectation", "Quality"]


class Expectation(StrictModel):
    """What one feature's values must look like (every bound optional)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_null_rate: float | None = PydanticField(default=None, ge=0.0, le=1.0, description="Largest share of null values.")
    min: float | None = PydanticField(default=None, description="Smallest value allowed (inclusive).")
    max: float | None = PydanticField(default=None, description="Largest value allowed (inclusive).")
    allowed: tuple[str | int | bool, ...] | None = PydanticField(
        default=None, min_length=1, description="The only values allowed (for string, integer or bool features)."
    )
    max_psi: float | None = PydanticField(
        default=None, gt=0.0, description="Largest PSI against the production model's training set."
    )

    @model_validator(mode="after")
    def _check(self) -> Expectation:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is greater than max {self.max}")
        if self.allowed is not None and (self.min is not None or self.max is not None):
            raise ValueError("give either a range (min/max) or allowed values, not both")
        return self


class Quality(StrictModel):
    """A view's expectations and what happens when they fail.

    ``policy``: ``warn`` publishes the data and records the failed checks; ``strict`` refuses
    it with a ``QualityError`` (the previous offline version and online generation stay
    current). ``default`` applies to every feature not named in ``features``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: Literal["warn", "strict"] = "warn"
    max_staleness: Duration | None = None
    default: Expectation | None = None
    features: dict[Name, Expectation] = PydanticField(default_factory=dict)

    def for_feature(self, name: str) -> Expectation | None:
        """The expectation that applies to feature ``name`` (its own, else ``default``)."""
        return self.features.get(name, self.default)
