"""The fraud workload as steps (``mlp run configs/fraud.yaml``).

    generate → sequences → apply → event log → online events → train → evaluate → register

``generate`` writes the synthetic lender data under ``raw/fraud`` (its own prefix, so the
underwriting workload's data under the same storage root is left alone); ``sequences``
builds the point-in-time behaviour sequences with Ray Data; ``apply``, ``event log`` and
``online events`` publish the applicants' behaviour events as a stream (offline log and
online event state, ``workloads.fraud.online``) so the served model builds its input from
the online store with the same kernel; ``train`` trains the transformer
data-parallel with Ray Train (checkpoints under the storage root); ``evaluate`` scores the
validation and test splits with the trained weights on Ray Data, through the torch flavor's
predictor (the path serving takes); ``register`` stores the weights in the model registry
(flavor ``torch``: safetensors, never pickle) with the model's class, config and signature
(``model.flavor_config``), the figures as metrics and the run's lineage. Each step is skipped
when it is up to date.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from mlplatform.jobs.steps import Done, Step
from workloads.fraud.online import online_steps
from workloads.fraud.sequences import SequenceConfig
from workloads.fraud.spec import FraudSpec
from workloads.underwriting.generate import DataConfig
from workloads.underwriting.pipeline import generate_step

if TYPE_CHECKING:
    import pyarrow as pa

    from mlplatform.platform import Platform

log = logging.getLogger(__name__)
RAW_PREFIX = "raw/fraud"


class Config(BaseModel):
    """The fraud workload file's sections (configs/fraud.yaml)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data: DataConfig = Field(
        default_factory=lambda: DataConfig(applications=4000, merchants=50, seed=3),
        description="Synthetic lender data (the underwriting generator), written under raw/fraud.",
    )
    sequences: SequenceConfig = Field(
        default_factory=lambda: SequenceConfig(source=RAW_PREFIX, max_events=16),
        description="How the behaviour sequences are cut (source defaults to raw/fraud).",
    )
    train: FraudSpec = Field(default_factory=FraudSpec, description="The Ray Train run (workers, epochs, model shape).")
    model_name: str = Field(default="fraud", pattern=r"^[a-z][a-z0-9_-]{0,63}$", description="Registered model name.")


def sequences_step(platform: Platform, config: Config) -> Step:
    """Build and publish the sequences dataset (value: its ``DatasetVersion``)."""
    from workloads.fraud.sequences import build_sequences

    datasets = platform.datasets
    cut = config.sequences

    def done(version: Any) -> Done:
        splits = sorted(version.metadata.get("splits", {}), key=("train", "validation", "test").index)
        return Done(
            summary=f"K={version.metadata.get('max_events')}, splits {', '.join(splits)}",
            rows=version.rows,
            where=f"{platform.storage.uri(cut.dataset)} v{version.version}",
            output={"version": version.version},
            value=version,
        )

    def inputs() -> dict[str, Any]:
        sources = [f"{cut.source}/{t}" for t in ("applications", "outcomes", "repayment_events")]
        return {
            "config": cut.model_dump(mode="json"),
            "sources": {n: datasets.get(n).version if datasets.exists(n) else None for n in sources},
        }

    def reuse(output: Any) -> Done | None:
        if not datasets.exists(cut.dataset) or datasets.get(cut.dataset).version != output.get("version"):
            return None
        return done(datasets.get(cut.dataset))

    return Step("sequences", lambda: done(build_sequences(platform, cut)), inputs=inputs, reuse=reuse)


