"""The web UI over a real storage root, served by a real uvicorn and read with ``requests``:
sessions (signed, HttpOnly, SameSite=Strict, tamper-proof, ended by logout and by removing the
key), every page's content (the underwriting catalog, a model's versions and card plots, a
decision found by either id and replayed to the same score), 404s for unknown things, no
filesystem path outside the storage root on any page, and links under a path prefix."""

from __future__ import annotations

import hashlib
import io
import json
import re
import socket
import threading
import time
from datetime import UTC, datetime

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest
import requests

from mlplatform import Platform
from mlplatform.serving.decisions.log import DecisionLog
from mlplatform.serving.decisions.replay import score_features
from mlplatform.ui import build_app
from mlplatform.ui.app import shown
from mlplatform.ui.session import COOKIE, Sessions
from workloads.underwriting.features import DEFINITIONS

KEY = "ui-test-key-" + "k" * 20
READER = "ui-reader-key-" + "r" * 20
CHECKOUT = "ui-checkout-key-" + "c" * 20
KEYS = (
    (hashlib.sha256(KEY.encode()).hexdigest(), ("operate",)),
    (hashlib.sha256(READER.encode()).hexdigest(), ("read_ui",)),
    (hashlib.sha256(CHECKOUT.encode()).hexdigest(), ("decide",)),
)
HTML = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
FEATURES = ["loans_90d", "missed_installments_90d", "outstanding_balance"]
CARD = b"# Model card\n\n| split | AUC |\n|---|---:|\n| test | 0.8 |\n\n<script>alert(1)</script> <b>bold</b>\n\n![roc](roc.png)\n"
#: d-2's offer as the serving engine logs it (mlplatform.rl.selection records), tiers named by index.
OFFER = {"tier": "line_1000", "action": 1, "propensity": 0.9, "allowed": ["line_500", "line_1000"], "probabilities": [0.1, 0.9, 0.0],
         "policy": "logging_epsilon_greedy", "policy_version": None, "context": {"amount": 120.0, "term": 4.0},
         "probability_of_default": 0.04, "policy_model": None, "shadow": {"alias": "shadow", "shadow": True, "tier": "line_500", "action": 0,
                                                                          "propensity": 1.0, "policy": "greedy", "policy_version": 2}}


