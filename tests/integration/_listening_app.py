"""Deploy the serving application on a local Ray that the platform starts itself, for
``test_listening_sockets.py``, which runs this file with the venv's python and inspects the
sockets of its process tree (this process, the Ray it starts, the HAProxy that Serve starts).

    python tests/integration/_listening_app.py <work dir> <serving port>

The API key comes from ``MLP_LISTEN_TEST_KEY``; ``RAY_SERVE_*`` variables travel to Serve as
``deploy`` sends them. Prints ``READY {"url": ...}`` once the application answers, then obeys
one command a line on stdin, answering each with ``DONE <command>``:

- ``delete``: ``platform.serving.shutdown()`` (the application goes, Serve and HAProxy stay);
- ``close``: ``serve.shutdown()`` and ``platform.close()`` (Serve, HAProxy and Ray go), then exit.
"""

from __future__ import annotations

import json
import logging
import sys

import lightgbm as lgb
import numpy as np
import pandas as pd

from mlplatform import Platform
from workloads.underwriting.features import DEFINITIONS

KEY_ENV = "MLP_LISTEN_TEST_KEY"


def _model(platform: Platform) -> lgb.Booster:
    names = [ref.split(":")[1] for ref in platform.features.resolve_features("underwriting_v1")]
    rng = np.random.default_rng(0)
    x = pd.DataFrame(rng.poisson(1.0, (500, len(names))).astype(float), columns=names)
    y = (rng.random(len(x)) < 0.1 + 0.1 * (x["missed_installments_90d"] > 1)).astype(int)
    params = {"objective": "binary", "verbose": -1, "num_leaves": 4, "seed": 0, "num_threads": 1}
    return lgb.train(params, lgb.Dataset(x, y), num_boost_round=5)


def main(work_dir: str, port: int) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    platform = Platform.from_config({
        "project": "listentest",
        "storage": {"root": f"{work_dir}/store"},
        "ray": {"num_cpus": 2},
        "serving": {"port": port, "api_key_env": KEY_ENV},
    })
    platform.features.apply(DEFINITIONS)
    version = platform.models.register(
        "underwriting", flavor="lightgbm", model=_model(platform),
        lineage={"feature_service": "underwriting_v1"}, metrics={}, params={},
    ).version
    platform.models.set_alias("underwriting", "production", version)
    deployed = platform.serving.deploy("underwriting", num_replicas=1, replica_cpus=0.5)
    print("READY " + json.dumps({"url": deployed.url, "ingress": deployed.ingress}), flush=True)
    for line in sys.stdin:
        command = line.strip()
        if command == "delete":
            platform.serving.shutdown()
        elif command == "close":
            from ray import serve

            serve.shutdown()
            platform.close()
            print("DONE close", flush=True)
            return
        print(f"DONE {command}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
