"""Streaming: how fresh a real-time view is online, how fast the stream processors apply
events, and what an online read of a real-time view costs next to a batch view.

    python benchmarks/streaming.py                          # Redis bus + Redis online store, then SQLite
    python benchmarks/streaming.py --rates 100 1000 --steps 2000 4000 6000 8000 --seconds 20
    python benchmarks/streaming.py --skip-sqlite --backlog 50000

**Set-up.** One stream source (``checkouts``: applicant_id, amount) and one real-time view
(``checkout_activity``: count and sum of amount over 1h and 1d per applicant), on a local Ray
with 2 CPUs. The production set-up: a redis-server for the bus with ``appendonly yes`` and
``appendfsync always`` (the bus's default ``durability: fsync_always`` checks for it on every
append) and a second redis-server, in memory, for the online store (online state is rebuilt
from the log, so it needs no fsync). The embedded default after it: SQLite bus and SQLite
online store under the storage root. Processor settings are the config's defaults
(``batch_size`` 500, ``block`` 500ms, ``flush_interval`` 1s, ``flush_events`` 5000) except
``processors`` (``--processors``, default 2 on this 2-core machine); flags override them.

**Freshness** (event accepted -> visible in an online read). A producer *process* (its own
Platform, as a client would be) ingests events at a fixed rate: every ``--tick`` (10 ms) it
sends, in one ``platform.features.ingest`` call, the events due by then (unique event ids,
applicants drawn from 10,000). Every ``--probe-every`` (20 ms) the first event of a batch goes
to a fresh applicant id (a *probe*); the producer hands the probe's key and the bus's
acceptance time (``IngestResult.first_known_at``) to this process, which polls every
outstanding probe key in one online read every ``--poll`` (2 ms): the feature server's read
path, ``mlplatform.features.online_lookup.get_online_features`` on a ``FeatureCatalog``
(fetch the key's events from the online store, aggregate them at now).
Freshness = the time that read returned showing the event (``time.time()``) minus the
acceptance time, both on this host's clock: an upper bound by up to one poll interval plus one
read (and the Redis bus stamps acceptance at millisecond precision, rounding down). Each rate
runs ``--warmup`` s unmeasured, then ``--seconds`` s measured; afterwards the bus is drained.

**Highest sustained rate.** ``--steps`` rates run the same way, until one does not hold. A
rate *holds* when the producer reached >= 95 % of it, the group's lag (events not yet read by
a processor) at the end is under a quarter second of events, every probe was seen and the
freshness p99 is <= 1 s.

**Processor throughput.** With processors stopped, ``--backlog`` events are ingested; then the
processors start, and from the moment they are ready until every event is applied online
(their ``applied`` counters; what they applied before they answered ready is left out),
events/s and, from the processor actors' CPU seconds (psutil on their PIDs), events per
CPU-second ("per core").

**CPU.** Every figure comes with the CPUs each part used (processors, producer, prober,
redis-servers) and how long their threads were runnable but waiting for a CPU (Linux
``schedstat``): on a shared 2-core machine that is where a stall comes from. Ray runs its
workers (the processors) at nice 15; the producer and the prober take the same nice value
(``--niceness``), as the serving replicas that ingest and read in production are Ray workers
too; the redis-servers keep 0.

**Online read latency.** One key with 20 events in its window of the real-time view against
the same key in a batch view of the same shape (4 features, a row pushed with
``platform.features.push(..., to="online")``) in the same online store, read one key at a
time, alternately, with the processors idle: through the feature server's path (a
``FeatureCatalog``: definitions resolved once) and through ``platform.features.get_online_features``
(the library call, which reads the registry on every call).

Figures, not assertions. Target: freshness p99 <= 250 ms at 1,000 events/s on this 2-core
machine. The 1-minute load average is printed with every figure.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from mlplatform import Aggregation, Entity, FeatureView, Field, Platform
from mlplatform.features.definitions import ParquetSource, StreamSource
from mlplatform.online.base import OnlineStoreUnavailable

APPLICANTS = 10_000
PROBE_BASE = 1_000_000_000  # probe keys: fresh applicants, never in the random pool
READ_KEY = 2_000_000_000  # the key the read-latency test reads
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Ray starts its worker processes (the stream processors; in production also the serving
# replicas that ingest events and read features) at this nice value, below Ray's own servers
# and anything else started normally. The benchmark's producer and prober take the same value
# (``--niceness``), so that they do not outrank the processors they measure; the redis-servers
# keep 0, as on a machine of their own.
RAY_WORKER_NICENESS = 15

applicant = Entity(name="applicant", join_keys=["applicant_id"])
checkouts = StreamSource(
    name="checkouts",
    dataset="events/checkouts",
    timestamp_field="checkout_ts",
    schema=[Field(name="applicant_id", dtype="int64"), Field(name="amount")],
    allowed_lateness="1h",
)
activity = FeatureView(
    name="checkout_activity",
    entities=[applicant],
    source=checkouts,
    aggregations=[
        Aggregation(function="count", window="1h", name="checkouts_1h"),
        Aggregation(function="count", window="1d", name="checkouts_1d"),
        Aggregation(column="amount", function="sum", window="1h", name="amount_1h"),
        Aggregation(column="amount", function="sum", window="1d", name="amount_1d"),
    ],
)
# The same four features, stored as a row (what a backfill + materialize or a push writes).
totals = FeatureView(
    name="checkout_totals",
    entities=[applicant],
    source=ParquetSource(name="checkout_totals_source", dataset="raw/checkout_totals", timestamp_field="event_timestamp"),
    schema=[Field(name="checkouts_1h", dtype="int64"), Field(name="checkouts_1d", dtype="int64"),
            Field(name="amount_1h"), Field(name="amount_1d")],
)
RT_REFS = [f"{activity.name}:{a.feature_name}" for a in activity.aggregations]
BATCH_REFS = [f"{totals.name}:{f.name}" for f in totals.features]
PROBE_REF = f"{activity.name}:checkouts_1d"


def load1() -> float:
    return os.getloadavg()[0]


def micros(when: datetime) -> int:
    return (when - EPOCH) // timedelta(microseconds=1)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# ------------------------------------------------------------------------- the producer
def producer_main(config: dict, conn, probes) -> None:
    """A client process: its own Platform, ingesting what the benchmark asks for."""
    platform = Platform.from_config(config)
    features = platform.features
    rng = random.Random(os.getpid())
    prefix = uuid.uuid4().hex[:8]
    counter = iter(range(10**12))

    def rows(n: int, key: int | None = None) -> list[dict]:
        now = datetime.now(UTC)
        return [{"event_id": f"{prefix}-{next(counter)}", "applicant_id": rng.randrange(APPLICANTS) if key is None else key,
                 "amount": round(rng.uniform(20, 900), 2), "checkout_ts": now} for _ in range(n)]

    while (cmd := conn.recv()) is not None:
        kind = cmd["kind"]
        if kind == "rate":
            conn.send(_send_at_rate(features, rows, probes, **cmd["args"]))
        elif kind == "backlog":
            started = time.perf_counter()
            for at in range(0, cmd["n"], 1000):
                features.ingest("checkouts", rows(min(1000, cmd["n"] - at)))
            conn.send({"seconds": time.perf_counter() - started})
        elif kind == "key":
            conn.send(features.ingest("checkouts", rows(cmd["n"], cmd["key"])).count)
    platform.close()


def _send_at_rate(features, rows, probes, *, rate: float, seconds: float, warmup: float, tick: float,
                  probe_every: float, probe_base: int) -> dict:
    started = time.perf_counter()
    measure_from, end = started + warmup, started + warmup + seconds
    sent, sent_before = 0, None
    next_probe = measure_from
    probe_key = probe_base
    ingest_s: list[float] = []
    batches = probes_sent = 0
    k = 0
    while (now := time.perf_counter()) < end:
        if sent_before is None and now >= measure_from:
            sent_before = sent
        due = int(rate * (now - started)) - sent
        if due > 0:
            batch = rows(due)
            probe = now >= next_probe
            if probe:
                probe_key += 1
                batch[0]["applicant_id"] = probe_key
                next_probe = max(next_probe + probe_every, now)  # behind: no burst of probes
            t0 = time.perf_counter()
            result = features.ingest("checkouts", batch)
            ingest_s.append(time.perf_counter() - t0)
            if probe:
                probes.put((probe_key, micros(result.first_known_at)))
                probes_sent += 1
            sent += due
            batches += 1
        k += 1
        pause = started + k * tick - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        else:  # behind: skip the ticks already missed (the next batch carries their events)
            k = int((time.perf_counter() - started) / tick)
    return {"achieved": (sent - (sent_before or 0)) / seconds, "sent": sent, "batches": batches, "probes": probes_sent,
            "ingest_p50_ms": pct(ingest_s, 0.5) * 1000, "ingest_p99_ms": pct(ingest_s, 0.99) * 1000}


class Producer:
    def __init__(self, config: dict) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.probes = ctx.Queue()
        self.proc = ctx.Process(target=producer_main, args=(config, child, self.probes), daemon=True)
        self.proc.start()

    def ask(self, **cmd):
        self.conn.send(cmd)
        return self.conn.recv()

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.terminate()


# ------------------------------------------------------------------------------- CPU
class CpuMeter:
    """CPU use of the processes of each part (processors, producer, this process, Redis):
    user + system seconds (psutil) and the seconds their threads were runnable but waited for
    a CPU (``/proc/<pid>/task/*/schedstat``; 0 where there is none)."""

    def __init__(self, parts: dict[str, list[int]]) -> None:
        import psutil

        self.parts = {name: [psutil.Process(pid) for pid in pids] for name, pids in parts.items()}

    def read(self) -> tuple[float, dict[str, tuple[float, float]]]:
        return time.monotonic(), {name: (sum(sum(p.cpu_times()[:2]) for p in procs), sum(_waited(p.pid) for p in procs))
                                  for name, procs in self.parts.items()}

    @staticmethod
    def per_second(before, after) -> dict[str, tuple[float, float]]:
        """Per part, (CPUs used, CPUs' worth of waiting for one) between two ``read``s."""
        took = after[0] - before[0]
        return {name: ((after[1][name][0] - c) / took, (after[1][name][1] - w) / took) for name, (c, w) in before[1].items()}


def _waited(pid: int) -> float:
    total = 0
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):  # a thread that just ended
            pass
    return total / 1e9


def processor_pids(processors) -> list[int]:
    return [s["pid"] for s in processors.stats().values()]


# --------------------------------------------------------------------------- freshness
def freshness(platform, catalog, producer: Producer, rate: float, args, probe_base: int, meter: CpuMeter) -> dict:
    """One rate: the producer sends, this process polls the probe keys through the feature
    server's read path (``get_online_features`` on a ``FeatureCatalog``); returns the figures."""
    import queue

    from mlplatform.features.online_lookup import get_online_features

    bus = platform.bus
    producer.conn.send({"kind": "rate", "args": {
        "rate": rate, "seconds": args.seconds, "warmup": args.warmup, "tick": args.tick,
        "probe_every": args.probe_every, "probe_base": probe_base}})
    outstanding: dict[int, int] = {}
    fresh_ms: list[float] = []
    read_ms: list[float] = []
    lags: list[int] = []
    sent = None
    give_up = None
    received = timeouts = 0
    next_lag = time.monotonic() + args.warmup
    cpu_from = cpu = None
    while True:
        if sent is None and producer.conn.poll():
            sent = producer.conn.recv()
            cpu = meter.per_second(cpu_from, meter.read()) if cpu_from else None
            give_up = time.monotonic() + 5.0  # probes not visible 5 s after the last send: unseen
            lags.append(bus.info("checkouts", "processors").lag or 0)
        try:
            while True:
                key, known_us = producer.probes.get(block=not outstanding, timeout=0.05)
                outstanding[key] = known_us
                received += 1
        except queue.Empty:
            pass
        if time.monotonic() >= next_lag and sent is None:
            if cpu_from is None:  # the measured window starts
                cpu_from = meter.read()
            lags.append(bus.info("checkouts", "processors").lag or 0)
            next_lag += 1.0
        if outstanding:
            t0 = time.perf_counter()
            keys = list(outstanding)
            try:
                counts = get_online_features(catalog, [PROBE_REF], {"applicant_id": keys}).to_dict()["checkouts_1d"]
            except OnlineStoreUnavailable:  # past the store's read timeout (50 ms for Redis): poll again
                timeouts += 1
                counts = [0] * len(keys)
            seen_at = time.time_ns() // 1000
            read_ms.append((time.perf_counter() - t0) * 1000)
            for key, count in zip(keys, counts, strict=True):
                if count:
                    fresh_ms.append((seen_at - outstanding.pop(key)) / 1000)
            pause = args.poll - (time.perf_counter() - t0)
            if pause > 0:
                time.sleep(pause)
        if sent is not None and ((received == sent["probes"] and not outstanding) or time.monotonic() > give_up):
            break
    drained = _drain(bus)
    held = (sent["achieved"] >= 0.95 * rate and lags[-1] < rate / 4 and len(fresh_ms) == sent["probes"]
            and pct(fresh_ms, 0.99) <= 1000)
    return {"rate": rate, "achieved": sent["achieved"], "probes": len(fresh_ms), "unseen": sent["probes"] - len(fresh_ms),
            "p50": pct(fresh_ms, 0.5), "p99": pct(fresh_ms, 0.99), "max": max(fresh_ms, default=float("nan")),
            "lag_end": lags[-1], "lag_max": max(lags), "drain_s": drained, "ingest_p50_ms": sent["ingest_p50_ms"],
            "ingest_p99_ms": sent["ingest_p99_ms"], "read_ms": statistics.median(read_ms) if read_ms else float("nan"),
            "timeouts": timeouts, "cpu": cpu, "held": held, "load1": load1()}


def _drain(bus, timeout_s: float = 120.0) -> float:
    """Until the processors read every event (lag 0, nothing pending); returns the seconds."""
    started = time.monotonic()
    while True:
        info = bus.info("checkouts", "processors")
        if not info.lag and not info.pending:
            return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            print(f"  not drained after {timeout_s:.0f} s: {info}", flush=True)
            return float("nan")
        time.sleep(0.1)


# -------------------------------------------------------------------------- throughput
def throughput(platform, producer: Producer, processors, n: int, parts: dict[str, list[int]]) -> tuple[dict, object]:
    """Stop the processors, ingest ``n`` events, start them, time until all are applied."""
    processors.stop()
    info = producer.ask(kind="backlog", n=n)
    ingest_rate = n / info["seconds"]
    processors = platform.features.start_processors().ready()
    meter = CpuMeter({**parts, "processors": processor_pids(processors)})
    before = meter.read()
    applied_ready = sum(s["applied"] for s in processors.stats().values())
    while True:
        stats = processors.stats()
        applied = sum(s["applied"] for s in stats.values())
        if applied >= n:
            after = meter.read()
            break
        if time.monotonic() - before[0] > 300:
            raise SystemExit(f"processors applied {applied} of {n} in 300 s: {stats}")
        time.sleep(0.05)
    seconds = after[0] - before[0]
    cpu = meter.per_second(before, after)
    cpu_s = cpu["processors"][0] * seconds
    done = n - applied_ready
    _drain(platform.bus)
    errors = sum(s["errors"] for s in processors.stats().values())
    return ({"events": n, "ingest_rate": ingest_rate, "applied_before_ready": applied_ready, "seconds": seconds,
             "rate": done / seconds, "cpu_s": cpu_s, "runq_s": cpu["processors"][1] * seconds,
             "per_core": done / cpu_s if cpu_s else float("nan"), "cpu": cpu,
             "processors": len(stats), "errors": errors, "load1": load1()}, processors)


# ---------------------------------------------------------------------------- reads
def read_latency(platform, catalog, producer: Producer, reads: int) -> dict:
    """p50/p99 of one-key online reads: the real-time view (20 events) against a batch view,
    through the feature server's path (``get_online_features`` on a ``FeatureCatalog``:
    definitions resolved once) and through ``platform.features.get_online_features`` (the
    library call, which reads the registry on every call)."""
    import pandas as pd

    from mlplatform.features.online_lookup import get_online_features

    producer.ask(kind="key", key=READ_KEY, n=20)
    deadline = time.monotonic() + 60
    while platform.features.get_online_features(RT_REFS, {"applicant_id": [READ_KEY]}).to_dict()["checkouts_1d"][0] != 20:
        if time.monotonic() > deadline:
            raise SystemExit("the 20 events of the read-latency key never became visible")
        time.sleep(0.05)
    rt = platform.features.get_online_features(RT_REFS, {"applicant_id": [READ_KEY]}).to_dict()
    platform.features.push(totals.name, pd.DataFrame({
        "applicant_id": [READ_KEY], "event_timestamp": [datetime.now(UTC)], "checkouts_1h": [20], "checkouts_1d": [20],
        "amount_1h": [rt["amount_1h"][0]], "amount_1d": [rt["amount_1d"][0]]}), to="online")
    paths = {"serving": lambda refs, e: get_online_features(catalog, refs, e), "library": platform.features.get_online_features}
    kinds = [(f"{path}_{view}", read, refs) for path, read in paths.items()
             for view, refs in (("realtime", RT_REFS), ("batch", BATCH_REFS))]
    lat: dict[str, list[float]] = {kind: [] for kind, _, _ in kinds}
    timeouts = dict.fromkeys(lat, 0)
    for i in range(reads + 200):
        for kind, read, refs in kinds if i % 2 else kinds[::-1]:
            t0 = time.perf_counter()
            try:
                read(refs, {"applicant_id": [READ_KEY]})
            except OnlineStoreUnavailable:  # past the read timeout: counted, and its time kept
                timeouts[kind] += 1
            if i >= 200:  # the first 200 warm up connections and caches
                lat[kind].append((time.perf_counter() - t0) * 1000)
    out = {f"{k}_{q}": pct(v, p) for k, v in lat.items() for q, p in (("p50", 0.5), ("p99", 0.99))}
    out.update({f"{k}_timeouts": n for k, n in timeouts.items()}, reads=reads, load1=load1())
    return out


# ----------------------------------------------------------------------------- setup
def start_redis(directory: Path, *, durable: bool) -> tuple[subprocess.Popen, str]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server is not installed: apt-get install redis-server")
    port = _free_port()
    persistence = ["--appendonly", "yes", "--appendfsync", "always"] if durable else ["--appendonly", "no"]
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory), "--save", "",
                             *persistence], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise SystemExit(f"redis-server on port {port} did not start")
        time.sleep(0.05)


def streams_settings(args) -> dict:
    settings = {"processors": args.processors}
    for name in ("batch_size", "block", "flush_interval"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    return settings


def run_setup(name: str, config: dict, args, rates: list[float], steps: list[float], backlog: int,
              servers: dict[str, int]) -> dict:
    """One set-up end to end: reads, freshness at each rate, step-up, throughput. ``servers``:
    the pids of its redis-servers, for the CPU figures."""
    from mlplatform.serving.catalog import FeatureCatalog

    platform = Platform.from_config(config)
    platform.features.apply([applicant, checkouts, activity, totals])
    catalog = FeatureCatalog(platform.features)
    producer = Producer(config)
    processors = platform.features.start_processors().ready()
    parts = {"producer": [producer.proc.pid], "prober": [os.getpid()], **{k: [v] for k, v in servers.items()}}
    meter = CpuMeter({"processors": processor_pids(processors), **parts})
    out: dict = {"name": name, "fresh": [], "steps": []}
    try:
        out["reads"] = r = read_latency(platform, catalog, producer, args.reads)
        for path in ("serving", "library"):
            print(f"[{name}] online read, 1 key, {path} path: real-time p50 {r[f'{path}_realtime_p50']:.2f} ms "
                  f"p99 {r[f'{path}_realtime_p99']:.2f} ms; batch p50 {r[f'{path}_batch_p50']:.2f} ms "
                  f"p99 {r[f'{path}_batch_p99']:.2f} ms; timeouts {r[f'{path}_realtime_timeouts']}/{r[f'{path}_batch_timeouts']} "
                  f"(load {r['load1']:.1f})", flush=True)
        probe_base = PROBE_BASE
        for rate, stepping in [(r, False) for r in rates] + [(r, True) for r in steps]:
            f = freshness(platform, catalog, producer, rate, args, probe_base, meter)
            probe_base += 100_000
            out["steps" if stepping else "fresh"].append(f)
            _print_fresh(name, f)
            if stepping and not f["held"]:
                break
        if backlog:
            t, processors = throughput(platform, producer, processors, backlog, parts)
            out["throughput"] = t
            print(f"[{name}] backlog of {t['events']}: ingested at {t['ingest_rate']:.0f} events/s; {t['processors']} processors "
                  f"applied it at {t['rate']:.0f} events/s, {t['cpu_s']:.1f} CPU-s (+{t['runq_s']:.1f} s runnable, waiting "
                  f"for a CPU), {t['per_core']:.0f} events per CPU-s; {_cpu_text(t['cpu'])} (errors {t['errors']}, "
                  f"load {t['load1']:.1f})", flush=True)
        out["stats"] = processors.stats()
    finally:
        processors.stop()
        producer.close()
        platform.close()
    return out


def _cpu_text(cpu: dict[str, tuple[float, float]] | None) -> str:
    if not cpu:
        return "CPU: -"
    return "CPUs used (+ waiting): " + ", ".join(f"{k} {c:.2f} (+{w:.2f})" for k, (c, w) in cpu.items())


def _print_fresh(name: str, f: dict) -> None:
    print(f"[{name}] {f['rate']:6.0f}/s (sent {f['achieved']:6.0f}/s): freshness p50 {f['p50']:6.1f} ms  p99 {f['p99']:7.1f} ms  "
          f"max {f['max']:7.1f} ms  probes {f['probes']} unseen {f['unseen']}  lag end/max {f['lag_end']}/{f['lag_max']}  "
          f"ingest p50/p99 {f['ingest_p50_ms']:.1f}/{f['ingest_p99_ms']:.1f} ms  probe read {f['read_ms']:.1f} ms "
          f"({f['timeouts']} timeouts)  drain {f['drain_s']:.1f} s  {'held' if f['held'] else 'NOT held'}  "
          f"(load {f['load1']:.1f})\n    {_cpu_text(f['cpu'])}", flush=True)


# ------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=float, nargs="+", default=[100, 1000], help="events/s measured for freshness")
    parser.add_argument("--steps", type=float, nargs="*", default=[2000, 4000, 6000, 8000, 12000, 16000],
                        help="higher rates, in order, until one does not hold")
    parser.add_argument("--seconds", type=float, default=20.0, help="measured seconds per rate")
    parser.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each rate")
    parser.add_argument("--tick", type=float, default=0.010, help="seconds between the producer's batches")
    parser.add_argument("--probe-every", type=float, default=0.020, help="seconds between probes")
    parser.add_argument("--poll", type=float, default=0.002, help="seconds between the prober's reads")
    parser.add_argument("--backlog", type=int, default=50_000, help="events for the throughput test (0: skip)")
    parser.add_argument("--reads", type=int, default=1000, help="reads per view for the read latency")
    parser.add_argument("--processors", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=None, help="streams.batch_size (default: the config's, 500)")
    parser.add_argument("--block", default=None, help="streams.block (default: the config's, 500ms)")
    parser.add_argument("--flush-interval", default=None, help="streams.flush_interval (default: the config's, 1s)")
    parser.add_argument("--sqlite-rates", type=float, nargs="*", default=[100, 1000], help="freshness rates on SQLite")
    parser.add_argument("--skip-sqlite", action="store_true")
    parser.add_argument("--skip-redis", action="store_true")
    parser.add_argument("--niceness", type=int, default=RAY_WORKER_NICENESS,
                        help="nice value of Ray's workers (the processors) and of this benchmark's producer and prober "
                             f"(default {RAY_WORKER_NICENESS}, Ray's own for its workers)")
    parser.add_argument("--root", default=None, help="where storage roots go (default: a temporary directory)")
    args = parser.parse_args()

    import ray

    if args.niceness != RAY_WORKER_NICENESS:
        os.environ["RAY_worker_niceness"] = str(args.niceness)  # read by the raylet this ray.init starts
    started = time.monotonic()
    print(f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} CPUs; load average {os.getloadavg()}", flush=True)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    base = Path(args.root or tempfile.mkdtemp(prefix="mlp-streaming-bench-"))
    servers: list[subprocess.Popen] = []
    results = []
    try:
        if not args.skip_redis:
            (base / "bus").mkdir(parents=True, exist_ok=True)
            bus_proc, bus_url = start_redis(base / "bus", durable=True)
            online_proc, online_url = start_redis(base, durable=False)
            servers += [bus_proc, online_proc]
            pids = {"redis bus": bus_proc.pid, "redis online": online_proc.pid}
            os.setpriority(os.PRIO_PROCESS, 0, args.niceness)  # the prober (this thread) and the producer it starts
            config = {"project": "streambench", "storage": {"root": str(base / "redis-root")},
                      "streams": {"type": "redis", "url": bus_url, **streams_settings(args)},
                      "online_store": {"type": "redis", "url": online_url}}
            results.append(run_setup("redis", config, args, args.rates, args.steps, args.backlog, pids))
            for proc in (bus_proc, online_proc):
                proc.terminate()
                proc.wait(10)
        if not args.skip_sqlite:
            os.setpriority(os.PRIO_PROCESS, 0, args.niceness)
            config = {"project": "streambench", "storage": {"root": str(base / "sqlite-root")},
                      "streams": {"type": "sqlite", **streams_settings(args)}}
            results.append(run_setup("sqlite", config, args, args.sqlite_rates, [], 0, {}))
    finally:
        for proc in servers:
            if proc.poll() is None:
                proc.terminate()
        ray.shutdown()
    report(results, args, time.monotonic() - started)


def report(results: list[dict], args, elapsed: float) -> None:
    print(f"\nsettings: processors {args.processors}, batch_size {args.batch_size or 500}, block {args.block or '500ms'}, "
          f"flush_interval {args.flush_interval or '1s'}; tick {args.tick * 1000:.0f} ms, probe every "
          f"{args.probe_every * 1000:.0f} ms, poll {args.poll * 1000:.0f} ms; {args.seconds:.0f} s per rate; Ray worker "
          f"niceness {args.niceness} (producer and prober too); "
          f"whole run {elapsed:.0f} s")
    print("\n| set-up | events/s asked | sent | probes | freshness p50 ms | p99 ms | max ms | lag at end | processor cores: run / wait | held | load avg |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for r in results:
        for f in r["fresh"] + r["steps"]:
            unseen = f" (+{f['unseen']} unseen)" if f["unseen"] else ""
            print(f"| {r['name']} | {f['rate']:.0f} | {f['achieved']:.0f} | {f['probes']}{unseen} "
                  f"| {f['p50']:.1f} | {f['p99']:.1f} | {f['max']:.1f} | {f['lag_end']} | {_cores(f['cpu'])} | {'yes' if f['held'] else 'no'} | {f['load1']:.1f} |")
    for r in results:
        held = [f for f in r["fresh"] + r["steps"] if f["held"]]
        if held:
            best = max(held, key=lambda f: f["rate"])
            print(f"{r['name']}: highest rate that held {best['rate']:.0f}/s (p50 {best['p50']:.1f} ms, p99 {best['p99']:.1f} ms)")
        at_1000 = next((f for f in r["fresh"] if f["rate"] == 1000), None)
        if at_1000:
            met = "MET" if at_1000["p99"] <= 250 and at_1000["held"] else "NOT met"
            print(f"{r['name']}: target p99 <= 250 ms at 1,000 events/s: {met} (p99 {at_1000['p99']:.1f} ms)")
    print("\n| set-up | read path | real-time view p50 / p99 ms | batch view p50 / p99 ms | ratio p50 / p99 | load avg |")
    print("|---|---|---:|---:|---:|---:|")
    for r in results:
        x = r["reads"]
        for path in ("serving", "library"):
            rt, b = f"{path}_realtime", f"{path}_batch"
            print(f"| {r['name']} | {path} | {x[rt + '_p50']:.2f} / {x[rt + '_p99']:.2f} | {x[b + '_p50']:.2f} / {x[b + '_p99']:.2f} "
                  f"| {x[rt + '_p50'] / x[b + '_p50']:.2f} / {x[rt + '_p99'] / x[b + '_p99']:.2f} | {x['load1']:.1f} |")
    for r in results:
        if "throughput" in r:
            t = r["throughput"]
            print(f"\n{r['name']} throughput: {t['events']} events backlog, {t['processors']} processors: {t['rate']:.0f} events/s "
                  f"wall in {t['seconds']:.1f} s, {t['cpu_s']:.1f} processor CPU-s (+{t['runq_s']:.1f} s runnable, waiting for a CPU), {t['per_core']:.0f} events/s per core; ingest {t['ingest_rate']:.0f} "
                  f"events/s (load {t['load1']:.1f})")


def _cores(cpu: dict | None) -> str:
    return f"{cpu['processors'][0]:.2f} / {cpu['processors'][1]:.2f}" if cpu else "-"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
