"""The accuracy overlay: per-tensor errors from ``kiln compare --per-layer`` painted onto the graph.

Each tensor record names a node (``node``) and/or one of its outputs (``tensor``); a node takes the worst of
its records and a group the worst of its members. Colours are decided here, once, and travel in the page
data: ``static/view.js`` only paints them.
"""
from __future__ import annotations

import colorsys
import json
import math
import os
from typing import Any

from kiln.errors import ViewerError

FORMAT = "kiln-compare-errors"
VERSION = 1
LO, HI = 1e-6, 1e-1            # green end and red end of the log scale
FAILED_FLOOR = 0.75            # a tensor that failed its tolerance is never greener than orange
NO_RECORD = "#9ca3af"          # nodes the report says nothing about
METRICS = ("max_abs", "mean_abs", "max_rel", "rel_l2", "growth")
_WRITE = "write one with kiln compare <model> --per-layer"


def read_errors(path: str | os.PathLike) -> dict:
    """A per-layer error report, checked for its format; non-finite numbers are read as floats."""
    name = os.path.basename(os.fspath(path))
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except FileNotFoundError:
        raise ViewerError(f"errors file {name!r} does not exist; {_WRITE}.") from None
    except IsADirectoryError:
        raise ViewerError(f"errors file {name!r} is a folder, not a JSON file; {_WRITE}.") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ViewerError(f"errors file {name!r} is not valid JSON ({exc}); {_WRITE}.") from None
    if not isinstance(report, dict) or report.get("format") != FORMAT:
        if isinstance(report, dict) and "layers" in report:
            raise ViewerError(f"errors file {name!r} is a profile (kiln bench --export-profile), not a per-layer "
                              f"error report; pass it with --profile, or {_WRITE}.")
        raise ViewerError(f"errors file {name!r} is not a per-layer error report (it lacks \"format\": "
                          f"\"{FORMAT}\"); {_WRITE}.")
    version = report.get("version")
    if version is None:
        raise ViewerError(f"errors file {name!r} has no format version; {_WRITE}.")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= VERSION:
        raise ViewerError(f"errors file {name!r} has format version {version!r}, but this Kiln reads version "
                          f"{VERSION}; view it with the Kiln that wrote it, or write it again with this one "
                          f"(kiln compare <model> --per-layer).")
    tensors = report.get("tensors")
    if not isinstance(tensors, list) or not all(
            isinstance(r, dict) and (isinstance(r.get("tensor"), str) or isinstance(r.get("node"), str))
            for r in tensors):
        raise ViewerError(f"errors file {name!r} has no list of tensors, each with a tensor or node name; "
                          f"{_WRITE}.")
    if not tensors:
        raise ViewerError(f"errors file {name!r} lists no tensors, so there is nothing to show; write it again "
                          f"with kiln compare <model> --per-layer on a model with intermediate tensors.")
    return report


def _num(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)           # "inf", "-inf", "nan" from writers that avoid JSON's extensions
        except ValueError:
            return None
    return None


def _plain(v: float | None) -> float | str | None:
    """A number the browser can take: JSON has no Infinity or NaN, so those travel as "inf", "-inf", "nan"."""
    if v is None or math.isfinite(v):
        return v
    return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")


def position(value: float | None, failed: bool) -> float:
    """Where a tensor sits on the scale: 0 at or below LO (green), 1 at or above HI or non-finite (red)."""
    if value is None:
        t = 1.0 if failed else 0.0         # the metric is missing: only the verdict is known
    elif not math.isfinite(value):
        t = 1.0
    elif value <= LO:
        t = 0.0
    else:
        t = min(1.0, (math.log10(value) - math.log10(LO)) / (math.log10(HI) - math.log10(LO)))
    return max(t, FAILED_FLOOR) if failed else t


def color(t: float) -> str:
    """Green (0) through yellow to red (1); dark enough for the white op name on a node's header."""
    t = max(0.0, min(1.0, t))
    r, g, b = colorsys.hls_to_rgb(120 * (1 - t) / 360, 0.34 + 0.06 * t, 0.72)
    return "#" + "".join(f"{round(255 * c):02x}" for c in (r, g, b))


def scale() -> dict:
    """What the legend draws: one block per decade between LO and HI."""
    lo, hi = round(math.log10(LO)), round(math.log10(HI))
    blocks = [color((d + 0.5 - lo) / (hi - lo)) for d in range(lo, hi)]
    return {"lo": LO, "hi": HI, "ticks": [f"1e{d}" for d in range(lo, hi + 1)], "colors": blocks,
            "failed": color(FAILED_FLOOR), "none": NO_RECORD}


