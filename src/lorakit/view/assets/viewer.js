// lorakit's model view: draws one composite call at a time from the JSON in #lorakit-data, laid out by dagre.
// A click on a composite block opens it; the breadcrumbs go back up; "before surgery" shows each LoRA
// layer as the layer it wraps. Everything it needs is in this file and the page: it makes no request.
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("lorakit-data").textContent);
  const N = D.nodes;
  const SVG = "http://www.w3.org/2000/svg";
  const groupOf = {};
  for (const [id, n] of Object.entries(N)) {
    if (n.kind === "group") n.members.forEach((m, i) => { groupOf[m] = { id, index: i }; });
  }
  const state = { view: "0", before: false };

  const el = (tag, attrs, text) => {
    const e = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) if (v !== undefined && v !== null) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const fmt = (n) => n.toLocaleString("en-US");
  const shapeText = (s) => (s.length ? s.join("×") : "scalar");
  const dtypeClass = (t) => (t === "bool" ? "bool" : /int/.test(t) ? "int" : /bfloat16|float16/.test(t) ? "half" : "float");
  // dots between the dashes: one per dimension (solid: a scalar)
  const dashes = (ndim) => (ndim ? ["9 3"].concat(Array(ndim).fill("1.5 3")).join(" ") : null);

  function chain(id) {
    const out = [];
    for (let c = id; c !== null && c !== undefined; c = N[c].parent) out.unshift(String(c));
    return out;
  }

  // In the before-surgery mode a LoRA layer is drawn as its base call.
  const shown = (b) => (state.before && N[b] && N[b].lora && N[b].before !== null ? String(N[b].before) : b);

  function blockInfo(b) {
    if (b === "in" || b === "out") return { title: b === "in" ? "inputs" : "outputs", sub: "", cls: "port" };
    const n = N[b];
    const cls = ["block", n.kind];
    let sub = n.op;
    const reads = (n.statics || []).filter((v) => D.vars[v][3] !== "const" || D.vars[v][0] !== "const");
    if (n.kind === "op" && reads.length) sub += " · " + reads.map((v) => D.vars[v][0].split(".").pop()).join(", ");
    let badge = "";
    if (n.view || n.kind === "group") cls.push("composite");
    if (n.lora) {
      cls.push("lora");
      badge = `+${fmt(n.lora.params)}`;
      sub = `${n.lora.method} r=${n.lora.r} on ${n.lora.base}${n.lora.merged ? " (merged)" : n.lora.disabled ? " (disabled)" : ""}`;
    } else if (n.loraInside) { cls.push("has-lora"); badge = `◆ ${n.loraInside} · +${fmt(n.loraParams)}`; }
    if (n.added) cls.push("added");
    if (n.saved) { cls.push("saved"); badge = "● trains"; }
    if (state.before && n.kind === "module" && N[n.parent] && N[n.parent].lora) {
      cls.push("was");  // the layer the surgery replaced, under the name it had
      return { title: N[n.parent].name, sub: `${n.op} (before LoRA)`, cls: cls.join(" "), badge };
    }
    return { title: n.name, sub, cls: cls.join(" "), badge };
  }

  function render() {
    const view = D.views[state.view];
    const hidden = (b) => state.before && N[b] && N[b].added;
    const blocks = view.blocks.filter((b) => !hidden(b)).map(shown);
    const edges = view.edges.map(([s, d, v]) => [shown(String(s)), shown(String(d)), v])
      .filter(([s, d]) => !hidden(s) && !hidden(d) && s !== d);
    const ports = new Set();
    edges.forEach(([s, d]) => { if (s === "in") ports.add("in"); if (d === "out") ports.add("out"); });

    const room = document.getElementById("canvas").clientWidth - 32;
    let g = layout(blocks, edges, ports, "LR");
    if (g.graph().width > 1.3 * room) {  // a long chain reads better downwards than cut off at the side
      const tb = layout(blocks, edges, ports, "TB");
      if (tb.graph().width < g.graph().width) g = tb;
    }
    const svg = document.getElementById("graph");
    svg.replaceChildren();
    const gw = Math.ceil(g.graph().width), gh = Math.ceil(g.graph().height);
    svg.setAttribute("viewBox", `0 0 ${gw} ${gh}`);
    const scale = Math.max(0.8, Math.min(1, room / gw));  // fit the window, but keep the text readable
    svg.setAttribute("width", Math.round(gw * scale));
    svg.setAttribute("height", Math.round(gh * scale));
    const defs = el("svg:defs");
    for (const c of ["float", "half", "int", "bool"]) {
      const m = el("svg:marker", { id: "arrow-" + c, viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" });
      m.appendChild(el("svg:path", { d: "M0,0 L10,5 L0,10 z", class: "arrow " + c }));
      defs.appendChild(m);
    }
    svg.appendChild(defs);

    for (const e of g.edges()) {
      const lab = g.edge(e);
      const [name, shape, dtype] = D.vars[lab.v];
      const c = dtypeClass(dtype);
      const pts = lab.points;
      let d = `M${pts[0].x},${pts[0].y}`;
      for (let i = 1; i < pts.length - 1; i++) {
        const mx = (pts[i].x + pts[i + 1].x) / 2, my = (pts[i].y + pts[i + 1].y) / 2;
        d += ` Q${pts[i].x},${pts[i].y} ${i === pts.length - 2 ? pts[i + 1].x : mx},${i === pts.length - 2 ? pts[i + 1].y : my}`;
      }
      if (pts.length === 2) d += ` L${pts[1].x},${pts[1].y}`;
      const ge = el("svg:g", { class: "edge " + c, "data-var": lab.v, "data-from": e.v, "data-to": e.w });
      ge.appendChild(el("svg:path", { d, "stroke-dasharray": dashes(shape.length), "marker-end": `url(#arrow-${c})` }));
      const t = el("svg:text", { x: lab.x, y: lab.y + 4, class: "shape", "data-var": lab.v, "data-dtype": dtype }, shapeText(shape));
      ge.appendChild(t);
      ge.appendChild(el("svg:title", {}, `${view.names[lab.v] || name}: [${shapeText(shape)}] ${dtype}`));
      svg.appendChild(ge);
    }

    for (const b of g.nodes()) {
      const p = g.node(b), info = p.info, n = N[b];
      const x = p.x - p.width / 2, y = p.y - p.height / 2;
      const gn = el("svg:g", { class: info.cls, "data-id": b, "data-name": info.title, "data-op": n ? n.op : b, "data-path": n ? n.path : "" });
      gn.appendChild(el("svg:rect", { x, y, width: p.width, height: p.height, rx: 7 }));
      gn.appendChild(el("svg:text", { x: x + 10, y: y + 17, class: "title" }, info.title));
      gn.appendChild(el("svg:text", { x: x + 10, y: y + 33, class: "sub" }, info.sub));
      if (info.badge) gn.appendChild(el("svg:text", { x: x + p.width - 8, y: y + 17, class: "badge", "text-anchor": "end" }, info.badge));
      if (n && (n.view || n.kind === "group")) gn.appendChild(el("svg:text", { x: x + p.width - 8, y: y + 34, class: "unbox", "text-anchor": "end" }, "⊞"));
      if (n && n.lora && n.lora.slices.length) drawSlices(gn, n.lora, x + 10, y + 40, p.width - 20);
      const tip = [n ? n.path || n.name : info.title, n ? n.op : ""];
      if (n && n.params) tip.push(`${fmt(n.params)} parameters`);
      if (n && n.loraInside) tip.push(`${n.loraInside} LoRA layers inside, ${fmt(n.loraParams)} parameters added`);
      if (n && n.statics) n.statics.forEach((v) => tip.push(`${D.vars[v][0]} [${shapeText(D.vars[v][1])}] ${D.vars[v][2]}`));
      gn.appendChild(el("svg:title", {}, tip.filter(Boolean).join("\n")));
      if (n && (n.view || n.kind === "group")) gn.addEventListener("click", () => open(n.kind === "group" ? n.members[0] : b));
      svg.appendChild(gn);
    }
    renderCrumbs();
    renderTable(view, blocks, edges);
    const id = N[state.view];
    if (location.hash.slice(1) !== encodeURIComponent(id.path)) history.replaceState(null, "", "#" + encodeURIComponent(id.path));
    document.documentElement.dataset.view = state.view;
  }

  function layout(blocks, edges, ports, rankdir) {
    const g = new dagre.graphlib.Graph({ multigraph: true });
    g.setGraph({ rankdir, nodesep: 18, ranksep: rankdir === "LR" ? 44 : 34, edgesep: 10, marginx: 12, marginy: 12 });
    for (const b of [...(ports.has("in") ? ["in"] : []), ...blocks, ...(ports.has("out") ? ["out"] : [])]) {
      const info = blockInfo(b);
      const slices = N[b] && N[b].lora && N[b].lora.slices.length;
      const width = Math.max(70, 7.2 * Math.max(info.title.length, info.sub.length + 1) + (info.badge ? 7 * info.badge.length : 0) + 26);
      g.setNode(b, { width, height: slices ? 60 : 42, info });
    }
    edges.forEach(([s, d, v], i) => {
      const label = shapeText(D.vars[v][1]);
      g.setEdge(s, d, { width: 6.5 * label.length + 8, height: 14, labelpos: "c", v }, "e" + i);
    });
    dagre.layout(g);
    return g;
  }

  function drawSlices(gn, lora, x, y, width) {
    gn.appendChild(el("svg:rect", { x, y, width, height: 11, class: "slice-bar" }));
    for (const [a, b, label] of lora.slices) {
      const sx = x + (width * a) / lora.out, sw = Math.max(2, (width * (b - a)) / lora.out);
      const r = el("svg:rect", { x: sx, y, width: sw, height: 11, class: "slice", "data-slice": `${a}:${b}`, "data-label": label });
      r.appendChild(el("svg:title", {}, `${label || "rows"} [${a}:${b}] of ${lora.out}`));
      gn.appendChild(r);
      if (label) gn.appendChild(el("svg:text", { x: sx + sw / 2, y: y + 9, class: "slice-label", "text-anchor": "middle" }, label));
    }
  }

  function renderCrumbs() {
    const nav = document.getElementById("crumbs");
    nav.replaceChildren();
    const ids = chain(state.view).filter((c) => !(state.before && N[c].lora));
    ids.forEach((c, i) => {
      if (i) nav.appendChild(el("span", { class: "sep" }, "›"));
      const n = N[c];
      const a = el("a", { href: "#" + encodeURIComponent(n.path), "data-id": c, class: i === ids.length - 1 ? "here" : "" }, i ? n.name : D.title);
      a.addEventListener("click", (ev) => { ev.preventDefault(); open(c); });
      nav.appendChild(a);
      const grp = groupOf[c];
      if (grp) {
        const members = N[grp.id].members;
        const step = (k, text, cls) => {
          const b = el("button", { class: cls, disabled: members[grp.index + k] === undefined ? "" : null }, text);
          b.addEventListener("click", () => open(members[grp.index + k]));
          return b;
        };
        nav.appendChild(step(-1, "‹", "prev"));
        nav.appendChild(el("span", { class: "count" }, `${grp.index + 1} of ${members.length}`));
        nav.appendChild(step(1, "›", "next"));
      }
    });
  }

  function renderTable(view, blocks, edges) {
    const body = document.querySelector("#vars tbody");
    body.replaceChildren();
    const seen = new Set();
    const row = (v, name, op) => {
      if (seen.has(v)) return;
      seen.add(v);
      const [, shape, dtype] = D.vars[v];
      const tr = el("tr", { "data-var": v });
      [name, "[" + shapeText(shape) + "]", dtype, op].forEach((t, i) => tr.appendChild(el("td", { class: ["name", "shape", "dtype", "op"][i] }, t)));
      body.appendChild(tr);
    };
    edges.forEach(([s, , v]) => {
      const [own, , , kind, op] = D.vars[v];
      row(v, view.names[v] || own, kind === "input" ? "input" : s === "in" ? "(from outside)" : N[s] ? N[s].op : op);
    });
    blocks.forEach((b) => (N[b].statics || []).forEach((v) => row(v, D.vars[v][0], D.vars[v][3])));
  }

  function open(id) {
    id = String(id);
    if (!D.views[id]) return;
    state.view = id;
    render();
  }

  function fromHash() {
    const path = decodeURIComponent(location.hash.slice(1));
    if (!path) return "0";
    for (const [id, n] of Object.entries(N)) if (n.kind === "module" && n.path === path && D.views[id]) return id;
    return "0";
  }

  function renderSurgery() {
    const body = document.querySelector("#surgery tbody");
    for (const r of D.surgery) {
      const tr = el("tr", { "data-node": r.node });
      const a = el("a", { href: "#" + encodeURIComponent(r.path) }, r.path);
      a.addEventListener("click", (ev) => { ev.preventDefault(); open(N[r.node].parent); });
      const td = el("td");
      td.appendChild(a);
      tr.appendChild(td);
      const slices = r.slices.map(([s, e, l]) => `${l ? l + " " : ""}[${s}:${e}]`).join(", ");
      [r.before, r.after, fmt(r.params), slices || "all outputs"].forEach((t) => tr.appendChild(el("td", {}, t)));
      body.appendChild(tr);
    }
  }

  document.getElementById("mode").addEventListener("change", (ev) => {
    state.before = ev.target.value === "before";
    document.documentElement.dataset.mode = ev.target.value;
    if (state.before && N[state.view].lora) state.view = String(N[state.view].parent);
    render();
  });
  window.addEventListener("hashchange", () => { const id = fromHash(); if (id !== state.view) open(id); });
  renderSurgery();
  state.view = fromHash();
  render();
  document.documentElement.dataset.ready = String(Math.round(performance.now()));
})();
