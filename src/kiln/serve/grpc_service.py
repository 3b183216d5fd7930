"""The KServe v2 gRPC front end: GRPCInferenceService (grpc.aio) over the generated protocol modules.

The generated modules register protobuf package ``inference``, as tritonclient's do: load this
module only in a process that does not also import ``tritonclient.grpc``.
"""
from __future__ import annotations

import inspect
import logging
import time
from typing import Any

import grpc
import numpy as np

from kiln.serve.core import ServerCore, access_log, log_access
from kiln.serve.errors import BadRequest, InternalError, ServeError
from kiln.serve.model import VERSION, ServedModel
from kiln.serve.protocol import InferRequest, array_from_bytes, array_from_values, finish, wire_dtype
from kiln.serve.shm import ShmRegistry, grpc_peer_host, shm_input, shm_output
from kiln.serve.proto import grpc_predict_v2_pb2 as pb
from kiln.serve.proto import grpc_predict_v2_pb2_grpc as pb_grpc

log = logging.getLogger("kiln.serve")
# which InferTensorContents field carries each datatype (FP16 and BF16 travel as raw bytes only)
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
            "FP64": "fp64_contents"}


def _param(p: Any) -> Any:
    which = p.WhichOneof("parameter_choice")
    return getattr(p, which) if which else None


def _params(parameters: Any) -> dict[str, Any]:
    return {k: _param(v) for k, v in parameters.items()} if parameters else {}


def decode_grpc(model: ServedModel, request: Any, shm: ShmRegistry | None = None,
                peer: str | None = None) -> InferRequest:
    """A ModelInferRequest as a checked InferRequest (raw_input_contents, typed contents, or a region of
    ``shm``); raw_input_contents holds one entry per input not in shared memory, in order."""
    checked, seen = [], set()
    for t in request.inputs:
        meta = model.input(t.name)
        if meta.name in seen:
            raise BadRequest(f"Input {meta.name!r} is given twice; give each input once.")
        seen.add(meta.name)
        if t.datatype != meta.datatype:
            raise BadRequest(f"Input {meta.name!r} of model {model.name!r} is {meta.datatype}, got datatype "
                             f"{t.datatype!r}.")
        shape = model.check_shape(meta, list(t.shape))
        in_shm = shm_input(shm, peer, _params(t.parameters), f"Input {meta.name!r}", shape, wire_dtype(meta))
        checked.append((t, meta, shape, in_shm))
    raw = list(request.raw_input_contents)
    carried = sum(in_shm is None for *_, in_shm in checked)
    if raw and len(raw) != carried:
        raise BadRequest(f"raw_input_contents has {len(raw)} entries for {carried} inputs; send one per input "
                         f"not in shared memory, in order.")
    arrays: dict[str, Any] = {}
    for t, meta, shape, in_shm in checked:
        if in_shm is not None:
            arrays[meta.name] = in_shm
        elif raw:
            arrays[meta.name] = array_from_bytes(meta, shape, raw.pop(0))
        elif meta.datatype in CONTENTS:
            arrays[meta.name] = array_from_values(meta, shape, list(getattr(t.contents, CONTENTS[meta.datatype])))
        else:
            raise BadRequest(f"Input {meta.name!r} is {meta.datatype}, which travels only in raw_input_contents.")
    params = _params(request.parameters)
    timeout = params.get("timeout")
    if timeout is not None and (type(timeout) is not int or timeout <= 0):
        raise BadRequest(f"The timeout parameter is a positive whole number of microseconds, got {timeout!r}.")
    slots = {}
    for o in request.outputs:
        slot = shm_output(shm, peer, _params(o.parameters), f"Output {o.name!r}")
        if slot is not None:
            slots[o.name] = slot
    return finish(model, request.id or None, arrays, [o.name for o in request.outputs],
                  timeout / 1e6 if timeout else None, shm_outputs=slots)


