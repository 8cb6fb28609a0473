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
Data's read tasks, and each epoch streams blocks from the object store. Each worker
iterates its own shard of train (``streaming_split`` with equal shards: up to
``num_workers - 1`` rows sit out an epoch) with ``iter_torch_batches``; an Arrow collate
function turns a batch into the model's tensors. Validation is not sharded: every worker
scores every ``num_workers``-th batch of the whole split and the scores are gathered, so the
validation AUC is exact.

Checkpoints. After every epoch rank 0 writes a checkpoint under
``<storage root>/training/fraud/<run>/``: ``model.safetensors`` (the unwrapped state dict),
``optimizer.safetensors`` + ``state.json`` (optimizer tensors, its hyper-parameters, the
epoch and the history). Nothing is pickled; a restarted worker group resumes from the last
checkpoint at the next epoch.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt, ValidationError

from mlplatform.config import format_validation_error
from mlplatform.errors import ConfigError, DataError, TrainingError
from workloads.fraud.model import FraudTransformer, TransformerConfig, flops_per_sample
from workloads.fraud.sequences import DATASET, SEQUENCE_COLUMNS

if TYPE_CHECKING:
    import torch

    from mlplatform.platform import Platform

__all__ = ["FraudResult", "FraudSpec", "train_fraud"]

RUNS = "training/fraud"
WEIGHTS_FILE = "model.safetensors"
_OPTIMIZER_FILE = "optimizer.safetensors"
_STATE_FILE = "state.json"
_INPUT_COLUMNS = [*SEQUENCE_COLUMNS, "app_category", "app_log_amount", "default"]


