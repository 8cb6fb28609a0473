"""The web UI at /ui of the Serve application (the session's ``served``; this module sorts
before test_serving.py, which shuts the application down): the UI's session replaces the
X-API-Key there, its links carry the /ui prefix, and the API stays behind its keys."""

from __future__ import annotations

import requests
from _serving_app import KEY, application


def test_the_ui_is_mounted_at_ui(served):
    url = served.deployed.url
    r = requests.get(f"{url}/ui/catalog", headers={"Accept": "text/html"}, allow_redirects=False, timeout=60)
    assert r.status_code == 303 and r.headers["location"] == "/ui/login"  # a browser is sent to the login page
    assert requests.get(f"{url}/ui/catalog", timeout=30).status_code == 401  # any other client
    assert requests.post(f"{url}/ui/login", data={"key": "wrong-key-" + "w" * 20}, allow_redirects=False, timeout=30).status_code == 401
    s = requests.Session()
    r = s.post(f"{url}/ui/login", data={"key": KEY}, allow_redirects=False, timeout=30)
    assert r.status_code == 303 and r.headers["location"] == "/ui/catalog" and "Path=/ui" in r.headers["set-cookie"]
    page = s.get(f"{url}/ui/catalog", timeout=30).text
    assert "applicant_history" in page and 'href="/ui/lineage"' in page and 'href="/ui/catalog/views/applicant_history"' in page
    assert s.get(f"{url}/ui/models/underwriting", timeout=30).status_code == 200
    # The session cookie is not an API key: the API still asks for X-API-Key.
    assert s.post(f"{url}/v1/decisions", json=application(), timeout=30).status_code == 401
