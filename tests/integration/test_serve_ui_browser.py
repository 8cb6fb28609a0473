"""The web UI in a real headless Chromium (Debian's ``chromium``, driven by Playwright's Python
API), over the session's served platform (``served``: underwriting definitions, models, and
decisions logged by the Serve application). This module sorts after test_serve_ui.py and
before test_serving.py, whose last test shuts the application and its Redis down, so it runs
while the application is up (and posts a decision of its own).

Besides what the application recorded, the fixture records what the operations and lineage
pages show, each through the code that records it in production: a training-set snapshot
(``save_training_set``, which also writes quality reports) and a model trained on its rows,
registered with its card and the snapshot in its lineage; a monitoring report of the served
model's logged decisions against that snapshot (``mlplatform.monitoring.report``); a
consistency report (``ConsistencyReport.write``, figures given here: the real check needs
offline data this platform does not have); a pipeline run (``RunState``). The UI reads the
same storage root through a ``Platform`` whose online store is a redis-server of its own, into
which each underwriting view gets a published generation (the online store's
begin/write/publish), so the catalog's online column is live and is not the application's
store (whose generations the serving modules own).

Checked: log in; every page loads with no console error, no failed request and no error
status; the catalog shows each underwriting view with its generation and freshness and no
"unavailable"; lineage draws service → snapshot → model version → alias, every node a link;
the model card is rendered Markdown with its plots; decision search → replay shows equal
scores, and an approved decision shows its offer as a table; operations lists the pipeline
run, quality, consistency and monitoring reports; logging out locks the pages. A screenshot of
each page is written under ``test-artifacts/ui/`` (ignored by git).

The standalone app (what ``mlp ui`` serves) runs on a uvicorn thread here; ``/ui`` of the
Serve application is tested in test_serve_ui.py.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import threading
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _serving_app import HEADERS, KEY, SAFE, application, feature_names, history, post, push_online, start_redis

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "ui"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CARD_MODEL = "underwriting_card_demo"
SNAPSHOT = "underwriting_ui"
CONSISTENCY = "20260105T101500Z"
BATCH_VIEWS = ("applicant_history", "merchant_activity", "merchant_risk")
APPLICANT = 900_310  # the keys of the UI's own online store


class UiServer:
    def __init__(self, app) -> None:
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def training_rows(platform, n: int = 400) -> pd.DataFrame:
    """Applications with the service's features (counts, rates in [0, 1]), a label and a time."""
    rng = np.random.default_rng(7)
    names = feature_names(platform)
    frame = pd.DataFrame({f: (rng.random(n) if "rate" in f else rng.poisson(1.0, n).astype(float)) for f in names})
    logit = -2.0 + 1.2 * frame["missed_installments_90d"]
    frame["default"] = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    frame["application_ts"] = pd.Timestamp("2025-01-01", tz="UTC") + pd.to_timedelta(rng.integers(0, 90 * 86400, n), unit="s")
    return frame


def register_from_snapshot(platform):
    """A snapshot saved by ``save_training_set``, a model trained on its rows and registered with
    the snapshot in its lineage and a card written by ``write_model_card``."""
    import lightgbm as lgb
    import ray

    from mlplatform.evaluation.card import write_model_card
    from mlplatform.evaluation.metrics import evaluate
    from mlplatform.features.training_sets import save_training_set

    frame = training_rows(platform)
    refs = platform.features.resolve_features("underwriting_v1")
    splits = {"train": (datetime(2025, 1, 1, tzinfo=UTC), datetime(2025, 3, 1, tzinfo=UTC)),
              "test": (datetime(2025, 3, 1, tzinfo=UTC), datetime(2025, 4, 1, tzinfo=UTC))}
    snapshot = save_training_set(platform.features, SNAPSHOT, ray.data.from_pandas(frame), features=refs, label="default",
                                 timestamp_column="application_ts", splits=splits, metadata={"feature_service": "underwriting_v1"})
    names = feature_names(platform)
    train = frame["application_ts"] < pd.Timestamp("2025-03-01", tz="UTC")
    booster = lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 7, "seed": 1, "num_threads": 1},
                        lgb.Dataset(frame.loc[train, names], frame.loc[train, "default"]), num_boost_round=20)
    test = frame[~train]
    lineage = {"training_set": snapshot, "feature_service": "underwriting_v1"}
    evaluation = evaluate(test["default"].to_numpy(), booster.predict(test[names]))
    files = write_model_card({"test": evaluation}, model_name=CARD_MODEL, version=None, lineage=lineage, params={},
                             feature_importance=dict(zip(names, booster.feature_importance().astype(float).tolist())),
                             reason_examples=[])
    mv = platform.models.register(CARD_MODEL, flavor="lightgbm", model=booster, lineage=lineage,
                                  metrics={f"test_{k}": v for k, v in evaluation.metrics().items()}, params={}, files=files)
    platform.models.set_alias(CARD_MODEL, "staging", mv.version)
    return snapshot, frame[train], mv


