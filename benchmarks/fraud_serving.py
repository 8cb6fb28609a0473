"""The fraud transformer's own serving path, without Ray: batched inference of the registered
model through its torch flavor's predictor, and the input builder that makes its input from
the online store.

    python benchmarks/fraud_serving.py                      # CPU fp32 and bf16; and the GPU's, when there is one
    python benchmarks/fraud_serving.py --seconds 5 --batches 1 32 256 1024
    python benchmarks/fraud_serving.py --threads 1 --no-builder
    python benchmarks/fraud_serving.py --no-predict --batches 1 8 32 --baseline-rev 6243a1d   # builder, old vs new

**Model.** A ``FraudTransformer`` of the fraud workload's default shape (``configs/fraud.yaml``:
``train.model``, K = ``sequences.max_events``), randomly initialised (speed does not depend on
the weights), registered with ``flavor_config`` in a registry on a temporary storage root and
loaded with ``platform.models.load_predictor("fraud", device=..., precision=...)``: the object
the model server holds.

**Inputs.** Real rows: the applicants of ``configs/fraud.yaml``'s ``data`` section, generated,
cut into behaviour sequences by ``sequences_from_tables`` (training's kernel), as the NumPy
arrays the model server hands the predictor (``online.input_arrays``). Call ``i`` of a point
takes the next ``batch`` rows (wrapping round).

**Timed.** ``predictor.predict(arrays)`` (for fp32, also ``predict (eager)``: the same
predictor with its recorded graphs off, ``torch_graphs``, interleaved; their scores are checked
equal byte for byte first): the inputs checked against the signature, copied to
the device, the forward pass under ``inference_mode`` (and ``torch.autocast(bfloat16)`` for
bf16, as the flavor runs ``precision="bf16"``), the sigmoid in FP64, the outputs copied back to
the host (on CUDA that copy waits for the kernels, so a call's time includes them). Each point:
``--warmup`` untimed calls, then calls back to back from one caller for ``--seconds`` (at least
``--min-calls``). samples/s = rows scored / wall time of the timed calls; p50 and p99 are per
call, i.e. per batch. bf16 runs on the CPU too (what ``serving.models[].precision: bf16`` asks
for there; ``auto`` is fp32 on a CPU): whether it pays depends on the CPU's bf16 support,
printed with the figures.

**Input builder** (``--no-builder`` skips it). The same applicants' applications, repayment
events and merchants loaded online (SQLite, the default online store) by the fraud workload's
own steps (``online_steps``), then ``serving_inputs(catalog, requests, signature)`` for batches
of real requests (applicant, merchant, amount and time of a generated application): what
``/v1/models/fraud/predict`` and a decision's fraud rule run before the model. Reported as
requests/s and p50/p99 per batch, then builder + predict (fp32, this CPU) together. A line
says whether the built arrays equal the training sequences' rows for the same requests.

**Side by side** (``--baseline-rev REV``): ``workloads/fraud/online.py`` as of git revision
``REV`` (read with ``git show``, loaded as a module of its own; the rest of the tree is the
current one) builds the same requests too, timed interleaved with the current builder at
each batch size (baseline, candidate, baseline + predict, candidate + predict), and its arrays
are compared with the current builder's byte for byte. E.g. ``--baseline-rev 6243a1d``: the
builder that cut windows with the Arrow kernel (``windows.query_sequences``), before the
NumPy one (``query_windows``). The machine is shared and noisy: read the ratios.

CPU ms/call is this process's CPU time (all threads) per timed call, less sensitive than
wall time to what else runs on the machine.

No Ray anywhere. Figures, not assertions.
"""

from __future__ import annotations

import argparse
import os
import platform as _host
import statistics
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FRAUD_CONFIG = ROOT / "configs" / "fraud.yaml"
FRAUD_PREFIX = "raw/fraud"


# ------------------------------------------------------------------------------- setup
def workload_config() -> dict[str, Any]:
    """``configs/fraud.yaml`` as a mapping (its ``data``, ``sequences`` and ``train.model``)."""
    import yaml

    return yaml.safe_load(FRAUD_CONFIG.read_text())


