"""Shape-generic optimization: an engine built for a range of shapes gets the layers of an engine built
for one shape (passes/symbolic.py, fuse_shuffles.py, collapse_views.py, sink_shuffles.py), and its
outputs match ONNX Runtime across the range.

Compared are the layers that compute on the inputs' values. A static build folds every layer that
depends only on the input shapes (positions ``0..S``, the reshape targets) into constants; a range
engine must compute those at run time, as host shape arithmetic, so they are counted apart.
"""
from __future__ import annotations


import numpy as np
import onnxruntime as ort
import pytest
import torch

import kiln
import mini_transformers as mt
from kiln.passes.symbolic import Sym, quotient, reshape_attr, reshape_target

SHAPE_ONLY = ("Shape", "Size", "ShapeConstant")


def _bert() -> bytes:
    module, _ = mt.bert_module()
    ids, mask = torch.zeros(2, 16, dtype=torch.int64), torch.ones(2, 16, dtype=torch.int64)
    axes = {"input_ids": {0: "B", 1: "S"}, "attention_mask": {0: "B", 1: "S"}, "hidden": {0: "B", 1: "S"}}
    return mt.export(module, (ids, mask), ["input_ids", "attention_mask"], ["hidden"], axes)


class _ConvTokens(torch.nn.Module):
    """Convolutions whose maps become token sequences and back: ``reshape(B, C, H·W)``, ``flatten(2)``
    after a strided convolution (its dims are no monomial of H and W), a linear layer over the
    channels and a reshape back to ``[B, C, H, W]``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.down = torch.nn.Conv2d(8, 8, 3, padding=1, stride=2)
        self.fc = torch.nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.relu(self.conv(x))
        b, c, h, w = y.shape
        t = self.fc(y.reshape(b, c, h * w).transpose(1, 2))
        z = self.down(y).flatten(2).transpose(1, 2)
        return t.reshape(b, h, w, 16).permute(0, 3, 1, 2), z


def _cnn() -> bytes:
    torch.manual_seed(0)
    return mt.export(_ConvTokens(), (torch.randn(2, 3, 8, 12),), ["x"], ["y", "z"],
                   {"x": {0: "B", 2: "H", 3: "W"}})


def _build(model: bytes, profiles: dict) -> kiln.Engine:
    return kiln.build(kiln.onnx.parse(model), kiln.BuildConfig(device="cpu", profiles=profiles))


def _split_layers(engine) -> tuple[list[str], list[str]]:
    """(kinds of the layers that read the inputs' values, kinds of those computing from shapes only)."""
    data = {spec["name"] for spec in engine.inputs}
    values, shape_only = [], []
    for layer in engine.layers:
        if layer["kind"] not in SHAPE_ONLY and any(n in data for n in layer["inputs"] if n):
            data.update(layer["outputs"])
            values.append(layer["kind"])
        else:
            shape_only.append(layer["kind"])
    return values, shape_only


def _same_layers(range_engine, static_engine) -> None:
    got, shape_only = _split_layers(range_engine)
    want, folded = _split_layers(static_engine)
    assert folded == [], f"the static engine kept shape-only layers {folded}"
    assert sorted(got) == sorted(want), (f"range engine: {got}\nstatic engine: {want}\n"
                                         f"(range engine's shape-only layers: {shape_only})")
    assert all(kind not in ("MatMul", "Convolution", "FullyConnected", "Attention") for kind in shape_only)


def _check(model: bytes, engine, feeds: dict[str, np.ndarray], tol: float) -> None:
    ref = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, feeds)
    got = list(engine.context().run(feeds).values())
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


BERT_RANGE = {n: ((1, 8), (4, 16), (8, 64)) for n in ("input_ids", "attention_mask")}


