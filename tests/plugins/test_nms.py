"""EfficientNMS against a naive numpy greedy NMS (TensorRT semantics) and torchvision;
NonMaxSuppression against ONNX Runtime. Both tactics."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kiln.errors import PluginError
from kiln.plugins import TensorDesc, registry
from kiln.plugins.builtin.nms import EfficientNMS, NonMaxSuppression, efficient_nms_fields

TACTICS = ("torch", "triton")


def _clustered_boxes(g, b, n, objects=6, extent=100.0, per_class=0):
    """Boxes jittered around a few objects, so that suppression really happens: [b, n, 4] corners
    (or [b, n, per_class, 4]). A few boxes are flipped (x2 < x1) or empty."""
    shape = (b, n) + ((per_class,) if per_class else ())
    centers = g.uniform(10, extent - 10, (b, objects, 2))
    sizes = g.uniform(8, 30, (b, objects, 2))
    pick = g.integers(0, objects, shape)
    bi = np.arange(b).reshape((b,) + (1,) * (len(shape) - 1))
    c = centers[bi, pick] + g.normal(0, 3, shape + (2,))
    s = sizes[bi, pick] * g.uniform(0.7, 1.3, shape + (2,))
    boxes = np.concatenate([c - s / 2, c + s / 2], -1).astype(np.float32)
    flat = boxes.reshape(-1, 4)
    flat[::17] = flat[::17][:, [2, 3, 0, 1]]        # flipped corners
    flat[5] = [40, 40, 40, 50]                       # zero area
    return boxes


def _iou_trt(a, b):
    a = np.array([min(a[0], a[2]), min(a[1], a[3]), max(a[0], a[2]), max(a[1], a[3])], np.float32)
    b = np.array([min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]), max(b[1], b[3])], np.float32)
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def reference_efficient_nms(boxes, scores, score_threshold, iou_threshold, max_output_boxes, background_class=-1,
                            score_activation=False, class_agnostic=False, box_coding=0):
    """Naive greedy NMS with EfficientNMS_TRT's rules, one candidate at a time."""
    bsz, n, c = scores.shape
    num = np.zeros((bsz, 1), np.int32)
    obox = np.zeros((bsz, max_output_boxes, 4), np.float32)
    oscore = np.zeros((bsz, max_output_boxes), np.float32)
    ocls = np.zeros((bsz, max_output_boxes), np.int32)
    for b in range(bsz):
        cands = []
        for i in range(n):
            for k in range(c):
                s = float(scores[b, i, k])
                act = 1 / (1 + math.exp(-s)) if score_activation else s
                if k != background_class and act >= score_threshold:
                    cands.append((-s, i * c + k))
        cands.sort()
        kept = []
        for neg, flat in cands[:4096]:
            i, k = divmod(flat, c)
            raw = boxes[b, i, k] if boxes.ndim == 4 else boxes[b, i]
            if box_coding == 1:
                raw = np.array([raw[0] - raw[2] / 2, raw[1] - raw[3] / 2, raw[0] + raw[2] / 2, raw[1] + raw[3] / 2],
                               np.float32)
            if all(not (class_agnostic or kk == k) or _iou_trt(raw, kb) < iou_threshold for _, kb, kk in kept):
                kept.append((-neg, raw, k))
                if len(kept) == max_output_boxes:
                    break
        num[b, 0] = len(kept)
        for j, (s, bx, k) in enumerate(kept):
            obox[b, j] = bx
            oscore[b, j] = 1 / (1 + math.exp(-s)) if score_activation else s
            ocls[b, j] = k
    return num, obox, oscore, ocls


