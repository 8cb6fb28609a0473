"""What one decision costs in the platform's own code, without Serve, HTTP or a load generator:
the same objects a serving replica builds (catalog, model watcher, policy, idempotency store,
decision engine, decision log on local disk), driven in micro-batches in this process.

    python benchmarks/decision_cost.py                    # batches of 1 and 4, 2000 decisions each
    python benchmarks/decision_cost.py --batch 8 --decisions 4000 --profile
    python benchmarks/decision_cost.py --monitoring --rounds 3   # serving metrics off/on, interleaved
    python benchmarks/decision_cost.py --two-models --rounds 3   # without and with the fraud rule, interleaved
    python benchmarks/decision_cost.py --two-models --baseline-rev 40a1870 --rounds 3   # that tree's code, then this one's

Per decision it reports the CPU time of this process (all threads: the log's writer included)
and the wall time of each phase: ``validate`` (pydantic, from JSON bytes), ``decide``
(idempotency lookup, online features, score, policy, reasons), ``log`` (validated, encoded,
fsynced) and ``commit`` (the idempotency record). Data and model are those of
``benchmarks/serving.py`` (same applicants, merchants and model), so the figures explain that
benchmark's decision endpoint. ``--profile`` prints cProfile's top functions.
``--monitoring`` runs each batch size twice per round, without and with the serving metrics'
observer (``ServedValues.add`` on each scored batch, ``take`` on a thread every second as a
replica's flush thread does; the Ray metric calls of the flush are not included).
``--two-models`` runs each batch size twice per round, the decision alone and with the fraud
transformer consulted through a model rule, as ``benchmarks/serving.py``'s ``decision2``: its
world and model (``setup_fraud``), a ``ServedModel`` in this process scored on the engine's
rule threads, one torch thread (as Ray gives a replica of under 2 CPUs).
``--baseline-rev REV`` runs the measurement in two processes per round, alternately: the
platform's code (``mlplatform``, ``workloads``) as of git revision ``REV`` (a ``git worktree``
put first on ``PYTHONPATH``), then the current tree's; this script and its data are the
current ones in both. Each process builds its own data and model (same seeds).
"""

