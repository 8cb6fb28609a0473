"""``platform.training``: distributed LightGBM training and tuning on a training-set snapshot.

    result = platform.training.train({"training_set": "underwriting_v1", "num_workers": 2})
    result.booster                      # lightgbm.Booster, cut to the best round
    result.metrics["test"]["auc"]
    best = platform.training.tune({"train": {...}, "search_space": {...}, "num_samples": 16})

Nothing is registered here: the caller hands ``result.booster`` and ``result.snapshot`` to
``platform.models``.
"""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from mlplatform.errors import DataError, TrainingError
from mlplatform.training.spec import TrainSpec, TuneSpec

if TYPE_CHECKING:
    import lightgbm
    import numpy as np
    import pandas as pd
    import ray.data

    from mlplatform.features.training_sets import TrainingSetSnapshot
    from mlplatform.features.store import FeatureStore
    from mlplatform.storage import DatasetStore, Storage
    from mlplatform.training.tune import TuneResult

__all__ = ["PreparedData", "TrainResult", "Training", "auc"]

RUNS = "training/runs"
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class TrainResult:
    """A finished training run: the model and everything needed to register and audit it.

    ``metrics`` maps each evaluated split to ``auc``, ``logloss``, ``rows`` and ``positive_rate``,
    computed on the driver from predictions of the final booster. ``timings`` holds
    ``prepare_s`` (reading and materialising the splits), ``fit_s`` (the Ray Train run) and
    ``evaluate_s``; ``wall_time_s`` is their sum.
    """

    booster: lightgbm.Booster
    best_iteration: int
    rounds: int
    early_stopped: bool
    metrics: dict[str, dict[str, float]]
    feature_names: list[str]
    params: dict[str, Any]
    spec: TrainSpec
    snapshot: TrainingSetSnapshot
    checkpoint_uri: str
    run_uri: str
    restores: int
    resumed_from_round: int | None
    wall_time_s: float
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PreparedData:
    """A snapshot's train and validation splits, materialised in the Ray object store.

    Materialising (rather than streaming Parquet into the workers) reads the files once for
    every attempt of a run and every Tune trial, and means the ingest needs no CPU while the
    workers hold them all (on a 2-CPU machine, 2 workers would otherwise starve Ray Data's
    read tasks). The blocks live in the object store, spread over the cluster, never in the
    driver's memory.
    """

    snapshot: TrainingSetSnapshot
    features: list[str]
    label: str
    train: ray.data.Dataset
    validation: ray.data.Dataset

    def split(self, datasets: DatasetStore, name: str) -> ray.data.Dataset:
        if name == "train":
            return self.train
        if name == "validation":
            return self.validation
        return _read_split(datasets, self.snapshot, self.features, self.label, name)