def encode_grpc(req: InferRequest, results: dict[str, np.ndarray]) -> Any:
    """The response; an output written into shared memory gets an empty raw_output_contents entry, so
    the entries stay one per output."""
    response = pb.ModelInferResponse(model_name=req.model.name, model_version=VERSION, id=req.id or "")
    in_shm = req.write_shm_outputs(results)
    for meta in req.model.outputs:
        if meta.name in req.outputs:
            arr = np.ascontiguousarray(results[meta.name])
            out = response.outputs.add(name=meta.name, datatype=meta.datatype, shape=list(arr.shape))
            if meta.name in in_shm:
                for k, v in in_shm[meta.name].items():
                    setattr(out.parameters[k], "string_param" if isinstance(v, str) else "int64_param", v)
                response.raw_output_contents.append(b"")
            else:
                response.raw_output_contents.append(arr.tobytes())
    return response


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """The six calls of the protocol's GRPCInferenceService and the system shared-memory extension's three."""

    def __init__(self, core: ServerCore) -> None:
        self.core = core

    async def ServerLive(self, request: Any, context: Any) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> Any:
        return pb.ServerReadyResponse(ready=self.core.ready)

    async def ModelReady(self, request: Any, context: Any) -> Any:
        return pb.ModelReadyResponse(ready=self.core.model_ready(request.name, request.version or None))

    async def ServerMetadata(self, request: Any, context: Any) -> Any:
        return pb.ServerMetadataResponse(**self.core.server_metadata())

    async def ModelMetadata(self, request: Any, context: Any) -> Any:
        try:
            meta = self.core.repository.get(request.name, request.version or None).model.metadata()
        except ServeError as exc:
            await _abort(context, exc, "ModelMetadata", request.name, 0.0)
        tensors = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensors(**t) for t in meta["inputs"]], outputs=[tensors(**t) for t in meta["outputs"]])

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        t0 = time.perf_counter()
        try:
            entry = self.core.lookup(request.model_name, request.model_version or None, "grpc")
            peer = grpc_peer_host(context.peer())
            req, results = await self.core.infer(
                entry, "grpc", lambda model: decode_grpc(model, request, self.core.shm, peer), context.time_remaining())
            response = encode_grpc(req, results)
        except ServeError as exc:
            await _abort(context, exc, "ModelInfer", request.model_name, t0)
        except Exception as exc:                # noqa: BLE001 - a bug: this request fails, the server stays up
            log.exception("gRPC ModelInfer failed")
            await _abort(context, InternalError(f"The server failed on this request ({type(exc).__name__}); "
                                                f"please report it."), "ModelInfer", request.model_name, t0)
        if access_log.isEnabledFor(logging.INFO):
            log_access(protocol="grpc", peer=context.peer(), call="ModelInfer", model=request.model_name,
                       status="OK", ms=round((time.perf_counter() - t0) * 1e3, 3), bytes_in=request.ByteSize(),
                       error=None)
        return response

    async def SystemSharedMemoryStatus(self, request: Any, context: Any) -> Any:
        rows = await self._shm(context, "SystemSharedMemoryStatus", self.core.shm.status, request.name or None)
        status = pb.SystemSharedMemoryStatusResponse.RegionStatus
        return pb.SystemSharedMemoryStatusResponse(regions={r["name"]: status(**r) for r in rows})

    async def SystemSharedMemoryRegister(self, request: Any, context: Any) -> Any:
        await self._shm(context, "SystemSharedMemoryRegister", self.core.shm_register, request.name, request.key,
                        request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    async def SystemSharedMemoryUnregister(self, request: Any, context: Any) -> Any:
        await self._shm(context, "SystemSharedMemoryUnregister", self.core.shm_unregister, request.name or None)
        return pb.SystemSharedMemoryUnregisterResponse()

    async def _shm(self, context: Any, call: str, method: Any, *args: Any) -> Any:
        """Runs a registry call for this peer; a refusal becomes the call's status code."""
        try:
            out = method(*args, grpc_peer_host(context.peer()))
            if inspect.isawaitable(out):
                out = await out
        except ServeError as exc:
            await _abort(context, exc, call, "", 0.0)
        log_access(protocol="grpc", peer=context.peer(), call=call, status="OK", error=None)
        return out


async def _abort(context: Any, exc: ServeError, call: str, model: str, t0: float) -> None:
    log_access(protocol="grpc", peer=context.peer(), call=call, model=model, status=exc.grpc_code,
               ms=round((time.perf_counter() - t0) * 1e3, 3) if t0 else None, error=str(exc))
    await context.abort(getattr(grpc.StatusCode, exc.grpc_code), str(exc))


def make_server(core: ServerCore, max_request_bytes: int, reuse_port: bool = False) -> Any:
    """A grpc.aio server with the inference service added (ports are bound by the caller). Without
    ``reuse_port`` a port in use is refused, not shared; with it, front-end processes share one port."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_request_bytes),
                                      ("grpc.max_send_message_length", -1),
                                      ("grpc.so_reuseport", int(reuse_port))])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(core), server)
    return server
