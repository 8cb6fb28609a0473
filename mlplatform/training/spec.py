"""What a training or tuning run is asked to do: pydantic specs, YAML-facing and strict.

    spec = TrainSpec.load({"training_set": "underwriting_v1", "params": {"num_leaves": 63}})
    tune_spec = TuneSpec.load({
        "train": {"training_set": "underwriting_v1", "num_workers": 1},
        "search_space": {"learning_rate": {"loguniform": [0.01, 0.2]},
                         "num_leaves": {"randint": [15, 127]},
                         "min_data_in_leaf": {"choice": [20, 50, 100]}},
        "num_samples": 16,
    })

A workload YAML holds these under ``train:`` and ``tune:``. Unknown keys and bad values raise
``ConfigError`` naming the field and echoing the value. Importing this module needs neither Ray
nor LightGBM.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from mlplatform.config import format_validation_error
from mlplatform.errors import ConfigError

__all__ = ["DEFAULT_PARAMS", "Distribution", "TrainSpec", "TuneSpec"]

#: LightGBM parameters for binary credit scoring; ``TrainSpec.params`` is merged over these.
DEFAULT_PARAMS: dict[str, Any] = {
    "objective": "binary",
    "learning_rate": 0.05,
    "num_leaves": 31,
    "min_data_in_leaf": 100,
    "feature_fraction": 0.9,
    "bagging_fraction": 0.8,
    "bagging_freq": 1,
    "lambda_l2": 1.0,
    "max_bin": 255,
    "seed": 7,
    "verbosity": -1,
}

# LightGBM parameters (with their aliases) that the platform sets itself: distributed
# networking, threads, the number of rounds, early stopping and the evaluation metric.
_RESERVED: dict[str, str] = {
    **dict.fromkeys(
        ["num_iterations", "num_iteration", "n_iter", "num_tree", "num_trees", "num_round", "num_rounds",
         "nrounds", "num_boost_round", "n_estimators", "max_iter"],
        "use the spec's num_boost_round",
    ),
    **dict.fromkeys(
        ["early_stopping_round", "early_stopping_rounds", "early_stopping", "n_iter_no_change"],
        "use the spec's early_stopping_rounds",
    ),
    **dict.fromkeys(
        ["tree_learner", "tree", "tree_type", "tree_learner_type", "num_machines", "num_machine", "machines",
         "workers", "nodes", "machine_list_filename", "machine_list_file", "machine_list", "mlist",
         "local_listen_port", "local_port", "port", "pre_partition", "is_pre_partition"],
        "the platform sets LightGBM's distributed parameters from num_workers",
    ),
    **dict.fromkeys(
        ["num_threads", "num_thread", "nthread", "nthreads", "n_jobs"],
        "use the spec's cpus_per_worker",
    ),
    **dict.fromkeys(
        ["metric", "metrics", "metric_types", "first_metric_only"],
        "validation AUC is the platform's metric (early stopping and tuning use it)",
    ),
}

Scalar = bool | int | float | str
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @classmethod
    def load(cls: type[_S], source: Mapping[str, Any] | _S, where: str | None = None) -> _S:
        """Validate a mapping (e.g. a YAML section) into this spec; a spec passes through.

        Raises:
            ConfigError: a key is unknown or a value is bad; the message names each field.
        """
        if isinstance(source, cls):
            return source
        if not isinstance(source, Mapping):
            raise ConfigError(f"{where or cls.__name__} must be a mapping, got {type(source).__name__}: {source!r}")
        try:
            return cls.model_validate(dict(source))
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, where or cls.__name__)) from None


_S = TypeVar("_S", bound=_Spec)


def _no_repeats(columns: list[str]) -> None:
    repeated = sorted({c for i, c in enumerate(columns) if c in columns[:i]})
    if repeated:
        raise ValueError(f"columns listed twice: {repeated}")


def _check_params(params: Mapping[str, Any]) -> None:
    for key in params:
        if key in _RESERVED:
            raise ValueError(f"LightGBM parameter {key!r} is set by the platform: {_RESERVED[key]}")


class TrainSpec(_Spec):
    """One distributed LightGBM training run on a training-set snapshot.

    Rounds are counted from 1. Every ``report_every`` rounds (and at the end) each worker
    reports the validation AUC; every ``checkpoint_every`` rounds rank 0 also saves the model
    text as a checkpoint, from which a restarted run continues boosting. Early stopping
    watches the validation AUC: training stops when ``early_stopping_rounds`` rounds pass
    without improvement (any increase counts), and the final model keeps only the trees up to
    the best round.
    """

    training_set: str = Field(pattern=_NAME, description="Snapshot name: the dataset training_sets/<name>.")
    training_set_version: PositiveInt | None = Field(default=None, description="Snapshot version; None = latest.")
    label: str = Field(default="default", min_length=1, description="Label column (0/1).")
    features: list[str] | None = Field(
        default=None,
        min_length=1,
        description="Feature columns; None = every feature the snapshot records (view:feature refs, by feature name).",
    )
    categorical: list[str] = Field(
        default_factory=list, description="Features LightGBM treats as categorical (non-negative integer codes)."
    )
    params: dict[str, Scalar | list[Scalar]] = Field(
        default_factory=dict, description="LightGBM parameters, merged over DEFAULT_PARAMS."
    )
    num_boost_round: PositiveInt = Field(default=300, description="Most boosting rounds.")
    early_stopping_rounds: PositiveInt | None = Field(
        default=30, description="Stop after this many rounds without a better validation AUC; None = never."
    )
    num_workers: PositiveInt = Field(default=2, description="Ray Train workers, each with a shard of the train split.")
    cpus_per_worker: PositiveInt = Field(default=1, description="CPUs (and LightGBM threads) per worker.")
    use_gpu: bool = Field(default=False, description="Reserve one GPU per worker (set params.device_type too).")
    report_every: PositiveInt = Field(default=25, description="Report validation AUC every this many rounds.")
    checkpoint_every: PositiveInt | None = Field(
        default=None, description="Checkpoint every this many rounds (a multiple of report_every); None = report_every."
    )
    max_failures: Annotated[int, Field(ge=-1)] = Field(
        default=2, description="Worker-group restarts from the last checkpoint before giving up; -1 = unlimited."
    )
    name: str | None = Field(default=None, pattern=_NAME, description="Run name; None = the training-set name.")

    @field_validator("params")
    @classmethod
    def _params(cls, value: dict[str, Any]) -> dict[str, Any]:
        _check_params(value)
        return {**DEFAULT_PARAMS, **value}

    # Cross-field checks are field validators (reading fields declared earlier from
    # info.data) so that the error names the field at fault.
    @field_validator("features")
    @classmethod
    def _features(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        if value is not None:
            _no_repeats(value)
            if info.data.get("label") in value:
                raise ValueError(f"the label {info.data['label']!r} cannot also be a feature")
        return value

    @field_validator("categorical")
    @classmethod
    def _categorical(cls, value: list[str], info: ValidationInfo) -> list[str]:
        _no_repeats(value)
        features = info.data.get("features")
        missing = [c for c in value if features is not None and c not in features]
        if missing:
            raise ValueError(f"categorical columns {missing} are not in features")
        return value

    @field_validator("use_gpu")
    @classmethod
    def _gpu(cls, value: bool, info: ValidationInfo) -> bool:
        params = info.data.get("params") or {}
        if value and params.get("device_type", params.get("device")) not in ("gpu", "cuda"):
            raise ValueError("needs params.device_type 'cuda' or 'gpu' (and a LightGBM build with GPU support)")
        return value

    @field_validator("checkpoint_every")
    @classmethod
    def _checkpoint_every(cls, value: int | None, info: ValidationInfo) -> int | None:
        report_every = info.data.get("report_every")
        if value is not None and report_every and value % report_every:
            raise ValueError(
                f"must be a multiple of report_every ({report_every}): checkpoints are attached to reports"
            )
        return value

    @property
    def checkpoint_interval(self) -> int:
        return self.checkpoint_every or self.report_every

    @property
    def run_name(self) -> str:
        return self.name or self.training_set


_KINDS = ("choice", "lograndint", "loguniform", "randint", "uniform")


class Distribution(_Spec):
    """One dimension of a search space, written in YAML as a one-key mapping::

        learning_rate: {loguniform: [0.01, 0.2]}   # low > 0
        feature_fraction: {uniform: [0.6, 1.0]}
        num_leaves: {randint: [15, 127]}           # integers, upper bound exclusive (as in Ray Tune)
        min_data_in_leaf: {lograndint: [10, 1000]}
        max_bin: {choice: [63, 255]}
    """

    kind: Literal["choice", "lograndint", "loguniform", "randint", "uniform"]
    args: list[Scalar] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _one_key(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and set(data) != {"kind", "args"}:
            if len(data) != 1:
                raise ValueError("write one distribution as a one-key mapping, e.g. {loguniform: [0.01, 0.2]}")
            ((kind, args),) = data.items()
            if kind not in _KINDS:
                raise ValueError(f"unknown distribution {kind!r}: use one of {', '.join(_KINDS)}")
            if not isinstance(args, list):
                raise ValueError(f"{kind} takes a list, e.g. {{{kind}: [low, high]}}")
            return {"kind": kind, "args": args}
        if not isinstance(data, Mapping):
            raise ValueError(f"expected a one-key mapping such as {{uniform: [0.5, 1.0]}}, got {data!r}")
        return data

    @model_validator(mode="after")
    def _bounds(self) -> Distribution:
        if self.kind == "choice":
            return self
        if len(self.args) != 2 or any(isinstance(a, (bool, str)) for a in self.args):
            raise ValueError(f"{self.kind} takes two numbers [low, high]")
        low, high = self.args
        if self.kind in ("randint", "lograndint") and not (isinstance(low, int) and isinstance(high, int)):
            raise ValueError(f"{self.kind} takes two integers [low, high)")
        if not low < high:
            raise ValueError(f"{self.kind} needs low < high")
        if self.kind.startswith("log") and low <= 0:
            raise ValueError(f"{self.kind} needs low > 0")
        return self


class TuneSpec(_Spec):
    """A hyperparameter search: ``train`` is the base run, ``search_space`` samples LightGBM
    params over it, ASHA stops weak trials at reports (rungs count reports, not rounds)."""

    train: TrainSpec = Field(description="The base training run each trial varies.")
    search_space: dict[str, Distribution] = Field(min_length=1, description="LightGBM param -> distribution.")
    num_samples: PositiveInt = Field(default=8, description="Trials to sample.")
    metric: Literal["validation_auc"] = Field(
        default="validation_auc", description="Maximised: each trial's best validation AUC so far."
    )
    scheduler: Literal["asha", "fifo"] = Field(
        default="asha", description="asha stops weak trials at rungs; fifo runs every trial to the end."
    )
    grace_period: PositiveInt = Field(default=1, description="ASHA: reports every trial gets before it can be stopped.")
    reduction_factor: Annotated[int, Field(ge=2)] = Field(default=3, description="ASHA: keep 1/this at each rung.")
    max_concurrent: PositiveInt | None = Field(
        default=None, description="Trials at once; None = cluster CPUs / (num_workers * cpus_per_worker)."
    )
    seed: int | None = Field(default=None, description="Seed of the random search, for a repeatable sweep.")

    @field_validator("search_space")
    @classmethod
    def _space(cls, value: dict[str, Distribution]) -> dict[str, Distribution]:
        _check_params(value)
        return value

    @field_validator("grace_period")
    @classmethod
    def _grace_period(cls, value: int, info: ValidationInfo) -> int:
        train = info.data.get("train")
        if train is not None:
            reports = -(-train.num_boost_round // train.report_every)
            if value > reports:
                raise ValueError(f"more than the {reports} reports a trial makes (train.num_boost_round / report_every)")
        return value

    @property
    def max_reports(self) -> int:
        return -(-self.train.num_boost_round // self.train.report_every)