def _check(got, want):
    num, obox, oscore, ocls = [t.cpu().numpy() for t in got]
    np.testing.assert_array_equal(num, want[0])
    np.testing.assert_array_equal(ocls, want[3])
    np.testing.assert_allclose(obox, want[1], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(oscore, want[2], rtol=1e-5, atol=1e-6)


EFFICIENT_CASES = {
    "class-aware": dict(score_threshold=0.3, iou_threshold=0.45, max_output_boxes=50),
    "agnostic-truncated": dict(score_threshold=0.2, iou_threshold=0.5, max_output_boxes=7, class_agnostic=True),
    "background-0": dict(score_threshold=0.25, iou_threshold=0.4, max_output_boxes=30, background_class=0),
    "sigmoid-logits": dict(score_threshold=0.4, iou_threshold=0.5, max_output_boxes=40, score_activation=True),
    "center-size": dict(score_threshold=0.3, iou_threshold=0.5, max_output_boxes=25, box_coding=1),
    "per-class-boxes": dict(score_threshold=0.3, iou_threshold=0.5, max_output_boxes=30, per_class=True),
    "iou-zero-threshold": dict(score_threshold=0.5, iou_threshold=0.0, max_output_boxes=20),
}


@pytest.mark.parametrize("tactic", TACTICS)
@pytest.mark.parametrize("case", list(EFFICIENT_CASES))
def test_efficient_nms_matches_naive_reference(ref, case, tactic):
    cfg = dict(EFFICIENT_CASES[case])
    per_class = cfg.pop("per_class", False)
    g = np.random.default_rng(len(case))
    b, n, c = 2, 40, 5
    boxes = _clustered_boxes(g, b, n, per_class=c if per_class else 0)
    if cfg.get("box_coding") == 1:
        boxes = np.concatenate([(boxes[..., :2] + boxes[..., 2:]) / 2, boxes[..., 2:] - boxes[..., :2]], -1)
    scores = (g.normal(-1, 2, (b, n, c)) if cfg.get("score_activation") else g.uniform(0, 1, (b, n, c)))
    scores = scores.astype(np.float32)
    want = reference_efficient_nms(boxes, scores, **cfg)
    plugin = EfficientNMS(**EfficientNMS.onnx_fields({k: int(v) if isinstance(v, bool) else v
                                                      for k, v in cfg.items()}, 1))
    got = ref.run(plugin, ref.dev(boxes, scores), tactic)
    assert [t.dtype for t in got] == [torch.int32, torch.float32, torch.float32, torch.int32]
    _check(got, want)


@pytest.mark.parametrize("tactic", TACTICS)
def test_efficient_nms_caps_candidates_at_4096(ref, tactic):
    g = np.random.default_rng(7)
    b, n, c = 1, 1100, 4                               # 4400 (box, class) pairs > 4096
    boxes = _clustered_boxes(g, b, n, objects=40, extent=400.0)
    scores = g.uniform(0, 1, (b, n, c)).astype(np.float32)
    cfg = dict(score_threshold=0.0, iou_threshold=0.6, max_output_boxes=25)
    got = ref.run(EfficientNMS(**cfg), ref.dev(boxes, scores), tactic)
    _check(got, reference_efficient_nms(boxes, scores, **cfg))


@pytest.mark.parametrize("tactic", TACTICS)
def test_efficient_nms_nothing_passes_and_float16(ref, tactic):
    g = np.random.default_rng(8)
    boxes = _clustered_boxes(g, 3, 20)
    scores = g.uniform(0, 0.2, (3, 20, 4)).astype(np.float32)
    got = ref.run(EfficientNMS(score_threshold=0.5, max_output_boxes=10), ref.dev(boxes, scores), tactic)
    assert int(got[0].sum()) == 0 and not got[1].any() and not got[2].any() and not got[3].any()
    scores[1, 3, 2] = 0.9
    bx, sc = ref.dev(boxes, scores)
    got = ref.run(EfficientNMS(score_threshold=0.5, max_output_boxes=10), [bx.half(), sc.half()], tactic)
    assert got[1].dtype == torch.float16 and got[0][:, 0].tolist() == [0, 1, 0]
    assert int(got[3][1, 0]) == 2 and abs(float(got[2][1, 0]) - 0.9) < 1e-3


@pytest.mark.parametrize("tactic", TACTICS)
def test_efficient_nms_matches_torchvision_batched_nms(ref, tactic):
    tv = pytest.importorskip("torchvision")
    g = np.random.default_rng(9)
    boxes = _clustered_boxes(g, 1, 60)
    boxes = np.concatenate([np.minimum(boxes[..., :2], boxes[..., 2:]), np.maximum(boxes[..., :2], boxes[..., 2:])],
                           -1)
    scores = g.uniform(0, 1, (1, 60, 3)).astype(np.float32)
    bx, sc = ref.dev(boxes, scores)
    keep_s = sc[0] > 0.3
    n_idx, c_idx = torch.nonzero(keep_s, as_tuple=True)
    keep = tv.ops.batched_nms(bx[0][n_idx], sc[0][n_idx, c_idx], c_idx, 0.5)[:20]
    got = ref.run(EfficientNMS(score_threshold=0.3, iou_threshold=0.5, max_output_boxes=20), [bx, sc], tactic)
    assert int(got[0]) == len(keep)
    torch.testing.assert_close(got[2][0, :len(keep)], sc[0][n_idx, c_idx][keep])
    torch.testing.assert_close(got[3][0, :len(keep)].long(), c_idx[keep])


def test_efficient_nms_fields_descs_workspace():
    f = efficient_nms_fields({"score_threshold": 0.25, "iou_threshold": 0.45, "max_output_boxes": 300,
                              "score_activation": 1, "class_agnostic": 0, "box_coding": 1}, 1)
    p = EfficientNMS(**f)
    assert p.score_activation is True and p.class_agnostic is False and p.background_class == -1
    descs = p.output_descs([TensorDesc(("B", 25200, 4), "float16"), TensorDesc(("B", 25200, 80), "float16")])
    assert [d.shape for d in descs] == [("B", 1), ("B", 300, 4), ("B", 300), ("B", 300)]
    assert [d.dtype for d in descs] == ["int32", "float16", "float16", "int32"]
    ws = p.workspace_size([TensorDesc((8, 25200, 4), "float32"), TensorDesc((8, 25200, 80), "float32")])
    assert 8 * 25200 * 80 * 4 < ws < 8 * 25200 * 80 * 4 + (2 << 20)
    with pytest.raises(PluginError, match="concrete"):
        p.workspace_size([TensorDesc(("B", 25200, 4), "float32"), TensorDesc(("B", 25200, 80), "float32")])
    with pytest.raises(PluginError, match="score_activation"):
        EfficientNMS(score_activation=1)        # fields are typed: a bool, not an int
    assert registry.get("EfficientNMS", "kiln", "1") is EfficientNMS


# ---- ONNX NonMaxSuppression ------------------------------------------------------------------

def _onnx_case(seed, b, n, c, center=False):
    g = np.random.default_rng(seed)
    boxes = _clustered_boxes(g, b, n)
    boxes = boxes[..., [1, 0, 3, 2]]                  # ONNX corner order is [y1, x1, y2, x2]
    if center:
        boxes = np.concatenate([(boxes[..., :2] + boxes[..., 2:]) / 2, np.abs(boxes[..., 2:] - boxes[..., :2])], -1)
        boxes = boxes[..., [1, 0, 3, 2]]              # [x_c, y_c, w, h]
    scores = g.uniform(0, 1, (b, c, n)).astype(np.float32)
    scores[0, 0, 3] = scores[0, 0, 4] = 0.75          # a tie: the lower index goes first
    return np.ascontiguousarray(boxes, dtype=np.float32), scores


NMS_CASES = {
    "all-inputs": dict(max_out=5, iou=0.5, score=0.4),
    "no-score-threshold": dict(max_out=8, iou=0.3, score=None),
    "center-point-box": dict(max_out=6, iou=0.45, score=0.2, center=True),
    "at-threshold": dict(max_out=4, iou=0.5, score=0.75),
    "max-zero": dict(max_out=0, iou=0.5, score=0.1),
    "defaults-only": dict(max_out=None, iou=None, score=None),
}


@pytest.mark.parametrize("tactic", TACTICS)
@pytest.mark.parametrize("case", list(NMS_CASES))
@pytest.mark.parametrize("opset", (10, 11))
def test_onnx_nms_matches_onnxruntime(ref, case, tactic, opset):
    cfg = NMS_CASES[case]
    boxes, scores = _onnx_case(len(case), 2, 30, 3, cfg.get("center", False))
    optional = [("max_output_boxes_per_class", None if cfg["max_out"] is None else np.array([cfg["max_out"]], np.int64)),
                ("iou_threshold", None if cfg["iou"] is None else np.array([cfg["iou"]], np.float32)),
                ("score_threshold", None if cfg["score"] is None else np.array([cfg["score"]], np.float32))]
    while optional and optional[-1][1] is None:
        optional.pop()
    feeds = [("boxes", boxes), ("scores", scores)] + [(nm if a is not None else "", a) for nm, a in optional]
    attrs = {"center_point_box": 1} if cfg.get("center") else {}
    (want,) = ref.onnx("NonMaxSuppression", opset, feeds, ["selected"], **attrs)
    plugin = NonMaxSuppression(**NonMaxSuppression.onnx_fields(attrs, opset))
    (got,) = ref.run(plugin, ref.dev(boxes, scores, *[a for _, a in optional]), tactic)
    assert got.dtype == torch.int64
    np.testing.assert_array_equal(got.cpu().numpy(), want)


@pytest.mark.parametrize("tactic", TACTICS)
def test_onnx_nms_many_candidates_streams_in_chunks(ref, tactic):
    boxes, scores = _onnx_case(11, 1, 4500, 1)      # > 4096 candidates in one class: chunked kernel
    extra = [np.array([12], np.int64), np.array([0.5], np.float32), np.array([0.0], np.float32)]
    (want,) = ref.onnx("NonMaxSuppression", 11, [("boxes", boxes), ("scores", scores),
                                                 ("m", extra[0]), ("i", extra[1]), ("s", extra[2])], ["sel"])
    (got,) = ref.run(NonMaxSuppression(), ref.dev(boxes, scores, *extra), tactic)
    np.testing.assert_array_equal(got.cpu().numpy(), want)


def test_onnx_nms_contract():
    p = NonMaxSuppression()
    assert p.data_dependent_shapes
    (d,) = p.output_descs([TensorDesc(("B", "N", 4), "float32"), TensorDesc(("B", 80, "N"), "float32")])
    assert d.shape == (None, 3) and d.dtype == "int64"
    with pytest.raises(PluginError, match="iou_threshold"):
        p.forward([torch.zeros(1, 2, 4), torch.ones(1, 1, 2), torch.tensor([3]), torch.tensor([1.5])], None, None,
                  "torch")
    assert registry.get("NonMaxSuppression", "kiln") is NonMaxSuppression
