"""The shipped Prometheus files pass Prometheus's own checks: ``promtool check config``,
``promtool check rules`` and ``promtool test rules`` on the unit tests of every alert
(configs/prometheus/tests/alerts_test.yml); the Grafana dashboard is valid dashboard JSON whose
queries name only metrics and recorded series that exist."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "configs" / "prometheus"
DASHBOARD = ROOT / "configs" / "grafana" / "mlplatform-serving.json"


def _promtool(*args: str) -> str:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.fail("promtool is not installed: apt-get install prometheus (.ci/setup does)")
    done = subprocess.run([exe, *args], capture_output=True, text=True, timeout=60, cwd=PROM)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def _alerts() -> list[dict]:
    groups = yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
    return [r for g in groups for r in g["rules"] if "alert" in r]


def test_the_config_and_the_rules_pass_promtool_check():
    assert "SUCCESS" in _promtool("check", "config", "prometheus.yml")
    assert "SUCCESS: 12 rules found" in _promtool("check", "rules", "alerts.yml")


def test_every_alert_has_a_firing_unit_test_and_promtool_test_rules_passes():
    names = {r["alert"] for r in _alerts()}
    assert names == {
        "FeatureStale", "DecisionFallbackRateHigh", "DecisionErrorRateHigh", "DecisionLatencyHigh",
        "FeatureMissingRateHigh", "ScoreDrift", "FeatureDrift",
    }
    tests = yaml.safe_load((PROM / "tests" / "alerts_test.yml").read_text())["tests"]
    firing = {t["alertname"] for case in tests for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
    assert firing == names
    assert "SUCCESS" in _promtool("test", "rules", "tests/alerts_test.yml")


def test_every_alert_says_what_it_means():
    for rule in _alerts():
        assert rule["labels"]["severity"] in ("page", "ticket"), rule["alert"]
        assert rule["annotations"]["summary"] and len(rule["annotations"]["description"]) > 80, rule["alert"]


def test_the_dashboard_queries_only_series_the_platform_exports():
    board = json.loads(DASHBOARD.read_text())
    assert board["title"] and board["uid"] and board["schemaVersion"] >= 36
    exported = set(re.findall(r"``(mlp_[a-z_]+)``", (ROOT / "mlplatform" / "serving" / "metrics.py").read_text()))
    recorded = {r["record"] for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"] for r in g["rules"] if "record" in r}
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 8
    for expr in exprs:
        for name in re.findall(r"\b(ray_mlp_[a-z_]+|mlp:[a-z0-9_:]+|ray_serve_[a-z_]+)", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name.removeprefix("ray_")) if name.startswith("ray_mlp_") else name
            assert base in exported or name in recorded or name.startswith("ray_serve_num_http_requests"), (name, expr)
