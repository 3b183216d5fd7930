"""KServe v2 request and response bodies: JSON tensors and the binary tensor extension.

A tensor arrives as JSON values (``data``), as raw little-endian bytes (the binary extension's
``binary_data_size`` over HTTP, ``raw_input_contents`` over gRPC), as typed gRPC contents, or in a
registered system shared-memory region (``shared_memory_region``; read when its batch is formed).
Each is checked against the model's input (name, datatype, rank, fixed dims, element count)
before any array is made; a request whose check fails never reaches a batch.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kiln.serve.errors import BadRequest
from kiln.serve.model import ServedModel, TensorMeta
from kiln.serve.shm import OutputSlot, ShmRegistry, ShmTensor, shm_input, shm_output

HEADER_LENGTH = "Inference-Header-Content-Length"
KINDS = {"BOOL": "b", "FP16": "biuf", "BF16": "biuf", "FP32": "biuf", "FP64": "biuf"}   # JSON kinds taken


@dataclass
class InferRequest:
    """A decoded, checked request: arrays in the model's input order, requested outputs."""

    model: ServedModel
    id: str | None
    arrays: dict[str, np.ndarray | ShmTensor]
    outputs: list[str]
    binary: set[str] = field(default_factory=set)      # outputs to answer as binary (HTTP)
    timeout_s: float | None = None                     # what the request asked for, if anything
    rows: int = 0
    key: tuple = ()
    shm_outputs: dict[str, OutputSlot] = field(default_factory=dict)   # outputs written into shared memory

    def write_shm_outputs(self, results: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
        """Writes the outputs placed in shared memory; returns each one's parameters for the response."""
        return {n: slot.write(n, np.asarray(results[n])) for n, slot in self.shm_outputs.items()}


def wire_dtype(meta: TensorMeta) -> np.dtype:
    """The input's dtype as the protocol carries it: little-endian."""
    return meta.wire_dtype


def array_from_bytes(meta: TensorMeta, shape: tuple[int, ...], raw: bytes | memoryview) -> np.ndarray:
    """The tensor held by ``raw`` (row-major, little-endian), whose length must match the shape."""
    dt = wire_dtype(meta)
    want = math.prod(shape) * dt.itemsize
    if len(raw) != want:
        raise BadRequest(f"Input {meta.name!r} ({meta.datatype} {list(shape)}) needs {want} bytes of data, got "
                         f"{len(raw)}; send the whole tensor, row-major.")
    return np.frombuffer(raw, dtype=dt).reshape(shape)


def array_from_values(meta: TensorMeta, shape: tuple[int, ...], values: Any) -> np.ndarray:
    """The tensor held by JSON or gRPC typed values (flat or nested, row-major)."""
    try:
        arr = np.asarray(values)
    except (ValueError, TypeError, OverflowError):
        raise BadRequest(f"Input {meta.name!r} data is not a regular array of numbers; send a flat list of "
                         f"{math.prod(shape)} values.") from None
    kinds = KINDS.get(meta.datatype, "biu")
    if arr.size and arr.dtype.kind not in kinds:
        what = {"b": "true/false values", "biu": "whole numbers"}.get(kinds, "numbers")
        raise BadRequest(f"Input {meta.name!r} is {meta.datatype} and takes {what}, got {arr.dtype.name} values.")
    if arr.size != math.prod(shape):
        raise BadRequest(f"Input {meta.name!r} has {arr.size} values for shape {list(shape)} "
                         f"({math.prod(shape)} values); send one value per element.")
    target = meta.np_dtype
    if kinds == "biu" and arr.size and arr.dtype.kind in "iu":
        info = np.iinfo(target)
        if arr.min() < info.min or arr.max() > info.max:
            raise BadRequest(f"Input {meta.name!r} is {meta.datatype}; a value is outside "
                             f"[{info.min}, {info.max}].")
    try:
        return arr.astype(target).reshape(shape)
    except (ValueError, TypeError, OverflowError):
        raise BadRequest(f"Input {meta.name!r} data cannot be read as {meta.datatype}.") from None


def _params(entry: dict[str, Any], where: str) -> dict[str, Any]:
    params = entry.get("parameters", {})
    if not isinstance(params, dict):
        raise BadRequest(f"The parameters of {where} are a JSON object, got {type(params).__name__}.")
    return params


def timeout_param(params: dict[str, Any]) -> float | None:
    """The request's ``timeout`` parameter (microseconds, as tritonclient sends it) in seconds."""
    t = params.get("timeout")
    if t is None:
        return None
    if type(t) is not int or t <= 0:
        raise BadRequest(f"The timeout parameter is a positive whole number of microseconds, got {t!r}.")
    return t / 1e6


def finish(model: ServedModel, req_id: Any, arrays: dict[str, np.ndarray | ShmTensor], outputs: list[Any],
           timeout_s: float | None, binary: set[str] | None = None,
           shm_outputs: dict[str, OutputSlot] | None = None) -> InferRequest:
    """Checks the whole request against the model and returns it ready for the batcher."""
    if req_id is not None and not isinstance(req_id, str):
        raise BadRequest(f"The request id is a string, got {type(req_id).__name__}.")
    out = model.check_outputs(outputs)
    rows, key = model.check_request(arrays)
    arrays = {t.name: arrays[t.name] for t in model.inputs}
    return InferRequest(model, req_id, arrays, out, binary or set(), timeout_s, rows, key, shm_outputs or {})


# ---- HTTP/REST ----------------------------------------------------------------------------------
def parse_json(text: bytes | memoryview) -> dict[str, Any]:
    try:
        obj = json.loads(bytes(text))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BadRequest(f"The request body is not valid JSON ({str(exc).splitlines()[0][:200]}); send a JSON "
                         f"object, with {HEADER_LENGTH} if binary tensors follow it.") from None
    if not isinstance(obj, dict):
        raise BadRequest(f"The request body is a JSON {type(obj).__name__}; send a JSON object.")
    return obj


def decode_http(model: ServedModel, body: bytes, header_length: str | None, shm: ShmRegistry | None = None,
                peer: str | None = None) -> InferRequest:
    """A v2 infer request body: JSON, then (binary extension) the binary tensors in input order; tensors
    in shared memory name a region of ``shm`` (refused without one)."""
    if header_length is None:
        head, rest = body, memoryview(b"")
    else:
        try:
            n = int(header_length)
        except ValueError:
            n = -1
        if not 0 <= n <= len(body):
            raise BadRequest(f"{HEADER_LENGTH} is {header_length!r}, but the body has {len(body)} bytes; give "
                             f"the length of the JSON part.")
        head, rest = memoryview(body)[:n], memoryview(body)[n:]
    obj = parse_json(head)
    inputs = obj.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("The request has no \"inputs\" list; send each input as {\"name\", \"shape\", "
                         "\"datatype\", \"data\"}.")
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for entry in inputs:
        if not isinstance(entry, dict):
            raise BadRequest("Each entry of \"inputs\" is a JSON object with name, shape, datatype and data.")
        meta = model.input(entry.get("name"))
        if meta.name in arrays:
            raise BadRequest(f"Input {meta.name!r} is given twice; give each input once.")
        if entry.get("datatype") != meta.datatype:
            raise BadRequest(f"Input {meta.name!r} of model {model.name!r} is {meta.datatype}, got datatype "
                             f"{entry.get('datatype')!r}.")
        shape = model.check_shape(meta, entry.get("shape"))
        params = _params(entry, f"input {meta.name!r}")
        size = params.get("binary_data_size")
        in_shm = shm_input(shm, peer, params, f"Input {meta.name!r}", shape, wire_dtype(meta))
        if in_shm is not None:
            if size is not None or "data" in entry:
                raise BadRequest(f"Input {meta.name!r} is in shared memory and also carries data; send it one way.")
            arrays[meta.name] = in_shm
        elif size is not None:
            if type(size) is not int or size < 0:
                raise BadRequest(f"binary_data_size of input {meta.name!r} is a byte count, got {size!r}.")
            if offset + size > len(rest):
                raise BadRequest(f"The binary data is truncated: input {meta.name!r} declares {size} bytes, "
                                 f"{len(rest) - offset} remain; send every declared byte.")
            arrays[meta.name] = array_from_bytes(meta, shape, rest[offset:offset + size])
            offset += size
        elif "data" in entry:
            arrays[meta.name] = array_from_values(meta, shape, entry["data"])
        else:
            raise BadRequest(f"Input {meta.name!r} has neither \"data\" nor a binary_data_size parameter.")
    if offset != len(rest):
        raise BadRequest(f"The body has {len(rest) - offset} bytes after the declared binary tensors; "
                         f"declare each with binary_data_size.")
    params = _params(obj, "the request")
    all_binary = params.get("binary_data_output") is True
    outputs, binary, slots = [], set(), {}
    requested = obj.get("outputs", [])
    if not isinstance(requested, list):
        raise BadRequest("\"outputs\" is a list of {\"name\": ...} objects.")
    for entry in requested:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise BadRequest("Each entry of \"outputs\" is a JSON object with a \"name\".")
        p = _params(entry, f"output {entry['name']!r}")
        if p.get("classification"):
            raise BadRequest("The classification extension is not supported; request the output tensor itself.")
        outputs.append(entry["name"])
        slot = shm_output(shm, peer, p, f"Output {entry['name']!r}")
        if slot is not None:
            slots[entry["name"]] = slot
        elif p.get("binary_data", all_binary) is True:
            binary.add(entry["name"])
    req = finish(model, obj.get("id"), arrays, outputs, timeout_param(params), binary, slots)
    if all_binary and not requested:
        req.binary = set(req.outputs)
    return req


def encode_http(req: InferRequest, results: dict[str, np.ndarray]) -> tuple[bytes, int | None]:
    """The response body and, when binary tensors follow the JSON, the JSON part's length."""
    out_json, chunks = [], []
    in_shm = req.write_shm_outputs(results)
    for meta in req.model.outputs:
        if meta.name not in req.outputs:
            continue
        arr = np.asarray(results[meta.name])
        entry: dict[str, Any] = {"name": meta.name, "datatype": meta.datatype, "shape": list(arr.shape)}
        if meta.name in in_shm:
            entry["parameters"] = in_shm[meta.name]
        elif meta.name in req.binary:
            raw = np.ascontiguousarray(arr).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = (arr.astype(np.float32) if meta.datatype == "BF16" else arr).reshape(-1).tolist()
        out_json.append(entry)
    body: dict[str, Any] = {"model_name": req.model.name, "model_version": "1", "outputs": out_json}
    if req.id:
        body["id"] = req.id
    head = json.dumps(body, separators=(",", ":")).encode()
    if not chunks:
        return head, None
    return b"".join([head, *chunks]), len(head)
