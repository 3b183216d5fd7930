"""What the HTTP and gRPC front ends share: the repository, metrics, readiness, the infer path, the access log."""
from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable

import numpy as np

from kiln.serve.errors import NotFound, ServeError, Unavailable
from kiln.serve.metrics import Metrics
from kiln.serve.model import ServedModel
from kiln.serve.protocol import InferRequest
from kiln.serve.repository import Loaded, ModelRepository
from kiln.serve.shm import ShmRegistry

EXTENSIONS = ["binary_tensor_data", "model_repository", "system_shared_memory"]
access_log = logging.getLogger("kiln.serve.access")


class ServerCore:
    """The server's state, independent of the wire protocol."""

    def __init__(self, repository: ModelRepository, metrics: Metrics, system_shm: str = "local") -> None:
        self.repository = repository
        self.metrics = metrics
        self.shm = ShmRegistry(system_shm)
        self.draining = False

    @property
    def ready(self) -> bool:
        return not self.draining and bool(self.repository.loaded)

    def server_metadata(self) -> dict[str, Any]:
        import kiln
        extensions = [e for e in EXTENSIONS if e != "system_shared_memory" or self.shm.mode != "off"]
        return {"name": "kiln", "version": getattr(kiln, "__version__", "0"), "extensions": extensions}

    def model_ready(self, name: str, version: str | None) -> bool:
        try:
            self.repository.get(name, version)
        except NotFound:
            return False
        return not self.draining

    async def render_metrics(self) -> str:
        """The Prometheus text of /metrics."""
        for name, entry in self.repository.loaded.items():
            self.metrics.model(name).queue_depth = entry.batcher.depth
        return self.metrics.render()

    async def repository_index(self) -> list[dict[str, Any]]:
        return self.repository.index()

    async def shm_register(self, name: Any, key: Any, offset: Any, byte_size: Any, peer: str | None) -> None:
        self.shm.register(name, key, offset, byte_size, peer)

    async def shm_unregister(self, name: str | None, peer: str | None) -> None:
        self.shm.unregister(name, peer)

    def lookup(self, name: str, version: str | None, protocol: str) -> Loaded:
        """The loaded model for an infer request (a miss is counted without the name as a label)."""
        try:
            return self.repository.get(name, version)
        except NotFound:
            self.metrics.unknown_model_failures[protocol] += 1
            raise

    async def infer(self, entry: Loaded, protocol: str, decode: Callable[[ServedModel], InferRequest],
                    deadline_s: float | None = None) -> tuple[InferRequest, dict[str, np.ndarray]]:
        """Decodes and checks a request for a looked-up model, queues it, and returns its outputs."""
        stats = self.metrics.model(entry.model.name)
        stats.requests[protocol] += 1
        try:
            if self.draining:
                raise Unavailable("The server is shutting down and takes no new requests; retry on another server.")
            req = decode(entry.model)
            limits = [t for t in (entry.model.options.timeout_ms and entry.model.options.timeout_ms / 1e3,
                                  req.timeout_s, deadline_s) if t]
            results = await entry.batcher.infer(req.arrays, req.rows, req.key, min(limits) if limits else None)
        except ServeError as exc:
            stats.failures[exc.reason] += 1
            raise
        stats.inferences += max(req.rows, 1)
        return req, results


def log_access(**fields: Any) -> None:
    """One JSON line per request on the ``kiln.serve.access`` logger (when it is enabled)."""
    if access_log.isEnabledFor(logging.INFO):
        fields = {"time": round(time.time(), 3), **fields}
        access_log.info(json.dumps(fields, separators=(",", ":"), default=str))
