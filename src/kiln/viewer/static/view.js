/* Kiln viewer — one graph pane: SVG drawing (the page's and the exported pictures'),
 * pan and zoom, and virtualised rendering: only what is near the viewport is in
 * the DOM; far zoomed out, the whole graph is a handful of overview paths. */
"use strict";
var Kiln = window.Kiln || (window.Kiln = {});

(function () {
  const NS = "http://www.w3.org/2000/svg";
  const CELL = 512, LOD_SCALE = 0.28, R = 5;
  const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" }[c]));
  const f = (v) => { const s = v.toFixed(1); return s.endsWith(".0") ? s.slice(0, -2) : s; };

  function pathD(pts, lr) {
    let d = "M" + f(pts[0][0]) + "," + f(pts[0][1]);
    for (let i = 1; i < pts.length; i++) {
      const [px, py] = pts[i - 1], [qx, qy] = pts[i];
      if ((lr && py === qy) || (!lr && px === qx)) d += "L" + f(qx) + "," + f(qy);
      else if (lr) { const mx = (px + qx) / 2; d += "C" + f(mx) + "," + f(py) + " " + f(mx) + "," + f(qy) + " " + f(qx) + "," + f(qy); }
      else { const my = (py + qy) / 2; d += "C" + f(px) + "," + f(my) + " " + f(qx) + "," + f(my) + " " + f(qx) + "," + f(qy); }
    }
    return d;
  }

  function headPath(w, h, full) {
    if (full) return `M0,${R}a${R},${R} 0 0 1 ${R},-${R}h${f(w - 2 * R)}a${R},${R} 0 0 1 ${R},${R}v${f(h - 2 * R)}a${R},${R} 0 0 1 -${R},${R}h-${f(w - 2 * R)}a${R},${R} 0 0 1 -${R},-${R}z`;
    return `M0,${R}a${R},${R} 0 0 1 ${R},-${R}h${f(w - 2 * R)}a${R},${R} 0 0 1 ${R},${R}v${f(h - R)}h-${f(w)}z`;
  }

  function rowText(kind, text) {
    if (kind.startsWith("weight") || kind === "attr") {
      for (const sep of [" = ", " ⟨"]) {
        const k = text.indexOf(sep);
        if (k > 0) return `<tspan class="k">${esc(text.slice(0, k))}</tspan>${esc(text.slice(k))}`;
      }
    }
    return esc(text);
  }

  function heatColor(frac) {      // light yellow (fast) → red (slow)
    const t = Math.max(0, Math.min(1, frac));
    return `hsl(${f(48 - 48 * t)},${f(90)}%,${f(72 - 32 * t)}%)`;
  }

  function overlaySvg(node, w, h, profileMax) {
    const ov = node.ov;
    if (!ov || ov.time_ms == null || !profileMax) return "";
    return `<rect class="heat" x="1" y="${f(h - 5)}" width="${f(w - 2)}" height="4" rx="2" fill="${heatColor(ov.time_ms / profileMax)}"/>`;
  }

  function errTitle(err) {             // the error line of a box's tooltip
    if (!err) return "";
    const v = err.value, shown = typeof v === "number" ? String(Number(v.toPrecision(3))) : String(v);
    return `\nerror ${shown}${err.failed ? " · failed" : ""}${err.first ? " · first failing" : ""}`;
  }

  function firstRing(w, h, r) {
    return `<rect class="err-ring" x="-4" y="-4" width="${f(w + 8)}" height="${f(h + 8)}" rx="${r + 3}"/>`;
  }

  function nodeSvg(pane, b, toggles, cls, profileMax) {
    const node = pane.nodes[b.id], M = Kiln.metrics;
    const [head, rows] = Kiln.layout.boxContent(node, toggles);
    const w = b.w, h = b.h, err = node.err;
    const paint = pane.errors && !node.pseudo ? ` style="fill:${err ? err.color : pane.errors.none}"` : "";
    const first = err && err.first ? " err-first" : "";
    let s = `<g class="node cat-${esc(node.cat)}${node.pseudo ? " pseudo" : ""}${node.df ? " df-" + esc(node.df) : ""}${first}${cls}" data-node="${b.id}" transform="translate(${f(b.x)},${f(b.y)})">` +
      `<title>${esc((node.name || node.op) + errTitle(err))}</title><rect class="box" width="${f(w)}" height="${f(h)}" rx="${R}"/>` +
      `<path class="head" d="${headPath(w, M.headH, !rows.length)}"${paint}/>` +
      `<text class="op" x="${f(w / 2)}" y="${f(M.headH / 2)}">${esc(head)}</text>`;
    if (node.sub) s += `<text class="more" x="${f(w - 6)}" y="${f(M.headH / 2)}">${b.open ? "−" : "+"}</text>`;
    rows.forEach(([rk, text], i) => {
      const y = M.headH + M.rowPad / 2 + i * M.rowH + M.rowH / 2;
      s += `<text class="row ${rk}" x="${M.padX}" y="${f(y)}">${rowText(rk, text)}</text>`;
    });
    return s + overlaySvg(node, w, h, profileMax) + (first ? firstRing(w, h, R) : "") + "</g>";
  }

  function groupSvg(pane, b, cls) {
    const c = pane.clusters[b.id], M = Kiln.metrics, err = pane.errors ? c.err : null;
    const stack = err ? ` style="fill:${err.color};stroke:${err.color}"` : "";
    const first = err && err.first ? " err-first" : "";
    let title = c.path || c.name;
    if (err) {
      const worst = pane.nodes[err.node];
      title += `\nworst: ${worst.name || worst.op}${errTitle(worst.err)}\n${err.failed} of ${err.matched} compared nodes failed`;
    }
    let s = `<g class="group${c.df ? " df-" + esc(c.df) : ""}${first}${cls}" data-cluster="${b.id}" transform="translate(${f(b.x)},${f(b.y)})">` +
      `<title>${esc(title)}</title><rect class="stack" x="4" y="4" width="${f(b.w)}" height="${f(b.h)}" rx="6"${stack}/>` +
      `<rect class="box" width="${f(b.w)}" height="${f(b.h)}" rx="6"/>` +
      `<text class="title" x="${M.padX}" y="${f(M.headH / 2 + 1)}">${esc(c.name)}</text>` +
      `<text class="count" x="${M.padX}" y="${f(M.headH + M.rowH / 2)}">${c.size} nodes</text>` +
      `<text class="toggle" x="${f(b.w - 7)}" y="${f(M.headH / 2 + 1)}">+</text>`;
    if (err) s += `<rect class="err-bar" x="1" y="${f(b.h - 6)}" width="${f(b.w - 2)}" height="5" rx="2" fill="${err.color}"/>`;
    if (first) s += firstRing(b.w, b.h, 6);
    return s + "</g>";
  }

  const LEGEND_W = 640, LEGEND_H = 58;      // the legend under an exported graph

  /** The accuracy scale: one block per decade, then failed, not compared, first failing. */
  function legendSvg(errors, x, y) {
    const sc = errors.scale, bw = 44, n = sc.ticks.length;
    let s = `<g class="err-legend" transform="translate(${f(x)},${f(y)})">` +
      `<text class="title" x="0" y="6">Accuracy error · ${esc(String(errors.metric))} per tensor, log scale · ${esc(String(errors.file))}</text>`;
    sc.colors.forEach((c, i) => { s += `<rect class="block" x="${i * bw}" y="16" width="${bw}" height="10" fill="${c}"/>`; });
    sc.ticks.forEach((t, i) => {
      const anchor = i === 0 ? "start" : i === n - 1 ? "end" : "middle";
      s += `<text x="${i * bw}" y="34" text-anchor="${anchor}">${(i === 0 ? "≤" : i === n - 1 ? "≥" : "") + t}</text>`;
    });
    const sx = sc.colors.length * bw + 16;
    s += `<rect class="block" x="${sx}" y="16" width="14" height="10" fill="${sc.failed}"/><text x="${sx + 18}" y="21">failed (orange or worse)</text>`;
    s += `<rect class="block" x="${sx}" y="32" width="14" height="10" fill="${sc.none}"/><text x="${sx + 18}" y="37">not compared</text>`;
    const first = errors.first || {};
    let name = String(first.name || first.tensor || "");
    if (Array.from(name).length > 34) name = "…" + Array.from(name).slice(-33).join("");   // the end says the most
    if (name) s += `<rect class="err-ring" x="${sx + 170}" y="16" width="14" height="10" rx="2"/><text x="${sx + 188}" y="21">first failing: ${esc(name)}</text>`;
    s += `<text class="note" x="${sx + 170}" y="37">${errors.matched} of ${errors.tensors} tensors found in the model · ${errors.failed} failed</text>`;
    return s + "</g>";
  }

  function frameSvg(pane, b, cls) {
    const c = pane.clusters[b.id], M = Kiln.metrics;
    const toggle = b.body ? "" : `<text class="toggle" x="${f(b.w - 7)}" y="${f(M.groupHead / 2)}">−</text>`;
    return `<g class="frame${b.body ? " body" : ""}${c.df ? " df-" + esc(c.df) : ""}${cls}" data-cluster="${b.id}" transform="translate(${f(b.x)},${f(b.y)})">` +
      `<rect class="box" width="${f(b.w)}" height="${f(b.h)}" rx="8"/>` +
      `<text class="title" x="10" y="${f(M.groupHead / 2)}">${esc(c.name)}</text>${toggle}</g>`;
  }

  function bodiesSvg(b) {
    return `<g class="bodies" transform="translate(${f(b.x)},${f(b.y)})"><rect class="box" width="${f(b.w)}" height="${f(b.h)}" rx="4"/></g>`;
  }

  function edgeSvg(pane, e, lr, cls) {
    const marker = e.arrow === "end" ? ' marker-end="url(#kg-arrow)"' : e.arrow === "start" ? ' marker-start="url(#kg-arrow)"' : "";
    let s = `<g class="edge${cls || ""}"><path d="${pathD(e.pts, lr)}"${marker}/>`;
    if (e.label) {
      const t = pane.tensors[e.t], title = t[3] ? `<title>${esc(t[1])}</title>` : "";
      s += `<text x="${f(e.label[0])}" y="${f(e.label[1])}" text-anchor="${e.label[2]}">${title}${esc(t[3] || t[1])}</text>`;
    }
    return s + "</g>";
  }

  const ARROW = '<defs><marker id="kg-arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse"><path class="arrowhead" d="M0,0L10,5L0,10z"/></marker></defs>';

  /** The whole scene as one standalone SVG document (the page's "Export SVG"); with `errors` (the page's
   * accuracy summary) the legend sits under the graph. */
  function sceneSvg(pane, scene, toggles, lr, css, profileMax, errors) {
    const m = 24, legend = errors && pane.errors;
    let w = scene.width + 2 * m, h = scene.height + 2 * m;
    if (legend) { w = Math.max(w, LEGEND_W + 2 * m); h += LEGEND_H; }
    w = Math.ceil(w); h = Math.ceil(h);           // whole pixels: the size a decoded picture of it has
    const parts = [`<svg xmlns="${NS}" class="kg" width="${f(w)}" height="${f(h)}" viewBox="${f(-m)} ${f(-m)} ${f(w)} ${f(h)}">`,
      `<style>${css}</style>`, ARROW, `<rect x="${f(-m)}" y="${f(-m)}" width="${f(w)}" height="${f(h)}" fill="#ffffff"/>`];
    for (const b of scene.boxes) if (b.kind === "frame") parts.push(frameSvg(pane, b, "")); else if (b.kind === "bodies") parts.push(bodiesSvg(b));
    for (const e of scene.edges) parts.push(edgeSvg(pane, e, lr));
    for (const b of scene.boxes) if (b.kind === "node") parts.push(nodeSvg(pane, b, toggles, "", profileMax)); else if (b.kind === "group") parts.push(groupSvg(pane, b, ""));
    if (legend) parts.push(legendSvg(errors, 0, scene.height + m));
    parts.push("</svg>");
    return parts.join("\n");
  }

  const PNG_MAX_SIDE = 16000, PNG_MAX_AREA = 64e6, STRIP_GAP = 32, STRIP_MIN = 4000;

  /** How a picture of `w`×`h` px (as sceneSvg draws `scene`, margin included) becomes a PNG that reads: at
   * 2× or 1.5× or 1× where it fits, and when it is long (over STRIP_MIN px and three times as long as
   * it is broad), cut across its long side into strips laid side by side (a tall picture into columns, a
   * wide one — left to right, or a broad graph — into rows), each cut between boxes and labels where
   * possible. Only when even that does not fit the size limits is it scaled below 1×. `pane` (optional)
   * gives the labels' text. Returns {scale, rows, strips: [[from, to]] along the long side in picture px,
   * width, height} (PNG px; `rows`: the strips are stacked top to bottom). */
  function pngPlan(scene, w, h, pane) {
    const m = 24, rows = w > h, along = rows ? w : h, across = rows ? h : w;
    const spans = [], legend = h > scene.height + 2 * m + 1;
    for (const b of scene.boxes) if (b.kind === "node" || b.kind === "group") spans.push(rows ? [b.x + m, b.x + b.w + m] : [b.y + m, b.y + b.h + m]);
    if (pane) for (const e of scene.edges) {
      if (!e.label) continue;
      const [x, y, anchor] = e.label, lw = Kiln.layout.labelWidth(Kiln.layout.labelText(pane, e.t));
      spans.push(rows ? (anchor === "end" ? [x - lw + m, x + m] : [x + m, x + lw + m]) : [y - 6 + m, y + 6 + m]);
    }
    if (legend) spans.push(rows ? [0, LEGEND_W + 2 * m] : [scene.height + 2 * m - 4, h]);     // the legend under the graph
    spans.sort((a, b) => a[0] - b[0]);
    const merged = [];
    for (const sp of spans) {
      const last = merged[merged.length - 1];
      if (last && sp[0] < last[1]) last[1] = Math.max(last[1], sp[1]); else merged.push(sp.slice());
    }
    const free = (t) => {           // the nearest position to t that cuts no box
      for (const [a, b] of merged) if (t > a && t < b) return t - a < b - t ? a : b;
      return t;
    };
    const strips = (k) => {
      const cuts = [0];
      const half = along / k / 2;     // a cut moved to a box's edge still leaves strips of at least half the length
      for (let i = 1; i < k; i++) { const c = free((along * i) / k); if (c - cuts[cuts.length - 1] >= half && along - c >= half) cuts.push(c); }
      cuts.push(along);
      const out = [];
      for (let i = 1; i < cuts.length; i++) out.push([cuts[i - 1], cuts[i]]);
      return out;
    };
    const size = (st, scale) => {
      const len = Math.max(...st.map(([a, b]) => b - a)), wide = st.length * across + (st.length - 1) * STRIP_GAP;
      const [pw, ph] = rows ? [len, wide] : [wide, len];
      return [Math.ceil(pw * scale), Math.ceil(ph * scale)];
    };
    const fits = ([pw, ph]) => pw <= PNG_MAX_SIDE && ph <= PNG_MAX_SIDE && pw * ph <= PNG_MAX_AREA;
    const ratio = ([pw, ph]) => Math.max(pw, ph) / Math.max(1, Math.min(pw, ph));
    let best = strips(1);
    if (along > 3 * across && along > STRIP_MIN) {       // the strip count that makes the picture squarest
      const k0 = Math.max(1, Math.round(Math.sqrt(along / across)));
      for (let k = Math.max(1, k0 - 2); k <= k0 + 2; k++) { const st = strips(k); if (ratio(size(st, 1)) < ratio(size(best, 1))) best = st; }
    }
    for (const scale of [2, 1.5, 1]) {
      const [pw, ph] = size(best, scale);
      if (fits([pw, ph])) return { scale, rows, strips: best, width: pw, height: ph };
    }
    const [pw, ph] = size(best, 1);
    const scale = Math.min(PNG_MAX_SIDE / pw, PNG_MAX_SIDE / ph, Math.sqrt(PNG_MAX_AREA / (pw * ph)));
    const [sw, sh] = size(best, scale);
    return { scale, rows, strips: best, width: sw, height: sh };
  }

  /** Draw the decoded picture `img` on a canvas by the plan: strips side by side, a dashed line between them. */
  function pngCanvas(img, plan) {
    const canvas = document.createElement("canvas"), s = plan.scale;
    canvas.width = plan.width; canvas.height = plan.height;
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#ffffff"; ctx.fillRect(0, 0, canvas.width, canvas.height);
    const lr = plan.rows, across = lr ? img.naturalHeight : img.naturalWidth;
    plan.strips.forEach(([a, b], i) => {
      const off = i * (across + STRIP_GAP) * s;
      if (lr) ctx.drawImage(img, a, 0, b - a, across, 0, off, (b - a) * s, across * s);
      else ctx.drawImage(img, 0, a, across, b - a, off, 0, across * s, (b - a) * s);
      if (i) {
        const mid = off - (STRIP_GAP / 2) * s;
        ctx.strokeStyle = "#c7ccd4"; ctx.setLineDash([6 * s, 4 * s]); ctx.lineWidth = s;
        ctx.beginPath();
        if (lr) { ctx.moveTo(0, mid); ctx.lineTo(canvas.width, mid); } else { ctx.moveTo(mid, 0); ctx.lineTo(mid, canvas.height); }
        ctx.stroke();
      }
    });
    return canvas;
  }

  class GraphView {
    constructor(host, pane, options) {
      this.host = host; this.pane = pane; this.opts = options || {};
      this.tx = 0; this.ty = 0; this.k = 1;
      this.marks = { sel: new Set(), hit: new Set(), linked: new Set(), selCluster: -1 };
      host.innerHTML = `<svg xmlns="${NS}" class="kg"><rect class="bg" width="100%" height="100%" fill="transparent"/>${ARROW}<g class="viewport"><g class="lod"></g><g class="frames"></g><g class="edges"></g><g class="nodes"></g></g></svg>`;
      this.svg = host.firstChild;
      this.vp = this.svg.querySelector(".viewport");
      this.layers = { lod: this.vp.children[0], frames: this.vp.children[1], edges: this.vp.children[2], nodes: this.vp.children[3] };
      this.tmp = document.createElementNS(NS, "g");
      this.bindInput();
      new ResizeObserver(() => this.schedule()).observe(host);
    }

    setScene(scene, lr, toggles, profileMax) {
      this.scene = scene; this.lr = lr; this.toggles = toggles; this.profileMax = profileMax;
      for (const l of Object.values(this.layers)) l.textContent = "";
      this.shown = { box: new Map(), edge: new Map(), frames: [] };
      this.lodBuilt = false;
      this.nodeBox = new Map(); this.clusterBox = new Map();
      const grid = new Map(), add = (key, x0, y0, x1, y1) => {
        for (let i = Math.floor(x0 / CELL); i <= Math.floor(x1 / CELL); i++)
          for (let j = Math.floor(y0 / CELL); j <= Math.floor(y1 / CELL); j++) {
            const c = i + "," + j; let a = grid.get(c); if (!a) grid.set(c, (a = [])); a.push(key);
          }
      };
      scene.boxes.forEach((b, i) => {
        add(i, b.x, b.y - 16, b.x + b.w + 8, b.y + b.h + 8);
        if (b.kind === "node") this.nodeBox.set(b.id, i);
        else if (b.kind !== "bodies") this.clusterBox.set(b.id, i);
      });
      scene.edges.forEach((e, i) => {
        let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
        for (const [x, y] of e.pts) { x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x); y1 = Math.max(y1, y); }
        if (e.label) {
          const lw = Kiln.layout.labelWidth(Kiln.layout.labelText(this.pane, e.t));
          x0 = Math.min(x0, e.label[0] - lw); x1 = Math.max(x1, e.label[0] + lw); y0 = Math.min(y0, e.label[1] - 8); y1 = Math.max(y1, e.label[1] + 8);
        }
        e.bbox = [x0, y0, x1, y1];
        add(-1 - i, x0, y0, x1, y1);
      });
      this.grid = grid;
      this.schedule();
    }

    /* ---- transform ---- */
    size() { return [this.host.clientWidth || 800, this.host.clientHeight || 600]; }
    apply() { this.vp.setAttribute("transform", `translate(${this.tx},${this.ty}) scale(${this.k})`); this.schedule(); }
    zoomAt(factor, cx, cy) {
      const k = Math.max(0.02, Math.min(4, this.k * factor));
      this.tx = cx - (cx - this.tx) * (k / this.k); this.ty = cy - (cy - this.ty) * (k / this.k); this.k = k; this.apply();
    }
    zoom(factor) { const [w, h] = this.size(); this.zoomAt(factor, w / 2, h / 2); }
    fit() {
      const [w, h] = this.size(), s = this.scene, m = 24;
      this.k = Math.max(0.02, Math.min(1.2, (w - 2 * m) / Math.max(1, s.width), (h - 2 * m) / Math.max(1, s.height)));
      this.tx = (w - s.width * this.k) / 2; this.ty = (h - s.height * this.k) / 2; this.apply();
    }
    home() {   // readable zoom at the top (left, when LR) of the graph
      const [w, h] = this.size(), s = this.scene;
      const fitK = Math.min((w - 48) / Math.max(1, s.width), (h - 48) / Math.max(1, s.height));
      if (fitK >= 0.55) return this.fit();
      this.k = Math.max(0.55, Math.min(1, this.lr ? (h - 48) / Math.max(1, s.height) : (w - 48) / Math.max(1, s.width)));
      if (this.lr) { this.tx = 24; this.ty = (h - s.height * this.k) / 2; if (s.height * this.k > h) this.ty = 24; }
      else { this.ty = 24; this.tx = (w - s.width * this.k) / 2; if (s.width * this.k > w) this.tx = 24; }
      this.apply();
    }
    centerOn(x, y, animate, k) {
      const [w, h] = this.size(), k1 = k || Math.max(this.k, 0.8);
      const tx1 = w / 2 - x * k1, ty1 = h / 2 - y * k1;
      if (!animate || this.opts.instant) { this.tx = tx1; this.ty = ty1; this.k = k1; return this.apply(); }
      const t0 = performance.now(), a = [this.tx, this.ty, this.k];
      const step = (now) => {
        const t = Math.min(1, (now - t0) / 260), e = t < 0.5 ? 2 * t * t : 1 - Math.pow(-2 * t + 2, 2) / 2;
        this.tx = a[0] + (tx1 - a[0]) * e; this.ty = a[1] + (ty1 - a[1]) * e; this.k = a[2] + (k1 - a[2]) * e; this.apply();
        if (t < 1) requestAnimationFrame(step);
      };
      requestAnimationFrame(step);
    }
    reveal(kind, id, animate) {
      const i = kind === "node" ? this.nodeBox.get(id) : this.clusterBox.get(id);
      if (i === undefined) return false;
      const b = this.scene.boxes[i];
      this.centerOn(b.x + b.w / 2, b.y + b.h / 2, animate);
      return true;
    }

    /* ---- rendering ---- */
    schedule() { if (!this.pending && this.scene) { this.pending = true; requestAnimationFrame(() => { this.pending = false; this.render(); }); } }
    renderNow() { this.pending = false; this.render(); }

    classes(kind, id) {
      const m = this.marks;
      if (kind === "node") return (m.sel.has(id) ? " sel" : "") + (m.hit.has(id) ? " hit" : "") + (m.linked.has(id) ? " linked" : "");
      return (m.selCluster === id ? " sel" : "") + (m.hit.has(-1 - id) ? " hit" : "");
    }

    render() {
      const s = this.scene;
      if (!s) return;
      const [w, h] = this.size();
      const lod = this.k < LOD_SCALE && s.boxes.length > 600;
      this.svg.classList.toggle("lod-mode", lod);
      this.lod = lod;
      if (lod) { this.buildLod(); if (this.opts.onRender) this.opts.onRender(this); return; }
      const mx = w * 0.5 / this.k, my = h * 0.5 / this.k;
      const x0 = -this.tx / this.k - mx, y0 = -this.ty / this.k - my, x1 = x0 + w / this.k + 2 * mx, y1 = y0 + h / this.k + 2 * my;
      const boxes = new Set(), edges = new Set();
      for (let i = Math.floor(x0 / CELL); i <= Math.floor(x1 / CELL); i++)
        for (let j = Math.floor(y0 / CELL); j <= Math.floor(y1 / CELL); j++) {
          const a = this.grid.get(i + "," + j);
          if (a) for (const key of a) {
            if (key >= 0) { const b = s.boxes[key]; if (b.x < x1 && b.x + b.w > x0 && b.y - 16 < y1 && b.y + b.h > y0) boxes.add(key); }
            else { const e = s.edges[-1 - key], bb = e.bbox; if (bb[0] < x1 && bb[2] > x0 && bb[1] < y1 && bb[3] > y0) edges.add(-1 - key); }
          }
        }
      const shown = this.shown;
      for (const [key, el] of shown.box) if (!boxes.has(key)) { el.remove(); shown.box.delete(key); }
      for (const [key, el] of shown.edge) if (!edges.has(key)) { el.remove(); shown.edge.delete(key); }
      let nodesHtml = "", edgesHtml = "";
      const newNodes = [], newEdges = [], newFrames = [];
      for (const key of boxes) {
        if (shown.box.has(key)) continue;
        const b = s.boxes[key];
        if (b.kind === "node") { nodesHtml += nodeSvg(this.pane, b, this.toggles, this.classes("node", b.id), this.profileMax); newNodes.push(key); }
        else if (b.kind === "group") { nodesHtml += groupSvg(this.pane, b, this.classes("cluster", b.id)); newNodes.push(key); }
        else newFrames.push(key);
      }
      for (const key of edges) if (!shown.edge.has(key)) { edgesHtml += edgeSvg(this.pane, s.edges[key], this.lr); newEdges.push(key); }
      this.append(this.layers.nodes, nodesHtml, newNodes, shown.box);
      this.append(this.layers.edges, edgesHtml, newEdges, shown.edge);
      if (newFrames.length) {
        newFrames.sort((a, b) => a - b);
        for (const key of newFrames) {
          const b = s.boxes[key];
          this.tmp.innerHTML = b.kind === "bodies" ? bodiesSvg(b) : frameSvg(this.pane, b, this.classes("cluster", b.id));
          const el = this.tmp.firstChild;
          let next = null;
          for (const [k2, e2] of shown.box) if (k2 > key && e2.parentNode === this.layers.frames && (!next || k2 < next[0])) next = [k2, e2];
          this.layers.frames.insertBefore(el, next ? next[1] : null);
          shown.box.set(key, el);
        }
      }
      if (this.opts.onRender) this.opts.onRender(this);
    }

    append(layer, html, keys, map) {
      if (!keys.length) return;
      this.tmp.innerHTML = html;
      const els = Array.from(this.tmp.children);
      els.forEach((el, i) => { map.set(keys[i], el); });
      layer.append(...els);
    }

    buildLod() {
      if (this.lodBuilt) return;
      this.lodBuilt = true;
      const s = this.scene, byCat = new Map();
      let frames = "", groups = "", edges = "";
      for (const b of s.boxes) {
        const r = `M${f(b.x)},${f(b.y)}h${f(b.w)}v${f(b.h)}h${f(-b.w)}z`;
        if (b.kind === "node") {         // by category, or by error colour under the accuracy overlay
          const n = this.pane.nodes[b.id], key = this.pane.errors && !n.pseudo ? "err:" + (n.err ? n.err.color : this.pane.errors.none) : n.df ? "df-" + n.df : n.cat;
          byCat.set(key, (byCat.get(key) || "") + r);
        }
        else if (b.kind === "group") groups += r;
        else frames += r;
      }
      for (const e of s.edges) edges += "M" + e.pts.map(([x, y]) => f(x) + "," + f(y)).join("L");
      let html = `<path class="lod-frames" d="${frames}"/><path class="lod-edges" d="${edges}"/><path class="lod-groups" d="${groups}"/>`;
      for (const [key, d] of byCat) {
        if (key.startsWith("err:")) html += `<path class="head" style="fill:${esc(key.slice(4))}" d="${d}"/>`;
        else html += `<g class="cat-${esc(key)}"><path class="head" d="${d}"/></g>`;
      }
      this.layers.lod.innerHTML = html;
    }

    refreshMarks() {
      for (const [key, el] of this.shown.box) {
        const b = this.scene.boxes[key];
        if (b.kind === "bodies") continue;
        const base = b.kind === "node" ? el.getAttribute("class").replace(/ (sel|hit|linked)/g, "") : el.getAttribute("class").replace(/ (sel|hit)/g, "");
        el.setAttribute("class", base + this.classes(b.kind === "node" ? "node" : "cluster", b.id));
      }
    }

    /* ---- input ---- */
    bindInput() {
      const svg = this.svg;
      let drag = null;
      svg.addEventListener("pointerdown", (ev) => {
        if (ev.button !== 0) return;
        drag = { x: ev.clientX, y: ev.clientY, tx: this.tx, ty: this.ty, moved: false, id: ev.pointerId };
      });
      svg.addEventListener("pointermove", (ev) => {
        if (!drag) return;
        const dx = ev.clientX - drag.x, dy = ev.clientY - drag.y;
        if (!drag.moved && Math.abs(dx) + Math.abs(dy) > 3) { drag.moved = true; svg.setPointerCapture(drag.id); svg.classList.add("panning"); }
        if (drag.moved) { this.tx = drag.tx + dx; this.ty = drag.ty + dy; this.apply(); }
      });
      const end = (ev) => {
        if (!drag) return;
        const moved = drag.moved;
        drag = null; svg.classList.remove("panning");
        if (!moved && ev.type === "pointerup") this.click(ev);
      };
      svg.addEventListener("pointerup", end);
      svg.addEventListener("pointercancel", end);
      svg.addEventListener("dblclick", (ev) => {
        const g = ev.target.closest("[data-cluster]");
        if (g && this.opts.onToggle) this.opts.onToggle(+g.dataset.cluster);
        const n = ev.target.closest("[data-node]");
        if (n && this.pane.nodes[+n.dataset.node].sub) {                // into the first body (in place: its ▸)
          if (this.opts.onEnter) this.opts.onEnter(+n.dataset.node); else if (this.opts.onOpen) this.opts.onOpen(+n.dataset.node);
        }
      });
      svg.addEventListener("wheel", (ev) => {
        ev.preventDefault();
        const r = svg.getBoundingClientRect();
        if (ev.ctrlKey || ev.metaKey) this.zoomAt(Math.exp(-ev.deltaY * (ev.deltaMode ? 0.05 : 0.0022)), ev.clientX - r.left, ev.clientY - r.top);
        else { const u = ev.deltaMode ? 20 : 1; this.tx -= (ev.shiftKey ? ev.deltaY : ev.deltaX) * u; this.ty -= (ev.shiftKey ? 0 : ev.deltaY) * u; this.apply(); }
      }, { passive: false });
    }

    click(ev) {
      const t = ev.target;
      const n = t.closest("[data-node]"), g = t.closest("[data-cluster]");
      if (n) {
        const id = +n.dataset.node;
        if (t.classList.contains("more") && this.opts.onOpen) return this.opts.onOpen(id);
        return this.opts.onSelect && this.opts.onSelect({ kind: "node", id });
      }
      if (g) {
        const id = +g.dataset.cluster;
        if (t.classList.contains("toggle") && this.opts.onToggle) return this.opts.onToggle(id);
        return this.opts.onSelect && this.opts.onSelect({ kind: "cluster", id });
      }
      if (this.opts.onSelect) this.opts.onSelect(null);
    }
  }

  Kiln.GraphView = GraphView;
  Kiln.draw = { sceneSvg, nodeSvg, heatColor, pathD, legendSvg, pngPlan, pngCanvas, LEGEND_W, LEGEND_H };
})();
