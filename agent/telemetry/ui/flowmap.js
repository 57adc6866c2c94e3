// nodemesh live flow map: plain JS + SVG, no dependencies. Reads /config_dump (workloads, what is
// enrolled on this node) and the Server-Sent Events stream /flows/events (flow records,
// schema nodemesh.flow/v2). Read-only: it never sends anything but GETs.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const MAX_ROWS = 500;
const CATEGORIES = ["allowed", "plaintext", "denied"];
const TERMINAL = new Set(["close", "deny", "auth_failure", "reject"]);
const OUTSIDE = "outside the mesh";

const state = {
  workloads: new Set(),   // "ns/name" from the configuration
  external: new Set(),    // addresses of peers that are no workload
  local: new Set(),       // workloads enrolled on this node (their source records are here)
  edges: new Map(),       // "src>dst|category" -> {src, dst, category, count, ports:Set}
  connections: 0,
  opened: false,
};

function el(name, attrs, parent) {
  const e = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (parent) parent.appendChild(e);
  return e;
}

function nodeOf(ep) {
  return ep.workload ? `${ep.namespace || "?"}/${ep.workload}` : (ep.ip || "unknown");
}

function category(rec) {
  if (rec.verdict === "denied") return "denied";
  return rec.connection_security_policy === "none" ? "plaintext" : "allowed";
}

// --- map ---------------------------------------------------------------------------------

function groups() {
  const byNs = new Map();
  for (const ref of state.workloads) {
    const ns = ref.split("/")[0];
    if (!byNs.has(ns)) byNs.set(ns, []);
    byNs.get(ns).push(ref);
  }
  const out = [...byNs.keys()].sort().map((ns) => ({ name: ns, members: byNs.get(ns).sort() }));
  if (state.external.size) out.push({ name: OUTSIDE, members: [...state.external].sort() });
  return out;
}

function layout() {
  // Namespaces side by side, as wide as their share of workloads; inside each, the workloads
  // on a ring, so an edge between two of them never runs through a third.
  const gs = groups();
  const width = 1100, height = 430, gap = 16, top = 48;
  const weights = gs.map((g) => Math.max(1.2, Math.sqrt(g.members.length) * 1.3));
  const total = weights.reduce((a, b) => a + b, 0) || 1;
  const pos = new Map();
  let x = gap;
  gs.forEach((g, i) => {
    g.x = x; g.w = (width - gap * (gs.length + 1)) * weights[i] / total;
    x += g.w + gap;
    const cx = g.x + g.w / 2, cy = top + (height - top) / 2 - 8, n = g.members.length;
    const rx = Math.max(0, g.w / 2 - 80), ry = (height - top) / 2 - 70;
    g.members.forEach((ref, j) => {
      if (n === 1) { pos.set(ref, { x: cx, y: cy }); return; }
      const a = (n === 2 ? Math.PI : -Math.PI / 2) + (2 * Math.PI * j) / n;
      pos.set(ref, { x: cx + rx * Math.cos(a), y: cy + ry * Math.sin(a) });
    });
  });
  return { gs, pos, width, height };
}

