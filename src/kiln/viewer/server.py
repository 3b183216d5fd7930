"""The local viewer server: the page, its shipped assets and JSON about the one opened model.

Nothing else is reachable: request paths are looked up in a fixed table, never
joined to a folder, so ``/../etc/passwd`` and friends get a 404; requests with
a Host header other than this server's own (DNS rebinding) get a 403. It binds
127.0.0.1 unless told otherwise. When the model file changes on disk the next
page load reads it again; a file that no longer reads shows the error page.
A Document with a ``complete`` step (an ONNX model shown before its shapes are inferred) is served at once
and replaced when that step returns. The step runs in a background thread started by the page's first
``/api/model?after=N`` (the request for the document that follows revision N, sent once the page has drawn),
so it does not compete with the first paint for the CPU.
"""
from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qs, urlsplit

from kiln.errors import ViewerError
from kiln.viewer import page as pagemod
from kiln.viewer import weights
from kiln.viewer.export import STATIC, html_document, static_bytes


@dataclass
class Document:
    """What the server shows: the page data and the panes behind it, or the reason it cannot."""

    page: dict | None = None
    panes: list[pagemod.Pane] = field(default_factory=list)
    error: str | None = None
    complete: Callable[[], "Document"] | None = field(default=None, repr=False)   # builds the final Document
    revision: int = 0
    _body: bytes | None = field(default=None, repr=False)

    @property
    def warnings(self) -> list[str]:
        """What the readers warned of (values left unread, damaged weights), each once."""
        return list(dict.fromkeys(w for p in self.panes for w in p.model.warnings))

    def body(self) -> bytes:
        """The page data as JSON, serialised once."""
        if self._body is None:
            data = {"error": self.error} if self.error is not None else self.page
            self._body = pagemod.dumps(data).encode("utf-8")
        return self._body


class Source:
    """Builds the Document and rebuilds it when one of ``paths`` changes on disk."""

    def __init__(self, build: Callable[[], Document], paths: list[str] | None = None) -> None:
        self.build = build
        self.paths = paths or []
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.stamp: tuple | None = None
        self.doc: Document | None = None
        self.revision = 0
        self.completing = 0                             # revision of the document whose completion has started

    def _stamp(self) -> tuple:
        import os
        out = []
        for p in self.paths:
            try:
                st = os.stat(p)
                out.append((st.st_mtime_ns, st.st_size))
            except OSError:
                out.append(None)
        return tuple(out)

    def get(self) -> Document:
        with self.lock:
            stamp = self._stamp()
            if self.doc is None or stamp != self.stamp:
                try:
                    doc = self.build()
                except ViewerError as exc:
                    doc = Document(error=str(exc))
                except Exception as exc:      # a reader bug: still an error page, never a traceback
                    doc = Document(error=f"Kiln could not read the file ({type(exc).__name__}: {exc}).")
                self._install(doc, stamp)
            return self.doc

    def after(self, revision: int, timeout: float) -> Document:
        """The document once it is newer than ``revision`` or final (waits at most ``timeout`` seconds);
        starts the current document's completion."""
        self.get()
        with self.changed:
            if self.doc.complete is not None and self.completing != self.doc.revision:
                self.completing = self.doc.revision
                threading.Thread(target=self._complete, args=(self.doc,), name="kiln-view-complete",
                                 daemon=True).start()
            self.changed.wait_for(lambda: self.doc.revision > revision or self.doc.complete is None, timeout)
            return self.doc

    def _install(self, doc: Document, stamp: tuple | None) -> None:
        """Make ``doc`` current (the lock is held)."""
        self.revision += 1
        doc.revision = self.revision
        if doc.page is not None:
            doc.page["revision"], doc.page["pending"] = doc.revision, doc.complete is not None
        self.doc, self.stamp = doc, stamp
        self.changed.notify_all()

    def _complete(self, first: Document) -> None:
        try:
            final = first.complete()
        except Exception as exc:              # the first document stays, final
            sys.stderr.write(f"kiln view: the model's shapes could not be completed ({type(exc).__name__}: "
                             f"{exc})\n")
            final = Document(page=dict(first.page or {}), panes=first.panes)
        with self.lock:
            if self.doc is first:             # not replaced meanwhile (the file changed on disk)
                self._install(final, self.stamp)


_LONG_POLL_S = 20.0
_NOT_FOUND = ("<!doctype html><meta charset=utf-8><title>Not found</title>"
              "<p style=\"font-family:sans-serif\">Not found. This server only shows the model it was started "
              "with.</p>")


