"""Server-side SVG: line charts (loss curves, learning rates) and layered graphs (the stage DAG,
lineage). No JavaScript, no external fonts or libraries; every label is XML-escaped; colours are
presentation attributes that the dashboard's stylesheet may override through the classes.

- `line_chart(series)`: one `<polyline class="series">` per named series, nice axis ticks,
  a legend; long series are thinned to at most `max_points` (min and max of each bucket kept, so
  spikes survive).
- `layered_graph(nodes, edges)`: a left-to-right Sugiyama-style layout: cycles broken, layers by
  longest path, crossings reduced by barycenter sweeps, edges as cubic curves with arrows. Each
  node is a `<g class="node KIND" id="PREFIX-ID" data-id="ID">`, inside an `<a href>` when given.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from xml.sax.saxutils import escape

__all__ = ["line_chart", "layered_graph", "GraphNode", "GraphEdge", "nice_ticks", "PALETTE"]

SVG_NS = "http://www.w3.org/2000/svg"
#: Colour-blind-safe palette (Okabe-Ito, without yellow on white).
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#56B4E9", "#E69F00", "#000000")
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, Helvetica, Arial, sans-serif"


#: Characters XML 1.0 forbids (C0 controls other than tab, newline, carriage return), e.g. the
#: ANSI colour codes of a log line used as a label.
_NOT_XML = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def _attr(value: object) -> str:
    """An attribute value, escaped for double quotes."""
    return escape(_NOT_XML.sub("", str(value)), {'"': "&quot;"})


def _text(value: object) -> str:
    return escape(_NOT_XML.sub("", str(value)))


def _num(value: float) -> str:
    """Coordinates with two decimals and no trailing zeros (compact, deterministic)."""
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


# ---------------------------------------------------------------------- line chart


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About `count` round tick values (1, 2, 2.5, 5 x 10^k steps) covering [lo, hi]. A range too
    narrow for float steps (a constant learning rate that differs in the last bit) is widened
    around its value; one too wide for a float span gets just its ends."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("tick range must be finite")
    if hi < lo:
        lo, hi = hi, lo
    if not math.isfinite(hi - lo):
        return [lo, hi]
    if hi - lo <= max(abs(lo), abs(hi)) * 1e-9 or hi - lo < 1e-300:
        pad = max(abs(lo), abs(hi)) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    # Ticks as multiples of the step (not a running sum: no drift, and always finite in number).
    first, last = math.floor(lo / step), math.ceil(hi / step)
    return [_round(k * step, step) for k in range(first, last + 1)]


def _round(value: float, step: float) -> float:
    """`value` without the float noise of k * step (0.30000000000000004 -> 0.3)."""
    digits = max(0, 12 - int(math.floor(math.log10(step))))
    return round(value, min(digits, 300)) if abs(value) >= step / 2 else 0.0


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e5 or abs(value) < 1e-3:
        return f"{value:.1e}".replace("e-0", "e-").replace("e+0", "e")
    return f"{value:.4g}"


def _thin(points: list[tuple[float, float]], max_points: int) -> list[tuple[float, float]]:
    """At most ~max_points points: per bucket of consecutive points, its min and max (in x order)."""
    if len(points) <= max_points:
        return points
    buckets = max(1, max_points // 2)
    size = len(points) / buckets
    out: list[tuple[float, float]] = []
    for b in range(buckets):
        chunk = points[int(b * size):int((b + 1) * size)]
        if not chunk:
            continue
        low = min(chunk, key=lambda p: p[1])
        high = max(chunk, key=lambda p: p[1])
        out.extend(sorted({low, high}, key=lambda p: p[0]))
    if out[-1] != points[-1]:
        out.append(points[-1])
    return out


def line_chart(series: Mapping[str, Iterable[tuple[float, float]]], *, title: str = "", width: int = 420,
               height: int = 220, x_label: str = "step", y_label: str = "", max_points: int = 600,
               css_class: str = "chart") -> str:
    """An SVG line chart: one polyline per series (points (x, y); non-finite ones dropped), axes
    with round ticks, a legend when there are several series, "no data" when there is none."""
    clean: dict[str, list[tuple[float, float]]] = {}
    for name, points in series.items():
        kept = sorted(((float(x), float(y)) for x, y in points if math.isfinite(x) and math.isfinite(y)),
                      key=lambda p: p[0])
        if kept:
            clean[str(name)] = _thin(kept, max_points)
    legend_rows = math.ceil(len(clean) / 3) if len(clean) > 1 else 0
    left, right = 58, 14
    top = (26 if title else 10) + 16 * legend_rows
    bottom = 38 if x_label else 26
    plot_w, plot_h = max(width - left - right, 10), max(height - top - bottom, 10)
    parts = [f'<svg xmlns="{SVG_NS}" class="{_attr(css_class)}" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{_attr(title or "chart")}" '
             f'font-family="{_attr(FONT)}" font-size="11">']
    if title:
        parts.append(f'<text class="chart-title" x="{left}" y="16" font-size="13" font-weight="600" '
                     f'fill="#222">{_text(title)}</text>')
    for i, name in enumerate(clean if legend_rows else ()):
        color = PALETTE[i % len(PALETTE)]
        lx = left + (i % 3) * (plot_w / 3)
        ly = (26 if title else 10) + 16 * (i // 3) + 2
        parts.append(f'<g class="legend"><rect x="{_num(lx)}" y="{_num(ly)}" width="12" height="3" fill="{color}"/>'
                     f'<text x="{_num(lx + 16)}" y="{_num(ly + 5)}" fill="#333">{_text(_short(name, 28))}</text></g>')
    parts.append(f'<rect class="plot-area" x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" '
                 f'fill="#fff" stroke="#bbb"/>')
    if not clean:
        parts.append(f'<text class="no-data" x="{_num(left + plot_w / 2)}" y="{_num(top + plot_h / 2)}" '
                     f'text-anchor="middle" fill="#888">no data</text></svg>')
        return "".join(parts)
    xs = [p[0] for pts in clean.values() for p in pts]
    ys = [p[1] for pts in clean.values() for p in pts]
    x_ticks, y_ticks = nice_ticks(min(xs), max(xs), 5), nice_ticks(min(ys), max(ys), 4)
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * plot_w

    def sy(y: float) -> float:
        return top + plot_h - (y - y0) / (y1 - y0) * plot_h

    for t in y_ticks:
        y = sy(t)
        parts.append(f'<line class="grid" x1="{left}" x2="{left + plot_w}" y1="{_num(y)}" y2="{_num(y)}" '
                     f'stroke="#eee"/><text class="tick" x="{left - 5}" y="{_num(y + 3.5)}" text-anchor="end" '
                     f'fill="#555">{_text(_fmt(t))}</text>')
    for t in x_ticks:
        x = sx(t)
        parts.append(f'<line class="tick-mark" x1="{_num(x)}" x2="{_num(x)}" y1="{top + plot_h}" '
                     f'y2="{top + plot_h + 4}" stroke="#999"/><text class="tick" x="{_num(x)}" '
                     f'y="{top + plot_h + 15}" text-anchor="middle" fill="#555">{_text(_fmt(t))}</text>')
    if x_label:
        parts.append(f'<text class="axis-label" x="{_num(left + plot_w / 2)}" y="{height - 4}" '
                     f'text-anchor="middle" fill="#555">{_text(x_label)}</text>')
    if y_label:
        parts.append(f'<text class="axis-label" x="12" y="{_num(top + plot_h / 2)}" text-anchor="middle" '
                     f'fill="#555" transform="rotate(-90 12 {_num(top + plot_h / 2)})">{_text(y_label)}</text>')
    for i, (name, pts) in enumerate(clean.items()):
        color = PALETTE[i % len(PALETTE)]
        coords = " ".join(f"{_num(sx(x))},{_num(sy(y))}" for x, y in pts)
        parts.append(f'<polyline class="series" data-series="{_attr(name)}" fill="none" stroke="{color}" '
                     f'stroke-width="1.6" stroke-linejoin="round" points="{coords}"><title>{_text(name)}</title>'
                     f'</polyline>')
        if len(pts) == 1:
            parts.append(f'<circle cx="{_num(sx(pts[0][0]))}" cy="{_num(sy(pts[0][1]))}" r="3" fill="{color}"/>')
    parts.append("</svg>")
    return "".join(parts)


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


# ---------------------------------------------------------------------- layered graph


@dataclass
class GraphNode:
    """A node: `lines` of text (the first one bold), an optional link, a CSS `kind` (classes,
    e.g. "stage st-succeeded") and a tooltip."""

    id: str
    lines: Sequence[str]
    href: str | None = None
    kind: str = ""
    tooltip: str = ""


@dataclass
class GraphEdge:
    source: str
    target: str
    kind: str = ""
    label: str = ""


@dataclass
class _Layout:
    layer: dict[str, int] = field(default_factory=dict)
    order: list[list[str]] = field(default_factory=list)


def _acyclic(ids: list[str], edges: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop the edges that close a cycle (found by depth-first search in input order)."""
    succ: dict[str, list[str]] = {i: [] for i in ids}
    for a, b in edges:
        succ[a].append(b)
    state: dict[str, int] = {}
    back: set[tuple[str, str]] = set()
    for root in ids:
        if root in state:
            continue
        stack = [(root, iter(succ[root]))]
        state[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
            elif state.get(child) == 1:
                back.add((node, child))
            elif child not in state:
                state[child] = 1
                stack.append((child, iter(succ[child])))
    return [e for e in edges if e not in back]


def _layout(ids: list[str], edges: list[tuple[str, str]]) -> _Layout:
    preds: dict[str, list[str]] = {i: [] for i in ids}
    succs: dict[str, list[str]] = {i: [] for i in ids}
    for a, b in edges:
        preds[b].append(a)
        succs[a].append(b)
    # Longest path from the sources (Kahn's order).
    indegree = {i: len(preds[i]) for i in ids}
    queue = [i for i in ids if indegree[i] == 0]
    layer = {i: 0 for i in ids}
    seen = 0
    while seen < len(queue):
        node = queue[seen]
        seen += 1
        for child in succs[node]:
            layer[child] = max(layer[child], layer[node] + 1)
            indegree[child] -= 1
            if indegree[child] == 0:
                queue.append(child)
    # Pull a source with successors next to its nearest successor (a dataset read only by a late
    # stage sits just before it, not in the first column).
    for node in ids:
        if not preds[node] and succs[node]:
            layer[node] = max(layer[node], min(layer[c] for c in succs[node]) - 1)
    depth = max(layer.values(), default=-1) + 1
    order: list[list[str]] = [[] for _ in range(depth)]
    for node in ids:
        order[layer[node]].append(node)

    def positions() -> dict[str, float]:
        return {n: i for col in order for i, n in enumerate(col)}

    for _sweep in range(4):
        for neighbours, columns in ((preds, range(1, depth)), (succs, range(depth - 2, -1, -1))):
            for c in columns:
                pos = positions()
                def key(n: str, c: int = c) -> float:
                    near = [pos[m] for m in neighbours[n]]
                    return sum(near) / len(near) if near else pos[n]
                order[c].sort(key=key)
    return _Layout(layer=layer, order=order)


def _dom_id(text: str) -> str:
    """A DOM id for `text`: itself when it is already safe, else a safe form plus a hash of the
    original (so "a b" and "a_b" never share an id)."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", text)
    return safe if safe == text else f"{safe}-{hashlib.sha1(text.encode()).hexdigest()[:6]}"


def layered_graph(nodes: Sequence[GraphNode], edges: Iterable[GraphEdge | tuple[str, str]], *,
                  id_prefix: str = "node", max_chars: int = 34, css_class: str = "graph") -> str:
    """An SVG drawing of a directed graph, left to right. Edges whose ends are not nodes are left
    out; cycles are drawn (their closing edge too) but do not affect the layering."""
    by_id: dict[str, GraphNode] = {}
    for node in nodes:
        by_id.setdefault(node.id, node)
    ids = list(by_id)
    edge_list: list[GraphEdge] = []
    seen_edges: set[tuple[str, str]] = set()
    for edge in edges:
        edge = edge if isinstance(edge, GraphEdge) else GraphEdge(*edge)
        if edge.source in by_id and edge.target in by_id and edge.source != edge.target \
                and (edge.source, edge.target) not in seen_edges:
            seen_edges.add((edge.source, edge.target))
            edge_list.append(edge)
    layout = _layout(ids, _acyclic(ids, [(e.source, e.target) for e in edge_list]))
    line_h, pad, gap_x, gap_y, margin = 15, 8, 56, 16, 12
    chars = max((len(line) for n in by_id.values() for line in n.lines[:6]), default=8)
    node_w = max(96, min(max_chars, chars) * 6.6 + 2 * pad)
    heights = {i: max(1, min(len(by_id[i].lines), 6)) * line_h + 2 * pad - 3 for i in ids}
    column_h = [sum(heights[n] for n in col) + gap_y * max(len(col) - 1, 0) for col in layout.order]
    total_h = max(column_h, default=0) + 2 * margin
    total_w = len(layout.order) * node_w + max(len(layout.order) - 1, 0) * gap_x + 2 * margin
    box: dict[str, tuple[float, float, float]] = {}
    for c, col in enumerate(layout.order):
        x = margin + c * (node_w + gap_x)
        y = margin + (total_h - 2 * margin - column_h[c]) / 2
        for n in col:
            box[n] = (x, y, heights[n])
            y += heights[n] + gap_y
    marker = f"{_dom_id(id_prefix)}-arrow"
    parts = [f'<svg xmlns="{SVG_NS}" class="{_attr(css_class)}" width="{_num(max(total_w, 40))}" '
             f'height="{_num(max(total_h, 40))}" viewBox="0 0 {_num(max(total_w, 40))} {_num(max(total_h, 40))}" '
             f'role="img" aria-label="graph" font-family="{_attr(FONT)}" font-size="11">',
             f'<defs><marker id="{marker}" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" '
             f'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#777"/></marker></defs>']
    for e in edge_list:
        sx_, sy_, sh = box[e.source]
        tx, ty, th = box[e.target]
        x1, y1 = sx_ + node_w, sy_ + sh / 2
        x2, y2 = tx, ty + th / 2
        if x2 <= x1:  # an edge that closes a cycle, or within a column: loop around the right side
            bend = node_w / 2 + 30
            d = f"M{_num(x1)},{_num(y1)} C{_num(x1 + bend)},{_num(y1)} {_num(x2 - 30)},{_num(y2)} {_num(x2)},{_num(y2)}"
        else:
            dx = (x2 - x1) / 2
            d = f"M{_num(x1)},{_num(y1)} C{_num(x1 + dx)},{_num(y1)} {_num(x2 - dx)},{_num(y2)} {_num(x2)},{_num(y2)}"
        dashed = ' stroke-dasharray="4 3"' if "dashed" in e.kind.split() else ""
        parts.append(f'<path class="edge {_attr(e.kind)}" data-source="{_attr(e.source)}" '
                     f'data-target="{_attr(e.target)}" d="{d}" fill="none" stroke="#888" stroke-width="1.3"'
                     f'{dashed} marker-end="url(#{marker})">'
                     + (f"<title>{_text(e.label)}</title>" if e.label else "") + "</path>")
    for n in ids:
        node = by_id[n]
        x, y, h = box[n]
        lines = list(node.lines[:6]) or [node.id]
        group = [f'<g class="node {_attr(node.kind)}" id="{_attr(_dom_id(id_prefix) + "-" + _dom_id(node.id))}" '
                 f'data-id="{_attr(node.id)}">',
                 f"<title>{_text(node.tooltip or chr(10).join(node.lines))}</title>",
                 f'<rect x="{_num(x)}" y="{_num(y)}" width="{_num(node_w)}" height="{_num(h)}" rx="6" '
                 f'fill="#f4f6f8" stroke="#8a96a3" stroke-width="1.2"/>']
        for i, line in enumerate(lines):
            weight = ' font-weight="600"' if i == 0 else ' fill-opacity="0.85"'
            group.append(f'<text x="{_num(x + pad)}" y="{_num(y + pad + 10 + i * line_h)}" fill="#1d2733"{weight}>'
                         f"{_text(_short(str(line), max_chars))}</text>")
        group.append("</g>")
        body = "".join(group)
        if node.href:
            body = f'<a href="{_attr(node.href)}">{body}</a>'
        parts.append(body)
    parts.append("</svg>")
    return "".join(parts)
