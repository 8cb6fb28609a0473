"""A real Prometheus scrapes the running serving application through Ray's metrics export,
with the shipped configs/prometheus files: the served-value metrics arrive, and with the feature
feed stopped the freshness of the view rises past the FeatureStale threshold and the alert fires
(the shipped rule with a 25 s threshold instead of an hour); the PSI of the latest monitoring
report reaches Prometheus as ``ray_mlp_psi`` and fires ScoreDrift.

Runs on the session's serving application (``served``), before test_serving.py closes it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests
import yaml
from _serving_app import application, free_port, history, post, push_online

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "prometheus"
STALE_AFTER_S = 25
APPLICANT = 900_777
VIEW = "applicant_history"


@pytest.fixture
def prometheus(tmp_path, ray_session):
    """Prometheus on a loopback port with the shipped prometheus.yml and alerts.yml, its targets
    the Ray nodes' metrics export ports (the file service discovery Ray's dashboard head keeps)."""
    exe = shutil.which("prometheus")
    if exe is None:
        pytest.fail("prometheus is not installed: apt-get install prometheus (.ci/setup does)")
    targets = [f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in ray_session.nodes() if n["Alive"]]
    discovery = tmp_path / "prom_metrics_service_discovery.json"
    discovery.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": targets}]))

    rules = yaml.safe_load((CONFIGS / "alerts.yml").read_text())
    stale = next(r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "FeatureStale")
    assert "> 3600" in stale["expr"]
    stale["expr"] = stale["expr"].replace("> 3600", f"> {STALE_AFTER_S}")
    stale["for"] = "0s"
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))

    config = yaml.safe_load((CONFIGS / "prometheus.yml").read_text())
    # Scrapes every 5 s with 5 s to answer: late in the suite the session Ray exports the series
    # of every task, actor and deployment so far, and one scrape of its agent took 1.5 s after
    # eight test files (Prometheus's lastScrapeDuration), more than the 1 s a 1 s interval
    # allows: every scrape failed (up == 0) and nothing arrived.
    config["global"].update(scrape_interval="5s", scrape_timeout="5s", evaluation_interval="1s")
    (job,) = config["scrape_configs"]
    job["file_sd_configs"][0]["files"] = [str(discovery)]
    config["rule_files"] = [str(tmp_path / "alerts.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))

    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [exe, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()[-2000:]
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def query(url: str, promql: str) -> dict[str, float]:
    """An instant query through the HTTP API: ``{"label=value,…": value}``."""
    doc = requests.get(f"{url}/api/v1/query", params={"query": promql}, timeout=5).json()
    assert doc["status"] == "success", doc
    return {",".join(f"{k}={v}" for k, v in sorted(r["metric"].items())): float(r["value"][1]) for r in doc["data"]["result"]}


def firing(url: str, alert: str, **labels: str) -> bool:
    doc = requests.get(f"{url}/api/v1/alerts", timeout=5).json()
    return any(
        a["labels"]["alertname"] == alert and a["state"] == "firing" and all(a["labels"].get(k) == v for k, v in labels.items())
        for a in doc["data"]["alerts"]
    )


def wait_for(what: str, check, timeout: float, explain=lambda: ""):
    """``check()`` once a second until it is truthy; on timeout, fail with ``explain()``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}. {explain()}")
        time.sleep(1.0)


