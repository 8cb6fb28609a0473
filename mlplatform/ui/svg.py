"""Server-drawn SVG: the lineage graph (columns of linked boxes) and metric trends (polylines).
No JavaScript: every node is an ``<a>`` element, every text escaped."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

__all__ = ["Node", "lineage_svg", "trend_svg"]

_BOX_H, _GAP_X, _GAP_Y = 30, 26, 12
#: Box width per column: its longest label at ~7 px a character (12 px sans), within these bounds.
_MIN_W, _MAX_W, _CHAR_W, _PAD = 96, 260, 6.8, 20


@dataclass(frozen=True)
class Node:
    """One box: ``key`` is unique, ``column`` its stage (0 = sources), ``href`` where it links."""

    key: str
    label: str
    column: int
    href: str
    #: drawn dashed and grey: a placeholder for what was not recorded
    missing: bool = False


def lineage_svg(nodes: Sequence[Node], edges: Sequence[tuple[str, str]], columns: Sequence[str]) -> str:
    """Nodes in columns (one per stage, titled by ``columns``), edges as curves between box sides.
    Each column is as wide as its longest label needs (up to ``_MAX_W``; longer labels are cut
    with an ellipsis and shown whole in the box's tooltip)."""
    widths = [max([_MIN_W, len(title) * _CHAR_W + 4] + [len(n.label) * _CHAR_W + _PAD for n in nodes if n.column == i])
              for i, title in enumerate(columns)]
    widths = [min(round(w), _MAX_W) for w in widths]
    lefts = [20 + sum(widths[:i]) + i * _GAP_X for i in range(len(columns))]
    rows: dict[int, int] = {}
    where: dict[str, tuple[int, int]] = {}
    column = {node.key: node.column for node in nodes}
    for node in _ordered(nodes, edges, column):
        row = rows.get(node.column, 0)
        rows[node.column] = row + 1
        where[node.key] = (lefts[node.column], 40 + row * (_BOX_H + _GAP_Y))
    width = lefts[-1] + widths[-1] + 20 if columns else 40
    height = 60 + max(rows.values(), default=1) * (_BOX_H + _GAP_Y)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="lineage" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="lineage graph">']
    for i, title in enumerate(columns):
        out.append(f'<text x="{lefts[i]}" y="22" class="col">{escape(title)}</text>')
    for a, b in edges:
        if a in where and b in where:
            (x1, y1), (x2, y2) = where[a], where[b]
            y1, y2 = y1 + _BOX_H // 2, y2 + _BOX_H // 2
            if column[a] == column[b]:  # within a column (a view built on another): a loop on the left
                out.append(f'<path d="M{x1},{y1} C{x1 - 18},{y1} {x2 - 18},{y2} {x2},{y2}" class="edge"/>')
                continue
            x1 += widths[column[a]]
            mid = (x1 + x2) / 2
            out.append(f'<path d="M{x1},{y1} C{mid:.0f},{y1} {mid:.0f},{y2} {x2},{y2}" class="edge"/>')
    for node in nodes:
        x, y = where[node.key]
        w = widths[node.column]
        fits = int((w - _PAD) / _CHAR_W + 0.5)  # the width was rounded from a label this long
        label = node.label if len(node.label) <= fits else node.label[: fits - 1] + "…"
        out.append(f'<a href="{escape(node.href)}"><rect x="{x}" y="{y}" width="{w}" height="{_BOX_H}" rx="5" '
                   f'class="node c{node.column}{" missing" if node.missing else ""}"><title>{escape(node.label)}</title></rect>'
                   f'<text x="{x + 8}" y="{y + 19}">{escape(label)}</text></a>')
    out.append("</svg>")
    return "".join(out)


def _ordered(nodes: Sequence[Node], edges: Sequence[tuple[str, str]], column: dict[str, int]) -> list[Node]:
    """Nodes column by column; within a column, in the mean row of the boxes that lead into it
    (fewer crossing edges: a model version sits beside its snapshot), those with none after,
    in the given order."""
    parents: dict[str, list[str]] = {}
    for a, b in edges:
        if a in column and b in column and column[a] < column[b]:
            parents.setdefault(b, []).append(a)
    row: dict[str, int] = {}
    out: list[Node] = []
    for c in sorted({n.column for n in nodes}):
        here = [n for n in nodes if n.column == c]

        def key(item: tuple[int, Node]) -> tuple[int, float, int]:
            i, n = item
            placed = [row[p] for p in parents.get(n.key, ()) if p in row]
            return (0, sum(placed) / len(placed), i) if placed else (1, 0.0, i)

        for i, (_, n) in enumerate(sorted(enumerate(here), key=key)):
            row[n.key] = i
            out.append(n)
    return out


def trend_svg(series: dict[str, list[tuple[int, float]]], *, width: int = 560, height: int = 180) -> str:
    """One polyline per metric over model versions (x: version, y: value, each metric scaled to
    its own range so AUC and log loss share a chart); an empty string when nothing to draw."""
    series = {k: v for k, v in series.items() if v}
    if not series:
        return ""
    versions = sorted({v for points in series.values() for v, _ in points})
    lo_v, hi_v = versions[0], max(versions[-1], versions[0] + 1)
    colors = ["#1f6feb", "#d73a49", "#2da44e", "#bf8700", "#8250df", "#57606a"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="trend" width="{width}" height="{height + 20 * len(series)}" '
           f'role="img" aria-label="metric trends">']
    out.append(f'<rect x="40" y="10" width="{width - 60}" height="{height - 40}" class="frame"/>')
    for i, (metric, points) in enumerate(sorted(series.items())):
        values = [p for _, p in points]
        lo, hi = min(values), max(values)
        span = (hi - lo) or 1.0
        coords = " ".join(
            f"{40 + (v - lo_v) / (hi_v - lo_v) * (width - 60):.1f},{10 + (1 - (y - lo) / span) * (height - 40):.1f}"
            for v, y in points
        )
        color = colors[i % len(colors)]
        out.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2"/>')
        out.append(f'<text x="40" y="{height + 20 * i}" fill="{color}">{escape(metric)}: '
                   f'{lo:.4g} … {hi:.4g} (v{points[0][0]}–v{points[-1][0]})</text>')
    out.append(f'<text x="40" y="{height - 12}" class="axis">v{lo_v}</text>'
               f'<text x="{width - 40}" y="{height - 12}" class="axis">v{versions[-1]}</text></svg>')
    return "".join(out)
