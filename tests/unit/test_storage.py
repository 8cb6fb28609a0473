"""Storage on local disk and on a real S3-compatible server: atomic publishing, exclusive
creates, a crashed writer leaving the previous version readable, checksummed artifacts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pyarrow as pa
import pytest

from mlplatform import IntegrityError, NotFoundError, Platform, StorageError


@pytest.fixture(params=["local", "s3"])
def platform(request, tmp_path):
    if request.param == "local":
        return Platform.from_config({"storage": {"root": str(tmp_path / "root")}})
    endpoint = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return Platform.from_config({"storage": {"root": f"s3://{bucket}/root", "s3": {"endpoint_url": endpoint}}})


def test_json_round_trip_and_missing(platform):
    platform.storage.write_json("a/b.json", {"x": 1})
    assert platform.storage.read_json("a/b.json") == {"x": 1}
    with pytest.raises(NotFoundError, match="nothing stored at"):
        platform.storage.read_json("a/missing.json")


def test_exclusive_create_has_one_winner(platform):
    results: list[bool] = []

    def attempt(i: int) -> None:
        results.append(platform.storage.create_json("race/one.json", {"writer": i}))

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]
    winner = platform.storage.read_json("race/one.json")["writer"]
    assert 0 <= winner < 8


def test_publish_versions_and_partition_replacement(platform):
    datasets = platform.datasets
    v1 = datasets.publish(
        "offline/v", pa.table({"k": [1, 2, 3], "date": ["2024-01-01", "2024-01-02", "2024-01-02"]}), partition_by="date"
    )
    assert (v1.version, v1.rows, v1.partitions) == (1, 3, ["2024-01-01", "2024-01-02"])
    v2 = datasets.publish(
        "offline/v", pa.table({"k": [20], "date": ["2024-01-02"]}), partition_by="date", replace="partitions"
    )
    assert (v2.version, v2.rows) == (2, 2)
    assert sorted(datasets.read_table("offline/v").column("k").to_pylist()) == [1, 20]
    assert sorted(datasets.read_table("offline/v", version=1).column("k").to_pylist()) == [1, 2, 3]
    v3 = datasets.publish("offline/v", pa.table({"k": [7], "date": ["2024-02-01"]}), partition_by="date")
    assert datasets.read_table("offline/v").column("k").to_pylist() == [7]
    assert datasets.versions("offline/v") == [1, 2, 3] and v3.version == 3


def test_concurrent_publishers_all_commit(platform):
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            platform.datasets.publish(
                "offline/c", pa.table({"k": [i], "date": [f"2024-01-{i + 1:02d}"]}), partition_by="date",
                replace="partitions",
            )
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert platform.datasets.versions("offline/c") == [1, 2, 3, 4, 5, 6]
    # every writer's partition survived: each commit rebased on the one before it
    assert sorted(platform.datasets.read_table("offline/c").column("k").to_pylist()) == list(range(6))


def test_missing_dataset_is_not_found(platform):
    with pytest.raises(NotFoundError, match="dataset 'offline/none' does not exist"):
        platform.datasets.get("offline/none")


def test_bad_keys_are_refused(platform):
    for key in ["../escape", "a//b", "a/./b", "white space"]:
        with pytest.raises(StorageError, match="invalid storage key"):
            platform.storage.write_json(key, {})


def test_tampered_artifact_is_refused(platform):
    digest = platform.storage.write_artifact("models/m/1/model.txt", b"tree 1\n")
    assert platform.storage.read_artifact("models/m/1/model.txt", digest) == b"tree 1\n"
    platform.storage.write_bytes("models/m/1/model.txt", b"tree 1 -- edited\n")
    with pytest.raises(IntegrityError, match="modified after it was written"):
        platform.storage.read_artifact("models/m/1/model.txt", digest)


_CRASHING_WRITER = textwrap.dedent(
    """
    import sys, time, json
    import pyarrow as pa, pyarrow.parquet as pq
    from mlplatform import Platform
    platform = Platform.from_config(json.loads(sys.argv[1]))
    def slow_writer(staging):
        fs = platform.storage.arrow_fs
        fs.create_dir(staging, recursive=True)
        for i in range(1000):
            pq.write_table(pa.table({"k": [100 + i]}), f"{staging}/part-{i:04d}.parquet", filesystem=fs)
            print("wrote", i, flush=True)
            time.sleep(0.05)
    platform.datasets.publish("offline/crash", slow_writer)
    """
)


def test_crashed_writer_leaves_previous_version_readable(platform, tmp_path):
    import json

    platform.datasets.publish("offline/crash", pa.table({"k": [1, 2, 3]}))
    config = {"storage": platform.config.storage.model_dump(mode="json")}
    proc = subprocess.Popen(
        [sys.executable, "-c", _CRASHING_WRITER, json.dumps(config)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ},
    )
    # let it write several files of version 2, then kill it without warning
    for _ in range(3):
        line = proc.stdout.readline()
        assert line.startswith("wrote"), line
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert platform.datasets.versions("offline/crash") == [1]
    assert sorted(platform.datasets.read_table("offline/crash").column("k").to_pylist()) == [1, 2, 3]
    # the orphaned staging files exist but no reader sees them; vacuum removes them
    staged = platform.storage.list("offline/crash/_data")
    assert len(staged) == 2
    time.sleep(1.1)
    removed = platform.datasets.vacuum("offline/crash", min_age_s=0)
    assert len(removed) == 1
    assert sorted(platform.datasets.read_table("offline/crash").column("k").to_pylist()) == [1, 2, 3]
