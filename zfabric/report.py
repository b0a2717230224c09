"""The HTML of a performance report: one self-contained file (inline CSS and SVG, no script,
no network) drawn from task-stream records, transfers and two scheduler snapshots."""

from __future__ import annotations

import html
import time
import zlib

from .dashboard.pages import report_sections
from .keys import group_label, key_label

#: Task bars drawn at most (the newest); the tables count every record.
MAX_BARS = 20_000


def _color(name: str) -> str:
    return f"hsl({zlib.crc32(name.encode()) % 360},65%,52%)"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _esc(x) -> str:
    return html.escape(str(x), quote=True)


def _stream_svg(records: list[dict], transfers: list, names: dict, start: float,
                stop: float) -> str:
    rows: dict[tuple, int] = {}
    for r in records:
        rows.setdefault((r["worker"], r["thread"]), 0)
    threads: dict[str, int] = {}
    labels: dict[tuple, str] = {}
    for worker, thread in sorted(rows, key=lambda k: (str(names.get(k[0], k[0])), k[1])):
        i = threads.get(worker, 0)
        threads[worker] = i + 1
        rows[(worker, thread)] = len(labels)
        labels[(worker, thread)] = f"{names.get(worker, worker)} #{i}"
    for t in transfers:
        key = (t[0], "fetch")
        if key not in rows:
            rows[key] = len(labels)
            labels[key] = f"{names.get(t[0], t[0])} fetch"
    width, left, row_h = 1100, 150, 14
    span = max(stop - start, 1e-6)

    def x(t: float) -> float:
        return left + (width - left - 10) * (min(max(t, start), stop) - start) / span

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}"'
             f' height="{len(rows) * row_h + 30}" class="stream">']
    for key, i in rows.items():
        parts.append(f'<text x="2" y="{i * row_h + 11}">{_esc(labels[key])}</text>')
    for r in records[-MAX_BARS:]:
        if not r["startstops"]:
            continue
        ss = r["startstops"][0]
        x0, x1 = x(ss["start"]), x(ss["stop"])
        fill = _color(r["group"]) if r["status"] == "OK" else "#000"
        parts.append(
            f'<rect class="task" x="{x0:.1f}" y="{rows[(r["worker"], r["thread"])] * row_h + 1}"'
            f' width="{max(x1 - x0, 0.5):.1f}" height="{row_h - 2}" fill="{fill}">'
            f'<title>{_esc(key_label(r["key"]))} ({_esc(group_label(r["group"]))})'
            f' {(ss["stop"] - ss["start"]) * 1e3:.1f} ms</title></rect>')
    for t in transfers:
        x0, x1 = x(t[2]), x(t[3])
        parts.append(
            f'<rect class="transfer" x="{x0:.1f}" y="{rows[(t[0], "fetch")] * row_h + 3}"'
            f' width="{max(x1 - x0, 0.5):.1f}" height="{row_h - 6}" fill="#d32f2f">'
            f'<title>fetched {t[5]} value(s), {_bytes(t[4])} from {_esc(t[1])}</title></rect>')
    axis_y = len(rows) * row_h + 20
    for i in range(11):
        t = start + span * i / 10
        parts.append(f'<text x="{x(t) - 10:.1f}" y="{axis_y}">{t - start:.2f}s</text>')
    parts.append("</svg>")
    return "".join(parts)


def _bar(frac: float) -> str:
    pct = max(0.0, min(1.0, frac)) * 100
    return f'<div class="bar"><i style="width:{pct:.1f}%"></i></div>'


