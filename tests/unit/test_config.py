"""Config validation: every bad config names the field and echoes the value."""

from __future__ import annotations

from datetime import timedelta

import pytest

from mlplatform import ConfigError, PlatformConfig, load_config


@pytest.mark.parametrize(
    ("config", "field", "value"),
    [
        ({"projet": "bnpl"}, "projet", "unknown key"),
        ({"storage": {"root": "./x", "bucket": "b"}}, "storage.bucket", "'b'"),
        ({"storage": {"root": "s3://"}}, "storage.root", "missing bucket"),
        ({"storage": {"root": "s3:///prefix"}}, "storage.root", "missing bucket"),
        ({"storage": {"root": "s3:/bucket/x"}}, "storage.root", "malformed URI"),
        ({"storage": {"root": "gs://bucket/x"}}, "storage.root", "unsupported storage scheme 'gs'"),
        ({"storage": {"root": "s3://Bad_Bucket/x"}}, "storage.root", "invalid S3 bucket name 'Bad_Bucket'"),
        ({"storage": {"s3": {"endpoint_url": "localhost:9000"}}}, "storage.s3.endpoint_url", "'localhost:9000'"),
        ({"serving": {"deadline": "-5ms"}}, "serving.deadline", "must not be negative"),
        ({"serving": {"deadline": "soon"}}, "serving.deadline", "'soon'"),
        ({"online_store": {"type": "redis", "url": "redis://localhost:6379", "timeout": "-1s"}}, "online_store.redis.timeout", "negative"),
        ({"online_store": {"type": "mongo"}}, "online_store", "'mongo'"),
        ({"online_store": {"type": "redis"}}, "online_store.redis.url", "Field required"),
        ({"online_store": {"type": "redis", "url": "http://x"}}, "online_store.redis.url", "'http://x'"),
        ({"ray": {"num_cpus": -2}}, "ray.num_cpus", "-2"),
        ({"ray": {"address": "nonsense"}}, "ray.address", "'nonsense'"),
        ({"project": "Has Spaces"}, "project", "'Has Spaces'"),
    ],
)
def test_bad_config_names_field_and_value(config, field, value):
    with pytest.raises(ConfigError) as info:
        load_config(config)
    message = str(info.value)
    assert f"{field}:" in message
    assert value in message


@pytest.mark.parametrize("key", ["aws_access_key_id", "aws_secret_access_key", "secret"])
def test_credentials_are_refused_in_config(key):
    with pytest.raises(ConfigError, match="credentials do not belong in a config"):
        load_config({"storage": {"root": "s3://bucket/x", "s3": {key: "AKIA..."}}})


def test_redis_password_is_refused_in_url():
    with pytest.raises(ConfigError, match="REDIS_PASSWORD"):
        load_config({"online_store": {"type": "redis", "url": "redis://:hunter2@localhost:6379"}})


def test_defaults_are_the_embedded_local_setup():
    config = load_config(None)
    assert config.storage.root == "./.mlplatform"
    assert config.online_store.type == "sqlite"
    assert config.ray.address is None
    assert config.ray.dashboard_host == "127.0.0.1"
    assert config.serving.deadline == timedelta(milliseconds=50)


def test_s3_root_is_normalised():
    config = load_config({"storage": {"root": "s3://risk-ml/prod/bnpl/"}})
    assert config.storage.root == "s3://risk-ml/prod/bnpl"
    assert config.storage.is_s3


def test_yaml_file_with_env_expansion(tmp_path, monkeypatch):
    monkeypatch.setenv("MLP_TEST_ENDPOINT", "http://127.0.0.1:9999")
    path = tmp_path / "c.yaml"
    path.write_text(
        "storage:\n  root: ${MLP_TEST_ROOT:-s3://bucket/p}\n  s3:\n    endpoint_url: ${MLP_TEST_ENDPOINT}\n"
        "online_store:\n  type: redis\n  url: redis://127.0.0.1:6379/0\n"
    )
    config = load_config(path)
    assert config.storage.root == "s3://bucket/p"
    assert config.storage.s3.endpoint_url == "http://127.0.0.1:9999"
    assert config.online_store.type == "redis"


def test_missing_env_var_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("MLP_NOT_SET", raising=False)
    path = tmp_path / "c.yaml"
    path.write_text("storage:\n  root: ${MLP_NOT_SET}\n")
    with pytest.raises(ConfigError, match="storage.root: environment variable MLP_NOT_SET is not set"):
        load_config(path)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("storage: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(listy)


def test_checked_in_configs_are_valid(monkeypatch):
    assert load_config("configs/local.yaml").online_store.type == "sqlite"
    monkeypatch.setenv("MLP_S3_ROOT", "s3://risk-ml/bnpl")
    assert load_config("configs/s3.yaml").storage.root == "s3://risk-ml/bnpl"
    monkeypatch.setenv("MLP_REDIS_URL", "redis://cache.internal:6379/2")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cluster = load_config("configs/cluster.yaml")
    assert (cluster.storage.root, cluster.online_store.type, cluster.online_store.url, cluster.ray.address) == (
        "s3://risk-ml/bnpl", "redis", "redis://cache.internal:6379/2", "auto"
    )


def test_config_passes_through_unchanged():
    config = PlatformConfig(project="x")
    assert load_config(config) is config
