"""Kiln engines on Ray Serve: replicas behind Ray Serve's HTTP proxy, speaking the KServe v2 REST protocol.

Each replica loads the engine once and batches with Kiln's batcher; Ray Serve spreads requests over
replicas (``num_replicas``, or ``autoscaling_config``) and places them (``ray_actor_options``, e.g.
``{"num_gpus": 1}`` for one GPU each). Needs ``pip install 'kiln[ray]'``::

    from ray import serve
    from kiln.serve.ray import deployment
    serve.run(deployment("models/resnet50.kiln", num_replicas=2, ray_actor_options={"num_gpus": 1}))

The same v2 paths as `kiln serve` answer: ``/v2/health/{live,ready}``, ``/v2/models/NAME[/versions/1]``,
``.../ready`` and ``.../infer`` (JSON and binary tensors). Every infer response names the replica
that answered in the header ``X-Kiln-Replica``.
"""
from __future__ import annotations

import json
import os
from typing import Any

from kiln.serve.model import VERSION, ModelOptions, ServedModel

REPLICA_HEADER = "X-Kiln-Replica"


class KilnReplica:
    """One Ray Serve replica: an engine, its batcher, and the v2 REST routes (Starlette requests in)."""

    def __init__(self, path: str, name: str, options: ModelOptions, max_request_bytes: int) -> None:
        import kiln
        from kiln.serve.instance import EngineInstance
        engine = kiln.load(path)
        self.model = ServedModel(name, engine, options)
        self._instances = [EngineInstance(engine) for _ in range(options.instances)]
        self._limit = max_request_bytes
        self._batcher = None
        self.replica = _replica_id()

    async def __call__(self, request: Any) -> Any:
        """Answers one v2 REST request; errors are the protocol's ``{"error": ...}`` with their status."""
        import logging

        from kiln.serve.errors import InternalError, ServeError
        headers = {REPLICA_HEADER: self.replica}
        try:
            return await self._route(request, headers)
        except ServeError as exc:
            return _json({"error": str(exc)}, exc.status, headers)
        except Exception as exc:               # noqa: BLE001 - a bug: this request fails, the replica stays up
            logging.getLogger("kiln.serve").exception("Ray Serve request failed")
            err = InternalError(f"The replica failed on this request ({type(exc).__name__}); please report it.")
            return _json({"error": str(err)}, err.status, headers)

    async def _route(self, request: Any, headers: dict[str, str]) -> Any:
        from starlette.responses import Response

        from kiln.serve.batcher import Batcher
        from kiln.serve.errors import NotFound, TooLarge
        from kiln.serve.metrics import ModelStats
        from kiln.serve.protocol import HEADER_LENGTH, decode_http, encode_http
        name = self.model.name
        parts = [p for p in request.url.path.split("/") if p]
        if parts in (["v2", "health", "live"], ["v2", "health", "ready"]):
            return Response(status_code=200, headers=headers)
        if parts[:3] != ["v2", "models", name]:
            raise NotFound(f"{request.url.path} is not served here; this deployment serves model {name!r} at "
                           f"/v2/models/{name}.")
        rest = parts[3:]
        if rest[:1] == ["versions"]:
            if rest[1:2] != [VERSION]:
                raise NotFound(f"Model {name!r} has no version {'/'.join(rest[1:2])!r}; its only version is "
                               f"{VERSION!r}.")
            rest = rest[2:]
        if rest == [] and request.method == "GET":
            return _json(self.model.metadata(), 200, headers)
        if rest == ["ready"] and request.method == "GET":
            return Response(status_code=200, headers=headers)
        if rest != ["infer"] or request.method != "POST":
            raise NotFound(f"{request.method} {request.url.path} is not a KServe v2 endpoint.")
        body = await request.body()
        if len(body) > self._limit:
            raise TooLarge(f"The request is larger than {self._limit >> 20} MiB; send less data per request.")
        req = decode_http(self.model, body, request.headers.get(HEADER_LENGTH))
        if self._batcher is None:              # made here: the batcher lives on the replica's event loop
            self._batcher = Batcher(self.model, self._instances, ModelStats())
        opts = self.model.options
        limits = [t for t in (opts.timeout_ms and opts.timeout_ms / 1e3, req.timeout_s) if t]
        results = await self._batcher.infer(req.arrays, req.rows, req.key, min(limits) if limits else None)
        payload, json_len = encode_http(req, results)
        if json_len is None:
            return Response(payload, 200, headers, media_type="application/json")
        return Response(payload, 200, {**headers, HEADER_LENGTH: str(json_len)}, media_type="application/octet-stream")


def _json(obj: Any, status: int, headers: dict[str, str]) -> Any:
    from starlette.responses import Response
    return Response(json.dumps(obj, separators=(",", ":")), status, headers, media_type="application/json")


def _replica_id() -> str:
    try:
        from ray import serve
        ctx = serve.get_replica_context()
        rid = getattr(ctx, "replica_id", None)
        return str(getattr(rid, "unique_id", None) or rid or getattr(ctx, "replica_tag", "local"))
    except Exception:                           # noqa: BLE001 - outside a replica (direct use in tests)
        return f"pid-{os.getpid()}"


def deployment(path: str, *, name: str | None = None, options: ModelOptions | None = None,
               max_request_mb: float = 64.0, num_replicas: int | str | None = 1,
               ray_actor_options: dict[str, Any] | None = None, autoscaling_config: dict[str, Any] | None = None,
               max_ongoing_requests: int = 256) -> Any:
    """A Ray Serve application serving the engine file ``path`` as model ``name`` (its file stem by default);
    pass it to ``ray.serve.run``."""
    from ray import serve
    path = os.path.abspath(os.fspath(path))
    name = name or os.path.basename(path).removesuffix(".kiln")
    limit = max(1, int(max_request_mb * (1 << 20)))
    settings: dict[str, Any] = {"name": f"kiln-{name}", "ray_actor_options": ray_actor_options or {},
                                "max_ongoing_requests": max_ongoing_requests}
    if autoscaling_config is not None:
        settings["autoscaling_config"] = autoscaling_config
    else:
        settings["num_replicas"] = num_replicas
    return serve.deployment(KilnReplica, **settings).bind(path, name, options or ModelOptions(), limit)
