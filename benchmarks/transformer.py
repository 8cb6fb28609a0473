"""Fraud transformer throughput: training samples/s and model-FLOPs utilisation (MFU).

    python benchmarks/transformer.py                         # GPU if there is one: bf16, batch 4096
    python benchmarks/transformer.py --device cpu --steps 5  # CPU smoke run: fp32, batch 256
    python benchmarks/transformer.py --d-model 512 --heads 8 --layers 6 --ff 2048   # compute-bound shape
    python benchmarks/transformer.py --ray --workers 1       # through TorchTrainer (use_gpu on a GPU)

Micro-benchmark (default): synthetic sequences in the published layout (``sequences.to_tensors``
of a synthetic table, already on the device), then ``--warmup`` untimed and ``--steps`` timed
training steps of ``FraudTransformer`` (forward under autocast when bf16, BCE-with-logits,
backward, AdamW), synchronised before the clock stops. No Ray, no data loading: this is the
model's own speed.

``--ray``: the same shape through the platform's path. A synthetic sequences dataset is
published under a temporary storage root and ``train_fraud`` runs ``--epochs`` epochs on
``--workers`` TorchTrainer workers (``use_gpu`` on a GPU, NCCL; gloo on CPU), on a local Ray
started with ``num_cpus=--ray-cpus``. Its samples/s include Ray Data ingest and DDP, exclude
validation, and are what ``FraudResult.samples_per_s`` reports.

MFU = achieved model FLOP/s ÷ peak FLOP/s, with achieved = samples/s × ``flops_per_sample``
(forward + backward = 3 × the forward matmul FLOPs; the formula is in
``workloads.fraud.model.flops_per_sample``) and the peak per GPU (× workers with ``--ray``).
The peak comes from ``--peak-tflops``, or by default from ``torch.cuda.get_device_name()``:
dense bf16 TFLOP/s, no sparsity (``PEAK_BF16_TFLOPS``). Unknown GPUs and CPUs have no default,
and then MFU is printed only if ``--peak-tflops`` is given.

The small default model (d_model 64, 2 layers) is far from compute-bound on a GPU: expect a
low MFU from kernel-launch overhead; ``--compile`` and a wider model show what the hardware
can do.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from workloads.fraud.sequences import CATEGORIES, output_schema

# Dense (no sparsity) bf16 tensor-core peak per GPU, TFLOP/s, from NVIDIA's datasheets.
# Matched in order against torch.cuda.get_device_name(); first match wins.
PEAK_BF16_TFLOPS: list[tuple[tuple[str, ...], float]] = [
    (("H200",), 989.0),  # H200 SXM
    (("H100", "HBM3"), 989.0),  # H100 SXM5 ("NVIDIA H100 80GB HBM3")
    (("H100", "SXM"), 989.0),
    (("H100", "PCIe"), 756.0),
    (("A100",), 312.0),
]


def default_peak_tflops(device_name: str) -> float | None:
    for words, tflops in PEAK_BF16_TFLOPS:
        if all(w.lower() in device_name.lower() for w in words):
            return tflops
    return None


def synthetic_table(rows: int, max_events: int, seed: int = 0, positive_rate: float = 0.08) -> pa.Table:
    """Rows in the published sequences layout: random history lengths, right-aligned."""
    rng = np.random.default_rng(seed)
    k = max_events
    lengths = rng.integers(0, k + 1, rows)
    mask = np.arange(k)[None, :] >= (k - lengths)[:, None]
    event_type = np.where(mask, rng.integers(1, 6, (rows, k)), 0).astype(np.int8)
    category = np.where(mask & (event_type == 1), rng.integers(2, len(CATEGORIES), (rows, k)), 0).astype(np.int8)
    log_amount = np.where(mask, rng.normal(5.0, 1.0, (rows, k)), 0).astype(np.float32)
    days_before = np.where(mask, np.sort(rng.exponential(60.0, (rows, k)), axis=1)[:, ::-1] + 0.01, 0)
    days_past_due = np.where(mask & (event_type >= 4), rng.choice([5, 30, 60, 90], (rows, k)), 0).astype(np.float32)
    ts = 1_704_067_200_000_000 + np.arange(rows, dtype=np.int64) * 1_000_000
    split = np.where(np.arange(rows) < 0.85 * rows, "train", "validation")

    def fsl(values: np.ndarray) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(values.ravel()), k)

    return pa.Table.from_arrays(
        [
            pa.array([f"syn-{i:09d}" for i in range(rows)]),
            pa.array(rng.integers(1, rows // 4 + 2, rows), pa.int64()),
            pa.array(ts, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            pa.array((rng.random(rows) < positive_rate).astype(np.int8)),
            pa.array(split),
            pa.array(rng.integers(2, len(CATEGORIES), rows).astype(np.int8)),
            pa.array(rng.normal(5.0, 1.0, rows).astype(np.float32)),
            fsl(event_type),
            fsl(category),
            fsl(log_amount),
            fsl(days_before.astype(np.float32)),
            fsl(days_past_due),
            fsl(mask),
        ],
        schema=output_schema(k),
    )


def model_config(args: argparse.Namespace):  # noqa: ANN201 - TransformerConfig
    from workloads.fraud.model import TransformerConfig

    return TransformerConfig(
        d_model=args.d_model, heads=args.heads, layers=args.layers, ff=args.ff, dropout=0.1, max_events=args.max_events
    )


def micro(args: argparse.Namespace, device: str, precision: str) -> dict:
    import torch

    from workloads.fraud.model import FraudTransformer
    from workloads.fraud.sequences import to_tensors
    from workloads.fraud.train import train_step

    torch.manual_seed(0)
    config = model_config(args)
    model = FraudTransformer(config).to(device).train()
    step_model = torch.compile(model) if args.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device == "cuda")
    batches = []
    for i in range(args.distinct_batches):
        inputs = to_tensors(synthetic_table(args.batch_size, args.max_events, seed=i))
        batches.append({k: v.to(device) for k, v in inputs.items()})
    pos_weight = torch.tensor(10.0, device=device)
    autocast = {"device_type": device, "dtype": torch.bfloat16, "enabled": precision == "bf16"}

    def step(i: int) -> torch.Tensor:
        batch = dict(batches[i % len(batches)])  # a copy: train_step takes the label out
        return train_step(step_model, optimizer, batch, autocast=autocast, pos_weight=pos_weight)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for i in range(args.warmup):
        step(i)
    sync()
    started = time.perf_counter()
    for i in range(args.steps):
        loss = step(i)
    sync()
    seconds = time.perf_counter() - started
    return {
        "samples_per_s": args.steps * args.batch_size / seconds,
        "seconds": seconds,
        "last_loss": float(loss.item()),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def through_ray(args: argparse.Namespace, device: str, precision: str) -> dict:
    import ray

    from mlplatform import Platform
    from workloads.fraud.train import FraudSpec, train_fraud

    rows = args.ray_rows or args.batch_size * args.workers * max(args.steps, 4)
    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        with tempfile.TemporaryDirectory(prefix="fraud-bench-") as root:
            platform = Platform.from_config({"storage": {"root": root}})
            platform.datasets.publish(
                "training_sets/fraud_sequences_synthetic",
                synthetic_table(rows, args.max_events),
                metadata={"max_events": args.max_events},
            )
            spec = FraudSpec(
                dataset="training_sets/fraud_sequences_synthetic",
                num_workers=args.workers,
                use_gpu=device == "cuda",
                cpus_per_worker=min(1.0, args.ray_cpus / args.workers),
                epochs=args.epochs,
                batch_size=args.batch_size,
                precision=precision,
                model=model_config(args),
                shuffle_buffer=0,
                run_name="bench",
            )
            result = train_fraud(platform, spec)
    finally:
        ray.shutdown()
    return {
        "samples_per_s": result.samples_per_s,
        "rows": rows,
        "epochs": [
            {k: h[k] for k in ("epoch", "samples_per_s", "train_loss", "val_auc", "train_seconds")}
            for h in result.history
        ],
        "wall_time_s": result.wall_time_s,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto", help="auto: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--batch-size", type=int, help="rows per step (per worker with --ray); default 4096 GPU, 256 CPU")
    parser.add_argument("--steps", type=int, default=50, help="timed steps (micro-benchmark)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (micro-benchmark)")
    parser.add_argument("--distinct-batches", type=int, default=4, help="synthetic batches cycled through")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--ff", type=int, default=128)
    parser.add_argument("--max-events", type=int, default=32, help="K")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (micro-benchmark)")
    parser.add_argument("--peak-tflops", type=float, help="peak FLOP/s of one device, in TFLOP/s (default: by GPU name)")
    parser.add_argument("--ray", action="store_true", help="run through train_fraud / TorchTrainer instead")
    parser.add_argument("--workers", type=int, default=1, help="TorchTrainer workers (--ray); one GPU each on a GPU")
    parser.add_argument("--epochs", type=int, default=2, help="epochs (--ray); the first includes warm-up")
    parser.add_argument("--ray-rows", type=int, help="rows of the synthetic dataset (--ray)")
    parser.add_argument("--ray-cpus", type=int, default=2, help="num_cpus of the local Ray (--ray)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU (is this a CPU build of torch?)")
    precision = args.precision if args.precision != "auto" else ("bf16" if device == "cuda" else "fp32")
    args.batch_size = args.batch_size or (4096 if device == "cuda" else 256)
    if not args.ray and device == "cpu" and args.steps == 50 and args.warmup == 10:
        args.steps, args.warmup = 10, 2  # a CPU run is a smoke test
    device_name = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    peak = args.peak_tflops or (default_peak_tflops(device_name) if device == "cuda" else None)

    from workloads.fraud.model import flops_per_sample

    config = model_config(args)
    flops = flops_per_sample(config)
    figures = through_ray(args, device, precision) if args.ray else micro(args, device, precision)
    devices = args.workers if args.ray else 1
    achieved = figures["samples_per_s"] * flops
    figures.update({
        "mode": "ray" if args.ray else "micro",
        "device": device_name,
        "precision": precision,
        "batch_size": args.batch_size,
        "model": config.to_json(),
        "flops_per_sample": flops,
        "achieved_tflops": achieved / 1e12,
        "peak_tflops_per_device": peak,
        "devices": devices,
        "mfu": achieved / (peak * 1e12 * devices) if peak else None,
        "torch": torch.__version__,
    })  # fmt: skip
    mfu = f"{figures['mfu']:.2%}" if figures["mfu"] is not None else "n/a (no --peak-tflops)"
    print(
        f"{figures['mode']} {device_name} {precision} batch {args.batch_size}: "
        f"{figures['samples_per_s']:,.0f} samples/s, {figures['achieved_tflops']:.3f} TFLOP/s "
        f"({flops / 1e6:.1f} MFLOP/sample), MFU {mfu}"
    )
    print(json.dumps(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