def record_operations(platform, snapshot, train_rows) -> None:
    """A monitoring report, a consistency report and a pipeline run, as the platform writes them."""
    from mlplatform.features.consistency import ConsistencyReport
    from mlplatform.features.consistency_reports import PREFIX
    from mlplatform.monitoring.report import build_report, write_report
    from mlplatform.pipelines.state import RunState

    loaded = platform.models.load("underwriting", alias="production")
    names = loaded.model.feature_name()
    now = datetime.now(UTC)
    report = build_report(model="underwriting", version=loaded.version.version,
                          reference={n: train_rows[n].to_numpy() for n in names},
                          reference_scores=loaded.model.predict(train_rows[names]), records=platform.serving.decisions(),
                          window=(now - timedelta(days=1), now),
                          reference_name={"name": snapshot.name, "version": snapshot.version, "split": "train", "rows": len(train_rows)})
    write_report(platform.storage, report, plots=2)

    refs = ["applicant_history:missed_installments_90d", "applicant_history:loans_90d", "merchant_risk:default_rate_90d"]
    per_feature = pd.DataFrame([
        {"ref": ref, "feature": ref.split(":")[1], "compared": 50, "exact_matches": m, "missing_online": 50 - m,
         "extra_online": 0, "mean_abs_diff": 0.0 if m == 50 else 0.4, "exact_match_rate": m / 50}
        for ref, m in zip(refs, (50, 50, 47), strict=True)
    ])
    examples = pd.DataFrame([{"ref": refs[2], "feature": "default_rate_90d", "decision_id": "d-example", "served": None,
                              "offline": 0.12, "abs_diff": float("nan")}])
    ConsistencyReport("underwriting_v1", 50, pd.DataFrame(), per_feature, examples).write(platform.storage, f"{PREFIX}/{CONSISTENCY}")

    runs = RunState(platform.storage, "underwriting_daily")
    ds = date(2026, 1, 5)
    runs.start_run(ds)
    for step in ("backfill", "validate", "materialize", "train", "gate"):
        runs.finish_step(ds, step, {"status": "succeeded"})
    runs.finish_run(ds, "succeeded", dict.fromkeys(("backfill", "validate", "materialize", "train", "gate"), "succeeded"))


def ui_platform(platform, redis_url: str):
    """The served platform's storage root, with an online store of its own holding a published
    generation of each batch underwriting view (two keys each, events an hour old)."""
    from mlplatform import Platform

    config = platform.config.model_dump(mode="json", exclude_unset=True)
    config["online_store"] = {"type": "redis", "url": redis_url, "key_prefix": "ui", "timeout": "2s"}
    own = Platform.from_config(config)
    when = datetime.now(UTC) - timedelta(hours=1)
    for name in BATCH_VIEWS:
        view = own.features.get_feature_view(name)
        columns = [f.name for f in view.schema_] + [a.name or f"{a.function}_{a.column}" for a in view.aggregations]
        rows = [{**{k: key for e in view.entities for k in e.join_keys}, "event_timestamp": when, **dict.fromkeys(columns, 0.0)}
                for key in (APPLICANT, APPLICANT + 1)]
        online = own.features.online_store
        generation = online.begin(view)
        online.write(view, generation, rows)
        online.publish(view, generation)
    return own