class FraudSpec(BaseModel):
    """One training run of the fraud transformer (``train:`` in a fraud workload config)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str = Field(default=DATASET, description="Sequences dataset (see workloads.fraud.sequences).")
    dataset_version: PositiveInt | None = Field(default=None, description="Dataset version; None = latest.")
    num_workers: PositiveInt = Field(default=2, description="Ray Train workers (DDP ranks).")
    use_gpu: bool = Field(default=False, description="One GPU per worker; NCCL instead of gloo.")
    cpus_per_worker: PositiveFloat = Field(default=1.0, description="CPUs each worker holds.")
    epochs: PositiveInt = Field(default=3, description="Passes over the train split.")
    batch_size: PositiveInt = Field(default=256, description="Rows per step on each worker.")
    lr: PositiveFloat = Field(default=1e-3, description="AdamW learning rate.")
    weight_decay: float = Field(default=0.01, ge=0, description="AdamW weight decay.")
    pos_weight: PositiveFloat | None = Field(
        default=None, description="Weight of the positive class in the loss; None = negatives / positives in train."
    )
    precision: Literal["fp32", "bf16"] = Field(default="fp32", description="bf16 = autocast the forward pass.")
    model: TransformerConfig = Field(default_factory=TransformerConfig, description="Transformer shape.")
    shuffle_buffer: NonNegativeInt = Field(
        default=16_384, description="Rows in each worker's local shuffle buffer (0 = stored order)."
    )
    materialize: bool = Field(
        default=True, description="Materialise the splits before training (see the module docstring); False = stream."
    )
    seed: int = Field(default=7, ge=0, description="Seed of the weights' initialisation and the shuffle.")
    max_failures: NonNegativeInt = Field(default=0, description="Worker-group restarts (from the last checkpoint).")
    run_name: str = Field(default="fraud", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$", description="Run name prefix.")

    @classmethod
    def load(cls, source: FraudSpec | Mapping[str, Any]) -> FraudSpec:
        """Validate a mapping into a spec (a spec passes through).

        Raises:
            ConfigError: a key is unknown or a value is bad; the message names each field.
        """
        if isinstance(source, cls):
            return source
        if not isinstance(source, Mapping):
            raise ConfigError(f"FraudSpec must be a mapping, got {type(source).__name__}: {source!r}")
        try:
            return cls.model_validate(dict(source))
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, "FraudSpec")) from None


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
        _train_loop,
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
        # epoch); validation must be scored whole, see _validate.
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
    with fs.open_input_stream(f"{folder}/{_STATE_FILE}") as f:
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


# ------------------------------------------------------------------- the worker's loop
def _train_loop(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch
    from ray.data.collate_fn import ArrowBatchCollateFn

    from workloads.fraud.sequences import to_tensors

    class Collate(ArrowBatchCollateFn):
        def __call__(self, batch: Any) -> dict[str, torch.Tensor]:
            return to_tensors(batch)

    spec = FraudSpec.model_validate(config["spec"])
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(spec.seed)
    device = ray.train.torch.get_device()

    model = FraudTransformer(spec.model)
    history: list[dict[str, float]] = []
    step_losses: list[float] = []
    checkpoint = ray.train.get_checkpoint()
    saved_optimizer = None
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            model.load_state_dict(_read_weights(folder), strict=True)
            saved_optimizer, state = _read_optimizer(folder), _read_state(folder)
        history, step_losses = state["history"], state["step_losses"]
    model = ray.train.torch.prepare_model(model)  # to the device; DDP when there are 2+ workers
    plain = getattr(model, "module", model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    if saved_optimizer is not None:
        optimizer.load_state_dict(saved_optimizer)  # after the move, so its tensors land on the device
    pos_weight = torch.tensor(config["pos_weight"], device=device)
    autocast = {"device_type": device.type, "dtype": torch.bfloat16, "enabled": spec.precision == "bf16"}
    collate = Collate()
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation")
    shuffle = max(spec.shuffle_buffer, spec.batch_size) if spec.shuffle_buffer else None

    for epoch in range(len(history), spec.epochs):
        model.train()
        losses, samples = [], 0
        started = time.perf_counter()
        for batch in train_shard.iter_torch_batches(
            batch_size=spec.batch_size,
            collate_fn=collate,
            local_shuffle_buffer_size=shuffle,
            local_shuffle_seed=(spec.seed * 1_000_003 + epoch) * 1_009 + rank if shuffle else None,
        ):
            samples += len(batch["label"])
            losses.append(train_step(model, optimizer, batch, autocast=autocast, pos_weight=pos_weight))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        epoch_losses = _mean_over_workers(losses, device)
        total_samples = _reduce(float(samples), "sum", device)
        slowest = _reduce(seconds, "max", device)
        val_auc, val_loss = _validate(plain, val_shard, autocast, 4 * spec.batch_size, device)
        step_losses += epoch_losses
        history.append({
            "epoch": epoch + 1,
            "train_loss": sum(epoch_losses) / len(epoch_losses) if epoch_losses else float("nan"),
            "val_auc": val_auc,
            "val_loss": val_loss,
            "samples": total_samples,
            "train_seconds": slowest,
            "samples_per_s": total_samples / slowest if slowest > 0 else float("nan"),
            "steps": len(epoch_losses),
        })  # fmt: skip
        metrics = dict(history[-1])
        if rank == 0:
            with tempfile.TemporaryDirectory() as folder:
                _write_checkpoint(folder, plain, optimizer, history, step_losses, spec)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        else:
            ray.train.report(metrics)


def train_step(model: Any, optimizer: Any, batch: dict[str, Any], *, autocast: dict, pos_weight: Any) -> torch.Tensor:
    """One optimisation step on a collated batch (its ``label`` is taken out): forward under
    ``torch.autocast(**autocast)``, weighted BCE on float32 logits, backward, step. The
    detached loss. ``benchmarks/transformer.py`` times exactly this."""
    import torch

    label = batch.pop("label")
    with torch.autocast(**autocast):
        logits = model(**batch)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), label, pos_weight=pos_weight)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _validate(model: Any, shard: Any, autocast: dict, batch_size: int, device: Any) -> tuple[float, float]:
    """AUC and log loss of ``model`` on the whole validation split, exactly.

    Every worker holds the whole (unsplit) split and scores every ``world``-th batch, then all
    (label, logit) pairs are gathered. A split shard would not do: ``streaming_split`` with
    equal shards drops up to ``world - 1`` rows.
    """
    import numpy as np
    import torch
    import torch.distributed as dist

    from mlplatform.evaluation.metrics import auc
    from workloads.fraud.sequences import to_tensors

    rank, world = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
    model.eval()
    labels, logits = [], []
    with torch.no_grad():
        for i, table in enumerate(shard.iter_batches(batch_size=batch_size, batch_format="pyarrow")):
            if i % world != rank:
                continue
            batch = {k: v.to(device, non_blocking=True) for k, v in to_tensors(table).items()}
            labels.append(batch.pop("label"))
            with torch.autocast(**autocast):
                logits.append(model(**batch).float())
    empty = torch.empty(0, device=device)
    y = _gather(torch.cat(labels) if labels else empty, device).cpu().numpy()
    z = _gather(torch.cat(logits) if logits else empty, device).cpu().numpy().astype(np.float64)
    if len(y) == 0 or not np.isfinite(z).all():
        return float("nan"), float("nan")
    # log loss from logits, stably: log(1 + e^-z) for y=1, log(1 + e^z) for y=0
    loss = float(np.mean(np.logaddexp(0.0, np.where(y > 0.5, -z, z))))
    return auc(y.astype(np.int8), z), loss


# ------------------------------------------------------------------ collectives
def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _reduce(value: float, op: str, device: Any) -> float:
    import torch
    import torch.distributed as dist

    if not _distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return float(t.item())


def _mean_over_workers(losses: list[torch.Tensor], device: Any) -> list[float]:
    """Each step's loss averaged over workers (equal shards give every worker the same steps)."""
    import torch
    import torch.distributed as dist

    t = torch.stack(losses).double() if losses else torch.empty(0, dtype=torch.float64, device=device)
    if _distributed():
        steps = int(_reduce(float(len(t)), "max", device))
        fewest = -int(_reduce(-float(len(t)), "max", device))
        if steps != fewest:
            raise TrainingError(f"workers took between {fewest} and {steps} steps in one epoch; shards must be equal")
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t = t / dist.get_world_size()
    return t.cpu().tolist()


