"""The promotion gate: a version reaches ``production`` only if it compares well with the
version there now, on the same applications.

    platform.models.promote("underwriting", 7)                        # gated
    platform.models.promote("underwriting", 7, force=True, reason="fixes the 2024-06 label bug")
    platform.models.promote("underwriting", 8, "candidate")          # other aliases: no gate

This module is the gate's flow (who may move ``production``, what is recorded, the refusal);
the comparison itself is an evaluator the registry is given (``Platform`` wires
``mlplatform.evaluation.promotion.PromotionEvaluator``, which reads training sets and uses the
evaluation metrics — parts the registry does not depend on). What it compares:

The evidence. Both versions are scored, through the predictor serving uses
(``ModelRegistry.load_predictor``, checksums verified), on the same rows: the out-of-time split
(``promotion_gate.split``, default ``test``) of the training-set snapshot the *candidate's*
lineage names — the most recent labelled applications the platform has when the candidate is
trained — at most ``promotion_gate.max_rows`` of them, the latest by the snapshot's timestamp
column. Labelled rows are what AUC and calibration need; the decision log holds recent
applications too, but their outcomes are not known for months. Then:

- **Out-of-time AUC**: ``AUC(candidate) >= AUC(production) - auc_margin`` on those rows
  (AUC as in ``mlplatform.evaluation.metrics``).
- **Score PSI**: ``PSI(production scores -> candidate scores) <= max_score_psi``, the
  production scores' deciles as the reference bins (``metrics.psi``): how differently the two
  versions would spread the same applicants over the score range, i.e. how much the approval
  mix would move.
- **Calibration** (in the large): ``|mean candidate score / observed default rate - 1| <=
  max_calibration_error``; the production version's figure is shown beside it.

A check's bound is inclusive (a figure equal to its bound passes). The gate applies only to
``production``; it passes with nothing to compare when no version is in production yet or the
version is already there. If the comparison cannot be made (the candidate names no training
set, the rows lack a version's inputs, too few rows or one class), the gate fails with the
reason: an unverifiable promotion needs ``force`` like a worse one.

Every promotion, refusal and forced override is recorded in the alias history
(``mlplatform.models.alias_history``) with the figures, who, when and the reason, and the
alias document itself carries the decision that moved it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from mlplatform.errors import ModelError, PromotionRefused
from mlplatform.models.alias_history import AliasEvent, current_user, record_event

if TYPE_CHECKING:
    from mlplatform.models.registry import ModelRegistry

#: ``evaluate(registry, name, candidate_version, production_version) -> PromotionDecision``.
Evaluator = Callable[["ModelRegistry", str, int, int], "PromotionDecision"]

__all__ = ["GATED_ALIAS", "Evaluator", "GateCheck", "PromotionDecision", "promote"]

GATED_ALIAS = "production"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateCheck:
    """One figure against its bound; ``line`` says it for a person."""

    name: str
    value: float
    bound: float
    passed: bool
    line: str


@dataclass(frozen=True)
class PromotionDecision:
    """What the gate found. ``problem``: why the versions could not be compared (then
    ``passed`` is False and ``checks`` is empty). ``evidence`` names the rows."""

    model: str
    version: int
    alias: str
    production: int | None
    passed: bool
    checks: tuple[GateCheck, ...] = ()
    problem: str | None = None
    note: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)

    def lines(self) -> list[str]:
        """The decision as lines a person reads: one per figure, then the verdict."""
        out = [c.line for c in self.checks]
        if self.problem:
            out.append(f"cannot compare: {self.problem}")
        if self.note:
            out.append(self.note)
        if self.evidence.get("rows"):
            ev = self.evidence
            out.append(
                f"evidence: {ev['rows']:,} rows of split {ev['split']!r} of training set {ev['training_set']} "
                f"v{ev['training_set_version']} ({ev['first']} .. {ev['last']})"
            )
        return out

    def to_json(self) -> dict[str, Any]:
        return _plain(asdict(self))


def promote(
    registry: ModelRegistry,
    evaluate: Evaluator | None,
    name: str,
    version: int,
    alias: str = GATED_ALIAS,
    *,
    force: bool = False,
    reason: str | None = None,
    by: str | None = None,
) -> AliasEvent:
    """Point ``alias`` at ``version`` of ``name``; for ``production``, only through the gate.

    Args:
        force: move ``production`` even though the gate fails (or cannot compare); needs ``reason``.
        reason: why (required with ``force``); recorded, and logged when forcing.
        evaluate: compares the candidate with the production version; None (a registry built
            without one) means no comparison can be made, so ``production`` moves only by force
            while another version is there.
        by: who (default ``MLP_USER`` or the login name).

    Returns:
        The recorded ``AliasEvent`` (``outcome`` ``promoted`` or ``forced``).

    Raises:
        PromotionRefused: the gate failed and ``force`` is False; the refusal is recorded and
            the alias does not move. ``.decision`` holds the figures.
        ModelError: ``force`` without a reason, a bad alias, or a bad reason.
        NotFoundError: no such model or version.
    """
    if not isinstance(force, bool):
        raise ModelError(f"force must be True or False, got {force!r}")
    if reason is not None and (not isinstance(reason, str) or not reason.strip()):
        raise ModelError(f"reason must be a non-empty string, got {reason!r}")
    if force and reason is None:
        raise ModelError("force=True needs a reason: say why the gate is overridden (it is recorded with the move)")
    target = registry.get(name, version=version)
    registry.check_alias(alias)
    previous = registry.aliases(name).get(alias)
    who = by or current_user()
    if alias != GATED_ALIAS:
        return registry.move_alias(name, alias, target.version, outcome="promoted", by=who, reason=reason, decision=None)
    decision = _decide(registry, evaluate, name, target.version, previous)
    if decision.passed:
        return registry.move_alias(name, alias, target.version, outcome="promoted", by=who, reason=reason, decision=decision.to_json())
    if force:
        log.warning(
            "%s v%d forced to %s over v%s by %s despite the gate (%s); reason: %s",
            name, target.version, alias, previous, who, "; ".join(decision.lines()), reason,
        )
        return registry.move_alias(name, alias, target.version, outcome="forced", by=who, reason=reason, decision=decision.to_json())
    event = AliasEvent(
        model=name, alias=alias, version=target.version, previous=previous, outcome="refused",
        at=_now(), by=who, reason=reason, decision=decision.to_json(),
    )
    record_event(registry.storage, event)
    log.info("%s v%d refused for %s: %s", name, target.version, alias, "; ".join(decision.lines()))
    lines = "\n  ".join(decision.lines())
    raise PromotionRefused(
        f"model {name!r} v{target.version} was not promoted to {alias} (v{previous} stays):\n  {lines}\n"
        "promote with force=True and a reason (mlp models promote ... --force --reason TEXT) to override",
        decision,
    )


def _decide(registry: ModelRegistry, evaluate: Evaluator | None, name: str, version: int, production: int | None) -> PromotionDecision:
    base = {"model": name, "version": version, "alias": GATED_ALIAS, "production": production}
    if production is None:
        return PromotionDecision(**base, passed=True, note="no version in production yet: nothing to compare with")
    if production == version:
        return PromotionDecision(**base, passed=True, note=f"v{version} is already in production")
    if evaluate is None:
        return PromotionDecision(**base, passed=False, problem="this registry has no promotion evaluator (Platform wires one)")
    return evaluate(registry, name, version, production)


def _now() -> datetime:
    return datetime.now(UTC)


def _plain(value: Any) -> Any:
    """JSON-safe: NaN and infinities as None, tuples as lists."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
