"""The KServe v2 REST front end (aiohttp): health, metadata, infer, the repository and system
shared-memory extensions, /metrics."""
from __future__ import annotations

import json
import logging
import time
from typing import Any, Awaitable, Callable

from aiohttp import ClientPayloadError, web

from kiln.serve.core import ServerCore, access_log, log_access
from kiln.serve.errors import BadRequest, InternalError, NotFound, ServeError, TooLarge
from kiln.serve.protocol import HEADER_LENGTH, decode_http, encode_http, parse_json

log = logging.getLogger("kiln.serve")
CORE = web.AppKey("core", ServerCore)
LIMIT = web.AppKey("limit", int)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(obj, separators=(",", ":")).encode(), status=status,
                        content_type="application/json")


def _error(exc: ServeError) -> web.Response:
    return _json({"error": str(exc)}, exc.status)


@web.middleware
async def _errors_and_log(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every ServeError becomes the protocol's ``{"error": ...}`` answer; each request is access-logged."""
    t0 = time.perf_counter()
    error = None
    try:
        response = await handler(request)
    except ServeError as exc:
        response, error = _error(exc), str(exc)
    except web.HTTPRequestEntityTooLarge:
        exc = TooLarge(f"The request is larger than the server's limit of {request.app[LIMIT] >> 20} MiB "
                       f"(--max-request-mb); send less data per request.")
        response, error = _error(exc), str(exc)
    except web.HTTPException as exc:
        response, error = _json({"error": exc.reason}, exc.status), exc.reason
    except (ConnectionError, ClientPayloadError):  # the client left mid-request: nobody to answer
        response, error = web.Response(status=499), "client disconnected"
    except Exception as exc:                    # noqa: BLE001 - a bug: this request fails, the server stays up
        log.exception("HTTP %s %s failed", request.method, request.path)
        err = InternalError(f"The server failed on this request ({type(exc).__name__}); please report it.")
        response, error = _error(err), str(err)
    if access_log.isEnabledFor(logging.INFO):
        log_access(protocol="http", peer=request.remote, method=request.method, path=request.path,
                   model=request.match_info.get("model"), status=response.status,
                   ms=round((time.perf_counter() - t0) * 1e3, 3), bytes_in=request.content_length,
                   bytes_out=response.content_length, error=error)
    return response


async def _body(request: web.Request) -> bytes:
    """The request body within --max-request-mb (413 otherwise); decompressed per Content-Encoding."""
    limit = request.app[LIMIT]
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    return await request.read()


def _version(request: web.Request) -> str | None:
    return request.match_info.get("version")


async def live(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def ready(request: web.Request) -> web.Response:
    return web.Response(status=200 if request.app[CORE].ready else 503)


async def server_metadata(request: web.Request) -> web.Response:
    return _json(request.app[CORE].server_metadata())


async def model_metadata(request: web.Request) -> web.Response:
    entry = request.app[CORE].repository.get(request.match_info["model"], _version(request))
    return _json(entry.model.metadata())


async def model_ready(request: web.Request) -> web.Response:
    ok = request.app[CORE].model_ready(request.match_info["model"], _version(request))
    return web.Response(status=200 if ok else 400)


async def infer(request: web.Request) -> web.Response:
    core = request.app[CORE]
    entry = core.lookup(request.match_info["model"], _version(request), "http")   # before the body is read
    body = await _body(request)
    header_length = request.headers.get(HEADER_LENGTH)
    req, results = await core.infer(entry, "http",
                                    lambda model: decode_http(model, body, header_length, core.shm, request.remote))
    payload, json_len = encode_http(req, results)
    if json_len is None:
        return web.Response(body=payload, content_type="application/json")
    return web.Response(body=payload, content_type="application/octet-stream",
                        headers={HEADER_LENGTH: str(json_len)})


async def repository_index(request: web.Request) -> web.Response:
    body = await _body(request)
    ready_only = bool(body.strip()) and parse_json(body).get("ready") is True
    rows = await request.app[CORE].repository_index()
    return _json([r for r in rows if not ready_only or r["state"] == "READY"])


async def _repository_params(request: web.Request, allowed: tuple[str, ...]) -> None:
    """Load and unload take no config or file overrides (Triton's ``config`` and ``file:`` parameters)."""
    body = await _body(request)
    params = parse_json(body).get("parameters", {}) if body.strip() else {}
    extra = sorted(k for k in (params if isinstance(params, dict) else {"parameters": 1}) if k not in allowed)
    if extra:
        raise BadRequest(f"Load and unload take no {extra[0]!r} parameter here (no config or file overrides); put "
                         f"the engine file in the repository folder and load it by name.")


async def repository_load(request: web.Request) -> web.Response:
    await _repository_params(request, ())
    await request.app[CORE].repository.load(request.match_info["model"])
    return web.Response(status=200)


async def repository_unload(request: web.Request) -> web.Response:
    await _repository_params(request, ("unload_dependents",))
    await request.app[CORE].repository.unload(request.match_info["model"])
    return web.Response(status=200)


async def shm_status(request: web.Request) -> web.Response:
    return _json(request.app[CORE].shm.status(request.match_info.get("region"), request.remote))


async def shm_register(request: web.Request) -> web.Response:
    body = parse_json(await _body(request))
    await request.app[CORE].shm_register(request.match_info["region"], body.get("key"), body.get("offset", 0),
                                         body.get("byte_size"), request.remote)
    return web.Response(status=200)


async def shm_unregister(request: web.Request) -> web.Response:
    await request.app[CORE].shm_unregister(request.match_info.get("region"), request.remote)
    return web.Response(status=200)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(text=await request.app[CORE].render_metrics(), content_type="text/plain",
                        headers={"X-Content-Type-Options": "nosniff"})


async def not_found(request: web.Request) -> web.Response:
    raise NotFound(f"{request.method} {request.path} is not a KServe v2 endpoint of this server.")


def make_app(core: ServerCore, max_request_bytes: int) -> web.Application:
    """The aiohttp application serving ``core``."""
    app = web.Application(client_max_size=max_request_bytes, middlewares=[_errors_and_log])
    app[CORE] = core
    app[LIMIT] = max_request_bytes
    m, mv = "/v2/models/{model}", "/v2/models/{model}/versions/{version}"
    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2", server_metadata)
    for base in (m, mv):
        app.router.add_get(base, model_metadata)
        app.router.add_get(base + "/ready", model_ready)
        app.router.add_post(base + "/infer", infer)
    app.router.add_post("/v2/repository/index", repository_index)
    app.router.add_post("/v2/repository/models/{model}/load", repository_load)
    app.router.add_post("/v2/repository/models/{model}/unload", repository_unload)
    shm, region = "/v2/systemsharedmemory", "/v2/systemsharedmemory/region/{region}"
    app.router.add_get(shm + "/status", shm_status)
    app.router.add_get(region + "/status", shm_status)
    app.router.add_post(region + "/register", shm_register)
    app.router.add_post(shm + "/unregister", shm_unregister)
    app.router.add_post(region + "/unregister", shm_unregister)
    app.router.add_get("/metrics", metrics)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app