def _bert_feeds(batch: int, seq: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch * 100 + seq)
    mask = np.ones((batch, seq), np.int64)
    for i in range(batch):                       # rows padded by different amounts, one not at all
        mask[i, seq - (i * seq) // (2 * batch):] = 0
    return {"input_ids": rng.integers(0, 1000, (batch, seq)), "attention_mask": mask}


@pytest.fixture(scope="module")
def bert():
    model = _bert()
    return model, _build(model, BERT_RANGE)


def test_bert_range_engine_has_the_static_engines_layers(bert):
    model, ranged = bert
    _same_layers(ranged, _build(model, {n: (4, 16) for n in BERT_RANGE}))


@pytest.mark.parametrize("batch,seq", [(1, 8), (4, 16), (8, 64), (3, 37)])
def test_bert_range_engine_matches_onnxruntime(bert, batch, seq):
    # post-LN outputs are O(1); float32 sums of at most 128 products, two layers deep, stay far below 1e-4
    model, ranged = bert
    _check(model, ranged, _bert_feeds(batch, seq), tol=1e-4)


def test_bert_range_engine_reshapes(bert):
    """Before shape-generic optimization (commit 1539e0a) this engine had 18 Shuffles: per layer the
    six reshapes/transposes of q, k, v and two around the attention output, plus two reshapes of the
    mask. Now it has the static engine's 9: per layer one reshape+permute each for q, k, v, one
    permute+reshape after the attention, and one reshape of the mask, each with a target written
    for every shape (0 copies the batch or sequence dim)."""
    _, ranged = bert
    shuffles = [layer for layer in ranged.layers if layer["kind"] == "Shuffle"]
    assert len(shuffles) == 9
    assert all(len(s["inputs"]) == 1 and s["attrs"]["reshape"] is not None for s in shuffles)
    heads = [s for s in shuffles if s["attrs"]["second_transpose"] == [0, 2, 1, 3]]
    assert len(heads) == 6 and all(s["attrs"]["reshape"] == [0, 0, 4, 16] for s in heads)
    merges = [s for s in shuffles if s["attrs"]["first_transpose"] == [0, 2, 1, 3]]
    assert len(merges) == 2 and all(s["attrs"]["reshape"] == [0, 0, 64] for s in merges)


CNN_RANGE = {"x": ((1, 3, 8, 8), (2, 3, 16, 16), (4, 3, 32, 32))}


@pytest.fixture(scope="module")
def cnn():
    model = _cnn()
    return model, _build(model, CNN_RANGE)


def test_conv_token_range_engine_has_the_static_engines_layers(cnn):
    model, ranged = cnn
    _same_layers(ranged, _build(model, {"x": (2, 3, 16, 16)}))


@pytest.mark.parametrize("shape", [(1, 3, 8, 8), (2, 3, 16, 16), (4, 3, 32, 32), (3, 3, 13, 27)])
def test_conv_token_range_engine_matches_onnxruntime(cnn, shape):
    # sums of at most 27 and 72 products of O(1) values: float32 rounding is far below 1e-5
    model, ranged = cnn
    x = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
    _check(model, ranged, {"x": x}, tol=1e-5)


def _mha() -> bytes:
    """nn.MultiheadAttention encoder blocks (torchvision's ViT form). Dynamic batch only: the
    TorchScript exporter bakes the traced sequence length into the attention's reshapes."""
    import mini_transformers as mt
    torch.manual_seed(0)
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)      # the fused fast path has no ONNX export
    try:
        return mt.export(mt.Encoder(64, 4, 2), (torch.randn(2, 10, 64),), ["x"], ["y"], {"x": {0: "B"}})
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


def test_mha_range_engine_has_the_static_engines_layers():
    """Per block one split+permute of the packed projection, q, k and v as Selects of it, one
    permute+merge into the out-projection: head dims come from ``Shape(q)[-1]`` (16 at every batch,
    folded), ``bsz * num_heads`` reshapes become ``[0, 10, 3, 4, 16]`` and ``[10, -1, 64]``."""
    model = _mha()
    ranged = _build(model, {"x": ((1, 10, 64), (2, 10, 64), (4, 10, 64))})
    _same_layers(ranged, _build(model, {"x": (2, 10, 64)}))
    assert [layer["kind"] for layer in ranged.layers].count("Shuffle") == 4
    for batch in (1, 3, 4):
        x = np.random.default_rng(batch).standard_normal((batch, 10, 64)).astype(np.float32)
        _check(model, ranged, {"x": x}, tol=1e-4)