function draw() {
  const svg = document.getElementById("map");
  const { gs, pos, width, height } = layout();
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.replaceChildren();
  const defs = el("defs", {}, svg);
  for (const c of CATEGORIES) {
    const m = el("marker", { id: `arrow-${c}`, viewBox: "0 0 10 10", refX: 9, refY: 5,
      markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" }, defs);
    el("path", { d: "M0,0 L10,5 L0,10 z", class: `arrowhead ${c}` }, m);
  }
  for (const g of gs) {
    const box = el("g", { class: g.name === OUTSIDE ? "ns outside" : "ns", "data-namespace": g.name }, svg);
    el("rect", { x: g.x, y: 12, width: g.w, height: height - 24, rx: 10 }, box);
    const t = el("text", { x: g.x + 12, y: 34 }, box);
    t.textContent = g.name === OUTSIDE ? OUTSIDE : `namespace ${g.name}`;
  }
  const edgeLayer = el("g", { class: "edges" }, svg);
  for (const ref of pos.keys()) {
    const p = pos.get(ref);
    const local = state.local.has(ref);
    const g = el("g", { class: local ? "wl local" : "wl", "data-workload": ref }, svg);
    el("circle", { cx: p.x, cy: p.y, r: 16 }, g);
    const t = el("text", { x: p.x, y: p.y + 36, "text-anchor": "middle" }, g);
    t.textContent = ref.includes("/") ? ref.split("/")[1] : ref;
    if (local) {
      const tag = el("text", { x: p.x, y: p.y + 52, "text-anchor": "middle", class: "tag" }, g);
      tag.textContent = "on this node";
    }
  }
  // Edges between the same pair fan out so that each category stays visible.
  const pairIndex = new Map();
  const sorted = [...state.edges.values()].sort((a, b) =>
    CATEGORIES.indexOf(a.category) - CATEGORIES.indexOf(b.category));
  for (const e of sorted) {
    const a = pos.get(e.src), b = pos.get(e.dst);
    if (!a || !b || e.src === e.dst) continue;
    const pair = `${e.src}>${e.dst}`;
    const n = pairIndex.get(pair) || 0;
    pairIndex.set(pair, n + 1);
    drawEdge(edgeLayer, e, a, b, 28 + n * 26);
  }
  const totals = document.getElementById("totals");
  const by = { allowed: 0, plaintext: 0, denied: 0 };
  for (const e of state.edges.values()) by[e.category] += e.count;
  totals.textContent = `${state.connections} connections: ${by.allowed} allowed, ` +
    `${by.plaintext} plaintext, ${by.denied} denied`;
}

function drawEdge(layer, e, a, b, bend) {
  const dx = b.x - a.x, dy = b.y - a.y, len = Math.hypot(dx, dy) || 1;
  const ux = dx / len, uy = dy / len, r = 20;
  const p0 = { x: a.x + ux * r, y: a.y + uy * r }, p2 = { x: b.x - ux * (r + 2), y: b.y - uy * (r + 2) };
  const c = { x: (a.x + b.x) / 2 - uy * bend, y: (a.y + b.y) / 2 + ux * bend };
  const g = el("g", { class: `edge ${e.category}`, "data-edge": `${e.src}>${e.dst}`,
    "data-kind": e.category, "data-count": e.count }, layer);
  el("path", { d: `M${p0.x},${p0.y} Q${c.x},${c.y} ${p2.x},${p2.y}`,
    "marker-end": `url(#arrow-${e.category})` }, g);
  const mx = 0.25 * p0.x + 0.5 * c.x + 0.25 * p2.x, my = 0.25 * p0.y + 0.5 * c.y + 0.25 * p2.y;
  const t = el("text", { x: mx, y: my + 4, "text-anchor": "middle" }, g);
  const ports = [...e.ports].sort((x, y) => x - y).map((p) => `:${p}`).join(" ");
  t.textContent = `${e.count}× ${ports}`;
}

// --- table -------------------------------------------------------------------------------

function fmtTime(iso) {
  return iso.slice(11, 19);
}

function addRow(rec) {
  const tbody = document.querySelector("#flows tbody");
  const tr = document.createElement("tr");
  const cat = category(rec);
  tr.className = `${rec.verdict} ${cat}`;
  const dst = `${nodeOf(rec.destination)}:${rec.destination.port}`;
  const security = rec.connection_security_policy === "mutual_tls" ? "mTLS"
    : rec.connection_security_policy === "none" ? "plaintext" : "unknown";
  const why = [rec.reason, rec.policy && `${rec.policy}${rec.rule ? " rule " + rec.rule : ""}`]
    .filter(Boolean).join(" · ") || (rec.response_flags !== "-" ? rec.response_flags : "");
  const cells = [
    [fmtTime(rec.time), "mono"], [`${rec.kind} (${rec.reporter})`, ""],
    [nodeOf(rec.source), ""], [dst, ""], [rec.verdict, "verdict"], [security, "security"],
    [`${rec.bytes_sent}/${rec.bytes_received}`, "mono"], [why, ""],
  ];
  for (const [text, cls] of cells) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    tr.appendChild(td);
  }
  tr.dataset.verdict = rec.verdict;
  tr.dataset.text = cells.map((c) => c[0]).join(" ").toLowerCase();
  tbody.insertBefore(tr, tbody.firstChild);
  while (tbody.children.length > MAX_ROWS) tbody.removeChild(tbody.lastChild);
  applyFilter(tr);
}

function matches(tr) {
  const q = document.getElementById("filter").value.trim().toLowerCase();
  const v = document.getElementById("verdict").value;
  if (v && tr.dataset.verdict !== v) return false;
  return q.split(/\s+/).every((w) => !w || tr.dataset.text.includes(w));
}

function applyFilter(only) {
  const rows = only ? [only] : [...document.querySelectorAll("#flows tbody tr")];
  for (const tr of rows) tr.hidden = !matches(tr);
  const all = document.querySelectorAll("#flows tbody tr");
  const shown = [...all].filter((tr) => !tr.hidden).length;
  document.getElementById("shown").textContent = `${shown} of ${all.length} shown`;
}

// --- stream ------------------------------------------------------------------------------

function onRecord(rec) {
  addRow(rec);
  if (!TERMINAL.has(rec.kind)) return;  // count each connection once, when it ends
  const src = nodeOf(rec.source), dst = nodeOf(rec.destination);
  // The source's own node reports it too: count that record, not the destination's copy.
  if (rec.reporter === "destination" && state.local.has(src)) return;
  for (const [ep, ref] of [[rec.source, src], [rec.destination, dst]]) {
    if (!ep.workload && !state.external.has(ref)) state.external.add(ref);
    if (ep.workload && !state.workloads.has(ref)) state.workloads.add(ref);
  }
  const cat = category(rec);
  const key = `${src}>${dst}|${cat}`;
  let e = state.edges.get(key);
  if (!e) {
    e = { src, dst, category: cat, count: 0, ports: new Set() };
    state.edges.set(key, e);
  }
  e.count += 1;
  e.ports.add(rec.destination.port);
  state.connections += 1;
  draw();
}

function setStatus(text, cls) {
  const s = document.getElementById("status");
  s.textContent = text;
  s.className = `status ${cls}`;
}

function reset() {
  state.edges.clear();
  state.external.clear();
  state.connections = 0;
  document.querySelector("#flows tbody").replaceChildren();
}

function connect() {
  const es = new EventSource("/flows/events");
  es.onopen = () => {
    // A reconnect replays the agent's recent records: start over rather than count twice.
    if (state.opened) reset();
    state.opened = true;
    setStatus("live", "live");
  };
  es.onerror = () => setStatus("reconnecting…", es.readyState === 2 ? "lost" : "connecting");
  es.onmessage = (m) => {
    try { onRecord(JSON.parse(m.data)); } catch (err) { console.error("bad flow record", err); }
  };
  es.addEventListener("dropped", (m) => {
    const n = JSON.parse(m.data).dropped;
    setStatus(`live (${n} records lost: page too slow)`, "live");
  });
}

async function loadConfig() {
  try {
    const r = await fetch("/config_dump", { cache: "no-store" });
    const d = await r.json();
    for (const ref of d.workloads || []) state.workloads.add(ref);
    state.local = new Set(Object.values(d.enrolled || {}).map((e) => e.workload));
    const node = (d.config && d.config.node_name) || "";
    document.getElementById("node").textContent = node ? `node ${node}` : "";
  } catch (err) {
    console.error("config_dump", err);
  }
  draw();
}

document.addEventListener("DOMContentLoaded", async () => {
  document.getElementById("filter").addEventListener("input", () => applyFilter());
  document.getElementById("verdict").addEventListener("change", () => applyFilter());
  await loadConfig();
  connect();
  setInterval(loadConfig, 10000);  // workloads come and go
});