class Training:
    """Distributed training (Ray Train) and tuning (Ray Tune) of LightGBM models.

    Args:
        storage: the storage root (run checkpoints, Tune experiments).
        datasets: the datasets under it (training-set snapshots).
        features: the feature store (training sets are looked up there).
        connect_ray: connects this process to Ray (or starts a local Ray).
    """

    def __init__(self, storage: Storage, datasets: DatasetStore, features: FeatureStore, connect_ray: Callable[[], Any]) -> None:
        self.storage = storage
        self.datasets = datasets
        self.features = features
        self.connect_ray = connect_ray

    def __repr__(self) -> str:
        return f"Training({self.storage.uri(RUNS)!r})"

    # ----------------------------------------------------------------------------- train
    def train(
        self,
        spec: TrainSpec | Mapping[str, Any],
        *,
        callbacks: Sequence[Callable[..., None]] = (),
        evaluate: Sequence[str] = ("validation", "test"),
    ) -> TrainResult:
        """Train LightGBM data-parallel on ``spec.num_workers`` Ray Train workers.

            result = platform.training.train(TrainSpec(training_set="underwriting_v1"))

        Each worker reads its own shard of the train split and the whole validation split
        (see ``mlplatform.training.lightgbm``). Checkpoints go under
        ``<storage root>/training/runs/<run name>-<time>-<id>/``; a failed worker group is
        restarted up to ``spec.max_failures`` times and continues from the last checkpoint.

        Args:
            spec: a ``TrainSpec`` or a mapping (the workload's ``train:`` section).
            callbacks: extra LightGBM callbacks run on every worker after each round, before
                the platform's own (they must pickle; ``ray.train.get_context()`` works inside).
            evaluate: splits to score with the final model for ``TrainResult.metrics``.

        Raises:
            ConfigError: the spec is invalid.
            NotFoundError: the training set or its version does not exist.
            DataError: a feature or the label is missing, or a split is empty.
            TrainingError: the run failed after its retries.
        """
        from mlplatform.training.lightgbm import LoopConfig, read_checkpoint

        spec = TrainSpec.load(spec, "train")
        _check_splits(evaluate)
        started = time.perf_counter()
        data = prepare(self, spec)
        prepared = time.perf_counter()
        run_name = unique_run_name(spec.run_name)
        trainer = build_trainer(
            self.storage,
            spec,
            data,
            LoopConfig.from_spec(spec, data.features, callbacks),
            run_name=run_name,
            storage_key=RUNS,
        )
        result = fit_trainer(trainer, run_name)
        fitted = time.perf_counter()
        if result.checkpoint is None:
            raise TrainingError(f"training run {run_name!r} finished without a checkpoint; see the worker logs")
        booster, state = read_checkpoint(result.checkpoint.path, result.checkpoint.filesystem)
        metrics = evaluate_splits(self.datasets, data, booster, evaluate)
        done = time.perf_counter()
        storage = self.storage
        timings = {"prepare_s": prepared - started, "fit_s": fitted - prepared, "evaluate_s": done - fitted}
        return TrainResult(
            booster=booster,
            best_iteration=state.best_round if spec.early_stopping_rounds else state.round,
            rounds=state.round,
            early_stopped=state.round < spec.num_boost_round,
            metrics=metrics,
            feature_names=list(data.features),
            params=dict(spec.params),
            spec=spec,
            snapshot=data.snapshot,
            checkpoint_uri=storage.uri(storage.key_of(result.checkpoint.path)),
            run_uri=storage.uri(f"{RUNS}/{run_name}"),
            restores=state.restores,
            resumed_from_round=state.resumed_from_round,
            wall_time_s=done - started,
            timings=timings,
        )

    # ------------------------------------------------------------------------------ tune
    def tune(self, spec: TuneSpec | Mapping[str, Any]) -> TuneResult:
        """Search LightGBM params with Ray Tune and ASHA; see ``mlplatform.training.tune``."""
        from mlplatform.training.tune import run_tune

        return run_tune(self, TuneSpec.load(spec, "tune"))

    # ---------------------------------------------------------------------- baseline
    @staticmethod
    def train_local(
        frame_train: pd.DataFrame,
        frame_valid: pd.DataFrame,
        spec: TrainSpec | Mapping[str, Any],
        *,
        features: list[str] | None = None,
        num_threads: int | None = None,
    ) -> lightgbm.Booster:
        """Single-process ``lightgbm.train`` with the same params and early stopping (a baseline)."""
        from mlplatform.training.lightgbm import train_local

        return train_local(
            frame_train, frame_valid, TrainSpec.load(spec, "train"), features=features, num_threads=num_threads
        )


# --------------------------------------------------------------------------- internals
def prepare(training: Training, spec: TrainSpec) -> PreparedData:
    """Resolve the snapshot and its feature columns; materialise train and validation."""
    from mlplatform.features.training_sets import get_training_set

    training.connect_ray()
    snapshot = get_training_set(training.features, spec.training_set, spec.training_set_version)
    features = spec.features or _snapshot_features(snapshot)
    if not features:
        raise DataError(
            f"training set {spec.training_set!r} v{snapshot.version} records no features; list them in the spec's features"
        )
    _check_columns(training.datasets, snapshot, [*features, spec.label])
    _check_label(training.datasets, training.storage, snapshot, spec.label)
    train = _read_split(training.datasets, snapshot, features, spec.label, "train").materialize()
    validation = _read_split(training.datasets, snapshot, features, spec.label, "validation").materialize()
    for name, ds in (("train", train), ("validation", validation)):
        if ds.count() == 0:
            raise DataError(f"training set {snapshot.name!r} v{snapshot.version} has no {name!r} rows")
    return PreparedData(snapshot, list(features), spec.label, train, validation)


