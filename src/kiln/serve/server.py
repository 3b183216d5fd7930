"""Run the server: load the repository, listen (HTTP and gRPC), and drain on shutdown."""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

from kiln.errors import KilnError
from kiln.serve.core import ServerCore
from kiln.serve.metrics import Metrics
from kiln.serve.model import ModelOptions
from kiln.serve.repository import ModelRepository

log = logging.getLogger("kiln.serve")


@dataclass
class ServeConfig:
    """Where to listen and what to serve; port 0 picks a free port, None turns that protocol off."""

    path: str
    host: str = "127.0.0.1"
    http_port: int | None = 8000
    grpc_port: int | None = 8001
    max_request_mb: float = 64.0
    drain_seconds: float = 30.0
    system_shm: str = "local"             # who may use the system shared-memory extension (shm.MODES)
    frontends: int = 1                    # processes that accept requests (kiln.serve.frontends when > 1)
    access_log: str | None = None         # what --access-log / --verbose asked for (front-end processes reopen it)
    verbose: bool = False
    event_loop: str = "auto"              # the front-end processes' loop: uvloop where installed (auto), asyncio, uvloop
    model: ModelOptions = field(default_factory=ModelOptions)

    @property
    def max_request_bytes(self) -> int:
        return max(1, int(self.max_request_mb * (1 << 20)))


@dataclass
class Listening:
    """Where the server listens, once it does."""

    http: str | None
    grpc: str | None
    models: list[str]

    def line(self) -> str:
        parts = [f"HTTP on http://{self.http}" if self.http else "", f"gRPC on {self.grpc}" if self.grpc else ""]
        return (f"kiln serve: {', '.join(p for p in parts if p)}; models: {', '.join(self.models)}")


async def serve(config: ServeConfig, stop: asyncio.Event,
                on_listening: Callable[[Listening], None] | None = None) -> None:
    """Serves until ``stop`` is set, then stops listening and finishes every request already taken."""
    if config.http_port is None and config.grpc_port is None:
        raise KilnError("Both HTTP and gRPC are turned off; serve at least one of them.")
    for port, what in ((config.http_port, "HTTP"), (config.grpc_port, "gRPC")):
        if port is not None:
            _check_free(config.host, port, what)        # before the (slow) loads
    repo = await load_repository(config)
    if config.frontends > 1:
        from kiln.serve.frontends import serve_frontends
        await serve_frontends(config, repo, stop, on_listening)
        return
    core = ServerCore(repo, repo.metrics, config.system_shm)
    listening = None
    try:
        listening = await listen(core, config)
        if on_listening is not None:
            on_listening(Listening(listening.http, listening.grpc, sorted(repo.loaded)))
        await stop.wait()
        log.info("draining: no new requests; finishing those in flight")
    finally:
        core.draining = True
        for entry in repo.loaded.values():
            entry.batcher.hurry()
        if listening is not None:
            await listening.close(config.drain_seconds)
        await repo.close()


async def load_repository(config: ServeConfig) -> ModelRepository:
    """The repository with every engine in it loaded (a one-line error if one fails)."""
    repo = ModelRepository(config.path, config.model, Metrics())
    repo.inline_batches = config.frontends > 1
    names = sorted(repo.available())
    if not names:
        raise KilnError(f"No engines in {repo.folder!r}: serve a folder of MODEL.kiln files (kiln build -o) or "
                        f"one engine file.")
    for name in names:
        try:
            await repo.load(name)
        except KilnError as exc:
            await repo.close()
            raise KilnError(str(exc)) from None
    return repo


@dataclass
class Front:
    """The HTTP and gRPC servers of one process, and where they listen."""

    runner: Any = None
    grpc_server: Any = None
    http: str | None = None
    grpc: str | None = None

    async def close(self, drain_seconds: float) -> None:
        """Stops listening and waits (up to ``drain_seconds``) for the requests already taken."""
        pending = []
        if self.grpc_server is not None:
            pending.append(self.grpc_server.stop(drain_seconds))
        if self.runner is not None:
            pending.append(self.runner.cleanup())
        await asyncio.gather(*pending, return_exceptions=True)


async def listen(core: ServerCore, config: ServeConfig, reuse_port: bool = False) -> Front:
    """Starts HTTP and gRPC for ``core`` on the configured ports (shared with other processes that also
    set ``reuse_port``)."""
    front = Front()
    try:
        if config.http_port is not None:
            from aiohttp import web

            from kiln.serve.http import make_app
            front.runner = web.AppRunner(make_app(core, config.max_request_bytes), access_log=None,
                                         handle_signals=False)
            await front.runner.setup()
            site = web.TCPSite(front.runner, config.host, config.http_port, shutdown_timeout=config.drain_seconds,
                               reuse_port=reuse_port or None)
            await _bind(site.start(), "HTTP", config.host, config.http_port)
            host, port = front.runner.addresses[0][:2]
            front.http = f"{_host(host)}:{port}"
        if config.grpc_port is not None:
            from kiln.serve.grpc_service import make_server
            if not reuse_port:
                _check_free(config.host, config.grpc_port, "gRPC")   # grpc's own bind failure also logs from C
            front.grpc_server = make_server(core, config.max_request_bytes, reuse_port)
            try:
                port = front.grpc_server.add_insecure_port(f"{_host(config.host)}:{config.grpc_port}")
            except RuntimeError:
                port = 0
            if not port:
                raise KilnError(f"Cannot listen for gRPC on {config.host}:{config.grpc_port} (in use or not an "
                                f"address of this machine); pick another --grpc-port or --host.")
            await front.grpc_server.start()
            front.grpc = f"{_host(config.host)}:{port}"
    except BaseException:
        await front.close(0)
        raise
    return front


async def _bind(start, what: str, host: str, port: int) -> None:
    try:
        await start
    except OSError as exc:
        raise KilnError(f"Cannot listen for {what} on {host}:{port} ({exc.strerror or exc}); pick another port "
                        f"or --host.") from None


def _check_free(host: str, port: int, what: str) -> None:
    """Refuses a port another process listens on (port 0 is always free)."""
    import socket
    if not port:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise KilnError(f"Cannot listen on {host}:{port} ({exc.strerror or exc}); check --host.") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            raise KilnError(f"Cannot listen for {what} on {host}:{port} ({exc.strerror or exc}); pick another "
                            f"--{what.lower()}-port or --host.") from None


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