def _png() -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1], [0, 1])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def populate(platform: Platform, spool) -> dict:
    """The underwriting definitions, model 'underwriting' v1..v3 (v3 with a card and plots, in
    production) and two logged decisions scored by v3 (one application decided twice)."""
    platform.features.apply(DEFINITIONS)
    rng = np.random.default_rng(0)
    x = pd.DataFrame(rng.poisson(1.0, (500, len(FEATURES))).astype(float), columns=FEATURES)
    y = (rng.random(500) < 1 / (1 + np.exp(2 - x["missed_installments_90d"]))).astype(int)
    for seed in (1, 2, 3):
        booster = lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 4, "seed": seed, "num_threads": 1},
                            lgb.Dataset(x, y), num_boost_round=5 + seed)
        files = {"model_card.md": CARD, "roc.png": _png()} if seed == 3 else None
        mv = platform.models.register("underwriting", flavor="lightgbm", model=booster, files=files,
                                      lineage={"feature_service": "underwriting_v1", "code_version": "test",
                                               "training_set": {"name": "underwriting_ts", "version": seed}},
                                      metrics={"test_auc": 0.7 + seed / 100}, params={"seed": seed})
    platform.models.set_alias("underwriting", "production", mv.version)
    from datetime import date

    from mlplatform.pipelines.state import RunState

    runs = RunState(platform.storage, "underwriting_daily")
    runs.start_run(date(2025, 1, 2))
    runs.finish_run(date(2025, 1, 2), "failed", {"backfill": "succeeded", "train": "failed"})
    row = {"loans_90d": 2.0, "missed_installments_90d": 1.0, "outstanding_balance": 0.0}
    with DecisionLog(platform.storage, spool_dir=spool, replica_id="r1") as log:
        for decision_id in ("d-1", "d-2"):
            log.append_sync({
                "decision_id": decision_id, "application_id": "app-7", "request": json.dumps({"amount": 120.0}),
                "decision": "approve", "probability_of_default": score_features(booster, row),
                "reasons": json.dumps([{"code": "R1", "text": "Missed payments in the last 90 days"}]),
                "model_name": "underwriting", "model_version": mv.version, "model_sha256": mv.artifacts[mv.model_file],
                "feature_names": json.dumps(FEATURES), "features": json.dumps(row),
                "feature_event_timestamps": json.dumps({"applicant_history": "2025-01-30T00:00:00+00:00"}),
                "fallback": False, "fallback_reason": None, "latency_ms": 3.0, "created_at": datetime.now(UTC).isoformat(),
                "shadow": None, "returned": True, "confirmed": True,
                **({"offer": json.dumps(OFFER)} if decision_id == "d-2" else {}),
            })
        log.compact()
    from mlplatform.features.consistency import ConsistencyReport

    per_feature = pd.DataFrame([{"ref": "applicant_history:loans_90d", "feature": "loans_90d", "compared": 2, "exact_matches": 1,
                                 "missing_online": 0, "extra_online": 0, "mean_abs_diff": 1.0, "exact_match_rate": 0.5}])
    examples = pd.DataFrame([{"ref": "applicant_history:loans_90d", "decision_id": "d-1", "served": 2.0, "offline": 1.0, "abs_diff": 1.0}])
    ConsistencyReport("underwriting_v1", 2, pd.DataFrame(), per_feature, examples).write(platform.storage, "reports/consistency/20250103T000000Z")
    from mlplatform.monitoring.report import build_report, write_report

    now = datetime.now(UTC)
    records = [{"model_name": "underwriting", "model_version": mv.version, "fallback": False, "returned": True, "created_at": now.isoformat(),
                "probability_of_default": 0.2, "features": json.dumps({**row, "loans_90d": float(i % 5)})} for i in range(40)]
    write_report(platform.storage, build_report(model="underwriting", version=mv.version, reference={f: x[f].to_numpy() for f in FEATURES},
                                                reference_scores=booster.predict(x), records=records, window=(now - pd.Timedelta("1h"), now),
                                                reference_name={"name": "underwriting_ts", "version": 3, "split": "train", "rows": len(x)}), plots=1)
    return {"version": mv.version}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """A uvicorn server on a thread (stopped at teardown)."""

    def __init__(self, app, root_path: str = "") -> None:
        import uvicorn

        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, root_path=root_path, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui")
    platform = Platform.from_config({"storage": {"root": str(root / "root")}})
    info = populate(platform, root / "spool")
    served = Served(build_app(platform, keys=KEYS))
    served.root = str(root / "root")
    served.info = info
    yield served
    served.close()


def login(url: str, key: str = KEY) -> requests.Session:
    s = requests.Session()
    r = s.post(f"{url}/login", data={"key": key}, allow_redirects=False)
    assert r.status_code == 303, r.text
    return s


PAGES = ["/catalog", "/catalog/views/applicant_history", "/lineage", "/models", "/models/underwriting",
         "/models/underwriting/3", "/decisions", "/decisions?q=d-2", "/decisions/d-1", "/operations",
         "/operations/consistency/20250103T000000Z"]


def test_every_page_needs_a_session_and_the_cookie_is_locked_down(ui):
    for path in PAGES:
        r = requests.get(ui.url + path, headers=HTML, allow_redirects=False)  # a browser is sent to the login page
        assert r.status_code == 303 and r.headers["location"] == "/login", path
        assert requests.get(ui.url + path, allow_redirects=False).status_code == 401  # any other client: 401
    assert requests.get(ui.url + "/models/underwriting/3/files/roc.png", headers={"Accept": "image/png"}).status_code == 401
    assert requests.post(ui.url + "/decisions/d-1", allow_redirects=False).status_code == 401
    assert requests.get(ui.url + "/login").status_code == 200

    r = requests.post(ui.url + "/login", data={"key": KEY}, allow_redirects=False)
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie and "Secure" not in cookie
    assert KEY not in cookie and hashlib.sha256(KEY.encode()).hexdigest() not in cookie
    # Over TLS (a proxy says so) the cookie is Secure.
    r = requests.post(ui.url + "/login", data={"key": KEY}, headers={"X-Forwarded-Proto": "https"}, allow_redirects=False)
    assert "Secure" in r.headers["set-cookie"]


