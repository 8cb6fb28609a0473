"""cluster.yaml passes Ray's own cluster-config schema validation (no cloud call) and keeps
the security settings the platform depends on."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_passes_ray_schema_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(_config())  # merges the AWS provider defaults; no AWS call
    config.setdefault("cluster_synced_files", [])
    validate_config(config)


def test_schema_validation_catches_mistakes():
    import jsonschema
    import pytest
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = _config()
    config["available_node_types"]["cpu_worker"]["min_workerz"] = 1
    config = prepare_config(config)
    config.setdefault("cluster_synced_files", [])
    with pytest.raises(jsonschema.ValidationError, match="min_workerz"):
        validate_config(config)


def test_cluster_has_cpu_and_gpu_workers_and_secure_defaults():
    config = _config()
    types = config["available_node_types"]
    assert types["head"]["resources"] == {"CPU": 0}
    assert types["cpu_worker"]["max_workers"] > types["cpu_worker"]["min_workers"]
    assert types["gpu_worker"]["min_workers"] == 0
    starts = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token") == 2
    assert "--dashboard-host=127.0.0.1" in starts
    setup = " ".join(config["setup_commands"])
    assert "haproxy" in setup
    assert "ray[default,serve,train,data,tune]==2.60.0" in setup
    ports = config["provider"]["security_group"]["IpPermissions"]
    assert [(p["FromPort"], p["ToPort"]) for p in ports] == [(22, 22)]
    for node in types.values():
        assert "IamInstanceProfile" in node["node_config"]
