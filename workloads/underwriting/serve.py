"""Deploy the decision service and send it sample checkouts (the end of ``mlp run``)."""

from __future__ import annotations

import logging
import secrets
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from mlplatform.serving.client import api_key, post_decision

if TYPE_CHECKING:
    import pandas as pd

    from mlplatform.platform import Platform
    from mlplatform.serving.api import DeployedApp

log = logging.getLogger(__name__)


class ServeConfig(BaseModel):
    """The serving step of the workload file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    deploy: bool = Field(default=True, description="Deploy the decision service at the end of the run.")
    num_replicas: int = Field(default=1, ge=1, description="Replicas of the serving application.")
    sample_decisions: int = Field(default=3, ge=0, description="Sample checkouts to send once deployed.")
    live_event: bool = Field(
        default=True,
        description="End with one fresh event (a missed installment) that changes a recent applicant's decision.",
    )


def recent_applications(platform: Platform) -> tuple[pd.DataFrame, datetime]:
    """The applications of the data's last 30 days, their amounts raised by half (sample
    checkouts replay them), sorted by application id; and the latest application's time."""
    import pyarrow.compute as pc

    apps = platform.datasets.read_table(
        "raw/underwriting/applications",
        columns=["application_id", "applicant_id", "merchant_id", "amount", "currency", "term", "application_ts"],
    )
    last = pc.max(apps.column("application_ts")).as_py()
    recent = apps.filter(pc.greater(apps.column("application_ts"), last - timedelta(days=30))).to_pandas()
    recent["amount"] = (recent["amount"] * 1.5).round(2)
    return recent.sort_values("application_id", ignore_index=True), last


def as_checkout(row: Any, application_id: str) -> dict[str, Any]:
    """A decision request for the application ``row`` (of ``recent_applications``), decided now."""
    return {
        "application_id": application_id,
        "applicant_id": int(row.applicant_id),
        "merchant_id": int(row.merchant_id),
        "amount": float(row.amount),
        "currency": row.currency,
        "term": int(row.term),
        # the endpoint decides on the features as of now and refuses another time
        "timestamp": datetime.now(UTC).isoformat(),
    }


def sample_applications(
    platform: Platform, model_name: str, count: int, risky: int = 10
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Recent real applications from the synthetic data, replayed as new checkouts a day later:
    the ``risky`` ones the production model scores highest on today's online features
    (highest first; the most likely declines, so reasons show), and ``count - 1`` others at
    random."""
    import numpy as np

    from mlplatform.models.encoding import encode_features

    recent, last = recent_applications(platform)
    if count and len(recent):
        booster = platform.models.load(model_name, alias="production").model
        online = platform.features.get_online_features(
            "underwriting_v1",
            {c: recent[c].tolist() for c in ("applicant_id", "merchant_id", "amount", "term")},
            now=last + timedelta(days=1),
        ).to_dict()
        rows = [{name: values[i] for name, values in online.items()} for i in range(len(recent))]
        recent["score"] = booster.predict(np.vstack([encode_features(booster, row) for row in rows]))
        worst = recent.sort_values("score", ascending=False).drop_duplicates("applicant_id").head(risky)
    else:
        worst = recent.iloc[:0]
    rest = recent.drop(worst.index)
    rest = rest.sample(n=min(max(count - 1, 0), len(rest)), random_state=1) if len(rest) else rest

    # An application id is decided once (a retry gets the first answer; the same id with
    # another body is a 409), so each run's samples get ids of their own.
    run = secrets.token_hex(3)

    def as_checkouts(frame: pd.DataFrame, tag: str) -> list[dict[str, Any]]:
        return [as_checkout(row, f"sample-{row.application_id}-{run}-{tag}{i}") for i, row in enumerate(frame.itertuples())]

    return as_checkouts(worst, "r"), as_checkouts(rest, "")


def deploy(platform: Platform, model_name: str, config: ServeConfig) -> DeployedApp:
    """Deploy the decision service with the production version of ``model_name`` (which
    starts the stream processors that keep its real-time features live)."""
    api_key(platform.storage, platform.config.serving.api_key_env)
    return platform.serving.deploy(model_name, num_replicas=config.num_replicas)


def decide_samples(platform: Platform, deployed: DeployedApp, model_name: str, config: ServeConfig) -> list:
    """Send sample checkouts to the deployed service; each answer is logged as one ``[decide]`` line."""
    key = api_key(platform.storage, platform.config.serving.api_key_env)
    decisions = []
    risky, others = sample_applications(platform, model_name, config.sample_decisions)
    if risky or others:
        # the first request to fresh replicas loads models and connections; don't let that
        # cold start be the decision we show
        warm = {**(risky or others)[0], "application_id": f"warmup-{secrets.token_hex(4)}"}
        try:
            post_decision(deployed.url, key, warm)
        except OSError:
            pass
    # The highest-scored applications until one is declined (so a decision with reasons
    # shows), then the others; every decision sent is printed.
    for application in risky:
        decisions.append(decide_and_log(deployed.url, key, application))
        if decisions[-1]["decision"] == "decline":
            break
    for application in others:
        decisions.append(decide_and_log(deployed.url, key, application))
    return decisions


def decide_and_log(url: str, key: str, application: dict[str, Any]) -> dict[str, Any]:
    """Decide ``application`` at the endpoint ``url``; logs one ``[decide]`` line, returns the answer."""
    answer = post_decision(url, key, application)
    reasons = "; ".join(r["text"] for r in answer.get("reasons", [])) or "-"
    pd_ = answer.get("probability_of_default")
    log.info(
        f"[decide] {application['application_id']} amount {application['amount']:.2f} {application['currency']} "
        f"x{application['term']}: {answer['decision'].upper()}"
        + (f" (PD {pd_:.3f})" if pd_ is not None else "")
        + (" [fallback: " + str(answer.get("fallback_reason")) + "]" if answer.get("fallback") else "")
        + f" reasons: {reasons}"
    )
    return answer