def register_fraud_model(platform: Any, shape: Mapping[str, Any] | None = None, *, seed: int = 0) -> int:
    """Register a randomly initialised ``FraudTransformer`` of ``shape`` (default: the fraud
    workload's, ``configs/fraud.yaml`` ``train.model``) as model ``fraud`` with its
    ``flavor_config``, and point ``production`` at it. Returns the version."""
    import torch

    from workloads.fraud.model import FraudTransformer, TransformerConfig, flavor_config

    shape = dict(shape if shape is not None else workload_config()["train"]["model"])
    torch.manual_seed(seed)
    model = FraudTransformer(TransformerConfig(**shape)).eval()
    mv = platform.models.register(
        "fraud", flavor="torch", model=model, flavor_config=flavor_config(model.config),
        lineage={}, metrics={}, params={"init": f"random, seed {seed}", **shape},
    )  # fmt: skip
    platform.models.set_alias("fraud", "production", mv.version)
    return mv.version


def generated_world(data: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The generated raw tables of ``data`` (a ``DataConfig`` mapping) in one shard, merchants included."""
    from workloads.underwriting.generate import (
        DataConfig,
        generate_merchants,
        generate_shard,
    )

    config = DataConfig(**{**dict(data), "shards": 1})
    return config, {**generate_shard(config, 0), "merchants": generate_merchants(config)}


def load_online(platform: Any, tables: Mapping[str, Any], prefix: str = FRAUD_PREFIX) -> None:
    """Publish ``tables`` under ``prefix`` and load the fraud views' online event state with
    the workload's own steps (``workloads.fraud.online.online_steps``)."""
    from mlplatform.jobs.steps import StepRunner
    from workloads.fraud.online import online_steps

    for name, table in tables.items():
        platform.datasets.publish(f"{prefix}/{name}", table)
    StepRunner(platform.storage).run_all(online_steps(platform, prefix=prefix))


def requests_of(sequences: Any, applications: Any) -> list[dict[str, Any]]:
    """The request of each sequence row: its applicant, and the merchant, amount and time of its application."""
    by_id = {r["application_id"]: r for r in applications.select(["application_id", "merchant_id", "amount"]).to_pylist()}
    return [
        {"applicant_id": r["applicant_id"], "merchant_id": by_id[r["application_id"]]["merchant_id"],
         "amount": by_id[r["application_id"]]["amount"], "timestamp": r["application_ts"]}
        for r in sequences.select(["application_id", "applicant_id", "application_ts"]).to_pylist()
    ]  # fmt: skip


# ------------------------------------------------------------------------------ timing
def batches_of(arrays: Mapping[str, np.ndarray], batch: int, count: int) -> list[dict[str, np.ndarray]]:
    """``count`` consecutive batches of ``batch`` rows (wrapping round), prepared before timing."""
    n = len(next(iter(arrays.values())))
    out = []
    for i in range(count):
        idx = np.arange(i * batch, (i + 1) * batch) % n
        out.append({k: np.ascontiguousarray(v[idx]) for k, v in arrays.items()})
    return out


def time_calls(call: Callable[[Any], Any], inputs: Sequence[Any], *, rows: int, seconds: float, min_calls: int,
               warmup: int) -> dict[str, float]:
    """Call ``call`` on ``inputs`` in turn: ``warmup`` untimed, then until ``seconds`` have
    passed and at least ``min_calls`` were made. Rows per second and per-call percentiles."""
    for i in range(warmup):
        call(inputs[i % len(inputs)])
    latencies: list[float] = []
    cpu = time.process_time()
    started = time.perf_counter()
    i = 0
    while True:
        t0 = time.perf_counter()
        call(inputs[i % len(inputs)])
        t1 = time.perf_counter()
        latencies.append(t1 - t0)
        i += 1
        if t1 - started >= seconds and i >= min_calls:
            break
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu
    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000
    return {"samples_s": rows * len(latencies) / wall, "p50": pick(0.50), "p99": pick(0.99), "calls": len(latencies),
            "mean": statistics.fmean(latencies) * 1000, "cpu_ms": cpu / len(latencies) * 1000}


def builder_at(rev: str) -> Callable[..., dict[str, np.ndarray]]:
    """``serving_inputs`` of ``workloads/fraud/online.py`` as of git revision ``rev``, loaded
    from ``git show`` as a module of its own (its imports resolve to the current tree)."""
    path = "workloads/fraud/online.py"
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, text=True, check=True).stdout
    module = types.ModuleType(f"fraud_online_at_{rev}")
    module.__file__ = f"{rev}:{path}"
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module.serving_inputs


