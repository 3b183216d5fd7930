"""kiln.onnx.reader and kiln.onnx.schemas against the onnx package: the same field labels, the same tensor values
(dtype, shape and bytes) as numpy_helper, the same schemas as onnx.defs, the same Network as parsing onnx.load's
ModelProto; and a plain model parses without importing onnx or ml_dtypes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.defs
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln.onnx
from kiln.errors import ParseError
from kiln.onnx import proto as P
from kiln.onnx import reader, schemas
from kiln.onnx.validate import ATTRIBUTE_TYPES
from _networks import network_signature


def _descriptor(name: str):
    obj = onnx
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj.DESCRIPTOR


@pytest.mark.parametrize("message", sorted(P.MESSAGES))
def test_repeated_fields_are_onnx_ones(message):
    if message in ("TypeProto.Tensor", "TypeProto.Sequence", "TypeProto.Map", "TypeProto.Opaque"):
        desc = getattr(onnx.TypeProto, message.split(".")[1]).DESCRIPTOR
    else:
        desc = _descriptor(message)
    for number, (name, _) in P.MESSAGES[message].items():
        field = desc.fields_by_number[number]
        repeated = getattr(field, "is_repeated", None)
        repeated = field.label == field.LABEL_REPEATED if repeated is None else repeated
        assert repeated == (name in reader._REPEATED.get(message, ())), (message, name)


def test_attribute_type_names_are_onnx_ones():
    assert ATTRIBUTE_TYPES == tuple(onnx.AttributeProto.AttributeType.Name(i) for i in range(len(ATTRIBUTE_TYPES)))


def _view(t: TensorProto) -> reader.Proto:
    return reader.Proto(P.pb.decode(t.SerializeToString(), "TensorProto", P.MESSAGES), "TensorProto")


def _identical(ours: np.ndarray, ref: np.ndarray) -> None:
    assert (ours.dtype, ours.shape) == (ref.dtype, ref.shape)
    if ref.dtype == object:
        assert ours.tolist() == ref.tolist() and all(type(a) is type(b) for a, b in zip(ours.flat, ref.flat))
    else:
        assert ours.tobytes() == ref.tobytes()


_NATIVE = [TensorProto.FLOAT, TensorProto.UINT8, TensorProto.INT8, TensorProto.UINT16, TensorProto.INT16,
           TensorProto.INT32, TensorProto.INT64, TensorProto.BOOL, TensorProto.FLOAT16, TensorProto.DOUBLE,
           TensorProto.UINT32, TensorProto.UINT64, TensorProto.COMPLEX64, TensorProto.COMPLEX128]


@pytest.mark.parametrize("raw", [False, True])
@pytest.mark.parametrize("code", _NATIVE)
def test_native_values_are_numpy_helpers(code, raw):
    dtype = helper.tensor_dtype_to_np_dtype(code)
    rng = np.random.default_rng(code)
    values = (rng.standard_normal((2, 3, 4)) * 1e3).astype(dtype) if dtype.kind in "fc" else \
        rng.integers(0, 2 if dtype.kind == "b" else 100, size=(2, 3, 4)).astype(dtype)
    if dtype.kind in "iu":
        values.flat[:2] = [np.iinfo(dtype).min, np.iinfo(dtype).max]
    t = numpy_helper.from_array(values, "w")
    if not raw:
        t = helper.make_tensor("w", code, values.shape, values.reshape(-1) if code == TensorProto.FLOAT16
                               else values.reshape(-1).tolist(), raw=False)
    assert t.HasField("raw_data") == raw
    _identical(reader.tensor_array(_view(t)), numpy_helper.to_array(t))


_CODES = {TensorProto.BFLOAT16: 65536, TensorProto.FLOAT8E4M3FN: 256, TensorProto.FLOAT8E4M3FNUZ: 256,
          TensorProto.FLOAT8E5M2: 256, TensorProto.FLOAT8E5M2FNUZ: 256, TensorProto.FLOAT8E8M0: 256}
_PACKED = [TensorProto.UINT4, TensorProto.INT4, TensorProto.FLOAT4E2M1, TensorProto.UINT2, TensorProto.INT2]


@pytest.mark.parametrize("code", list(_CODES) + _PACKED)
def test_every_code_of_the_narrow_types_is_numpy_helpers(code):
    """Every bit pattern, in raw_data and in int32_data, gives numpy_helper's ml_dtypes array, byte for byte."""
    if code in _CODES:
        n = _CODES[code]
        bits = np.arange(n, dtype=np.uint16 if n > 256 else np.uint8)
        raw = helper.make_tensor("w", code, [n], bits.tobytes(), raw=True)
        typed = TensorProto(name="w", data_type=code, dims=[n])
        typed.int32_data.extend(bits.tolist())
    else:
        per = 2 if code in (TensorProto.UINT4, TensorProto.INT4, TensorProto.FLOAT4E2M1) else 4
        n = 256 * per - 1
        raw = helper.make_tensor("w", code, [n], bytes(range(256)), raw=True)
        typed = TensorProto(name="w", data_type=code, dims=[n])
        typed.int32_data.extend(range(256))
    for t in (raw, typed):
        _identical(reader.tensor_array(_view(t)), numpy_helper.to_array(t))


