/* Kiln viewer — sidebar contents: node, group, tensor, weight, model, profile and accuracy panels. */
"use strict";
var Kiln = window.Kiln || (window.Kiln = {});

(function () {
  const esc = (s) => String(s == null ? "" : s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  const CAT_COLORS = {
    conv: "#2f5e93", activation: "#8d2f28", normalization: "#2d6b58", pooling: "#3f6f35", shape: "#6f5a3a",
    tensor: "#5c4d74", elementwise: "#4b5866", matmul: "#1f4f7f", reduce: "#7a3c63", control: "#8a6d12",
    plugin: "#c2590f", custom: "#a8520f", data: "#3a3f47", quantization: "#2f6f73", recurrent: "#7b3f8a",
    attention: "#a23b6a", other: "#555b63",
  };

  function fmtBytes(n) {
    if (n == null) return "—";
    const u = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(n < 10 ? 2 : 1) : n) + " " + u[i];
  }
  function fmtCount(n) {
    if (n == null) return "—";
    if (n >= 1e9) return (n / 1e9).toFixed(2) + " B";
    if (n >= 1e6) return (n / 1e6).toFixed(2) + " M";
    if (n >= 1e3) return (n / 1e3).toFixed(1) + " K";
    return String(n);
  }
  function fmtValue(v) {
    if (v && typeof v === "object" && !Array.isArray(v) && "tensor" in v) {
      const vals = v.value != null ? JSON.stringify(v.value) + (v.truncated ? " …" : "") : "";
      return `<code>${esc(v.tensor)}⟨${esc((v.shape || []).join("×"))}⟩</code> ${esc(vals)}`;
    }
    if (typeof v === "string") return esc(v);
    return `<code>${esc(JSON.stringify(v))}</code>`;
  }
  function table(rows) {
    return '<table class="kv">' + rows.filter((r) => r && r[1] !== undefined && r[1] !== null && r[1] !== "")
      .map(([k, v]) => `<tr><td>${esc(k)}</td><td>${v}</td></tr>`).join("") + "</table>";
  }

  /** An error number: "inf"/"nan" arrive as strings (JSON has no such numbers). */
  function fmtErr(v) {
    if (v == null) return "—";
    if (typeof v === "string") return esc(v);
    if (v === 0) return "0";
    return Math.abs(v) >= 1e4 || Math.abs(v) < 1e-3 ? v.toExponential(3) : String(+v.toPrecision(4));
  }
  const fmtRange = (r) => (r ? `[${fmtErr(r[0])}, ${fmtErr(r[1])}]` : "—");
  const verdict = (passed) => (passed === false ? '<span class="verdict fail">FAIL</span>' : passed === true ? '<span class="verdict pass">pass</span>' : "—");

  /** One tensor's record from kiln compare --per-layer. */
  function errorRecord(rec, metric) {
    const rows = [["tensor", `<span class="mono">${esc(rec.tensor || "")}</span>`], ["result", verdict(rec.passed)],
      ["max abs", fmtErr(rec.max_abs)], ["mean abs", fmtErr(rec.mean_abs)], ["max rel", fmtErr(rec.max_rel)],
      ["rel L2", fmtErr(rec.rel_l2)], ["growth", rec.growth != null ? fmtErr(rec.growth) + "×" : "—"],
      ["reference range", `<span class="mono">${fmtRange(rec.ref_range)}</span>`],
      ["Kiln range", `<span class="mono">${fmtRange(rec.kiln_range)}</span>`]];
    return `<div class="err-rec"><span class="chip-i" style="background:${rec.color}"></span>` +
      `<b>${esc(metric)}</b> <span class="mono">${fmtErr(rec.value)}</span></div>` + table(rows);
  }

  function accuracySection(app, node) {
    const errors = app.data.errors, metric = errors ? errors.metric : "error";
    let html = `<h3>Accuracy${node.err.first ? ' · <span class="verdict fail">first failing</span>' : ""}</h3>`;
    return html + node.err.recs.map((r) => errorRecord(r, metric)).join("");
  }

  /** Light Markdown (### headings, - lists, **bold**, `code`, _italic_) → HTML. */
  function markdown(text) {
    const inline = (s) => esc(s).replace(/\*\*([^*]+)\*\*/g, "<b>$1</b>").replace(/`([^`]+)`/g, "<code>$1</code>")
      .replace(/(^|\s)_([^_]+)_(?=\s|$)/g, "$1<i>$2</i>");
    let html = "", list = false, para = [];
    const flush = () => { if (para.length) { html += "<p>" + inline(para.join(" ")) + "</p>"; para = []; } };
    for (const raw of text.split("\n")) {
      const line = raw.trim();
      if (line.startsWith("- ")) { flush(); if (!list) { html += "<ul>"; list = true; } html += "<li>" + inline(line.slice(2)) + "</li>"; continue; }
      if (list) { html += "</ul>"; list = false; }
      if (line.startsWith("### ")) { flush(); html += "<h4>" + inline(line.slice(4)) + "</h4>"; }
      else if (!line) flush();
      else para.push(line);
    }
    if (list) html += "</ul>";
    flush();
    return html;
  }

  function tensorRow(pane, ti, pi, weight) {
    const [name, shape, dtype] = pane.tensors[ti];
    const kind = weight != null ? "weight" : "tensor";
    const target = weight != null ? `data-weight="${weight}"` : `data-tensor="${ti}"`;
    return `<div class="tensor ${kind}"><span class="tn"><a class="link" data-pane="${pi}" ${target}>${esc(name || "(unnamed)")}</a></span>` +
      `<span class="ts mono">${esc(dtype)}${shape ? " ⟨" + esc(shape) + "⟩" : ""}</span></div>`;
  }

  function argList(pane, args, node, pi) {
    const wmap = new Map();
    for (const [, wi] of node.w || []) wmap.set(pane.weights[wi].name, wi);
    return args.map(([name, ids]) => `<div class="arg"><span class="an">${esc(name)}</span>` +
      ids.map((ti) => tensorRow(pane, ti, pi, wmap.get(pane.tensors[ti][0]))).join("") + "</div>").join("");
  }

  function nodePanel(app, pi, idx) {
    const pane = app.panes[pi].pane, node = pane.nodes[idx];
    const color = CAT_COLORS[node.cat] || CAT_COLORS.other;
    const props = node.props || {};
    const sub = [props.domain, props["since opset"] != null ? "since opset " + props["since opset"] : null].filter(Boolean).join(" · ");
    let html = `<div class="s-head"><span class="chip" style="background:${color}"></span><span class="big">${esc(node.op)}</span><span class="sub">${esc(sub)}</span></div>`;
    const cl = pane.clusters[node.c];
    const rows = [["name", node.name ? `<span class="mono">${esc(node.name)}</span>` : '<span class="note">(unnamed)</span>'],
      ["category", esc(node.cat)], ["group", cl && cl.path ? `<a class="link" data-pane="${pi}" data-cluster="${node.c}">${esc(cl.path)}</a>` : ""]];
    for (const [k, v] of Object.entries(props)) if (k !== "domain" && k !== "since opset") rows.push([k, fmtValue(v)]);
    html += "<h3>Node</h3>" + table(rows);
    if (node.err) html += accuracySection(app, node);
    else if (pane.errors && !node.pseudo) html += '<h3>Accuracy</h3><p class="note">Not in the error report (not compared).</p>';
    const ov = node.ov;
    if (ov) {
      const orow = [["precision", esc(ov.precision)], ["tactic", ov.tactic ? `<code>${esc(ov.tactic)}</code>` : ""],
        ["time", ov.time_ms != null ? `<b>${ov.time_ms.toFixed(4)} ms</b> (${(ov.percent || 0).toFixed(1)}%)` : ""]];
      html += "<h3>Engine</h3>" + table(orow);
      if (ov.origin && ov.origin.length) {
        html += "<h3>Built from</h3>" + ov.origin.map((o) => `<div class="arg"><a class="link" data-origin="${esc(o)}">${esc(o)}</a></div>`).join("");
      }
    }
    if (node.attrs && node.attrs.length) html += "<h3>Attributes</h3>" + table(node.attrs.map(([k, v]) => [k, fmtValue(v)]));
    if (node.sub) html += "<h3>Subgraphs</h3>" + node.sub.map((c) => `<div class="arg"><a class="link" data-pane="${pi}" data-open="${idx}">${esc(pane.clusters[c].name)}</a> <span class="note">${pane.clusters[c].size} nodes</span> <a class="link" data-pane="${pi}" data-enter="${c}" title="Draw this body alone (Backspace: back)">enter ›</a></div>`).join("");
    if (node.in.length) html += "<h3>Inputs</h3>" + argList(pane, node.in, node, pi);
    if (node.out.length) html += "<h3>Outputs</h3>" + argList(pane, node.out, node, pi);
    if (node.doc != null) html += `<details class="docs" open><summary>Documentation</summary><div class="doc">${markdown(pane.docs[node.doc])}</div></details>`;
    return html;
  }

  function clusterPanel(app, pi, cid) {
    const ps = app.panes[pi], pane = ps.pane, c = pane.clusters[cid];
    const hist = new Map();
    const walk = (id) => {
      for (const [kind, i] of pane.clusters[id].items) {
        if (kind === "n") hist.set(pane.nodes[i].op, (hist.get(pane.nodes[i].op) || 0) + 1);
        else if (kind === "c") walk(i);
      }
    };
    walk(cid);
    const ops = Array.from(hist).sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1));
    const open = ps.expanded.has(cid);
    let html = `<div class="s-head"><span class="chip" style="background:#5b6574"></span><span class="big">${esc(c.name)}</span><span class="sub">${c.kind === "body" ? "subgraph" : "group"}</span></div>`;
    html += table([["path", `<span class="mono">${esc(c.path || c.name)}</span>`], ["nodes", String(c.size)], ["ports", `${c.pin.length} in · ${c.pout.length} out`]]);
    if (pane.errors && c.err) {
      const worst = pane.nodes[c.err.node];
      html += "<h3>Accuracy</h3>" + table([["worst", `<span class="chip-i" style="background:${c.err.color}"></span><a class="link" data-pane="${pi}" data-node="${c.err.node}">${esc(worst.name || worst.op)}</a> <span class="mono">${fmtErr(worst.err.value)}</span>`],
        ["compared", `${c.err.matched} nodes`], ["failed", c.err.failed ? `<span class="verdict fail">${c.err.failed}</span>` : "0"],
        ["first failing", c.err.first ? "inside this group" : ""]]);
    }
    if (c.kind === "group") html += `<div class="btn-row"><button data-pane="${pi}" data-toggle="${cid}">${open ? "Collapse" : "Expand"}</button></div>`;
    html += "<h3>Operators</h3><div class=\"hist\">" + ops.map(([op, n]) => `<span>${esc(op)}</span><span class="mono">${n}</span>`).join("") + "</div>";
    return html;
  }

  function tensorPanel(app, pi, ti) {
    const ps = app.panes[pi], pane = ps.pane, [name, shape, dtype] = pane.tensors[ti];
    const prod = ps.producer.get(ti), cons = ps.consumers.get(ti) || [];
    const link = (i) => `<div class="arg"><a class="link" data-pane="${pi}" data-node="${i}">${esc(pane.nodes[i].op)}</a> <span class="note mono">${esc(pane.nodes[i].name)}</span></div>`;
    let html = `<div class="s-head"><span class="chip" style="background:#9ca3af"></span><span class="big mono">${esc(name)}</span></div>`;
    html += table([["shape", shape ? `<code>${esc(shape)}</code>` : "unknown"], ["type", esc(dtype || "unknown")]]);
    if (prod != null) html += "<h3>Produced by</h3>" + link(prod);
    if (cons.length) html += "<h3>Consumed by</h3>" + cons.slice(0, 200).map(link).join("");
    return html;
  }

  function weightPanel(app, pi, wi, stats) {
    const pane = app.panes[pi].pane, w = pane.weights[wi];
    let html = `<div class="s-head"><span class="chip" style="background:#0f766e"></span><span class="big mono">${esc(w.name)}</span></div>`;
    html += table([["shape", `<code>${esc(w.shape || "scalar")}</code>`], ["type", esc(w.dtype)], ["elements", fmtCount(w.count)], ["size", fmtBytes(w.nbytes)]]);
    if (stats === undefined) html += '<p class="note">Reading values…</p>';
    else if (!stats) html += '<p class="note">Values are not available in this file (open it with <code>kiln view</code> to read them).</p>';
    else if (stats.error) html += `<p class="note">${esc(stats.error)}</p>`;
    else {
      const num = (v) => (v == null ? "—" : typeof v === "number" ? (Math.abs(v) >= 1e5 || (Math.abs(v) < 1e-3 && v !== 0) ? v.toExponential(4) : +v.toFixed(6)) : esc(v));
      html += "<h3>Statistics</h3><div class=\"stats\">" + [["min", stats.min], ["max", stats.max], ["mean", stats.mean], ["std", stats.std],
        ["zeros", stats.zeros != null ? (100 * stats.zeros).toFixed(2) + "%" : null], ["nan / inf", stats.nan != null ? stats.nan + " / " + stats.inf : null]]
        .map(([k, v]) => `<div><b>${k}</b><span class="mono">${num(v)}</span></div>`).join("") + "</div>";
      if (stats.preview) html += `<h3>Values</h3><pre class="preview mono">${esc(stats.preview)}</pre>`;
    }
    if (app.server) html += `<div class="btn-row"><a class="button" download="${esc(w.name.replace(/[\\/:*?"<>|]+/g, "_"))}.npy" href="api/weight.npy?pane=${pi}&index=${wi}">Download .npy</a></div>`;
    return html;
  }

  function modelPanel(app, pi) {
    const pane = app.panes[pi].pane, m = pane.model;
    let html = `<div class="s-head"><span class="chip" style="background:#c2410c"></span><span class="big">${esc(pane.title)}</span></div>`;
    html += table([["format", esc(m.format)], ["producer", esc(m.producer)], ["version", esc(m.version)], ["graph", esc(m.graph)],
      ["nodes", String(m.nodes)], ["parameters", m.parameters != null ? fmtCount(m.parameters) + ` <span class="note">(${m.parameters.toLocaleString("en-US")})</span>` : ""],
      ["file size", m.file_size != null ? fmtBytes(m.file_size) : ""]]);
    const io = (lst) => lst.map(([n, s, d]) => `<div class="tensor"><span class="tn mono">${esc(n)}</span><span class="ts mono">${esc(d)}${s ? " ⟨" + esc(s) + "⟩" : ""}</span></div>`).join("");
    if ((m.warnings || []).length) html += "<h3>Warnings</h3>" + m.warnings.map((w) => `<p class="warn">⚠ ${esc(w)}</p>`).join("");
    if (m.inputs.length) html += "<h3>Inputs</h3>" + io(m.inputs);
    if (m.outputs.length) html += "<h3>Outputs</h3>" + io(m.outputs);
    const props = Object.entries(m.properties || {});
    if (props.length) html += "<h3>Properties</h3>" + table(props.map(([k, v]) => [k, typeof v === "object" ? `<code>${esc(JSON.stringify(v))}</code>` : esc(v)]));
    return html;
  }

  function profilePanel(app) {
    const prof = app.data.profile, pi = 0, pane = app.panes[pi].pane;
    const rows = [];
    pane.nodes.forEach((n, i) => { if (n.ov && n.ov.time_ms != null) rows.push([i, n]); });
    rows.sort((a, b) => b[1].ov.time_ms - a[1].ov.time_ms);
    const max = rows.length ? rows[0][1].ov.time_ms : 1;
    let html = `<div class="s-head"><span class="chip" style="background:#b91c1c"></span><span class="big">Profile</span><span class="sub">${esc(prof.device || "")}</span></div>`;
    html += table([["total", `<b>${(prof.total_ms || 0).toFixed(3)} ms</b>`], ["layers timed", String(rows.length)]]);
    html += `<div class="legend"></div><div class="legend-l"><span>0 ms</span><span>${max.toFixed(3)} ms</span></div>`;
    html += '<h3>Layers by time</h3><table class="rank">' + rows.map(([i, n], k) =>
      `<tr data-pane="${pi}" data-node="${i}"><td class="note">${k + 1}</td><td class="nm" title="${esc(n.name)}">${esc(n.name || n.op)}</td>` +
      `<td class="mono">${n.ov.time_ms.toFixed(3)}</td><td style="width:70px"><div class="bar" style="width:${Math.max(2, 70 * n.ov.time_ms / max)}px;background:${Kiln.draw.heatColor(n.ov.time_ms / max)}"></div></td></tr>`).join("") + "</table>";
    return html;
  }

  /** The error report: what was compared, the first failing tensor, and nodes ranked by error. */
  function errorsPanel(app) {
    const e = app.data.errors, pi = e.pane, pane = app.panes[pi].pane;
    const rows = [];
    pane.nodes.forEach((n, i) => { if (n.err) rows.push([i, n]); });
    rows.sort((a, b) => (b[1].err.failed - a[1].err.failed) || (b[1].err.t - a[1].err.t));
    let html = `<div class="s-head"><span class="chip" style="background:${e.scale.colors[e.scale.colors.length - 1]}"></span><span class="big">Accuracy</span><span class="sub">${esc(e.file)}</span></div>`;
    const first = e.first;
    html += table([["model", e.model ? `<span class="mono">${esc(e.model)}</span>` : ""], ["metric", `<b>${esc(e.metric)}</b> (colour, log scale)`],
      ["tolerance", e.atol != null || e.rtol != null ? `atol ${fmtErr(e.atol)} · rtol ${fmtErr(e.rtol)}` : ""],
      ["tensors", `${e.matched} of ${e.tensors} found in the model`], ["failed", e.failed ? `<span class="verdict fail">${e.failed}</span>` : "0"],
      ["first failing", first ? (first.node != null ? `<a class="link" data-pane="${pi}" data-node="${first.node}">${esc(first.name || first.tensor)}</a>` : `${esc(first.name || first.tensor)} <span class="note">(not in this model)</span>`) : "none"]]);
    html += '<h3>Nodes by error</h3><table class="rank">' + rows.map(([i, n], k) =>
      `<tr data-pane="${pi}" data-node="${i}"><td class="note">${k + 1}</td><td class="nm" title="${esc(n.name)}">${esc(n.name || n.op)}</td>` +
      `<td class="mono">${fmtErr(n.err.value)}</td><td style="width:70px"><div class="bar" style="width:${Math.max(4, 70 * n.err.t)}px;background:${n.err.color}"></div></td></tr>`).join("") + "</table>";
    return html;
  }

  Kiln.panels = { nodePanel, clusterPanel, tensorPanel, weightPanel, modelPanel, profilePanel, errorsPanel, markdown, esc, fmtBytes };
})();