@pytest.fixture(scope="module")
def ui(served, tmp_path_factory):
    platform = served.platform
    assert not served.closed, "run this module before test_serving.py closes the application (pytest's file order does)"
    started = time.monotonic()
    # SAFE's history, two hours old: test_serving pushes newer rows for SAFE before it reads them
    pushed = push_online(served.deployed, "applicant_history", [history(SAFE, datetime.now(UTC) - timedelta(hours=2), loans_90d=2.0,
                                                                         loans_365d=5.0, late_installments_365d=1.0, avg_loan_amount_365d=180.0)])
    assert pushed.status_code == 200, pushed.text
    ids = []
    for amount in (80.0, 120.0, 160.0):  # approved, with an offer
        answer = post(f"{served.deployed.url}/v1/decisions", application(SAFE, amount=amount), headers=HEADERS)
        assert answer.status_code == 200, answer.text
        ids.append(answer.json()["decision_id"])
    snapshot, train_rows, card = register_from_snapshot(platform)
    time.sleep(0.5)
    record_operations(platform, snapshot, train_rows)
    redis_proc, redis_url = start_redis(tmp_path_factory.mktemp("ui-redis"))
    own = ui_platform(platform, redis_url)
    print(f"ui fixture: {time.monotonic() - started:.1f}s")
    decided = [r for r in platform.serving.decisions() if r["decision_id"] in ids and r["returned"]]
    assert decided, "the served application logged none of this module's decisions"
    offered = [r for r in decided if r.get("offer")]
    assert offered, [r["decision"] for r in decided]  # SAFE at these amounts is approved, with an offer
    from mlplatform.ui import build_app

    server = UiServer(build_app(own, keys=((hashlib.sha256(KEY.encode()).hexdigest(), ("operate",)),)))
    server.card_version = card.version
    server.snapshot = snapshot
    server.decision = offered[-1]
    server.decision_offer_tier = json.loads(offered[-1]["offer"])["tier"]
    yield server
    server.close()
    redis_proc.terminate()
    redis_proc.wait(timeout=10)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: apt-get install -y chromium (see .ci/setup)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


class Watched:
    """A page whose console errors, failed requests and 4xx/5xx responses are collected."""

    def __init__(self, browser) -> None:
        self.context = browser.new_context(viewport={"width": 1400, "height": 900})
        self.page = self.context.new_page()
        self.problems: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.problems.append(f"console: {m.text}"))
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("requestfailed", lambda r: self.problems.append(f"failed: {r.url} {r.failure}"))
        self.page.on("response", lambda r: r.status >= 400 and self.problems.append(f"{r.status}: {r.url}"))

    def visit(self, url: str, shot: str) -> str:
        self.page.goto(url)
        self.page.wait_for_load_state("load")
        self.page.screenshot(path=str(ARTIFACTS / f"{shot}.png"), full_page=True)
        return self.page.inner_text("body")


