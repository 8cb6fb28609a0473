"""The LightGBM loop that runs on every Ray Train worker, and its single-process twin.

Each worker turns its shard of the train split into a ``lightgbm.Dataset`` and joins
LightGBM's own data-parallel network (``tree_learner=data_parallel``, ``pre_partition``):
histograms are all-reduced between workers every round, so no worker and not the driver
ever holds the whole train split. Every worker holds the *whole* validation split: LightGBM
computes validation metrics locally without syncing them, so workers with different
validation shards would see different AUCs, stop at different rounds and deadlock in the
next all-reduce. The same validation set on every worker gives every worker the same
metric and the same decisions (the trees are identical across workers).

Reporting to Ray Train costs a barrier across workers, and ``ray.train.report`` blocks until
the controller has collected the worker's previous report (its result queue holds one), which
the controller does when it polls the workers, every 2 s (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``).
Reporting every round therefore costs up to 2 s a round whenever rounds are faster than that:
100 rounds on 1M rows took 200 s instead of 7.6 s on a 2-core machine. So ``_RoundCallback``
reports every ``report_every`` rounds and at the end, and rank 0 attaches the model text as a
checkpoint every ``checkpoint_every`` rounds. The same poll means a checkpoint counts once the
controller has collected it: a worker group that dies within ~2 s of reporting one resumes
from the checkpoint before it.

A checkpoint is a folder with ``model.txt`` (LightGBM's text format, never a pickle) and
``state.json`` (rounds done, best round and AUC, restores so far, whether it is final).
A restarted worker group continues from it with ``init_model`` for the remaining rounds, and
early stopping resumes from the recorded best round.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import lightgbm
    import numpy as np
    import pandas as pd

    from mlplatform.training.spec import TrainSpec

__all__ = ["CheckpointState", "LoopConfig", "lightgbm_params", "numeric_column", "read_checkpoint", "train_local", "train_loop"]

MODEL_FILE = "model.txt"
STATE_FILE = "state.json"
VALID_NAME = "validation"
_BATCH_ROWS = 65_536


@dataclass
class CheckpointState:
    """What ``state.json`` records next to the model text."""

    round: int = 0
    best_round: int = 0
    best_auc: float = float("-inf")
    last_auc: float = float("nan")
    restores: int = 0
    resumed_from_round: int | None = None
    final: bool = False


@dataclass(frozen=True)
class LoopConfig:
    """Everything a worker needs, picklable (the spec's resolved view)."""

    features: list[str]
    label: str
    categorical: list[str]
    params: dict[str, Any]
    num_boost_round: int
    early_stopping_rounds: int | None
    report_every: int
    checkpoint_every: int
    cpus_per_worker: int
    callbacks: tuple[Callable[..., None], ...] = field(default=())

    @classmethod
    def from_spec(
        cls, spec: TrainSpec, features: list[str], callbacks: Sequence[Callable[..., None]] = ()
    ) -> LoopConfig:
        return cls(
            features=list(features),
            label=spec.label,
            categorical=list(spec.categorical),
            params=dict(spec.params),
            num_boost_round=spec.num_boost_round,
            early_stopping_rounds=spec.early_stopping_rounds,
            report_every=spec.report_every,
            checkpoint_every=spec.checkpoint_interval,
            cpus_per_worker=spec.cpus_per_worker,
            callbacks=tuple(callbacks),
        )


def lightgbm_params(params: dict[str, Any], num_threads: int | None) -> dict[str, Any]:
    """The params every path trains with: the spec's, AUC as the metric, and the thread count."""
    out = {**params, "metric": "auc"}
    if num_threads is not None:
        out["num_threads"] = num_threads
    return out


# ------------------------------------------------------------------------------ callback
class _RoundCallback:
    """Early stopping on validation AUC plus sparse reporting, as one LightGBM callback.

    Early stopping mirrors ``lightgbm.early_stopping``: a round improves when its AUC is
    strictly higher than the best so far; after ``stopping_rounds`` rounds without
    improvement, or at the last round, the best round becomes ``booster.best_iteration``.
    Unlike LightGBM's callback its state survives a restore (it starts from ``state``).
    """

    def __init__(
        self,
        *,
        num_boost_round: int,
        stopping_rounds: int | None,
        report_every: int,
        state: CheckpointState,
        report: Callable[[int, dict[str, Any], Any], None] | None,
    ) -> None:
        self.num_boost_round = num_boost_round
        self.stopping_rounds = stopping_rounds
        self.report_every = report_every
        self.state = state
        self.report = report
        # After user callbacks: lightgbm.train gives callbacks without an "order" negative ones.
        self.order = 30

    def __call__(self, env: Any) -> None:
        import lightgbm

        round_ = env.iteration + 1
        auc = next(r[2] for r in env.evaluation_result_list if r[0] == VALID_NAME and r[1] == "auc")
        state = self.state
        state.round, state.last_auc = round_, float(auc)
        if auc > state.best_auc:
            state.best_auc, state.best_round = float(auc), round_
        last = round_ >= self.num_boost_round
        stop = self.stopping_rounds is not None and (round_ - state.best_round >= self.stopping_rounds or last)
        # The run's final report comes after lightgbm.train returns; skip it here.
        if self.report is not None and not (stop or last) and round_ % self.report_every == 0:
            self.report(round_, self.metrics(), env.model)
        if stop:
            best = [(VALID_NAME, "auc", state.best_auc, True)]
            raise lightgbm.callback.EarlyStopException(state.best_round - 1, best)

    def metrics(self, *, final: bool = False) -> dict[str, Any]:
        """``validation_auc`` is the AUC of the model the checkpoint of this report holds: a
        periodic checkpoint is read back cut to the best round, and so is a final one with
        early stopping; a final one without early stopping keeps every round."""
        s = self.state
        kept_all = final and self.stopping_rounds is None
        return {
            "round": s.round,
            "validation_auc": s.last_auc if kept_all else s.best_auc,
            "validation_auc_last": s.last_auc,
            "best_round": s.best_round,
            "restores": s.restores,
        }


# ------------------------------------------------------------------------ worker loop
def train_loop(train_loop_config: dict[str, Any]) -> dict[str, Any]:
    """The function each Ray Train worker runs: ``LightGBMTrainer(train_loop,
    train_loop_config={"loop": LoopConfig(...)})``. Returns facts about this worker's data."""
    import lightgbm
    import ray.train
    import ray.util
    from ray.train.lightgbm import get_network_params

    config: LoopConfig = train_loop_config["loop"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()

    state, init_model = CheckpointState(), None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            model_text, state = read_checkpoint_folder(folder)
        state.restores += 1
        state.resumed_from_round = state.round
        init_model = lightgbm.Booster(model_str=model_text)

    X, y = shard_to_numpy(ray.train.get_dataset_shard("train"), config.features, config.label)
    Xv, yv = shard_to_numpy(ray.train.get_dataset_shard(VALID_NAME), config.features, config.label)
    if len(y) == 0:
        raise RuntimeError(f"worker {rank} of {world} got no training rows; use fewer workers for this training set")

    params = lightgbm_params(config.params, config.cpus_per_worker)
    if world > 1:
        params.update(tree_learner="data_parallel", pre_partition=True, **get_network_params())
    train_set = _dataset(X, y, config)
    valid_set = _dataset(Xv, yv, config, reference=train_set)
    del X, Xv

    # Tune releases a stopped trial's workers by this id (see mlplatform.training.tune).
    placement_group = ray.util.get_current_placement_group()
    placement_group_id = placement_group.id.hex() if placement_group is not None else None

    def report(round_: int, metrics: dict[str, Any], booster: Any, final: bool = False) -> None:
        metrics = {**metrics, "placement_group_id": placement_group_id}
        attach = final or round_ % config.checkpoint_every == 0
        if attach and rank == 0:
            with tempfile.TemporaryDirectory() as folder:
                write_checkpoint_folder(folder, booster, state, final=final)
                name = f"checkpoint_{'final_' if final else ''}{round_:06d}"
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder), checkpoint_dir_name=name)
        else:
            ray.train.report(metrics)

    progress = _RoundCallback(
        num_boost_round=config.num_boost_round,
        stopping_rounds=config.early_stopping_rounds,
        report_every=config.report_every,
        state=state,
        report=report,
    )
    remaining = config.num_boost_round - state.round
    if state.final or remaining <= 0:
        # The run had finished; only its final report was lost.
        booster = init_model
        booster.best_iteration = state.best_round if config.early_stopping_rounds and not state.final else 0
    else:
        booster = lightgbm.train(
            params,
            train_set,
            num_boost_round=remaining,
            valid_sets=[valid_set],
            valid_names=[VALID_NAME],
            init_model=init_model,
            callbacks=[*config.callbacks, progress],
            keep_training_booster=True,
        )
    report(state.round, progress.metrics(final=True), booster, final=True)
    return {"rank": rank, "rows": int(len(y)), "validation_rows": int(len(yv))}