def test_strings_are_numpy_helpers_and_bad_utf8_is_refused():
    t = helper.make_tensor("s", TensorProto.STRING, [2, 1], [b"ab", "\u00e9t\u00e9".encode()])
    _identical(reader.tensor_array(_view(t)), numpy_helper.to_array(t))
    bad = helper.make_tensor("s", TensorProto.STRING, [1], [b"\xff"])
    with pytest.raises(UnicodeDecodeError):
        reader.tensor_array(_view(bad))


def test_schema_table_is_onnx_defs():
    """Every op of every domain at every opset the table and the installed onnx both cover."""
    table = schemas._table()
    installed = {d: hi for d, (_, hi) in onnx.defs.C.schema_version_map().items()}
    names = {(s.domain, s.name) for s in onnx.defs.get_all_schemas_with_history()}
    assert {(d, op) for d, ops in table["ops"].items() for op in ops} >= {
        (d, op) for d, op in names if d in table["opsets"]}
    checked = 0
    for domain, op in sorted(names):
        for opset in range(1, min(installed[domain], table["opsets"].get(domain, 0)) + 1):
            try:
                ref = onnx.defs.get_schema(op, opset, domain)
            except onnx.defs.SchemaError:
                assert schemas.get(op, opset, domain) is None, (domain, op, opset)
                continue
            got = schemas.get(op, opset, domain)
            inputs = [(i, p.name) for i, p in enumerate(ref.inputs)
                      if p.option == onnx.defs.OpSchema.FormalParameterOption.Single]
            assert got == (ref.since_version, ref.min_input, ref.max_input, tuple(inputs),
                           tuple(sorted(n for n, a in ref.attributes.items() if a.required)),
                           {n: int(a.type) for n, a in ref.attributes.items() if int(a.type) in (4, 5, 10, 11)}), \
                (domain, op, opset)
            checked += 1
    assert checked > 3000
    assert [schemas.get("Relu", v).since for v in (1, 5, 6, 12, 13, 17)] == [1, 1, 6, 6, 13, 14]
    assert schemas.get("Relu", 0) is None
    assert schemas.get("Attention", 1, "com.microsoft") is None


def test_an_opset_newer_than_the_table_reads_onnx_defs(monkeypatch):
    newest = schemas._table()["opsets"][""]
    monkeypatch.setitem(schemas._table()["opsets"], "", newest - 1)
    assert schemas.get("Relu", newest) == schemas._from_onnx("Relu", newest, "")
    assert schemas.get("Relu", newest).since == onnx.defs.get_schema("Relu", newest).since_version


