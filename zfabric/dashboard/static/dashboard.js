// zfabric dashboard: renders the scheduler's snapshots from /events (server-sent events).
"use strict";
(function () {
  const WINDOW_S = 10;  // the task stream shows this much of the recent past
  const $ = (id) => document.getElementById(id);
  const SVG = "http://www.w3.org/2000/svg";

  function bytes(n) {
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    n = Math.max(0, n || 0);
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : n.toFixed(0)) + " " + units[i];
  }
  function color(name) {
    let h = 0;
    for (let i = 0; i < name.length; i++) h = (h * 31 + name.charCodeAt(i)) >>> 0;
    return "hsl(" + (h % 360) + ",65%,52%)";
  }
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

  function renderWorkers(snap) {
    const body = document.querySelector("#workers tbody");
    body.replaceChildren();
    const workers = snap.workers.slice().sort((a, b) => a.name.localeCompare(b.name, undefined, {numeric: true}));
    for (const w of workers) {
      const tr = el("tr", {class: "worker", "data-address": w.address});
      const limit = w.memory_limit || Math.max(w.memory, 1);
      const managed = Math.min(w.managed, w.memory || w.managed);
      const unmanaged = Math.max(0, w.memory - managed);
      const memLabel = bytes(w.memory) + " / " + (w.memory_limit ? bytes(w.memory_limit) : "no limit");
      const cells = [
        [w.name], [w.address], [w.nthreads, "num"], null,
        [w.cpu.toFixed(0) + " %", "num"], [w.processing, "num processing"],
        [w.held, "num held"], [bytes(w.nbytes), "num nbytes"],
      ];
      for (const c of cells) {
        if (c === null) {
          const td = el("td", {class: "memory"});
          td.appendChild(bar([["managed", managed / limit], ["unmanaged", unmanaged / limit]], memLabel));
          tr.appendChild(td);
        } else {
          tr.appendChild(el("td", c[1] ? {class: c[1]} : {}, String(c[0])));
        }
      }
      body.appendChild(tr);
    }
  }

  function renderProgress(snap) {
    const box = $("progress");
    box.replaceChildren();
    const groups = snap.groups.filter((g) => g.total > 0 || g.forgotten > 0)
      .sort((a, b) => a.name.localeCompare(b.name));
    for (const g of groups) {
      const total = Math.max(g.total, 1);
      const row = el("div", {class: "group", "data-group": g.name});
      row.appendChild(el("span", {class: "name", title: g.name}, g.name));
      row.appendChild(bar([["done", g.done / total], ["processing", g.processing / total],
                           ["erred", g.erred / total], ["waiting", g.waiting / total]], ""));
      const nums = el("span", {class: "numbers"});
      nums.appendChild(el("b", {class: "done"}, g.done + " / " + g.total));
      nums.appendChild(document.createTextNode(" done · "));
      nums.appendChild(el("span", {class: "processing"}, String(g.processing)));
      nums.appendChild(document.createTextNode(" running · "));
      nums.appendChild(el("span", {class: "waiting"}, String(g.waiting)));
      nums.appendChild(document.createTextNode(" waiting · "));
      nums.appendChild(el("span", {class: "erred"}, String(g.erred)));
      nums.appendChild(document.createTextNode(" erred"));
      row.appendChild(nums);
      box.appendChild(row);
    }
  }

  function renderStream(snap) {
    const svg = $("stream");
    const width = svg.clientWidth || 800;
    const end = snap.time, start = end - WINDOW_S;
    const x = (t) => 90 + (width - 95) * (t - start) / WINDOW_S;
    // one row per worker thread that ran something in the window, plus one row of transfers per worker
    const rows = new Map();
    const rowOf = (key, label) => {
      if (!rows.has(key)) rows.set(key, {label: label, index: 0});
      return rows.get(key);
    };
    const tasks = snap.stream.filter((e) => e[5] !== null && e[5] >= start);
    const transfers = snap.transfers.filter((t) => t[3] >= start);
    const names = new Map(snap.workers.map((w) => [w.address, w.name]));
    const threadIdx = new Map();
    for (const e of tasks) {
      const k = e[2];
      if (!threadIdx.has(k)) threadIdx.set(k, new Map());
      const m = threadIdx.get(k);
      if (!m.has(e[3])) m.set(e[3], m.size);
    }
    const keys = [];
    for (const [addr, m] of [...threadIdx.entries()].sort()) {
      for (const [thread, i] of m) keys.push([addr + "|" + thread, (names.get(addr) || addr) + " #" + i]);
    }
    for (const t of transfers) {
      if (!threadIdx.has(t[0])) keys.push([t[0] + "|transfer", (names.get(t[0]) || t[0]) + " fetch"]);
      else if (!keys.some((k) => k[0] === t[0] + "|transfer")) keys.push([t[0] + "|transfer", (names.get(t[0]) || t[0]) + " fetch"]);
    }
    const seen = new Set();
    keys.forEach(([k, label]) => { if (!seen.has(k)) { seen.add(k); rowOf(k, label).index = rows.size - 1; } });
    const rowH = 16;
    svg.setAttribute("height", Math.max(40, rows.size * rowH + 20));
    svg.replaceChildren();
    for (const [, r] of rows) {
      svg.appendChild(el("svg:text", {x: 2, y: r.index * rowH + 12}, r.label));
    }
    for (const e of tasks) {
      const r = rows.get(e[2] + "|" + e[3]);
      const x0 = x(Math.max(e[4], start)), x1 = x(e[5]);
      const rect = el("svg:rect", {class: "task", x: x0, y: r.index * rowH + 2,
        width: Math.max(1, x1 - x0), height: rowH - 4, fill: e[6] === "OK" ? color(e[1]) : "#000",
        "data-group": e[1]});
      rect.appendChild(el("svg:title", {}, e[0] + " (" + e[1] + ") " + ((e[5] - e[4]) * 1000).toFixed(1) + " ms"));
      svg.appendChild(rect);
    }
    for (const t of transfers) {
      const r = rows.get(t[0] + "|transfer");
      if (!r) continue;
      const x0 = x(Math.max(t[2], start)), x1 = x(t[3]);
      const rect = el("svg:rect", {class: "transfer", x: x0, y: r.index * rowH + 4,
        width: Math.max(1, x1 - x0), height: rowH - 8});
      rect.appendChild(el("svg:title", {}, "fetched " + t[5] + " value(s), " + bytes(t[4]) + " from " + t[1]));
      svg.appendChild(rect);
    }
    const axisY = rows.size * rowH + 14;
    for (let s = 0; s <= WINDOW_S; s += 2) {
      svg.appendChild(el("svg:text", {x: x(start + s) - 8, y: axisY}, (s - WINDOW_S) + "s"));
    }
    $("stream-window").textContent = "(last " + WINDOW_S + " s; " + tasks.length + " tasks)";
  }

  function line(svgId, points) {
    const svg = $(svgId);
    svg.replaceChildren();
    if (points.length < 2) return;
    const t0 = points[0][0], t1 = points[points.length - 1][0];
    const max = Math.max(1, ...points.map((p) => p[1]));
    const pts = points.map((p) => (400 * (p[0] - t0) / Math.max(t1 - t0, 1e-9)).toFixed(1) + "," +
                                   (118 - 112 * p[1] / max).toFixed(1)).join(" ");
    svg.appendChild(el("svg:polyline", {points: pts}));
  }

  function renderRates(snap) {
    const series = snap.series.slice(-240);
    line("throughput", series.map((s) => [s[0], s[1]]));
    line("bytes", series.map((s) => [s[0], s[2]]));
    const last = series[series.length - 1];
    $("throughput-now").textContent = last ? "(now " + last[1].toFixed(0) + ")" : "";
    $("bytes-now").textContent = last ? "(now " + bytes(last[2]) + "/s)" : "";
  }

  function renderEvents(snap) {
    const ul = $("events");
    ul.replaceChildren();
    for (const [t, text] of snap.events.slice().reverse()) {
      const li = el("li", {class: "event"});
      li.appendChild(el("time", {}, new Date(t * 1000).toLocaleTimeString()));
      li.appendChild(document.createTextNode(text));
      ul.appendChild(li);
    }
  }

  function render(snap) {
    $("scheduler").textContent = "scheduler " + snap.address;
    const threads = snap.workers.reduce((n, w) => n + w.nthreads, 0);
    const t = snap.totals;
    $("summary").textContent = snap.workers.length + " workers · " + threads + " threads · " +
      t.processing + " processing · " + (t.new + t.waiting + t.queued) + " waiting · " +
      snap.counters.finished + " finished";
    for (const f of [renderWorkers, renderProgress, renderStream, renderRates, renderEvents]) {
      try { f(snap); } catch (err) { console.error(f.name, err); }
    }
    const live = $("live");
    live.textContent = "● live " + new Date(snap.time * 1000).toLocaleTimeString();
    live.className = "ok";
    document.body.setAttribute("data-updates", String(1 + Number(document.body.getAttribute("data-updates") || 0)));
  }

  const source = new EventSource("/events");
  source.onmessage = (msg) => render(JSON.parse(msg.data));
  source.onerror = () => { const l = $("live"); l.textContent = "○ reconnecting"; l.className = "stale"; };
})();
