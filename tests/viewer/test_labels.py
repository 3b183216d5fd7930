"""Shape labels on edges: symbolic dims joined with parentheses, long shapes shortened with the full text on hover,
and labels that never overlap each other or a box, nor leave the picture (measured as Chromium draws them)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from kiln.viewer import documents
from kiln.viewer.export import picture
from kiln.viewer.page import shape_label, shape_text

H, W = "floor(height/2 - 1/2) + 1", "floor(width/2 - 1/2) + 1"


def test_symbolic_dims_are_parenthesised_where_they_hold_an_operator():
    assert shape_text(["batch", 16, H, W]) == "batch×16×(floor(height/2 - 1/2) + 1)×(floor(width/2 - 1/2) + 1)"
    assert shape_text(["N", "s0*s1", "ceil(x/2)", "(a+b)", "f(a) + g(b)", None, -1]) == \
        "N×(s0*s1)×ceil(x/2)×(a+b)×(f(a) + g(b))×?×-1"
    assert shape_text([1, 3, 224, 224]) == "1×3×224×224" and shape_text([]) == "scalar" and shape_text(None) == ""


def test_long_symbolic_shapes_get_a_short_label():
    assert shape_label(["batch", 16, H, W]) == "batch×16×(⌊h/2-1/2⌋+1)×(⌊w/2-1/2⌋+1)"
    # names inside expressions keep the prefix that tells them apart; lone names stay whole
    assert shape_label(["batch", "ceil(height/4)", "ceil(hidden/4)"]) == "batch×⌈he/4⌉×⌈hi/4⌉"
    assert shape_label([1, 3, 224, 224]) == "1×3×224×224"                  # short shapes are left as they are
    text = shape_label(["floor(" * 5000 + "x" + ")" * 5000])               # a file's text: bounded work and size
    assert len(text) == 48 and text.endswith("…")


def symbolic_model() -> onnx.ModelProto:
    """x[batch,3,height,width] → Conv (stride 2) → Relu → Conv → Relu, the conv outputs named as torch.export
    writes them (sympy expressions)."""
    w1 = numpy_helper.from_array(np.zeros((16, 3, 3, 3), np.float32), "w1")
    w2 = numpy_helper.from_array(np.zeros((16, 16, 3, 3), np.float32), "w2")
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c2"], ["y"], name="relu2")]
    shape = ["batch", 16, H, W]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "height", "width"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], [w1, w2],
                          value_info=[helper.make_tensor_value_info(t, TensorProto.FLOAT, shape) for t in ("c1", "r1", "c2")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def fan_in_model(k: int = 12) -> onnx.ModelProto:
    """k inputs of different shapes into one Concat: k arrows end side by side on one box."""
    ins = [helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [1, i + 1, 17, 23]) for i in range(k)]
    node = helper.make_node("Concat", [f"x{i}" for i in range(k)], ["y"], name="cat", axis=1)
    g = helper.make_graph([node], "fan", ins, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


LABELS = """() => {
    const svg = document.querySelector('svg'), vb = svg.viewBox.baseVal;
    const box = (el) => { const b = el.getBBox(), m = el.getCTM(), r = svg.getCTM().inverse().multiply(m);
                          return [b.x * r.a + r.e, b.y * r.d + r.f, (b.x + b.width) * r.a + r.e, (b.y + b.height) * r.d + r.f]; };
    return {view: [vb.x, vb.y, vb.x + vb.width, vb.y + vb.height],
            labels: Array.from(svg.querySelectorAll('.edge text')).map((t) => box(t).concat([t.lastChild.textContent,
                      t.querySelector('title') ? t.querySelector('title').textContent : null])),
            boxes: Array.from(svg.querySelectorAll('.node > .box, .group > .box')).map(box)};
}"""


def drawn_labels(page, svg: str) -> dict:
    """Every edge label of an SVG picture as Chromium lays out its text: boxes in the picture's coordinates."""
    page.set_content(f"<html><body style='margin:0'>{svg}</body></html>")
    return page.evaluate(LABELS)


def hits(a, b) -> bool:
    return a[0] < b[2] - 0.5 and b[0] < a[2] - 0.5 and a[1] < b[3] - 0.5 and b[1] < a[3] - 0.5


@pytest.mark.browser
def test_short_label_with_the_full_shape_on_hover(page, tmp_path):
    onnx.save(symbolic_model(), tmp_path / "sym.onnx")
    doc = documents.build_document(tmp_path / "sym.onnx")
    got = drawn_labels(page, picture(doc.page, "svg"))
    full = "batch×16×(floor(height/2 - 1/2) + 1)×(floor(width/2 - 1/2) + 1)"
    short = [lab for lab in got["labels"] if lab[4] == "batch×16×(⌊h/2-1/2⌋+1)×(⌊w/2-1/2⌋+1)"]
    assert len(short) == 4 and all(lab[5] == full for lab in short)       # c1, r1, c2, y on their edges
    assert {lab[4] for lab in got["labels"]} - {short[0][4]} == {"batch×3×height×width"}
    assert all(lab[5] is None for lab in got["labels"] if lab[4] == "batch×3×height×width")
    tensors = {t[0]: t for t in doc.page["panes"][0]["tensors"]}
    assert tensors["c1"][1] == full                                    # the sidebar shows the whole expression


@pytest.mark.browser
@pytest.mark.parametrize("model", ["yolo", "fan_in", "symbolic"])
@pytest.mark.parametrize("rankdir", ["TB", "LR"])
def test_labels_never_overlap_each_other_or_a_box_or_leave_the_picture(page, tmp_path, yolo_path, model, rankdir):
    path = yolo_path
    if model != "yolo":
        path = tmp_path / f"{model}.onnx"
        onnx.save(fan_in_model() if model == "fan_in" else symbolic_model(), path)
    doc = documents.build_document(path, rankdir=rankdir)
    got = drawn_labels(page, picture(doc.page, "svg"))
    labels, boxes, (x0, y0, x1, y1) = got["labels"], got["boxes"], got["view"]
    assert len(labels) >= {"yolo": 200, "fan_in": 12, "symbolic": 4}[model]
    for i, a in enumerate(labels):
        assert x0 <= a[0] and a[2] <= x1 and y0 <= a[1] and a[3] <= y1, a
        assert not any(hits(a, b) for b in labels[i + 1:]), a
        assert not any(hits(a, b) for b in boxes), a
