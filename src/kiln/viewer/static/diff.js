/* Kiln viewer — a model diff on the page: counts and next / previous change in the toolbar (keys n and p),
   the change list, and each node's before / after at the top of its sidebar. The page data says it all
   (page.diff, node.df, cluster.df, made by kiln/viewer/diff_page.py); nothing here formats a value. */
"use strict";
var Kiln = window.Kiln || (window.Kiln = {});

(function () {
  const $ = (id) => document.getElementById(id);
  const esc = (s) => Kiln.panels.esc(s);
  const WORDS = { added: "added", removed: "removed", changed: "changed", unchanged: "unchanged", kept: "kept",
    fused: "fused", plugin: "run as a plugin", folded: "folded away", inserted: "inserted by the build",
    mixed: "mixed", io: "" };
  const LIST_MAX = 2000;

  const diff = { info: null, app: null, cursor: -1, at: [] };
  Kiln.diff = diff;

  const chip = (s) => `<span class="df-chip df-${esc(s)}"></span>`;

  function countsHtml(info) {
    if (info.mode === "build") {
      const n = info.counts.nodes, l = info.counts.layers;
      return [["fused", n.fused + " nodes fused"], ["folded", n.folded + " folded"], ["plugin", n.plugin + " plugin"],
        ["inserted", l.inserted + " inserted"]].filter(([, t]) => !t.startsWith("0 ")).map(([s, t]) => chip(s) + esc(t)).join(" ");
    }
    const c = info.counts;
    const parts = ["added", "removed", "changed"].filter((s) => c[s]).map((s) => chip(s) + `${c[s]} ${s}`);
    return parts.length ? parts.join(" ") : (info.model.length ? "model-level changes only" : "no differences");
  }

  function toolbar() {
    const tools = document.querySelector("#bar .tools");
    const nav = document.createElement("span");
    nav.className = "diff-nav";
    nav.innerHTML = `<button id="diff-list" title="Every change"><span id="diff-counts">${countsHtml(diff.info)}</span></button>` +
      '<button id="diff-prev" class="icon" title="Previous change (p)">◀</button>' +
      `<span id="diff-pos" class="mono">– / ${diff.info.changes.length}</span>` +
      '<button id="diff-next" class="icon" title="Next change (n)">▶</button><span class="sep"></span>';
    tools.insertBefore(nav, tools.firstChild);
    $("diff-prev").addEventListener("click", () => step(-1));
    $("diff-next").addEventListener("click", () => step(1));
    $("diff-list").addEventListener("click", showList);
  }

  function position() {
    $("diff-pos").textContent = `${diff.cursor >= 0 ? diff.cursor + 1 : "–"} / ${diff.info.changes.length}`;
  }

  async function go(k) {
    const changes = diff.info.changes;
    if (!changes.length) return;
    diff.cursor = ((k % changes.length) + changes.length) % changes.length;
    position();
    const c = changes[diff.cursor];
    if (c.at.length) await diff.app.goToNode(c.at[0][0], c.at[0][1]);
    else diff.app.openSide("Change", changeHtml(c));
  }

  function step(dir) { return go(diff.cursor < 0 ? (dir > 0 ? 0 : -1) : diff.cursor + dir); }

  function rowsHtml(rows) {
    if (!rows.length) return "";
    return '<table class="kv diff-rows">' + rows.map(([label, before, after, note]) => {
      const values = after == null ? `<td colspan="2">${esc(before)}</td>` :
        `<td class="before">${esc(before)}</td><td class="after">${esc(after)}</td>`;
      return `<tr><td>${esc(label)}</td>${values}</tr>` + (note ? `<tr class="note"><td></td><td colspan="2">${esc(note)}</td></tr>` : "");
    }).join("") + "</table>";
  }

  function changeHtml(c) {
    const where = c.scope.length ? `<div class="note">in ${esc(c.scope.join(" › "))}</div>` : "";
    return `<div class="diff-status">${chip(c.s)}<b>${esc(WORDS[c.s] || c.s)}</b> ${esc(c.title)}</div>${where}${rowsHtml(c.rows)}`;
  }

  /** The diff section at the top of a node's sidebar; with Compact on, also the changes of the constants
   * drawn as its rows. */
  function nodeSection(pi, idx) {
    const node = diff.app.panes[pi].pane.nodes[idx];
    if (!node || !node.df || node.df === "io") return "";
    const k = diff.at[pi].get(idx);
    if (k !== undefined) { diff.cursor = k; position(); }
    let body = k !== undefined ? changeHtml(diff.info.changes[k]) :
      `<div class="diff-status">${chip(node.df)}<b>${esc(WORDS[node.df] || node.df)}</b></div>`;
    if (diff.app.toggles.compact) for (const i of node.kin || []) {
      const kk = diff.at[pi].get(i);
      if (kk !== undefined) body += changeHtml(diff.info.changes[kk]);
    }
    return `<h3>Diff</h3>${body}`;
  }

  function clusterSection(pi, cid) {
    const c = diff.app.panes[pi].pane.clusters[cid];
    if (!c || !c.df) return "";
    return `<h3>Diff</h3><div class="diff-status">${chip(c.df)}<b>${esc(WORDS[c.df] || c.df)}</b> <span class="note">(its nodes, rolled up)</span></div>`;
  }

  function showList() {
    const info = diff.info;
    let html = `<div class="diff-counts">${countsHtml(info)}</div>`;
    if (info.model.length) html += "<h3>Model</h3>" + rowsHtml(info.model);
    html += `<h3>${info.changes.length} change${info.changes.length === 1 ? "" : "s"}</h3>`;
    html += info.changes.slice(0, LIST_MAX).map((c, k) =>
      `<div class="diff-item${k === diff.cursor ? " on" : ""}" data-diff="${k}">${chip(c.s)}<span class="mono">${esc(c.title)}</span>` +
      (c.scope.length ? ` <span class="note">in ${esc(c.scope.join(" › "))}</span>` : "") + "</div>").join("");
    if (info.changes.length > LIST_MAX) html += `<p class="note">${info.changes.length - LIST_MAX} more: use ▶ or n to reach them.</p>`;
    diff.app.openSide("Changes", html);
  }

  function onKey(ev) {
    const t = ev.target;
    if (t.tagName === "INPUT" || t.tagName === "SELECT" || t.tagName === "TEXTAREA" || ev.ctrlKey || ev.metaKey || ev.altKey) return;
    if (ev.key === "n" || ev.key === "]") { ev.preventDefault(); step(1); }
    else if (ev.key === "p" || ev.key === "N" || ev.key === "[") { ev.preventDefault(); step(-1); }
  }

  function wrapPanels() {
    const panels = Kiln.panels, node = panels.nodePanel, cluster = panels.clusterPanel;
    panels.nodePanel = (app, pi, idx) => nodeSection(pi, idx) + node(app, pi, idx);
    panels.clusterPanel = (app, pi, cid) => clusterSection(pi, cid) + cluster(app, pi, cid);
  }

  function init(app) {
    const info = app.data && app.data.diff;
    if (!info || diff.info) return;
    diff.info = info; diff.app = app;
    diff.at = app.data.panes.map(() => new Map());
    info.changes.forEach((c, k) => { for (const [pi, ni] of c.at) if (!diff.at[pi].has(ni)) diff.at[pi].set(ni, k); });
    document.body.classList.add("diff-mode");
    toolbar();
    wrapPanels();
    document.addEventListener("keydown", onKey);
    $("side-body").addEventListener("click", (ev) => {
      const item = ev.target.closest("[data-diff]");
      if (item) go(+item.dataset.diff);
    });
  }

  /* The page is ready when body[data-ready] is set (app.js); diff.js then adds its part. */
  function whenReady() {
    const app = window.kilnApp;
    if (app && app.ready) return init(app);
    new MutationObserver((_, obs) => {
      if (window.kilnApp && window.kilnApp.ready) { obs.disconnect(); init(window.kilnApp); }
    }).observe(document.body, { attributes: true, attributeFilter: ["data-ready"] });
  }
  window.addEventListener("DOMContentLoaded", whenReady);
  diff.go = go; diff.step = step; diff.showList = showList;
})();
