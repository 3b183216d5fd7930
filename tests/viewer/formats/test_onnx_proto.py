"""The ONNX reader's own protobuf decoding, checked against the onnx package (its descriptors, numpy_helper,
its parse of real files); and that reading a binary model first imports neither onnx nor torch."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.viewer.formats import _onnx_proto as P
from kiln.viewer.formats import _protobuf as pb
from kiln.viewer.formats import onnx as reader

from .test_real_files import real

_KINDS = {"text": "string", "bytes": "bytes", "int": ("int64", "int32", "uint64", "int32"), "enum": "enum",
          "float": "float", "raw:float": "float", "raw:double": "double", "raw:int": ("int32", "int64"),
          "raw:uint": "uint64"}
# Our message names -> onnx classes (TypeProto.Tensor and .Sequence also read SparseTensor and Optional)
_CLASSES = {"TypeProto.Tensor": ["Tensor", "SparseTensor"], "TypeProto.Sequence": ["Sequence", "Optional"]}


def _descriptors(name: str) -> list:
    if name in _CLASSES:
        return [getattr(onnx.TypeProto, c).DESCRIPTOR for c in _CLASSES[name]]
    obj = onnx
    for part in name.split("."):
        obj = getattr(obj, part)
    return [obj.DESCRIPTOR]


@pytest.mark.parametrize("message", sorted(P.MESSAGES))
def test_field_numbers_names_and_types_are_onnx_protos(message):
    for desc in _descriptors(message):
        for number, (name, kind) in P.MESSAGES[message].items():
            field = desc.fields_by_number[number]
            assert field.name == name, (message, number)
            if kind in P.MESSAGES:
                assert field.message_type is not None
                assert kind.split(".")[-1] in (field.message_type.name, "Tensor", "Sequence"), (message, name)
            else:
                want = _KINDS[kind]
                typename = {v: k for k, v in vars(type(field)).items() if k.startswith("TYPE_")}[field.type]
                assert typename[5:].lower() in ((want,) if isinstance(want, str) else want), (message, name)


def test_dtype_names_and_item_sizes_are_onnx_ones():
    for name, code in TensorProto.DataType.items():
        if code == 0:
            continue
        assert P.dtype_name(code) == name.lower()
        assert P.itemsize(code) == np.dtype(helper.tensor_dtype_to_np_dtype(code)).itemsize, name
    assert P.dtype_name(0) == "undefined" and P.dtype_name(999) == "type 999"


def _same(ours: np.ndarray, ref: np.ndarray) -> None:
    if ref.dtype.kind not in "biufcOU":
        ref = ref.astype(np.float32)          # ml_dtypes (bfloat16, float8, float4, int4 ...) widen exactly
    if ref.dtype.kind == "U":
        ref = ref.astype(object)
    assert ours.shape == ref.shape
    if ref.dtype.kind in "iu" and ours.dtype.kind in "iu":
        assert np.array_equal(ours.astype(np.int64), ref.astype(np.int64))
    else:
        np.testing.assert_array_equal(ours, ref)


def _ours(t: TensorProto) -> np.ndarray:
    return P.to_array(pb.decode(t.SerializeToString(), "TensorProto", P.MESSAGES))


_NATIVE = [TensorProto.FLOAT, TensorProto.UINT8, TensorProto.INT8, TensorProto.UINT16, TensorProto.INT16,
           TensorProto.INT32, TensorProto.INT64, TensorProto.BOOL, TensorProto.FLOAT16, TensorProto.DOUBLE,
           TensorProto.UINT32, TensorProto.UINT64, TensorProto.COMPLEX64, TensorProto.COMPLEX128]


@pytest.mark.parametrize("raw", [False, True])
@pytest.mark.parametrize("code", _NATIVE)
def test_native_tensors_match_numpy_helper(code, raw):
    dtype = helper.tensor_dtype_to_np_dtype(code)
    rng = np.random.default_rng(code)
    values = rng.integers(0, 100, size=(2, 3, 4)).astype(dtype)
    if dtype.kind in "ifc":
        values = (rng.standard_normal((2, 3, 4)) * 1e3).astype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        values.flat[:2] = [info.min, info.max]                 # extremes: sign extension, uint64 above 2**63
    t = numpy_helper.from_array(values, "w")
    if not raw:
        t = helper.make_tensor("w", code, values.shape, values.reshape(-1).tolist() if code != TensorProto.FLOAT16
                               else values.reshape(-1), raw=False)
    assert t.HasField("raw_data") == raw
    _same(_ours(t), numpy_helper.to_array(t))


_CODES = {TensorProto.BFLOAT16: 65536, TensorProto.FLOAT8E4M3FN: 256, TensorProto.FLOAT8E4M3FNUZ: 256,
          TensorProto.FLOAT8E5M2: 256, TensorProto.FLOAT8E5M2FNUZ: 256, TensorProto.FLOAT8E8M0: 256}
_PACKED = [TensorProto.UINT4, TensorProto.INT4, TensorProto.FLOAT4E2M1, TensorProto.UINT2, TensorProto.INT2]


@pytest.mark.parametrize("code", list(_CODES) + _PACKED)
def test_every_code_of_the_narrow_types_matches_numpy_helper(code):
    """Every bit pattern, stored in raw_data and in int32_data, decodes as onnx (ml_dtypes) decodes it."""
    if code in _CODES:
        n = _CODES[code]
        bits = np.arange(n, dtype=np.uint16 if n > 256 else np.uint8)
        raw = helper.make_tensor("w", code, [n], bits.tobytes(), raw=True)
        typed = TensorProto(name="w", data_type=code, dims=[n])
        typed.int32_data.extend(bits.tolist())
    else:
        per = 2 if code in (TensorProto.UINT4, TensorProto.INT4, TensorProto.FLOAT4E2M1) else 4
        n = 256 * per - 1                                       # odd count: the last byte is half used
        raw = helper.make_tensor("w", code, [n], bytes(range(256)), raw=True)
        typed = TensorProto(name="w", data_type=code, dims=[n])
        typed.int32_data.extend(range(256))
    for t in (raw, typed):
        ours, ref = _ours(t), numpy_helper.to_array(t)
        assert ours.dtype.kind in "iuf" and ours.size == n
        _same(ours, ref)


def test_strings_segments_and_short_data():
    t = helper.make_tensor("s", TensorProto.STRING, [2], [b"ab", b"\xff"])
    assert _ours(t).tolist() == ["ab", "\\xff"]                 # invalid UTF-8 stays visible
    seg = numpy_helper.from_array(np.ones(4, np.float32), "w")
    seg.segment.begin, seg.segment.end = 0, 2
    with pytest.raises(reader.ViewerError, match="segments"):
        _ours(seg)
    short = numpy_helper.from_array(np.ones(4, np.float32), "w")
    short.raw_data = short.raw_data[:8]
    with pytest.raises(reader.ViewerError, match="holds 2 values but its shape \\[4\\] needs 4"):
        _ours(short)


def _onnx_nodes(graph):
    for n in graph.node:
        yield n
        for a in n.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                yield from _onnx_nodes(g)


def _view_nodes(graph):
    for n in graph.nodes:
        if "function" in n.subgraphs:
            continue
        yield n
        for sub in n.subgraphs.values():
            yield from _view_nodes(sub)


def _reference_value(attr):
    value = helper.get_attribute_value(attr)
    if attr.type == onnx.AttributeProto.TENSOR:
        return numpy_helper.to_array(value)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, list):
        return [v.decode() if isinstance(v, bytes) else v for v in value]
    return value


def _compare_with_onnx(path) -> int:
    ref = onnx.load(str(path), load_external_data=False)
    vm = reader.read(path)
    ours, theirs = list(_view_nodes(vm.graph)), list(_onnx_nodes(ref.graph))
    assert [(n.name, n.op_type, n.properties.get("domain", "")) for n in ours] == \
        [(n.name, n.op_type, n.domain) for n in theirs]
    for mine, node in zip(ours, theirs):
        assert [v for a in mine.outputs for v in a.values] == [v for v in node.output if v]
        for attr in node.attribute:
            if attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
                assert attr.name in mine.attributes
                continue
            got, want = mine.attributes[attr.name], _reference_value(attr)
            if isinstance(want, np.ndarray):
                assert got["shape"] == list(want.shape)
                np.testing.assert_array_equal(np.asarray(got["value"]).reshape(-1), want.reshape(-1)[:16])
            elif attr.name == "to":
                assert got == helper.tensor_dtype_to_string(want).split(".")[1].lower()
            else:
                assert got == want, (node.name, attr.name)
    for t in ref.graph.initializer:
        w = vm.graph.weights[t.name]
        assert (w.dtype, w.shape) == (helper.tensor_dtype_to_string(t.data_type).split(".")[1].lower(), list(t.dims))
        if t.data_location != TensorProto.EXTERNAL:
            _same(np.asarray(w.load()), numpy_helper.to_array(t))
    return len(ours)


def test_real_onnx_files_read_as_onnx_reads_them():
    count = 0
    for source, name in (("basic-pitch", "nmp.onnx"), ("silero-vad", "silero_vad.onnx"),
                         ("openwakeword", "embedding_model.onnx")):
        count += _compare_with_onnx(real(source, name))
    assert count > 300


def _corpus_lib():
    """tests/corpus/corpus_lib.py (the model corpus: its manifest and where it is fetched to)."""
    import importlib.util
    from pathlib import Path
    file = Path(__file__).resolve().parents[2] / "corpus" / "corpus_lib.py"
    spec = importlib.util.spec_from_file_location("kiln_tests_corpus_lib", file)
    module = sys.modules.get(spec.name)
    if module is None:                   # registered before it runs: its dataclasses look themselves up there
        module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module


def test_corpus_models_read_as_onnx_reads_them():
    """Every ONNX model of the test corpus that is fetched (python scripts/fetch_corpus.py)."""
    lib = _corpus_lib()
    root = lib.corpus_dir()
    paths = [p for m in lib.load_manifest().models if (p := lib.model_path(root, m)).is_file()]
    if not paths:
        pytest.skip(f"the model corpus is not in {root}; fetch it with: python scripts/fetch_corpus.py")
    assert sum(_compare_with_onnx(p) for p in paths) > 0


def test_sample_models_read_as_onnx_reads_them(yolo_path, control_flow_path):
    assert _compare_with_onnx(yolo_path) == 215
    assert _compare_with_onnx(control_flow_path) > 4           # If and Loop bodies included


_FIRST = """
import json, sys
from kiln.viewer.formats import open_model_first
vm, complete = open_model_first(sys.argv[1])
heavy = sorted(m for m in ("onnx", "torch", "ml_dtypes") if m in sys.modules)
g = vm.graph
print(json.dumps({"heavy": heavy, "inputs": [t.shape for t in g.inputs], "outputs": [t.shape for t in g.outputs],
                  "conv_out": g.tensors[g.nodes[0].outputs[0].values[0]].shape, "docs": sum(bool(n.doc) for n in g.nodes),
                  "complete": complete is not None, "args": [a.name for a in g.nodes[0].inputs]}))
