"""A front-end process of ``kiln serve --frontends N`` (started by kiln.serve.frontends, never by hand).

It runs the same HTTP and gRPC front ends as a one-process server, on ports it shares with its
siblings, over a ServerCore whose models live in the engine process: requests are decoded, checked
and answered here, and their tensors go through this process's slab (kiln.serve.ipc). It loads no
engine (no torch). SIGTERM drains it; SIGINT is left to the engine process, which forwards the stop.
If the engine process goes away, this process exits at once.
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import os
import signal
import socket
import sys
from typing import Any, Callable, Coroutine

import numpy as np

from kiln.serve import ipc
from kiln.serve.cli import EVENT_LOOPS
from kiln.serve.core import ServerCore
from kiln.serve.errors import InternalError, ServeError, Unavailable
from kiln.serve.metrics import Metrics
from kiln.serve.model import ModelOptions, ServedModel
from kiln.serve.repository import Loaded, ModelRepository
from kiln.serve.server import ServeConfig, listen
from kiln.serve.shm import Region, ShmTensor

log = logging.getLogger("kiln.serve")


class EngineSpec:
    """A model's inputs, outputs, profiles and device as the engine process described them."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.inputs, self.outputs = spec["inputs"], spec["outputs"]
        self.profiles, self.device = spec["profiles"], spec["device"]


