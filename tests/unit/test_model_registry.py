"""The model registry on local disk and a real S3-compatible server: safe round trips,
unique gapless versions under concurrent registration, tamper detection, aliases, errors."""

from __future__ import annotations

import json
import multiprocessing
import pickle
import struct

import lightgbm as lgb
import numpy as np
import pytest
import torch

from mlplatform import IntegrityError, ModelError, NotFoundError, Platform
from mlplatform.features.training_sets import TrainingSetSnapshot


@pytest.fixture(params=["local", "s3"])
def platform(request, tmp_path):
    return _platform(request.param, request, tmp_path)


@pytest.fixture
def local(tmp_path):
    return Platform.from_config({"storage": {"root": str(tmp_path / "root")}})


def _platform(kind, request, tmp_path):
    if kind == "local":
        return Platform.from_config({"storage": {"root": str(tmp_path / "root")}})
    endpoint = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return Platform.from_config({"storage": {"root": f"s3://{bucket}/m", "s3": {"endpoint_url": endpoint}}})


@pytest.fixture(scope="module")
def booster():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 3))
    y = (X[:, 0] + rng.normal(size=400) > 0).astype(int)
    return lgb.train({"objective": "binary", "verbose": -1, "num_leaves": 4}, lgb.Dataset(X, y), num_boost_round=5)


SNAPSHOT = TrainingSetSnapshot(
    name="underwriting_v1",
    version=3,
    uri="/data/training_sets/underwriting_v1",
    rows=1000,
    content_hash="00ab",
    label="default",
    timestamp_column="application_ts",
    features=["applicant_history:loans_90d"],
    feature_versions={"applicant_history": "v-abc"},
    splits={"train": {"start": "2024-01-01", "end": "2024-06-01", "rows": 700}},
    time_range={"min": "2024-01-01", "max": "2024-08-31"},
)


def test_lightgbm_round_trip_with_lineage_and_files(platform, booster):
    files = {"model_card.md": b"# card\n", "roc.png": b"\x89PNG fake"}
    mv = platform.models.register(
        "pd", flavor="lightgbm", model=booster, lineage={"training_set": SNAPSHOT, "feature_service": "underwriting_v1"},
        metrics={"test_auc": np.float64(0.71), "rows": np.int64(10)}, params={"num_leaves": 4}, files=files,
    )
    assert (mv.name, mv.version, mv.flavor, mv.model_file) == ("pd", 1, "lightgbm", "model.txt")
    assert set(mv.artifacts) == {"model.txt", "model_card.md", "roc.png"}
    assert mv.uri.startswith(platform.storage.uri("models/pd/"))
    assert mv.created_at.tzinfo is not None

    got = platform.models.get("pd")
    assert (got.version, got.artifacts, got.metrics) == (1, mv.artifacts, {"test_auc": 0.71, "rows": 10})
    lineage = got.lineage
    assert lineage["training_set"]["content_hash"] == "00ab" and lineage["training_set"]["rows"] == 1000
    assert lineage["feature_versions"] == {"applicant_history": "v-abc"}
    assert lineage["data_time_range"] == {"min": "2024-01-01", "max": "2024-08-31"}
    assert lineage["feature_service"] == "underwriting_v1"
    assert lineage["artifacts"] == mv.artifacts
    assert set(lineage["libraries"]) >= {"python", "lightgbm", "torch", "ray", "pyarrow", "mlplatform"}
    assert "code_version" in lineage  # the commit, or None outside a git checkout

    loaded = platform.models.load("pd", version=1)
    X = np.random.default_rng(1).normal(size=(20, 3))
    np.testing.assert_array_equal(loaded.model.predict(X), booster.predict(X))
    assert loaded.files == files
    assert platform.models.names() == ["pd"]


def test_torch_round_trip_uses_safetensors_never_pickle(local, monkeypatch):
    import safetensors.torch

    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    mv = local.models.register("net", flavor="torch", model=net, lineage={}, metrics={}, params={"hidden": 3})
    assert mv.model_file == "model.safetensors"

    stored = local.storage.read_bytes(f"{mv.artifact_prefix}/model.safetensors")
    (header_len,) = struct.unpack("<Q", stored[:8])
    header = json.loads(stored[8 : 8 + header_len])
    assert set(header) - {"__metadata__"} == set(net.state_dict())

    def refuse(*args, **kwargs):
        raise AssertionError("model loading must not unpickle")

    calls = []
    real_load = safetensors.torch.load
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(safetensors.torch, "load", lambda data: calls.append(1) or real_load(data))
    state = local.models.load("net").model
    assert calls == [1]
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    fresh.load_state_dict(state)
    x = torch.randn(5, 4)
    assert torch.equal(fresh(x), net(x))


