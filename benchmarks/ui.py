"""Web UI page times: every page of the standalone UI (what ``mlp ui`` serves) over a registry
of 1,000 features and 100 model versions, read by a real HTTP client.

    python benchmarks/ui.py                          # 20 views x 50 features, 100 versions, 30 requests a page
    python benchmarks/ui.py --views 40 --requests 50

The registry is generated under a temporary root: ``--views`` feature views of 50 windowed
aggregations each (1,000 features by default) over one source, a feature service naming all
of them, ``--versions`` LightGBM versions of one model (each with metrics, lineage and, for the
last one, a model card (Markdown with a dozen tables, rendered on the page) and a PNG),
aliases moved a few times, ``--decisions`` logged decisions (compacted into the decision log;
20 share one application id) and 20 consistency reports of 50 features each (the operations
page lists them, reading each one's figures). Pages are served by
uvicorn on a thread of this process and requested one at a time with ``requests`` (keep-alive)
after one warm-up request each; the p50 / p95 / max milliseconds per page are printed. The
decision search by application id reads the whole decision log (an audit, not a hot path).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform as host
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KEY = "benchmark-ui-key-" + "b" * 20


def build(root: Path, views: int, versions: int, decisions: int) -> None:
    import lightgbm as lgb
    import numpy as np
    import pandas as pd

    from mlplatform import Platform
    from mlplatform.features.definitions import Aggregation, Entity, FeatureService, FeatureView, ParquetSource
    from mlplatform.serving.decisions.log import DecisionLog

    platform = Platform.from_config({"storage": {"root": str(root / "root")}})
    applicant = Entity(name="applicant", join_keys=("applicant_id",), description="A customer.")
    source = ParquetSource(name="events", dataset="raw/events", timestamp_field="ts", description="Events.")
    defs: list = [applicant, source]
    refs = []
    for v in range(views):
        aggs = tuple(
            Aggregation(column=f"c{i % 5}", function="sum", window=timedelta(days=1 + i), name=f"f{v}_{i}",
                        description=f"Sum of c{i % 5} over {1 + i} days.", reason=f"Reason text {v}/{i}")
            for i in range(50)
        )
        defs.append(FeatureView(name=f"view_{v:02d}", entities=(applicant,), source=source, aggregations=aggs,
                                owner="credit-risk", description=f"Generated view {v}."))
        refs += [f"view_{v:02d}:{a.name}" for a in aggs]
    defs.append(FeatureService(name="everything", features=tuple(refs), owner="credit-risk"))
    platform.features.apply(defs)

    rng = np.random.default_rng(0)
    x = pd.DataFrame(rng.poisson(1.0, (300, 3)).astype(float), columns=["a", "b", "c"])
    y = (rng.random(300) < 0.3).astype(int)
    booster = lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 4, "num_threads": 1}, lgb.Dataset(x, y), 5)
    png = _png()
    for i in range(1, versions + 1):
        files = {"model_card.md": _card(), "roc.png": png} if i == versions else None
        mv = platform.models.register("pd", flavor="lightgbm", model=booster, files=files, params={"i": i},
                                      lineage={"feature_service": "everything", "code_version": "bench",
                                               "training_set": {"name": "ts", "version": i}},
                                      metrics={"test_auc": 0.7 + i / 1000, "test_ks": 0.3 + i / 2000})
        if i % 10 == 0:
            platform.models.set_alias("pd", "production", mv.version)
    with DecisionLog(platform.storage, spool_dir=root / "spool", replica_id="bench") as log:
        for i in range(decisions):
            log.append_sync({
                "decision_id": f"d-{i}", "application_id": f"app-{i // 20}", "request": "{}", "decision": "approve",
                "probability_of_default": 0.1, "reasons": "[]", "model_name": "pd", "model_version": mv.version,
                "model_sha256": mv.artifacts[mv.model_file], "feature_names": json.dumps(["a", "b", "c"]),
                "features": json.dumps({"a": 1.0, "b": 0.0, "c": 2.0}),
                "feature_event_timestamps": json.dumps({"view_00": "2025-01-01T00:00:00+00:00"}),
                "fallback": False, "fallback_reason": None, "latency_ms": 2.0, "created_at": datetime.now(UTC).isoformat(),
                "shadow": None, "returned": True, "confirmed": True,
            })
        log.compact()
    from mlplatform.features.consistency import ConsistencyReport
    from mlplatform.features.consistency_reports import PREFIX

    per_feature = pd.DataFrame([{"ref": ref, "feature": ref.split(":")[1], "compared": 1000, "exact_matches": 990, "missing_online": 10,
                                 "extra_online": 0, "mean_abs_diff": 0.1, "exact_match_rate": 0.99} for ref in refs[:50]])
    examples = pd.DataFrame([{"ref": refs[0], "feature": "f0_0", "decision_id": "d-1", "served": 1.0, "offline": 2.0, "abs_diff": 1.0}])
    for day in range(20):
        ConsistencyReport("everything", 1000, pd.DataFrame(), per_feature, examples).write(platform.storage, f"{PREFIX}/202601{day + 1:02d}T000000Z")


def _card() -> bytes:
    """A model card's size and shape: headings, a dozen tables of ~10 rows."""
    lines = ["# Model card: pd", "", "Probability of default.", ""]
    for t in range(12):
        lines += [f"## Table {t}", "", "| metric | train | valid | test |", "|---|---:|---:|---:|"]
        lines += [f"| m{r} | 0.{r}1 | 0.{r}2 | 0.{r}3 |" for r in range(10)] + [""]
    return "\n".join(lines).encode()


