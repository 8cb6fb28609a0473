"""Rewards for logged offers, from outcomes, once they are knowable.

    rule = RewardRule(revenue_rate=0.12, loss_given_default=0.7, horizon_days=90)
    rewarded, report = join_rewards(offer_log, outcomes, rule, as_of=datetime(2025, 1, 1, tzinfo=UTC))

An offer's reward is what the credit line earned over the horizon:

    reward = drawn * revenue_rate  -  defaulted * loss_given_default * drawn

``drawn`` (the amount the customer used) and ``defaulted`` come from the outcomes table:
one or more records per decision (``decision_id``, ``observed_at``, ``drawn``,
``defaulted``), each the outcome as known at ``observed_at``. Like a label, the reward is
fixed at the horizon and never seen before it:

- a decision is rewarded only when its horizon has passed by ``as_of``:
  ``decided_at + horizon <= as_of``;
- its reward uses the latest outcome record with ``observed_at <= decided_at + horizon``
  (the outcome as it stood at the horizon; later corrections and recoveries do not change
  it, so the same decision always gets the same reward);
- a decision whose horizon passed with no outcome record by then is dropped and counted
  (``report["missing_outcome"]``): the outcome feed is late or broken, and a guessed zero
  would bias every estimate.

Times are UTC; naive timestamps are taken as UTC.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mlplatform.errors import DataError
from mlplatform.timestamps import parse_instant

__all__ = ["RewardRule", "join_rewards"]

_OUTCOME_COLUMNS = ("decision_id", "observed_at", "drawn", "defaulted")


class RewardRule(BaseModel):
    """Revenue minus loss given default over a fixed horizon (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    revenue_rate: float = Field(gt=0.0, le=1.0, description="Revenue earned per unit of credit drawn over the horizon.")
    loss_given_default: float = Field(ge=0.0, le=1.0, description="Share of the drawn amount lost when the loan defaults.")
    horizon_days: int = Field(ge=1, le=3650, description="Days after the decision at which the outcome is final.")

    @property
    def horizon(self) -> timedelta:
        return timedelta(days=self.horizon_days)

    def reward(self, drawn: np.ndarray, defaulted: np.ndarray) -> np.ndarray:
        drawn = np.asarray(drawn, dtype=np.float64)
        return drawn * self.revenue_rate - np.asarray(defaulted, dtype=np.float64) * self.loss_given_default * drawn


def join_rewards(offer_log: Any, outcomes: Any, rule: RewardRule, as_of: datetime | str) -> tuple[Any, dict[str, int]]:
    """The offer log's rows whose reward is knowable at ``as_of``, with ``reward``, ``drawn``,
    ``defaulted`` and ``outcome_observed_at`` added (pyarrow tables in and out).

    Returns:
        (table, report): ``report`` counts ``decisions``, ``rewarded``, ``before_horizon``
        (horizon not passed at ``as_of``) and ``missing_outcome``.

    Raises:
        DataError: a column is missing, an outcome has a negative or non-finite ``drawn``.
    """
    import pandas as pd
    import pyarrow as pa

    cutoff = pd.Timestamp(parse_instant(as_of, "as_of"))
    log_df = offer_log.to_pandas() if isinstance(offer_log, pa.Table) else pd.DataFrame(offer_log)
    out_df = outcomes.to_pandas() if isinstance(outcomes, pa.Table) else pd.DataFrame(outcomes)
    for frame, needed, what in ((log_df, ("decision_id", "decided_at"), "offer log"), (out_df, _OUTCOME_COLUMNS, "outcomes")):
        missing = [c for c in needed if c not in frame.columns]
        if missing:
            raise DataError(f"{what} is missing columns {missing}; it needs {list(needed)}")
    if log_df["decision_id"].duplicated().any():
        raise DataError(f"offer log has duplicate decision_id {log_df.loc[log_df['decision_id'].duplicated(), 'decision_id'].iloc[0]!r}")
    decided = _utc(log_df["decided_at"], "decided_at")
    horizon_end = decided + pd.Timedelta(rule.horizon)
    due = (horizon_end <= cutoff).to_numpy()

    out = out_df.loc[:, list(_OUTCOME_COLUMNS)].copy()
    out["observed_at"] = _utc(out["observed_at"], "observed_at")
    drawn = out["drawn"].to_numpy(dtype=np.float64)
    if not np.isfinite(drawn).all() or (drawn < 0).any():
        raise DataError("outcomes: 'drawn' must be a finite amount >= 0")
    ends = pd.DataFrame({"decision_id": log_df["decision_id"].to_numpy(), "_end": horizon_end.to_numpy()})
    known = out.merge(ends, on="decision_id", how="inner")
    known = known[known["observed_at"] <= known["_end"]]
    # latest record at the horizon; ties on observed_at: the last given
    latest = known.sort_values("observed_at", kind="stable").groupby("decision_id", sort=False).tail(1)
    latest = latest.set_index("decision_id")

    rows = log_df[due].copy()
    have = rows["decision_id"].isin(latest.index).to_numpy()
    report = {
        "decisions": len(log_df),
        "before_horizon": int((~due).sum()),
        "missing_outcome": int((~have).sum()),
        "rewarded": int(have.sum()),
    }
    rows = rows[have]
    matched = latest.loc[rows["decision_id"].to_numpy()]
    rows["drawn"] = matched["drawn"].to_numpy(dtype=np.float64)
    rows["defaulted"] = matched["defaulted"].to_numpy(dtype=bool)
    rows["outcome_observed_at"] = matched["observed_at"].to_numpy()
    rows["reward"] = rule.reward(rows["drawn"].to_numpy(), rows["defaulted"].to_numpy())
    return pa.Table.from_pandas(rows.reset_index(drop=True), preserve_index=False), report


def _utc(column: Any, name: str) -> Any:
    import pandas as pd

    try:
        values = pd.to_datetime(column)
    except (ValueError, TypeError):
        raise DataError(f"{name!r} must hold timestamps, got {column.iloc[0]!r}") from None
    if values.isna().any():
        raise DataError(f"{name!r} has a missing timestamp")
    return values.dt.tz_localize("UTC") if values.dt.tz is None else values.dt.tz_convert("UTC")