def model_steps(platform: Platform, config: Config) -> Iterator[Step]:
    """Train, evaluate and register; each hands the next what it made (weights, figures)."""
    storage = platform.storage
    state: dict[str, Any] = {}
    spec = config.train.model_copy(update={"dataset": config.sequences.dataset})

    def dataset_version() -> int:
        return platform.datasets.get(spec.dataset, spec.dataset_version).version

    # ----------------------------------------------------------------- train
    def trained(output: dict[str, Any]) -> Done:
        state["trained"] = output
        return Done(
            summary=(
                f"{output['epochs']} epochs on {spec.num_workers} workers, validation AUC {output['val_auc']:.4f}, "
                f"{output['samples_per_s']:,.0f} samples/s"
            ),
            where=storage.uri(output["run"]),
            output=output,
            value=output,
        )

    def train() -> Done:
        from workloads.fraud.train import train_fraud

        result = train_fraud(platform, spec.model_copy(update={"dataset_version": dataset_version()}))
        last = result.history[-1]
        return trained(
            {
                "weights": storage.key_of(result.weights_uri),
                "run": storage.key_of(result.run_uri),
                "checkpoint": storage.key_of(result.checkpoint_uri),
                "dataset_version": result.dataset_version,
                "epochs": len(result.history),
                "val_auc": last["val_auc"],
                "val_loss": last["val_loss"],
                "samples_per_s": result.samples_per_s,
                "pos_weight": result.pos_weight,
            }
        )

    def train_reuse(output: Any) -> Done | None:
        if not isinstance(output, dict) or not storage.exists(output.get("weights", "")):
            return None
        return trained(output)

    yield Step(
        "train",
        train,
        inputs=lambda: {"spec": spec.model_dump(mode="json"), "dataset_version": dataset_version()},
        reuse=train_reuse,
    )

    # -------------------------------------------------------------- evaluate
    def evaluated(metrics: dict[str, float]) -> Done:
        state["metrics"] = metrics
        return Done(
            summary=(
                f"test AUC {metrics['test_auc']:.4f}, KS {metrics['test_ks']:.3f}, Brier {metrics['test_brier']:.4f}, "
                f"log loss {metrics['test_log_loss']:.4f} (default rate {metrics['test_base_rate']:.3f}); "
                f"validation AUC {metrics['validation_auc']:.4f}"
            ),
            rows=int(metrics["test_rows"] + metrics["validation_rows"]),
            output=metrics,
            value=metrics,
        )

    def evaluate() -> Done:
        trained_output = _need(state, "trained", "train")
        weights = storage.read_bytes(trained_output["weights"])
        return evaluated(_evaluate(platform, spec, trained_output["dataset_version"], weights))

    yield Step(
        "evaluate",
        evaluate,
        inputs=lambda: {"trained": _need(state, "trained", "train")},
        reuse=lambda output: evaluated(output) if isinstance(output, dict) else None,
    )

    # -------------------------------------------------------------- register
    def registered(version: Any) -> Done:
        return Done(
            summary=f"{version.name} v{version.version}, flavor {version.flavor}",
            where=version.uri,
            output={"version": version.version},
            value=version,
        )

    def register() -> Done:
        from mlplatform.models.artifacts import deserialize
        from workloads.fraud.model import flavor_config

        trained_output = _need(state, "trained", "train")
        weights = deserialize("torch", storage.read_bytes(trained_output["weights"]))
        version = platform.models.register(
            config.model_name,
            flavor="torch",
            model=weights,
            flavor_config=flavor_config(spec.model),
            lineage={
                "training_set": {"name": spec.dataset, "version": trained_output["dataset_version"]},
                "run_uri": storage.uri(trained_output["run"]),
                "checkpoint_uri": storage.uri(trained_output["checkpoint"]),
            },
            metrics={**_need(state, "metrics", "evaluate"), "samples_per_s": trained_output["samples_per_s"]},
            params=spec.model_dump(mode="json"),
            description="Behaviour-sequence transformer: probability that a checkout loan defaults.",
        )
        return registered(version)

    def register_reuse(output: Any) -> Done | None:
        from mlplatform.errors import NotFoundError

        try:
            return registered(platform.models.get(config.model_name, output["version"]))
        except (NotFoundError, KeyError, TypeError):
            return None

    yield Step(
        "register",
        register,
        inputs=lambda: {"trained": _need(state, "trained", "train"), "metrics": _need(state, "metrics", "evaluate")},
        reuse=register_reuse,
    )


def steps(platform: Platform, config: Config) -> Iterator[Step]:
    """The workload's steps, in order (the workload contract: see ``mlplatform.jobs.workload``)."""
    platform.storage.check_reachable()
    yield generate_step(platform, config.data, prefix=config.sequences.source, target=config.sequences.source)
    yield sequences_step(platform, config)
    # the model's input served: the same events in the streams' logs and the online event state
    yield from online_steps(platform, prefix=config.sequences.source)
    yield from model_steps(platform, config)


# ---------------------------------------------------------------------- evaluation
def _evaluate(platform: Platform, spec: FraudSpec, version: int, weights: bytes) -> dict[str, float]:
    """Figures of the model on the validation and test splits, scored on the cluster (only
    labels and scores come back to the driver)."""
    import numpy as np
    from ray.data.expressions import col

    from mlplatform.evaluation.metrics import evaluate

    columns = ["split", "default", *_score_columns()]
    ds = platform.datasets.read(spec.dataset, version, columns=columns)
    scored = ds.filter(expr=col("split") != "train").map_batches(
        functools.partial(_score, config=spec.model, weights=weights, batch_size=spec.batch_size),
        batch_format="pyarrow",
    )
    frame = scored.to_pandas()
    metrics: dict[str, float] = {}
    for split in ("validation", "test"):
        part = frame[frame["split"] == split]
        ev = evaluate(part["default"].to_numpy(dtype=np.int8), part["score"].to_numpy())
        metrics.update(
            {
                f"{split}_rows": float(ev.n),
                f"{split}_base_rate": ev.base_rate,
                f"{split}_auc": ev.auc,
                f"{split}_ks": ev.ks,
                f"{split}_brier": ev.brier,
                f"{split}_log_loss": ev.log_loss,
            }
        )
    return metrics


def _score_columns() -> list[str]:
    from workloads.fraud.sequences import SEQUENCE_COLUMNS

    return [*SEQUENCE_COLUMNS, "app_category", "app_log_amount"]


def _score(batch: pa.Table, *, config: Any, weights: bytes, batch_size: int) -> pa.Table:
    """Probability of default for each row of a batch (a Ray Data task), by the torch
    flavor's predictor built from the flavor config ``register`` records: the path serving
    takes, so the figures are those of the model as it will be served."""
    import numpy as np
    import pyarrow as pa

    from mlplatform.models.flavors import get_flavor
    from workloads.fraud.model import flavor_config
    from workloads.fraud.sequences import to_tensors

    flavor = get_flavor("torch")
    predictor = flavor.load({flavor.model_file: weights}, flavor_config(config))
    scores = [np.empty(0)]
    for start in range(0, batch.num_rows, batch_size):
        inputs = to_tensors(batch.slice(start, batch_size))
        inputs.pop("label", None)
        scores.append(predictor.predict({name: tensor.numpy() for name, tensor in inputs.items()})["probability"])
    score = np.concatenate(scores)
    return pa.table({"split": batch.column("split"), "default": batch.column("default"), "score": pa.array(score)})


def _need(state: dict[str, Any], key: str, step: str) -> Any:
    if key not in state:
        from mlplatform.errors import ConfigError

        raise ConfigError(f"the fraud {step!r} step has not run in this job; run the whole workload (mlp run)")
    return state[key]
