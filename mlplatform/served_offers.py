"""``serving.offers``: the credit-line tiers, the risk cap and the acting offer policy of the
checkout decision (what ``mlplatform.serving.offers`` does with them is described there).

    offers:
      tiers: [{name: line_500, amount: 500}, {name: line_1000, amount: 1000}]
      risk_caps: [{pd_below: 0.05, max_tier: line_1000}]
      policy_model: credit_line_policy     # omit: the logging policy (epsilon-greedy on the cap)
      shadow_alias: shadow
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mlplatform.offer_tiers import OfferConfig, OfferTier, RiskCap

__all__ = ["ServingOffers"]


class ServingOffers(BaseModel):
    """``serving.offers``: the tiers, the risk cap and the acting policy (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tiers: tuple[OfferTier, ...] = Field(min_length=2, description="Offer tiers, smallest line first.")
    risk_caps: tuple[RiskCap, ...] = Field(min_length=1, description="Risk bands by increasing pd_below, each naming its largest tier.")
    policy_model: str | None = Field(
        default=None, min_length=1, description="A registered policy-flavor model acting as the offer policy; none: the logging policy."
    )
    alias: str = Field(default="production", min_length=1, description="The policy model's alias that acts.")
    shadow_alias: str | None = Field(
        default=None, min_length=1, description="An alias of the policy model whose choice is logged beside the acting one (shadow)."
    )
    exploration: float = Field(
        default=0.1, ge=0.0, lt=1.0, description="Epsilon of the logging policy: share spread uniformly over the allowed tiers."
    )

    @model_validator(mode="after")
    def _check(self) -> ServingOffers:
        self.offer_config()  # tier names, order and cap bands, named in the error
        if self.shadow_alias is not None and self.policy_model is None:
            raise ValueError(f"shadow_alias {self.shadow_alias!r} needs a policy_model")
        if self.shadow_alias is not None and self.shadow_alias == self.alias:
            raise ValueError(f"shadow_alias must differ from alias, both are {self.alias!r}")
        return self

    def offer_config(self) -> OfferConfig:
        return OfferConfig(tiers=self.tiers, risk_caps=self.risk_caps)