# ------------------------------------------------------------------------------ machine
def cpu_description() -> str:
    """The CPU's model name, logical CPUs and whether it has bf16 instructions (AVX512-BF16 / AMX)."""
    name, flags = _host.processor() or "unknown CPU", set()
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        info = []
    for line in info:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            name = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
    bf16 = sorted(flags & {"avx512_bf16", "amx_bf16"})
    return f"{name}, {os.cpu_count()} logical CPUs, bf16 instructions: {', '.join(bf16) if bf16 else 'none'}"


# --------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256], help="batch sizes (rows per call)")
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per point")
    parser.add_argument("--min-calls", type=int, default=30, help="fewest timed calls per point")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls before each point")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    parser.add_argument("--no-builder", action="store_true", help="skip the input builder (no online store load)")
    parser.add_argument("--no-predict", action="store_true", help="skip the model-only points (predict at each device)")
    parser.add_argument("--baseline-rev", default=None, help="also time online.py's builder as of this git revision, interleaved")
    parser.add_argument("--root", default=None, help="storage root (default: a temporary directory)")
    args = parser.parse_args()

    import torch

    from mlplatform import Platform
    from workloads.fraud.online import input_arrays, serving_inputs
    from workloads.fraud.sequences import sequences_from_tables

    if args.threads:
        torch.set_num_threads(args.threads)
    spec = workload_config()
    k = int(spec["sequences"]["max_events"])
    shape = dict(spec["train"]["model"])
    root = Path(args.root or tempfile.mkdtemp(prefix="mlp-fraud-serving-bench-"))
    platform = Platform.from_config({"storage": {"root": str(root)}})

    started = time.perf_counter()
    config, tables = generated_world(spec["data"])
    sequences = sequences_from_tables(tables["applications"], tables["outcomes"], tables["repayment_events"], max_events=k,
                                      cutoff=config.end)
    arrays = input_arrays(sequences)
    version = register_fraud_model(platform, shape)
    n = len(arrays["event_type"])
    history = arrays["mask"].sum(axis=1)
    print(f"data: {config.applications:,} applications, {n:,} labelled sequences (K={k}; events per row: mean "
          f"{history.mean():.1f}, {np.mean(history == k):.0%} full) in {time.perf_counter() - started:.1f} s", flush=True)

    targets: list[tuple[str, str]] = [("cpu", "fp32"), ("cpu", "bf16")]
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    if gpu:
        targets += [("cuda", "fp32"), ("cuda", "bf16")]
    params = None
    rows: list[dict[str, Any]] = []
    for device, precision in [] if args.no_predict else targets:
        _, predictor = platform.models.load_predictor("fraud", version=version, device=device, precision=precision)
        params = params or sum(p.numel() for p in predictor.module.parameters())
        paths = [("predict", predictor)]
        if getattr(predictor, "graphs", None) is not None:  # also the same forward run eagerly, interleaved
            _, eager = platform.models.load_predictor("fraud", version=version, device=device, precision=precision)
            eager.graphs = None
            paths.append(("predict (eager)", eager))
        for batch in args.batches:
            inputs = batches_of(arrays, batch, max(1, min(64, -(-n // batch))))
            outputs = [p.predict(inputs[0])["probability"] for _, p in paths]
            if any(o.tobytes() != outputs[0].tobytes() for o in outputs):
                raise SystemExit(f"the recorded forward's scores differ from eager ones at batch {batch}")
            for path, model in paths:
                result = time_calls(model.predict, inputs, rows=batch, seconds=args.seconds, min_calls=args.min_calls,
                                    warmup=args.warmup)
                result.update(path=path, device=gpu if device == "cuda" else "cpu", precision=precision, batch=batch)
                rows.append(result)
                print(f"{path:15s} {device:4s} {precision} b={batch:4d}  {result['samples_s']:10.0f} samples/s  p50 "
                      f"{result['p50']:7.3f} ms  p99 {result['p99']:7.3f} ms  CPU {result['cpu_ms']:7.3f} ms/call  "
                      f"({result['calls']} calls)", flush=True)

    if not args.no_builder:
        from mlplatform.serving.catalog import FeatureCatalog

        started = time.perf_counter()
        load_online(platform, tables)
        print(f"online: the fraud views loaded into SQLite in {time.perf_counter() - started:.1f} s", flush=True)
        catalog = FeatureCatalog(platform.features)
        _, predictor = platform.models.load_predictor("fraud", version=version)
        signature = predictor.signature
        requests = requests_of(sequences, tables["applications"])
        check = min(n, 256)
        built = serving_inputs(catalog, requests[:check], signature)
        equal = np.ones(check, bool)
        for name, want in arrays.items():
            got = built[name]
            equal &= np.all((got == want[:check]).reshape(check, -1), axis=1)
        print(f"builder: its arrays equal the training sequences' rows for {int(equal.sum())} of {check} requests", flush=True)
        builders = [("", serving_inputs)]
        if args.baseline_rev:
            baseline = builder_at(args.baseline_rev)
            old = baseline(catalog, requests[:check], signature)
            same = list(old) == list(built) and all(
                old[k].dtype == built[k].dtype and old[k].tobytes() == built[k].tobytes() for k in built
            )
            print(f"builder at {args.baseline_rev}: its arrays {'equal' if same else 'DIFFER FROM'} the current "
                  f"builder's, byte for byte, for {check} requests", flush=True)
            builders.insert(0, (f" @{args.baseline_rev}", baseline))
        for batch in args.batches:
            calls = [[requests[(i * batch + j) % n] for j in range(batch)] for i in range(max(1, min(64, -(-n // batch))))]
            points = []
            for with_model in (False, True):
                for tag, builder in builders:
                    if with_model:
                        call = lambda rs, b=builder: predictor.predict(b(catalog, rs, signature))
                        points.append((f"builder{tag} + predict", "fp32", call))
                    else:
                        points.append((f"builder{tag} (SQLite)", "-", lambda rs, b=builder: b(catalog, rs, signature)))
            for path, precision, call in points:
                result = time_calls(call, calls, rows=batch, seconds=args.seconds, min_calls=args.min_calls, warmup=args.warmup)
                result.update(path=path, device="cpu", precision=precision, batch=batch)
                rows.append(result)
                print(f"{path:27s} b={batch:4d}  {result['samples_s']:10.0f} samples/s  p50 {result['p50']:7.3f} ms  "
                      f"p99 {result['p99']:7.3f} ms  CPU {result['cpu_ms']:7.3f} ms/call  ({result['calls']} calls)", flush=True)

    print()
    params = params or sum(p.numel() for p in platform.models.load_predictor("fraud", version=version)[1].module.parameters())
    print(f"Model: FraudTransformer {shape} ({params:,} parameters), K={k}, random weights; torch {torch.__version__}, "
          f"{torch.get_num_threads()} intra-op threads")
    print(f"CPU: {cpu_description()}")
    print(f"GPU: {gpu}" if gpu else "GPU: none (torch.cuda.is_available() is False)")
    print()
    print("| path | device | precision | batch | samples/s | p50 ms/batch | p99 ms/batch | CPU ms/call | calls |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['path']} | {r['device']} | {r['precision']} | {r['batch']} | {r['samples_s']:,.0f} | {r['p50']:.3f} | "
              f"{r['p99']:.3f} | {r['cpu_ms']:.3f} | {r['calls']} |")
    if args.baseline_rev and not args.no_builder:
        print()
        print(f"current / {args.baseline_rev} (samples/s; CPU per call):")
        for r in rows:
            if r["path"].startswith("builder @"):
                cand = next(c for c in rows if c["batch"] == r["batch"] and c["path"] == r["path"].replace(f" @{args.baseline_rev}", ""))
                print(f"  {cand['path']:17s} b={r['batch']:4d}  {cand['samples_s'] / r['samples_s']:.2f}x samples/s, "
                      f"{cand['cpu_ms'] / r['cpu_ms']:.2f}x CPU")
    platform.close()


if __name__ == "__main__":
    main()