@pytest.mark.parametrize("key", ["", "nope", CHECKOUT, KEY + "x"])
def test_a_wrong_key_or_one_without_a_ui_role_is_refused(ui, key):
    r = requests.post(ui.url + "/login", data={"key": key}, allow_redirects=False)
    assert r.status_code == 401 and COOKIE not in r.headers.get("set-cookie", "")
    assert "not valid" in r.text


def test_a_forged_or_expired_cookie_is_refused_and_logout_ends_the_session():
    sessions = Sessions(KEYS, lifetime=60)
    cookie = sessions.login(READER, now=1000)
    assert sessions.verify(cookie, now=1030).roles == ("read_ui",)
    assert sessions.verify(cookie, now=1061) is None  # expired
    key_id, expires, sig = cookie.split(".")
    assert sessions.verify(f"{key_id}.{int(expires) + 3600}.{sig}", now=1030) is None  # extended by hand
    assert sessions.verify(f"{key_id}.{expires}.{'0' * 64}", now=1030) is None
    assert sessions.verify("garbage", now=1030) is None and sessions.verify(None) is None
    # Removing the key ends its sessions.
    assert Sessions(KEYS[:1]).verify(cookie, now=1030) is None
    assert Sessions(KEYS).login(CHECKOUT) is None


def test_logout_locks_the_pages(ui):
    s = login(ui.url, READER)
    assert s.get(ui.url + "/catalog").status_code == 200
    r = s.post(ui.url + "/logout", allow_redirects=False)
    assert r.status_code == 303 and f'{COOKIE}=""' in r.headers["set-cookie"]
    r = s.get(ui.url + "/catalog", headers=HTML, allow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"


def test_pages_show_what_the_platform_recorded(ui):
    s = login(ui.url)
    for path in PAGES:
        r = s.get(ui.url + path)
        assert r.status_code == 200, (path, r.text[:500])
        assert "text/html" in r.headers["content-type"] and "default-src 'none'" in r.headers["content-security-policy"]
        # No path outside the storage root, and no secret.
        assert KEY not in r.text and "/tmp/" not in r.text.replace(ui.root, "") and "site-packages" not in r.text

    catalog = s.get(ui.url + "/catalog").text
    for view in ("applicant_history", "merchant_risk", "applicant_checkouts", "underwriting_v1", "credit-risk"):
        assert view in catalog
    view = s.get(ui.url + "/catalog/views/applicant_history").text
    assert "Missed payments in the last 90 days" in view and "missed_installments_90d" in view  # reason text
    model = s.get(ui.url + "/models/underwriting").text
    assert "production → " in model and "test_auc" in model and "<polyline" in model
    version = s.get(ui.url + "/models/underwriting/3").text
    assert "Model card" in version and 'src="/models/underwriting/3/files/roc.png"' in version
    png = s.get(ui.url + "/models/underwriting/3/files/roc.png")
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    lineage = s.get(ui.url + "/lineage").text
    for href in ('href="/catalog/views/applicant_history"', 'href="/models/underwriting/3"', "#service-underwriting_v1"):
        assert href in lineage
    assert "checkout decisions" in lineage
    operations = s.get(ui.url + "/operations").text
    assert "underwriting_daily" in operations and "2025-01-02" in operations and "train: failed" in operations


def test_decision_search_by_either_id_and_replay(ui):
    s = login(ui.url)
    r = s.get(ui.url + "/decisions", params={"q": "d-2"}, allow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/decisions/d-2"
    found = s.get(ui.url + "/decisions", params={"q": "app-7"}).text
    assert "2 decision(s)" in found and "/decisions/d-1" in found and "/decisions/d-2" in found
    assert "no logged decision" in s.get(ui.url + "/decisions", params={"q": "<script>x</script>"}).text
    assert "<script>x" not in s.get(ui.url + "/decisions", params={"q": "<script>x</script>"}).text
    page = s.get(ui.url + "/decisions/d-1").text
    assert "missed_installments_90d" in page and "2025-01-30" in page and "Missed payments in the last 90 days" in page
    replayed = s.post(ui.url + "/decisions/d-1").text
    logged = re.search(r'class="logged">([^<]+)<', replayed).group(1)
    again = re.search(r'class="replayed">([^<]+)<', replayed).group(1)
    assert logged == again and 'class="ok">yes' in replayed


def test_card_offer_and_consistency_report_are_rendered(ui):
    s = login(ui.url)
    version = s.get(ui.url + "/models/underwriting/3").text
    card = version[version.index('id="model-card"'):]
    assert "<h1>Model card</h1>" in card and "<table>" in card and '<td style="text-align:right">0.8</td>' in card
    # raw HTML in a card is text, never markup; a relative image is served from the version's files
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in card and "<script>" not in version and "<b>bold" not in card
    assert '<img src="/models/underwriting/3/files/roc.png" alt="roc"' in card
    # the offer as a table: one row per tier, the chosen one marked, the shadow's choice beside it
    decision = s.get(ui.url + "/decisions/d-2").text
    tiers = decision[decision.index('id="offer-tiers"'):]
    assert '<tr class="chosen"><td>tier 1</td>' in tiers and "acting" in tiers and "shadow" in tiers
    assert "Propensity" in decision and "logging_epsilon_greedy" in decision and "line_1000" in decision and '"tier"' not in decision
    # consistency reports: listed on the operations page with their figures, each with a page
    operations = s.get(ui.url + "/operations").text
    assert 'href="/operations/consistency/20250103T000000Z"' in operations and "50.00%" in operations
    report = s.get(ui.url + "/operations/consistency/20250103T000000Z").text
    assert "<h1>Training/serving consistency: underwriting_v1</h1>" in report and "<table>" in report and "1 flagged" in report
    png = s.get(ui.url + "/operations/consistency/20250103T000000Z/match_rate.png")
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
    # the latest monitoring report: figures on the operations page, its Markdown and plots on a page of its own
    assert 'href="/operations/monitoring/underwriting"' in operations and "against training set <strong>underwriting_ts</strong> v3" in operations
    monitoring = s.get(ui.url + "/operations/monitoring/underwriting").text
    images = re.findall(r'<img src="(/operations/monitoring/underwriting/files/[^"]+)"', monitoring)
    assert images and "<table>" in monitoring
    for src in images:
        plot = s.get(ui.url + src)
        assert plot.status_code == 200 and plot.content[:4] == b"\x89PNG"


@pytest.mark.parametrize("path", ["/decisions/nope", "/operations/consistency/nope", "/operations/consistency/%2E%2E",
                                  "/operations/consistency/nope/match_rate.png", "/operations/monitoring/nope",
                                  "/operations/monitoring/underwriting/files/report.json", "/operations/monitoring/underwriting/files/..%2Fx.png", "/models/nope", "/models/underwriting/99", "/catalog/views/nope",
                                  "/models/underwriting/3/files/model.txt", "/models/underwriting/3/files/..%2F..%2Fx.png"])
def test_unknown_things_are_404_pages(ui, path):
    s = login(ui.url)
    r = s.get(ui.url + path)
    assert r.status_code == 404, (path, r.status_code)


def test_links_follow_the_path_prefix(ui, tmp_path):
    platform = Platform.from_config({"storage": {"root": ui.root}})
    served = Served(build_app(platform, keys=KEYS), root_path="/mlp/ui")
    try:
        s = requests.Session()
        r = s.post(served.url + "/login", data={"key": KEY}, allow_redirects=False)
        assert r.headers["location"] == "/mlp/ui/catalog" and "Path=/mlp/ui" in r.headers["set-cookie"]
        page = s.get(served.url + "/models/underwriting/3", cookies={COOKIE: r.cookies[COOKIE]}).text
        assert 'href="/mlp/ui/catalog"' in page and 'src="/mlp/ui/models/underwriting/3/files/roc.png"' in page
    finally:
        served.close()


def test_shown_hides_paths_outside_the_root():
    assert shown("no spool at '/var/lib/mlp/spool' here", "/data/root") == "no spool at '<path>' here"
    assert shown("dataset /data/root/features/x missing", "/data/root") == "dataset <root>/features/x missing"
    assert shown("a 1/2 ratio", "/data/root") == "a 1/2 ratio"
