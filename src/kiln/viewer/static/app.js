/* Kiln viewer — the page: loading, panes, toolbar, search, sidebar, keyboard, export. */
"use strict";
var Kiln = window.Kiln || (window.Kiln = {});

(function () {
  const $ = (id) => document.getElementById(id);
  const esc = (s) => Kiln.panels.esc(s);

  const app = {
    data: null, panes: [], active: 0, server: false, selection: null, busy: 0,
    toggles: { attributes: false, weights: true, names: false, compact: true }, rankdir: "TB",
  };
  window.kilnApp = app;

  function showError(message) {
    $("loading").hidden = true;
    const e = $("error");
    e.innerHTML = `<div class="card"><h1>Kiln can’t show this file</h1><p>${esc(message)}</p>` +
      '<p class="hint">Check that the file is a complete model in a format Kiln reads (ONNX, Kiln engine and the formats listed by <code>kiln view --help</code>), then reload.</p></div>';
    e.hidden = false;
    document.title = "Kiln viewer — error";
    app.error = message;
  }

  /** Readers' warnings (damaged weights, files outside the model's folder) in a banner over the graph. */
  function showWarnings(data) {
    const lines = [];
    data.panes.forEach((p) => {
      for (const w of (p.model && p.model.warnings) || []) lines.push(data.panes.length > 1 ? `${p.title}: ${w}` : w);
    });
    if (!lines.length) return;
    const e = $("warnings");
    e.innerHTML = '<button title="Dismiss">×</button>' + lines.map((w) => `<p>⚠ ${esc(w)}</p>`).join("");
    e.querySelector("button").addEventListener("click", () => { e.hidden = true; });
    e.hidden = false;
  }

  async function load() {
    const embedded = $("kiln-data").textContent.trim();
    if (embedded) return JSON.parse(embedded);
    const early = window.kilnModel && (await window.kilnModel);
    if (early) return early;
    const r = await fetch("api/model", { cache: "no-store" });
    return r.json();
  }

  function indexPane(pane) {
    const producer = new Map(), consumers = new Map();
    pane.nodes.forEach((n, i) => {
      for (const [, ids] of n.out) for (const t of ids) producer.set(t, i);
      for (const [, ids] of n.in) for (const t of ids) { if (!consumers.has(t)) consumers.set(t, []); consumers.get(t).push(i); }
    });
    return { producer, consumers };
  }

  function createPanes() {
    const host = $("panes");
    app.data.panes.forEach((pane, pi) => {
      const el = document.createElement("div");
      el.className = "pane";
      el.innerHTML = (app.data.panes.length > 1 ? `<div class="pane-title">${esc(pane.title)}</div>` : "") + '<div class="canvas"></div>' +
        '<nav class="crumbs" hidden></nav>' + legendHtml(pi);
      host.appendChild(el);
      const ps = Object.assign({ pane, el, index: pi, expanded: new Set(pane.expanded), opened: new Set(), root: 0 }, indexPane(pane));
      ps.view = new Kiln.GraphView(el.querySelector(".canvas"), pane, {
        onSelect: (t) => select(pi, t),
        onToggle: (cid) => toggleCluster(pi, cid),
        onOpen: (nid) => openNode(pi, nid),
        onEnter: (nid) => enter(pi, pane.nodes[nid].sub[0]),
        onRender: () => status(),
      });
      el.addEventListener("pointerdown", () => setActive(pi));
      el.querySelector(".crumbs").addEventListener("click", (ev) => {
        const a = ev.target.closest("[data-level]");
        if (a) enter(pi, +a.dataset.level, a.dataset.focus != null ? +a.dataset.focus : null);
      });
      app.panes.push(ps);
    });
    setActive(0);
  }

  /** The accuracy legend over the pane the error report colours (click: the report panel). */
  function legendHtml(pi) {
    const e = app.data.errors;
    if (!e || e.pane !== pi) return "";
    const D = Kiln.draw;
    return `<div class="err-legend-box" title="Accuracy errors: click for the report"><svg class="kg" width="${D.LEGEND_W}" height="${D.LEGEND_H - 4}" ` +
      `viewBox="-4 -6 ${D.LEGEND_W} ${D.LEGEND_H - 4}">${D.legendSvg(e, 0, 0)}</svg></div>`;
  }

  function setActive(pi) {
    app.active = pi;
    app.panes.forEach((ps, i) => ps.el.classList.toggle("active", i === pi && app.panes.length > 1));
  }

  function profileMax(ps) {
    let max = 0;
    for (const n of ps.pane.nodes) if (n.ov && n.ov.time_ms != null) max = Math.max(max, n.ov.time_ms);
    return max;
  }

  /** Clusters the current state draws: the root, open groups inside open groups, bodies of opened nodes. */
  function visibleClusters(ps) {
    const out = [], stack = [ps.root], clusters = ps.pane.clusters, nodes = ps.pane.nodes;
    while (stack.length) {
      const cid = stack.pop();
      out.push(cid);
      for (const [kind, idx] of clusters[cid].items) {
        if (kind === "c" && ps.expanded.has(idx)) stack.push(idx);
        else if (kind === "n" && nodes[idx].sub && ps.opened.has(idx)) stack.push(...nodes[idx].sub);
      }
    }
    return out;
  }

  /** The server lays out clusters hidden in the first view when they open; files carry them all. */
  async function ensureStructures(ps) {
    const missing = visibleClusters(ps).filter((cid) => !ps.pane.clusters[cid].s);
    if (!missing.length) return;
    app.busy++;
    try {
      for (let i = 0; i < missing.length; i += 2000) {
        const ids = missing.slice(i, i + 2000).join(",");
        const r = await fetch(`api/clusters?pane=${ps.index}&ids=${ids}`, { cache: "no-store" });
        const got = await r.json();
        for (const [cid, s] of Object.entries(got)) ps.pane.clusters[+cid].s = s;
      }
    } finally { app.busy--; }
  }

  /** Recompute coordinates; keep the box `anchor` ({kind,id}) where it was on screen. */
  async function relayout(ps, anchor) {
    await ensureStructures(ps);
    let before = null;
    if (anchor && ps.view.scene) {
      const i = anchor.kind === "node" ? ps.view.nodeBox.get(anchor.id) : ps.view.clusterBox.get(anchor.id);
      if (i !== undefined) { const b = ps.view.scene.boxes[i]; before = [b.x * ps.view.k + ps.view.tx, b.y * ps.view.k + ps.view.ty]; }
    }
    const t0 = performance.now();
    const placer = new Kiln.Placer(ps.pane, ps.expanded, ps.opened, app.toggles, app.rankdir);
    ps.scene = placer.scene(ps.root);
    ps.layoutMs = performance.now() - t0;
    ps.view.setScene(ps.scene, app.rankdir === "LR", app.toggles, profileMax(ps));
    if (before) {
      const i = anchor.kind === "node" ? ps.view.nodeBox.get(anchor.id) : ps.view.clusterBox.get(anchor.id);
      if (i !== undefined) {
        const b = ps.scene.boxes[i];
        ps.view.tx = before[0] - b.x * ps.view.k; ps.view.ty = before[1] - b.y * ps.view.k; ps.view.apply();
      }
    }
    ps.view.renderNow();
    status();
  }

  async function relayoutAll() { for (const ps of app.panes) await relayout(ps); }

  function status() {
    const ps = app.panes[app.active];
    if (!ps || !ps.view.shown) return;
    const nodes = ps.pane.nodes.filter((n) => !n.pseudo).length;
    const drawn = Array.from(ps.view.shown.box.values()).filter((el) => el.classList.contains("node")).length;
    $("status").innerHTML = `<span>${nodes.toLocaleString("en-US")} nodes</span><span>${ps.scene.boxes.length.toLocaleString("en-US")} boxes laid out in ${ps.layoutMs.toFixed(0)} ms</span>` +
      `<span id="st-drawn">${ps.view.lod ? "overview" : drawn + " drawn"}</span><span>${Math.round(ps.view.k * 100)}%</span>` + (app.server ? "<span>served from 127.0.0.1</span>" : "<span>offline file</span>");
  }

  /* ---- selection and sidebar ---- */
  function openSide(title, html) {
    $("side-title").textContent = title;
    $("side-body").innerHTML = html;
    $("side").hidden = false;
    $("side-body").scrollTop = 0;
  }
  function closeSide() { $("side").hidden = true; }

  function select(pi, target, opts) {
    const ps = app.panes[pi];
    setActive(pi);
    app.selection = target ? Object.assign({ pane: pi }, target) : null;
    for (const p of app.panes) { p.view.marks.sel.clear(); p.view.marks.selCluster = -1; p.view.marks.linked.clear(); }
    if (!target) { for (const p of app.panes) p.view.refreshMarks(); if (!(opts && opts.keepSide)) closeSide(); return; }
    if (target.kind === "node") {
      ps.view.marks.sel.add(target.id);
      openSide("Node", Kiln.panels.nodePanel(app, pi, target.id));
      link(pi, target.id);
    } else if (target.kind === "cluster") {
      ps.view.marks.selCluster = target.id;
      openSide("Group", Kiln.panels.clusterPanel(app, pi, target.id));
    }
    for (const p of app.panes) p.view.refreshMarks();
  }

  /** Engine layer ↔ ONNX nodes: mark and reveal the other pane's counterparts. */
  async function link(pi, id) {
    if (!app.links || app.panes.length < 2) return;
    const other = 1 - pi, ids = (pi === 0 ? app.links.fwd : app.links.back).get(id) || [];
    const ps = app.panes[other];
    for (const i of ids) ps.view.marks.linked.add(i);
    if (ids.length) {
      if (ensureVisible(ps, ids[0])) await relayout(ps);
      ps.view.refreshMarks();
      ps.view.reveal("node", ids[0], true);
    }
  }

  /** The graph level a cluster is drawn in: the model's root or the body it lies in (groups are not levels). */
  function levelOf(ps, cid) {
    const clusters = ps.pane.clusters;
    while (clusters[cid].kind === "group") cid = clusters[cid].parent;
    return cid;
  }

  /** The bodies entered on the way from the model down to `level`, outermost first. */
  function levels(ps, level) {
    const out = [], clusters = ps.pane.clusters;
    for (let c = level; clusters[c].kind === "body"; c = levelOf(ps, ps.pane.nodes[clusters[c].owner].c)) out.unshift(c);
    return out;
  }

  /** Draw `level` (0: the model; else a body cluster) as the whole picture, under its breadcrumb
   * (model › If_3 › then_branch); `focus`: a node to select there. */
  async function enter(pi, level, focus) {
    const ps = app.panes[pi], clusters = ps.pane.clusters;
    ps.root = level;
    await relayout(ps);
    const chain = levels(ps, level), el = ps.el.querySelector(".crumbs");
    let html = `<a data-level="0">${esc(ps.pane.title)}</a>`;
    for (const cid of chain) {
      const owner = ps.pane.nodes[clusters[cid].owner];
      html += ` › <a data-level="${levelOf(ps, owner.c)}" data-focus="${clusters[cid].owner}">${esc(owner.name || owner.op)}</a>` +
        ` › <a data-level="${cid}">${esc(clusters[cid].name)}</a>`;
    }
    el.innerHTML = html;
    el.hidden = !chain.length;
    ps.view.home();
    if (focus != null) { select(pi, { kind: "node", id: focus }); ps.view.reveal("node", focus, true); }
    else select(pi, null);
  }

  /** Back up one level: to the graph holding the node whose body is drawn, that node selected. */
  function leave(pi) {
    const ps = app.panes[pi];
    if (!ps.root) return false;
    const owner = ps.pane.clusters[ps.root].owner;
    enter(pi, levelOf(ps, ps.pane.nodes[owner].c), owner);
    return true;
  }

  /** Open what hides the node: groups and bodies around it, up to the drawn level (or from the model's root,
   * leaving an entered body, when the node lies outside it). */
  function ensureVisible(ps, nodeIdx) {
    let changed = false, c = ps.pane.nodes[nodeIdx].c;
    if (ps.root) {
      let k = c;
      while (k != null && k >= 0 && k !== ps.root) k = ps.pane.clusters[k].kind === "body" ? ps.pane.nodes[ps.pane.clusters[k].owner].c : ps.pane.clusters[k].parent;
      if (k !== ps.root) { ps.root = 0; ps.el.querySelector(".crumbs").hidden = true; changed = true; }
    }
    while (c != null && c >= 0 && !(ps.root && c === ps.root)) {
      const cl = ps.pane.clusters[c];
      if (cl.kind === "group" && !ps.expanded.has(c)) { ps.expanded.add(c); changed = true; }
      if (cl.kind === "body") {
        if (!ps.opened.has(cl.owner)) { ps.opened.add(cl.owner); changed = true; }
        c = ps.pane.nodes[cl.owner].c;
      } else c = cl.parent;
    }
    return changed;
  }

  async function goToNode(pi, id) {
    const ps = app.panes[pi];
    if (!Kiln.layout.shown(ps.pane.nodes[id], app.toggles)) id = ps.pane.nodes[id].fold;   // drawn in its reader
    if (ensureVisible(ps, id)) await relayout(ps);
    select(pi, { kind: "node", id });
    ps.view.reveal("node", id, true);
  }

  async function toggleCluster(pi, cid) {
    const ps = app.panes[pi], c = ps.pane.clusters[cid];
    if (c.kind !== "group") return;
    if (ps.expanded.has(cid)) {
      ps.expanded.delete(cid);
      for (let i = 0; i < ps.pane.clusters.length; i++) {       // collapse the inside too
        let p = ps.pane.clusters[i].parent;
        while (p != null) { if (p === cid) { ps.expanded.delete(i); break; } p = ps.pane.clusters[p].parent; }
      }
    } else ps.expanded.add(cid);
    await relayout(ps, { kind: "cluster", id: cid });
    if (app.selection && app.selection.kind === "cluster" && app.selection.id === cid) select(pi, app.selection);
  }

  async function openNode(pi, nid) {
    const ps = app.panes[pi];
    if (ps.opened.has(nid)) ps.opened.delete(nid); else ps.opened.add(nid);
    await relayout(ps, { kind: "node", id: nid });
  }

  async function showWeight(pi, wi) {
    const w = app.panes[pi].pane.weights[wi];
    openSide("Weight", Kiln.panels.weightPanel(app, pi, wi, app.server ? undefined : w.stats || null));
    if (!app.server) return;
    let stats;
    try { const r = await fetch(`api/weight?pane=${pi}&index=${wi}`); stats = await r.json(); }
    catch (err) { stats = { error: "Could not read the weight: " + err }; }
    openSide("Weight", Kiln.panels.weightPanel(app, pi, wi, stats));
  }

  /* ---- search ---- */
  function search(q) {
    q = q.trim().toLowerCase();
    const out = [];
    if (!q) return out;
    app.panes.forEach((ps, pi) => {
      ps.pane.nodes.forEach((n, i) => {
        const op = n.op.toLowerCase(), nm = (n.name || "").toLowerCase();
        if (op === q || nm === q) out.push([0, pi, i, "node"]);
        else if (op.startsWith(q)) out.push([1, pi, i, "op"]);
        else if (nm.includes(q)) out.push([2, pi, i, "name"]);
      });
      ps.pane.tensors.forEach(([name], ti) => {
        if (name.toLowerCase().includes(q)) {
          const p = ps.producer.get(ti), cons = ps.consumers.get(ti);
          const i = p != null ? p : cons ? cons[0] : null;
          if (i != null) out.push([3, pi, i, "tensor " + name]);
        }
      });
    });
    out.sort((a, b) => a[0] - b[0] || a[1] - b[1] || a[2] - b[2]);
    const seen = new Set();
    return out.filter(([, pi, i]) => { const k = pi + ":" + i; if (seen.has(k)) return false; seen.add(k); return true; });
  }

  let results = [], cursor = 0;
  function runSearch() {
    const q = $("find").value;
    results = search(q);
    cursor = 0;
    for (const ps of app.panes) { ps.view.marks.hit.clear(); }
    for (const [, pi, i] of results.slice(0, 5000)) app.panes[pi].view.marks.hit.add(i);
    for (const ps of app.panes) ps.view.refreshMarks();
    drawResults();
  }
  function drawResults() {
    const box = $("results");
    if (!$("find").value.trim()) { box.hidden = true; return; }
    box.hidden = false;
    if (!results.length) { box.innerHTML = '<div class="none">No matches</div>'; return; }
    box.innerHTML = results.slice(0, 200).map(([, pi, i, why], k) => {
      const n = app.panes[pi].pane.nodes[i];
      return `<div class="r${k === cursor ? " on" : ""}" data-k="${k}"><span class="op">${esc(n.op)}</span><span class="nm">${esc(n.name)}</span><span class="kind">${esc(why.length > 40 ? why.slice(0, 39) + "…" : why)}</span></div>`;
    }).join("") + (results.length > 200 ? `<div class="none">${results.length - 200} more…</div>` : "");
  }
  function pick(k) {
    const r = results[k];
    if (!r) return;
    $("results").hidden = true;
    goToNode(r[1], r[2]);
  }

  /* ---- keyboard ---- */
  function neighbour(ps, id, dir) {
    const pane = ps.pane, view = ps.view, n = pane.nodes[id];
    const lr = app.rankdir === "LR";
    const forward = lr ? dir === "ArrowRight" : dir === "ArrowDown", backward = lr ? dir === "ArrowLeft" : dir === "ArrowUp";
    if (forward || backward) {
      const cands = [];
      if (forward) for (const [, ids] of n.out) for (const t of ids) cands.push(...(ps.consumers.get(t) || []));
      else for (const [, ids] of n.in) for (const t of ids) { const p = ps.producer.get(t); if (p != null) cands.push(p); }
      const vis = cands.find((i) => view.nodeBox.has(i));
      if (vis != null) return vis;
      if (cands.length) return cands[0];
    }
    const bi = view.nodeBox.get(id);
    if (bi === undefined) return null;
    const b = view.scene.boxes[bi], cx = b.x + b.w / 2, cy = b.y + b.h / 2;
    let best = null, bestD = Infinity;
    for (const [nid, j] of view.nodeBox) {
      if (nid === id) continue;
      const o = view.scene.boxes[j], ox = o.x + o.w / 2, oy = o.y + o.h / 2;
      const dx = ox - cx, dy = oy - cy;
      const ok = dir === "ArrowLeft" ? dx < -1 : dir === "ArrowRight" ? dx > 1 : dir === "ArrowUp" ? dy < -1 : dy > 1;
      if (!ok) continue;
      const d = (dir === "ArrowLeft" || dir === "ArrowRight") ? Math.abs(dx) + 3 * Math.abs(dy) : Math.abs(dy) + 3 * Math.abs(dx);
      if (d < bestD) { bestD = d; best = nid; }
    }
    return best;
  }

  function onKey(ev) {
    const inField = ev.target.tagName === "INPUT" || ev.target.tagName === "SELECT";
    if ((ev.key === "/" && !inField) || ((ev.ctrlKey || ev.metaKey) && ev.key === "f")) { ev.preventDefault(); $("find").focus(); $("find").select(); return; }
    if (inField) return;
    const ps = app.panes[app.active], view = ps.view, sel = app.selection;
    if (ev.key === "Escape") { select(app.active, null); $("export-menu").hidden = true; return; }
    if (ev.key === "+" || ev.key === "=") return view.zoom(1.25);
    if (ev.key === "-" || ev.key === "_") return view.zoom(0.8);
    if (ev.key === "0") return view.fit();
    if (ev.key === "Home") return view.home();
    if (ev.key === "Backspace" && leave(app.active)) return ev.preventDefault();
    if (ev.key === "Enter" && sel) {
      if (sel.kind === "cluster") toggleCluster(sel.pane, sel.id);
      else if (ps.pane.nodes[sel.id].sub) openNode(sel.pane, sel.id);
      return;
    }
    if (ev.key.startsWith("Arrow")) {
      ev.preventDefault();
      if (sel && sel.kind === "node" && sel.pane === app.active) {
        const next = neighbour(ps, sel.id, ev.key);
        if (next != null) goToNode(app.active, next);
      } else {
        const step = 80;
        if (ev.key === "ArrowLeft") view.tx += step; else if (ev.key === "ArrowRight") view.tx -= step;
        else if (ev.key === "ArrowUp") view.ty += step; else view.ty -= step;
        view.apply();
      }
    }
  }

  /* ---- pictures: the Export menu, and headless export (kiln/viewer/export.py calls app.picture) ---- */
  async function graphCss() {
    const el = $("kg-css");
    if (el.tagName === "STYLE") return el.textContent;
    return (await fetch(el.getAttribute("href"))).text();
  }
  function download(blob, name) {
    const a = document.createElement("a");
    a.href = URL.createObjectURL(blob); a.download = name;
    document.body.appendChild(a); a.click(); a.remove();
    setTimeout(() => URL.revokeObjectURL(a.href), 5000);
  }
  /** The whole drawing of pane `pi` in its current state as a standalone SVG document. */
  async function svgPicture(pi) {
    const ps = app.panes[pi];
    return Kiln.draw.sceneSvg(ps.pane, ps.scene, app.toggles, app.rankdir === "LR", await graphCss(), profileMax(ps), app.data.errors);
  }

  /** The same drawing rasterised at a readable size (Kiln.draw.pngPlan): a PNG Blob. */
  async function pngPicture(pi) {
    const url = URL.createObjectURL(new Blob([await svgPicture(pi)], { type: "image/svg+xml" }));
    try {
      const img = new Image();
      img.src = url;
      await img.decode();
      const ps = app.panes[pi], plan = Kiln.draw.pngPlan(ps.scene, img.naturalWidth, img.naturalHeight, ps.pane);
      const canvas = Kiln.draw.pngCanvas(img, plan);
      const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
      if (!blob) throw new Error(`the browser could not encode a ${plan.width}×${plan.height} PNG`);
      return blob;
    } finally { URL.revokeObjectURL(url); }
  }

  /** "svg": the SVG text; "png": the PNG as a data: URL (what headless export writes to its file). */
  async function picture(fmt, pi) {
    pi = pi == null ? app.active : pi;
    if (fmt === "svg") return svgPicture(pi);
    const blob = await pngPicture(pi);
    return new Promise((resolve, reject) => {
      const r = new FileReader();
      r.onload = () => resolve(r.result); r.onerror = () => reject(r.error);
      r.readAsDataURL(blob);
    });
  }

  async function exportPicture(fmt) {
    const ps = app.panes[app.active];
    const base = (ps.pane.title || "graph").replace(/\.[^.]+$/, "");
    if (fmt === "svg") return download(new Blob([await svgPicture(app.active)], { type: "image/svg+xml" }), base + ".svg");
    download(await pngPicture(app.active), base + ".png");
  }

  /* ---- wiring ---- */
  function bind() {
    for (const k of ["attributes", "weights", "names", "compact"]) {
      const el = $("t-" + k);
      el.checked = !!app.toggles[k];
      el.addEventListener("change", () => { app.toggles[k] = el.checked; relayoutAll(); });
    }
    $("rankdir").value = app.rankdir;
    $("rankdir").addEventListener("change", async () => { app.rankdir = $("rankdir").value; await relayoutAll(); for (const ps of app.panes) ps.view.home(); });
    $("b-expand").addEventListener("click", () => { const ps = app.panes[app.active]; ps.pane.clusters.forEach((c, i) => { if (c.kind === "group") ps.expanded.add(i); }); relayout(ps); });
    $("b-collapse").addEventListener("click", async () => { const ps = app.panes[app.active]; ps.expanded.clear(); await relayout(ps); ps.view.home(); });
    $("b-fit").addEventListener("click", () => app.panes[app.active].view.fit());
    $("b-zoomin").addEventListener("click", () => app.panes[app.active].view.zoom(1.25));
    $("b-zoomout").addEventListener("click", () => app.panes[app.active].view.zoom(0.8));
    $("b-model").addEventListener("click", () => openSide("Model", Kiln.panels.modelPanel(app, app.active)));
    $("b-export").addEventListener("click", (ev) => { ev.stopPropagation(); $("export-menu").hidden = !$("export-menu").hidden; });
    $("export-menu").addEventListener("click", (ev) => { const f = ev.target.dataset.fmt; if (f) { $("export-menu").hidden = true; exportPicture(f); } });
    document.addEventListener("click", () => { $("export-menu").hidden = true; });
    if (app.data.profile) { $("b-profile").hidden = false; $("b-profile").addEventListener("click", () => openSide("Profile", Kiln.panels.profilePanel(app))); }
    if (app.data.errors) {
      const showErrors = () => openSide("Accuracy", Kiln.panels.errorsPanel(app));
      $("b-errors").hidden = false;
      $("b-errors").addEventListener("click", showErrors);
      for (const el of document.querySelectorAll(".err-legend-box")) el.addEventListener("click", showErrors);
    }
    $("side-close").addEventListener("click", closeSide);
    const find = $("find");
    let timer = 0;
    find.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(runSearch, 120); });
    find.addEventListener("keydown", (ev) => {
      if (ev.key === "Enter") { ev.preventDefault(); clearTimeout(timer); runSearch(); pick(cursor); }
      else if (ev.key === "ArrowDown" || ev.key === "ArrowUp") { ev.preventDefault(); cursor = Math.max(0, Math.min(results.length - 1, cursor + (ev.key === "ArrowDown" ? 1 : -1))); drawResults(); }
      else if (ev.key === "Escape") { find.value = ""; runSearch(); find.blur(); }
    });
    find.addEventListener("focus", () => { if (find.value.trim()) $("results").hidden = false; });
    $("results").addEventListener("mousedown", (ev) => { const r = ev.target.closest(".r"); if (r) { ev.preventDefault(); pick(+r.dataset.k); } });
    find.addEventListener("blur", () => setTimeout(() => { $("results").hidden = true; }, 150));
    $("side-body").addEventListener("click", onSideClick);
    document.addEventListener("keydown", onKey);
  }

  async function onSideClick(ev) {
    const t = ev.target.closest("[data-node],[data-weight],[data-tensor],[data-cluster],[data-toggle],[data-open],[data-enter],[data-origin]");
    if (!t) return;
    const pi = t.dataset.pane != null ? +t.dataset.pane : app.active;
    if (t.dataset.weight != null) showWeight(pi, +t.dataset.weight);
    else if (t.dataset.tensor != null) openSide("Tensor", Kiln.panels.tensorPanel(app, pi, +t.dataset.tensor));
    else if (t.dataset.toggle != null) toggleCluster(pi, +t.dataset.toggle);
    else if (t.dataset.enter != null) enter(pi, +t.dataset.enter);
    else if (t.dataset.open != null) { const ps = app.panes[pi]; if (!ps.opened.has(+t.dataset.open)) openNode(pi, +t.dataset.open); }
    else if (t.dataset.origin != null && app.panes.length > 1) {
      const i = app.panes[1].pane.nodes.findIndex((n) => n.name === t.dataset.origin);
      if (i >= 0) goToNode(1, i);
    } else if (t.dataset.cluster != null) {
      const ps = app.panes[pi], cid = +t.dataset.cluster;
      let c = cid, changed = false;
      while (c != null) { if (ps.pane.clusters[c].kind === "group" && !ps.expanded.has(c) && c !== cid) { ps.expanded.add(c); changed = true; } c = ps.pane.clusters[c].parent; }
      if (changed) await relayout(ps);
      select(pi, { kind: "cluster", id: cid });
      ps.view.reveal("cluster", cid, true);
    } else if (t.dataset.node != null) goToNode(pi, +t.dataset.node);
  }

  async function start() {
    let data;
    performance.mark("start");
    try { data = await load(); performance.mark("loaded"); } catch (err) { return showError("The page could not load the model data: " + err); }
    if (data.error) return showError(data.error);
    app.data = data; app.server = !!data.server; app.rankdir = data.rankdir || "TB";
    if (data.diff) app.toggles.compact = false;     // a model diff draws every node, each with its status
    if (data.toggles) Object.assign(app.toggles, data.toggles);
    if (data.links) {
      app.links = { fwd: new Map(), back: new Map() };
      for (const [e, ids] of data.links) {
        app.links.fwd.set(e, ids);
        for (const i of ids) { if (!app.links.back.has(i)) app.links.back.set(i, []); app.links.back.get(i).push(e); }
      }
    }
    $("title").textContent = data.panes.map((p) => p.title).join("  ·  ");
    document.title = data.panes[0].title + " — Kiln viewer";
    createPanes();
    showWarnings(data);
    performance.mark("panes");
    bind();
    await relayoutAll();
    performance.mark("laid out");
    $("loading").hidden = true;
    for (const ps of app.panes) { ps.view.home(); ps.view.renderNow(); }
    const first = data.errors && data.errors.first;
    if (first && first.node != null && !data.headless) await goToNode(data.errors.pane, first.node);   // open on the first failing node
    status();
    document.body.dataset.drawn = "1";
    if (data.pending) await completion(data.revision);
    app.ready = true;
    document.body.dataset.ready = "1";
  }

  /** The server sent the model as its file states it and is completing it (ONNX: inferred shapes, op
   * documentation): wait for the final data and draw it in place, keeping the view and the selection. */
  async function completion(revision) {
    for (let tries = 0; tries < 90; tries++) {
      let next;
      try { next = await (await fetch(`api/model?after=${revision}`, { cache: "no-store" })).json(); }
      catch (err) { return; }
      if (next.error) return showError(next.error);
      if (next.revision > revision) { await swap(next); revision = next.revision; }
      if (!next.pending) return;
    }
  }

  async function swap(data) {
    const same = data.panes.length === app.panes.length &&
      data.panes.every((p, i) => p.nodes.length === app.panes[i].pane.nodes.length && p.clusters.length === app.panes[i].pane.clusters.length);
    if (!same) { location.reload(); return new Promise(() => {}); }   // another model now: start over
    const warned = (d) => JSON.stringify(d.panes.map((p) => (p.model && p.model.warnings) || []));
    if (warned(data) !== warned(app.data)) showWarnings(data);
    app.data = data;
    app.panes.forEach((ps, i) => {
      ps.pane = ps.view.pane = data.panes[i];
      Object.assign(ps, indexPane(ps.pane));
    });
    const keep = app.panes.map((ps) => [ps.view.tx, ps.view.ty, ps.view.k]);
    await relayoutAll();
    app.panes.forEach((ps, i) => { [ps.view.tx, ps.view.ty, ps.view.k] = keep[i]; ps.view.apply(); ps.view.renderNow(); });
    if (app.selection && !$("side").hidden) select(app.selection.pane, app.selection, { keepSide: true });
    status();
  }

  // window.kilnApp: the page's state (data, panes: {pane, expanded, opened, scene, view}, toggles, rankdir,
  // selection) and what tests, headless export and other views call. relayout(ps) recomputes a pane's
  // coordinates with Kiln.Placer (static/layout.js) and redraws it; picture(fmt, pane) is the Export menu's
  // drawing ("svg" text, "png" data: URL), the one kiln/viewer/export.py saves.
  app.select = select; app.goToNode = goToNode; app.toggleCluster = toggleCluster; app.openNode = openNode;
  app.relayout = relayout; app.search = search; app.picture = picture; app.enter = enter; app.leave = leave;
  app.openSide = openSide;                 // a panel in the sidebar (static/diff.js shows the change list)
  window.addEventListener("DOMContentLoaded", start);
})();