def test_pages_in_a_browser(ui, browser):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    w = Watched(browser)
    page = w.page
    text = w.visit(f"{ui.url}/catalog", "01-login")
    assert page.url == f"{ui.url}/login" and "API key" in page.content(), text
    page.fill("input[name=key]", KEY)
    with page.expect_navigation():
        page.click("button[type=submit]")
    assert page.url == f"{ui.url}/catalog"
    catalog = w.visit(f"{ui.url}/catalog", "02-catalog")
    for view in ("applicant_history", "merchant_risk", "applicant_checkouts", "checkout_features", "underwriting_v1"):
        assert view in catalog
    assert "unavailable" not in catalog.lower() and "error" not in catalog.lower(), catalog
    for view in BATCH_VIEWS:  # the live online store's generation and its freshness
        online = page.inner_text(f"#view-{view} td.online")
        assert online.startswith("generation ") and " ago, 2 keys" in online, (view, online)
    assert page.inner_text("#view-applicant_history td.quality").startswith("passed")  # the snapshot's validation
    view = w.visit(f"{ui.url}/catalog/views/applicant_history", "03-view")
    assert "Missed payments in the last 90 days" in view and "Versions" in view and "generation " in view

    w.visit(f"{ui.url}/lineage", "04-lineage")
    pairs = page.eval_on_selector_all("svg.lineage a", "els => els.map(e => [e.getAttribute('href'), e.querySelector('text').textContent])")
    hrefs, labels = {h for h, _ in pairs}, {label for _, label in pairs}
    snapshot_href = f"/models/{CARD_MODEL}/{ui.card_version}#training-set"
    assert [snapshot_href, f"snapshot {SNAPSHOT} v{ui.snapshot.version}"] in pairs, pairs
    assert f"/models/{CARD_MODEL}/{ui.card_version}" in hrefs and "/catalog/views/applicant_history" in hrefs
    assert {"checkout decisions", "checkout offers", f"{CARD_MODEL}@staging", "underwriting@production"} <= labels, labels
    assert not [label for label in labels if label.endswith("…")], labels  # every label whole
    # the served model was registered without a snapshot: the graph says so instead of skipping the column
    assert ["/models/underwriting/1", "no snapshot recorded"] in pairs, pairs
    page.click(f"svg.lineage a[href='{snapshot_href}']")
    page.wait_for_url(f"{ui.url}{snapshot_href}")
    assert f"Training-set snapshot {SNAPSHOT} v{ui.snapshot.version}" in page.inner_text("#training-set")
    page.goto(f"{ui.url}/lineage")
    page.click("svg.lineage a[href='/catalog/views/applicant_history']")
    page.wait_for_url(f"{ui.url}/catalog/views/applicant_history")

    models = w.visit(f"{ui.url}/models", "05-models")
    assert "underwriting" in models and CARD_MODEL in models
    model = w.visit(f"{ui.url}/models/underwriting", "06-model")
    assert "production" in model and "Alias history" in model
    card = w.visit(f"{ui.url}/models/{CARD_MODEL}/{ui.card_version}", "07-model-card")
    assert "Model card" in card
    # the card's plots, in the card (and any it does not show in a gallery beside it), loaded
    images = page.eval_on_selector_all("#model-card img, .plots img",
                                       "els => els.map(i => [i.getAttribute('src').split('/').pop(), i.complete, i.naturalWidth])")
    assert {name for name, _, _ in images} >= {"roc.png", "calibration.png", "score_distribution.png", "lift.png"}, images
    assert all(done and width > 0 for _, done, width in images), images
    # the card is rendered Markdown: headings and tables, no Markdown syntax left
    assert page.locator("#model-card h1, #model-card h2").count() >= 2
    assert page.locator("#model-card table").count() >= 1 and page.locator("#model-card table td").count() > 4
    assert "|---" not in page.inner_text("#model-card")

    decision_id = ui.decision["decision_id"]
    w.visit(f"{ui.url}/decisions", "08-decisions")
    page.fill("input[name=q]", ui.decision["application_id"])
    with page.expect_navigation():
        page.click("main button[type=submit]")
    if "?q=" in page.url:  # the application was decided more than once: a list of its decisions
        with page.expect_navigation():
            page.click(f"a[href='/decisions/{decision_id}']")
    assert page.url == f"{ui.url}/decisions/{decision_id}"
    detail = page.inner_text("body")
    assert "Features" in detail and "applicant_history" in detail
    assert "missing" not in page.inner_text("#features tr:nth-child(2)")  # the pushed history was served
    # the offer as a table: the chosen tier marked, its propensity
    assert page.locator("#offer-tiers tr.chosen").count() == 1
    assert page.inner_text("#offer-tiers tr.chosen td:first-child") == ui.decision_offer_tier
    assert "Propensity" in detail and '"probabilities"' not in detail
    with page.expect_navigation():
        page.click("#replay")
    page.screenshot(path=str(ARTIFACTS / "09-decision-replayed.png"), full_page=True)
    logged, replayed = page.inner_text("td.logged"), page.inner_text("td.replayed")
    assert logged == replayed and logged != "-", (logged, replayed)
    assert page.inner_text("#replay-result td.ok >> nth=0") == "yes"
    offer = page.inner_text("#replay-offer")  # the offer recomputed to the same tier
    assert offer.count(ui.decision_offer_tier) == 2 and offer.rstrip().endswith("yes"), offer

    operations = w.visit(f"{ui.url}/operations", "10-operations")
    assert "underwriting_daily" in operations and "2026-01-05" in operations and "train: succeeded" in operations
    assert "training_set" in operations  # the snapshot's quality reports
    assert "shift" in operations or "PSI" in operations
    assert f"against training set {SNAPSHOT} v{ui.snapshot.version}" in operations
    with page.expect_navigation():
        page.click(f"a[href='/operations/consistency/{CONSISTENCY}']")
    page.screenshot(path=str(ARTIFACTS / "11-consistency.png"), full_page=True)
    report = page.inner_text("main")
    assert "Training/serving consistency: underwriting_v1" in report and "1 flagged" in report and "94.00%" in report
    assert page.locator("main .markdown table").count() == 2
    assert page.eval_on_selector("img[alt='match_rate.png']", "i => i.complete && i.naturalWidth > 0")
    monitoring = w.visit(f"{ui.url}/operations/monitoring/underwriting", "12-monitoring")
    assert "Monitoring: underwriting" in monitoring and page.locator("#monitoring-report table").count() >= 1
    plots = page.eval_on_selector_all("#monitoring-report img", "els => els.map(i => i.complete && i.naturalWidth > 0)")
    assert plots and all(plots), plots
    assert not w.problems, w.problems

    with page.expect_navigation():
        page.click("header button[type=submit]")  # log out
    assert page.url == f"{ui.url}/login"
    for path in ("/catalog", "/models/underwriting", f"/decisions/{decision_id}", "/operations", f"/operations/consistency/{CONSISTENCY}"):
        page.goto(f"{ui.url}{path}")
        assert page.url == f"{ui.url}/login", path
    w.context.close()