def _model() -> onnx.ModelProto:
    """Attributes of every kind the parser reads (float, int, string, tensor, graph, lists, sparse), bfloat16 and
    int4 values, a sparse initializer, an If with subgraphs, an Optional typed by its ``type`` attribute."""
    bf = helper.make_tensor("bf", TensorProto.BFLOAT16, [4], np.arange(4, dtype=np.uint16).tobytes() + b"", raw=True)
    i4 = helper.make_tensor("i4", TensorProto.INT4, [3], [-8, 7, -1])
    sp = helper.make_sparse_tensor(numpy_helper.from_array(np.array([2.0, 3.0], np.float32), "sv"),
                                   numpy_helper.from_array(np.array([1, 3], np.int64), "si"), [4])
    sp.values.name = "sparse"

    def branch(name: str, k: float) -> onnx.GraphProto:
        return helper.make_graph([helper.make_node("Mul", ["x", "k" + name], ["o" + name])], name, [],
                                 [helper.make_tensor_value_info("o" + name, TensorProto.FLOAT, [1, 4])],
                                 [numpy_helper.from_array(np.full(4, k, np.float32), "k" + name)])
    nodes = [
        helper.make_node("Constant", [], ["c"], name="const", value=numpy_helper.from_array(
            np.array([[0.5, -1.0, 2.0, 4.0]], np.float32))),
        helper.make_node("LeakyRelu", ["x"], ["a"], alpha=0.25),
        helper.make_node("Add", ["a", "c"], ["b"], name="add \u00e9"),
        helper.make_node("Add", ["b", "sparse"], ["b2"]),
        helper.make_node("ReduceSum", ["b2", "axes"], ["r"], keepdims=1),
        helper.make_node("Cast", ["bf"], ["bf32"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["i4"], ["i4f"], to=TensorProto.FLOAT),
        helper.make_node("Greater", ["r", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch("then", 2.0),
                         else_branch=branch("else", 3.0)),
        helper.make_node("Resize", ["x", "", "scales"], ["z"], mode="nearest",
                         coordinate_transformation_mode="asymmetric"),
        helper.make_node("Optional", [], ["opt"], type=helper.make_tensor_type_proto(TensorProto.FLOAT, [2])),
        helper.make_node("OptionalHasElement", ["opt"], ["has"]),
        helper.make_node("Concat", ["bf32", "i4f"], ["cat"], axis=0),
    ]
    inits = [bf, i4, numpy_helper.from_array(np.array([1], np.int64), "axes"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array([1, 1, 1, 2], np.float32), "scales")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "z", "cat")]
                          + [helper.make_tensor_value_info("has", TensorProto.BOOL, [])], inits,
                          sparse_initializer=[sp])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)], producer_name="kiln-test")


def test_a_model_parses_as_through_onnx_load(tmp_path: Path):
    path = tmp_path / "m.onnx"
    onnx.save(_model(), str(path))
    ours = kiln.onnx.parse(str(path))
    ref = kiln.onnx.parse(onnx.load(str(path)))
    assert network_signature(ours) == network_signature(ref)
    assert network_signature(kiln.onnx.parse(path.read_bytes())) == network_signature(ref)
    assert {layer.kind for layer in ours.layers} >= {"If", "Activation", "Cast", "Resize"}
    assert ours.metadata == dict(ref.metadata, source=str(path))


def test_external_data_is_read_by_onnx(tmp_path: Path):
    m = _model()
    big = numpy_helper.from_array(np.arange(4096, dtype=np.float32).reshape(1, 4096), "big")
    m.graph.initializer.append(big)
    m.graph.node.append(helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0))
    m.graph.output.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, None))
    path = tmp_path / "ext.onnx"
    onnx.save(m, str(path), save_as_external_data=True, location="ext.bin", size_threshold=1024)
    proto = reader.load(str(path))
    assert not reader.is_view(proto) and isinstance(proto, onnx.ModelProto)
    net = kiln.onnx.parse(str(path))
    np.testing.assert_array_equal(net.tensors["big"].value, np.arange(4096, dtype=np.float32).reshape(1, 4096))


def test_damaged_bytes_get_onnxs_message(tmp_path: Path):
    path = tmp_path / "cut.onnx"
    data = _model().SerializeToString()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(Exception) as ref:
        onnx.load(str(path))
    with pytest.raises(ParseError) as got:
        kiln.onnx.parse(str(path))
    detail = (str(ref.value).strip().splitlines() or [type(ref.value).__name__])[0]
    assert str(got.value) == (f"{str(path)!r} is not a readable ONNX model ({detail}); check that the file is a "
                              f"complete .onnx ModelProto and that external data files sit beside it.")


_PROBE = ("import sys, json, kiln.onnx\n"
          "net = kiln.onnx.parse(sys.argv[1])\n"
          "print(json.dumps([len(net.layers), sorted(m for m in ('onnx', 'ml_dtypes', 'torch', 'google.protobuf') "
          "if m in sys.modules)]))\n")


def test_parsing_imports_neither_onnx_nor_ml_dtypes(tmp_path: Path):
    plain = helper.make_graph([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Cast", ["y"], ["z"], to=10)],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT16, [1, 4])])
    onnx.save(helper.make_model(plain, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "plain.onnx"))
    onnx.save(_model(), str(tmp_path / "bf16.onnx"))
    runs = {}
    for name in ("plain", "bf16"):
        r = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path / f"{name}.onnx")], capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        runs[name] = json.loads(r.stdout)
    assert runs["plain"] == [2, []]
    assert runs["bf16"][1] == ["ml_dtypes"]            # its bfloat16 and int4 values are ml_dtypes arrays