def build_trainer(
    storage: Storage,
    spec: TrainSpec,
    data: PreparedData,
    loop: Any,
    *,
    run_name: str,
    storage_key: str,
    callbacks: Sequence[Any] = (),
) -> Any:
    """The ``LightGBMTrainer`` for one run (also used by each Tune trial)."""
    import ray.train
    from ray.train.lightgbm import LightGBMTrainer

    from mlplatform.training.lightgbm import train_loop

    return LightGBMTrainer(
        train_loop,
        train_loop_config={"loop": loop},
        scaling_config=ray.train.ScalingConfig(
            num_workers=spec.num_workers,
            use_gpu=spec.use_gpu,
            resources_per_worker={"CPU": spec.cpus_per_worker, **({"GPU": 1} if spec.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage.path(storage_key),
            storage_filesystem=storage.arrow_fs,
            failure_config=ray.train.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks),
        ),
        datasets={"train": data.train, "validation": data.validation},
        # Only the train split is sharded; every worker reads the whole validation split.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )


def fit_trainer(trainer: Any, run_name: str) -> Any:
    """``trainer.fit()``, a run that failed after its retries raised as a ``TrainingError``."""
    import ray.train

    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise TrainingError(
            f"training run {run_name!r} failed after its retries (spec.max_failures): {exc}"
        ) from exc


def unique_run_name(base: str) -> str:
    """``base`` with the time and a random suffix."""
    # Unique per call: Ray Train resumes a run whose folder already exists under the same name.
    return f"{base}-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"


def _snapshot_features(snapshot: TrainingSetSnapshot) -> list[str]:
    from mlplatform.features.definitions import parse_ref

    return [parse_ref(ref)[1] for ref in snapshot.features]


def _check_splits(splits: Sequence[str]) -> None:
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise DataError(f"unknown split(s) {bad}: use {list(SPLITS)}")


def _check_columns(datasets: DatasetStore, snapshot: TrainingSetSnapshot, columns: list[str]) -> None:
    import pyarrow as pa

    from mlplatform.features.training_sets import PREFIX

    manifest = datasets.get(f"{PREFIX}/{snapshot.name}", snapshot.version)
    if not manifest.schema:
        return
    names = set(pa.ipc.read_schema(pa.py_buffer(base64.b64decode(manifest.schema))).names)
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(
            f"training set {snapshot.name!r} v{snapshot.version} has no column(s) {missing}; columns: {sorted(names)}"
        )


def _check_label(datasets: DatasetStore, storage: Storage, snapshot: TrainingSetSnapshot, label: str) -> None:
    """The label must be 0/1 and never null, checked from the Parquet footers' statistics.

    Checked on the driver, before any worker starts, because a worker that fails on bad data
    is retried ``max_failures`` times. Row groups without statistics are not checked here.
    """
    import pyarrow.parquet as pq

    from mlplatform.features.training_sets import PREFIX

    manifest = datasets.get(f"{PREFIX}/{snapshot.name}", snapshot.version)
    what = f"training set {snapshot.name!r} v{snapshot.version}"
    for path in datasets.file_paths(manifest):
        with storage.arrow_fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
        index = meta.schema.to_arrow_schema().get_field_index(label)
        for g in range(meta.num_row_groups):
            stats = meta.row_group(g).column(index).statistics
            if stats is None:
                continue
            if stats.null_count:
                raise DataError(f"{what}: the label {label!r} is null in {stats.null_count} rows of {path}")
            if stats.has_min_max and (stats.min < 0 or stats.max > 1):
                raise DataError(
                    f"{what}: the label {label!r} must be 0 or 1, found values from {stats.min} to {stats.max} in {path}"
                )


def _read_split(
    datasets: DatasetStore, snapshot: TrainingSetSnapshot, features: list[str], label: str, split: str
) -> ray.data.Dataset:
    from mlplatform.features.training_sets import PREFIX, SPLIT_COLUMN

    from ray.data.expressions import col

    ds = datasets.read(f"{PREFIX}/{snapshot.name}", snapshot.version)
    # Ray Data pushes the projection and the filter down into the Parquet read.
    ds = ds.select_columns([*features, label, SPLIT_COLUMN]).filter(expr=col(SPLIT_COLUMN) == split)
    return ds.select_columns([*features, label])


# -------------------------------------------------------------------------- evaluation
def evaluate_splits(
    datasets: DatasetStore, data: PreparedData, booster: lightgbm.Booster, splits: Sequence[str]
) -> dict[str, dict[str, float]]:
    """AUC, log loss, rows and positive rate of ``booster`` on each split.

    Scoring runs as Ray Data tasks; only ``(label, score)`` pairs (12 bytes a row) come back to
    the driver, which computes the exact AUC.
    """
    model_text = booster.model_to_string()
    out = {}
    for split in splits:
        scored = data.split(datasets, split).map_batches(
            _score_batch,
            # Large batches: one predict call per few blocks. At the blocks' own size (a few
            # thousand rows) per-call and per-task overhead doubled the scoring time.
            batch_size=_SCORE_BATCH_ROWS,
            batch_format="pyarrow",
            fn_kwargs={"model_text": model_text, "features": data.features, "label": data.label},
        )
        labels, scores = [], []
        for batch in scored.iter_batches(batch_format="numpy", batch_size=None):
            labels.append(batch["label"])
            scores.append(batch["score"])
        out[split] = _split_metrics(labels, scores)
    return out


_BOOSTERS: dict[int, Any] = {}
_SCORE_BATCH_ROWS = 65_536


def _score_batch(batch: Any, *, model_text: str, features: list[str], label: str) -> Any:
    import lightgbm
    import pyarrow as pa

    from mlplatform.training.lightgbm import numeric_column

    key = hash(model_text)
    booster = _BOOSTERS.get(key)
    if booster is None:  # once per worker process, not per batch
        _BOOSTERS.clear()
        booster = _BOOSTERS[key] = lightgbm.Booster(model_str=model_text)
    import numpy as np

    X = np.column_stack([numeric_column(batch, c, pa.float32()) for c in features]) if batch.num_rows else None
    scores = booster.predict(X, num_threads=1) if X is not None else np.empty(0)
    return pa.table({"label": numeric_column(batch, label, pa.float32()), "score": pa.array(scores, pa.float64())})


def _split_metrics(labels: list[np.ndarray], scores: list[np.ndarray]) -> dict[str, float]:
    import numpy as np

    y = np.concatenate(labels) if labels else np.empty(0)
    s = np.concatenate(scores) if scores else np.empty(0)
    if len(y) == 0:
        return {"rows": 0, "auc": float("nan"), "logloss": float("nan"), "positive_rate": float("nan")}
    p = np.clip(s, 1e-15, 1 - 1e-15)
    logloss = float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))
    return {"rows": int(len(y)), "auc": auc(y, s), "logloss": logloss, "positive_rate": float(y.mean())}


def auc(y: np.ndarray, scores: np.ndarray) -> float:
    """Exact ROC AUC (ties count one half), as the Mann-Whitney U statistic over ranks."""
    import numpy as np

    y = np.asarray(y) > 0.5
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = np.asarray(scores)[order]
    _, inverse, counts = np.unique(sorted_scores, return_inverse=True, return_counts=True)
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0  # 1-based, ties share their mean rank
    rank_sum = float(average_rank[inverse][y[order]].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
