"""The web UI in a real headless Chromium (Debian's ``chromium``, driven by Playwright's Python
API), over the session's served platform (``served``: underwriting definitions, models, and
decisions logged by the Serve application): log in, every page loads with no console error,
no failed request and no error status; the catalog shows the underwriting views; a model
card's plots render; decision search → replay shows equal scores; logging out locks the pages.
A screenshot of each page is written under ``test-artifacts/ui/`` (ignored by git).

The standalone app (what ``mlp ui`` serves) runs on a uvicorn thread here; ``/ui`` of the
Serve application is tested in test_serve_ui.py, which runs while the application is up.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from _serving_app import HEADERS, KEY, application, post

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "ui"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CARD_MODEL = "underwriting_card_demo"


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


def register_with_card(platform) -> int:
    """A version whose model card (plots included) is written by ``write_model_card``."""
    from mlplatform.evaluation.card import write_model_card
    from mlplatform.evaluation.metrics import evaluate

    rng = np.random.default_rng(3)
    y = rng.random(2000) < 0.2
    score = np.clip(0.2 + 0.3 * (y - 0.2) + rng.normal(0, 0.15, 2000), 0.001, 0.999)
    lineage = {"feature_service": "underwriting_v1", "code_version": "test"}
    files = write_model_card({"test": evaluate(y, score)}, model_name=CARD_MODEL, version=1, lineage=lineage, params={},
                             feature_importance={"loans_90d": 1.0}, reason_examples=[])
    booster = platform.models.load("underwriting", alias="production").model
    mv = platform.models.register(CARD_MODEL, flavor="lightgbm", model=booster, lineage=lineage,
                                  metrics={"test_auc": 0.74}, params={}, files=files)
    return mv.version


@pytest.fixture(scope="module")
def ui(served):
    platform = served.platform
    if not served.closed:  # run on its own: make sure at least one decision is logged
        assert post(f"{served.deployed.url}/v1/decisions", application(), headers=HEADERS).status_code == 200
        time.sleep(0.5)
    version = register_with_card(platform)
    decided = [r for r in platform.serving.decisions() if r["model_name"] == "underwriting" and not r["fallback"] and r["returned"]]
    assert decided, "the served application logged no scored decision"
    from mlplatform.ui import build_app

    server = UiServer(build_app(platform, keys=((hashlib.sha256(KEY.encode()).hexdigest(), ("operate",)),)))
    server.card_version = version
    server.decision = decided[-1]
    yield server
    server.close()


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
    view = w.visit(f"{ui.url}/catalog/views/applicant_history", "03-view")
    assert "Missed payments in the last 90 days" in view and "Versions" in view

    w.visit(f"{ui.url}/lineage", "04-lineage")
    nodes = page.eval_on_selector_all("svg.lineage a", "els => els.map(e => e.getAttribute('href'))")
    assert f"/models/{CARD_MODEL}/{ui.card_version}" in nodes and "/catalog/views/applicant_history" in nodes
    page.click("svg.lineage a[href='/catalog/views/applicant_history']")
    page.wait_for_url(f"{ui.url}/catalog/views/applicant_history")

    models = w.visit(f"{ui.url}/models", "05-models")
    assert "underwriting" in models and CARD_MODEL in models
    model = w.visit(f"{ui.url}/models/underwriting", "06-model")
    assert "production" in model and "Alias history" in model
    card = w.visit(f"{ui.url}/models/{CARD_MODEL}/{ui.card_version}", "07-model-card")
    assert "Model card" in card
    images = page.eval_on_selector_all(".plots img", "els => els.map(i => [i.getAttribute('alt'), i.complete, i.naturalWidth])")
    assert {alt for alt, _, _ in images} >= {"roc.png", "calibration.png", "score_distribution.png", "lift.png"}
    assert all(done and width > 0 for _, done, width in images), images

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
    with page.expect_navigation():
        page.click("#replay")
    page.screenshot(path=str(ARTIFACTS / "09-decision-replayed.png"), full_page=True)
    logged, replayed = page.inner_text("td.logged"), page.inner_text("td.replayed")
    assert logged == replayed and logged != "-", (logged, replayed)
    assert page.inner_text("#replay-result td.ok") == "yes"

    w.visit(f"{ui.url}/operations", "10-operations")
    assert "Pipeline runs" in page.inner_text("body")
    assert not w.problems, w.problems

    with page.expect_navigation():
        page.click("header button[type=submit]")  # log out
    assert page.url == f"{ui.url}/login"
    for path in ("/catalog", "/models/underwriting", f"/decisions/{decision_id}", "/operations"):
        page.goto(f"{ui.url}{path}")
        assert page.url == f"{ui.url}/login", path
    w.context.close()
