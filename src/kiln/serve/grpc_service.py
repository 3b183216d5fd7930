"""The KServe v2 gRPC front end: GRPCInferenceService (grpc.aio) over the generated protocol modules.

The generated modules register protobuf package ``inference``, as tritonclient's do: load this
module only in a process that does not also import ``tritonclient.grpc``.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import grpc
import numpy as np

from kiln.serve.core import ServerCore, log_access
from kiln.serve.errors import BadRequest, InternalError, ServeError
from kiln.serve.model import VERSION, ServedModel
from kiln.serve.protocol import InferRequest, array_from_bytes, array_from_values, finish
from kiln.serve.proto import grpc_predict_v2_pb2 as pb
from kiln.serve.proto import grpc_predict_v2_pb2_grpc as pb_grpc

log = logging.getLogger("kiln.serve")
# which InferTensorContents field carries each datatype (FP16 and BF16 travel as raw bytes only)
CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
            "FP64": "fp64_contents"}


def _param(p: Any) -> Any:
    return getattr(p, p.WhichOneof("parameter_choice")) if p.WhichOneof("parameter_choice") else None


def decode_grpc(model: ServedModel, request: Any) -> InferRequest:
    """A ModelInferRequest as a checked InferRequest (raw_input_contents or typed contents)."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; send one "
                         f"per input, in order.")
    arrays: dict[str, np.ndarray] = {}
    for i, t in enumerate(request.inputs):
        meta = model.input(t.name)
        if meta.name in arrays:
            raise BadRequest(f"Input {meta.name!r} is given twice; give each input once.")
        if t.datatype != meta.datatype:
            raise BadRequest(f"Input {meta.name!r} of model {model.name!r} is {meta.datatype}, got datatype "
                             f"{t.datatype!r}.")
        shape = model.check_shape(meta, list(t.shape))
        if raw:
            arrays[meta.name] = array_from_bytes(meta, shape, raw[i])
        elif meta.datatype in CONTENTS:
            arrays[meta.name] = array_from_values(meta, shape, list(getattr(t.contents, CONTENTS[meta.datatype])))
        else:
            raise BadRequest(f"Input {meta.name!r} is {meta.datatype}, which travels only in raw_input_contents.")
    params = {k: _param(v) for k, v in request.parameters.items()}
    timeout = params.get("timeout")
    if timeout is not None and (type(timeout) is not int or timeout <= 0):
        raise BadRequest(f"The timeout parameter is a positive whole number of microseconds, got {timeout!r}.")
    return finish(model, request.id or None, arrays, [o.name for o in request.outputs],
                  timeout / 1e6 if timeout else None)


def encode_grpc(req: InferRequest, results: dict[str, np.ndarray]) -> Any:
    response = pb.ModelInferResponse(model_name=req.model.name, model_version=VERSION, id=req.id or "")
    for meta in req.model.outputs:
        if meta.name in req.outputs:
            arr = np.ascontiguousarray(results[meta.name])
            response.outputs.add(name=meta.name, datatype=meta.datatype, shape=list(arr.shape))
            response.raw_output_contents.append(arr.tobytes())
    return response


class InferenceService(pb_grpc.GRPCInferenceServiceServicer):
    """The six calls of the protocol's GRPCInferenceService."""

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
            req, results = await self.core.infer(entry, "grpc", lambda model: decode_grpc(model, request),
                                                 context.time_remaining())
            response = encode_grpc(req, results)
        except ServeError as exc:
            await _abort(context, exc, "ModelInfer", request.model_name, t0)
        except Exception as exc:                # noqa: BLE001 - a bug: this request fails, the server stays up
            log.exception("gRPC ModelInfer failed")
            await _abort(context, InternalError(f"The server failed on this request ({type(exc).__name__}); "
                                                f"please report it."), "ModelInfer", request.model_name, t0)
        log_access(protocol="grpc", peer=context.peer(), call="ModelInfer", model=request.model_name, status="OK",
                   ms=round((time.perf_counter() - t0) * 1e3, 3), bytes_in=request.ByteSize(), error=None)
        return response


async def _abort(context: Any, exc: ServeError, call: str, model: str, t0: float) -> None:
    log_access(protocol="grpc", peer=context.peer(), call=call, model=model, status=exc.grpc_code,
               ms=round((time.perf_counter() - t0) * 1e3, 3) if t0 else None, error=str(exc))
    await context.abort(getattr(grpc.StatusCode, exc.grpc_code), str(exc))


def make_server(core: ServerCore, max_request_bytes: int) -> Any:
    """A grpc.aio server with the inference service added (ports are bound by the caller)."""
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_request_bytes),
                                      ("grpc.max_send_message_length", -1),
                                      ("grpc.so_reuseport", 0)])      # a port in use is refused, not shared
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceService(core), server)
    return server
