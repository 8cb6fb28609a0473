"""Synthetic data generation benchmark: ``generate()`` end to end, on local disk or S3.

    python benchmarks/generate.py                          # 1M applications, local disk
    python benchmarks/generate.py --s3                     # 1M applications, a moto S3 server on loopback
    python benchmarks/generate.py --applications 100000    # smoke run, seconds

A local Ray is started with ``num_cpus=2`` before timing (its start-up is not timed). Each
repeat runs ``generate()`` into the same storage root (a new version of every table) and is
timed from the call to its return: the Ray Data job (every shard generates its tables and
writes them as Parquet) and the commit of every table. The first repeat also pays for Ray
starting its worker processes and importing the generator in them; later repeats do not.

With ``--s3`` the script starts its own ``moto_server`` on a free loopback port with dummy
credentials, creates a bucket and uses ``s3://<bucket>/bench`` as the storage root. moto keeps
objects in memory and is a single Python process, so S3 figures measure this machine's
loopback S3 server, not AWS.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_moto() -> tuple[subprocess.Popen, str]:
    os.environ.update(
        AWS_ACCESS_KEY_ID="benchmark",
        AWS_SECRET_ACCESS_KEY="benchmark",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    port = _free_port()
    exe = shutil.which("moto_server") or str(Path(sys.executable).with_name("moto_server"))
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.1)
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
    return proc, endpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--applications", type=int, default=1_000_000, help="applications to generate")
    parser.add_argument("--shards", type=int, default=None, help="shards (default: one per ~250k applications)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs (the first includes worker start-up)")
    parser.add_argument("--s3", action="store_true", help="write to a moto S3 server started by this script")
    parser.add_argument("--root", default=None, help="local storage root (default: a temporary directory)")
    args = parser.parse_args()

    moto = None
    tmp = None
    if args.s3:
        moto, endpoint = _start_moto()
        storage = {"root": "s3://bench/bench", "s3": {"endpoint_url": endpoint}}
    else:
        root = args.root or (tmp := tempfile.mkdtemp(prefix="mlp-generate-"))
        storage = {"root": root}

    import ray

    from mlplatform.platform import Platform
    from workloads.underwriting.generate import TABLES, DataConfig, generate, shard_count

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    try:
        platform = Platform.from_config({"storage": storage})
        config = DataConfig(applications=args.applications, shards=args.shards, seed=args.seed)
        print(
            f"generate: {config.applications:,} applications, {shard_count(config)} shards, "
            f"root {platform.storage.root}, Ray num_cpus=2, {os.cpu_count()} cores"
        )
        for repeat in range(1, args.repeats + 1):
            started = time.perf_counter()
            versions = generate(platform, config)
            seconds = time.perf_counter() - started
            total_bytes = sum(f.bytes for v in versions.values() for f in v.files)
            print(f"run {repeat}: {seconds:.1f} s, {config.applications / seconds:,.0f} applications/s, "
                  f"{total_bytes / 2**20:,.0f} MiB of Parquet")  # fmt: skip
        for table in TABLES:
            v = versions[table]
            print(f"  {table:<17} {v.rows:>12,} rows {sum(f.bytes for f in v.files) / 2**20:>8,.1f} MiB")
    finally:
        ray.shutdown()
        if moto is not None:
            moto.terminate()
            moto.wait(timeout=10)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
