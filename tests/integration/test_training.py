"""Distributed LightGBM training and tuning on a real local Ray (the session's 2 CPUs).

The training set is synthetic: ten numeric features and one integer-coded categorical with
a known non-linear signal, published as ``training_sets/<name>`` with its snapshot record,
as ``save_training_set`` would leave it.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from mlplatform import ConfigError, Platform
from mlplatform.features.training_sets import TrainingSetSnapshot
from mlplatform.training import TrainSpec, TuneSpec

pytestmark = pytest.mark.integration

FEATURES = [f"x{i}" for i in range(10)] + ["merchant_band"]


def synthetic_table(rows: int, seed: int = 0, noise_only: bool = False):
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, 10)).astype(np.float32)
    X[rng.random(rows) < 0.05, 6] = np.nan  # missing values travel as NaN
    band = rng.integers(0, 8, rows)
    logit = (
        0.9 * X[:, 0]
        - 0.7 * X[:, 1]
        + 0.5 * X[:, 2] * X[:, 3]
        + 0.6 * np.sin(2 * X[:, 4])
        + 0.4 * (X[:, 5] > 0.5)
        + 0.3 * (band % 3)
        - 2.3
    )
    if noise_only:
        logit = np.full(rows, -1.5)
    label = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    split = rng.choice(np.array(["train", "validation", "test"]), size=rows, p=[0.7, 0.15, 0.15])
    columns = {f"x{i}": X[:, i] for i in range(10)}
    columns.update(merchant_band=band, default=label, split=split)
    return pa.table(columns)


def publish_training_set(platform: Platform, name: str, table) -> TrainingSetSnapshot:
    """What ``save_training_set`` leaves behind, without needing a feature registry."""
    version = platform.datasets.publish(f"training_sets/{name}", table)
    counts = dict(zip(*np.unique(table.column("split").to_numpy(zero_copy_only=False), return_counts=True)))
    snapshot = TrainingSetSnapshot(
        name=name,
        version=version.version,
        uri=platform.storage.uri(f"training_sets/{name}"),
        rows=version.rows,
        content_hash="synthetic",
        label="default",
        timestamp_column="application_ts",
        features=[f"synthetic:{f}" for f in FEATURES],
        feature_versions={"synthetic": "test"},
        splits={s: {"rows": int(n)} for s, n in counts.items()},
        time_range={},
    )
    platform.storage.write_json(f"training_sets/{name}/_snapshots/{version.version:012d}.json", snapshot.to_json())
    return snapshot


@pytest.fixture(scope="module")
def platform(ray_session, tmp_path_factory):
    platform = Platform.from_config({"storage": {"root": str(tmp_path_factory.mktemp("training"))}})
    publish_training_set(platform, "synthetic", synthetic_table(20_000))
    yield platform
    platform.close()


def frames(platform: Platform, name: str):
    table = platform.datasets.read_table(f"training_sets/{name}").to_pandas()
    return {s: table[table["split"] == s] for s in ("train", "validation", "test")}


def test_two_workers_match_single_process_lightgbm(platform):
    from mlplatform.training.api import auc

    spec = TrainSpec(
        training_set="synthetic", num_workers=2, num_boost_round=120, early_stopping_rounds=None, report_every=40
    )
    result = platform.training.train(spec)

    split = frames(platform, "synthetic")
    local = platform.training.train_local(split["train"], split["validation"], spec, features=FEATURES)
    local_auc = auc(split["test"]["default"].to_numpy(), local.predict(split["test"][FEATURES].to_numpy()))

    assert result.feature_names == FEATURES  # from the snapshot's view:feature refs
    assert result.rounds == 120 and not result.early_stopped and result.restores == 0
    assert result.booster.current_iteration() == 120
    assert result.metrics["test"]["rows"] == len(split["test"])
    assert result.metrics["test"]["auc"] > 0.75
    assert abs(result.metrics["test"]["auc"] - local_auc) < 0.005
    # the driver's AUC of the final model agrees with an independent implementation
    sklearn = pytest.importorskip("sklearn.metrics")
    scores = result.booster.predict(split["test"][FEATURES].to_numpy())
    assert result.metrics["test"]["auc"] == pytest.approx(sklearn.roc_auc_score(split["test"]["default"], scores), abs=1e-4)
    assert result.checkpoint_uri.startswith(result.run_uri) and "checkpoint_final_" in result.checkpoint_uri
    assert os.path.exists(os.path.join(result.checkpoint_uri, "model.txt"))


class KillOnce:
    """Kills the rank-1 worker process at round ``at_round``, once (a marker file remembers).

    It first waits until the controller has registered the checkpoint of ``checkpoint_round``:
    Ray Train collects reports when it polls the workers (every 2 s), so a worker that died
    right after reporting could take its last checkpoint with it.
    """

    def __init__(self, marker: str, at_round: int, checkpoint_round: int) -> None:
        self.marker, self.at_round, self.checkpoint_round = marker, at_round, checkpoint_round

    def __call__(self, env) -> None:
        import time

        import ray.train

        context = ray.train.get_context()
        if env.iteration + 1 != self.at_round or context.get_world_rank() != 1 or os.path.exists(self.marker):
            return
        snapshot = os.path.join(context.get_storage().experiment_fs_path, "checkpoint_manager_snapshot.json")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if os.path.exists(snapshot) and f"checkpoint_{self.checkpoint_round:06d}" in open(snapshot).read():
                break
            time.sleep(0.2)
        open(self.marker, "w").close()
        os._exit(1)


def test_killed_worker_resumes_from_the_last_checkpoint(platform, tmp_path):
    import ray.cloudpickle

    # Ray workers cannot import this test module: ship KillOnce by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    spec = TrainSpec(
        training_set="synthetic",
        num_workers=2,
        num_boost_round=60,
        early_stopping_rounds=None,
        report_every=10,
        checkpoint_every=20,
        max_failures=2,
    )
    marker = tmp_path / "killed"
    result = platform.training.train(spec, callbacks=[KillOnce(str(marker), at_round=30, checkpoint_round=20)])

    assert marker.exists()
    assert result.restores == 1
    assert result.resumed_from_round == 20  # the last checkpoint before the kill at round 30
    assert result.rounds == 60 and result.booster.current_iteration() == 60
    assert result.metrics["test"]["auc"] > 0.75


def test_early_stopping_stops_when_validation_auc_plateaus_with_storage_on_s3(ray_session, s3_server, s3_bucket):
    platform = Platform.from_config({"storage": {"root": f"s3://{s3_bucket}/mlp", "s3": {"endpoint_url": s3_server}}})
    publish_training_set(platform, "noise", synthetic_table(8_000, seed=1, noise_only=True))
    spec = TrainSpec(
        training_set="noise",
        features=FEATURES,
        num_workers=2,
        num_boost_round=400,
        early_stopping_rounds=10,
        report_every=25,
        params={"learning_rate": 0.3},
    )
    result = platform.training.train(spec, evaluate=["validation"])

    assert result.early_stopped
    assert result.rounds < 400
    assert result.rounds - result.best_iteration == 10  # stopped 10 rounds after the best one
    assert result.booster.current_iteration() == result.best_iteration  # the kept model ends at the best round
    assert result.checkpoint_uri.startswith(f"s3://{s3_bucket}/mlp/training/runs/noise-")
    assert platform.storage.exists(f"{platform.storage.key_of(result.checkpoint_uri)}/model.txt")


def test_tune_with_asha_returns_the_best_trial(platform):
    spec = TuneSpec(
        train=TrainSpec(
            training_set="synthetic", num_workers=1, num_boost_round=60, early_stopping_rounds=None, report_every=10
        ),
        search_space={
            "learning_rate": {"loguniform": [0.02, 0.3]},
            "num_leaves": {"randint": [4, 48]},
            "min_data_in_leaf": {"choice": [20, 100]},
        },
        num_samples=4,
        grace_period=2,
        reduction_factor=2,
        seed=3,
    )
    result = platform.training.tune(spec)

    assert result.max_concurrent == 2  # 2 CPUs / (1 worker * 1 CPU)
    assert len(result.trials) == 4 and not any(t.error for t in result.trials)
    best = max(t.validation_auc for t in result.trials)
    assert result.validation_auc == best
    assert set(result.config) == {"learning_rate", "num_leaves", "min_data_in_leaf"}
    assert result.params["num_leaves"] == result.config["num_leaves"]
    assert 4 <= result.config["num_leaves"] < 48
    assert all(1 <= t.reports <= spec.max_reports for t in result.trials)
    # the returned booster is the best trial's model: every round when it ran to the end
    # without early stopping, else cut to its best round so far
    split = frames(platform, "synthetic")
    from mlplatform.training.api import auc

    valid_auc = auc(split["validation"]["default"].to_numpy(), result.booster.predict(split["validation"][FEATURES].to_numpy()))
    assert valid_auc == pytest.approx(result.validation_auc, abs=1e-6)
    assert result.booster.current_iteration() == result.best_round
    best_trial = next(t for t in result.trials if t.config == result.config)
    if best_trial.rounds == spec.train.num_boost_round:
        assert result.best_round == spec.train.num_boost_round
    else:
        assert 1 <= result.best_round <= best_trial.rounds


def test_unusable_training_sets_fail_before_any_worker_starts(platform):
    from mlplatform import DataError

    with pytest.raises(DataError, match=r"no column\(s\) \['income'\]"):
        platform.training.train({"training_set": "synthetic", "features": ["x0", "income"]})
    table = synthetic_table(2_000, seed=2)
    label = table.column("default").to_numpy().copy()
    label[:100] = 2
    publish_training_set(platform, "bad_label", table.set_column(table.schema.get_field_index("default"), "default", [label]))
    with pytest.raises(DataError, match="must be 0 or 1"):
        platform.training.train({"training_set": "bad_label"})


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [
        ({"num_workers": 0}, "num_workers", "0"),
        ({"num_boost_round": -5}, "num_boost_round", "-5"),
        ({"params": {"num_threads": 8}}, "params", "num_threads"),
        ({"report_every": 10, "checkpoint_every": 15}, "checkpoint_every", "15"),
        ({"worker_count": 2}, "worker_count", "unknown key"),
    ],
)
def test_train_spec_errors_name_the_field(section, field, value):
    with pytest.raises(ConfigError) as err:
        TrainSpec.load({"training_set": "synthetic", **section}, "train")
    assert field in str(err.value) and value in str(err.value)


def test_tune_spec_rejects_unknown_distributions():
    with pytest.raises(ConfigError) as err:
        TuneSpec.load(
            {"train": {"training_set": "t"}, "search_space": {"learning_rate": {"logunifrom": [0.01, 0.2]}}}, "tune"
        )
    assert "search_space.learning_rate" in str(err.value) and "unknown distribution 'logunifrom'" in str(err.value)
    with pytest.raises(ConfigError, match="search_space.num_leaves.*low < high"):
        TuneSpec.load({"train": {"training_set": "t"}, "search_space": {"num_leaves": {"randint": [127, 15]}}}, "tune")