def _dataset(X: Any, y: Any, config: LoopConfig, reference: Any = None) -> lightgbm.Dataset:
    import lightgbm

    return lightgbm.Dataset(
        X,
        label=y,
        feature_name=config.features,
        categorical_feature=config.categorical or "auto",
        reference=reference,
        free_raw_data=True,
    )


def shard_to_numpy(shard: Any, features: list[str], label: str) -> tuple[np.ndarray, np.ndarray]:
    """Stream a Ray Data shard into a float32 feature matrix and a label vector.

    Nulls become NaN (LightGBM's missing value). Strings cannot be features: encode them as
    integer codes in the feature definition, so every worker and the online path agree.
    """
    import numpy as np
    import pyarrow as pa

    blocks, labels = [], []
    for batch in shard.iter_batches(batch_size=_BATCH_ROWS, batch_format="pyarrow"):
        if batch.num_rows:
            blocks.append(np.column_stack([numeric_column(batch, c, pa.float32()) for c in features]))
            labels.append(numeric_column(batch, label, pa.float32()))
    if not blocks:
        return np.empty((0, len(features)), dtype=np.float32), np.empty(0, dtype=np.float32)
    return np.concatenate(blocks), np.concatenate(labels)


def numeric_column(batch: Any, name: str, to: Any) -> Any:
    """Column ``name`` of an Arrow batch as a NumPy array of type ``to`` (a string column is a
    TypeError: LightGBM features must be numeric)."""
    import pyarrow as pa

    col = batch.column(name)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        raise TypeError(f"column {name!r} is a string; LightGBM features must be numeric (encode it as integer codes)")
    return col.cast(to, safe=False).to_numpy(zero_copy_only=False)


