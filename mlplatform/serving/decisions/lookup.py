"""Looking a logged decision up by its id: in a node's spool, then in ``decisions/log``
(``find_decision``)."""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from mlplatform.errors import NotFoundError
from mlplatform.serving.decisions.records import DATASET, parse_lines, record_schema
from mlplatform.serving.decisions.spool import CLAIMS, SEGMENT_NAME
from mlplatform.storage.datasets import DatasetStore

if TYPE_CHECKING:
    from mlplatform.storage.blobs import Storage

__all__ = ["find_decision"]


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


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []
