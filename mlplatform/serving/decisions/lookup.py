"""Reading logged decisions: one by its id (``find_decision``), or all of them since a time
(``read_decisions``), from a node's spool and the compacted ``decisions/log``."""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import TYPE_CHECKING, Any

from mlplatform.errors import NotFoundError
from mlplatform.serving.decisions.records import DATASET, parse_lines, record_schema
from mlplatform.serving.decisions.spool import CLAIMS, SEGMENT_NAME
from mlplatform.storage.datasets import DatasetStore

if TYPE_CHECKING:
    from mlplatform.storage.blobs import Storage

__all__ = ["find_decision", "read_decisions"]


def find_decision(storage: Storage, decision_id: str, *, spool_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Look a decision up: in ``spool_dir`` (if given) first, then in ``decisions/log``.

        record = find_decision(platform.storage, "d-123", spool_dir="/var/lib/mlp/decision-spool")

    A segment only moves forward (spool -> claim -> dataset), and the places are searched in
    that order, so a record being compacted meanwhile is still found. Where a decision has two
    records (the second amends the first: its answer was not the one returned), the later
    one of the segment or dataset it is found in is returned. The dataset search
    reads the ``decision_id`` column of every file: fine for audits, not for a hot path.

    Raises:
        NotFoundError: not in the spool nor in the compacted log.
    """
    needle = json.dumps({"decision_id": decision_id}, separators=(",", ":"), ensure_ascii=False)[1:-1].encode()
    if spool_dir is not None:
        spool_dir = os.fspath(spool_dir)
        claims = os.path.join(spool_dir, CLAIMS)
        for folder in (spool_dir, *(os.path.join(claims, c) for c in _listdir(claims))):
            for name in _listdir(folder):
                if not SEGMENT_NAME.match(name):
                    continue
                try:
                    with open(os.path.join(folder, name), "rb") as f:
                        data = f.read()
                except FileNotFoundError:
                    continue  # moved on to a claim or compacted: searched next
                if needle not in data:
                    continue
                matches = [r for r in parse_lines(data)[0] if r["decision_id"] == decision_id]
                if matches:  # a later record of the same decision amends it (returned: false)
                    return matches[-1]
    datasets = DatasetStore(storage)
    if datasets.exists(DATASET):
        import pyarrow.compute as pc
        import pyarrow.dataset as pads

        paths = datasets.file_paths(datasets.get(DATASET))
        if paths:
            found = pads.dataset(paths, schema=record_schema(), format="parquet", filesystem=storage.arrow_fs).to_table(
                filter=pc.field("decision_id") == decision_id
            )
            if found.num_rows:  # a later record of the same decision amends it (returned: false)
                return found.slice(found.num_rows - 1, 1).to_pylist()[0]
    where = f"the spool {spool_dir!r} nor " if spool_dir is not None else ""
    raise NotFoundError(f"decision {decision_id!r} is in neither {where}{storage.uri(DATASET)!r}")


def read_decisions(
    storage: Storage, *, spool_dir: str | os.PathLike[str] | None = None, since: datetime | None = None
) -> list[dict[str, Any]]:
    """Every logged decision (created at or after ``since``, if given): the compacted log, then
    this node's spool; where a decision has two records (the second amends the first), the
    later one. Records in ``created_at`` order.

        records = read_decisions(platform.storage, spool_dir=platform.serving.spool_dir())

    Reads the whole log: for audits and reports, not for a hot path.
    """
    found: dict[str, dict[str, Any]] = {}
    datasets = DatasetStore(storage)
    if datasets.exists(DATASET):
        import pyarrow.dataset as pads

        paths = datasets.file_paths(datasets.get(DATASET))
        if paths:
            table = pads.dataset(paths, schema=record_schema(), format="parquet", filesystem=storage.arrow_fs).to_table()
            for record in table.to_pylist():
                found[record["decision_id"]] = record
    if spool_dir is not None:
        spool_dir = os.fspath(spool_dir)
        claims = os.path.join(spool_dir, CLAIMS)
        for folder in (*(os.path.join(claims, c) for c in _listdir(claims)), spool_dir):
            for name in _listdir(folder):
                if not SEGMENT_NAME.match(name):
                    continue
                try:
                    with open(os.path.join(folder, name), "rb") as f:
                        records = parse_lines(f.read())[0]
                except FileNotFoundError:
                    continue  # compacted meanwhile: read above, or by the next call
                for record in records:
                    found[record["decision_id"]] = record
    out = list(found.values())
    if since is not None:
        out = [r for r in out if datetime.fromisoformat(r["created_at"]) >= since]
    return sorted(out, key=lambda r: r["created_at"])


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []
