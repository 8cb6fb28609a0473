"""The model card's Markdown: the tables and text a reviewer reads, rendered from evaluations.

    text = render_markdown(splits, model_name="underwriting_pd", version=3, lineage=lineage,
                           params=params, importance=importance_shares(gain)[:15],
                           examples=examples, intended_use=..., limitations=...)

``write_model_card`` (in ``card``) calls this and adds the plots the text links to.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlplatform.evaluation.metrics import Evaluation

__all__ = ["format_metric", "importance_shares", "render_markdown"]


def render_markdown(
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
    """The card's Markdown. Tables that describe one split (calibration, lift, segment sizes)
    use ``test`` when present, else the last split given."""
    focus = "test" if "test" in splits else list(splits)[-1]
    title = f"{model_name} — version {version}" if version is not None else f"{model_name} (version assigned at registration)"
    lines = [f"# Model card: {title}", "", f"*Generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC.*", ""]
    lines += _summary(splits, focus)
    lines += _discrimination(splits[focus], focus)
    lines += _calibration(splits[focus], focus)
    lines += ["## Score distributions", "", "![Score distribution by outcome](score_distribution.png)", ""]
    lines += _stability(splits)
    lines += _segments(splits, focus)
    lines += _top_features(importance)
    lines += _examples(examples)
    lines += ["## Lineage", ""]
    lines += _lineage_lines(lineage)
    lines += _data_quality(lineage)
    lines += ["## Parameters", ""]
    lines += _table(["Parameter", "Value"], [[f"`{k}`", f"`{_cell(v)}`"] for k, v in sorted(params.items())], align="ll")
    lines += ["## Intended use", "", intended_use, "", "## Limitations", ""]
    lines += [f"- {item}" for item in limitations] + [""]
    return "\n".join(lines)


def _summary(splits: dict[str, Evaluation], focus: str) -> list[str]:
    ev = splits[focus]
    top = ev.lift.iloc[-1]
    lines = ["## Summary", ""]
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
            [name, f"{e.n:,}", f"{e.base_rate:.2%}", format_metric(e.auc), format_metric(e.ks), format_metric(e.brier, 4), format_metric(e.log_loss, 4),
             format_metric(e.psi)]
            for name, e in splits.items()
        ],
        align="lrrrrrrr",
    )
    return lines


def _discrimination(ev: Evaluation, focus: str) -> list[str]:
    lines = ["## Discrimination", "", "![ROC curves by split](roc.png)", "", "![Lift by decile](lift.png)", ""]
    lines += [f"Lift by score decile on **{focus}** (decile 10 = highest scores):", ""]
    lines += _table(
        ["Decile", "Applications", "Default rate", "Lift", "Share of all defaults"],
        [
            [int(r.bin), f"{int(r['count']):,}", f"{r.observed_rate:.2%}", f"{r.lift:.2f}×", f"{r.share_of_defaults:.1%}"]
            for _, r in ev.lift.iloc[::-1].iterrows()
        ],
        align="rrrrr",
    )
    return lines


def _calibration(ev: Evaluation, focus: str) -> list[str]:
    lines = ["## Calibration", "", "![Predicted vs observed default rate](calibration.png)", ""]
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
    return lines


def _stability(splits: dict[str, Evaluation]) -> list[str]:
    lines = ["## Stability", ""]
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
    return lines


def _segments(splits: dict[str, Evaluation], focus: str) -> list[str]:
    ev = splits[focus]
    seg_names = list(dict.fromkeys(name for e in splits.values() for name in e.segments))
    if not seg_names:
        return []
    lines = ["## Performance by segment", "", "AUC within each segment (n/a: the segment holds one outcome only).", ""]
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
                row.append(format_metric(hit["auc"].iloc[0]) if hit is not None and len(hit) else "—")
            rows.append(row)
        lines += _table(
            ["Value", f"Applications ({focus})", f"Default rate ({focus})", *[f"AUC {n}" for n in splits]],
            rows,
            align="lrr" + "r" * len(splits),
        )
    return lines


def _top_features(importance: list[tuple[str, float, float]]) -> list[str]:
    lines = ["## Top features", ""]
    if importance:
        lines += _table(
            ["#", "Feature", "Importance", "Share"],
            [[i + 1, f"`{f}`", f"{imp:,.1f}", f"{share:.1%}"] for i, (f, imp, share) in enumerate(importance)],
            align="rlrr",
        )
    else:
        lines += ["No feature importance was given.", ""]
    return lines


def _examples(examples: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = ["## Example declined applicants", ""]
    if not examples:
        return lines + ["No examples were given.", ""]
    lines += ["The reasons each would receive, strongest first (texts from the feature definitions):", ""]
    for ex in examples:
        ident = ex.get("id", ex.get("applicant_id", "?"))
        score = ex.get("score")
        head = f"**Applicant {ident}**" + (f" — predicted default probability {score:.1%}" if score is not None else "")
        lines += [head, ""]
        reasons = list(ex.get("reasons", []))
        lines += [f"{i + 1}. {_reason_line(r)}" for i, r in enumerate(reasons)] or ["- (no reasons: no feature pushed toward decline)"]
        lines += [""]
    return lines


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


def _data_quality(lineage: dict[str, Any]) -> list[str]:
    """The training set's validation results (one row per view with expectations), as the
    snapshot recorded them; nothing when the snapshot predates validation or no view declares any."""
    quality = (lineage.get("training_set") or {}).get("quality") or {}
    if not quality:
        return []
    lines = ["## Data quality", "", "The training set's features checked against each view's declared expectations "
             "(rows where the view had no value for the applicant, e.g. no history yet, are counted apart).", ""]
    rows = []
    for view, q in sorted(quality.items()):
        failed = q.get("failed") or []
        rows.append([f"`{view}`", q.get("policy", ""), f"{int(q.get('rows') or 0):,}", f"{int(q.get('uncovered') or 0):,}",
                     str(q.get("passed", 0)),
                     str(len(failed)), str(q.get("skipped", 0)), failed[0] if failed else "—"])
    lines += _table(["View", "Policy", "Rows checked", "Rows without a value", "Passed", "Failed", "Skipped", "Worst finding"],
                    rows, align="llrrrrrl")
    reports = [f"`{q['report']}`" for _, q in sorted(quality.items()) if q.get("report")]
    if reports:
        lines += ["Reports (under the storage root): " + ", ".join(reports), ""]
    return lines


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


def importance_shares(value: Any) -> list[tuple[str, float, float]]:
    """``(feature, importance, share of the total)``, most important first, from a mapping, a
    Series, a DataFrame with ``feature`` and ``importance`` columns, or pairs; None gives []."""
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


def format_metric(value: float | None, digits: int = 3) -> str:
    """``value`` to ``digits`` decimals; None or NaN is ``n/a``."""
    if value is None or value != value:
        return "n/a"
    return f"{value:.{digits}f}"


def _psi_words(value: float) -> str:
    return "stable" if value < 0.1 else "moderate shift" if value < 0.25 else "material shift: investigate before use"
