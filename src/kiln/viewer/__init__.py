"""The viewer: see inside any model or Kiln engine, in the browser or exported headless.

    kiln.viewer.view("model.onnx")                      # local server on 127.0.0.1, opens the browser
    kiln.viewer.view("model.onnx", export="model.svg")   # or .png / .html, no server
    kiln.viewer.view(onnx_model)                         # in Jupyter: shown inline

Readers (``kiln.viewer.formats``) turn files into one view graph; Python gives
each cluster its layered structure, and the page computes coordinates and draws
them; SVG and PNG export drive that same page in headless Chromium, so the page
and the exports draw the same picture.
Nothing heavy is imported until a function runs.
"""
from __future__ import annotations

import os
import sys
import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kiln.viewer.server import ViewerServer

__all__ = ["ViewerWarning", "view"]


class ViewerWarning(UserWarning):
    """The model opens, but part of it is not shown as stored (damaged weights, a file outside its folder)."""


def _warn(messages: list[str]) -> None:
    for message in messages:
        warnings.warn(message, ViewerWarning, stacklevel=3)


def _in_notebook() -> bool:
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:
        return False
    return shell is not None and hasattr(shell, "kernel")


class InlineView:
    """The self-contained page in an iframe, for notebooks (``_repr_html_``)."""

    def __init__(self, document: str, height: int = 640) -> None:
        self.document = document
        self.height = height

    def _repr_html_(self) -> str:
        from html import escape
        return (f'<iframe srcdoc="{escape(self.document, quote=True)}" style="width:100%;height:{self.height}px;'
                f'border:1px solid #e5e7eb;border-radius:6px" sandbox="allow-scripts allow-downloads"></iframe>')


def view(path_or_onnx_model: Any, *, export: str | os.PathLike | None = None, port: int | None = None,
         open_browser: bool = True, profile: str | os.PathLike | None = None,
         engine: str | os.PathLike | None = None, errors: str | os.PathLike | None = None, rankdir: str = "TB",
         host: str = "127.0.0.1") -> Any:
    """Show a model (path or ``onnx.ModelProto``) or a Kiln engine; a pair ``(a, b)`` shows two models (or a
    model and its engine) with their differences.

    With ``export`` writes an .svg, .png or .html file and returns its path. In a
    Jupyter kernel (and without ``port``) returns an inline view. Otherwise starts
    a local server in a background thread, opens the browser and returns the
    server (``.url``, ``.stop()``, ``.wait()``). What the page shows as a warning
    banner (damaged engine weights, weight files outside the model's folder) is
    also issued as a :class:`ViewerWarning`. ``profile`` overlays per-layer
    times from ``kiln bench --export-profile``; ``errors`` colours nodes by their
    accuracy error from ``kiln compare --per-layer``; ``engine`` shows a .kiln
    engine beside the ONNX model, its layers linked to the nodes they came from.
    """
    from kiln.viewer import documents
    from kiln.viewer import export as exporter
    if export is not None:
        doc = documents.build_document(path_or_onnx_model, engine=engine, profile=profile, errors=errors,
                                       rankdir=rankdir)
        _warn(doc.warnings)
        return exporter.export(doc.page, doc.panes, export)
    if port is None and _in_notebook():
        doc = documents.build_document(path_or_onnx_model, engine=engine, profile=profile, errors=errors,
                                       rankdir=rankdir)
        _warn(doc.warnings)
        exporter.add_weight_stats(doc.panes)
        inline = InlineView(exporter.html_document(dict(doc.page, panes=[p.data for p in doc.panes])))
        try:
            from IPython.display import HTML
            return HTML(inline._repr_html_())
        except ImportError:
            return inline
    return serve(path_or_onnx_model, port=port, open_browser=open_browser, profile=profile, engine=engine,
                 errors=errors, rankdir=rankdir, host=host)


def serve(model: Any, *, port: int | None = None, open_browser: bool = True,
          profile: str | os.PathLike | None = None, engine: str | os.PathLike | None = None,
          errors: str | os.PathLike | None = None, rankdir: str = "TB", host: str = "127.0.0.1") -> "ViewerServer":
    """Start the local server (in a background thread) on a readable model; returns it."""
    from kiln.viewer import documents
    from kiln.viewer.server import Source, ViewerServer

    def build():
        return documents.build_document(model, engine=engine, profile=profile, errors=errors, rankdir=rankdir,
                                        server=True)

    models = model if isinstance(model, tuple) else (model,)
    paths = [os.fspath(p) for p in (*models, engine, profile, errors) if isinstance(p, (str, os.PathLike))]
    source = Source(build, paths)
    first = source.get()                 # read now: an unreadable file is an error here, not a blank page
    if first.error is not None:
        from kiln.errors import ViewerError
        raise ViewerError(first.error)
    _warn(first.warnings)
    server = ViewerServer(source, host=host, port=port or 0).start()
    if open_browser:
        import webbrowser
        try:
            webbrowser.open(server.url, new=2)
        except Exception:
            pass
    return server
