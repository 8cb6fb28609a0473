"""The README's HTTP examples, run exactly as written against the session's deployed application."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from _serving_app import KEY

pytestmark = pytest.mark.integration

README = Path(__file__).resolve().parents[2] / "README.md"


def _http_block() -> str:
    text = README.read_text()
    section = text[text.index("**3. HTTP.**") :]
    match = re.search(r"```bash\n(.*?)```", section, re.S)
    assert match, "the README's HTTP section has no bash block"
    return match.group(1)


def _documents(output: str) -> list[object]:
    """The JSON documents curl printed one after another (the last one may be cut by head -c)."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while i < len(output):
        if output[i].isspace():
            i += 1
            continue
        try:
            doc, i = decoder.raw_decode(output, i)
        except ValueError:
            out.append(output[i:])
            break
        out.append(doc)
    return out


def test_the_readme_curl_examples_work_as_written(served):
    _, deployed, _ = served
    if shutil.which("curl") is None:
        pytest.fail("curl is not installed (apt-get install curl)")
    env = {**os.environ, "MLP_API_KEY": KEY, "MLP_URL": deployed.url}
    run = subprocess.run(["bash", "-c", "set -e\n" + _http_block()], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    decision, features, predicted, openapi = _documents(run.stdout)
    assert decision["decision"] in ("approve", "decline", "review") and decision["fallback"] is False, decision
    assert features["metadata"]["feature_names"][:2] == ["applicant_id", "merchant_id"], features
    assert all(len(r["values"]) == 1 for r in features["results"])
    assert predicted["model_name"] == "underwriting" and 0.0 <= predicted["outputs"]["probability"][0] <= 1.0, predicted
    assert isinstance(openapi, str) and openapi.startswith('{"openapi":"3.')


def test_the_readme_event_example_is_accepted_and_applied(served):
    """The real-time section's curl posts a missed installment: accepted by the bus, then applied
    online by the processors the deployment started."""
    import time

    platform, deployed, _ = served
    text = README.read_text()
    section = text[text.index("## Real-time features") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    env = {**os.environ, "MLP_API_KEY": KEY, "MLP_URL": deployed.url}
    run = subprocess.run(["bash", "-c", "set -e\n" + block], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    (answer,) = _documents(run.stdout)
    assert answer["source"] == "repayments" and answer["accepted"] == 1, answer
    deadline = time.monotonic() + 30
    while True:
        got = platform.features.get_online_features(["recent_repayments:missed_installments_7d"], {"applicant_id": [42]}).to_dict()
        if got["missed_installments_7d"][0] >= 1:
            break
        assert time.monotonic() < deadline, "the posted event never reached the online state"
        time.sleep(0.1)
