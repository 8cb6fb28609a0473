"""The decision policy: how a probability of default and an application become a decision.

Its own module, not part of ``serving/``: the platform config holds it (``serving.policy``),
and the config must not import the serving package.

    policy = DecisionPolicy(approve_below=0.08, decline_at=0.20, max_amount=2000)
    policy.knockouts(amount=2500.0, currency="USD", term=4)   # [Reason("amount_above_limit", ...)]
    policy.by_score(0.31)                                      # "decline"
    policy.fallback(amount=80.0, currency="USD", term=4)        # ("approve", []) with fallback_approve_up_to=100

Configured as ``serving.policy`` in the platform config (YAML), or passed to
``platform.serving.deploy(policy=...)``. The rules, in order:

1. **Knockouts** (no model needed): an amount outside ``[min_amount, max_amount]``, a
   currency not in ``currencies`` or a term not in ``terms`` is declined, with one policy
   reason per failed rule. This holds in fallback too, so an outage never approves what the
   policy forbids.
2. **Score**: probability of default ``p`` < ``approve_below`` approves; ``p >= decline_at``
   declines (with the model's reason codes); in between is ``review``. With
   ``approve_below == decline_at`` there is no review band.
3. **Other models** (``model_rules``, e.g. a fraud model), each with its own score and
   thresholds: a score at or above ``decline_at`` declines, with the rule's own reason first;
   at or above ``review_at`` an approve becomes a review, with the rule's reason. A rule only
   makes a decision stricter: it never approves what the score or a knockout did not. When
   the rule's model gives no score (unavailable, failed, or past its own deadline) the rule
   does what ``on_unavailable`` says: ``ignore`` (decide without it) or ``review`` (an approve
   becomes a review, with reason ``<code>_unavailable``).
4. **Fallback** (features or the decision model unavailable, deadline exceeded): the knockouts, then
   ``approve`` if ``fallback_approve_up_to`` is set and the amount is at most that, else
   ``fallback_decision``. Deterministic: the same application always gets the same fallback.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["Decision", "DecisionPolicy", "ModelRule", "PolicyReason"]

Decision = Literal["approve", "decline", "review"]


class PolicyReason(NamedTuple):
    """A reason that comes from a policy rule rather than the model."""

    code: str
    text: str


class ModelRule(BaseModel):
    """A served model the policy consults beside the decision model (rule 3), e.g. fraud."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$", description="A model of serving.models.")
    output: str = Field(default="probability", min_length=1, max_length=128, description="The output read as the score.")
    review_at: float | None = Field(default=None, ge=0.0, le=1.0, description="An approve becomes a review at or above this score.")
    decline_at: float | None = Field(default=None, ge=0.0, le=1.0, description="Decline at or above this score.")
    code: str = Field(default="fraud_risk", pattern=r"^[a-z][a-z0-9_]{0,62}$", description="The reason code this rule gives.")
    text: str = Field(
        default="We could not verify this purchase", min_length=1, max_length=200, description="The reason text shown to the customer."
    )
    on_unavailable: Literal["ignore", "review"] = Field(
        default="ignore", description="Without a score (model down, failed, past its deadline): decide without it, or review an approve."
    )

    @model_validator(mode="after")
    def _thresholds(self) -> ModelRule:
        if self.review_at is None and self.decline_at is None:
            raise ValueError("give review_at, decline_at or both (a rule without a threshold does nothing)")
        if self.review_at is not None and self.decline_at is not None and self.review_at > self.decline_at:
            raise ValueError(f"review_at ({self.review_at}) must not exceed decline_at ({self.decline_at})")
        return self

    def apply(self, decision: Decision, score: float | None) -> tuple[Decision, PolicyReason | None]:
        """The decision after this rule, and the reason it adds (None: unchanged)."""
        if score is None:
            if self.on_unavailable == "review" and decision == "approve":
                return "review", PolicyReason(f"{self.code}_unavailable", "We could not complete our checks on this purchase")
            return decision, None
        if self.decline_at is not None and score >= self.decline_at:
            return "decline", PolicyReason(self.code, self.text)
        if self.review_at is not None and score >= self.review_at and decision == "approve":
            return "review", PolicyReason(self.code, self.text)
        return decision, None