import argparse
import asyncio
import cProfile
import json
import os
import pstats
import random
import sys
import tempfile
import threading
from datetime import UTC, datetime
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import serving as bench  # noqa: E402  (benchmarks/serving.py: data, model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="micro-batch sizes")
    parser.add_argument("--decisions", type=int, default=2000, help="decisions per batch size")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top 40 functions (slows everything)")
    parser.add_argument("--monitoring", action="store_true", help="each batch size without and with the serving metrics' observer")
    parser.add_argument("--two-models", action="store_true", help="each batch size without and with the fraud model's rule")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the measurements (interleaved) this many times")
    parser.add_argument("--baseline-rev", default=None, help="also run the platform's code as of this git revision, alternately")
    args = parser.parse_args()
    if args.baseline_rev:
        side_by_side(args)
        return

    from mlplatform.serving.catalog import FeatureCatalog
    from mlplatform.serving.decisions.log import DecisionLog
    from mlplatform.serving.engine import DecisionEngine, Job
    from mlplatform.serving.idempotency import open_idempotency_store, pending_marker
    from mlplatform.decision_policy import DecisionPolicy
    from mlplatform.serving.metrics import ServedValues
    from mlplatform.serving.schemas import DecisionRequest
    from mlplatform.serving.scoring import ModelWatcher, scorer_loader

    root = Path(tempfile.mkdtemp(prefix="mlp-decision-cost-"))
    os.environ.setdefault("MLP_BENCH_KEY", bench.KEY)
    platform = bench.build_platform(root, None)
    bench.train(platform)
    catalog = FeatureCatalog(platform.features)
    load = scorer_loader(platform.models, catalog, "underwriting", "underwriting_v1", set(DecisionRequest.model_fields))
    watcher = ModelWatcher(platform.models, "underwriting", load=load, aliases=("production",), poll_s=60.0)
    watcher.poll()
    idempotency = open_idempotency_store(platform.config, catalog.online_store)
    engine = DecisionEngine(watcher=watcher, catalog=catalog, policy=DecisionPolicy.model_validate({}))
    engines = {False: engine}
    if args.two_models:
        import torch

        from mlplatform.served_models import ServedModelConfig
        from mlplatform.serving.model_server.served import ServedModel

        torch.set_num_threads(1)
        rule = bench.setup_fraud(platform)["rule"]
        fraud = ServedModel(ServedModelConfig(name="fraud"), models=platform.models, catalog=catalog, poll_s=60.0)
        fraud.start()
        engines[True] = DecisionEngine(watcher=watcher, catalog=catalog, policy=DecisionPolicy.model_validate({"model_rules": [rule]}),
                                       rule_models={"fraud": fraud}, rule_deadlines_s={"fraud": 10.0})
    log = DecisionLog(platform.storage, spool_dir=str(root / "spool"), replica_id="cost-1", group_commit_ms=0)
    counter = iter(range(10**12))

    def body() -> bytes:
        return json.dumps({"application_id": f"c-{next(counter)}", "applicant_id": random.randrange(bench.APPLICANTS),
                           "merchant_id": random.randrange(bench.MERCHANTS), "amount": random.randint(20, 900) + 0.5,
                           "currency": "USD", "term": 4, "timestamp": datetime.now(UTC).isoformat()}).encode()

    async def run(n: int, size: int, phases: dict[str, float], two: bool = False) -> int:
        engine = engines[two]
        declines = 0
        for _ in range(n // size):
            t0 = time.perf_counter()
            jobs = [Job(DecisionRequest.model_validate_json(body()), time.perf_counter()) for _ in range(size)]
            t1 = time.perf_counter()
            idempotency.reserve_many([(j.request.application_id, pending_marker("cost-1")) for j in jobs])
            outcomes, _ = engine.decide(jobs)
            if two and not any(o.record["rule_models"] and '"scored"' in o.record["rule_models"] for o in outcomes):
                raise SystemExit(f"the fraud rule did not score: {outcomes[0].record['rule_models']}")
            t2 = time.perf_counter()
            await asyncio.gather(*(log.append(o.record) for o in outcomes))
            t3 = time.perf_counter()
            idempotency.put_if_absent_many([(j.request.application_id, o.answer) for j, o in zip(jobs, outcomes)])
            t4 = time.perf_counter()
            declines += sum(o.decision == "decline" for o in outcomes)
            for name, seconds in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                phases[name] += seconds
        return declines

    import mlplatform

    print(f"{os.cpu_count()} CPUs; {args.decisions} decisions per batch size; load avg {os.getloadavg()[0]:.1f}; "
          f"code from {Path(mlplatform.__file__).parent.parent}")
    served = ServedValues()
    flushing, stop = threading.Event(), threading.Event()

    def flush() -> None:
        while not stop.wait(1.0):
            if flushing.is_set():
                served.take()

    threading.Thread(target=flush, daemon=True).start()
    both = (False, True)
    variants = [(size, on, two) for _ in range(args.rounds) for size in args.batch
                for on in (both if args.monitoring else (False,)) for two in (both if args.two_models else (False,))]
    for size, on, two in variants:
        engines[two].observer = served.add if on else None
        if on:
            flushing.set()
        else:
            flushing.clear()
        asyncio.run(run(200, size, dict.fromkeys(("validate", "decide", "log", "commit"), 0.0), two))  # warm up
        phases = dict.fromkeys(("validate", "decide", "log", "commit"), 0.0)
        profile = cProfile.Profile() if args.profile else None
        cpu, wall = time.process_time(), time.perf_counter()
        if profile:
            profile.enable()
        declines = asyncio.run(run(args.decisions, size, phases, two))
        if profile:
            profile.disable()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        n = args.decisions // size * size
        shown = "  ".join(f"{k} {v / n * 1000:.3f}" for k, v in phases.items())
        label = (" metrics on " if on else " metrics off") if args.monitoring else ""
        label += (" two models" if two else " one model ") if args.two_models else ""
        print(f"batch {size:3d}{label}: CPU {cpu / n * 1000:.3f} ms/decision, wall {wall / n * 1000:.3f} ms/decision, "
              f"declines {declines / n:.0%}; phases (wall ms/decision): {shown}", flush=True)
        if profile:
            pstats.Stats(profile).sort_stats("cumulative").print_stats(40)
    stop.set()
    log.close()
    platform.close()


def side_by_side(args: argparse.Namespace) -> None:
    """Rounds of: this script (one round, same measurements) on ``args.baseline_rev``'s code,
    then on the current tree's; each process's result lines are printed under its label."""
    import shutil
    import subprocess

    rev, rounds = args.baseline_rev, args.rounds
    repo = Path(__file__).resolve().parent.parent
    tree = Path(tempfile.mkdtemp(prefix="mlp-baseline-"))
    subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", str(tree), rev], check=True, capture_output=True)
    argv = ["--batch", *map(str, args.batch), "--decisions", str(args.decisions),
            *(["--two-models"] if args.two_models else []), *(["--monitoring"] if args.monitoring else [])]
    try:
        for r in range(1, rounds + 1):
            for label, path in ((f"baseline {rev}", str(tree)), ("current", "")):
                env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (path, os.environ.get("PYTHONPATH", "")) if p)}
                done = subprocess.run([sys.executable, __file__, *argv], env=env, capture_output=True, text=True, cwd=repo)
                lines = [line for line in done.stdout.splitlines() if line.startswith(("batch", f"{os.cpu_count()} CPUs"))]
                lines = lines if len(lines) > 1 else [*lines, done.stderr[-2000:]]
                for line in lines:
                    print(f"round {r} {label:>18s}: {line}", flush=True)
    finally:
        subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)], capture_output=True)
        shutil.rmtree(tree, ignore_errors=True)


if __name__ == "__main__":
    main()
