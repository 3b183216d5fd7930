"""YOLOv5's anchor decode (the ONNX ops its export writes: Reshape, Transpose, Sigmoid, Split, Mul, Add, Pow,
Concat) in a Kiln FP32 CPU engine against the same arithmetic in float64 on the same FP32 head outputs: the decode
adds only FP32 rounding of its own, a few units per element. Its outputs are far from ONNX Runtime's in YOLOv5l
because it amplifies the errors already in the head convolutions' outputs (docs/cpu.md), not its own."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import kiln
import kiln.onnx

EPS = 2.0 ** -24
NA, NC = 3, 3                       # anchors per cell, classes
NO = NC + 5
LEVELS = ((8, 6, (10, 13, 16, 30, 33, 23)), (16, 3, (116, 90, 156, 198, 373, 326)))    # stride, cells, anchors


def _grids(cells: int, anchors: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    yv, xv = np.meshgrid(np.arange(cells, dtype=np.float32), np.arange(cells, dtype=np.float32), indexing="ij")
    grid = np.broadcast_to(np.stack((xv, yv), 2)[None, None] - 0.5, (1, NA, cells, cells, 2))
    anchor = np.broadcast_to(np.asarray(anchors, np.float32).reshape(1, NA, 1, 1, 2), (1, NA, cells, cells, 2))
    return np.ascontiguousarray(grid), np.ascontiguousarray(anchor)


def _model() -> onnx.ModelProto:
    nodes, inits, inputs, outs = [], [], [], []
    const = lambda name, v: inits.append(numpy_helper.from_array(np.asarray(v), name)) or name   # noqa: E731
    const("two", np.float32(2.0))
    const("split", np.array([2, 2, NC + 1], np.int64))
    for i, (stride, cells, anchors) in enumerate(LEVELS):
        grid, anchor = _grids(cells, anchors)
        inputs.append(helper.make_tensor_value_info(f"z{i}", TensorProto.FLOAT, [1, NA * NO, cells, cells]))
        t = lambda n: f"l{i}_{n}"                                                                 # noqa: E731
        nodes += [
            helper.make_node("Reshape", [f"z{i}", const(t("shape5"), np.array([1, NA, NO, cells, cells]))], [t("r")]),
            helper.make_node("Transpose", [t("r")], [t("p")], perm=[0, 1, 3, 4, 2]),
            helper.make_node("Sigmoid", [t("p")], [t("s")]),
            helper.make_node("Split", [t("s"), "split"], [t("xy"), t("wh"), t("conf")], axis=4),
            helper.make_node("Mul", [t("xy"), "two"], [t("xy2")]),
            helper.make_node("Add", [t("xy2"), const(t("grid"), grid)], [t("xyg")]),
            helper.make_node("Mul", [t("xyg"), const(t("stride"), np.float32(stride))], [t("xyo")]),
            helper.make_node("Mul", [t("wh"), "two"], [t("wh2")]),
            helper.make_node("Pow", [t("wh2"), "two"], [t("whp")]),
            helper.make_node("Mul", [t("whp"), const(t("anchor"), anchor)], [t("who")]),
            helper.make_node("Concat", [t("xyo"), t("who"), t("conf")], [t("cat")], axis=4),
            helper.make_node("Reshape", [t("cat"), const(t("shape3"), np.array([1, -1, NO]))], [t("out")]),
        ]
        outs.append(t("out"))
    nodes.append(helper.make_node("Concat", outs, ["output0"], axis=1))
    graph = helper.make_graph(nodes, "anchor_decode", inputs,
                              [helper.make_tensor_value_info("output0", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def _decode64(zs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The decode in float64 and, per element, the scale its FP32 rounding is relative to: |value| for the
    products (w, h, confidences), plus 2·stride for x and y, whose 2σ + grid may cancel."""
    vals, scales = [], []
    for z, (stride, cells, anchors) in zip(zs, LEVELS):
        grid, anchor = _grids(cells, anchors)
        s = 1.0 / (1.0 + np.exp(-z.astype(np.float64).reshape(1, NA, NO, cells, cells).transpose(0, 1, 3, 4, 2)))
        xy = (2 * s[..., :2] + grid) * stride
        wh = (2 * s[..., 2:4]) ** 2 * anchor
        out = np.concatenate((xy, wh, s[..., 4:]), 4).reshape(1, -1, NO)
        extra = np.zeros((1, NA, cells, cells, NO))
        extra[..., :2] = 2 * stride
        vals.append(out)
        scales.append(np.abs(out) + extra.reshape(1, -1, NO))
    return np.concatenate(vals, 1), np.concatenate(scales, 1)


def test_anchor_decode_adds_only_fp32_rounding():
    rng = np.random.default_rng(0)
    zs = [(rng.standard_normal((1, NA * NO, c, c)) * 6).astype(np.float32) for _, c, _ in LEVELS]
    zs[1].flat[:4] = [-30.0, 30.0, 0.0, -88.0]        # saturated and centred logits
    feeds = {f"z{i}": z for i, z in enumerate(zs)}
    engine = kiln.build(kiln.onnx.parse(_model()),
                        kiln.BuildConfig(device="cpu", profiles={n: z.shape for n, z in feeds.items()}))
    got = np.asarray(engine.context().run(feeds)["output0"], np.float64)
    ref, scale = _decode64(zs)
    assert got.shape == ref.shape == (1, NA * sum(c * c for _, c, _ in LEVELS), NO)
    # σ costs a few units, the square doubles them, 2σ + grid, ·stride and ·anchor round once each: well within
    # 16 units of the scale; 1e-38 allows for a CPU set to flush denormals (σ(-88) is 6e-39)
    err = np.abs(got - ref)
    bound = 16 * EPS * scale + 1e-38
    worst = np.unravel_index(int(np.argmax(err / bound)), err.shape)
    assert (err <= bound).all(), f"at {worst}: {got[worst]!r} vs {ref[worst]!r} (bound {bound[worst]:.3g})"
