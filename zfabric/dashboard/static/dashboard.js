// zfabric dashboard: one script for every page. The scheduler's live stream (/events, server-
// sent events) sends the whole picture first, then only what changed; the page keeps the
// picture up to date (merge) and draws the page its path names.
"use strict";
(function () {
  const WINDOW_S = 10;  // the task stream shows this much (of the recent past, or of the last activity)
  const PAGE_ROWS = 50;  // workers a page of the table shows
  const STREAM_ROWS = 120;  // task-stream rows (worker threads and fetch rows) drawn at most
  const FINISHED_HIDE_S = 120;  // a finished group leaves the progress list after this (history keeps it)
  const $ = (id) => document.getElementById(id);
  const SVG = "http://www.w3.org/2000/svg";
  const PAGE = (location.pathname.replace(/^\//, "") || "status").split("/")[0];
  const PARAMS = new URLSearchParams(location.search);

  // Colours of meaning, never given to a task group.
  const ERROR = "#e53935", TRANSFER = "#d32f2f";
  const STATE_COLOURS = {done: "#4caf50", released: "#4caf50", forgotten: "#4caf50", memory: "#2e7d32",
    processing: "#2196f3", waiting: "#bdbdbd", new: "#bdbdbd", queued: "#bdbdbd", erred: ERROR};
  // Task-group palette: distinct hues, none of them red or orange-red (errors, transfers).
  const PALETTE = ["#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#17becf", "#bcbd22", "#7f7f7f",
    "#393b79", "#637939", "#8c6d31", "#5254a3", "#6b6ecf", "#3182bd", "#31a354", "#756bb1",
    "#636363", "#6baed6", "#74c476", "#9e9ac8", "#e7ba52", "#17a589", "#1abc9c", "#2e86c1",
    "#7d3c98", "#b7950b", "#ca6f1e"];
  function color(name) {
    let h = 2166136261;
    for (let i = 0; i < name.length; i++) { h ^= name.charCodeAt(i); h = Math.imul(h, 16777619) >>> 0; }
    return PALETTE[h % PALETTE.length];
  }

  function bytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    n = Math.max(0, n || 0);
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : n.toFixed(0)) + " " + units[i];
  }
  function secs(s) {
    if (s < 1e-3) return (s * 1e6).toFixed(0) + " µs";
    if (s < 1) return (s * 1e3).toFixed(1) + " ms";
    if (s < 120) return s.toFixed(2) + " s";
    return (s / 60).toFixed(1) + " min";
  }
  const readable = (k) => (k && k[0] === "\x1f" ? k.slice(1) : String(k));  // a tuple key's wire form
  function widthOf(e, fallback) { return Math.round(e.getBoundingClientRect().width) || fallback; }
  function clock(t) { return new Date(t * 1000).toLocaleTimeString(); }
  function el(tag, attrs, text) {
    const e = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4))
                                      : document.createElement(tag);
    for (const k in attrs || {}) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function bar(parts, label) {
    const b = el("div", {class: "bar"});
    let left = 0;
    for (const [cls, frac] of parts) {
      const w = Math.max(0, Math.min(100 - left, frac * 100));
      b.appendChild(el("i", {class: cls, style: "left:" + left + "%;width:" + w + "%"}));
      left += w;
    }
    b.appendChild(el("span", {}, label));
    return b;
  }
  function workerLink(address, text) {
    return el("a", {href: "/worker?address=" + encodeURIComponent(address), class: "worker-link"}, text);
  }

  // ------------------------------------------------------------------ the picture

  const S = {workers: new Map(), groups: new Map(), erred: [], stream: [], transfers: [], series: [],
    events: [], fine: [], coarse: [], durations: {}, graph: {nodes: [], edges: []}, tasks: null,
    totals: {}, counters: {}, time: 0, address: "", profiles_version: 0, membership: 0};
  const KEEP = {stream: 1000, transfers: 200, series: 600, events: 50, fine: 300, coarse: 360};
  function push(name, items) {
    if (!items || !items.length) return;
    const a = S[name];
    for (const x of items) a.push(x);
    if (a.length > KEEP[name]) a.splice(0, a.length - KEEP[name]);
  }
  function merge(d) {
    if (d.kind !== "delta") {
      S.workers.clear(); S.groups.clear(); S.membership++;
      for (const k of ["stream", "transfers", "series", "events", "fine", "coarse"]) S[k] = [];
      S.durations = {};
      if (d.history) { push("fine", d.history.fine); push("coarse", d.history.coarse); }
    } else {
      push("fine", d.history);
      push("coarse", d.history_coarse);
    }
    for (const k of ["time", "address", "totals", "counters", "graph", "tasks", "profiles_version"]) {
      if (k in d) S[k] = d[k];
    }
    if (d.erred_groups) S.erred = d.erred_groups;
    for (const w of d.workers || []) {
      if (!S.workers.has(w.address)) S.membership++;
      S.workers.set(w.address, w);
    }
    for (const a of d.workers_gone || []) if (S.workers.delete(a)) S.membership++;
    for (const g of d.groups || []) { g.changed = g.changed || d.time; S.groups.set(g.name, g); }
    for (const n of d.groups_gone || []) S.groups.delete(n);
    push("stream", d.stream); push("transfers", d.transfers); push("series", d.series);
    push("events", d.events);
    Object.assign(S.durations, d.durations || {});
  }

  // ------------------------------------------------------------------ status page

  let workersPage = 0, order = [], orderKey = "";
  const COLLATOR = new Intl.Collator(undefined, {numeric: true});
  function sortedWorkers() {
    // sorted again only when workers come or go, or the filter changes (1,000 rows: a sort
    // on every update would cost more than the rest of the page)
    const filter = ($("workers-filter") || {}).value || "";
    const key = S.membership + "|" + filter;
    if (key !== orderKey) {
      orderKey = key;
      let ws = [...S.workers.values()];
      if (filter) ws = ws.filter((w) => w.name.includes(filter) || w.address.includes(filter));
      order = ws.sort((a, b) => COLLATOR.compare(a.name, b.name)).map((w) => w.address);
    }
    const out = [];
    for (const a of order) { const w = S.workers.get(a); if (w) out.push(w); }
    return out;
  }
  function renderWorkers() {
    const body = document.querySelector("#workers tbody");
    const all = sortedWorkers();
    const pages = Math.max(1, Math.ceil(all.length / PAGE_ROWS));
    workersPage = Math.min(workersPage, pages - 1);
    const shown = all.slice(workersPage * PAGE_ROWS, (workersPage + 1) * PAGE_ROWS);
    $("workers-count").textContent = "(" + all.length + ")";
    $("workers-page").textContent = "page " + (workersPage + 1) + " of " + pages;
    const rows = [];
    for (const w of shown) {
      const tr = el("tr", {class: "worker", "data-address": w.address});
      const limit = w.memory_limit || Math.max(w.memory, 1);
      const managed = Math.min(w.managed, w.memory || w.managed);
      const unmanaged = Math.max(0, w.memory - managed);
      const memLabel = bytes(w.memory) + " / " + (w.memory_limit ? bytes(w.memory_limit) : "no limit");
      const name = el("td", {class: "name"});
      name.appendChild(workerLink(w.address, w.name));
      tr.appendChild(name);
      tr.appendChild(el("td", {}, w.address));
      tr.appendChild(el("td", {class: "num"}, String(w.nthreads)));
      const td = el("td", {class: "memory"});
      td.appendChild(bar([["managed", managed / limit], ["unmanaged", unmanaged / limit]], memLabel));
      tr.appendChild(td);
      tr.appendChild(el("td", {class: "num"}, w.cpu.toFixed(0) + " %"));
      tr.appendChild(el("td", {class: "num processing"}, String(w.processing)));
      tr.appendChild(el("td", {class: "num held"}, String(w.held)));
      tr.appendChild(el("td", {class: "num nbytes"}, bytes(w.nbytes)));
      rows.push(tr);
    }
    body.replaceChildren(...rows);
  }

  function renderMemory() {
    const canvas = $("memory-chart");
    const width = widthOf(canvas, 800);
    if (canvas.width !== width) canvas.width = width;
    const ctx = canvas.getContext("2d");
    const h = canvas.height;
    ctx.clearRect(0, 0, width, h);
    const ws = sortedWorkers();
    if (!ws.length) return;
    let top = 1;
    for (const w of ws) top = Math.max(top, w.memory, w.managed + w.spilled);
    const slot = width / ws.length, bw = Math.max(1, slot - (slot > 4 ? 2 : 0));
    const colours = {managed: "#5b9bd5", unmanaged: "#a9c8e8", spilled: "#9e7bb5"};
    ws.forEach((w, i) => {
      const managed = Math.min(w.managed, w.memory || w.managed);
      const parts = [["managed", managed], ["unmanaged", Math.max(0, w.memory - managed)], ["spilled", w.spilled || 0]];
      let y = h;
      for (const [k, v] of parts) {
        const ph = (h - 4) * v / top;
        ctx.fillStyle = colours[k];
        ctx.fillRect(i * slot, y - ph, bw, ph);
        y -= ph;
      }
    });
    const largest = ws.reduce((a, b) => (b.memory > a.memory ? b : a));
    $("memory-scale").textContent = "(scaled to the largest: " + bytes(top) + ", " + largest.name + ")";
  }

  function renderProgress() {
    const box = $("progress");
    const now = S.time;
    const erred = new Set(S.erred);
    const groups = [...S.groups.values()].filter((g) => {
      if (erred.has(g.name)) return true;
      if (g.total <= 0 && g.forgotten <= 0) return false;
      const finished = g.processing + g.waiting === 0;
      return !finished || now - (g.changed || now) < FINISHED_HIDE_S;
    }).sort((a, b) => (erred.has(b.name) - erred.has(a.name)) || a.name.localeCompare(b.name));
    const hidden = S.groups.size - groups.length;
    $("progress-note").textContent = hidden > 0 ? "(" + hidden + " finished earlier: see History)" : "";
    const rows = [];
    for (const g of groups) {
      const total = Math.max(g.total, 1);
      const row = el("div", {class: "group" + (erred.has(g.name) ? " has-errors" : ""), "data-group": g.name});
      const name = el("span", {class: "name", title: g.name}, g.name);
      name.prepend(el("i", {class: "swatch", style: "background:" + color(g.name)}));
      row.appendChild(name);
      row.appendChild(bar([["done", g.done / total], ["processing", g.processing / total],
                           ["erred", g.erred / total], ["waiting", g.waiting / total]], ""));
      const nums = el("span", {class: "numbers"});
      nums.appendChild(el("b", {class: "done"}, g.done + " / " + g.total));
      nums.appendChild(document.createTextNode(" done · "));
      nums.appendChild(el("span", {class: "processing"}, String(g.processing)));
      nums.appendChild(document.createTextNode(" running · "));
      nums.appendChild(el("span", {class: "waiting"}, String(g.waiting)));
      nums.appendChild(document.createTextNode(" waiting · "));
      nums.appendChild(el("span", {class: "erred"}, String(Math.max(g.erred, g.nerred || 0))));
      nums.appendChild(document.createTextNode(" erred"));
      if (erred.has(g.name)) {
        const b = el("button", {type: "button", class: "dismiss", title: "hide this group's failures"}, "dismiss");
        b.onclick = () => fetch("/api/dismiss?group=" + encodeURIComponent(g.name), {method: "POST"});
        nums.appendChild(b);
      }
      row.appendChild(nums);
      rows.push(row);
    }
    box.replaceChildren(...rows);
  }

  function renderStream() {
    const svg = $("stream");
    const width = widthOf(svg, 800);
    // the recent past; when nothing ran lately, the last activity (the last computation stays visible)
    const lastStop = S.stream.length ? S.stream[S.stream.length - 1][5] || 0 : 0;
    const end = lastStop && S.time - lastStop > WINDOW_S ? lastStop + 0.5 : S.time;
    const start = end - WINDOW_S;
    const x = (t) => 90 + (width - 95) * (t - start) / WINDOW_S;
    const tasks = S.stream.filter((e) => e[5] !== null && e[5] >= start && e[4] <= end);
    const transfers = S.transfers.filter((t) => t[3] >= start);
    const names = new Map([...S.workers.values()].map((w) => [w.address, w.name]));
    const rows = new Map();
    const threads = new Map();
    for (const e of tasks) {
      if (!threads.has(e[2])) threads.set(e[2], new Map());
      const m = threads.get(e[2]);
      if (!m.has(e[3])) m.set(e[3], m.size);
    }
    let hiddenRows = 0;
    for (const [addr, m] of [...threads.entries()].sort()) {
      for (const [thread, i] of m) {
        if (rows.size >= STREAM_ROWS) { hiddenRows++; continue; }
        rows.set(addr + "|" + thread, {label: (names.get(addr) || addr) + " #" + i, index: rows.size});
      }
    }
    for (const t of transfers) {
      const k = t[0] + "|transfer";
      if (rows.has(k)) continue;
      if (rows.size >= STREAM_ROWS) { hiddenRows++; continue; }
      rows.set(k, {label: (names.get(t[0]) || t[0]) + " fetch", index: rows.size});
    }
    const rowH = 16;
    svg.setAttribute("height", Math.max(40, rows.size * rowH + 20));
    const out = [];
    for (const [, r] of rows) out.push(el("svg:text", {x: 2, y: r.index * rowH + 12}, r.label));
    for (const e of tasks) {
      const r = rows.get(e[2] + "|" + e[3]);
      if (!r) continue;
      const x0 = x(Math.max(e[4], start)), x1 = x(e[5]);
      const rect = el("svg:rect", {class: "task", x: x0, y: r.index * rowH + 2,
        width: Math.max(1, x1 - x0), height: rowH - 4, fill: e[6] === "OK" ? color(e[1]) : "#000",
        "data-group": e[1]});
      rect.appendChild(el("svg:title", {}, readable(e[0]) + " (" + e[1] + ") " + secs(e[5] - e[4])));
      out.push(rect);
    }
    for (const t of transfers) {
      const r = rows.get(t[0] + "|transfer");
      if (!r) continue;
      const x0 = x(Math.max(t[2], start)), x1 = x(t[3]);
      const rect = el("svg:rect", {class: "transfer", x: x0, y: r.index * rowH + 4,
        width: Math.max(1, x1 - x0), height: rowH - 8});
      rect.appendChild(el("svg:title", {}, "fetched " + t[5] + " value(s), " + bytes(t[4]) + " from " + t[1]));
      out.push(rect);
    }
    const axisY = rows.size * rowH + 14;
    for (let s = 0; s <= WINDOW_S; s += 2) out.push(el("svg:text", {x: x(start + s) - 8, y: axisY}, (s - WINDOW_S) + "s"));
    svg.replaceChildren(...out);
    $("stream-window").textContent = (end < S.time - 1
      ? "(the last activity, ended " + clock(lastStop) + "; " + tasks.length + " tasks"
      : "(last " + WINDOW_S + " s; " + tasks.length + " tasks") +
      (hiddenRows ? "; the first " + STREAM_ROWS + " rows of " + (STREAM_ROWS + hiddenRows) : "") + ")";
  }

  // A line chart: series = [{points: [[t, v]], colour, label}] in one viewBox 400 x 120.
  function lines(svgId, series, opts) {
    const svg = $(svgId);
    const out = [];
    let t0 = Infinity, t1 = -Infinity, max = (opts && opts.min) || 1e-9;
    for (const s of series) for (const p of s.points) { t0 = Math.min(t0, p[0]); t1 = Math.max(t1, p[0]); max = Math.max(max, p[1]); }
    for (const s of series) {
      if (s.points.length < 2) continue;
      const pts = s.points.map((p) => (400 * (p[0] - t0) / Math.max(t1 - t0, 1e-9)).toFixed(1) + "," +
                                       (118 - 108 * p[1] / max).toFixed(1)).join(" ");
      const line = el("svg:polyline", {points: pts});
      if (s.colour) line.setAttribute("style", "stroke:" + s.colour);
      line.appendChild(el("svg:title", {}, s.label || ""));
      out.push(line);
    }
    const fmt = (opts && opts.format) || ((v) => v.toFixed(0));
    if (isFinite(max) && series.some((s) => s.points.length > 1)) out.push(el("svg:text", {x: 2, y: 10, class: "axis"}, fmt(max)));
    svg.replaceChildren(...out);
  }

  function renderRates() {
    const series = S.series.slice(-240);
    lines("throughput", [{points: series.map((s) => [s[0], s[1]])}]);
    lines("bytes", [{points: series.map((s) => [s[0], s[2]])}], {format: bytes});
    const last = series[series.length - 1];
    $("throughput-now").textContent = last ? "(now " + last[1].toFixed(0) + ")" : "";
    $("bytes-now").textContent = last ? "(now " + bytes(last[2]) + "/s)" : "";
  }

  function renderEvents() {
    const items = S.events.slice().reverse().map(([t, text]) => {
      const li = el("li", {class: "event"});
      li.appendChild(el("time", {}, clock(t)));
      li.appendChild(document.createTextNode(text));
      return li;
    });
    $("events").replaceChildren(...items);
  }

  // ------------------------------------------------------------------ graph page

  function layers(names, edges) {
    // longest path from a source: the layer of each node
    const parents = new Map(names.map((n) => [n, []]));
    for (const [a, b] of edges) if (parents.has(a) && parents.has(b)) parents.get(b).push(a);
    const depth = new Map();
    const visit = (n, guard) => {
      if (depth.has(n)) return depth.get(n);
      if (guard > 500) return 0;
      depth.set(n, 0);  // cycles (none expected) stop here
      let d = 0;
      for (const p of parents.get(n)) d = Math.max(d, visit(p, guard + 1) + 1);
      depth.set(n, d);
      return d;
    };
    for (const n of names) visit(n, 0);
    return depth;
  }
  function stateOf(g) {
    if (g.erred > 0) return "erred";
    if (g.processing > 0) return "processing";
    if (g.waiting > 0 && g.done === 0) return "waiting";
    return g.waiting > 0 ? "processing" : "done";
  }
  function renderGraph() {
    const svg = $("graph");
    const width = widthOf(svg, 1000);
    const byTask = $("graph-tasks").checked && S.tasks;
    const out = [el("svg:defs")];
    out[0].appendChild(el("svg:marker", {id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 6, markerHeight: 6, orient: "auto"}))
      .appendChild(el("svg:path", {d: "M0,0 L10,5 L0,10 z", fill: "#999"}));
    let nodes, edges;
    if (byTask) {
      nodes = S.tasks.map((t) => ({id: t[0], label: readable(t[0]), group: t[1], state: t[2], total: 1}));
      edges = [];
      for (const t of S.tasks) for (const d of t[3]) edges.push([d, t[0], 1]);
      $("graph-note").textContent = "(" + nodes.length + " tasks)";
    } else {
      const known = new Set(S.graph.nodes.map((n) => n[0]));
      nodes = [...S.groups.values()].filter((g) => known.has(g.name) && (g.total > 0 || g.forgotten > 0))
        .map((g) => ({id: g.name, label: g.name, group: g.name, state: stateOf(g), total: Math.max(g.total, g.forgotten), g: g}));
      const shown = new Set(nodes.map((n) => n.id));
      edges = S.graph.edges.filter((e) => shown.has(e[0]) && shown.has(e[1]));
      $("graph-note").textContent = "(" + nodes.length + " groups, " + edges.length + " edges" +
        (S.tasks ? "; small enough to show task by task" : "") + ")";
    }
    const depth = layers(nodes.map((n) => n.id), edges);
    const columns = new Map();
    for (const n of nodes) {
      const d = depth.get(n.id) || 0;
      if (!columns.has(d)) columns.set(d, []);
      columns.get(d).push(n);
    }
    const ncols = Math.max(1, columns.size);
    const maxRows = Math.max(1, ...[...columns.values()].map((c) => c.length));
    const rowH = byTask ? 22 : 70;
    const height = Math.max(200, maxRows * rowH + 40);
    svg.setAttribute("height", height);
    const colW = (width - 40) / ncols;
    const maxTotal = Math.max(1, ...nodes.map((n) => n.total));
    const pos = new Map();
    const parentsOf = new Map();
    for (const [a, b] of edges) { if (!parentsOf.has(b)) parentsOf.set(b, []); parentsOf.get(b).push(a); }
    const ys = new Map();  // a column after the first is ordered by its nodes' parents (fewer crossings)
    for (const d of [...columns.keys()].sort((a, b) => a - b)) {
      const col = columns.get(d);
      const centre = (n) => { const ps = (parentsOf.get(n.id) || []).filter((p) => ys.has(p));
        return ps.length ? ps.reduce((t, p) => t + ys.get(p), 0) / ps.length : Infinity; };
      col.sort((a, b) => (centre(a) - centre(b)) || COLLATOR.compare(a.id, b.id));
      col.forEach((n, i) => { const y = 20 + (height - 40) * (i + 0.5) / col.length; ys.set(n.id, y); pos.set(n.id, [20 + colW * (d + 0.5), y]); });
    }
    const radius = (n) => byTask ? 6 : 8 + 22 * Math.sqrt(n.total / maxTotal);
    const nodeOf = new Map(nodes.map((n) => [n.id, n]));
    for (const [a, b, count] of edges) {
      const p = pos.get(a), q = pos.get(b);
      if (!p || !q) continue;
      const ra = radius(nodeOf.get(a)), rb = radius(nodeOf.get(b));
      const dx = q[0] - p[0], dy = q[1] - p[1], len = Math.max(1, Math.hypot(dx, dy));
      const line = el("svg:line", {class: "edge", x1: p[0] + dx * ra / len, y1: p[1] + dy * ra / len,
        x2: q[0] - dx * rb / len, y2: q[1] - dy * rb / len, "marker-end": "url(#arrow)"});
      line.appendChild(el("svg:title", {}, a + " → " + b + (count > 1 ? " (" + count + " task edges)" : "")));
      out.push(line);
    }
    for (const n of nodes) {
      const [cx, cy] = pos.get(n.id);
      const r = radius(n);
      const gEl = el("svg:g", {class: byTask ? "task-node" : "group-node", "data-group": n.group, "data-state": n.state,
        "data-total": n.total, "data-done": n.g ? n.g.done : (n.state === "memory" || n.state === "released" ? 1 : 0)});
      if (n.g) {  // a group: a disc of its tasks' states, slice by slice (grey: waiting)
        gEl.appendChild(el("svg:circle", {cx: cx, cy: cy, r: r, fill: STATE_COLOURS.waiting}));
        const all = n.g.done + n.g.processing + n.g.erred + n.g.waiting, around = Math.PI * r;
        let start = 0;
        for (const state of ["done", "processing", "erred"]) {
          const share = all > 0 ? n.g[state] / all : 0;
          if (share <= 0) continue;
          gEl.appendChild(el("svg:circle", {class: "slice", "data-state": state, cx: cx, cy: cy, r: r / 2, fill: "none",
            stroke: STATE_COLOURS[state], "stroke-width": r, "stroke-dasharray": (share * around).toFixed(2) + " " + around.toFixed(2),
            "stroke-dashoffset": (-start * around).toFixed(2), transform: "rotate(-90 " + cx + " " + cy + ")"}));
          start += share;
        }
        gEl.appendChild(el("svg:circle", {cx: cx, cy: cy, r: r, fill: "none", stroke: color(n.group), "stroke-width": 4}));
      } else {
        gEl.appendChild(el("svg:circle", {cx: cx, cy: cy, r: r, fill: STATE_COLOURS[n.state] || "#bdbdbd",
          stroke: color(n.group), "stroke-width": 2}));
      }
      if (n.g && n.g.total > 0) {  // progress as an arc
        const frac = n.g.done / n.g.total;
        const c = 2 * Math.PI * (r + 4);
        gEl.appendChild(el("svg:circle", {cx: cx, cy: cy, r: r + 4, fill: "none", stroke: STATE_COLOURS.done, "stroke-width": 3,
          "stroke-dasharray": (c * frac).toFixed(1) + " " + c.toFixed(1), transform: "rotate(-90 " + cx + " " + cy + ")"}));
      }
      const text = n.g ? n.label + " " + n.g.done + "/" + n.g.total : "";
      if (!byTask) {
        const label = el("svg:text", {x: cx, y: cy + r + 16, "text-anchor": "middle", class: "label"},
          text.length > 28 ? text.slice(0, 27) + "…" : text);
        gEl.appendChild(label);
      }
      gEl.appendChild(el("svg:title", {}, n.g ? n.label + ": " + n.g.done + " done, " + n.g.processing + " processing, " +
        n.g.waiting + " waiting, " + n.g.erred + " erred of " + n.g.total : n.label + " (" + n.state + ")"));
      out.push(gEl);
    }
    svg.replaceChildren(...out);
  }

  // ------------------------------------------------------------------ worker page

  let workerSystem = null, workerSystemAt = 0, workerLog = [];
  function drawWorkerLog(address, w) {
    // the worker's own log lines and what the scheduler logged about it, newest first
    const name = w ? w.name : address;
    const about = S.events.filter(([, text]) => text.includes(address) || (name && text.includes("worker " + name + " ")))
      .map(([t, text]) => [t, "scheduler", text]);
    const lines = workerLog.map(([t, level, text]) => [t, level, text]).concat(about).sort((a, b) => b[0] - a[0]);
    $("worker-events").replaceChildren(...lines.slice(0, 200).map(([t, level, text]) => {
      const li = el("li", {class: "log " + level.toLowerCase()});
      li.appendChild(el("time", {}, clock(t)));
      li.appendChild(el("b", {class: "level"}, level + " "));
      li.appendChild(document.createTextNode(text));
      return li;
    }));
  }
  function renderWorker() {
    const address = PARAMS.get("address") || "";
    const w = S.workers.get(address);
    $("worker-address").textContent = address;
    $("worker-name").textContent = w ? w.name : "(not connected)";
    const facts = document.querySelector("#worker-facts tbody");
    if (w) {
      const rows = [["threads", w.nthreads], ["host", w.host], ["memory", bytes(w.memory) + " of " + (w.memory_limit ? bytes(w.memory_limit) : "no limit")],
        ["managed", bytes(w.managed)], ["spilled to disk", bytes(w.spilled || 0)], ["CPU", w.cpu.toFixed(0) + " %"],
        ["processing", w.processing], ["executing", w.executing], ["held values", w.held], ["last heard", w.last_seen_s.toFixed(1) + " s ago"]];
      facts.replaceChildren(...rows.map(([k, v]) => { const tr = el("tr"); tr.appendChild(el("th", {}, k)); tr.appendChild(el("td", {class: "fact", "data-fact": k}, String(v))); return tr; }));
      $("worker-processing-count").textContent = "(" + w.processing + (w.processing > w.keys.length ? "; the first " + w.keys.length : "") + ")";
      $("worker-processing").replaceChildren(...w.keys.map((k) => el("li", {class: "key"}, readable(k))));
    }
    const mine = S.stream.filter((e) => e[2] === address).slice(-200).reverse();
    $("worker-tasks-count").textContent = "(" + mine.length + " of the last " + S.stream.length + " in the task stream)";
    document.querySelector("#worker-tasks tbody").replaceChildren(...mine.map((e) => {
      const tr = el("tr", {class: "worker-task", "data-group": e[1]});
      for (const v of [readable(e[0]), e[1], e[3], e[4] === null ? "" : secs(e[5] - e[4]), e[5] === null ? "" : clock(e[5]), e[6]]) tr.appendChild(el("td", {}, String(v)));
      return tr;
    }));
    const moves = S.transfers.filter((t) => t[0] === address || t[1] === address).slice(-50).reverse();
    document.querySelector("#worker-transfers tbody").replaceChildren(...moves.map((t) => {
      const tr = el("tr");
      const inbound = t[0] === address;
      for (const v of [inbound ? "in" : "out", inbound ? t[1] : t[0], t[5], bytes(t[4]), secs(t[3] - t[2])]) tr.appendChild(el("td", {}, String(v)));
      return tr;
    }));
    drawWorkerLog(address, w);
    if (Date.now() - workerSystemAt > 2000) {
      workerSystemAt = Date.now();
      fetch("/api/system").then((r) => r.json()).then((s) => { workerSystem = s; drawWorkerSystem(address); });
      fetch("/api/logs?address=" + encodeURIComponent(address)).then((r) => r.json())
        .then((lines) => { workerLog = lines; drawWorkerLog(address, S.workers.get(address)); });
    }
  }
  function drawWorkerSystem(address) {
    const pts = (workerSystem && workerSystem.series[address]) || [];
    lines("worker-cpu", [{points: pts.map((p) => [p[0], p[1]])}], {min: 100});
    lines("worker-mem", [{points: pts.map((p) => [p[0], p[2]])}], {format: bytes});
  }

  // ------------------------------------------------------------------ profile page

  let profileVersion = -1, profileGroup = null, profileTree = null, profileChosen = null;
  function renderProfile() {
    const select = $("profile-group");
    if (S.profiles_version === profileVersion && profileGroup === select.value) return;
    profileVersion = S.profiles_version;
    fetch("/api/profile").then((r) => r.json()).then((info) => {
      const want = profileChosen || PARAMS.get("group") || info.groups[0] || "";
      select.replaceChildren(...info.groups.map((g) => el("option", {value: g}, g)));
      if (want) select.value = want;
      profileGroup = select.value;
      if (want && profileGroup !== want) profileVersion = -1;  // not sampled yet: ask again
      if (!profileGroup) { $("profile-note").textContent = "(no samples yet: run some tasks)"; return; }
      return fetch("/api/profile?group=" + encodeURIComponent(profileGroup)).then((r) => r.json()).then((p) => {
        profileTree = p.tree;
        drawFlame();
      });
    });
  }
  function drawFlame() {
    const svg = $("flame");
    const width = widthOf(svg, 1000);
    const tree = profileTree;
    if (!tree) { svg.replaceChildren(); return; }
    const rowH = 18, out = [];
    let maxDepth = 0;
    const total = Math.max(1, tree[1]);
    $("profile-note").textContent = "(" + total + " samples of " + profileGroup + "'s tasks)";
    const walk = (node, depth, x0, w) => {
      maxDepth = Math.max(maxDepth, depth);
      let x = x0;
      const children = node[2].slice().sort((a, b) => b[1] - a[1]);
      for (const c of children) {
        const cw = w * c[1] / Math.max(node[1], 1);
        if (cw < 0.5) continue;
        const [fn, file, line] = c[0].split(";");
        const g = el("svg:g", {class: "frame", "data-function": fn});
        g.appendChild(el("svg:rect", {x: x, y: depth * rowH, width: Math.max(0.5, cw - 0.5), height: rowH - 1, fill: flameColour(file || "")}));
        if (cw > 40) g.appendChild(el("svg:text", {x: x + 3, y: depth * rowH + 13}, fn.length * 7 > cw ? fn.slice(0, Math.floor(cw / 7)) + "…" : fn));
        g.appendChild(el("svg:title", {}, fn + "  " + file + ":" + line + "\n" + c[1] + " samples (" + (100 * c[1] / total).toFixed(1) + " %)"));
        out.push(g);
        walk(c, depth + 1, x, cw);
        x += cw;
      }
    };
    out.push(el("svg:rect", {x: 0, y: 0, width: width, height: rowH - 1, fill: "#d0d7e2"}));
    out.push(el("svg:text", {x: 3, y: 13}, "all " + profileGroup + " (" + total + " samples)"));
    walk(tree, 1, 0, width);
    svg.setAttribute("height", (maxDepth + 2) * rowH);
    svg.replaceChildren(...out);
  }
  function flameColour(file) {
    if (file.includes("site-packages") || file.includes("/lib/python")) return "#f2c894";
    if (file.includes("zfabric")) return "#b7c9e2";
    return "#f0a868";
  }

  // ------------------------------------------------------------------ system page

  let systemAt = 0;
  function renderSystem() {
    if (Date.now() - systemAt < 1500) return;
    systemAt = Date.now();
    fetch("/api/system").then((r) => r.json()).then((sys) => {
      const procs = Object.keys(sys.series);
      const last = (p) => { const s = sys.series[p]; return s.length ? s[s.length - 1][1] : 0; };
      const chosen = ["scheduler", ...procs.filter((p) => p !== "scheduler").sort((a, b) => last(b) - last(a)).slice(0, 12)]
        .filter((p) => sys.series[p]);
      const colourOf = (p) => p === "scheduler" ? "#23395d" : color(sys.names[p] || p);
      const rate = (pts, i, j) => pts.slice(1).filter((p, k) => pts[k][i] + pts[k][j] > 0)  // counters not yet reported: no rate
        .map((p) => { const q = pts[pts.indexOf(p) - 1]; return [p[0], Math.max(0, (p[i] + p[j] - q[i] - q[j]) / Math.max(p[0] - q[0], 1e-3))]; });
      const mk = (f) => chosen.map((p) => ({points: f(sys.series[p]), colour: colourOf(p), label: sys.names[p] || p}));
      lines("sys-cpu", mk((pts) => pts.map((p) => [p[0], p[1]])), {min: 100});
      lines("sys-mem", mk((pts) => pts.map((p) => [p[0], p[2]])), {format: bytes});
      lines("sys-net", mk((pts) => rate(pts, 5, 6)), {format: (v) => bytes(v) + "/s"});
      lines("sys-disk", mk((pts) => rate(pts, 3, 4)), {format: (v) => bytes(v) + "/s"});
      $("sys-legend").replaceChildren(...chosen.map((p) => {
        const s = el("span", {class: "process", "data-process": p});
        s.appendChild(el("i", {style: "background:" + colourOf(p)}));
        s.appendChild(document.createTextNode(sys.names[p] || p));
        return s;
      }));
    });
  }

  // ------------------------------------------------------------------ history page

  function renderHistory() {
    const pts = S.coarse.filter((p) => !S.fine.length || p[0] < S.fine[0][0]).concat(S.fine);
    if (!pts.length) { $("history-note").textContent = "(nothing yet)"; return; }
    $("history-note").textContent = "(" + clock(pts[0][0]) + " to " + clock(pts[pts.length - 1][0]) +
      "; one point a second for the last 5 minutes, one per 10 s before)";
    lines("hist-rate", [{points: pts.map((p) => [p[0], p[1]])}]);
    lines("hist-mem", [{points: pts.map((p) => [p[0], p[3]])}, {points: pts.map((p) => [p[0], p[4]]), colour: "#5b9bd5", label: "managed"}], {format: bytes});
    const groups = new Map();
    for (const p of pts) {
      for (const [name, [n, busy]] of Object.entries(p[8])) {
        let g = groups.get(name);
        if (!g) groups.set(name, g = {name: name, n: 0, busy: 0, first: p[0], last: p[0]});
        g.n += n; g.busy += busy; g.last = p[0];
      }
    }
    // busy time by group: stacked bars over time
    const svg = $("hist-groups");
    const width = widthOf(svg, 1000), height = 160;
    const t0 = pts[0][0], t1 = Math.max(pts[pts.length - 1][0], t0 + 1);
    let max = 1e-9;
    for (const p of pts) max = Math.max(max, Object.values(p[8]).reduce((s, v) => s + v[1], 0));
    const out = [];
    pts.forEach((p, i) => {
      const x = 30 + (width - 35) * (p[0] - t0) / (t1 - t0);
      const next = i + 1 < pts.length ? 30 + (width - 35) * (pts[i + 1][0] - t0) / (t1 - t0) : x + 3;
      let y = height - 2;
      for (const [name, [n, busy]] of Object.entries(p[8])) {
        const h = (height - 12) * busy / max;
        const r = el("svg:rect", {class: "hist-bar", x: x, y: y - h, width: Math.max(1, next - x - 0.5), height: h, fill: color(name), "data-group": name});
        r.appendChild(el("svg:title", {}, name + ": " + n + " tasks, " + secs(busy) + " busy, at " + clock(p[0])));
        out.push(r);
        y -= h;
      }
    });
    svg.replaceChildren(...out);
    const rows = [...groups.values()].sort((a, b) => b.last - a.last).map((g) => {
      const tr = el("tr", {class: "hist-group", "data-group": g.name, "data-n": g.n});
      const name = el("td", {class: "name", title: g.name}, g.name);
      name.prepend(el("i", {class: "swatch", style: "background:" + color(g.name)}));
      tr.appendChild(name);
      for (const v of [g.n, secs(g.busy), clock(g.first), clock(g.last)]) tr.appendChild(el("td", {class: "num"}, String(v)));
      return tr;
    });
    document.querySelector("#hist-table tbody").replaceChildren(...rows);
  }

  // ------------------------------------------------------------------ all pages

  const PAGES = {
    status: [renderWorkers, renderMemory, renderProgress, renderStream, renderRates, renderEvents],
    graph: [renderGraph], worker: [renderWorker], profile: [renderProfile], system: [renderSystem],
    history: [renderHistory],
  };
  const renderers = PAGES[PAGE] || PAGES.status;
  const page = $("page-" + (PAGES[PAGE] ? PAGE : "status"));
  page.hidden = false;
  for (const a of document.querySelectorAll("#nav a")) if (a.dataset.page === PAGE) a.className = "active";

  // Render time per update (the Performance API): window.zfabricRender, and the footer.
  const timing = window.zfabricRender = {count: 0, last: 0, max: 0, total: 0};
  let pending = false;
  function draw() {
    pending = false;
    const t0 = performance.now();
    $("scheduler").textContent = "scheduler " + S.address;
    let threads = 0;
    for (const w of S.workers.values()) threads += w.nthreads;
    const t = S.totals || {};
    $("summary").textContent = S.workers.size + " workers · " + threads + " threads · " +
      (t.processing || 0) + " processing · " + ((t.new || 0) + (t.waiting || 0) + (t.queued || 0)) + " waiting · " +
      (S.counters.finished || 0) + " finished";
    for (const f of renderers) {
      try { f(); } catch (err) { console.error(f.name, err); }
    }
    const live = $("live");
    live.textContent = "● live " + clock(S.time);
    live.className = "ok";
    const ms = performance.now() - t0;
    performance.measure("zfabric-render", {start: t0, duration: ms});
    timing.count++; timing.last = ms; timing.max = Math.max(timing.max, ms); timing.total += ms;
    $("render-time").textContent = "render " + ms.toFixed(1) + " ms (mean " + (timing.total / timing.count).toFixed(1) + ", max " + timing.max.toFixed(1) + ")";
    document.body.setAttribute("data-updates", String(timing.count));
  }
  function schedule() {
    if (!pending) { pending = true; requestAnimationFrame(draw); }
  }

  $("workers-prev").onclick = () => { workersPage = Math.max(0, workersPage - 1); schedule(); };
  $("workers-next").onclick = () => { workersPage++; schedule(); };
  $("workers-filter").oninput = () => { workersPage = 0; schedule(); };
  $("graph-tasks").onchange = schedule;
  $("profile-group").onchange = () => { profileChosen = $("profile-group").value; profileVersion = -1; schedule(); };

  const source = new EventSource("/events");
  source.onmessage = (msg) => { merge(JSON.parse(msg.data)); schedule(); };
  source.onerror = () => { const l = $("live"); l.textContent = "○ reconnecting"; l.className = "stale"; };
})();
