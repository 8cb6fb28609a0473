"""Where the latest monitoring report of a model is recorded, and reading its PSI figures.

    latest_psi(platform.storage, "underwriting")
    # {"version": 3, "psi": {"income": 0.02, …, "score": 0.05}, "report": "monitoring/…", …}

The serving application reads this every half minute and exports it as ``mlp_psi`` gauges, so
``configs/prometheus/alerts.yml`` can alert on drift found by ``mlp monitor``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mlplatform.errors import NotFoundError

if TYPE_CHECKING:
    from mlplatform.storage.blobs import Storage

__all__ = ["LATEST", "PREFIX", "latest_psi"]

PREFIX = "monitoring"
LATEST = "latest.json"


def latest_psi(storage: Storage, model: str) -> dict[str, Any] | None:
    """The latest report's record for ``model`` (see the module docstring), or None if none was written."""
    try:
        return storage.read_json(f"{PREFIX}/{model}/{LATEST}")
    except NotFoundError:
        return None
