"""The local viewer server: the page, its shipped assets and JSON about the one opened model.

Nothing else is reachable: request paths are looked up in a fixed table, never
joined to a folder, so ``/../etc/passwd`` and friends get a 404; requests with
a Host header other than this server's own (DNS rebinding) get a 403. It binds
127.0.0.1 unless told otherwise. When the model file changes on disk the next
page load reads it again; a file that no longer reads shows the error page.
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
        self.stamp: tuple | None = None
        self.doc: Document | None = None

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
                    self.doc = self.build()
                except ViewerError as exc:
                    self.doc = Document(error=str(exc))
                except Exception as exc:      # a reader bug: still an error page, never a traceback
                    self.doc = Document(error=f"Kiln could not read the file ({type(exc).__name__}: {exc}).")
                self.stamp = stamp
            return self.doc


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
                return self._send(200, self.server.source.get().body(), "application/json")
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