def render_report(records: list[dict], transfers: list, first: dict, last: dict,
                  start: float, stop: float, *, dropped: int = 0) -> str:
    """The report's HTML (see the module docstring)."""
    wall = max(stop - start, 1e-9)
    workers = {w["address"]: w for w in last.get("workers", ())}
    for w in first.get("workers", ()):
        workers.setdefault(w["address"], w)
    names = {a: w["name"] for a, w in workers.items()}
    groups: dict[str, list] = {}  # name -> [tasks, erred, compute s, nbytes]
    busy: dict[str, float] = {}
    for r in records:
        g = groups.setdefault(group_label(r["group"]), [0, 0, 0.0, 0])
        g[0] += 1
        g[1] += r["status"] != "OK"
        g[3] += r["nbytes"]
        for ss in r["startstops"]:
            d = max(0.0, ss["stop"] - ss["start"])
            g[2] += d
            busy[r["worker"]] = busy.get(r["worker"], 0.0) + d
    compute = sum(g[2] for g in groups.values()) or 1e-9
    moved = sum(t[4] for t in transfers)
    threads = sum(w["nthreads"] for w in workers.values())

    group_rows = "".join(
        f"<tr><td><i class='sw' style='background:{_color(name)}'></i>{_esc(name)}</td>"
        f"<td class='n'>{n}</td><td class='n'>{erred}</td><td class='n'>{secs:.3f}</td>"
        f"<td class='n'>{secs / max(n, 1) * 1e3:.2f}</td><td class='n'>{_bytes(nb)}</td>"
        f"<td>{_bar(secs / compute)}</td></tr>"
        for name, (n, erred, secs, nb) in sorted(groups.items(), key=lambda kv: -kv[1][2]))
    worker_rows = "".join(
        f"<tr><td>{_esc(w['name'])}</td><td>{_esc(a)}</td><td class='n'>{w['nthreads']}</td>"
        f"<td class='n'>{busy.get(a, 0.0):.3f}</td>"
        f"<td class='n'>{busy.get(a, 0.0) / (wall * max(w['nthreads'], 1)) * 100:.1f} %</td>"
        f"<td>{_bar(busy.get(a, 0.0) / (wall * max(w['nthreads'], 1)))}</td></tr>"
        for a, w in sorted(workers.items(), key=lambda kv: str(kv[1]["name"])))
    pairs: dict[tuple, list] = {}
    for t in transfers:
        p = pairs.setdefault((t[1], t[0]), [0, 0, 0.0])
        p[0] += 1
        p[1] += t[4]
        p[2] += max(0.0, t[3] - t[2])
    transfer_rows = "".join(
        f"<tr><td>{_esc(names.get(src, src))}</td><td>{_esc(names.get(dst, dst))}</td>"
        f"<td class='n'>{n}</td><td class='n'>{_bytes(nb)}</td><td class='n'>{secs:.3f}</td>"
        f"</tr>" for (src, dst), (n, nb, secs) in sorted(pairs.items(), key=lambda kv: -kv[1][1]))
    c0, c1 = first.get("counters") or {}, last.get("counters") or {}
    sched_bytes = sum(c1.get(k, 0) - c0.get(k, 0) for k in ("bytes_in", "bytes_out"))
    note = (f"<p class='warn'>{dropped} task records were gone from the scheduler's ring before"
            " they were read; raise ZFABRIC_TASK_STREAM_LENGTH.</p>" if dropped else "")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>zfabric performance report</title>
<style>
body {{ font: 13px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }}
h1 {{ font-size: 20px; }} h2 {{ font-size: 15px; margin-top: 1.6em; }}
table {{ border-collapse: collapse; }} td, th {{ padding: 2px 10px; border-bottom: 1px solid #eee;
  text-align: left; }} td.n {{ text-align: right; font-variant-numeric: tabular-nums; }}
.bar {{ width: 220px; height: 12px; background: #eee; }} .bar i {{ display: block; height: 100%;
  background: #5b9bd5; }}
i.sw {{ display: inline-block; width: 10px; height: 10px; margin-right: 6px; }}
svg.stream text {{ font-size: 10px; fill: #555; }} .warn {{ color: #b00; }}
dl {{ display: grid; grid-template-columns: 12em auto; }} dt {{ color: #666; }}
</style></head><body>
<h1>zfabric performance report</h1>
<dl>
<dt>started</dt><dd>{when}</dd>
<dt>duration</dt><dd id="duration">{wall:.3f} s</dd>
<dt>tasks</dt><dd id="ntasks">{len(records)}</dd>
<dt>compute time</dt><dd>{sum(g[2] for g in groups.values()):.3f} s</dd>
<dt>workers / threads</dt><dd>{len(workers)} / {threads}</dd>
<dt>bytes moved</dt><dd>{_bytes(moved)} between workers ({len(transfers)} fetches),
 {_bytes(sched_bytes)} through the scheduler</dd>
<dt>scheduler</dt><dd>{_esc(last.get("address", ""))}</dd>
</dl>{note}
<h2>Task stream</h2>
{_stream_svg(records, transfers, names, start, stop)}
<h2>Time per task group</h2>
<table id="groups"><tr><th>group</th><th>tasks</th><th>erred</th><th>compute s</th>
<th>mean ms</th><th>result bytes</th><th>share of compute</th></tr>{group_rows}</table>
<h2>Worker utilization</h2>
<table id="workers"><tr><th>worker</th><th>address</th><th>threads</th><th>busy s</th>
<th>utilization</th><th></th></tr>{worker_rows}</table>
<h2>Bytes moved between workers</h2>
<table id="transfers"><tr><th>from</th><th>to</th><th>fetches</th><th>bytes</th><th>seconds</th>
</tr>{transfer_rows}</table>
{report_sections(last, start, stop)}
</body></html>
"""