def _record(raw: dict, metric: str) -> dict:
    rec: dict[str, Any] = {k: raw.get(k) for k in ("tensor", "node", "op") if isinstance(raw.get(k), str)}
    nums = {k: _num(raw.get(k)) for k in METRICS}
    passed = raw.get("passed")
    rec["passed"] = passed if isinstance(passed, bool) else None
    value = nums[metric] if metric in nums else _num(raw.get(metric))
    rec["t"] = position(value, passed is False)
    rec["color"] = color(rec["t"])
    rec["value"] = _plain(value)
    rec.update({k: _plain(v) for k, v in nums.items()})
    for k in ("ref_range", "kiln_range"):
        pair = raw.get(k)
        if isinstance(pair, (list, tuple)) and len(pair) == 2:
            rec[k] = [_plain(_num(x)) for x in pair]
    return rec


def _severity(rec: dict) -> tuple:
    return rec["passed"] is False, rec["t"]


def _matcher(pane: dict):
    """Record → pane node index: by node name first, then by the name of one of a node's outputs."""
    by_name: dict[str, int] = {}
    by_output: dict[str, int] = {}
    tensors = pane["tensors"]
    for i, n in enumerate(pane["nodes"]):
        if n.get("pseudo"):
            continue
        if n.get("name"):
            by_name.setdefault(n["name"], i)
        for _, ids in n["out"]:
            for ti in ids:
                by_output.setdefault(tensors[ti][0], i)

    def match(rec: dict) -> int | None:
        if rec.get("node") in by_name:
            return by_name[rec["node"]]
        return by_output.get(rec.get("tensor"))
    return match


def apply_errors(pane: dict, report: dict, label: str) -> dict:
    """Colour the pane's nodes and groups from ``report``; returns the summary the page and the legend show."""
    metric = report.get("metric") if isinstance(report.get("metric"), str) else "rel_l2"
    match = _matcher(pane)
    per_node: dict[int, list[dict]] = {}
    for raw in report["tensors"]:
        rec = _record(raw, metric)
        i = match(rec)
        if i is not None:
            per_node.setdefault(i, []).append(rec)
    written_for = os.path.basename(str(report.get("model") or "")) or None
    if not per_node:
        model = pane["model"].get("path") or pane["title"]
        origin = f"; it was written for {written_for!r}" if written_for and written_for != model else ""
        raise ViewerError(f"none of the {len(report['tensors'])} tensors in errors file {label!r} matches a node "
                          f"or tensor of {model!r}{origin}; run kiln compare {model} --per-layer on this model.")
    first = None
    fb = report.get("first_bad")
    if isinstance(fb, dict) and (isinstance(fb.get("tensor"), str) or isinstance(fb.get("node"), str)):
        fb_rec = {k: fb[k] for k in ("tensor", "node") if isinstance(fb.get(k), str)}
        first = dict(fb_rec, index=match(fb_rec))

    nodes, clusters = pane["nodes"], pane["clusters"]
    for i, recs in per_node.items():
        recs.sort(key=_severity, reverse=True)
        worst = recs[0]
        nodes[i]["err"] = {"t": worst["t"], "color": color(worst["t"]), "value": worst["value"],
                           "failed": worst["passed"] is False, "first": first is not None and first["index"] == i,
                           "recs": recs}
    best: dict[int, tuple] = {}
    for i in sorted(per_node):                       # every enclosing cluster takes the worst of its members
        e = nodes[i]["err"]
        c = nodes[i]["c"]
        while c is not None:
            cl = clusters[c]
            ce = cl.setdefault("err", {"failed": 0, "matched": 0, "first": False})
            ce["matched"] += 1
            ce["failed"] += int(e["failed"])
            ce["first"] = ce["first"] or e["first"]
            if c not in best or (e["failed"], e["t"]) > best[c]:
                best[c] = (e["failed"], e["t"])
                ce.update(t=e["t"], color=e["color"], node=i)
            c = nodes[cl["owner"]]["c"] if cl["kind"] == "body" else cl["parent"]
    pane["errors"] = {"none": NO_RECORD}            # the pane is coloured; nodes without a record get this
    failed = sum(1 for recs in per_node.values() for r in recs if r["passed"] is False)
    return {"file": label, "model": written_for, "metric": metric,
            "atol": _plain(_num(report.get("atol"))), "rtol": _plain(_num(report.get("rtol"))),
            "tensors": len(report["tensors"]), "matched": sum(len(r) for r in per_node.values()),
            "nodes": len(per_node), "failed": failed,
            "first": None if first is None else {"node": first["index"], "tensor": first.get("tensor"),
                                                 "name": first.get("node")},
            "scale": scale()}
