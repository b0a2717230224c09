"""The dashboard's graph, profile and history pages as static HTML for ``performance_report``.

:func:`report_sections` takes the scheduler's whole snapshot at the end of the report's block
(:meth:`zfabric.scheduler.observe.Observer.snapshot`: its ``graph``, ``groups``, ``profiles``
and ``history``) and the block's start and stop (wall clock), and returns the sections the
report adds after its own: the task-group graph, a flame graph per task group (the workers'
profiler), and the history of throughput and memory over the block. Plain SVG, no script, no
CDN: the report opens offline.
"""

from __future__ import annotations

import html
import math


def _esc(x) -> str:
    return html.escape(str(x), quote=True)


def _colour(name: str) -> str:
    # the page's palette (dashboard.js): no red or orange-red (errors, transfers)
    palette = ("#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#17becf", "#bcbd22", "#7f7f7f",
               "#393b79", "#637939", "#8c6d31", "#5254a3", "#6b6ecf", "#3182bd", "#31a354",
               "#756bb1", "#636363", "#6baed6", "#74c476", "#9e9ac8", "#e7ba52", "#17a589",
               "#1abc9c", "#2e86c1", "#7d3c98", "#b7950b", "#ca6f1e")
    h = 2166136261
    for ch in name:
        h = ((h ^ ord(ch)) * 16777619) & 0xFFFFFFFF
    return palette[h % len(palette)]


#: A group's tasks by state, as the graph page draws them: done, running, failed; the rest
#: (waiting) is the grey of the disc.
PIE = (("done", "#4caf50"), ("processing", "#2196f3"), ("erred", "#e53935"))


def _pie(x: float, y: float, r: float, g: dict) -> str:
    """A disc whose slices are the shares of a group's tasks in each state (a slice is a
    circle of half the radius whose stroke, as wide as the radius, is dashed to its share)."""
    total = g["done"] + g["processing"] + g["erred"] + g["waiting"]
    out = [f'<circle cx="{x:.0f}" cy="{y:.0f}" r="{r:.1f}" fill="#d0d0d0"/>']
    if not total:
        return out[0]
    half = r / 2
    around = 2 * math.pi * half
    start = 0.0
    for state, colour in PIE:
        share = g[state] / total
        if share <= 0:
            continue
        out.append(f'<circle class="slice" data-state="{state}" cx="{x:.0f}" cy="{y:.0f}" '
                   f'r="{half:.1f}" fill="none" stroke="{colour}" stroke-width="{r:.1f}" '
                   f'stroke-dasharray="{share * around:.2f} {around:.2f}" '
                   f'stroke-dashoffset="{-start * around:.2f}" '
                   f'transform="rotate(-90 {x:.0f} {y:.0f})"/>')
        start += share
    return "".join(out)


def graph_svg(snapshot: dict, width: int = 900) -> str:
    graph = snapshot.get("graph") or {}
    rows = {g["name"]: g for g in snapshot.get("groups") or ()}
    names = [n[0] for n in graph.get("nodes") or () if n[0] in rows]
    edges = [e for e in graph.get("edges") or () if e[0] in rows and e[1] in rows]
    if not names:
        return "<p>No task groups.</p>"
    parents: dict[str, list[str]] = {n: [] for n in names}
    for a, b, _n in edges:
        parents[b].append(a)
    depth: dict[str, int] = {}

    def level(n: str, guard: int = 0) -> int:
        if n not in depth:
            depth[n] = 0
            if guard < 200:
                depth[n] = max((level(p, guard + 1) + 1 for p in parents[n]), default=0)
        return depth[n]

    columns: dict[int, list[str]] = {}
    for n in names:
        columns.setdefault(level(n), []).append(n)
    tallest = max(len(c) for c in columns.values())
    height = max(160, 70 * tallest + 30)
    col_w = (width - 40) / len(columns)
    top = max(max(rows[n]["total"], rows[n]["forgotten"]) for n in names) or 1
    pos = {}
    for d, col in columns.items():
        for i, n in enumerate(sorted(col)):
            pos[n] = (20 + col_w * (d + 0.5), 15 + (height - 30) * (i + 0.5) / len(col))
    out = [f'<svg class="graph" width="{width}" height="{height}" '
           'xmlns="http://www.w3.org/2000/svg">']
    for a, b, n in edges:
        (x1, y1), (x2, y2) = pos[a], pos[b]
        out.append(f'<line x1="{x1:.0f}" y1="{y1:.0f}" x2="{x2:.0f}" y2="{y2:.0f}" '
                   f'stroke="#999"><title>{_esc(a)} → {_esc(b)} ({n})</title></line>')
    for n in names:
        g = rows[n]
        x, y = pos[n]
        total = max(g["total"], g["forgotten"])
        r = 8 + 22 * math.sqrt(total / top)
        label = n if len(n) <= 26 else n[:25] + "…"
        out.append(f'<g class="group-node" data-group="{_esc(n)}" data-total="{total}">'
                   + _pie(x, y, r, g) +
                   f'<circle cx="{x:.0f}" cy="{y:.0f}" r="{r:.1f}" fill="none" '
                   f'stroke="{_colour(n)}" stroke-width="4"/>'
                   f'<text x="{x:.0f}" y="{y + r + 13:.0f}" text-anchor="middle" '
                   f'font-size="11">{_esc(label)} {g["done"]}/{g["total"]}</text>'
                   f'<title>{_esc(n)}: {g["done"]} done of {g["total"]}</title></g>')
    out.append("</svg>")
    return "".join(out)