def _gather(t: torch.Tensor, device: Any) -> torch.Tensor:
    """All workers' 1-D tensors, concatenated in rank order (lengths may differ)."""
    import torch
    import torch.distributed as dist

    if not _distributed():
        return t
    world = dist.get_world_size()
    length = torch.tensor([len(t)], dtype=torch.int64, device=device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    longest = int(max(int(n.item()) for n in lengths))
    padded = torch.zeros(longest, dtype=t.dtype, device=device)
    padded[: len(t)] = t
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(n.item())] for p, n in zip(parts, lengths)])


# ------------------------------------------------------------------ checkpoint files
def _write_checkpoint(
    folder: str, model: Any, optimizer: Any, history: list, step_losses: list, spec: FraudSpec
) -> None:
    from safetensors.torch import save_file

    from mlplatform.models.artifacts import serialize

    with open(os.path.join(folder, WEIGHTS_FILE), "wb") as f:
        f.write(serialize("torch", model))
    # The optimizer as plain data: its tensors in safetensors, its hyper-parameters in JSON.
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in opt["state"].items():
        for name, value in values.items():
            if hasattr(value, "detach"):
                tensors[f"{index}.{name}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    save_file(tensors, os.path.join(folder, _OPTIMIZER_FILE))
    state = {
        "epoch": len(history),
        "history": history,
        "step_losses": step_losses,
        "model": spec.model.to_json(),
        "spec": spec.model_dump(mode="json"),
        "optimizer": {"param_groups": opt["param_groups"], "scalars": scalars},
    }
    with open(os.path.join(folder, _STATE_FILE), "w") as f:
        json.dump(state, f, allow_nan=True)


def _read_weights(folder: str) -> dict[str, Any]:
    from mlplatform.models.artifacts import deserialize

    with open(os.path.join(folder, WEIGHTS_FILE), "rb") as f:
        return deserialize("torch", f.read())


def _read_state(folder: str) -> dict[str, Any]:
    with open(os.path.join(folder, _STATE_FILE)) as f:
        return json.load(f)


def _read_optimizer(folder: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    saved = _read_state(folder)["optimizer"]
    state: dict[int, dict[str, Any]] = {}
    for key, value in [*load_file(os.path.join(folder, _OPTIMIZER_FILE)).items(), *saved["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": saved["param_groups"]}