class DecisionPolicy(BaseModel):
    """Thresholds, limits and the fallback decision of the decision endpoint (``serving.policy``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    approve_below: float = Field(
        default=0.10, ge=0.0, le=1.0, description="Approve when the probability of default is below this."
    )
    decline_at: float = Field(
        default=0.25,
        ge=0.0,
        le=1.0,
        description="Decline when the probability of default is at or above this; between approve_below and this: review.",
    )
    min_amount: float = Field(default=1.0, gt=0, description="Smallest order amount offered credit.")
    max_amount: float = Field(default=5000.0, gt=0, description="Largest order amount offered credit.")
    currencies: tuple[str, ...] = Field(
        default=("USD",), min_length=1, description="ISO 4217 currencies offered credit, e.g. [USD, EUR]."
    )
    terms: tuple[int, ...] = Field(default=(4, 6, 12), min_length=1, description="Installment counts offered.")
    fallback_decision: Decision = Field(
        default="review", description="Decision when features or the model are unavailable or the deadline passes."
    )
    fallback_approve_up_to: float | None = Field(
        default=None, ge=0, description="In fallback, approve amounts up to this (None: always fallback_decision)."
    )
    max_reasons: int = Field(default=4, ge=1, le=4, description="Reason codes returned with a decline (at most 4).")
    shadow_alias: str | None = Field(
        default=None,
        pattern=r"^[a-z][a-z0-9_-]{0,62}$",
        description="Also score with the model under this alias (e.g. candidate) and log it beside the decision.",
    )

    model_rules: tuple[ModelRule, ...] = Field(
        default=(), description="Other served models the decision consults (e.g. fraud), each with thresholds and a reason."
    )

    @field_validator("currencies")
    @classmethod
    def _currencies(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        bad = [c for c in value if not (isinstance(c, str) and len(c) == 3 and c.isascii() and c.isupper())]
        if bad:
            raise ValueError(f"currencies must be ISO 4217 codes like 'USD', got {bad}")
        return value

    @field_validator("terms")
    @classmethod
    def _terms(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        bad = [t for t in value if t < 1]
        if bad:
            raise ValueError(f"terms must be positive installment counts, got {bad}")
        return value

    @model_validator(mode="after")
    def _ordered(self) -> DecisionPolicy:
        if self.approve_below > self.decline_at:
            raise ValueError(f"approve_below ({self.approve_below}) must not exceed decline_at ({self.decline_at})")
        if self.min_amount > self.max_amount:
            raise ValueError(f"min_amount ({self.min_amount}) must not exceed max_amount ({self.max_amount})")
        return self

    # ------------------------------------------------------------------------- rules
    def knockouts(self, *, amount: float, currency: str, term: int) -> list[PolicyReason]:
        """The policy rules the application fails (empty: none), in a fixed order."""
        out = []
        if amount < self.min_amount:
            out.append(PolicyReason("amount_below_minimum", f"Order amount is below the minimum of {self.min_amount:g}"))
        if amount > self.max_amount:
            out.append(PolicyReason("amount_above_limit", f"Order amount is above the limit of {self.max_amount:g}"))
        if currency not in self.currencies:
            out.append(PolicyReason("currency_not_offered", f"Pay-later is not offered in {currency}"))
        if term not in self.terms:
            out.append(PolicyReason("term_not_offered", f"A plan of {term} installments is not offered"))
        return out

    def by_score(self, probability_of_default: float) -> Decision:
        """``approve``, ``review`` or ``decline`` for a probability of default (see rule 2)."""
        if probability_of_default >= self.decline_at:
            return "decline"
        if probability_of_default < self.approve_below:
            return "approve"
        return "review"

    def fallback(self, *, amount: float, currency: str, term: int) -> tuple[Decision, list[PolicyReason]]:
        """The decision when no score can be had (rule 3), with the policy reasons of a knockout."""
        knocked = self.knockouts(amount=amount, currency=currency, term=term)
        if knocked:
            return "decline", knocked
        if self.fallback_approve_up_to is not None and amount <= self.fallback_approve_up_to:
            return "approve", []
        return self.fallback_decision, []
