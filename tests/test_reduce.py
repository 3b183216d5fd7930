"""Failure reduction: the oracle is a real runtime (onnx.checker, then ONNX Runtime on random
inputs), so a candidate that is not a valid, runnable model would show up, not be assumed away."""
from __future__ import annotations

import random

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from kiln.errors import KilnError
from kiln.reduce import reduce_model

F = TensorProto.FLOAT
_DTYPES = {"tensor(float)": np.float32, "tensor(bool)": np.bool_, "tensor(int64)": np.int64}


def _run(model: onnx.ModelProto, check: bool = True) -> None:
    """Raise unless the model passes the checker and runs in ONNX Runtime on random inputs."""
    if check:
        onnx.checker.check_model(model, full_check=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {}
    for arg in sess.get_inputs():
        shape = [d if isinstance(d, int) else 2 for d in arg.shape]
        values = rng.standard_normal(shape)
        feeds[arg.name] = np.asarray(values > 0 if arg.type == "tensor(bool)" else values, _DTYPES[arg.type])
    sess.run(None, feeds)


def _names(model: onnx.ModelProto) -> set[str]:
    return {node.name for node in model.graph.node}


class Oracle:
    """Fails iff the candidate holds every culprit and runs; records anything invalid it was shown."""

    def __init__(self, *culprits: str, run=_run) -> None:
        self.culprits, self.run = set(culprits), run
        self.calls, self.invalid = 0, []

    def __call__(self, model: onnx.ModelProto) -> bool:
        self.calls += 1
        try:
            self.run(model)
        except Exception as error:   # noqa: BLE001 - recorded, the test asserts none
            self.invalid.append(f"{sorted(_names(model))}: {error}")
            return False
        return self.culprits <= _names(model)


def _dag(n: int, bad: dict[int, str], seed: int = 0) -> onnx.ModelProto:
    """n nodes of cheap ops with branches, joins, initializers and Constants; node i in ``bad``
    becomes a Sin named bad[i]. Every tensor nobody reads is a graph output."""
    rng = random.Random(seed)
    nodes, tensors, shape = [], ["x"], {"x": [2, 3], "w0": [3], "w1": [3], "w2": [3], "w3": [3]}
    inits = [helper.make_tensor(f"w{j}", F, [3], [0.5 + j, -1.0, 0.25]) for j in range(4)]
    for i in range(n):
        out = f"t{i}"
        if i in bad:
            nodes.append(helper.make_node("Sin", [rng.choice(tensors[-4:])], [out], name=bad[i]))
            shape[out] = shape[nodes[-1].input[0]]
        elif i % 17 == 5:
            nodes.append(helper.make_node("Constant", [], [out], name=f"n{i}",
                                          value=helper.make_tensor(f"c{i}", F, [3], [1.0, 2.0, 3.0])))
            shape[out] = [3]
        else:
            op = rng.choice(["Add", "Mul", "Relu", "Tanh"])
            a = rng.choice(tensors[-4:])
            ins = [a] if op in ("Relu", "Tanh") else [a, rng.choice(tensors[-6:] + ["w0", "w1", "w2", "w3"])]
            nodes.append(helper.make_node(op, ins, [out], name=f"n{i}"))
            shape[out] = max((shape[t] for t in ins), key=len)
        tensors.append(out)
    read = {name for node in nodes for name in node.input}
    outputs = [helper.make_tensor_value_info(t, F, shape[t]) for t in tensors[1:] if t not in read]
    graph = helper.make_graph(nodes, "dag", [helper.make_tensor_value_info("x", F, [2, 3])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _check_result(result, oracle: Oracle, culprits: set[str], max_nodes: int) -> None:
    assert oracle.invalid == [], oracle.invalid[:3]
    assert result.calls == oracle.calls
    assert result.nodes == len(result.model.graph.node) <= max_nodes
    assert culprits <= _names(result.model)
    _run(result.model)
    assert Oracle(*culprits)(result.model)
    assert result.inputs == [vi.name for vi in result.model.graph.input
                             if vi.name not in {t.name for t in result.model.graph.initializer}]


def test_one_bad_node_in_200():
    model = _dag(200, {117: "bad"})
    before = model.SerializeToString()
    oracle, lines = Oracle("bad"), []
    result = reduce_model(model, oracle, log=lines.append)
    _check_result(result, oracle, {"bad"}, max_nodes=1)
    assert result.original_nodes == 200
    assert result.calls < 30, result.calls           # measured: 16
    assert model.SerializeToString() == before       # the caller's model is untouched
    assert any(line.startswith("bisect:") for line in lines)


def test_two_culprits_far_apart_are_both_kept():
    model = _dag(200, {40: "a", 160: "b"}, seed=1)
    oracle = Oracle("a", "b")
    result = reduce_model(model, oracle)
    _check_result(result, oracle, {"a", "b"}, max_nodes=2)
    assert result.calls < 80, result.calls           # measured: 39


def test_diamond_keeps_the_pair_and_feeds_the_middle():
    nodes = [helper.make_node("Relu", ["x"], ["ta"], name="A"),
             helper.make_node("Tanh", ["ta"], ["tb"], name="B"),
             helper.make_node("Sigmoid", ["ta"], ["tc"], name="C"),
             helper.make_node("Add", ["tb", "tc"], ["td"], name="D"),
             helper.make_node("Neg", ["td"], ["y"], name="E")]
    graph = helper.make_graph(nodes, "diamond", [helper.make_tensor_value_info("x", F, [2, 3])],
                              [helper.make_tensor_value_info("y", F, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    oracle = Oracle("A", "D")
    result = reduce_model(model, oracle)
    _check_result(result, oracle, {"A", "D"}, max_nodes=2)
    assert sorted(result.inputs) == ["tb", "tc", "x"]
    assert [vi.name for vi in result.model.graph.output] == ["ta", "td"]


@pytest.mark.parametrize("where", [0, 59])
def test_culprit_at_either_end(where):
    model = _dag(60, {where: "bad"}, seed=2)
    oracle = Oracle("bad")
    result = reduce_model(model, oracle)
    _check_result(result, oracle, {"bad"}, max_nodes=1)
    assert result.calls < 20, result.calls


def test_if_node_is_kept_whole_with_its_outer_reads_as_inputs():
    then = helper.make_graph([helper.make_node("Sin", ["a"], ["r"], name="bad")], "then", [],
                             [helper.make_tensor_value_info("r", F, [2, 3])])
    other = helper.make_graph([helper.make_node("Identity", ["b"], ["r2"], name="id")], "else", [],
                              [helper.make_tensor_value_info("r2", F, [2, 3])])
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="relu"),
             helper.make_node("Tanh", ["x"], ["b"], name="tanh"),
             helper.make_node("Abs", ["x"], ["unused"], name="abs"),
             helper.make_node("If", ["cond"], ["y0"], name="if", then_branch=then, else_branch=other),
             helper.make_node("Neg", ["y0"], ["y"], name="neg")]
    graph = helper.make_graph(nodes, "branchy", [helper.make_tensor_value_info("x", F, [2, 3]),
                                                  helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", F, [2, 3]),
                               helper.make_tensor_value_info("unused", F, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    def holds_sin(m):
        _run(m)
        return any(a.g.node[0].op_type == "Sin" for n in m.graph.node for a in n.attribute if a.name == "then_branch")
    result = reduce_model(model, holds_sin)
    assert _names(result.model) == {"if"}
    assert sorted(result.inputs) == ["a", "b", "cond"]
    _run(result.model)


def test_model_local_functions_kept_only_when_used():
    def fn(name, op):
        return helper.make_function("local", name, ["u"], ["v"], [helper.make_node(op, ["u"], ["v"])],
                                    [helper.make_opsetid("", 17)])
    nodes = [helper.make_node("Relu", ["x"], ["t0"], name="relu"),
             helper.make_node("Good", ["t0"], ["t1"], name="good", domain="local"),
             helper.make_node("Bad", ["t1"], ["t2"], name="bad", domain="local"),
             helper.make_node("Tanh", ["t2"], ["y"], name="tanh")]
    graph = helper.make_graph(nodes, "fns", [helper.make_tensor_value_info("x", F, [2, 3])],
                              [helper.make_tensor_value_info("y", F, [2, 3])])
    model = helper.make_model(graph, functions=[fn("Good", "Neg"), fn("Bad", "Sin")],
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    oracle = Oracle("bad")
    result = reduce_model(model, oracle)
    _check_result(result, oracle, {"bad"}, max_nodes=1)
    assert [f.name for f in result.model.functions] == ["Bad"]


def test_only_used_weights_are_kept_and_large_ones_still_get_shapes():
    rng = np.random.default_rng(0)
    w1 = onnx.numpy_helper.from_array(rng.standard_normal((64, 80)).astype(np.float32), "w1")   # too big for the
    w2 = onnx.numpy_helper.from_array(rng.standard_normal((80, 16)).astype(np.float32), "w2")   # inference skeleton
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["t0"], name="mm1"),
             helper.make_node("Relu", ["t0"], ["t1"], name="relu"),
             helper.make_node("Sin", ["t1"], ["t2"], name="bad"),
             helper.make_node("MatMul", ["t2", "w2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", F, [2, 64])],
                              [helper.make_tensor_value_info("y", F, [2, 16])], [w1, w2])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    oracle = Oracle("bad")
    result = reduce_model(model, oracle)
    _check_result(result, oracle, {"bad"}, max_nodes=1)
    assert not result.model.graph.initializer
    assert [d.dim_value for d in result.model.graph.input[0].type.tensor_type.shape.dim] == [2, 80]
    oracle = Oracle("mm2")
    result = reduce_model(model, oracle)
    _check_result(result, oracle, {"mm2"}, max_nodes=1)
    assert [t.name for t in result.model.graph.initializer] == ["w2"]


def _custom_op_model() -> onnx.ModelProto:
    w = helper.make_tensor("w", F, [3], [1.0, 2.0, 3.0])
    nodes = [helper.make_node("Relu", ["x"], ["t0"], name="relu"),
             helper.make_node("Foo", ["t0", "w"], ["t1"], name="foo", domain="com.example"),
             helper.make_node("Sin", ["t1"], ["t2"], name="bad"),
             helper.make_node("Tanh", ["t2"], ["y"], name="tanh")]
    graph = helper.make_graph(nodes, "custom", [helper.make_tensor_value_info("x", F, [2, 3])],
                              [helper.make_tensor_value_info("y", F, [2, 3])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])


def test_unknown_type_at_a_cut_names_the_tensor_and_tensor_types_fixes_it():
    model = _custom_op_model()
    oracle = Oracle("bad", run=onnx.checker.check_model)    # ORT cannot run com.example::Foo
    with pytest.raises(KilnError, match="'t1'.*tensor_types"):
        reduce_model(model, oracle)
    oracle = Oracle("bad", run=onnx.checker.check_model)
    result = reduce_model(model, oracle, tensor_types={"t1": (F, [2, "n"])})
    assert _names(result.model) == {"bad"} and result.inputs == ["t1"]
    assert result.model.graph.input[0].type.tensor_type.shape.dim[1].dim_param == "n"
    assert oracle.invalid == []
    assert not result.model.graph.initializer                 # w went with foo


def test_unknown_rank_is_fine_for_an_output_but_not_for_an_input():
    nodes = [helper.make_node("Squeeze", ["x"], ["t"], name="squeeze"),   # rank depends on n
             helper.make_node("Sin", ["t"], ["u"], name="sin"),
             helper.make_node("Relu", ["u"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "squeezy", [helper.make_tensor_value_info("x", F, ["n", 3])],
                              [helper.make_tensor_value_info("y", F, ["n", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    ort_only = Oracle("squeeze", run=lambda m: _run(m, check=False))
    lines: list[str] = []
    result = reduce_model(model, ort_only, log=lines.append)
    assert _names(result.model) == {"squeeze"} and ort_only.invalid == []
    assert not result.model.graph.output[0].type.tensor_type.HasField("shape")
    assert any("'t' has no known shape" in line for line in lines)
    with pytest.raises(KilnError, match="'t'.*rank is unknown"):
        reduce_model(model, Oracle("sin", run=lambda m: _run(m, check=False)))


def test_oracle_exceptions_count_as_passing_and_are_logged():
    model = _dag(40, {25: "bad"}, seed=3)

    def picky(m):
        if "bad" not in _names(m):
            raise RuntimeError("kiln crashed")
        _run(m)
        return True
    lines: list[str] = []
    result = reduce_model(model, picky, log=lines.append)
    assert _names(result.model) == {"bad"}
    assert any("RuntimeError: kiln crashed; counted as passing" in line for line in lines)


def test_full_model_that_passes_is_an_error():
    with pytest.raises(KilnError, match="full model passes the comparison; nothing to reduce"):
        reduce_model(_dag(10, {}), lambda m: False)


def test_save_round_trips(tmp_path):
    oracle = Oracle("bad")
    result = reduce_model(_dag(30, {10: "bad"}, seed=4), oracle)
    result.save(tmp_path / "reduced.onnx")
    assert _names(onnx.load(str(tmp_path / "reduced.onnx"))) == {"bad"}