"""


def test_first_read_imports_neither_onnx_nor_torch_and_completes_to_the_full_read(yolo_path):
    out = subprocess.run([sys.executable, "-c", _FIRST, str(yolo_path)], capture_output=True, text=True, check=True)
    first = json.loads(out.stdout)
    assert first["heavy"] == [] and first["complete"]
    assert first["inputs"] == [[1, 3, 640, 640]] and first["outputs"] == [[1, 25200, 85]]   # stated in the file
    assert first["conv_out"] is None and first["docs"] == 0                               # inferred later
    assert first["args"] == ["input 0", "input 1", "input 2"]
    vm, complete = reader.read_first(yolo_path)
    done, full = complete(), reader.read(yolo_path)
    assert done.warnings == [] and [a.name for a in done.graph.nodes[0].inputs] == ["X", "W", "B"]
    assert {k: (t.shape, t.dtype) for k, t in done.graph.tensors.items()} == \
        {k: (t.shape, t.dtype) for k, t in full.graph.tensors.items()}
    assert done.graph.tensors[done.graph.nodes[0].outputs[0].values[0]].shape == [1, 16, 320, 320]
    assert [n.doc for n in done.graph.nodes] == [n.doc for n in full.graph.nodes]


def test_completion_that_fails_leaves_the_first_read_with_one_warning(yolo_path, monkeypatch):
    vm, complete = reader.read_first(yolo_path)

    def child(*args, **kw):
        return subprocess.CompletedProcess(args, 1, b"", b"Traceback ...\nModuleNotFoundError: No module named 'onnx'\n")
    monkeypatch.setattr(subprocess, "run", child)
    done = complete()
    assert len(done.graph.nodes) == len(vm.graph.nodes)
    assert done.warnings == ["Shapes of intermediate values and operator documentation are not shown: the onnx "
                             "package is not installed (pip install onnx)."]


def test_in_process_completion_that_fails_is_a_warning_too(yolo_path, monkeypatch):
    def refuse(data):
        raise ValueError("no")
    monkeypatch.setattr(onnx.ModelProto, "FromString", staticmethod(refuse))
    vm = reader.read(yolo_path)
    assert vm.warnings == ["Shapes of intermediate values and operator documentation are not shown: onnx cannot "
                           "parse the model (ValueError)."]
    assert vm.graph.inputs[0].shape == [1, 3, 640, 640] and vm.graph.nodes[0].doc is None