def test_torch_tied_weights_and_state_dicts(local):
    shared = torch.nn.Linear(2, 2)
    state = {"a.weight": shared.weight, "b.weight": shared.weight, "step": torch.tensor(3)}
    local.models.register("tied", flavor="torch", model=state, lineage={}, metrics={}, params={})
    loaded = local.models.load("tied").model
    assert torch.equal(loaded["a.weight"], loaded["b.weight"]) and int(loaded["step"]) == 3
    with pytest.raises(ModelError, match="not tensors"):
        local.models.register("bad", flavor="torch", model={"w": torch.ones(1), "cfg": {"x": 1}}, lineage={}, metrics={}, params={})


@pytest.mark.parametrize("target", ["model.txt", "model_card.md"])
def test_tampered_artifact_is_refused(platform, booster, target):
    mv = platform.models.register(
        "pd", flavor="lightgbm", model=booster, lineage={}, metrics={}, params={}, files={"model_card.md": b"# ok"}
    )
    key = f"{mv.artifact_prefix}/{target}"
    original = platform.storage.read_bytes(key)
    platform.storage.write_bytes(key, original.replace(b"1", b"2", 1) if target == "model.txt" else b"# evil")
    with pytest.raises(IntegrityError, match="refusing to load"):
        platform.models.load("pd")
    platform.storage.write_bytes(key, original)
    assert platform.models.load("pd").version.version == 1


def test_aliases_move_atomically_and_resolve(local, booster):
    for _ in range(3):
        local.models.register("pd", flavor="lightgbm", model=booster, lineage={}, metrics={}, params={})
    assert local.models.aliases("pd") == {}
    local.models.set_alias("pd", "production", 1)
    local.models.set_alias("pd", "candidate", 3)
    assert local.models.get("pd", alias="production").version == 1
    assert local.models.get("pd", version=3).aliases == ("candidate",)
    moved = local.models.set_alias("pd", "production", 3)
    assert moved.aliases == ("candidate", "production")
    assert local.models.aliases("pd") == {"candidate": 3, "production": 3}
    assert local.models.load("pd", alias="production").version.version == 3
    assert local.storage.read_json("models/pd/aliases/production.json")["previous"] == 1
    assert [v.version for v in local.models.list("pd")] == [1, 2, 3]
    assert local.models.get("pd").version == 3  # latest


