"""Listing the written consistency reports: what ``ConsistencyReport.write`` leaves under
``reports/consistency/`` is listed newest first with its figures; an older report without
``report.json`` is still listed; a damaged one is left out; a bad name is refused."""

from __future__ import annotations

import pandas as pd
import pytest

from mlplatform import Platform
from mlplatform.errors import NotFoundError
from mlplatform.features.consistency import ConsistencyReport
from mlplatform.features.consistency_reports import PREFIX, consistency_reports, read_info, read_summary


def _report(rates: dict[str, float], decisions: int) -> ConsistencyReport:
    per_feature = pd.DataFrame([
        {"ref": ref, "feature": ref.split(":")[1], "compared": decisions, "exact_matches": int(rate * decisions),
         "missing_online": 0, "extra_online": 0, "mean_abs_diff": 0.0 if rate == 1 else 1.5, "exact_match_rate": rate}
        for ref, rate in rates.items()
    ])
    rows = pd.DataFrame(columns=["ref", "feature", "decision_id", "served", "offline", "match", "missing_online", "extra_online", "abs_diff"])
    examples = pd.DataFrame(columns=["ref", "feature", "decision_id", "served", "offline", "abs_diff"])
    return ConsistencyReport("underwriting_v1", decisions, rows, per_feature, examples)


def test_reports_are_listed_newest_first_with_their_figures(tmp_path):
    platform = Platform.from_config({"project": "t", "storage": {"root": str(tmp_path / "store")}})
    storage = platform.storage
    assert platform.features.consistency_reports() == []
    _report({"a:x": 1.0, "a:y": 1.0}, 40).write(storage, f"{PREFIX}/20260101T000000Z")
    _report({"a:x": 1.0, "a:y": 0.75}, 12).write(storage, f"{PREFIX}/20260102T000000Z")
    older = f"{PREFIX}/20251231T000000Z"  # written before report.json existed
    _report({"a:x": 0.5}, 8).write(storage, older)
    storage.delete(f"{older}/report.json")
    storage.write_bytes(f"{PREFIX}/20260103T000000Z/per_feature.parquet", b"not parquet")  # damaged: left out

    listed = platform.features.consistency_reports()
    assert [r.name for r in listed] == ["20260102T000000Z", "20260101T000000Z", "20251231T000000Z"]
    new, clean, old = listed
    assert (new.feature_service, new.decisions, new.features, new.flagged, new.min_exact_match_rate) == ("underwriting_v1", 12, 2, ["a:y"], 0.75)
    assert (clean.flagged, clean.min_exact_match_rate) == ([], 1.0) and "match_rate.png" in clean.files
    assert (old.feature_service, old.decisions, old.flagged) == (None, None, ["a:x"])
    assert [r.name for r in consistency_reports(storage, limit=1)] == ["20260102T000000Z"]
    assert "| a:y | 12 | 75.00% |" in read_summary(storage, "20260102T000000Z")
    assert read_info(storage, "20260102T000000Z") == new
    for bad in ("nope", "../../etc", ".."):
        with pytest.raises(NotFoundError):
            read_summary(storage, bad)
        with pytest.raises(NotFoundError):
            read_info(storage, bad)
