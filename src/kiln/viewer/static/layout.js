/* Kiln viewer — coordinates: box sizes, breadth coordinates (Brandes–Köpf, coords.js), cluster
 * composition, edge anchors and label placement, from the layout structure the page data carries
 * (kiln/viewer/layout.py: ranks, dummies, order). The one implementation: the served page, the offline
 * HTML file and headless SVG/PNG export (kiln/viewer/export.py drives this page in Chromium) all use it. */
"use strict";
var Kiln = window.Kiln || (window.Kiln = {});

(function () {
  const NARROW = new Set("iljtfrI.,:;|!'` ()[]");
  const WIDE = new Set("MWmw@%");
  /** Sizes in px of everything drawn; the drawing (view.js) reads them as Kiln.metrics. */
  const M = Object.freeze({
    nodeSep: 22, edgeSep: 12, rankSep: 34, rankSepLR: 72, headH: 22, rowH: 15, rowPad: 5, padX: 9,
    minW: 48, groupPad: 12, groupHead: 22, headFont: 12, rowFont: 10.5, labelFont: 9,
  });

  function len(text) { let n = 0; for (const _ of text) n++; return n; }   // code points

  function textWidth(text, kind) {
    if (kind === "row") return len(text) * M.rowFont * 0.602;
    const size = kind === "label" ? M.labelFont : M.headFont;
    let w = 0;
    for (const ch of text) {
      if (NARROW.has(ch)) w += 0.34;
      else if (WIDE.has(ch)) w += 0.9;
      else if (ch >= "A" && ch <= "Z") w += 0.74;
      else if (ch >= "0" && ch <= "9") w += 0.64;
      else w += 0.62;
    }
    return w * size;
  }

  const labelWidths = new Map();
  let measure = null;               // a 2D context with the drawing's label font, or false without a page

  /** Width in px of an edge label as the page draws it (measured in the label font; estimated without a page). */
  function labelWidth(text) {
    let w = labelWidths.get(text);
    if (w !== undefined) return w;
    if (measure === null) {
      const probe = typeof document !== "undefined" && document.querySelector(".kg");
      const ctx = probe && document.createElement("canvas").getContext("2d");
      if (ctx) ctx.font = `${M.labelFont}px ${getComputedStyle(probe).fontFamily}`;
      measure = ctx || false;
    }
    w = measure ? Math.ceil(measure.measureText(text).width) + 1 : textWidth(text, "label");
    labelWidths.set(text, w);
    return w;
  }

  /** The text on an edge: the tensor's shape, or its shorter label (the full shape shows on hover). */
  function labelText(pane, t) { const e = pane.tensors[t]; return e[3] || e[1]; }

  function clip(text, n) {
    const chars = Array.from(text);
    return chars.length <= n ? text : chars.slice(0, n - 1).join("") + "…";
  }

  function boxContent(node, toggles) {
    if (node.pseudo) return [node.name, node.shape ? [["shape", node.shape]] : []];
    const rows = [];
    if (toggles.names && node.name) rows.push(["name", clip(node.name, 34)]);
    if (toggles.weights !== false) for (const r of node.wrow || []) rows.push(["weight", r]);
    if (toggles.compact) (node.krow || []).forEach((r, i) => rows.push([quiet(node.kdf && node.kdf[i]) ? "weight" : "weight df-" + node.kdf[i], r]));
    if (toggles.attributes) for (const r of node.arow || []) rows.push(["attr", r]);
    for (const r of node.erow || []) rows.push(["engine", r]);
    if (node.trow) rows.push(["ms", node.trow]);
    return [node.op, rows];
  }

  function nodeSize(node, toggles) {
    const [head, rows] = boxContent(node, toggles);
    let w = Math.max(M.minW, textWidth(head, "head") + 2 * M.padX);
    for (const [, text] of rows) w = Math.max(w, textWidth(text, "row") + 2 * M.padX);
    const h = M.headH + (rows.length ? rows.length * M.rowH + M.rowPad : 0);
    return [Math.ceil(w), h];
  }

  function groupSize(c) {
    const w = Math.max(textWidth(c.name, "head") + 2 * M.padX + 16,
      textWidth(c.size + " nodes", "row") + 2 * M.padX + 16, 80);
    return [Math.ceil(w), M.headH + M.rowH + M.rowPad];
  }

  /** `need[r]`: room the labels of edges entering rank r ask for before it (left → right only). */
  function assign(struct, br, th, up, down, rankSep, need, loose) {
    const layers = struct.layers;
    const x = Kiln.coords.assign(layers, struct.n, br, up, down, M.nodeSep, M.edgeSep, loose);
    let left = Infinity, right = -Infinity;
    for (const layer of layers) for (const e of layer) {
      left = Math.min(left, x[e] - br[e] / 2); right = Math.max(right, x[e] + br[e] / 2);
    }
    if (left === Infinity) { left = 0; right = 0; }
    for (let i = 0; i < x.length; i++) x[i] -= left;
    const starts = [], thick = [];
    let depth = 0;
    layers.forEach((layer, r) => {
      let t = 0;
      for (const e of layer) t = Math.max(t, th[e]);
      if (r) depth += Math.max(t > 0 && thick[thick.length - 1] > 0 ? rankSep : rankSep / 2, need ? need[r] || 0 : 0);
      starts.push(depth); thick.push(t); depth += t;
    });
    return [x, starts, thick, right - left, depth];
  }

  function spread(k, breadth) {
    if (k <= 1) return k ? [0] : [];
    const step = Math.min(12, Math.max(0, breadth - 16) / (k - 1));
    const out = [];
    for (let i = 0; i < k; i++) out.push((i - (k - 1) / 2) * step);
    return out;
  }

  /** A model diff's status that draws no attention (or none: not a diff). */
  function quiet(df) { return df == null || df === "unchanged" || df === "kept"; }

  /** Whether a node is drawn: with the Compact toggle on, constants folded into their reader are not; in a model
   * diff their row in the reader carries their status (node.kdf, from kiln/viewer/diff_page.py). */
  function shown(node, toggles) {
    return !(toggles.compact && node.fold != null);
  }

  /** The cluster's layout structure without the entries of folded constants (their item, the dummies of
   * their edge and ranks left empty); entry numbers stay those of `s`. */
  function visibleStructure(pane, c, s, toggles) {
    if (!toggles.compact) return s;
    const hidden = new Set();
    c.items.forEach(([kind, idx], i) => { if (kind === "n" && !shown(pane.nodes[idx], toggles)) hidden.add(i); });
    if (!hidden.size) return s;
    const edges = [];
    for (const h of s.edges) {
      if (hidden.has(h[0])) { for (const d of h[2]) hidden.add(d); continue; }
      edges.push(h);
    }
    const layers = s.layers.map((l) => l.filter((e) => !hidden.has(e))).filter((l) => l.length);
    return { n: s.n, layers, edges, wrapped: s.wrapped };
  }

  class Placer {
    /** `expanded`: group clusters drawn open; `opened`: nodes whose subgraphs are drawn in place. */
    constructor(pane, expanded, opened, toggles, rankdir) {
      this.pane = pane; this.expanded = expanded; this.opened = opened;
      this.toggles = toggles; this.lr = rankdir === "LR"; this.cache = new Map();
    }

    itemSize(item) {
      const [kind, idx] = item;
      if (kind === "n") {
        const node = this.pane.nodes[idx];
        const [w, h] = nodeSize(node, this.toggles);
        if (node.sub && this.opened.has(idx)) {
          const [bw, bh] = this.bodiesSize(node);
          return [Math.max(w, bw), h + bh];
        }
        return [w, h];
      }
      if (kind === "c") {
        const c = this.pane.clusters[idx];
        return this.expanded.has(idx) ? this.frameSize(c, this.cluster(idx)) : groupSize(c);
      }
      return [0, 0];
    }

    frameSize(c, lay) {
      const w = Math.max(lay.width + 2 * M.groupPad, textWidth(c.name, "head") + 2 * M.padX + 16);
      return [Math.ceil(w), M.groupHead + lay.height + M.groupPad];
    }

    bodiesSize(node) {
      let w = 0, h = 0;
      for (const cid of node.sub) {
        const [fw, fh] = this.frameSize(this.pane.clusters[cid], this.cluster(cid));
        w += fw + (w ? M.groupPad : 0); h = Math.max(h, fh);
      }
      return [w + 2 * M.groupPad, h + M.groupPad];
    }

    cluster(cid) {
      const hit = this.cache.get(cid);
      if (hit) return hit;
      const c = this.pane.clusters[cid], s = visibleStructure(this.pane, c, c.s, this.toggles), n = s.n;
      let total = n;
      for (const h of c.s.edges) total += h[2].length;         // dummies keep their numbers
      const size = new Array(total).fill(null).map(() => [0, 0]);
      c.items.forEach((item, i) => { size[i] = this.itemSize(item); });
      const br = size.map(([w, h]) => (this.lr ? h : w)), th = size.map(([w, h]) => (this.lr ? w : h));
      const segs = [];
      for (const [src, tensor, trunk, dsts] of s.edges) {
        let prev = src;
        for (const d of trunk) { segs.push([prev, d, tensor]); prev = d; }
        for (const [dst, at] of dsts) segs.push([at < 0 ? src : trunk[at], dst, tensor]);
      }
      const [outOff, inOff] = this.offsets(c, n, s.layers, segs, br);
      // Alignment ignores anchor offsets: following ports exactly would shift every group in a chain by the
      // distance between its entry and exit ports (a 10k-node encoder came out 32,000 px wide).
      const up = [], down = [];
      for (let i = 0; i < total; i++) { up.push([]); down.push([]); }
      for (const [a, b] of segs) {
        const w = a >= n && b >= n ? 8 : a >= n || b >= n ? 2 : 1;
        up[b].push([a, 0, w]); down[a].push([b, 0, w]);
      }
      const need = this.lr ? this.labelRoom(c, s, segs, n) : null;
      // Folded wide ranks (layout.py _wrap): an edge leaving a box for a long run of dummies bends at once, so
      // the runs passing the bands below pack side by side instead of each keeping its box's breadth.
      const loose = s.wrapped ? new Set(segs.filter(([a, b]) => a < n && b >= n).map(([a, b]) => a + "," + b)) : null;
      const [x, starts, thick, width, depth] = assign(s, br, th, up, down, this.lr ? M.rankSepLR : M.rankSep, need, loose);
      const pos = new Array(total), band = new Array(total);
      s.layers.forEach((layer, r) => {
        const mid = starts[r] + thick[r] / 2;
        for (const e of layer) {
          pos[e] = this.lr ? [mid, x[e]] : [x[e], mid];
          band[e] = [starts[r], starts[r] + thick[r]];
        }
      });
      const lay = { width: this.lr ? depth : width, height: this.lr ? width : depth, pos, size, band,
        portIn: new Map(), portOut: new Map(), outOff, inOff, s };
      c.items.forEach(([kind, k], i) => {
        if (kind === "i") lay.portIn.set(c.pin[k], x[i]);
        else if (kind === "o") lay.portOut.set(c.pout[k], x[i]);
      });
      this.cache.set(cid, lay);
      return lay;
    }

    /** Left → right, the gap before each rank holds the widest label of the edges that end in it. */
    labelRoom(c, s, segs, n) {
      const rank = new Map(), need = [];
      s.layers.forEach((layer, r) => { for (const e of layer) rank.set(e, r); });
      for (const [, b, t] of segs) {
        if (b >= n) continue;
        const [kind, idx] = c.items[b];
        const text = (kind === "n" || (kind === "c" && !this.expanded.has(idx))) && labelText(this.pane, t);
        if (text) { const r = rank.get(b); need[r] = Math.max(need[r] || 0, labelWidth(text) + 12); }
      }
      return need;
    }

    offsets(c, n, layers, segs, br) {
      const order = new Map();
      for (const layer of layers) layer.forEach((e, i) => order.set(e, i));
      const outs = new Map(), ins = new Map();
      for (const [a, b, t] of segs) {
        if (a < n) {
          if (!outs.has(a)) outs.set(a, new Map());
          const m = outs.get(a);
          if (!m.has(t)) m.set(t, []);
          m.get(t).push(order.get(b));
        }
        if (b < n) {
          if (!ins.has(b)) ins.set(b, []);
          ins.get(b).push([order.get(a), t, a]);
        }
      }
      const outOff = new Map(), inOff = new Map();
      for (const [a, byTensor] of outs) {
        const [kind, idx] = c.items[a];
        if (kind === "c" && this.expanded.has(idx)) {
          for (const t of byTensor.keys()) outOff.set(a + "|" + t, this.portOffset(idx, t, true));
        } else if ((kind === "n" || kind === "c") && byTensor.size > 1) {
          const keys = [];
          for (const [t, v] of byTensor) keys.push([v.reduce((p, q) => p + q, 0) / v.length, t]);
          keys.sort((p, q) => p[0] - q[0] || p[1] - q[1]);
          const offs = spread(keys.length, br[a]);
          keys.forEach(([, t], i) => outOff.set(a + "|" + t, offs[i]));
        }
      }
      for (const [b, lst] of ins) {
        const [kind, idx] = c.items[b];
        if (kind === "c" && this.expanded.has(idx)) {
          for (const [, t, a] of lst) inOff.set(b + "|" + a + "|" + t, this.portOffset(idx, t, false));
        } else if ((kind === "n" || kind === "c") && lst.length > 1) {
          lst.sort((p, q) => p[0] - q[0] || p[1] - q[1] || p[2] - q[2]);
          const offs = spread(lst.length, br[b]);
          lst.forEach(([, t, a], i) => inOff.set(b + "|" + a + "|" + t, offs[i]));
        }
      }
      return [outOff, inOff];
    }

    portOffset(cid, tensor, out) {
      const lay = this.cluster(cid);
      const ports = out ? lay.portOut : lay.portIn;
      if (!ports.has(tensor)) return 0;
      const [w, h] = this.frameSize(this.pane.clusters[cid], lay);
      return this.lr ? M.groupHead + ports.get(tensor) - h / 2 : M.groupPad + ports.get(tensor) - w / 2;
    }

    /** The drawing of cluster `root` (0: the model; a body: its inside, with room for its entry and exit ports). */
    scene(root) {
      const out = { boxes: [], edges: [], labelled: [] };
      const lay = this.cluster(root || 0);
      const [ox, oy] = root ? [M.groupPad, M.groupHead] : [0, 0];
      this.emit(root || 0, ox, oy, out);
      out.width = lay.width + 2 * ox; out.height = lay.height + (root ? M.groupHead + M.groupPad : 0);
      this.labels(out);
      delete out.labelled;
      return out;
    }

    emit(cid, ox, oy, out) {
      const c = this.pane.clusters[cid], lay = this.cluster(cid);
      c.items.forEach(([kind, idx], i) => {
        if (kind === "i" || kind === "o" || (kind === "n" && !shown(this.pane.nodes[idx], this.toggles))) return;
        const [cx, cy] = lay.pos[i], [w, h] = lay.size[i];
        const x0 = ox + cx - w / 2, y0 = oy + cy - h / 2;
        if (kind === "n") {
          const node = this.pane.nodes[idx];
          const [nw, nh] = nodeSize(node, this.toggles);
          const open = !!node.sub && this.opened.has(idx);
          out.boxes.push({ kind: "node", id: idx, x: open ? x0 + (w - nw) / 2 : x0, y: y0, w: open ? nw : w, h: nh, open });
          if (open) {
            out.boxes.push({ kind: "bodies", id: idx, x: x0, y: y0 + nh, w, h: h - nh });
            let bx = x0 + M.groupPad + (w - this.bodiesSize(node)[0]) / 2;
            for (const sub of node.sub) {
              const [fw, fh] = this.frameSize(this.pane.clusters[sub], this.cluster(sub));
              out.boxes.push({ kind: "frame", id: sub, x: bx, y: y0 + nh, w: fw, h: fh, body: true });
              this.emit(sub, bx + M.groupPad, y0 + nh + M.groupHead, out);
              bx += fw + M.groupPad;
            }
          }
        } else if (this.expanded.has(idx)) {
          out.boxes.push({ kind: "frame", id: idx, x: x0, y: y0, w, h });
          this.emit(idx, x0 + M.groupPad, y0 + M.groupHead, out);
        } else {
          out.boxes.push({ kind: "group", id: idx, x: x0, y: y0, w, h });
        }
      });
      this.edges(c, lay, ox, oy, out, cid);
    }

    anchor(c, lay, e, tensor, out, ox, oy, other) {
      const n = c.items.length, [cx, cy] = lay.pos[e];
      if (e >= n) {
        const d = out ? lay.band[e][1] : lay.band[e][0];
        return this.lr ? [ox + d, oy + cy] : [ox + cx, oy + d];
      }
      const kind = c.items[e][0];
      if (kind === "i") return this.lr ? [ox - M.groupPad, oy + cy] : [ox + cx, oy - M.groupHead];
      if (kind === "o") return this.lr ? [ox + lay.width + M.groupPad, oy + cy] : [ox + cx, oy + lay.height + M.groupPad];
      const [w, h] = lay.size[e];
      const off = (out ? lay.outOff.get(e + "|" + tensor) : lay.inOff.get(e + "|" + other + "|" + tensor)) || 0;
      if (this.lr) return [ox + cx + (out ? w / 2 : -w / 2), oy + cy + off];
      return [ox + cx + off, oy + cy + (out ? h / 2 : -h / 2)];
    }

    edges(c, lay, ox, oy, out, cid) {
      for (const [src, tensor, trunk, dsts, flip] of lay.s.edges) {
        const start = this.anchor(c, lay, src, tensor, true, ox, oy, -1);
        if (trunk.length) {
          const pts = [start];
          for (const d of trunk) {
            pts.push(this.anchor(c, lay, d, tensor, false, ox, oy, -1));
            pts.push(this.anchor(c, lay, d, tensor, true, ox, oy, -1));
          }
          out.edges.push({ pts, t: tensor, arrow: flip ? "start" : "", c: cid });
        }
        for (const [dst, at] of dsts) {
          const frm = at < 0 ? src : trunk[at];
          const a = at < 0 ? start : this.anchor(c, lay, frm, tensor, true, ox, oy, -1);
          const b = this.anchor(c, lay, dst, tensor, false, ox, oy, frm);
          const [kind, idx] = c.items[dst];
          const final = kind === "n" || (kind === "c" && !this.expanded.has(idx));
          const arrow = flip ? (trunk.length ? "" : "start") : (final ? "end" : "");
          const e = { pts: [a, b], t: tensor, arrow, c: cid, dst: kind === "n" ? idx : -1, src: -1 };
          if (final) out.labelled.push(e);
          out.edges.push(e);
        }
      }
    }

    /** Shape labels beside the edges, in edge order: each takes the first of its candidate places that
     * overlaps no box and no other label and is not above or left of the drawing (which grows to hold it);
     * a label with no free place, or whose text is already written right there, is left out. */
    labels(out) {
      const grid = new Map(), CELL = 64, h = 11;
      const put = (b) => {
        for (let i = Math.floor(b[0] / CELL), i1 = Math.floor(b[2] / CELL); i <= i1; i++)
          for (let j = Math.floor(b[1] / CELL), j1 = Math.floor(b[3] / CELL); j <= j1; j++) {
            const k = i * 4194304 + j, a = grid.get(k);
            if (a) a.push(b); else grid.set(k, [b]);
          }
      };
      const test = (x0, y0, x1, y1, text) => {       // 0: free, 1: taken, 2: the same text is already there
        let r = 0;
        for (let i = Math.floor(x0 / CELL), i1 = Math.floor(x1 / CELL); i <= i1; i++)
          for (let j = Math.floor(y0 / CELL), j1 = Math.floor(y1 / CELL); j <= j1; j++) {
            const a = grid.get(i * 4194304 + j);
            if (a) for (const o of a) if (x0 < o[2] && o[0] < x1 && y0 < o[3] && o[1] < y1) { if (o[4] === text) return 2; r = 1; }
          }
        return r;
      };
      for (const b of out.boxes) if (b.kind === "node" || b.kind === "group") put([b.x, b.y, b.x + b.w, b.y + b.h, null]);
      // places by the arrow's end, then by the edge's start (fan-ins), each on both sides of the edge:
      // [from the end (0) or the start (1), dx, dy, anchor "end" (1) or "start" (0)]; LR shifts the last two back
      const spots = this.lr
        ? [[0, -5, -8, 1], [0, -5, 8, 1], [1, 5, -8, 0], [1, 5, 8, 0], [0, -11, -8, 1], [0, -11, 8, 1]]
        : [[0, 5, -9, 0], [0, -5, -9, 1], [1, 5, 9, 0], [1, -5, 9, 1], [0, 5, -9 - h, 0], [0, -5, -9 - h, 1]];
      for (const e of out.labelled) {
        const text = labelText(this.pane, e.t);
        if (!text) continue;
        const w = labelWidth(text), end = e.pts[e.pts.length - 1], start = e.pts[0];
        for (let k = 0; k < 6; k++) {
          const [from, dx, dy, right] = spots[k], p = from ? start : end;
          const lx = p[0] + dx - (this.lr && k >= 4 ? w : 0), ly = p[1] + dy;
          const x0 = right ? lx - w : lx, y0 = ly - h / 2, x1 = x0 + w, y1 = y0 + h;
          if (x0 < 0 || y0 < 0) continue;
          const r = test(x0, y0, x1, y1, text);
          if (r === 2) break;
          if (r === 1) continue;
          put([x0, y0, x1, y1, text]);
          e.label = [lx, ly, right ? "end" : "start"];
          if (x1 > out.width) out.width = x1;
          if (y1 > out.height) out.height = y1;
          break;
        }
      }
    }
  }

  Kiln.Placer = Placer;
  Kiln.metrics = M;
  Kiln.layout = { shown, quiet, textWidth, labelWidth, labelText, boxContent, nodeSize, groupSize, clip };
})();
