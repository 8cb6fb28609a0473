"""Train the fraud transformer data-parallel with Ray Train (``TorchTrainer``, DDP).

    result = train_fraud(platform, {"num_workers": 2, "epochs": 3, "batch_size": 256})
    result.history[-1]["val_auc"], result.samples_per_s
    model = result.model()                      # a fresh FraudTransformer with the final weights

The same code runs on CPUs (gloo) and GPUs (NCCL): ``use_gpu: true`` gives every worker one
GPU, Ray Train picks the NCCL backend, and ``precision: bf16`` runs the forward pass under
``torch.autocast(<device>, dtype=torch.bfloat16)`` (weights, gradients and the optimizer
stay float32). Nothing else changes.

Data. The train and validation splits of the sequences dataset (see ``sequences``) are read
with Ray Data and, by default, materialised in the object store before the workers start:
then the workers can hold every CPU (2 workers on a 2-CPU machine) without starving Ray
Data's read tasks, and each epoch streams blocks from the object store. Only train is split
over the workers; how each worker iterates its shard and scores the whole validation split
is in :mod:`workloads.fraud.worker` (its :func:`train_step` is importable from here too).

Checkpoints. After every epoch rank 0 writes one under ``<storage root>/training/fraud/<run>/``
(the files: :mod:`workloads.fraud.checkpoint`); a restarted worker group resumes from the
last checkpoint at the next epoch.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from mlplatform.errors import DataError, TrainingError
from workloads.fraud.checkpoint import STATE_FILE, WEIGHTS_FILE
from workloads.fraud.model import FraudTransformer, TransformerConfig, flops_per_sample
from workloads.fraud.sequences import SEQUENCE_COLUMNS
from workloads.fraud.spec import FraudSpec
from workloads.fraud.worker import train_loop, train_step

if TYPE_CHECKING:
    import torch

    from mlplatform.platform import Platform

__all__ = ["FraudResult", "FraudSpec", "train_fraud", "train_step"]

RUNS = "training/fraud"
_INPUT_COLUMNS = [*SEQUENCE_COLUMNS, "app_category", "app_log_amount", "default"]


@dataclass(frozen=True)
class FraudResult:
    """A finished run. ``history`` holds one dict per epoch: ``epoch`` (from 1), ``train_loss``
    (mean over steps and workers), ``val_auc``, ``val_loss`` (unweighted log loss),
    ``samples_per_s`` (train rows per second over all workers, excluding validation), ``steps``.
    ``step_losses`` is the loss of every step, averaged over workers. ``samples_per_s`` is
    over the whole run; ``flops_per_sample`` is ``model.flops_per_sample(spec.model)``."""

    state_dict: dict[str, torch.Tensor]
    config: TransformerConfig
    spec: FraudSpec
    history: list[dict[str, float]]
    step_losses: list[float]
    samples_per_s: float
    flops_per_sample: float
    pos_weight: float
    dataset_version: int
    weights_uri: str
    checkpoint_uri: str
    run_uri: str
    wall_time_s: float
    timings: dict[str, float] = field(default_factory=dict)

    def model(self) -> FraudTransformer:
        """A fresh model in eval mode with the final weights."""
        model = FraudTransformer(self.config)
        model.load_state_dict(self.state_dict, strict=True)
        return model.eval()


def train_fraud(platform: Platform, spec: FraudSpec | Mapping[str, Any]) -> FraudResult:
    """Train the fraud transformer on the ``train`` split, scoring ``validation`` every epoch.

        result = train_fraud(platform, FraudSpec(num_workers=4, use_gpu=True, precision="bf16"))

    Loss: ``BCEWithLogits`` with ``pos_weight`` (default: negatives / positives of the train
    split). Optimizer: AdamW. Every epoch each worker takes its shard in batches of
    ``batch_size`` (the global batch is ``batch_size × num_workers``), then all workers score
    their part of the validation split and rank 0 reports and checkpoints.

    Raises:
        ConfigError: the spec is invalid.
        NotFoundError: the dataset or its version does not exist.
        DataError: a split is empty or has one class only, or the data's K exceeds the
            model's ``max_events``.
        TrainingError: the run failed after ``max_failures`` restarts.
    """
    import ray.train
    from ray.data.expressions import col
    from ray.train.torch import TorchTrainer

    from mlplatform.models.artifacts import deserialize

    spec = FraudSpec.load(spec)
    started = time.perf_counter()
    platform.ray()
    datasets = platform.datasets
    manifest = datasets.get(spec.dataset, spec.dataset_version)
    k = manifest.metadata.get("max_events")
    if k is not None and k > spec.model.max_events:
        raise DataError(
            f"dataset {spec.dataset!r} v{manifest.version} holds {k} events per row but model.max_events is "
            f"{spec.model.max_events}; set model.max_events >= {k}"
        )
    full = datasets.read(spec.dataset, manifest.version, columns=[*_INPUT_COLUMNS, "split"])
    splits = {s: full.filter(expr=col("split") == s).select_columns(_INPUT_COLUMNS) for s in ("train", "validation")}
    if spec.materialize:
        splits = {s: ds.materialize() for s, ds in splits.items()}
    rows = {s: ds.count() for s, ds in splits.items()}
    for name, n in rows.items():
        if n == 0:
            raise DataError(f"dataset {spec.dataset!r} v{manifest.version} has no {name!r} rows")
    pos_weight = spec.pos_weight
    if pos_weight is None:
        positives = int(splits["train"].sum("default") or 0)
        if positives in (0, rows["train"]):
            raise DataError(
                f"the train split of {spec.dataset!r} v{manifest.version} has {positives} defaults in "
                f"{rows['train']} rows: one class only; set pos_weight or use more data"
            )
        pos_weight = (rows["train"] - positives) / positives
    prepared = time.perf_counter()

    run_name = f"{spec.run_name}-{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    storage = platform.storage
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"spec": spec.model_dump(mode="json"), "pos_weight": pos_weight},
        scaling_config=ray.train.ScalingConfig(
            num_workers=spec.num_workers,
            use_gpu=spec.use_gpu,
            resources_per_worker={"CPU": spec.cpus_per_worker, **({"GPU": 1} if spec.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage.path(RUNS),
            storage_filesystem=storage.arrow_fs,
            failure_config=ray.train.FailureConfig(max_failures=spec.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        datasets=splits,
        # Only train is sharded (equal shards, so up to num_workers - 1 rows sit out each
        # epoch); validation must be scored whole, see workloads.fraud.worker._validate.
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise TrainingError(f"fraud training run {run_name!r} failed (max_failures={spec.max_failures}): {exc}") from exc
    fitted = time.perf_counter()
    if result.checkpoint is None:
        raise TrainingError(f"fraud training run {run_name!r} finished without a checkpoint; see the worker logs")
    fs, folder = result.checkpoint.filesystem, result.checkpoint.path
    with fs.open_input_stream(f"{folder}/{WEIGHTS_FILE}") as f:
        state_dict = deserialize("torch", f.read())
    with fs.open_input_stream(f"{folder}/{STATE_FILE}") as f:
        state = json.loads(f.read())
    history = state["history"]
    seconds = sum(h["train_seconds"] for h in history)
    samples = sum(h["samples"] for h in history)
    done = time.perf_counter()
    checkpoint_key = storage.key_of(folder)
    return FraudResult(
        state_dict=state_dict,
        config=spec.model,
        spec=spec,
        history=history,
        step_losses=state["step_losses"],
        samples_per_s=samples / seconds if seconds > 0 else float("nan"),
        flops_per_sample=flops_per_sample(spec.model),
        pos_weight=float(pos_weight),
        dataset_version=manifest.version,
        weights_uri=storage.uri(f"{checkpoint_key}/{WEIGHTS_FILE}"),
        checkpoint_uri=storage.uri(checkpoint_key),
        run_uri=storage.uri(f"{RUNS}/{run_name}"),
        wall_time_s=done - started,
        timings={"prepare_s": prepared - started, "fit_s": fitted - prepared, "load_s": done - fitted},
    )

