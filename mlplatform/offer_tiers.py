"""Offer tiers and the risk cap: which credit lines an approved applicant may be offered
(configuration shared by ``serving.offers`` and the RL part, ``mlplatform.rl``).

    offers = OfferConfig(
        tiers=[OfferTier(name="line_500", amount=500, installments=4), ...],
        risk_caps=[RiskCap(pd_below=0.03, max_tier="line_5000"), RiskCap(pd_below=1.0, max_tier="line_1000")],
    )
    allowed = offers.allowed(probability_of_default)      # bool [n, K]: tier k may be offered

Tiers are listed from the smallest line to the largest; a policy's action is a tier's index.
The cap is a guardrail that no policy, exploring or learned, can cross: for a probability of
default ``p`` the first band with ``p < pd_below`` names the largest tier allowed, and every
tier up to it (inclusive) is allowed. A ``p`` at or above the last band's ``pd_below`` gets
the smallest tier only, so an approved applicant always has at least one offer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mlplatform.errors import DataError

if TYPE_CHECKING:  # numpy is imported where it is used: the config layer holds these classes
    import numpy as np

__all__ = ["OfferConfig", "OfferTier", "RiskCap"]


class OfferTier(BaseModel):
    """One credit-line offer: its name, the line amount and the plan's installments."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,62}$", description="The tier's name, e.g. line_1000.")
    amount: float = Field(gt=0, description="The credit line offered, in the account currency.")
    installments: int = Field(default=4, ge=1, le=60, description="Installments of the plan offered with it.")


class RiskCap(BaseModel):
    """A risk band: applicants with probability of default below ``pd_below`` may be offered up to ``max_tier``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pd_below: float = Field(gt=0.0, le=1.0, description="Upper bound (exclusive) of the band's probability of default.")
    max_tier: str = Field(description="The largest tier offered in this band (a tier name).")


class OfferConfig(BaseModel):
    """The offer tiers and the risk cap (see the module docstring for the cap's semantics)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tiers: tuple[OfferTier, ...] = Field(min_length=2, description="Offer tiers, smallest line first.")
    risk_caps: tuple[RiskCap, ...] = Field(
        min_length=1, description="Risk bands in increasing pd_below; each names the largest tier allowed in it."
    )

    @model_validator(mode="after")
    def _check(self) -> OfferConfig:
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        amounts = [t.amount for t in self.tiers]
        if any(b <= a for a, b in zip(amounts, amounts[1:], strict=False)):
            raise ValueError(f"tiers must be listed by increasing amount, got {amounts}")
        bounds = [c.pd_below for c in self.risk_caps]
        if any(b <= a for a, b in zip(bounds, bounds[1:], strict=False)):
            raise ValueError(f"risk_caps must be listed by increasing pd_below, got {bounds}")
        unknown = [c.max_tier for c in self.risk_caps if c.max_tier not in names]
        if unknown:
            raise ValueError(f"risk_caps name unknown tiers {unknown}; the tiers are {names}")
        return self

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tiers]

    @property
    def amounts(self) -> np.ndarray:
        import numpy as np

        return np.array([t.amount for t in self.tiers], dtype=np.float64)

    def max_tier_index(self, probability_of_default: Sequence[float] | np.ndarray) -> np.ndarray:
        """The largest allowed tier's index per applicant (int64 [n]).

        Raises:
            DataError: a probability is not a finite number in [0, 1].
        """
        import numpy as np

        p = np.asarray(probability_of_default, dtype=np.float64).reshape(-1)
        bad = ~np.isfinite(p) | (p < 0.0) | (p > 1.0)
        if bad.any():
            raise DataError(f"probability_of_default must be in [0, 1], got {float(p[bad][0])!r} at row {int(np.flatnonzero(bad)[0])}")
        index = {t.name: i for i, t in enumerate(self.tiers)}
        bounds = np.array([c.pd_below for c in self.risk_caps])
        caps = np.array([index[c.max_tier] for c in self.risk_caps] + [0], dtype=np.int64)
        # band = the first with p < pd_below; past the last band: the smallest tier (index 0).
        return caps[np.searchsorted(bounds, p, side="right")]

    def allowed(self, probability_of_default: Sequence[float] | np.ndarray) -> np.ndarray:
        """Which tiers each applicant may be offered: bool [n, K], tier 0 always allowed."""
        top = self.max_tier_index(probability_of_default)
        import numpy as np

        return np.arange(len(self.tiers))[None, :] <= top[:, None]
