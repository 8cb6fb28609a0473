"""CPU seconds each kind of process used, once a second, while something else runs: which
process a benchmark's time goes to (replicas of each Serve application, HAProxy, wrk, Ray).

    python benchmarks/cpu_by_process.py /tmp/cpu.jsonl &          # then run e.g. serving.py
    python benchmarks/cpu_by_process.py --summary /tmp/cpu.jsonl  # seconds when one app was busy

Each line of the output file is one second: ``machine`` (CPU seconds of the whole machine,
``/proc/stat``) and the CPU seconds of each group of processes (``/proc/<pid>/stat`` user +
system): Ray actors by their title (``ServeReplica`` of the default application,
``ServeReplica:two-models`` of ``benchmarks/serving.py``'s second one, ``ServeReplica:baseline``
of its bare baseline, kept apart so it is not counted as the decision's), other processes by
name. ``--summary`` averages the seconds in which one of the two applications' replicas was
busy (> 0.5 CPU) and the other idle (< 0.1): divide a replica group's CPU by that point's
rps for its CPU a request. Linux only.
"""

import collections
import json
import os
import sys
import time

GROUPS = ("ServeReplica:two-models", "ServeReplica:baseline", "ServeReplica", "haproxy", "wrk", "raylet", "gcs_server", "ServeController", "python")


def snapshot() -> tuple[dict[str, tuple[str, int]], int]:
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        title = command if command.startswith("ray::") else name
        out[pid] = (next((g for g in GROUPS if g in title), title), int(fields[11]) + int(fields[12]))
    with open("/proc/stat") as f:
        total = sum(int(x) for x in f.readline().split()[1:8])
    return out, total


def record(path: str) -> None:
    hz = os.sysconf("SC_CLK_TCK")
    before, before_total = snapshot()
    with open(path, "w") as log:
        while True:
            time.sleep(1.0)
            now, total = snapshot()
            groups: collections.Counter[str] = collections.Counter()
            for pid, (group, ticks) in now.items():
                spent = ticks - before[pid][1] if pid in before else ticks
                if spent > 0:
                    groups[group] += spent / hz
            log.write(json.dumps({"t": time.time(), "machine": (total - before_total) / hz, **groups}) + "\n")
            log.flush()
            before, before_total = now, total


def summary(path: str) -> None:
    seconds: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    count: collections.Counter[str] = collections.Counter()
    for line in open(path):
        row = json.loads(line)
        one, two = row.get("ServeReplica", 0), row.get("ServeReplica:two-models", 0)
        busy = "decision" if one > 0.5 and two < 0.1 else "decision2" if two > 0.5 and one < 0.1 else None
        if busy:
            count[busy] += 1
            seconds[busy].update({k: v for k, v in row.items() if k != "t"})
    for busy, total in seconds.items():
        shares = ", ".join(f"{k} {v / count[busy]:.2f}" for k, v in total.most_common(8))
        print(f"{busy} busy ({count[busy]} s): CPU a second: {shares}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--summary"]:
        summary(sys.argv[2])
    else:
        record(sys.argv[1])
