"""The engine process of ``kiln serve --frontends N``: it starts N front-end processes, then only queues,
batches and runs what they send.

Each front end (kiln.serve.frontend) accepts HTTP and gRPC on the shared ports (SO_REUSEPORT, so the
kernel spreads connections over them), decodes and checks requests and encodes answers; tensors reach
this process through the front end's slab (kiln.serve.ipc). This process owns the models: it pushes
the model table to every front end at start and after each load or unload, answers the repository
index, loads and unloads, aggregates /metrics over all processes, and relays shared-memory
registrations so every front end knows every region. A front end that exits while the server runs
stops the server: the others drain and the command reports that front end in one line.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import signal
import socket
import subprocess
import sys
from dataclasses import asdict
from functools import partial
from typing import Any, Callable

import numpy as np

from kiln.errors import KilnError
from kiln.serve import ipc
from kiln.serve.batcher import Batcher, Pending
from kiln.serve.errors import InternalError, ServeError, Unavailable
from kiln.serve.metrics import Metrics
from kiln.serve.model import ServedModel
from kiln.serve.repository import ModelRepository
from kiln.serve.server import Listening, ServeConfig

log = logging.getLogger("kiln.serve")
START_SECONDS = 120.0                   # the longest a front end may take to listen


class Link:
    """One front-end process: its child process, channel, slab, its requests in the batchers, and this side's
    calls to it."""

    def __init__(self, index: int, proc: subprocess.Popen, slab: ipc.Slab, repo: ModelRepository,
                 links: list[Link]) -> None:
        self.index, self.proc, self.slab, self.repo, self.links = index, proc, slab, repo, links
        self.channel: ipc.Channel = None            # type: ignore[assignment] - set by open()
        self.calls: dict[int, asyncio.Future] = {}
        self.requests: dict[int, tuple[Batcher, Pending]] = {}
        self.tasks: set[asyncio.Task] = set()
        self.listening: asyncio.Future = asyncio.get_running_loop().create_future()
        self.ids = itertools.count()
        self.stopping = False                   # asked to drain: its exit is expected

    async def open(self, sock: socket.socket) -> None:
        self.channel = await ipc.Channel.open(sock, self.on_json, self.on_records)

    async def call(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Sends a request to the front end and returns its answer."""
        n = next(self.ids)
        fut = self.calls[n] = asyncio.get_running_loop().create_future()
        self.channel.send_json({**msg, "id": n})
        return await asyncio.wait_for(fut, 30)

    def on_json(self, msg: dict[str, Any]) -> None:
        if "re" in msg:
            fut = self.calls.pop(msg["re"], None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        elif msg.get("op") == "listening":
            if not self.listening.done():
                self.listening.set_result(msg)
        elif msg.get("op") == "cancel":
            held = self.requests.get(msg.get("id"))            # type: ignore[arg-type]
            if held is not None:
                held[0].cancel(held[1], Unavailable("cancelled"))
        else:
            task = asyncio.create_task(_answer(self, msg))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def on_records(self, body: bytearray) -> None:
        for rec in ipc.records(body, ipc.REQUEST):
            self.request(rec)

    def request(self, rec: memoryview) -> None:
        """Queues one forwarded infer request; its answer goes out when its batch is done (``answered``)."""
        n = ipc.REQUEST.unpack_from(rec)[1]
        try:
            req = ipc.Request(rec)
            entry = self.repo.get(req.model, None)
            model = entry.model
            arrays = req.arrays(model.input_dtypes, self.slab, model.input_layouts)
            rows, key = model.check_request(arrays)
            slot = self.slab.checked_slot(req.slot)
            pending = entry.batcher.submit(arrays, rows, key, req.timeout_s, partial(self.answered, n, slot, model),
                                           borrow=True)
            self.requests[n] = (entry.batcher, pending)
        except ServeError as exc:
            self.channel.add(ipc.error_record(n, exc))
        except ConnectionError as exc:
            log.error("front end %d sent a malformed request: %s", self.index, exc)
            self.channel.add(ipc.error_record(n, InternalError(
                f"The front end sent a malformed request ({exc}); please report it.")))
        except Exception as exc:               # noqa: BLE001 - a bug: this request fails, the server stays up
            log.exception("front end %d: a forwarded request failed", self.index)
            self.channel.add(ipc.error_record(n, InternalError(
                f"The server failed on this request ({type(exc).__name__}); please report it.")))

    def answered(self, n: int, slot: memoryview | None, model: ServedModel, result: Any) -> None:
        """Answers request ``n``: its outputs into its slot when they fit, else in the record; or its error. The
        outputs are copied before it returns (they may be views of an instance's reused output buffers)."""
        self.requests.pop(n, None)
        try:
            if isinstance(result, BaseException):
                err = result if isinstance(result, ServeError) else InternalError(
                    f"The server failed on this request ({type(result).__name__}); please report it.")
                record = ipc.error_record(n, err)
            else:
                record = ipc.answer_record(n, {t.name: np.asarray(result[t.name], t.np_dtype)
                                               for t in model.outputs}, slot)
        except Exception as exc:               # noqa: BLE001 - a bug: this request fails, the server stays up
            log.exception("front end %d: a forwarded request's answer failed", self.index)
            record = ipc.error_record(n, InternalError(
                f"The server failed on this request's answer ({type(exc).__name__}); please report it."))
        self.channel.add(record)

    def forget(self) -> None:
        """The front end is gone: its queued requests are dropped."""
        for batcher, pending in list(self.requests.values()):
            batcher.withdraw(pending)
        self.requests.clear()


def model_table(repo: ModelRepository) -> dict[str, Any]:
    """What a front end needs to check requests: each loaded model's inputs, outputs, profiles and device."""
    def tensors(specs: list[dict]) -> list[dict]:
        return [{"name": s["name"], "dtype": s["dtype"], "shape": s["shape"]} for s in specs]
    models = {name: {"inputs": tensors(e.model.engine.inputs), "outputs": tensors(e.model.engine.outputs),
                     "profiles": [{n: {k: list(r[k]) for k in ("min", "opt", "max")} for n, r in p.items()}
                                  for p in e.model.engine.profiles if p],
                     "device": getattr(e.model.engine, "device", "cpu")}
              for name, e in repo.loaded.items()}
    return {"op": "models", "models": models, "reasons": dict(repo.reasons)}


async def serve_frontends(config: ServeConfig, repo: ModelRepository, stop: asyncio.Event,
                          on_listening: Callable[[Listening], None] | None = None) -> None:
    """Runs the front ends and serves them until ``stop`` is set or one of them exits."""
    held, ports = _reserve_ports(config)
    links: list[Link] = []
    died: asyncio.Future = asyncio.get_running_loop().create_future()
    tasks = []
    try:
        for k in range(config.frontends):
            links.append(await _start(k, config, ports, repo, links))
        tasks = [asyncio.create_task(_serve(link, died)) for link in links]
        table = model_table(repo)
        for link in links:
            link.channel.send_json(table)
        first = asyncio.ensure_future(asyncio.wait([link.listening for link in links], timeout=START_SECONDS))
        await asyncio.wait([first, died], return_when=asyncio.FIRST_COMPLETED)
        first.cancel()
        if died.done() or not all(link.listening.done() for link in links):
            raise KilnError(died.result() if died.done() else
                            f"The front-end processes did not start listening within {START_SECONDS:.0f} s.")
        at = links[0].listening.result()
        for s in held:
            s.close()
        if on_listening is not None:
            on_listening(Listening(at.get("http"), at.get("grpc"), sorted(repo.loaded)))
        waiter = asyncio.ensure_future(stop.wait())
        await asyncio.wait([waiter, died], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        log.info("draining: no new requests; finishing those in flight")
    finally:
        for s in held:
            s.close()
        for entry in repo.loaded.values():
            entry.batcher.hurry()
        await _stop(links, config.drain_seconds)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await repo.close()
        for link in links:
            link.slab.close()
    if died.done():
        raise KilnError(died.result())


def _reserve_ports(config: ServeConfig) -> tuple[list[socket.socket], dict[str, int | None]]:
    """Port 0 becomes a free port held (bound with SO_REUSEPORT, not listening) until the front ends listen."""
    held, ports = [], {}
    for what, port in (("http", config.http_port), ("grpc", config.grpc_port)):
        if port == 0:
            family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
            s = socket.socket(family, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind((config.host, 0))
            held.append(s)
            port = s.getsockname()[1]
        ports[what] = port
    return held, ports


async def _start(k: int, config: ServeConfig, ports: dict[str, int | None], repo: ModelRepository,
                 links: list[Link]) -> Link:
    """Starts front end ``k`` with its end of a socketpair and its slab."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    slab = ipc.Slab()
    spec = {"index": k, "host": config.host, "http_port": ports["http"], "grpc_port": ports["grpc"],
            "max_request_mb": config.max_request_mb, "drain_seconds": config.drain_seconds,
            "system_shm": config.system_shm, "model": asdict(config.model), "access_log": config.access_log,
            "verbose": config.verbose, "socket_fd": theirs.fileno(), "slab_fd": slab.fd, "slots": slab.slots,
            "slot_bytes": slab.slot_bytes, "event_loop": config.event_loop}
    proc = subprocess.Popen([sys.executable, "-m", "kiln.serve.frontend", json.dumps(spec)],
                            pass_fds=(theirs.fileno(), slab.fd), stdin=subprocess.DEVNULL)
    theirs.close()
    link = Link(k, proc, slab, repo, links)
    await link.open(ours)
    return link


async def _stop(links: list[Link], drain_seconds: float) -> None:
    """Asks every front end to drain (SIGTERM), waits for them, and kills any that outstay the drain."""
    for link in links:
        link.stopping = True
        if link.proc.poll() is None:
            link.proc.send_signal(signal.SIGTERM)
    for link in links:
        try:
            await asyncio.to_thread(link.proc.wait, drain_seconds + 15)
        except subprocess.TimeoutExpired:
            link.proc.kill()
            await asyncio.to_thread(link.proc.wait)
        link.channel.close()


async def _serve(link: Link, died: asyncio.Future) -> None:
    """Waits for one front end's socket to close (its messages are handled as they arrive, by ``Link``)."""
    await link.channel.closed
    link.forget()
    code = await asyncio.to_thread(link.proc.wait)
    if not died.done() and not link.stopping:
        died.set_result(f"Front end {link.index} (pid {link.proc.pid}) exited with code {code} while serving; "
                        f"the server stopped.")


async def _answer(link: Link, msg: dict[str, Any]) -> None:
    """Answers a front end's repository, metrics or shared-memory call."""
    op, name, repo, links = msg.get("op"), msg.get("model"), link.repo, link.links
    answer: dict[str, Any] = {"re": msg.get("id")}
    try:
        if op == "index":
            answer["rows"] = repo.index()
        elif op in ("load", "unload"):
            await (repo.load(name) if op == "load" else repo.unload(name))
            table = model_table(repo)
            for other in links:
                _send(other, table)
        elif op == "metrics":
            answer["text"] = await _metrics(links, repo)
        elif op == "shm":
            others = [other for other in links if other is not link]
            await asyncio.gather(*(other.call({"op": "shm", "args": msg.get("args")}) for other in others))
        else:
            raise InternalError(f"Unknown front-end call {op!r}.")
    except ServeError as exc:
        answer = {"re": msg.get("id"), "error": ipc.error_message(exc)}
    except Exception as exc:                   # noqa: BLE001 - a bug: this call fails, the server stays up
        log.exception("front end %d: call %r failed", link.index, op)
        answer = {"re": msg.get("id"), "error": ipc.error_message(InternalError(
            f"The server failed on this call ({type(exc).__name__}); please report it."))}
    _send(link, answer)


def _send(link: Link, msg: dict[str, Any]) -> None:
    try:
        link.channel.send_json(msg)
    except ConnectionError:
        pass                                   # the front end is gone; its exit is reported by _serve


async def _metrics(links: list[Link], repo: ModelRepository) -> str:
    """/metrics over every process: this one's batcher stats plus each front end's request counts."""
    total = Metrics()
    for name, entry in repo.loaded.items():
        repo.metrics.model(name).queue_depth = entry.batcher.depth
    total.add(repo.metrics.snapshot())
    snaps = await asyncio.gather(*(link.call({"op": "snapshot"}) for link in links))
    lines = ["# HELP kiln_frontend_requests_total Inference requests each front-end process received.",
             "# TYPE kiln_frontend_requests_total counter"]
    for link, snap in zip(links, snaps):
        total.add(snap["metrics"])
        count = sum(n for m in snap["metrics"]["models"].values() for n in m["requests"].values())
        lines.append(f'kiln_frontend_requests_total{{frontend="{link.index}"}} {count}')
    return total.render() + "\n".join(lines) + "\n"