def flame_svg(group: str, tree: list, width: int = 900) -> str:
    row = 16
    rects: list[str] = []
    deepest = [0]
    total = max(tree[1], 1)

    def walk(node: list, depth: int, x0: float, w: float) -> None:
        deepest[0] = max(deepest[0], depth)
        x = x0
        for child in sorted(node[2], key=lambda c: -c[1]):
            cw = w * child[1] / max(node[1], 1)
            if cw < 1:
                continue
            fn, _, rest = child[0].partition(";")
            text = fn if len(fn) * 6.5 < cw else fn[: max(0, int(cw / 6.5) - 1)] + "…"
            rects.append(f'<g class="frame" data-function="{_esc(fn)}">'
                         f'<rect x="{x:.1f}" y="{depth * row}" width="{max(cw - 0.5, 0.5):.1f}"'
                         f' height="{row - 1}" fill="#f0a868"/>'
                         + (f'<text x="{x + 2:.1f}" y="{depth * row + 12}" font-size="10">'
                            f"{_esc(text)}</text>" if cw > 30 else "")
                         + f"<title>{_esc(fn)} {_esc(rest)}: {child[1]} samples "
                           f"({100 * child[1] / total:.1f} %)</title></g>")
            walk(child, depth + 1, x, cw)
            x += cw

    walk(tree, 0, 0.0, float(width))
    height = (deepest[0] + 1) * row
    return (f'<h3>{_esc(group)} <small>({tree[1]} samples)</small></h3>'
            f'<svg class="flame" width="{width}" height="{height}" '
            f'xmlns="http://www.w3.org/2000/svg">{"".join(rects)}</svg>')


def history_svg(snapshot: dict, start: float, stop: float, width: int = 900) -> str:
    history = snapshot.get("history") or {}
    fine = history.get("fine") or []
    first_fine = fine[0][0] if fine else math.inf
    points = [p for p in (history.get("coarse") or []) if p[0] < first_fine] + fine
    points = [p for p in points if start - 1 <= p[0] <= stop + 1]
    if len(points) < 2:
        return "<p>Too short for a history (one point a second).</p>"
    t0, t1 = points[0][0], max(points[-1][0], points[0][0] + 1e-9)
    out = []
    for i, label, fmt in ((1, "tasks/s", "{:.0f}"), (3, "memory of all workers", None)):
        top = max(p[i] for p in points) or 1
        pts = " ".join(f"{(width - 10) * (p[0] - t0) / (t1 - t0) + 5:.1f},"
                       f"{115 - 105 * p[i] / top:.1f}" for p in points)
        peak = fmt.format(top) if fmt else f"{top / 2**20:.1f} MiB"
        out.append(f'<figure><svg class="history" width="{width}" height="120" '
                   f'xmlns="http://www.w3.org/2000/svg"><polyline points="{pts}" fill="none"'
                   f' stroke="#23395d"/><text x="4" y="12" font-size="10">{peak}</text></svg>'
                   f"<figcaption>{label}</figcaption></figure>")
    return "".join(out)


def report_sections(snapshot: dict, start: float, stop: float) -> str:
    """The graph, profile and history sections for the report (HTML)."""
    profiles = snapshot.get("profiles") or {}
    flames = "".join(flame_svg(g, tree) for g, tree in sorted(profiles.items())
                     if tree and tree[1] > 0) or "<p>No profile samples (tasks too short?).</p>"
    return (f"<h2>Task graph</h2>{graph_svg(snapshot)}"
            f"<h2>Profile</h2><div id='profiles'>{flames}</div>"
            f"<h2>History</h2>{history_svg(snapshot, start, stop)}")
