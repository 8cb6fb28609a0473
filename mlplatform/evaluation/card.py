"""The model card: what a reviewer reads before a model may decide on credit.

    files = write_model_card({"train": ev_train, "validation": ev_val, "test": ev_test},
                             model_name="underwriting_pd", version=None, lineage=lineage,
                             params=params, feature_importance=importance,
                             reason_examples=examples, out="reports/card")
    platform.models.register(..., files=files)        # stored and checksummed with the model

Produces ``model_card.md`` and the PNGs it links to (``roc.png``, ``calibration.png``,
``score_distribution.png``, ``lift.png``). Tables that describe one split (calibration,
lift, segment sizes) use ``test`` when present, else the last split given.

This module assembles and writes the card and draws its plots (matplotlib); the Markdown text
is rendered by ``card_markdown``.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlplatform.errors import DataError, DependencyError
from mlplatform.evaluation.card_markdown import format_metric, importance_shares, render_markdown

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from mlplatform.evaluation.metrics import Evaluation
    from mlplatform.storage import Storage

__all__ = ["CARD_FILE", "write_model_card"]

CARD_FILE = "model_card.md"
_COLORS = {"train": "#1f77b4", "validation": "#ff7f0e", "test": "#2ca02c"}
_OTHER_COLORS = ["#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
_INTENDED_USE = (
    "Estimates the probability that a pay-later applicant defaults on this loan, at checkout, "
    "to approve or decline the application and to give adverse-action reasons for declines. "
    "Scores are meant for applicants and merchants like those in the training period; the "
    "approval threshold is a business decision made separately from this model."
)
_LIMITATIONS = (
    "Outcomes exist only for loans that were granted: for profiles an earlier policy declined, risk is "
    "extrapolated (no reject inference is applied).",
    "Defaults are known 120 days after origination; the most recent period in the data has no labels yet.",
    "Performance can drift with the economy, the merchant mix and marketing; watch the PSI and re-evaluate "
    "monthly.",
    "Reason texts explain the model's score (SHAP contributions), not causation; they are what the "
    "model used, not advice on what an applicant should change.",
    "Not validated for segments absent from the training data (new merchant categories, new terms).",
)


def write_model_card(
    evaluation_by_split: Mapping[str, Evaluation],
    *,
    model_name: str,
    version: int | None,
    lineage: Mapping[str, Any],
    params: Mapping[str, Any],
    feature_importance: Mapping[str, float] | Any,
    reason_examples: Sequence[Mapping[str, Any]],
    out: str | os.PathLike[str] | None = None,
    storage: Storage | None = None,
    intended_use: str = _INTENDED_USE,
    limitations: Sequence[str] = _LIMITATIONS,
    max_features: int = 15,
) -> dict[str, bytes]:
    """Render the card's Markdown and plots; optionally write them out.

    Args:
        evaluation_by_split: ``{"train": Evaluation, "validation": …, "test": …}`` in display order.
        version: the registry version, or None before registration (the record is the authority).
        lineage: as passed to ``platform.models.register`` (completed with ``complete_lineage``).
        feature_importance: feature → importance (a mapping, a Series, or a DataFrame with
            ``feature`` and ``importance`` columns), e.g. LightGBM ``importance_type="gain"``.
        reason_examples: declined applicants to show, each ``{"id": …, "score": float,
            "reasons": [Reason | {"text", …} | str, …]}``.
        out: where to write the files: a local directory, or a key prefix when ``storage`` is given.
        storage: write under this storage root instead of the local filesystem.

    Returns:
        ``{file name: bytes}`` for the Markdown and the PNGs, ready for ``register(files=…)``.

    Raises:
        DataError: no evaluations were given.
        DependencyError: matplotlib is not installed.
    """
    from mlplatform.models.registry import complete_lineage

    if not evaluation_by_split:
        raise DataError("write_model_card needs at least one evaluated split, e.g. {'test': evaluate(y, score)}")
    splits = dict(evaluation_by_split)
    files = {
        "roc.png": _png(_roc_figure(splits)),
        "calibration.png": _png(_calibration_figure(splits)),
        "score_distribution.png": _png(_distribution_figure(splits)),
        "lift.png": _png(_lift_figure(splits)),
    }
    markdown = render_markdown(
        splits,
        model_name=model_name,
        version=version,
        lineage=complete_lineage(lineage),
        params=params,
        importance=importance_shares(feature_importance)[:max_features],
        examples=reason_examples,
        intended_use=intended_use,
        limitations=limitations,
    )
    files = {CARD_FILE: markdown.encode(), **files}
    if out is not None:
        if storage is not None:
            for name, data in files.items():
                storage.write_bytes(f"{os.fspath(out).strip('/')}/{name}", data)
        else:
            folder = Path(out)
            folder.mkdir(parents=True, exist_ok=True)
            for name, data in files.items():
                (folder / name).write_bytes(data)
    return files


# ------------------------------------------------------------------------------ plots
def _figure(width: float = 6.4, height: float = 4.8) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise DependencyError.missing("matplotlib", "matplotlib>=3.8", "drawing the model card's plots") from None
    # A bare Figure renders with the Agg canvas: no pyplot, no GUI backend, no global state.
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _color(name: str, i: int) -> str:
    return _COLORS.get(name, _OTHER_COLORS[i % len(_OTHER_COLORS)])


def _roc_figure(splits: dict[str, Evaluation]) -> Figure:
    fig = _figure(5.5, 5)
    ax = fig.subplots()
    for i, (name, ev) in enumerate(splits.items()):
        ax.plot(ev.roc["fpr"], ev.roc["tpr"], color=_color(name, i), label=f"{name} (AUC {format_metric(ev.auc)})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="random")
    ax.set(xlabel="False positive rate (repayers flagged)", ylabel="True positive rate (defaulters flagged)",
           title="ROC curve", xlim=(0, 1), ylim=(0, 1))
    ax.legend(loc="lower right")
    return fig


def _calibration_figure(splits: dict[str, Evaluation]) -> Figure:
    fig = _figure(5.5, 5)
    ax = fig.subplots()
    top = 0.0
    for i, (name, ev) in enumerate(splits.items()):
        cal = ev.calibration
        ax.plot(cal["mean_score"], cal["observed_rate"], marker="o", color=_color(name, i), label=name)
        top = max(top, float(cal["mean_score"].max()), float(cal["observed_rate"].max()))
    top = top * 1.05 or 1.0
    ax.plot([0, top], [0, top], color="grey", linestyle=":", linewidth=1, label="perfect calibration")
    ax.set(xlabel="Mean predicted default probability (score decile)", ylabel="Observed default rate",
           title="Calibration by score decile", xlim=(0, top), ylim=(0, top))
    ax.legend(loc="upper left")
    return fig


def _distribution_figure(splits: dict[str, Evaluation]) -> Figure:
    fig = _figure(4 * len(splits), 3.6)
    axes = fig.subplots(1, len(splits), sharey=True, squeeze=False)[0]
    for ax, (name, ev) in zip(axes, splits.items(), strict=True):
        h = ev.score_histogram
        edges = [*h["left"], h["right"].iloc[-1]]
        for column, label, color in (("negatives", "repaid", "#1f77b4"), ("positives", "defaulted", "#d62728")):
            total = h[column].sum()
            share = (h[column] / total) if total else h[column] * 0.0
            ax.stairs(share, edges, label=label, color=color, fill=True, alpha=0.35)
        ax.set(title=name, xlabel="Predicted default probability")
    axes[0].set_ylabel("Share of applicants with that outcome")
    axes[0].legend()
    return fig


def _lift_figure(splits: dict[str, Evaluation]) -> Figure:
    fig = _figure(7, 4.2)
    ax = fig.subplots()
    width = 0.8 / len(splits)
    for i, (name, ev) in enumerate(splits.items()):
        lift = ev.lift
        ax.bar(lift["bin"] + (i - (len(splits) - 1) / 2) * width, lift["lift"], width=width, color=_color(name, i), label=name)
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.set(xlabel="Score decile (10 = highest scores)", ylabel="Default rate / overall default rate",
           title="Lift by score decile", xticks=range(1, 11))
    ax.legend()
    return fig