class _Handler(BaseHTTPRequestHandler):
    server: "ViewerServer"
    protocol_version = "HTTP/1.1"
    server_version = "kiln-viewer"
    sys_version = ""

    def log_message(self, fmt: str, *args) -> None:      # quiet unless asked
        if self.server.verbose:
            sys.stderr.write("kiln view: " + fmt % args + "\n")

    def _send(self, status: int, body: bytes, ctype: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status: int = 200) -> None:
        self._send(status, pagemod.dumps(obj).encode("utf-8"), "application/json")

    def _host_ok(self) -> bool:
        host = (self.headers.get("Host") or "").strip().lower()
        port = self.server.server_address[1]
        allowed = {f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", f"{self.server.host}:{port}"}
        return host in allowed

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        try:
            if not self._host_ok():
                return self._send(403, b"Forbidden: unexpected Host header.", "text/plain; charset=utf-8")
            url = urlsplit(self.path)
            route = url.path
            query = parse_qs(url.query)
            if route in ("/", "/index.html"):
                return self._send(200, html_document(inline=False).encode("utf-8"), STATIC["index.html"])
            if route.startswith("/static/") and route[len("/static/"):] in STATIC:
                name = route[len("/static/"):]
                return self._send(200, static_bytes(name), STATIC[name])
            if route == "/api/model":
                return self._model(query)
            if route in ("/api/weight", "/api/weight.npy"):
                return self._weight(route.endswith(".npy"), query)
            if route == "/api/clusters":
                return self._clusters(query)
            return self._send(404, _NOT_FOUND.encode("utf-8"), "text/html; charset=utf-8")
        except (BrokenPipeError, ConnectionResetError):
            pass
        except Exception as exc:
            sys.stderr.write(f"kiln view: internal error on {self.path!r}: {type(exc).__name__}: {exc}\n")
            try:
                self._send(500, b"Internal error; see the terminal running kiln view.", "text/plain; charset=utf-8")
            except Exception:
                pass

    def do_POST(self) -> None:
        self._send(405, b"Method not allowed.", "text/plain; charset=utf-8", {"Allow": "GET, HEAD"})

    do_PUT = do_DELETE = do_PATCH = do_POST

    def _model(self, query: dict) -> None:
        """The page data; with ``after=N``, the document that follows revision N (a long poll)."""
        source = self.server.source
        if "after" not in query:
            return self._send(200, source.get().body(), "application/json")
        try:
            revision = int(query["after"][0])
        except ValueError:
            return self._send(404, _NOT_FOUND.encode("utf-8"), "text/html; charset=utf-8")
        return self._send(200, source.after(revision, _LONG_POLL_S).body(), "application/json")

    def _clusters(self, query: dict) -> None:
        """Layout structures of clusters that were not part of the first view: {"id": structure}."""
        doc = self.server.source.get()
        try:
            pane = doc.panes[int(query.get("pane", ["0"])[0])]
            ids = [int(i) for i in query.get("ids", [""])[0].split(",") if i]
            if not ids or any(not 0 <= i < len(pane.data["clusters"]) for i in ids):
                raise IndexError
        except (ValueError, IndexError):
            return self._send(404, _NOT_FOUND.encode("utf-8"), "text/html; charset=utf-8")
        with self.server.source.lock, pagemod.no_gc():
            out = {str(i): pane.structure(i) for i in ids}
        return self._send(200, pagemod.dumps(out).encode("utf-8"), "application/json")

    def _weight(self, npy: bool, query: dict) -> None:
        doc = self.server.source.get()
        try:
            pi = int(query.get("pane", ["0"])[0])
            wi = int(query.get("index", ["-1"])[0])
            pane = doc.panes[pi]
            if not 0 <= wi < len(pane.weights):
                raise IndexError
            w = pane.weights[wi]
        except (ValueError, IndexError):
            return self._send(404, _NOT_FOUND.encode("utf-8"), "text/html; charset=utf-8")
        try:
            if npy:
                safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in w.name)[:120] or "weight"
                return self._send(200, weights.npy_bytes(w), "application/octet-stream",
                                  {"Content-Disposition": f'attachment; filename="{safe}.npy"'})
            return self._json(weights.stats(w))
        except ViewerError as exc:
            return self._json({"error": str(exc)}, 200 if not npy else 422)


class ViewerServer(ThreadingHTTPServer):
    """A threaded HTTP server bound to ``host`` (127.0.0.1) on ``port`` (0: a free one)."""

    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, source: Source, host: str = "127.0.0.1", port: int = 0, verbose: bool = False) -> None:
        self.source = source
        self.host = host
        self.verbose = verbose
        try:
            super().__init__((host, port or 0), _Handler)
        except OSError as exc:
            raise ViewerError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); choose another --port.") \
                from None
        self.thread: threading.Thread | None = None

    def handle_error(self, request, client_address) -> None:
        """A browser that drops a connection is not an error worth a traceback."""
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'127.0.0.1' if host in ('127.0.0.1', '0.0.0.0') else host}:{port}/"

    def start(self) -> "ViewerServer":
        """Serve in a background (daemon) thread."""
        self.thread = threading.Thread(target=self.serve_forever, name="kiln-view", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def wait(self) -> None:
        """Block until Ctrl+C."""
        try:
            while self.thread is not None and self.thread.is_alive():
                self.thread.join(0.5)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()

    def __repr__(self) -> str:
        return f"<kiln viewer at {self.url}>"
