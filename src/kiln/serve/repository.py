"""The model repository: the engines of one folder (or one engine file), loaded, unloaded, listed.

A model's name is its file name without ``.kiln``. Load and unload take only names found in the
folder's listing, so a name from a request never becomes a path of its own.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import os
import re
from typing import Any

from kiln.errors import KilnError
from kiln.serve.batcher import Batcher
from kiln.serve.errors import BadRequest, NotFound, Unavailable
from kiln.serve.instance import EngineInstance
from kiln.serve.metrics import Metrics
from kiln.serve.model import VERSION, ModelOptions, ServedModel

log = logging.getLogger("kiln.serve")
SUFFIX = ".kiln"
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")


class Loaded:
    """A served model and its batcher."""

    def __init__(self, model: ServedModel, batcher: Batcher) -> None:
        self.model = model
        self.batcher = batcher


class ModelRepository:
    """The engines under ``path`` (a folder of ``*.kiln`` files, or one engine file)."""

    def __init__(self, path: str, options: ModelOptions, metrics: Metrics) -> None:
        path = os.path.abspath(os.fspath(path))
        if os.path.isdir(path):
            self.folder, self.single = path, None
        elif os.path.isfile(path):
            self.folder, self.single = os.path.dirname(path), os.path.basename(path)
            if not self.single.endswith(SUFFIX) or not NAME.fullmatch(self.single[:-len(SUFFIX)]):
                raise KilnError(f"{path!r} is not a servable engine file name; name it MODEL{SUFFIX} (letters, "
                                f"digits, '_', '.', '-').")
        else:
            raise KilnError(f"{path!r} does not exist; give a folder of {SUFFIX} engines or one engine file.")
        self.options = options
        self.metrics = metrics
        self.loaded: dict[str, Loaded] = {}
        self.reasons: dict[str, str] = {}
        self.inline_batches = False             # Batcher's option: set in the engine process of --frontends
        self._busy: dict[str, asyncio.Lock] = {}

    def available(self) -> dict[str, str]:
        """Model name -> engine path, for every servable engine file in the repository now."""
        if self.single is not None:
            files = [self.single]
        else:
            try:
                files = sorted(os.listdir(self.folder))
            except OSError as exc:
                raise Unavailable(f"Cannot list the model repository {self.folder!r} ({exc.strerror}).") from None
        out = {}
        for f in files:
            stem = f[:-len(SUFFIX)]
            path = os.path.join(self.folder, f)
            if f.endswith(SUFFIX) and NAME.fullmatch(stem) and os.path.isfile(path):
                out[stem] = path
        return out

    # ---- serving -----------------------------------------------------------------------------
    def get(self, name: str, version: str | None = None) -> Loaded:
        """The loaded model ``name``; NotFound for an unknown name or version."""
        entry = self.loaded.get(name)
        if entry is None:
            why = f" ({self.reasons[name]})" if name in self.reasons else ""
            raise NotFound(f"Model {name!r} is not loaded{why}; the loaded models are {sorted(self.loaded)}.")
        if version not in (None, "", VERSION):
            raise NotFound(f"Model {name!r} has no version {version!r}; its only version is {VERSION!r}.")
        return entry

    def index(self) -> list[dict[str, Any]]:
        """The repository index: every model found or loaded, with its state."""
        names = sorted(set(self.available()) | set(self.loaded))
        out = []
        for n in names:
            row = {"name": n, "version": VERSION, "state": "READY" if n in self.loaded else "UNAVAILABLE"}
            if n not in self.loaded:
                row["reason"] = self.reasons.get(n, "unloaded")
            out.append(row)
        return out

    # ---- load and unload -------------------------------------------------------------------------
    async def load(self, name: str) -> None:
        """Loads (or reloads) model ``name`` from its engine file."""
        path = self.available().get(name) if isinstance(name, str) else None
        if path is None:
            raise NotFound(f"The model repository has no engine {name!r}{SUFFIX}; it has "
                           f"{sorted(self.available())}.")
        async with self._busy.setdefault(name, asyncio.Lock()):
            try:
                model, instances = await asyncio.to_thread(self._open, name, path)
            except KilnError as exc:
                why = str(exc).replace(path, os.path.basename(path))     # clients see no server paths
                self.reasons[name] = why
                raise BadRequest(f"Model {name!r} failed to load: {why}") from None
            old = self.loaded.get(name)
            self.loaded[name] = Loaded(model, Batcher(model, instances, self.metrics.model(name),
                                                      self.inline_batches))
            self.reasons.pop(name, None)
            if old is not None:
                await old.batcher.close()
            _freeze()
            log.info("loaded model %s from %s (%s, max batch %d, %d instance(s))", name, path,
                     model.engine.device, model.max_batch, len(instances))

    def _open(self, name: str, path: str) -> tuple[ServedModel, list[EngineInstance]]:
        import kiln
        engine = kiln.load(path)
        model = ServedModel(name, engine, self.options)
        instances = [EngineInstance(engine) for _ in range(self.options.instances)]
        if self.options.warmup:
            for feeds in model.warmup_feeds():
                for inst in instances:
                    inst.warm(feeds)             # through its batch buffers: the input-bound CUDA graph is recorded
        return model, instances

    async def unload(self, name: str) -> None:
        """Stops model ``name`` taking requests, finishes its queued ones, and frees it."""
        async with self._busy.setdefault(name, asyncio.Lock()):
            entry = self.loaded.pop(name, None)
            if entry is None:
                raise NotFound(f"Model {name!r} is not loaded; the loaded models are {sorted(self.loaded)}.")
            self.reasons[name] = "unloaded"
            await entry.batcher.close()
            _freeze()
        log.info("unloaded model %s", name)

    async def close(self) -> None:
        """Finishes every queued request of every model."""
        entries = list(self.loaded.values())
        await asyncio.gather(*(e.batcher.close() for e in entries))


def _freeze() -> None:
    """Collects, then moves every object alive now (engines, torch's modules) out of the cycle collector's view:
    a full collection would otherwise walk them all (about 0.1 s with torch loaded, a stall of every request in
    the process); objects made later are collected as before. Called after each load and unload, so an engine
    unloaded or replaced is collected then."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
