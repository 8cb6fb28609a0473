"""PNG plots of a monitoring report: a column's training and live shares, bin by bin."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from mlplatform.errors import DependencyError

if TYPE_CHECKING:
    from mlplatform.monitoring.drift import Drift

__all__ = ["distribution_png"]


def distribution_png(drift: Drift, *, title: str) -> bytes:
    """Side-by-side bars of the reference (training) and live shares of each bin, PSI in the title.

    Raises:
        DependencyError: matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise DependencyError.missing("matplotlib", "matplotlib>=3.8", "drawing the monitoring report's plots") from None
    import numpy as np

    # A bare Figure renders with the Agg canvas: no pyplot, no GUI backend, no global state.
    fig = Figure(figsize=(7.2, 4.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(len(drift.labels))
    ax.bar(x - 0.2, drift.reference_shares, width=0.4, label=f"training ({drift.reference_rows:,})", color="#4c72b0")
    ax.bar(x + 0.2, drift.current_shares, width=0.4, label=f"live ({drift.current_rows:,})", color="#dd8452")
    ax.set_xticks(x, drift.labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("share of rows")
    psi = "no live data" if drift.psi is None else f"PSI {drift.psi:.3f} ({drift.status})"
    ax.set_title(f"{title} — {psi}", fontsize=10)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()