def test_every_alias_move_is_in_the_history_on_disk_and_s3(platform, booster, monkeypatch):
    import threading

    monkeypatch.setenv("MLP_USER", "ops")
    for _ in range(3):
        platform.models.register("pd", flavor="lightgbm", model=booster, lineage={}, metrics={}, params={})
    platform.models.set_alias("pd", "production", 1)
    platform.models.set_alias("pd", "candidate", 2)
    platform.models.set_alias("pd", "production", 3)
    history = platform.models.alias_history("pd")
    assert [(e.alias, e.version, e.previous, e.outcome, e.by) for e in history] == [
        ("production", 1, None, "set", "ops"), ("candidate", 2, None, "set", "ops"), ("production", 3, 1, "set", "ops"),
    ]
    assert history == sorted(history, key=lambda e: e.at) and all(e.at.tzinfo is not None for e in history)
    assert [e.version for e in platform.models.alias_history("pd", "production")] == [1, 3]
    # concurrent moves of one alias: every one is recorded (one document each, nothing overwritten)
    threads = [threading.Thread(target=platform.models.set_alias, args=("pd", "shadow", v)) for v in (1, 2, 3, 1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    shadow = platform.models.alias_history("pd", "shadow")
    assert sorted(e.version for e in shadow) == [1, 1, 2, 2, 3]
    assert platform.models.aliases("pd")["shadow"] in (1, 2, 3)
    with pytest.raises(ModelError, match="bad alias"):
        platform.models.alias_history("pd", "../x")
    assert platform.models.alias_history("pd", "never-set") == []


def test_unknown_names_versions_and_aliases(local, booster):
    with pytest.raises(NotFoundError, match="no model named 'pd'.*registered: none"):
        local.models.get("pd")
    with pytest.raises(NotFoundError, match="no model named 'pd'"):
        local.models.list("pd")
    local.models.register("pd", flavor="lightgbm", model=booster, lineage={}, metrics={}, params={})
    with pytest.raises(NotFoundError, match=r"no version 7; it has versions 1\.\.1"):
        local.models.load("pd", version=7)
    with pytest.raises(NotFoundError, match="no alias 'production'.*set_alias"):
        local.models.get("pd", alias="production")
    with pytest.raises(NotFoundError, match="no version 4"):
        local.models.set_alias("pd", "production", 4)
    with pytest.raises(ModelError, match="bad alias"):
        local.models.set_alias("pd", "7", 1)
    with pytest.raises(ModelError, match="not both"):
        local.models.get("pd", version=1, alias="production")
    with pytest.raises(ModelError, match="unknown model flavor 'sklearn'"):
        local.models.register("pd", flavor="sklearn", model=booster, lineage={}, metrics={}, params={})
    with pytest.raises(ModelError, match="needs a lightgbm.Booster"):
        local.models.register("pd", flavor="lightgbm", model=object(), lineage={}, metrics={}, params={})
    with pytest.raises(ModelError, match="bad model name"):
        local.models.register("../x", flavor="lightgbm", model=booster, lineage={}, metrics={}, params={})
    with pytest.raises(ModelError, match="bad file name"):
        local.models.register("pd", flavor="lightgbm", model=booster, lineage={}, metrics={}, params={}, files={"a/b": b""})
    assert [v.version for v in local.models.list("pd")] == [1]  # failed registrations took no number


def _register_three(config, worker, text, start, results):
    """One racing process: its own Platform and storage client, three registrations."""
    platform = Platform.from_config(config)
    platform.models.names()  # open the storage client (~1 s of botocore set-up on S3) before the race
    start.wait()  # start together, to race for the same numbers
    for i in range(3):
        mv = platform.models.register(
            "race", flavor="lightgbm", model=text, lineage={"worker": worker, "i": i},
            metrics={}, params={}, files={"note.txt": f"{worker}-{i}".encode()},
        )
        results.put(mv.version)


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_concurrent_registrations_get_unique_gapless_versions(kind, request, tmp_path, booster):
    platform = _platform(kind, request, tmp_path)
    # fork: the workers start in milliseconds with everything imported; each builds its own
    # Platform (and S3 client), and the environment (credentials) is inherited.
    ctx = multiprocessing.get_context("fork")
    start, results = ctx.Barrier(8), ctx.Queue()
    procs = [
        ctx.Process(target=_register_three, args=(platform.config, w, booster.model_to_string(), start, results))
        for w in range(8)
    ]
    for p in procs:
        p.start()
    claimed = [results.get(timeout=120) for _ in range(24)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0

    assert sorted(claimed) == list(range(1, 25))
    versions = platform.models.list("race")
    assert [v.version for v in versions] == list(range(1, 25))
    seen = set()
    for mv in versions:
        loaded = platform.models.load("race", version=mv.version)  # every artifact present and verified
        worker, i = mv.lineage["worker"], mv.lineage["i"]
        assert loaded.files["note.txt"] == f"{worker}-{i}".encode()
        seen.add((worker, i))
    assert seen == {(w, i) for w in range(8) for i in range(3)}


def test_versions_record_their_flavor_config_and_load_predictors(platform, booster):
    """load_predictor reads through the same checksums as load, on every backend, and the
    record's flavor_config is what the flavor needs to rebuild the model."""
    net = torch.nn.Linear(3, 1)
    config = {
        "class": "torch.nn:Linear",
        "config": {"in_features": 3, "out_features": 1},
        "signature": {"inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 3]}],
                      "outputs": [{"name": "probability", "datatype": "FP64", "shape": [-1, 1]}]},
        "transform": "sigmoid",
    }  # fmt: skip
    mv = platform.models.register("net", flavor="torch", model=net, flavor_config=config, lineage={}, metrics={}, params={})
    assert mv.flavor_config == config == platform.models.get("net").flavor_config
    got, predictor = platform.models.load_predictor("net", version=1)
    assert got == mv
    x = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
    with torch.no_grad():
        want = torch.sigmoid(net(torch.from_numpy(x)).double()).numpy()
    np.testing.assert_array_equal(predictor.predict({"input": x})["probability"], want)

    platform.models.register("pd", flavor="lightgbm", model=booster, lineage={}, metrics={}, params={})
    platform.models.set_alias("pd", "production", 1)
    mv, predictor = platform.models.load_predictor("pd", alias="production")
    assert mv.flavor_config == {} and [s.name for s in predictor.signature.inputs] == booster.feature_name()
    X = np.random.default_rng(1).normal(size=(6, 3))
    out = predictor.predict({name: X[:, j] for j, name in enumerate(booster.feature_name())})["probability"]
    np.testing.assert_array_equal(out, booster.predict(X))

    key = f"{mv.artifact_prefix}/model.txt"
    original = platform.storage.read_bytes(key)
    platform.storage.write_bytes(key, original.replace(b"1", b"2", 1))
    with pytest.raises(IntegrityError, match="refusing to load"):
        platform.models.load_predictor("pd", alias="production")
    platform.storage.write_bytes(key, original)
