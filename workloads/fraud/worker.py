"""What runs on each Ray Train worker of a fraud training run
(:func:`workloads.fraud.train.train_fraud` starts them): the epoch loop, one optimisation
step, the exact validation, and the collectives they use.

    TorchTrainer(train_loop, train_loop_config={"spec": spec.model_dump(mode="json"), "pos_weight": w}, ...)
    loss = train_step(model, optimizer, batch, autocast=autocast, pos_weight=pos_weight)

Each worker iterates its own shard of train (``streaming_split`` with equal shards: up to
``num_workers - 1`` rows sit out an epoch) with ``iter_torch_batches``; an Arrow collate
function turns a batch into the model's tensors. Validation is not sharded: every worker
scores every ``num_workers``-th batch of the whole split and the scores are gathered, so the
validation AUC is exact. After every epoch rank 0 writes a checkpoint
(:mod:`workloads.fraud.checkpoint`); a worker that starts with one resumes at the next epoch.
Ray ships :func:`train_loop` to the workers by its module path.
"""

from __future__ import annotations

import tempfile
import time
from typing import TYPE_CHECKING, Any

from mlplatform.errors import TrainingError
from workloads.fraud.checkpoint import read_optimizer, read_state, read_weights, write_checkpoint
from workloads.fraud.model import FraudTransformer
from workloads.fraud.spec import FraudSpec

if TYPE_CHECKING:
    import torch

__all__ = ["train_loop", "train_step"]


def train_loop(config: dict[str, Any]) -> None:
    """The loop every worker runs. ``config``: ``{"spec": FraudSpec as JSON, "pos_weight": float}``;
    starts from the run's last checkpoint when Ray Train hands one over."""
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
            model.load_state_dict(read_weights(folder), strict=True)
            saved_optimizer, state = read_optimizer(folder), read_state(folder)
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
                write_checkpoint(folder, plain, optimizer, history, step_losses, spec)
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
