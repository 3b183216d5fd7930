/* Kiln viewer — breadth coordinates of a layered drawing: Brandes–Köpf.
 * Four alignments (from the top or the bottom, from the left or the right) each join every entry with its
 * median neighbour into vertical blocks, giving way to segments between two dummies (type-1 conflicts) so
 * that long edges stay straight; each alignment is compacted (longest path over the block graph, then
 * blocks pulled towards their right neighbours), and the four results are balanced: aligned to the
 * narrowest and averaged over their two middle values. Segments may ask for an offset (x_v = x_u + d);
 * blocks then carry inner shifts. */
"use strict";
var Kiln = window.Kiln || (window.Kiln = {});

(function () {
  function assign(layers, n, br, up, down, nodeSep, edgeSep, loose) {
    const total = br.length, pos = new Int32Array(total);
    for (const layer of layers) layer.forEach((e, i) => { pos[e] = i; });
    const marked = type1(layers, n, up, pos);
    if (loose) for (const k of loose) marked.add(k);          // segments never aligned ("u,v")
    const results = [];
    for (const vertical of ["down", "up"]) {
      for (const horizontal of ["left", "right"]) {
        let lays = vertical === "down" ? layers : layers.slice().reverse();
        if (horizontal === "right") lays = lays.map((l) => l.slice().reverse());
        const nbrs = vertical === "down" ? up : down, flip = horizontal === "right" ? -1 : 1;
        const [root, inner] = align(lays, nbrs, marked, total, flip);
        const xs = compact(lays, root, inner, br, nodeSep, edgeSep);
        results.push(xs.map((v) => flip * v));
      }
    }
    const spans = results.map((xs) => {
      let lo = Infinity, hi = -Infinity;
      for (const layer of layers) for (const e of layer) { lo = Math.min(lo, xs[e] - br[e] / 2); hi = Math.max(hi, xs[e] + br[e] / 2); }
      return lo === Infinity ? [0, 0] : [lo, hi];
    });
    let best = 0;
    for (let k = 1; k < 4; k++) if (spans[k][1] - spans[k][0] < spans[best][1] - spans[best][0]) best = k;
    results.forEach((xs, k) => {
      const delta = k % 2 === 0 ? spans[best][0] - spans[k][0] : spans[best][1] - spans[k][1];
      if (delta) for (let i = 0; i < total; i++) xs[i] += delta;
    });
    const out = new Float64Array(total);
    for (let i = 0; i < total; i++) {
      const v = [results[0][i], results[1][i], results[2][i], results[3][i]].sort((a, b) => a - b);
      out[i] = (v[1] + v[2]) / 2;
    }
    return out;
  }

  function type1(layers, n, up, pos) {
    const marked = new Set();
    for (let r = 1; r < layers.length; r++) {
      const prevLen = layers[r - 1].length, lower = layers[r];
      let k0 = 0, scan = 0;
      for (let l1 = 0; l1 < lower.length; l1++) {
        const v = lower[l1];
        let w = null;
        if (v >= n) for (const [u] of up[v]) if (u >= n) { w = u; break; }
        if (w !== null || l1 === lower.length - 1) {
          const k1 = w !== null ? pos[w] : prevLen;
          for (const s of lower.slice(scan, l1 + 1))
            for (const [u] of up[s])
              if ((pos[u] < k0 || pos[u] > k1) && !(u >= n && s >= n)) marked.add(u + "," + s);
          scan = l1 + 1;
          k0 = k1;
        }
      }
    }
    return marked;
  }

  function align(lays, nbrs, marked, total, flip) {
    const root = new Int32Array(total), al = new Int32Array(total), inner = new Float64Array(total), hpos = new Int32Array(total);
    for (let i = 0; i < total; i++) { root[i] = i; al[i] = i; }
    for (const layer of lays) layer.forEach((e, i) => { hpos[e] = i; });
    for (const layer of lays) {
      let r = -1;
      for (const v of layer) {
        let ns = nbrs[v];
        if (!ns.length) continue;
        ns = ns.slice().sort((p, q) => hpos[p[0]] - hpos[q[0]] || flip * p[1] - flip * q[1]);
        const d = ns.length, lo = (d - 1) >> 1, hi = d >> 1;
        for (const m of lo === hi ? [lo] : [lo, hi]) {
          if (al[v] !== v) break;
          const [u, off] = ns[m];
          if (marked.has(u + "," + v) || marked.has(v + "," + u) || r >= hpos[u]) continue;
          al[u] = v; root[v] = root[u]; al[v] = root[v]; inner[v] = inner[u] + flip * off; r = hpos[u];
        }
      }
    }
    return [root, inner];
  }

  function compact(lays, root, inner, br, nodeSep, edgeSep) {
    const succ = new Map(), pred = new Map();
    for (const layer of lays) {
      for (let i = 1; i < layer.length; i++) {
        const u = layer[i - 1], v = layer[i];
        const gap = br[u] > 0 && br[v] > 0 ? nodeSep : edgeSep;
        const w = inner[u] - inner[v] + (br[u] + br[v]) / 2 + gap;
        const a = root[u], b = root[v];
        if (!succ.has(a)) succ.set(a, new Map());
        const s = succ.get(a);
        if (!s.has(b) || s.get(b) < w) {
          s.set(b, w);
          if (!pred.has(b)) pred.set(b, new Map());
          pred.get(b).set(a, w);
        }
      }
    }
    const roots = [];
    for (let v = 0; v < root.length; v++) if (root[v] === v) roots.push(v);
    const indeg = new Map();
    for (const v of roots) indeg.set(v, pred.has(v) ? pred.get(v).size : 0);
    const order = [], queue = roots.filter((v) => indeg.get(v) === 0);
    for (let qi = 0; qi < queue.length; qi++) {
      const v = queue[qi];
      order.push(v);
      for (const s of (succ.get(v) || new Map()).keys()) {
        indeg.set(s, indeg.get(s) - 1);
        if (indeg.get(s) === 0) queue.push(s);
      }
    }
    if (order.length < roots.length) { const seen = new Set(order); for (const v of roots) if (!seen.has(v)) order.push(v); }
    const xs = new Map();
    for (const v of order) {
      let x = 0, any = false;
      for (const [p, w] of pred.get(v) || []) { const c = (xs.get(p) || 0) + w; if (!any || c > x) { x = c; any = true; } }
      xs.set(v, any ? x : 0);
    }
    for (let k = order.length - 1; k >= 0; k--) {
      const v = order[k], s = succ.get(v);
      if (s && s.size) {
        let lim = Infinity;
        for (const [t, w] of s) lim = Math.min(lim, (xs.get(t) || 0) - w);
        if (lim > xs.get(v)) xs.set(v, lim);
      }
    }
    const out = new Float64Array(root.length);
    for (let v = 0; v < root.length; v++) out[v] = xs.get(root[v]) + inner[v];
    return out;
  }

  Kiln.coords = { assign };
})();