# ------------------------------------------------------------------------ checkpoints
def write_checkpoint_folder(folder: str, booster: Any, state: CheckpointState, *, final: bool) -> None:
    # A final model keeps the trees up to the best round; a periodic one keeps them all so
    # that training can continue from it.
    num_iteration = booster.best_iteration if final and booster.best_iteration > 0 else -1
    with open(os.path.join(folder, MODEL_FILE), "w") as f:
        f.write(booster.model_to_string(num_iteration=num_iteration))
    with open(os.path.join(folder, STATE_FILE), "w") as f:
        json.dump({**asdict(state), "final": final}, f)


def read_checkpoint_folder(folder: str) -> tuple[str, CheckpointState]:
    with open(os.path.join(folder, MODEL_FILE)) as f:
        model_text = f.read()
    with open(os.path.join(folder, STATE_FILE)) as f:
        state = CheckpointState(**json.load(f))
    return model_text, state


def read_checkpoint(path: str, filesystem: Any) -> tuple[lightgbm.Booster, CheckpointState]:
    """Load a checkpoint's booster and state from storage without copying the folder.

    A periodic checkpoint's model is cut to its best round, so any checkpoint gives the model
    that early stopping would keep at that point.
    """
    import lightgbm

    with filesystem.open_input_stream(f"{path}/{STATE_FILE}") as f:
        state = CheckpointState(**json.loads(f.read()))
    with filesystem.open_input_stream(f"{path}/{MODEL_FILE}") as f:
        booster = lightgbm.Booster(model_str=f.read().decode())
    if not state.final and 0 < state.best_round < booster.current_iteration():
        booster = lightgbm.Booster(model_str=booster.model_to_string(num_iteration=state.best_round))
    return booster, state


# ---------------------------------------------------------------------- single process
def train_local(
    frame_train: pd.DataFrame,
    frame_valid: pd.DataFrame,
    spec: TrainSpec,
    *,
    features: list[str] | None = None,
    num_threads: int | None = None,
) -> lightgbm.Booster:
    """Plain ``lightgbm.train`` in this process with the spec's params and early stopping:
    the baseline the distributed path is measured against (tests, benchmarks).

    Args:
        features: defaults to ``spec.features``.
        num_threads: LightGBM threads; None = LightGBM's default (all cores).

    Returns:
        The booster, cut to its best round when early stopping is on.
    """
    import lightgbm

    features = features or spec.features
    if not features:
        raise ValueError("train_local needs the feature columns: pass features= or set spec.features")
    config = LoopConfig.from_spec(spec, features)
    train_set = _dataset(_frame_matrix(frame_train, features), frame_train[spec.label].to_numpy(), config)
    valid_set = _dataset(
        _frame_matrix(frame_valid, features), frame_valid[spec.label].to_numpy(), config, reference=train_set
    )
    progress = _RoundCallback(
        num_boost_round=spec.num_boost_round,
        stopping_rounds=spec.early_stopping_rounds,
        report_every=spec.report_every,
        state=CheckpointState(),
        report=None,
    )
    return lightgbm.train(
        lightgbm_params(spec.params, num_threads),
        train_set,
        num_boost_round=spec.num_boost_round,
        valid_sets=[valid_set],
        valid_names=[VALID_NAME],
        callbacks=[progress],
    )


def _frame_matrix(frame: pd.DataFrame, features: list[str]) -> np.ndarray:
    import numpy as np

    return np.column_stack([frame[c].to_numpy(dtype=np.float32, na_value=np.nan) for c in features])