class EngineLink:
    """This process's channel to the engine process, its slab, and the calls in flight."""

    def __init__(self, slab: ipc.Slab) -> None:
        self.slab = slab
        self.channel: ipc.Channel = None            # type: ignore[assignment] - set by open()
        self.calls: dict[int, asyncio.Future] = {}
        self.infers: dict[int, tuple[asyncio.Future, int | None, ServedModel]] = {}
        self.ids = itertools.count()
        self.closed = False
        self.on_message: Any = None                 # the engine process's own messages (model table, calls)

    async def open(self, sock: socket.socket) -> None:
        self.channel = await ipc.Channel.open(sock, self.on_json, self.on_records)

    async def call(self, msg: dict[str, Any]) -> Any:
        """Sends a control call; returns its answer."""
        if self.closed:
            raise Unavailable("The server is shutting down; retry on another server.")
        n = next(self.ids)
        fut = self.calls[n] = asyncio.get_running_loop().create_future()
        self.channel.send_json({**msg, "id": n})
        answer = await fut
        if "error" in answer:
            raise ipc.error_from(answer["error"])
        return answer

    async def infer(self, model: ServedModel, arrays: dict[str, np.ndarray | ShmTensor],
                    timeout_s: float | None) -> dict[str, np.ndarray]:
        """Sends an infer request (its tensors through a free slot when they fit one; a shared-memory input is
        read from its region straight into the slot) and returns its outputs. The slot is released when the
        answer comes, even if the caller has gone (the engine may read it until then)."""
        if self.closed:
            raise Unavailable("The server is shutting down; retry on another server.")
        free = self.slab.free
        total = sum(a.nbytes for a in arrays.values())
        slot = free.pop() if free and total <= self.slab.slot_bytes else None
        n = next(self.ids)
        try:
            record = ipc.request_record(n, model.name, timeout_s, slot,
                                        arrays, None if slot is None else self.slab.slot(slot))
        except BaseException:
            if slot is not None:
                free.append(slot)
            raise
        fut = asyncio.get_running_loop().create_future()
        self.infers[n] = (fut, slot, model)
        self.channel.add(record)
        try:
            return await fut
        except asyncio.CancelledError:
            if not self.closed:
                try:
                    self.channel.send_json({"op": "cancel", "id": n})
                except ConnectionError:
                    pass
            raise

    def on_records(self, body: bytearray) -> None:
        for rec in ipc.records(body, ipc.ANSWER):
            self.answered(ipc.Answer(rec))

    def answered(self, answer: ipc.Answer) -> None:
        fut, slot, model = self.infers.pop(answer.id, (None, None, None))
        if fut is None:
            return
        try:
            if fut.done():
                return
            err = answer.error()
            if err is not None:
                fut.set_exception(err)
            else:
                fut.set_result(answer.arrays(model.output_dtypes, None if slot is None else self.slab.slot(slot),
                                             model.output_layouts))
        except (ConnectionError, ValueError) as exc:
            fut.set_exception(InternalError(f"The engine process answered badly ({exc}); please report it."))
        finally:
            if slot is not None:
                self.slab.free.append(slot)

    def on_json(self, msg: dict[str, Any]) -> None:
        if "re" in msg:
            fut = self.calls.pop(msg["re"], None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        elif self.on_message is not None:
            self.on_message(msg)

    def fail_all(self) -> None:
        self.closed = True
        for fut in [*self.calls.values(), *(f for f, _, _ in self.infers.values())]:
            if not fut.done():
                fut.set_exception(Unavailable("The engine process stopped; retry on another server."))


class RemoteBatcher:
    """A model's batcher as a front end sees it: requests go to the engine process."""

    def __init__(self, link: EngineLink, model: ServedModel) -> None:
        self.link, self.model = link, model

    async def infer(self, feeds: dict[str, Any], rows: int, key: tuple,
                    timeout_s: float | None) -> dict[str, np.ndarray]:
        return await self.link.infer(self.model, feeds, timeout_s)


class RemoteRepository:
    """The engine process's model table (pushed to this process); load and unload go to the engine."""

    get = ModelRepository.get

    def __init__(self, link: EngineLink, options: ModelOptions) -> None:
        self.link, self.options = link, options
        self.loaded: dict[str, Loaded] = {}
        self.reasons: dict[str, str] = {}

    def update(self, msg: dict[str, Any]) -> None:
        loaded = {}
        for name, spec in msg["models"].items():
            old = self.loaded.get(name)
            model = ServedModel(name, EngineSpec(spec), self.options)
            loaded[name] = old if old is not None and old.model.metadata() == model.metadata() else \
                Loaded(model, RemoteBatcher(self.link, model))
        self.loaded, self.reasons = loaded, dict(msg.get("reasons", {}))

    async def load(self, name: str) -> None:
        await self.link.call({"op": "load", "model": name})

    async def unload(self, name: str) -> None:
        await self.link.call({"op": "unload", "model": name})


class FrontendCore(ServerCore):
    """A ServerCore whose metrics, repository index and shared-memory registrations span every process."""

    def __init__(self, repository: RemoteRepository, metrics: Metrics, system_shm: str) -> None:
        super().__init__(repository, metrics, system_shm)    # type: ignore[arg-type]
        self.link = repository.link

    async def render_metrics(self) -> str:
        return (await self.link.call({"op": "metrics"}))["text"]

    async def repository_index(self) -> list[dict[str, Any]]:
        return (await self.link.call({"op": "index"}))["rows"]

    async def shm_register(self, name: Any, key: Any, offset: Any, byte_size: Any, peer: str | None) -> None:
        self.shm.register(name, key, offset, byte_size, peer)
        await self.link.call({"op": "shm", "args": ["register", name, key, offset, byte_size]})

    async def shm_unregister(self, name: str | None, peer: str | None) -> None:
        self.shm.unregister(name, peer)
        await self.link.call({"op": "shm", "args": ["unregister", name]})

    def apply_shm(self, args: Any) -> None:
        """A registration or unregistration made through another front end, which checked it and its peer."""
        if not isinstance(args, list) or not args or not (args[1] is None or isinstance(args[1], str)):
            return
        try:
            if args[0] == "register" and len(args) == 5 and args[1]:
                self.shm.regions[args[1]] = Region(*args[1:])
            elif args[0] == "unregister" and len(args) == 2:
                self.shm.regions.pop(args[1], None) if args[1] else self.shm.regions.clear()
        except ServeError as exc:
            log.warning("shared-memory region %r could not be registered here too: %s", args[1], exc)


def _handler(link: EngineLink, core: FrontendCore, ready: asyncio.Event) -> Any:
    """What this process does with the engine process's own messages: the model table and its calls."""
    def on_message(msg: dict[str, Any]) -> None:
        op = msg.get("op")
        try:
            if op == "models":
                core.repository.update(msg)
                ready.set()
            elif op == "snapshot":
                link.channel.send_json({"re": msg.get("id"), "metrics": core.metrics.snapshot()})
            elif op == "shm":
                core.apply_shm(msg.get("args"))
                link.channel.send_json({"re": msg.get("id")})
        except ConnectionError:
            pass                                        # the engine process is gone: _watch ends this one
    return on_message


async def _watch(link: EngineLink) -> None:
    """Ends this process once the engine process's socket closes."""
    await link.channel.closed
    link.fail_all()
    print("kiln serve: front end: the engine process is gone; exiting", file=sys.stderr, flush=True)
    os._exit(1)


async def run(spec: dict[str, Any]) -> None:
    model_fields = dict(spec["model"])
    model_fields["preferred_batch_sizes"] = tuple(model_fields.get("preferred_batch_sizes", ()))
    options = ModelOptions(**model_fields)
    config = ServeConfig(path="", host=spec["host"], http_port=spec["http_port"], grpc_port=spec["grpc_port"],
                         max_request_mb=spec["max_request_mb"], drain_seconds=spec["drain_seconds"],
                         system_shm=spec["system_shm"], model=options)
    link = EngineLink(ipc.Slab(spec["slab_fd"], spec["slots"], spec["slot_bytes"]))
    core = FrontendCore(RemoteRepository(link, options), Metrics(), config.system_shm)
    ready = asyncio.Event()
    link.on_message = _handler(link, core, ready)
    await link.open(socket.socket(fileno=spec["socket_fd"]))
    watching = asyncio.create_task(_watch(link))
    await ready.wait()                                  # the first model table
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    front = await listen(core, config, reuse_port=True)
    link.channel.send_json({"op": "listening", "http": front.http, "grpc": front.grpc})
    await stop.wait()
    core.draining = True
    await front.close(config.drain_seconds)
    watching.cancel()


def loop_runner(choice: str) -> Callable[[Coroutine[Any, Any, None]], None]:
    """What runs this process's event loop: uvloop's (``uvloop``, or ``auto`` where uvloop is installed), else
    asyncio's own."""
    if choice not in EVENT_LOOPS:
        raise ValueError(f"the event loop is one of {EVENT_LOOPS}, got {choice!r}")
    if choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise
        else:
            return uvloop.run
    return asyncio.run


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)        # the engine process decides when to stop
    spec = json.loads(argv[0])
    from kiln.serve.cli import setup_logging
    setup_logging(argparse.Namespace(access_log=spec["access_log"], verbose=spec["verbose"]))
    try:
        loop_runner(spec.get("event_loop", "auto"))(run(spec))
    except Exception as exc:                            # noqa: BLE001 - one line, then the engine stops the server
        print(f"kiln serve: front end {spec.get('index')}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
              file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
