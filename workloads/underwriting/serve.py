"""Deploy the decision service and send it sample checkouts (the end of ``mlp run``)."""

from __future__ import annotations

import json
import os
import secrets
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from mlplatform.errors import ServingError

if TYPE_CHECKING:
    from mlplatform.platform import Platform
    from mlplatform.serving.api import DeployedApp

Echo = Callable[[str], None]


class ServeConfig(BaseModel):
    """The serving step of the workload file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    deploy: bool = Field(default=True, description="Deploy the decision service at the end of the run.")
    num_replicas: int = Field(default=1, ge=1, description="Replicas of the serving application.")
    sample_decisions: int = Field(default=3, ge=0, description="Sample checkouts to send once deployed.")


def ensure_api_key(platform: Platform, echo: Echo) -> str:
    """The API key from the environment; for a local demo root without one, a generated key
    stored next to the data (mode 0600) — its path is printed, never the key."""
    name = platform.config.serving.api_key_env
    key = os.environ.get(name)
    if key:
        return key
    if platform.storage.is_s3:
        raise ServingError(f"set the API key in ${name} (16+ characters) before deploying to a cluster")
    path = os.path.join(platform.storage.root, "serving", "api_key")
    if os.path.exists(path):
        key = open(path).read().strip()
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        key = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(key + "\n")
        echo(f"[deploy] no ${name} set: generated an API key in {path} (export {name}=$(cat {path}))")
    os.environ[name] = key
    return key


def sample_applications(
    platform: Platform, model_name: str, count: int, risky: int = 10
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Recent real applications from the synthetic data, replayed as new checkouts a day later:
    the ``risky`` ones the production model scores highest on today's online features
    (highest first; the most likely declines, so reasons show), and ``count - 1`` others at
    random."""
    import numpy as np
    import pandas as pd
    import pyarrow.compute as pc

    from mlplatform.serving.replay import encode_features

    apps = platform.datasets.read_table(
        "raw/underwriting/applications",
        columns=["application_id", "applicant_id", "merchant_id", "amount", "currency", "term", "application_ts"],
    )
    last = pc.max(apps.column("application_ts")).as_py()
    recent = apps.filter(pc.greater(apps.column("application_ts"), last - timedelta(days=30))).to_pandas()
    recent["amount"] = (recent["amount"] * 1.5).round(2)
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

    def as_checkouts(frame: pd.DataFrame, tag: str) -> list[dict[str, Any]]:
        return [
            {
                "application_id": f"sample-{row.application_id}-{tag}{i}",
                "applicant_id": int(row.applicant_id),
                "merchant_id": int(row.merchant_id),
                "amount": float(row.amount),
                "currency": row.currency,
                "term": int(row.term),
                # the endpoint decides on the features as of now and refuses another time
                "timestamp": datetime.now(UTC).isoformat(),
            }
            for i, row in enumerate(frame.itertuples())
        ]

    return as_checkouts(worst, "r"), as_checkouts(rest, "")


def post_decision(url: str, key: str, application: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    request = urllib.request.Request(
        f"{url}/v1/decisions",
        data=json.dumps(application).encode(),
        headers={"Content-Type": "application/json", "X-API-Key": key},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def deploy_and_decide(platform: Platform, model_name: str, config: ServeConfig, echo: Echo) -> tuple[DeployedApp, list]:
    key = ensure_api_key(platform, echo)
    deployed = platform.serving.deploy(model_name, num_replicas=config.num_replicas)
    echo(f"[deploy] {deployed.name}: {model_name} v{deployed.model_version} at {deployed.url} ({deployed.ingress} ingress)")
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
        decisions.append(_decide_and_print(deployed.url, key, application, echo))
        if decisions[-1]["decision"] == "decline":
            break
    for application in others:
        decisions.append(_decide_and_print(deployed.url, key, application, echo))
    return deployed, decisions


def _decide_and_print(url: str, key: str, application: dict[str, Any], echo: Echo) -> dict[str, Any]:
    answer = post_decision(url, key, application)
    reasons = "; ".join(r["text"] for r in answer.get("reasons", [])) or "-"
    pd_ = answer.get("probability_of_default")
    echo(
        f"[decide] {application['application_id']} amount {application['amount']:.2f} {application['currency']} "
        f"x{application['term']}: {answer['decision'].upper()}"
        + (f" (PD {pd_:.3f})" if pd_ is not None else "")
        + (" [fallback: " + str(answer.get("fallback_reason")) + "]" if answer.get("fallback") else "")
        + f" reasons: {reasons}"
    )
    return answer