def exported(url: str) -> str:
    """What Prometheus holds of the application's series, for a failure message."""
    try:
        up = query(url, 'up{job="ray"}')
        series = query(url, 'count by (__name__) ({__name__=~"ray_mlp_.*"})')
        targets = requests.get(f"{url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        scrapes = [(t["scrapeUrl"], t["health"], t["lastError"], t["lastScrapeDuration"]) for t in targets]
        return f"up: {up}; ray_mlp_* series: {series}; scrapes (url, health, error, seconds): {scrapes}"
    except Exception as e:  # noqa: BLE001 - a diagnostic must not hide the failure it explains
        return f"(Prometheus query failed: {e})"


def test_prometheus_sees_freshness_rise_past_the_alert_when_the_feed_stops(served, prometheus):
    platform, deployed, _ = served
    version = platform.models.get("underwriting", alias="production").version
    # The latest monitoring report's figures, as platform.monitoring.report writes them.
    latest = {"version": version, "psi": {"score": 0.4, "loans_30d": 0.01}, "report": "monitoring/underwriting/reports/x",
              "created_at": datetime.now(UTC).isoformat()}
    platform.storage.write_json("monitoring/underwriting/latest.json", latest)

    feeding = threading.Event()
    feeding.set()
    stop = threading.Event()
    errors: list[str] = []
    sent = {"pushes": 0, "decisions": 0}

    def traffic() -> None:
        """The stream (a push of the applicant's fresh history) while ``feeding``, and checkouts throughout."""
        with requests.Session() as session:
            while not stop.is_set():
                if feeding.is_set():
                    pushed = push_online(deployed, VIEW, [history(APPLICANT, datetime.now(UTC) - timedelta(seconds=1), loans_30d=1.0)])
                    sent["pushes"] += 1
                    if pushed.status_code != 200:
                        errors.append(pushed.text)
                answer = post(f"{deployed.url}/v1/decisions", application(APPLICANT), session=session)
                sent["decisions"] += 1
                if answer.status_code != 200 or answer.json()["fallback"]:
                    errors.append(answer.text)
                stop.wait(0.5)

    thread = threading.Thread(target=traffic, daemon=True)
    thread.start()
    try:
        def explain() -> str:
            return f"Sent {sent}, {len(errors)} failed (first: {errors[:2]}); {exported(prometheus)}"

        up = 'min(up{job="ray"}) == 1'  # every node's metrics export answers
        wait_for("the ray targets to be up", lambda: query(prometheus, up), 60, explain)
        age_query = f'mlp:feature_age_seconds{{model="underwriting",view="{VIEW}"}}'
        # Fresh while fed: the newest value served is seconds old (exported every 2 s in tests).
        fresh = wait_for("the view's freshness", lambda: query(prometheus, age_query), 90, explain)
        print("exported while fed:", exported(prometheus))  # shown when the test fails, or with -s
        (age,) = fresh.values()
        assert 0 <= age < STALE_AFTER_S, fresh
        assert not firing(prometheus, "FeatureStale", view=VIEW)
        served_values = query(prometheus, 'sum by (feature) (ray_mlp_feature_values_total{model="underwriting"})')
        assert served_values.get("feature=loans_30d", 0) > 0, served_values
        scores = query(prometheus, 'sum by (model, version) (ray_mlp_score_count)')
        assert scores.get(f"model=underwriting,version={version}", 0) > 0, scores
        fraud = platform.models.get("fraud", alias="production").version
        assert scores.get(f"model=fraud,version={fraud}", 0) > 0, scores  # the rule model's scores too

        feeding.clear()  # the stream stops; checkouts go on, served the last value
        stopped = time.monotonic()
        wait_for("FeatureStale to fire", lambda: firing(prometheus, "FeatureStale", model="underwriting", view=VIEW), 60, explain)
        # The alert's own expression, evaluated now (at or after the alert's evaluation). The
        # recorded mlp:feature_age_seconds lives in another rule group, evaluated up to an
        # interval earlier: a fresh clone's run read 24.85 s from it just after the alert fired.
        (age,) = query(prometheus, f'time() - max by (model, view) (ray_mlp_feature_newest_event_timestamp_seconds'
                                   f'{{model="underwriting",view="{VIEW}"}})').values()
        assert age > STALE_AFTER_S
        wait_for("the recorded age past the threshold", lambda: next(iter(query(prometheus, age_query).values()), 0) > STALE_AFTER_S, 10, explain)
        assert time.monotonic() - stopped >= STALE_AFTER_S - 12  # it rose: it did not start stale

        # The report's PSI, read by the replicas every 30 s and exported as gauges.
        psi = wait_for("mlp_psi", lambda: query(prometheus, f'max by (feature) (ray_mlp_psi{{model="underwriting",version="{version}"}})'), 60, explain)
        assert psi == {"feature=score": 0.4, "feature=loans_30d": 0.01}
        wait_for("ScoreDrift to fire", lambda: firing(prometheus, "ScoreDrift", model="underwriting", version=str(version)), 20, explain)
        assert not firing(prometheus, "FeatureDrift")
    finally:
        stop.set()
        thread.join(timeout=30)
        platform.storage.delete("monitoring", recursive=True)
    assert not errors, errors[:3]
