"""Hyperparameter search: Ray Tune trials, each launching a distributed LightGBM Train run.

    best = platform.training.tune(TuneSpec.load({
        "train": {"training_set": "underwriting_v1", "num_workers": 1},
        "search_space": {"learning_rate": {"loguniform": [0.01, 0.2]}, "num_leaves": {"randint": [15, 127]}},
        "num_samples": 16,
    }))
    best.booster, best.params, best.validation_auc

This is Ray Train V2's supported shape (``Tuner(trainer)`` is gone): each Tune trial is a
small *driver* function that builds a ``LightGBMTrainer`` for its sampled params and calls
``fit()``; ``ray.tune.integration.ray_train.TuneReportCallback`` forwards the Train run's
reports (every ``report_every`` rounds) to Tune, where ASHA compares trials at rungs counted
in reports and stops the weak ones (stopping a trial tears down its Train run).

Resources. A trial driver only waits on its Train controller, so it reserves no CPU (just
``_DRIVER_MEMORY`` of memory: Tune needs a non-empty reservation); the Train workers reserve
``num_workers * cpus_per_worker`` CPUs each. ``max_concurrent`` defaults to the cluster's
CPUs divided by that, so every running trial can get its workers at once. On a 2-CPU
machine that means trials of one 1-CPU worker run two at a time; trials of two workers
would run one at a time.

The train and validation splits are read and materialised once and shared by every trial.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray.tune

from mlplatform.errors import TrainingError
from mlplatform.training.spec import Distribution, TuneSpec

if TYPE_CHECKING:
    import lightgbm

    from mlplatform.features.training_sets import TrainingSetSnapshot
    from mlplatform.storage import Storage
    from mlplatform.training.api import Training
    from mlplatform.training.spec import TrainSpec

__all__ = ["TuneResult", "TuneTrial", "run_tune", "to_tune_space"]

TUNE = "training/tune"
_DRIVER_MEMORY = 64 * 1024 * 1024
_METRIC = "validation_auc"


@dataclass(frozen=True)
class TuneTrial:
    """One trial: its sampled params, its best validation AUC and how far it got."""

    trial_id: str
    config: dict[str, Any]
    validation_auc: float | None
    rounds: int
    reports: int
    error: str | None


@dataclass(frozen=True)
class TuneResult:
    """The search's outcome. ``spec`` is the base ``TrainSpec`` with the best params merged
    in: retrain it on more workers, or register ``booster`` (the best trial's model, cut to
    its best round) with the snapshot. ``best_round`` is the number of rounds ``booster``
    holds: the best round, or the last one for a trial that ran to the end without early
    stopping (its checkpoint keeps every round, and ``validation_auc`` is that model's)."""

    booster: lightgbm.Booster
    config: dict[str, Any]
    params: dict[str, Any]
    validation_auc: float
    best_round: int
    spec: TrainSpec
    trials: list[TuneTrial]
    snapshot: TrainingSetSnapshot
    checkpoint_uri: str
    experiment_uri: str
    max_concurrent: int
    wall_time_s: float


def to_tune_space(space: dict[str, Distribution]) -> dict[str, Any]:
    """The Ray Tune search space of validated distributions."""
    makers = {
        "uniform": ray.tune.uniform,
        "loguniform": ray.tune.loguniform,
        "randint": ray.tune.randint,
        "lograndint": ray.tune.lograndint,
    }
    out = {}
    for name, dist in space.items():
        out[name] = ray.tune.choice(list(dist.args)) if dist.kind == "choice" else makers[dist.kind](*dist.args)
    return out


def run_tune(training: Training, spec: TuneSpec) -> TuneResult:
    """Run the search; see the module docstring.

    Raises:
        TrainingError: every trial failed, or none reported a validation AUC.
    """
    import ray
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from mlplatform.training.api import prepare, unique_run_name
    from mlplatform.training.lightgbm import LoopConfig, read_checkpoint

    started = time.perf_counter()
    base = spec.train
    data = prepare(training, base)
    experiment = unique_run_name(base.run_name)
    per_trial = base.num_workers * base.cpus_per_worker
    max_concurrent = spec.max_concurrent or max(1, int(ray.cluster_resources().get("CPU", 1) // per_trial))

    trainable = ray.tune.with_parameters(
        _trial,
        base=base,
        loop=LoopConfig.from_spec(base, data.features),
        data=data,
        storage=training.storage,
        runs_key=f"{TUNE}/{experiment}/runs",
    )
    trainable = ray.tune.with_resources(trainable, {"cpu": 0, "memory": _DRIVER_MEMORY})
    storage = training.storage
    tuner = ray.tune.Tuner(
        trainable,
        param_space=to_tune_space(spec.search_space),
        tune_config=ray.tune.TuneConfig(
            metric=_METRIC,
            mode="max",
            num_samples=spec.num_samples,
            # The limit goes on the generator: Tune ignores max_concurrent_trials for one.
            search_alg=BasicVariantGenerator(max_concurrent=max_concurrent, random_state=spec.seed),
            scheduler=ASHAScheduler(
                time_attr="training_iteration",
                max_t=spec.max_reports,
                grace_period=spec.grace_period,
                reduction_factor=spec.reduction_factor,
            )
            if spec.scheduler == "asha"
            else FIFOScheduler(),
        ),
        run_config=ray.tune.RunConfig(
            name=experiment,
            storage_path=storage.path(TUNE),
            storage_filesystem=storage.arrow_fs,
            verbose=0,
            callbacks=[_ReleaseTrainWorkers()],
        ),
    )
    grid = tuner.fit()

    trials = [_trial_summary(r) for r in grid]
    scored = [(t, r) for t, r in zip(trials, grid, strict=True) if t.validation_auc is not None]
    if not scored:
        errors = "; ".join(f"{t.trial_id}: {t.error}" for t in trials if t.error) or "no trial reported"
        raise TrainingError(f"tuning {experiment!r} produced no validation AUC: {errors}")
    best_trial, best_result = max(scored, key=lambda pair: pair[0].validation_auc)
    path = _last_checkpoint_path(best_result)
    if path is None:
        raise TrainingError(f"tuning {experiment!r}: the best trial {best_trial.trial_id} saved no checkpoint")
    booster, _ = read_checkpoint(path, storage.arrow_fs)
    params = {**base.params, **best_trial.config}
    return TuneResult(
        booster=booster,
        config=dict(best_trial.config),
        params=params,
        validation_auc=float(best_trial.validation_auc),
        best_round=booster.current_iteration(),
        spec=base.model_copy(update={"params": params}),
        trials=trials,
        snapshot=data.snapshot,
        checkpoint_uri=storage.uri(storage.key_of(path)),
        experiment_uri=storage.uri(f"{TUNE}/{experiment}"),
        max_concurrent=max_concurrent,
        wall_time_s=time.perf_counter() - started,
    )


def _trial(
    config: dict[str, Any], *, base: TrainSpec, loop: Any, data: Any, storage: Storage, runs_key: str
) -> None:
    """One Tune trial: the driver of a Train run with the sampled params."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from mlplatform.training.api import build_trainer, fit_trainer

    params = {**base.params, **config}
    trainer = build_trainer(
        storage,
        base,
        data,
        # A checkpoint at every report, so the best trial's last report has its model.
        dataclasses.replace(loop, params=params, checkpoint_every=loop.report_every),
        run_name=ray.tune.get_context().get_trial_id(),
        storage_key=runs_key,
        callbacks=[TuneReportCallback()],
    )
    fit_trainer(trainer, ray.tune.get_context().get_trial_name())


class _ReleaseTrainWorkers(ray.tune.Callback):
    """Removes the worker placement group of every finished trial.

    When ASHA stops a trial (or a trial reaches ``max_t``), Tune kills the trial actor and with
    it the Train controller, before the controller can remove its workers' placement group.
    Placement groups live as long as the job, and Ray Train's own cleaner finds dead
    controllers through the State API, which needs the dashboard: without one (tests,
    ``include_dashboard=False``) the CPUs stay reserved and later trials time out waiting for
    workers. Each worker reports its placement group id; a moment after a trial ends (so its
    actor is surely gone and cannot start a replacement group) that group is removed. For a
    run that ended cleanly the group is already gone and removing it again does nothing.
    """

    grace_s = 2.0

    def __init__(self) -> None:
        self.pending: list[tuple[float, str]] = []

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._remember(trial)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._remember(trial)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        self._release(time.monotonic() - self.grace_s)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        self._release(float("inf"))

    def _remember(self, trial: Any) -> None:
        group = (trial.last_result or {}).get("placement_group_id")
        if group:
            self.pending.append((time.monotonic(), group))

    def _release(self, ended_before: float) -> None:
        from ray._raylet import PlacementGroupID
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        due = [g for t, g in self.pending if t <= ended_before]
        self.pending = [(t, g) for t, g in self.pending if t > ended_before]
        for group in due:
            try:
                remove_placement_group(PlacementGroup(PlacementGroupID(bytes.fromhex(group))))
            except Exception:  # noqa: BLE001 - already removed by its controller
                pass


def _trial_summary(result: Any) -> TuneTrial:
    metrics = result.metrics or {}
    auc = metrics.get(_METRIC)
    return TuneTrial(
        trial_id=metrics.get("trial_id") or result.path.rsplit("/", 1)[-1],
        config={k: v for k, v in (result.config or {}).items()},
        validation_auc=float(auc) if auc is not None else None,
        rounds=int(metrics.get("round", 0)),
        reports=int(metrics.get("training_iteration", 0)),
        error=str(result.error) if result.error else None,
    )


def _last_checkpoint_path(result: Any) -> str | None:
    frame = result.metrics_dataframe
    if frame is None or "checkpoint_path" not in frame:
        return (result.metrics or {}).get("checkpoint_path")
    paths = frame["checkpoint_path"].dropna()
    return str(paths.iloc[-1]) if len(paths) else None