def _png() -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([0, 1], [0, 1])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--views", type=int, default=20, help="feature views of 50 features each (default 20)")
    parser.add_argument("--versions", type=int, default=100, help="model versions (default 100)")
    parser.add_argument("--decisions", type=int, default=2000, help="logged decisions (default 2000)")
    parser.add_argument("--requests", type=int, default=30, help="requests per page (default 30)")
    args = parser.parse_args()

    import requests
    import uvicorn

    from mlplatform import Platform
    from mlplatform.ui import build_app

    root = Path(tempfile.mkdtemp(prefix="mlp-ui-bench-"))
    t0 = time.perf_counter()
    build(root, args.views, args.versions, args.decisions)
    print(f"registry: {args.views * 50} features in {args.views} views, {args.versions} versions, "
          f"{args.decisions} decisions, built in {time.perf_counter() - t0:.1f}s")
    platform = Platform.from_config({"storage": {"root": str(root / "root")}})
    app = build_app(platform, keys=((hashlib.sha256(KEY.encode()).hexdigest(), ("read_ui",)),))
    import socket
    import threading

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    session = requests.Session()
    assert session.post(f"{url}/login", data={"key": KEY}, allow_redirects=False).status_code == 303
    pages = {
        "catalog": ("GET", "/catalog"), "feature view": ("GET", "/catalog/views/view_00"), "lineage": ("GET", "/lineage"),
        "models": ("GET", "/models"), "model (100 versions)": ("GET", "/models/pd"),
        "model version + card": ("GET", f"/models/pd/{args.versions}"), "card plot (PNG)": ("GET", f"/models/pd/{args.versions}/files/roc.png"),
        "decision search (decision id)": ("GET", "/decisions?q=d-5"), "decision search (application id)": ("GET", "/decisions?q=app-3"),
        "decision": ("GET", "/decisions/d-5"), "decision replay": ("POST", "/decisions/d-5"), "operations": ("GET", "/operations"),
        "consistency report": ("GET", "/operations/consistency/20260120T000000Z"),
    }
    print(f"{'page':34s} {'p50 ms':>8s} {'p95 ms':>8s} {'max ms':>8s}  (n={args.requests}, {os.cpu_count()} cores, {host.machine()}, "
          f"load {os.getloadavg()[0]:.1f})")
    for name, (method, path) in pages.items():
        times = []
        for i in range(args.requests + 1):
            t = time.perf_counter()
            r = session.request(method, url + path, allow_redirects=False)
            elapsed = (time.perf_counter() - t) * 1000
            assert r.status_code in (200, 303), (path, r.status_code, r.text[:300])
            if i:
                times.append(elapsed)
        times.sort()
        p95 = times[max(0, int(round(0.95 * len(times))) - 1)]
        print(f"{name:34s} {statistics.median(times):8.1f} {p95:8.1f} {times[-1]:8.1f}")
    server.should_exit = True
    print(f"load after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
