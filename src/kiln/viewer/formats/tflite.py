"""TensorFlow Lite: a FlatBuffer (``TFL3``) of subgraphs, tensors, operators and buffers.

Read with the small table reader in ``_flatbuffers`` using slot numbers from
the published ``schema.fbs``; constant tensors become lazy weights over the
file bytes, and quantization parameters are shown on tensors.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import ViewerError
from kiln.viewer.formats._common import GraphBuilder, file_bytes
from kiln.viewer.formats._flatbuffers import FlatBufferError, Table
from kiln.viewer.formats._tflite_sparse import Level, Sparsity, densify
from kiln.viewer.graph import ViewModel

_FMT = "TensorFlow Lite"

_OPS = """ADD AVERAGE_POOL_2D CONCATENATION CONV_2D DEPTHWISE_CONV_2D DEPTH_TO_SPACE DEQUANTIZE EMBEDDING_LOOKUP
FLOOR FULLY_CONNECTED HASHTABLE_LOOKUP L2_NORMALIZATION L2_POOL_2D LOCAL_RESPONSE_NORMALIZATION LOGISTIC
LSH_PROJECTION LSTM MAX_POOL_2D MUL RELU RELU_N1_TO_1 RELU6 RESHAPE RESIZE_BILINEAR RNN SOFTMAX SPACE_TO_DEPTH SVDF
TANH CONCAT_EMBEDDINGS SKIP_GRAM CALL CUSTOM EMBEDDING_LOOKUP_SPARSE PAD UNIDIRECTIONAL_SEQUENCE_RNN GATHER
BATCH_TO_SPACE_ND SPACE_TO_BATCH_ND TRANSPOSE MEAN SUB DIV SQUEEZE UNIDIRECTIONAL_SEQUENCE_LSTM STRIDED_SLICE
BIDIRECTIONAL_SEQUENCE_RNN EXP TOPK_V2 SPLIT LOG_SOFTMAX DELEGATE BIDIRECTIONAL_SEQUENCE_LSTM CAST PRELU MAXIMUM
ARG_MAX MINIMUM LESS NEG PADV2 GREATER GREATER_EQUAL LESS_EQUAL SELECT SLICE SIN TRANSPOSE_CONV SPARSE_TO_DENSE
TILE EXPAND_DIMS EQUAL NOT_EQUAL LOG SUM SQRT RSQRT SHAPE POW ARG_MIN FAKE_QUANT REDUCE_PROD REDUCE_MAX PACK
LOGICAL_OR ONE_HOT LOGICAL_AND LOGICAL_NOT UNPACK REDUCE_MIN FLOOR_DIV REDUCE_ANY SQUARE ZEROS_LIKE FILL
FLOOR_MOD RANGE RESIZE_NEAREST_NEIGHBOR LEAKY_RELU SQUARED_DIFFERENCE MIRROR_PAD ABS SPLIT_V UNIQUE CEIL
REVERSE_V2 ADD_N GATHER_ND COS WHERE RANK ELU REVERSE_SEQUENCE MATRIX_DIAG QUANTIZE MATRIX_SET_DIAG ROUND
HARD_SWISH IF WHILE NON_MAX_SUPPRESSION_V4 NON_MAX_SUPPRESSION_V5 SCATTER_ND SELECT_V2 DENSIFY SEGMENT_SUM
BATCH_MATMUL PLACEHOLDER_FOR_GREATER_OP_CODES CUMSUM CALL_ONCE BROADCAST_TO RFFT2D CONV_3D IMAG REAL COMPLEX_ABS
HASHTABLE HASHTABLE_FIND HASHTABLE_IMPORT HASHTABLE_SIZE REDUCE_ALL CONV_3D_TRANSPOSE VAR_HANDLE READ_VARIABLE
ASSIGN_VARIABLE BROADCAST_ARGS RANDOM_STANDARD_NORMAL BUCKETIZE RANDOM_UNIFORM MULTINOMIAL GELU
DYNAMIC_UPDATE_SLICE RELU_0_TO_1 UNSORTED_SEGMENT_PROD UNSORTED_SEGMENT_MAX UNSORTED_SEGMENT_SUM ATAN2
UNSORTED_SEGMENT_MIN SIGN BITCAST BITWISE_XOR RIGHT_SHIFT""".split()
_TYPES = ["float32", "float16", "int32", "uint8", "int64", "string", "bool", "int16", "complex64", "int8",
          "float64", "complex128", "uint64", "resource", "variant", "uint32", "uint16", "int4", "bfloat16"]
_NUMPY = {"float32": "<f4", "float16": "<f2", "int32": "<i4", "uint8": "u1", "int64": "<i8", "bool": "?",
          "int16": "<i2", "complex64": "<c8", "int8": "i1", "float64": "<f8", "complex128": "<c16",
          "uint64": "<u8", "uint32": "<u4", "uint16": "<u2", "bfloat16": "<u2"}
_PADDING = ["SAME", "VALID"]
_ACTIVATION = ["NONE", "RELU", "RELU_N1_TO_1", "RELU6", "TANH", "SIGN_BIT"]
# BuiltinOptions union members we decode: type id -> field list in slot order (name, kind).
_PAD, _ACT, _TYPE = "padding", "activation", "tensor_type"
_OPTIONS: dict[int, list[tuple[str, str]]] = {
    1: [("padding", _PAD), ("stride_w", "i"), ("stride_h", "i"), ("fused_activation_function", _ACT),
        ("dilation_w_factor", "i"), ("dilation_h_factor", "i")],
    2: [("padding", _PAD), ("stride_w", "i"), ("stride_h", "i"), ("depth_multiplier", "i"),
        ("fused_activation_function", _ACT), ("dilation_w_factor", "i"), ("dilation_h_factor", "i")],
    5: [("padding", _PAD), ("stride_w", "i"), ("stride_h", "i"), ("filter_width", "i"), ("filter_height", "i"),
        ("fused_activation_function", _ACT)],
    8: [("fused_activation_function", _ACT), ("weights_format", "b"), ("keep_num_dims", "?"),
        ("asymmetric_quantize_inputs", "?")],
    9: [("beta", "f")], 10: [("axis", "i"), ("fused_activation_function", _ACT)],
    11: [("fused_activation_function", _ACT)], 17: [("new_shape", "[i]")], 21: [("fused_activation_function", _ACT)],
    23: [("axis", "i"), ("batch_dims", "i")], 27: [("keep_dims", "?")], 28: [("fused_activation_function", _ACT)],
    29: [("fused_activation_function", _ACT)], 30: [("squeeze_dims", "[i]")],
    35: [("num_splits", "i")], 53: [("values_count", "i"), ("axis", "i")],
}
# Argument names for common ops' inputs, so weights read "filter"/"bias" rather than input1/input2.
_ARGS = {"CONV_2D": ["input", "filter", "bias"], "DEPTHWISE_CONV_2D": ["input", "filter", "bias"],
         "FULLY_CONNECTED": ["input", "weights", "bias"], "TRANSPOSE_CONV": ["output_shape", "weights", "input", "bias"],
         "CONV_3D": ["input", "filter", "bias"], "RESHAPE": ["data", "shape"], "PRELU": ["input", "alpha"]}


def sniff(path: Path, head: bytes) -> bool:
    return len(head) >= 8 and head[4:8] == b"TFL3"


def _options(op: Table) -> dict[str, Any]:
    kind = op.scalar(3, "<B", 0)
    spec = _OPTIONS.get(kind)
    table = op.table(4) if spec else None
    if table is None:
        return {}
    out: dict[str, Any] = {}
    for slot, (name, k) in enumerate(spec):
        if not table.has(slot) and k not in ("i", _PAD, _ACT):
            continue
        if k == _PAD:
            v = table.scalar(slot, "<b", 0)
            out[name] = _PADDING[v] if 0 <= v < 2 else v
        elif k == _ACT:
            v = table.scalar(slot, "<b", 0)
            out[name] = _ACTIVATION[v] if 0 <= v < len(_ACTIVATION) else v
        elif k == "[i]":
            out[name] = table.vector(slot, "<i4").tolist()
        else:
            fmt = {"i": "<i", "f": "<f", "b": "<b", "?": "<?"}[k]
            default = 1 if name.startswith("dilation") else 0
            out[name] = table.scalar(slot, fmt, default)
    return out


def read(path: Path, handle: Any = None) -> ViewModel:
    buf = file_bytes(path)
    try:
        return _read(path, buf)
    except FlatBufferError as exc:
        raise ViewerError(f"{path.name!r} is not a readable {_FMT} file: {exc}; it is truncated or damaged.") from None
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        raise ViewerError(f"{path.name!r} is not a readable {_FMT} file: {exc}.") from None


def _read(path: Path, buf: Any) -> ViewModel:
    model = Table.root(buf)
    version = model.scalar(0, "<I", 0)
    codes = []
    for oc in model.tables(1):
        code = max(oc.scalar(0, "<b", 0), oc.scalar(3, "<i", 0))
        custom = oc.string(1)
        name = custom if code == 32 and custom else (_OPS[code] if 0 <= code < len(_OPS) else f"BUILTIN_{code}")
        codes.append((name, code == 32, oc.scalar(2, "<i", 1)))
    buffers = model.tables(4)
    graphs = []
    for si, sg in enumerate(model.tables(2)):
        graphs.append(_subgraph(path, buf, sg, si, codes, buffers))
    if not graphs:
        raise ViewerError(f"{path.name!r} is not a readable {_FMT} file: it has no subgraphs.")
    props: dict[str, Any] = {"subgraphs": len(graphs)}
    for md in model.tables(6):
        key = md.string(0) or ""
        bi = md.scalar(1, "<I", 0)
        if bi < len(buffers):
            start, n = buffers[bi].bytes_view(0)
            if n and n <= 256:
                text = bytes(buf[start:start + n]).split(b"\0")[0]
                props[key] = text.decode("utf-8", "replace") if text.isascii() else f"{n} bytes"
    sigs = {}
    for sd in model.tables(7):
        sigs[sd.string(2) or "serving_default"] = {
            "inputs": [m.string(0) for m in sd.tables(0)], "outputs": [m.string(0) for m in sd.tables(1)]}
    if sigs:
        props["signatures"] = sigs
    return ViewModel(format=_FMT, path=str(path), producer=model.string(3), version=f"schema v{version}",
                     properties=props, graphs=graphs, file_size=len(buf))


def _subgraph(path: Path, buf: Any, sg: Table, si: int, codes: list, buffers: list[Table]) -> Any:
    b = GraphBuilder(sg.string(4) or ("main" if si == 0 else f"subgraph {si}"))
    names: list[str] = []
    seen: set[str] = set()
    for ti, t in enumerate(sg.tables(0)):
        name = t.string(3) or f"tensor_{ti}"
        if name in seen:
            name = f"{name}:{ti}"
        seen.add(name)
        names.append(name)
        tcode = t.scalar(1, "<b", 0)
        dtype = _TYPES[tcode] if 0 <= tcode < len(_TYPES) else f"type{tcode}"
        shape = t.vector(0, "<i4").tolist()
        sig = t.vector(7, "<i4").tolist()
        if sig and len(sig) == len(shape):
            shape = [d if s >= 0 else None for d, s in zip(shape, sig)]
        q = t.table(4)
        quant: dict[str, Any] = {}
        if q is not None:
            for slot, key, dt in ((0, "min", "<f4"), (1, "max", "<f4"), (2, "scale", "<f4"), (3, "zero_point", "<i8")):
                v = q.vector(slot, dt)
                if v.size:
                    quant[key] = v[:64].tolist()
            if quant and q.has(6):
                quant["quantized_dimension"] = q.scalar(6, "<i", 0)
        bi = t.scalar(2, "<I", 0)
        if 0 < bi < len(buffers):
            start, n = buffers[bi].bytes_view(0)
            off, size = buffers[bi].scalar(1, "<Q", 0), buffers[bi].scalar(2, "<Q", 0)
            if not n and off > 1 and size:   # large models keep data after the FlatBuffer
                if off + size > len(buf):
                    raise FlatBufferError(f"buffer {bi} lies past the end of the file")
                start, n = off, size
            if n:
                npdt = _NUMPY.get(dtype)
                load = _view_loader(buf, start, n, npdt, shape, dtype, _sparsity(t.table(6)))
                b.weight(name, [d if isinstance(d, int) else 0 for d in shape], dtype, load, n)
        b.tensor(name, shape, dtype, quantization=quant or None)
    for oi, op in enumerate(sg.tables(3)):
        ci = op.scalar(0, "<I", 0)
        if ci >= len(codes):
            raise FlatBufferError(f"operator {oi} uses operator code {ci} of {len(codes)}")
        op_type, custom, version = codes[ci]
        ins = [int(i) for i in op.vector(1, "<i4")]
        outs = [int(i) for i in op.vector(2, "<i4")]
        for i in ins + outs:
            if i >= len(names):
                raise FlatBufferError(f"operator {oi} refers to tensor {i} of {len(names)}")
        argn = _ARGS.get(op_type, [])
        inputs = [(argn[k] if k < len(argn) else ("input" if k == 0 else f"input{k}"), [names[i]])
                  for k, i in enumerate(ins) if i >= 0]
        outputs = [("output" if k == 0 else f"output{k}", [names[i]]) for k, i in enumerate(outs) if i >= 0]
        attrs = _options(op)
        if custom:
            _, n = op.bytes_view(5)
            if n:
                attrs["custom_options"] = f"{n} bytes"
        if version > 1:
            attrs["version"] = version
        b.node(names[outs[0]] if outs and outs[0] >= 0 else f"{op_type}_{oi}", op_type, inputs, outputs, attrs,
               category_="custom" if custom else None)
    g_in = [names[i] for i in sg.vector(1, "<i4") if 0 <= i < len(names)]
    g_out = [names[i] for i in sg.vector(2, "<i4") if 0 <= i < len(names)]
    return b.finish(g_in, g_out)


_INDEX_VECTORS = {1: "<i4", 2: "<u2", 3: "u1"}      # SparseIndexVector: Int32Vector, Uint16Vector, Uint8Vector


def _sparsity(sp: Table | None) -> Sparsity | None:
    """A tensor's SparsityParameters (traversal order, block map, one DimensionMetadata per level), or None."""
    if sp is None:
        return None
    levels = []
    for dm in sp.tables(2):
        vectors = []
        for type_slot in (2, 4):                     # array_segments, array_indices: (union type, table) slots
            kind, table = dm.scalar(type_slot, "<B", 0), dm.table(type_slot + 1)
            vectors.append(table.vector(0, _INDEX_VECTORS[kind]) if kind in _INDEX_VECTORS and table is not None
                           else np.zeros(0, np.int32))
        levels.append(Level(dm.scalar(0, "<b", 0) == 1, dm.scalar(1, "<i", 0), *vectors))
    return Sparsity(sp.vector(0, "<i4").tolist(), sp.vector(1, "<i4").tolist(), levels)


def _view_loader(buf: Any, start: int, n: int, npdt: str | None, shape: list, dtype: str,
                 sparsity: Sparsity | None = None):
    def load() -> np.ndarray:
        data = bytes(buf[start:start + n])
        if npdt is None:
            return np.frombuffer(data, dtype=np.uint8)
        arr = np.frombuffer(data, dtype=npdt)
        if dtype == "bfloat16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        if sparsity is not None and all(isinstance(d, int) for d in shape):
            try:
                return densify(arr, shape, sparsity)
            except ValueError as exc:
                raise ViewerError(f"sparse tensor of shape {shape} cannot be expanded: {exc}; the file is "
                                  "damaged.") from None
        count = int(np.prod(shape)) if all(isinstance(d, int) for d in shape) else -1      # [] -> a scalar
        return arr.reshape(shape) if count == arr.size else arr
    return load
