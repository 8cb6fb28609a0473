"""The model card: what a reviewer reads before a model may decide on credit.

    files = write_model_card({"train": ev_train, "validation": ev_val, "test": ev_test},
                             model_name="underwriting_pd", version=None, lineage=lineage,
                             params=params, feature_importance=importance,
                             reason_examples=examples, out="reports/card")
    platform.models.register(..., files=files)        # stored and checksummed with the model

Produces ``model_card.md`` and the PNGs it links to (``roc.png``, ``calibration.png``,
``score_distribution.png``, ``lift.png``). Tables that describe one split (calibration,
lift, segment sizes) use ``test`` when present, else the last split given.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlplatform.errors import DataError, DependencyError

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
    markdown = _markdown(
        splits,
        model_name=model_name,
        version=version,
        lineage=complete_lineage(lineage),
        params=params,
        importance=_importance(feature_importance)[:max_features],
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


# --------------------------------------------------------------------------- markdown
def _markdown(
    splits: dict[str, Evaluation],
    *,
    model_name: str,
    version: int | None,
    lineage: dict[str, Any],
    params: Mapping[str, Any],
    importance: list[tuple[str, float, float]],
    examples: Sequence[Mapping[str, Any]],
    intended_use: str,
    limitations: Sequence[str],
) -> str:
    focus = "test" if "test" in splits else list(splits)[-1]
    ev = splits[focus]
    title = f"{model_name} — version {version}" if version is not None else f"{model_name} (version assigned at registration)"
    lines = [f"# Model card: {title}", "", f"*Generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.*", ""]

    top = ev.lift.iloc[-1]
    lines += ["## Summary", ""]
    if ev.auc == ev.auc:  # not NaN
        lines += [
            f"On the **{focus}** split the model ranks a random defaulter above a random repayer "
            f"**{ev.auc:.1%}** of the time (AUC {ev.auc:.3f}); the riskiest tenth of applicants default at "
            f"**{top['lift']:.1f}×** the average rate ({top['observed_rate']:.1%} vs {ev.base_rate:.1%}).",
            "",
        ]
    lines += _table(
        ["Split", "Applications", "Default rate", "AUC", "KS", "Brier", "Log loss", "PSI vs train"],
        [
            [name, f"{e.n:,}", f"{e.base_rate:.2%}", _num(e.auc), _num(e.ks), _num(e.brier, 4), _num(e.log_loss, 4),
             _num(e.psi)]
            for name, e in splits.items()
        ],
        align="lrrrrrrr",
    )

    lines += ["## Discrimination", "", "![ROC curves by split](roc.png)", "", "![Lift by decile](lift.png)", ""]
    lines += [f"Lift by score decile on **{focus}** (decile 10 = highest scores):", ""]
    lines += _table(
        ["Decile", "Applications", "Default rate", "Lift", "Share of all defaults"],
        [
            [int(r.bin), f"{int(r['count']):,}", f"{r.observed_rate:.2%}", f"{r.lift:.2f}×", f"{r.share_of_defaults:.1%}"]
            for _, r in ev.lift.iloc[::-1].iterrows()
        ],
        align="rrrrr",
    )

    lines += ["## Calibration", "", "![Predicted vs observed default rate](calibration.png)", ""]
    lines += [f"Mean predicted vs observed default rate per score decile on **{focus}**:", ""]
    lines += _table(
        ["Decile", "Score range", "Applications", "Mean predicted", "Observed", "Observed − predicted"],
        [
            [int(r.bin), f"{r.score_min:.3f} – {r.score_max:.3f}", f"{int(r['count']):,}", f"{r.mean_score:.2%}",
             f"{r.observed_rate:.2%}", f"{r.observed_rate - r.mean_score:+.2%}"]
            for _, r in ev.calibration.iterrows()
        ],
        align="rlrrrr",
    )

    lines += ["## Score distributions", "", "![Score distribution by outcome](score_distribution.png)", ""]

    lines += ["## Stability", ""]
    psis = [(n, e.psi) for n, e in splits.items() if e.psi is not None]
    if psis:
        lines += [
            "Population stability index of the score against the training split (deciles of the training "
            "scores; < 0.1 stable, 0.1–0.25 moderate shift, > 0.25 material shift):",
            "",
        ]
        lines += [f"- **{n}**: {p:.3f} — {_psi_words(p)}" for n, p in psis] + [""]
    else:
        lines += ["No reference scores were given, so no PSI was computed.", ""]

    seg_names = list(dict.fromkeys(name for e in splits.values() for name in e.segments))
    if seg_names:
        lines += ["## Performance by segment", "", "AUC within each segment (n/a: the segment holds one outcome only).", ""]
        for seg in seg_names:
            lines += [f"### {seg}", ""]
            base = ev.segments.get(seg)
            values = list(base["value"]) if base is not None else []
            for e in splits.values():
                if seg in e.segments:
                    values += [v for v in e.segments[seg]["value"] if v not in values]
            rows = []
            for v in values:
                row = [_cell(v)]
                if base is not None and v in set(base["value"]):
                    b = base.set_index("value").loc[v]
                    row += [f"{int(b['count']):,}", f"{b.default_rate:.2%}"]
                else:
                    row += ["0", "—"]
                for e in splits.values():
                    t = e.segments.get(seg)
                    hit = t[t["value"] == v] if t is not None else None
                    row.append(_num(hit["auc"].iloc[0]) if hit is not None and len(hit) else "—")
                rows.append(row)
            lines += _table(
                ["Value", f"Applications ({focus})", f"Default rate ({focus})", *[f"AUC {n}" for n in splits]],
                rows,
                align="lrr" + "r" * len(splits),
            )

    lines += ["## Top features", ""]
    if importance:
        lines += _table(
            ["#", "Feature", "Importance", "Share"],
            [[i + 1, f"`{f}`", f"{imp:,.1f}", f"{share:.1%}"] for i, (f, imp, share) in enumerate(importance)],
            align="rlrr",
        )
    else:
        lines += ["No feature importance was given.", ""]

    lines += ["## Example declined applicants", ""]
    if examples:
        lines += ["The reasons each would receive, strongest first (texts from the feature definitions):", ""]
        for ex in examples:
            ident = ex.get("id", ex.get("applicant_id", "?"))
            score = ex.get("score")
            head = f"**Applicant {ident}**" + (f" — predicted default probability {score:.1%}" if score is not None else "")
            lines += [head, ""]
            reasons = list(ex.get("reasons", []))
            lines += [f"{i + 1}. {_reason_line(r)}" for i, r in enumerate(reasons)] or ["- (no reasons: no feature pushed toward decline)"]
            lines += [""]
    else:
        lines += ["No examples were given.", ""]

    lines += ["## Lineage", ""]
    lines += _lineage_lines(lineage)

    lines += ["## Parameters", ""]
    lines += _table(["Parameter", "Value"], [[f"`{k}`", f"`{_cell(v)}`"] for k, v in sorted(params.items())], align="ll")

    lines += ["## Intended use", "", intended_use, "", "## Limitations", ""]
    lines += [f"- {item}" for item in limitations] + [""]
    return "\n".join(lines)


def _lineage_lines(lineage: dict[str, Any]) -> list[str]:
    out: list[str] = []
    ts = lineage.get("training_set")
    if ts:
        out += [
            f"- **Training set**: `{ts.get('name')}` version {ts.get('version')}, {int(ts.get('rows') or 0):,} rows, "
            f"content hash `{ts.get('content_hash')}`",
            f"  at `{ts.get('uri')}`",
        ]
    if lineage.get("feature_service"):
        out.append(f"- **Feature service**: `{lineage['feature_service']}`")
    if lineage.get("data_time_range"):
        r = lineage["data_time_range"]
        out.append(f"- **Data time range**: {r.get('min')} → {r.get('max')}")
    commit = lineage.get("code_version")
    dirty = " (with uncommitted changes)" if lineage.get("code_dirty") else ""
    out.append(f"- **Code version**: `{commit}`{dirty}" if commit else "- **Code version**: unknown (not run from a git checkout)")
    libs = lineage.get("libraries") or {}
    if libs:
        out.append("- **Libraries**: " + ", ".join(f"{k} {v}" for k, v in libs.items() if v))
    extra = {k: v for k, v in lineage.items()
             if k not in {"training_set", "feature_service", "data_time_range", "code_version", "code_dirty", "libraries",
                          "feature_versions", "artifacts"}}
    out += [f"- **{k.replace('_', ' ').capitalize()}**: `{_cell(v)}`" for k, v in sorted(extra.items())]
    out.append("")
    if ts and ts.get("splits"):
        out += _table(
            ["Split", "From", "Until (exclusive)", "Rows"],
            [[n, s.get("start"), s.get("end"), f"{int(s.get('rows') or 0):,}"] for n, s in ts["splits"].items()],
            align="lllr",
        )
    if lineage.get("feature_versions"):
        out += _table(
            ["Feature view", "Definition version"],
            [[f"`{v}`", f"`{ver}`"] for v, ver in sorted(lineage["feature_versions"].items())],
            align="ll",
        )
    return out


def _reason_line(reason: Any) -> str:
    if isinstance(reason, str):
        return _escape(reason)
    get = reason.get if isinstance(reason, Mapping) else lambda k, d=None: getattr(reason, k, d)
    text = _escape(str(get("text", "")))
    feature, value, contribution = get("feature"), get("value"), get("contribution")
    detail = []
    if feature is not None:
        detail.append(f"`{feature}` = {_cell(value)}")
    if contribution is not None:
        detail.append(f"+{float(contribution):.2f} log-odds")
    return f"{text} ({'; '.join(detail)})" if detail else text


def _importance(value: Any) -> list[tuple[str, float, float]]:
    if value is None:
        return []
    if hasattr(value, "columns"):  # DataFrame
        pairs = list(zip(value["feature"], value["importance"], strict=True))
    elif hasattr(value, "items"):  # Mapping or Series
        pairs = list(value.items())
    else:
        pairs = list(value)
    pairs = sorted(((str(f), float(v)) for f, v in pairs), key=lambda p: -p[1])
    total = sum(v for _, v in pairs) or 1.0
    return [(f, v, v / total) for f, v in pairs]


def _table(header: list[str], rows: list[list[Any]], *, align: str) -> list[str]:
    marks = {"l": ":---", "r": "---:"}
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(marks[a] for a in align) + "|",
        *("| " + " | ".join(_escape(str(c)) for c in row) + " |" for row in rows),
        "",
    ]


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _num(value: float | None, digits: int = 3) -> str:
    if value is None or value != value:
        return "n/a"
    return f"{value:.{digits}f}"


def _psi_words(value: float) -> str:
    return "stable" if value < 0.1 else "moderate shift" if value < 0.25 else "material shift: investigate before use"


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
        ax.plot(ev.roc["fpr"], ev.roc["tpr"], color=_color(name, i), label=f"{name} (AUC {_num(ev.auc)})")
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
