"""What a `kiln view` call shows: the model, optional profile and accuracy overlays, an optional engine beside it."""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from kiln.errors import ViewerError
from kiln.viewer import accuracy
from kiln.viewer.graph import ViewModel
from kiln.viewer.page import Pane, build_pane, page_json
from kiln.viewer.server import Document


def open_view_model(model: Any) -> ViewModel:
    """A path (any supported format), an ``onnx.ModelProto`` or a ViewModel."""
    if isinstance(model, ViewModel):
        return model
    if isinstance(model, (str, os.PathLike)):
        from kiln.viewer.formats import open_model
        return open_model(model)
    if type(model).__name__ == "ModelProto":
        from kiln.viewer.formats.onnx import read_proto
        return read_proto(model)
    raise ViewerError(f"kiln.view() takes a file path or an onnx.ModelProto, not {type(model).__name__}.")


def read_profile(path: str | os.PathLike) -> dict:
    """A profile written by ``kiln bench --export-profile``: {"device", "total_ms", "layers": [...]}."""
    name = os.path.basename(os.fspath(path))
    try:
        with open(path, encoding="utf-8") as f:
            prof = json.load(f)
    except FileNotFoundError:
        raise ViewerError(f"profile {name!r} does not exist; write one with kiln bench --export-profile.") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ViewerError(f"profile {name!r} is not valid JSON ({exc}); write it with "
                          f"kiln bench --export-profile.") from None
    layers = prof.get("layers") if isinstance(prof, dict) else None
    if not isinstance(layers, list) or not all(isinstance(r, dict) and isinstance(r.get("name"), str)
                                               and isinstance(r.get("ms"), (int, float)) for r in layers):
        raise ViewerError(f"profile {name!r} has no list of layers with names and times; write it with "
                          f"kiln bench --export-profile.")
    return prof


def apply_profile(model: ViewModel, prof: dict, label: str) -> dict:
    """Put each layer's time on the node of the same name; returns the summary the page shows."""
    by_name = {n.name: n for n in model.graph.nodes}
    total = float(prof.get("total_ms") or sum(r["ms"] for r in prof["layers"])) or 1.0
    matched = 0
    for r in prof["layers"]:
        node = by_name.get(r["name"])
        if node is None:
            continue
        matched += 1
        node.overlay["time_ms"] = float(r["ms"])
        node.overlay["percent"] = float(r.get("percent", 100.0 * r["ms"] / total))
        for k in ("tactic", "precision"):
            if r.get(k) and not node.overlay.get(k):
                node.overlay[k] = r[k]
    if prof["layers"] and not matched:
        raise ViewerError(f"none of the {len(prof['layers'])} layers in profile {label!r} matches a node of "
                          f"{model.path and os.path.basename(model.path)!r}; a profile belongs to the engine it "
                          f"was measured on (kiln view model.kiln --profile prof.json).")
    return {"device": prof.get("device"), "total_ms": total, "layers": len(prof["layers"]), "matched": matched}


def engine_links(engine_pane: Pane, model_pane: Pane) -> list:
    """[engine node index, [model node indices]] from each layer's origin names."""
    index: dict[str, int] = {}
    for i, n in enumerate(model_pane.data["nodes"]):
        if n.get("name") and not n.get("pseudo"):
            index.setdefault(n["name"], i)
    links = []
    for i, n in enumerate(engine_pane.data["nodes"]):
        ids = [index[o] for o in (n.get("ov") or {}).get("origin", []) if o in index]
        if ids:
            links.append([i, ids])
    return links


def overlay_errors(pane: Pane, report: dict | None, path: str | os.PathLike | None, index: int) -> dict | None:
    """Colour ``pane`` from a per-layer error report; the summary the page shows (or None without one)."""
    if report is None:
        return None
    summary = accuracy.apply_errors(pane.data, report, os.path.basename(os.fspath(path)))
    summary["pane"] = index
    return summary


def build_document(model: Any, *, engine: str | os.PathLike | None = None,
                   profile: str | os.PathLike | None = None, errors: str | os.PathLike | None = None,
                   rankdir: str = "TB", server: bool = False) -> Document:
    """Read everything and lay it out; raises ViewerError with one clear line when something cannot be read.
    For the server (``server=True``) clusters hidden in the first view are laid out when they open, and a
    model whose reader has a slow second step (ONNX shape inference) is shown as the file states it first: the
    Document's ``complete`` then builds the final one (kiln.viewer.server.Source runs it in the background).
    ``errors`` (from ``kiln compare --per-layer``) colours the ONNX model's nodes by their accuracy error,
    and an engine pane's layers where they compute the same named tensors."""
    if rankdir not in ("TB", "LR"):
        raise ViewerError(f"rankdir must be TB or LR, not {rankdir!r}.")
    if isinstance(model, tuple):                 # two models: the diff page (kiln.viewer.diff_page)
        if engine or profile or errors:
            raise ViewerError("two models are shown with their differences only; --engine, --profile and "
                              "--errors go with one model.")
        from kiln.viewer.diff_page import build_diff_document
        return build_diff_document(*model, rankdir=rankdir, server=server)
    complete = None
    if server and isinstance(model, (str, os.PathLike)):
        from kiln.viewer.formats import open_model_first
        vm, complete = open_model_first(model)
    else:
        vm = open_view_model(model)
    prof = read_profile(profile) if profile else None
    report = accuracy.read_errors(errors) if errors else None
    ev = None
    if engine is not None:
        ev = open_view_model(engine)
        if ev.format != "Kiln engine":
            raise ViewerError(f"--engine expects a Kiln engine (.kiln), but {pathlib.Path(engine).name!r} is "
                              f"{ev.format}.")
    parts = dict(ev=ev, engine=engine, prof=prof, profile=profile, report=report, errors=errors, rankdir=rankdir,
                 server=server)
    doc = _document(vm, **parts)
    if complete is not None:
        doc.complete = lambda: _document(complete(), **dict(parts, ev=ev and open_view_model(engine)))
    return doc


def _document(vm: ViewModel, *, ev: ViewModel | None, engine: Any, prof: dict | None, profile: Any,
              report: dict | None, errors: Any, rankdir: str, server: bool) -> Document:
    """The page of one model (and the engine beside it)."""
    summary = None
    if ev is not None:
        if prof:
            summary = apply_profile(ev, prof, os.path.basename(os.fspath(profile)))
        panes = [build_pane(ev, title=f"Engine · {pathlib.Path(engine).name}", lazy=server),
                 build_pane(vm, title=f"{vm.format} · {os.path.basename(vm.path) if vm.path else vm.graph.name}",
                            lazy=server)]
        err_summary = overlay_errors(panes[1], report, errors, 1)
        if report is not None:
            try:           # engine layers keep the ONNX names of the tensors they compute: colour them too
                accuracy.apply_errors(panes[0].data, report, os.path.basename(os.fspath(errors)))
            except ViewerError:
                pass       # an engine none of whose tensors the report names stays uncoloured
        page = page_json(panes, rankdir=rankdir, links=engine_links(panes[0], panes[1]), profile=summary,
                         errors=err_summary, server=server)
        return Document(page=page, panes=panes)
    if prof:
        summary = apply_profile(vm, prof, os.path.basename(os.fspath(profile)))
    panes = [build_pane(vm, lazy=server)]
    return Document(page=page_json(panes, rankdir=rankdir, profile=summary,
                                   errors=overlay_errors(panes[0], report, errors, 0), server=server), panes=panes)