def _swap_model() -> bytes:
    """x [B, S, 8] → Reshape to (S, B, 8) (a reshape, not a transpose: it regroups elements when
    B ≠ S) → Reshape to (B·S, 8) → Reshape to (B, S, 8), every target computed from Shape(x)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    dims = {"b": 0, "s": 1}
    nodes = [helper.make_node("Shape", ["x"], ["shape"])]
    for n, i in dims.items():
        nodes += [helper.make_node("Gather", ["shape", f"i{i}"], [n], axis=0),
                  helper.make_node("Unsqueeze", [n, "zero"], [n + "1"])]
    nodes += [helper.make_node("Mul", ["b", "s"], ["bs"]), helper.make_node("Unsqueeze", ["bs", "zero"], ["bs1"]),
              helper.make_node("Concat", ["s1", "b1", "eight"], ["t_sb"], axis=0),
              helper.make_node("Concat", ["bs1", "eight"], ["t_flat"], axis=0),
              helper.make_node("Concat", ["b1", "s1", "eight"], ["t_bs"], axis=0),
              helper.make_node("Reshape", ["x", "t_sb"], ["sb"]),
              helper.make_node("Relu", ["sb"], ["r"]),
              helper.make_node("Reshape", ["r", "t_flat"], ["flat"]),
              helper.make_node("Reshape", ["flat", "t_bs"], ["y"])]
    inits = [numpy_helper.from_array(np.asarray(v, np.int64), n)
             for n, v in (("i0", 0), ("i1", 1), ("zero", [0]), ("eight", [8]))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", 8])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m.SerializeToString()


def test_a_reshape_to_its_own_shape_goes():
    """x.view(B, S, 8) of an x of shape [B, S, 8]: [0, 0, 8], a no-op at every shape, removed as a
    static build removes it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Slice", ["shape", "zero", "two"], ["bs"]),
             helper.make_node("Concat", ["bs", "eight"], ["target"], axis=0),
             helper.make_node("Reshape", ["x", "target"], ["r"]),
             helper.make_node("Relu", ["r"], ["y"])]
    inits = [numpy_helper.from_array(np.asarray(v, np.int64), n)
             for n, v in (("zero", [0]), ("two", [2]), ("eight", [8]))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    model = model.SerializeToString()
    ranged = _build(model, {"x": ((1, 1, 8), (2, 3, 8), (5, 7, 8))})
    assert [layer["kind"] for layer in ranged.layers] == ["Activation"]
    x = np.random.default_rng(0).standard_normal((4, 6, 8)).astype(np.float32)
    _check(model, ranged, {"x": x}, tol=0.0)


def test_a_reshape_that_regroups_keeps_its_computed_target():
    """(S, B, 8) from [B, S, 8] copies neither dim in place, and (B, S, 8) from the Relu's (S, B, 8)
    neither: no attribute states them for every shape, so both keep their computed targets (a
    rewrite to [0, 0, 8] would be right only where B = S). The flattening reshape between them
    becomes [-1, 8]."""
    model = _swap_model()
    ranged = _build(model, {"x": ((1, 1, 8), (2, 3, 8), (5, 7, 8))})
    for shape in ((1, 1, 8), (2, 3, 8), (5, 7, 8), (4, 2, 8)):
        x = np.random.default_rng(shape[0]).standard_normal(shape).astype(np.float32)
        _check(model, ranged, {"x": x}, tol=0.0)
    reshapes = [(len(layer["inputs"]), layer["attrs"]["reshape"]) for layer in ranged.layers
                if layer["kind"] == "Shuffle"]
    assert reshapes == [(2, None), (1, [-1, 8]), (2, None)]


def _positions_model(rows: int) -> bytes:
    """ids [B, S] → word embeddings + position embeddings gathered by ``arange(16)[:, :S]`` (an
    exported ``position_ids`` buffer) from a table of ``rows`` rows."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Shape", ["ids"], ["shape"]),
             helper.make_node("Gather", ["shape", "one"], ["s"], axis=0),
             helper.make_node("Unsqueeze", ["s", "zero"], ["end"]),
             helper.make_node("Slice", ["positions", "zero", "end", "one1", "one1"], ["pos"]),
             helper.make_node("Gather", ["words", "ids"], ["w"], axis=0),
             helper.make_node("Gather", ["table", "pos"], ["p"], axis=0),
             helper.make_node("Add", ["w", "p"], ["y"])]
    inits = [numpy_helper.from_array(np.asarray(v), n) for n, v in (
        ("one", np.int64(1)), ("zero", np.asarray([0], np.int64)), ("one1", np.asarray([1], np.int64)),
        ("positions", np.arange(16, dtype=np.int64)[None]),
        ("words", rng.standard_normal((10, 4)).astype(np.float32)),
        ("table", rng.standard_normal((rows, 4)).astype(np.float32)))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "S"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", 4])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(m)
    return m.SerializeToString()


@pytest.mark.parametrize("rows", [16, 20])
def test_positions_are_rows_of_the_table(rows):
    """Gather(table, arange(16)[:, :S]) is table[:S] (a view) when the table has the arange's 16 rows;
    with 20 rows a slice clamped at 16 and one clamped at 20 could differ, and the Gather stays."""
    model = _positions_model(rows)
    ranged = _build(model, {"ids": ((1, 1), (2, 8), (3, 16))})
    for b, s in ((1, 1), (2, 8), (3, 16), (2, 11)):
        ids = np.random.default_rng(s).integers(0, 10, (b, s))
        _check(model, ranged, {"ids": ids}, tol=0.0)
    # the positions depend on S alone: the range engine computes them (and rows gathered by them) once per shape
    bodies = [layer["attrs"]["body"]["__graph__"]["layers"] for layer in ranged.layers if layer["kind"] == "ShapeConstant"]
    gathers = [layer["inputs"][0] for layer in ranged.layers + sum(bodies, [])
               if layer["kind"] == "Gather" and layer["inputs"][0] in ("words", "table")]
    assert sorted(gathers) == (["words"] if rows == 16 else ["table", "words"])


class _Bottlenecks(torch.nn.Module):
    """A ResNet stem (7×7/2 conv, 3×3/2 max pool) and two bottleneck blocks, identity and projection
    shortcuts: past the stride-2 layers the spatial dims are no monomial of H and W."""

    def __init__(self) -> None:
        super().__init__()
        nn = torch.nn

        def cbn(cin: int, cout: int, k: int = 1, s: int = 1) -> list:
            return [nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout)]
        self.stem = nn.Sequential(*cbn(3, 8, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        self.body1 = nn.Sequential(*cbn(8, 4), nn.ReLU(), *cbn(4, 4, 3), nn.ReLU(), *cbn(4, 8))
        self.body2 = nn.Sequential(*cbn(8, 8), nn.ReLU(), *cbn(8, 8, 3, 2), nn.ReLU(), *cbn(8, 16))
        self.short2 = nn.Sequential(*cbn(8, 16, 1, 2))
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):       # statistics and affine parameters that are not 0 and 1
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.normal_(0, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(self.body1(x) + x)
        return torch.relu(self.body2(x) + self.short2(x))


def test_strided_conv_range_engine_has_the_static_engines_layers():
    """Batch, height and width dynamic: the residual adds still fold into their convolutions (the
    block's output dims are the same formula of H and W as its shortcut's), so the 1×1 chains and
    projection sums form as in the static engine."""
    torch.manual_seed(0)
    model = mt.export(_Bottlenecks(), (torch.randn(2, 3, 32, 32),), ["x"], ["y"], {"x": {0: "B", 2: "H", 3: "W"}})
    ranged = _build(model, {"x": ((1, 3, 16, 16), (2, 3, 32, 32), (3, 3, 64, 64))})
    _same_layers(ranged, _build(model, {"x": (2, 3, 32, 32)}))
    assert "Pointwise" not in [layer["kind"] for layer in ranged.layers]
    for shape in ((1, 3, 16, 16), (2, 3, 32, 32), (3, 3, 64, 64), (2, 3, 37, 45)):
        x = np.random.default_rng(shape[2]).standard_normal(shape).astype(np.float32)
        # sums of at most 147 products of O(1) values through six layers: float32 rounding stays below 1e-4
        _check(model, ranged, {"x": x}, tol=1e-4)


# ---- the monomial algebra ----------------------------------------------------------------------
B, S = Sym(1, ("B",)), Sym(1, ("S",))


def test_reshape_targets_hold_for_every_shape():
    bs = Sym(1, ("B", "S"))
    assert reshape_attr((B, S, 64), (B, S, 4, 16)) == [0, 0, 4, 16]
    assert reshape_attr((B, S, 64), (bs, 64)) == [-1, 64]
    assert reshape_attr((bs, 64), (B, S, 64)) is None          # B and S cannot both be inferred
    assert reshape_attr((B, S, 64), (S, B, 64)) is None          # S at dim 0 is no copy of B
    assert reshape_attr((B, 0), (B, 0)) is None                  # a 0 would read as "copy"
    assert reshape_target((B, S, 4, 16), [0, 0, -1], False) == (B, S, 64)
    assert reshape_target((B, S, 64), [0, -1, 3], False) is None  # 64·S / 3 is no monomial
    assert reshape_target((B, S), [Sym(-1, ("B",)), Sym(-1, ("S",))], False) is None   # -B·-S: no shape
    assert quotient(Sym(64, ("B", "S")), Sym(4, ("S",))) == Sym(16, ("B",))
    assert quotient(S, 2) is None


def test_a_symbolic_dim_is_split_only_by_its_factors():
    """[B, 6·S] → [B, S, 6] is a view at every shape (6·S splits into S and 6); [B, S] → [B, 2, S]
    is refused: no constant divides S at every shape."""
    from kiln.passes._views import NotAView, ViewMap
    m = ViewMap((B, Sym(6, ("S",))))
    m.apply(("reshape", (B, S, 6)))
    assert m.canonical((B, S, 6)) == {"split": [B, S, 6], "perm": [0, 1, 2], "selects": [], "merge": None}
    with pytest.raises(NotAView):
        ViewMap((B, S)).apply(("reshape", (B, 2, S)))


@pytest.mark.parametrize("kind,attrs,torch_op", [
    ("Flatten", {"axis": -1}, lambda x: x.reshape(-1, x.shape[-1])),
    ("Flatten", {"axis": 2}, lambda x: x.reshape(x.shape[0] * x.shape[1], -1)),
    ("Unsqueeze", {"axes": [-1, 1]}, lambda x: x.unsqueeze(1).unsqueeze(-1)),
    ("Shuffle", {"first_transpose": [1, 0, 2], "reshape": [0, -1], "second_transpose": [1, 0]},
     lambda x: x.permute(1, 0, 2).reshape(x.shape[1], -1).permute(1, 0)),
    ("Select", {"axis": -1, "index": 2}, lambda x: x.select(-1, 2)),
])
def test_derived_dims_agree_with_torch(kind, attrs, torch_op):
    """A view layer's output dims follow from its input's (B, S, 6) where the IR leaves them unknown;
    at B = 3, S = 5 they are the dims torch gives the same view."""
    from kiln.ir.network import Network
    from kiln.passes.symbolic import concrete, sym_shape
    net = Network("t")
    x = net.add_input("x", "float32", ("B", "S", 6))
    y = net.add_layer(kind, [x], attrs).outputs[0]
    want = tuple(torch_op(torch.empty(3, 5, 6)).shape)
    y.shape = (None,) * len(want)
    got = sym_shape(y)
    assert tuple(concrete(d, {"B": 3, "S": 5}) for d in got) == want
    assert not any(isinstance(d, Sym) and d.syms[0].startswith("?") for d in got)


def test_window_dims_are_the_same_formula_of_the_same_dim():
    """A stride-1 'same' convolution keeps its input's dims; two stride-2 convolutions of one input
    have equal dims, and a stride-2 one with other padding does not."""
    from kiln.ir.network import Network
    from kiln.passes.symbolic import sym_shape
    net = Network("t")
    x = net.add_input("x", "float32", ("B", 4, "H", "W"))
    w3 = net.add_constant(np.zeros((4, 4, 3, 3), np.float32))

    def conv(src, stride, pad):
        y = net.add_layer("Convolution", [src, w3], {"stride": [stride] * 2, "pads": [pad] * 4, "dilation": [1, 1],
                                                     "groups": 1}).outputs[0]
        y.shape = ("B", 4, None, None)
        return y
    same, a, b, other = conv(x, 1, 1), conv(x, 2, 1), conv(x, 2, 1), conv(x, 2, 0)
    assert sym_shape(same) == sym_shape(x)
    assert sym_shape(a) == sym_shape(b) != sym_shape(other)
    assert sym_shape(conv(a, 1, 1)) == sym_shape(b)
