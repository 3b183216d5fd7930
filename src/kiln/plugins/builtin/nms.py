"""Non-maximum suppression: EfficientNMS (TensorRT's EfficientNMS_TRT) and ONNX NonMaxSuppression.

EfficientNMS has fixed output shapes (num_detections plus padded boxes/scores/classes),
so it runs inside a captured CUDA graph: per image, the 4096 best (box, class) scores
(torch.topk into the workspace), then one Triton program per image runs greedy NMS over
them with every candidate held in registers, then a small kernel writes the padded
outputs. Semantics follow TensorRT: keep scores >= score_threshold, suppress when
IoU >= iou_threshold (same class unless class_agnostic), sigmoid applied to the kept
scores only, boxes output as corners whatever the input coding.

NonMaxSuppression (opset 10/11) has a data-dependent output, so it allocates and reads
counts back to the host; it reuses the same greedy kernel with ONNX Runtime's rules
(keep scores > score_threshold, suppress when IoU > iou_threshold, never for empty boxes).
"""
from __future__ import annotations

import math
from typing import Any

from kiln.errors import PluginError
from kiln.plugins.base import Plugin, TensorDesc, field
from kiln.plugins.builtin import _util
from kiln.plugins.registry import register
from kiln.triton_support import cdiv, next_pow2, tl, triton

_FLOATS = ("float32", "float16", "bfloat16")
TOPK_LIMIT = 4096          # candidates per image that enter NMS, as TensorRT
_MAX_REGISTER_BLOCK = 4096  # above this many candidates the greedy kernel streams them in chunks


def efficient_nms_fields(attrs: dict, opset: int) -> dict:
    """TensorRT's attribute names and defaults; ints become the bools the fields declare."""
    return {"score_threshold": float(attrs.get("score_threshold", 0.5)),
            "iou_threshold": float(attrs.get("iou_threshold", 0.5)),
            "max_output_boxes": int(attrs.get("max_output_boxes", 100)),
            "background_class": int(attrs.get("background_class", -1)),
            "score_activation": bool(attrs.get("score_activation", 0)),
            "class_agnostic": bool(attrs.get("class_agnostic", 0)),
            "box_coding": int(attrs.get("box_coding", 0))}


@register
class EfficientNMS(Plugin):
    """boxes [B,N,4] (or [B,N,C,4] per class) and scores [B,N,C] -> num_detections [B,1] int32,
    detection_boxes [B,max,4], detection_scores [B,max], detection_classes [B,max] int32."""

    name = "EfficientNMS"
    namespace = "kiln"
    version = "1"
    # "torch" also runs on CUDA tensors, but syncs with the host: eager use only, not a GPU tactic.
    tactics = {"cuda": ("triton",), "cpu": ("torch",)}

    score_threshold = field(float, 0.5, "keep (box, class) pairs scoring at least this")
    iou_threshold = field(float, 0.5, "suppress boxes overlapping a kept one at least this much")
    max_output_boxes = field(int, 100, "detections per image (outputs are padded to this)")
    background_class = field(int, -1, "class id to ignore; -1 for none")
    score_activation = field(bool, False, "scores are logits: threshold and report sigmoid(score)")
    class_agnostic = field(bool, False, "suppress across classes")
    box_coding = field(int, 0, "0: corners (x1, y1, x2, y2); 1: center-size (x, y, w, h)", choices=(0, 1))

    @classmethod
    def onnx_fields(cls, attrs: dict, opset: int) -> dict:
        return efficient_nms_fields(attrs, opset)

    def output_descs(self, inputs: list[TensorDesc]) -> list[TensorDesc]:
        boxes, scores = inputs[0], inputs[1]
        if scores.rank != 3 or boxes.rank not in (3, 4) or boxes.shape[-1] not in (4, None):
            raise PluginError(f"Plugin EfficientNMS needs boxes [B,N,4] or [B,N,C,4] and scores [B,N,C]; "
                              f"got {boxes.shape} and {scores.shape}.")
        b, m = scores.shape[0], self.max_output_boxes
        return [TensorDesc((b, 1), "int32"), TensorDesc((b, m, 4), boxes.dtype), TensorDesc((b, m), scores.dtype),
                TensorDesc((b, m), "int32")]

    def supports(self, index: int, desc: TensorDesc, num_inputs: int) -> bool:
        if desc.layout != "linear":
            return False
        return desc.dtype == "int32" if index in (num_inputs, num_inputs + 3) else desc.dtype in _FLOATS

    def _parts(self, b: int, n: int, c: int, score_dtype: Any) -> list:
        import torch

        k = min(n * c, TOPK_LIMIT)
        return [((b, n * c), score_dtype), ((b, k), score_dtype), ((b, k), torch.int64), ((b, 4, k), torch.float32),
                ((b, k), torch.int32), ((b, max(self.max_output_boxes, 1)), torch.int32), ((b,), torch.int32)]

    def workspace_size(self, inputs: list[TensorDesc]) -> int:
        """Masked scores, the top-k candidates, their decoded boxes and the kept list."""
        b, n, c = _util.concrete(self.name, inputs[1].shape, "scores")
        es = _util.itemsize(inputs[1].dtype)
        k = min(n * c, TOPK_LIMIT)
        return _util.workspace_bytes([(b * n * c, es), (b * k, es), (b * k, 8), (b * 4 * k, 4), (b * k, 4),
                                      (b * max(self.max_output_boxes, 1), 4), (b, 4)])

    def forward(self, inputs: list[Any], outputs: list[Any], workspace: Any, tactic: str) -> None:
        boxes, scores = inputs[0], inputs[1]
        if tactic == "torch":
            for out, val in zip(outputs, _efficient_nms_torch(self, boxes, scores)):
                out.copy_(val)
        elif tactic == "triton":
            _util.require_triton(self.name)
            _efficient_nms_triton(self, boxes, scores, outputs, workspace)
        else:
            raise PluginError(f"Plugin EfficientNMS has no tactic {tactic!r}; use 'triton' or 'torch'.")

    def _raw_threshold(self) -> float:
        """The score threshold in the space of the input scores (logits under score_activation)."""
        t = self.score_threshold
        if not self.score_activation:
            return t
        if t <= 0.0:
            return -math.inf
        return math.inf if t >= 1.0 else math.log(t / (1.0 - t))


def nms_fields(attrs: dict, opset: int) -> dict:
    return {"center_point_box": int(attrs.get("center_point_box", 0))}


@register
class NonMaxSuppression(Plugin):
    """ONNX NonMaxSuppression: boxes [B,N,4], scores [B,C,N], optional max_output_boxes_per_class,
    iou_threshold, score_threshold -> selected_indices [num, 3] int64 (batch, class, box)."""

    name = "NonMaxSuppression"
    namespace = "kiln"
    version = "1"
    tactics = {"cuda": ("triton", "torch"), "cpu": ("torch",)}
    data_dependent_shapes = True

    center_point_box = field(int, 0, "0: [y1, x1, y2, x2] corners; 1: [x_center, y_center, w, h]", choices=(0, 1))

    @classmethod
    def onnx_fields(cls, attrs: dict, opset: int) -> dict:
        return nms_fields(attrs, opset)

    def output_descs(self, inputs: list[TensorDesc]) -> list[TensorDesc]:
        if inputs[0].rank != 3 or inputs[1].rank != 3:
            raise PluginError(f"Plugin NonMaxSuppression needs boxes [B,N,4] and scores [B,C,N]; "
                              f"got {inputs[0].shape} and {inputs[1].shape}.")
        return [TensorDesc((None, 3), "int64")]

    def supports(self, index: int, desc: TensorDesc, num_inputs: int) -> bool:
        want = {2: ("int64",), num_inputs: ("int64",)}.get(index, ("float32", "float16"))
        return desc.layout == "linear" and desc.dtype in want

    def forward(self, inputs: list[Any], outputs: Any, workspace: Any, tactic: str) -> list[Any]:
        if tactic not in ("torch", "triton"):
            raise PluginError(f"Plugin NonMaxSuppression has no tactic {tactic!r}; use 'triton' or 'torch'.")
        if tactic == "triton":
            _util.require_triton(self.name)
        return [_onnx_nms(self, inputs, tactic)]


# ---- shared pieces ---------------------------------------------------------------------------

def _corners(box: Any, center: bool, reorder: bool) -> Any:
    """[..., 4] boxes as (a1, b1, a2, b2) corners; ``reorder`` sorts each pair (min, max)."""
    import torch

    if center:
        a, b, w, h = box.unbind(-1)
        box = torch.stack([a - w / 2, b - h / 2, a + w / 2, b + h / 2], -1)
    if reorder:
        lo = torch.minimum(box[..., :2], box[..., 2:])
        hi = torch.maximum(box[..., :2], box[..., 2:])
        box = torch.cat([lo, hi], -1)
    return box


def _greedy_torch(cand: Any, cls: Any, max_out: int, iou_thr: float, onnx_rule: bool, agnostic: bool) -> tuple:
    """Greedy NMS per row over score-sorted candidates. cand [P,K,4] normalized (lo, lo, hi, hi);
    cls [P,K] with -1 for invalid. Returns kept positions [P, max_out] (-1 padded) and counts [P]."""
    import torch

    p, k = cls.shape
    keep = torch.full((p, max(max_out, 1)), -1, dtype=torch.long, device=cls.device)
    counts = torch.zeros(p, dtype=torch.long, device=cls.device)
    area = (cand[..., 2] - cand[..., 0]) * (cand[..., 3] - cand[..., 1])
    for r in range(p):
        alive = (cls[r] >= 0).clone()
        pos = torch.arange(k, device=cls.device)
        n = 0
        while n < max_out:
            live = torch.nonzero(alive)
            if live.numel() == 0:
                break
            i = int(live[0, 0])
            keep[r, n] = i
            n += 1
            bi = cand[r, i]
            iw = torch.minimum(cand[r, :, 2], bi[2]) - torch.maximum(cand[r, :, 0], bi[0])
            ih = torch.minimum(cand[r, :, 3], bi[3]) - torch.maximum(cand[r, :, 1], bi[1])
            inter = iw * ih
            ok = (iw > 0) & (ih > 0)
            union = area[r] + area[r, i] - inter
            iou = torch.where(ok & (union > 0), inter / torch.where(union > 0, union, torch.ones_like(union)),
                              torch.zeros_like(inter))
            if onnx_rule:
                sup = ok & (area[r] > 0) & (area[r, i] > 0) & (union > 0) & (iou > iou_thr)
            else:
                sup = iou >= iou_thr
            if not agnostic:
                sup &= cls[r] == cls[r, i]
            alive &= ~sup & (pos != i)
        counts[r] = n
    return keep, counts


# ---- EfficientNMS: torch ---------------------------------------------------------------------

def _candidates_torch(p: EfficientNMS, boxes: Any, scores: Any) -> tuple:
    """Top-k (box, class) pairs per image, as TensorRT's filter + sort: values, flat indices."""
    import torch

    b, n, c = scores.shape
    flat = scores.reshape(b, n * c)
    if 0 <= p.background_class < c:
        flat = flat.clone()
        flat.view(b, n, c)[:, :, p.background_class] = -math.inf
    return torch.topk(flat, min(n * c, TOPK_LIMIT), dim=1, sorted=True)


def _efficient_nms_torch(p: EfficientNMS, boxes: Any, scores: Any) -> list:
    import torch

    b, n, c = scores.shape
    m = p.max_output_boxes
    dev = scores.device
    outs = [torch.zeros(b, 1, dtype=torch.int32, device=dev), torch.zeros(b, m, 4, dtype=boxes.dtype, device=dev),
            torch.zeros(b, m, dtype=scores.dtype, device=dev), torch.zeros(b, m, dtype=torch.int32, device=dev)]
    if n * c == 0 or m == 0:
        return outs
    vals, idx = _candidates_torch(p, boxes, scores)
    box_i, cls = idx // c, idx % c
    valid = (vals.float() >= p._raw_threshold()) & (cls != p.background_class)
    bsel = torch.arange(b, device=dev)[:, None]
    raw = boxes[bsel, box_i, cls] if boxes.dim() == 4 else boxes[bsel, box_i]
    dec = _corners(raw.float(), p.box_coding == 1, reorder=False)
    keep, counts = _greedy_torch(_corners(dec, False, reorder=True), torch.where(valid, cls, -1).int(),
                                 m, p.iou_threshold, onnx_rule=False, agnostic=p.class_agnostic)
    for i in range(b):
        k = int(counts[i])
        sel = keep[i, :k]
        s = vals[i, sel].float()
        outs[0][i, 0] = k
        outs[1][i, :k] = dec[i, sel].to(boxes.dtype)
        outs[2][i, :k] = (torch.sigmoid(s) if p.score_activation else s).to(scores.dtype)
        outs[3][i, :k] = cls[i, sel].int()
    return outs


# ---- GPU: Triton -----------------------------------------------------------------------------

@triton.jit
def _nms_mask_kernel(s_ptr, out_ptr, total, NC, C, ssb, ssn, ssc, BG, BLOCK: tl.constexpr):
    """Scores -> [B, N*C] with the background class at -inf (and any strides made dense)."""
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = j < total
    b = j // NC
    r = j % NC
    cls = r % C
    v = tl.load(s_ptr + b * ssb + (r // C) * ssn + cls * ssc, mask=m, other=0.0)
    v = tl.where(cls == BG, float("-inf"), v.to(tl.float32))
    tl.store(out_ptr + j, v.to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _nms_gather_kernel(topv_ptr, topi_ptr, boxes_ptr, cand_ptr, cls_ptr, K, C, thr, BG, sbb, sbn, sbc, sbk,
                       CLASS_BOXES: tl.constexpr, CENTER: tl.constexpr, BLOCK: tl.constexpr):
    """Decode the top-k candidates' boxes to normalized corners; class -1 marks the invalid."""
    b = tl.program_id(0).to(tl.int64)
    o = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = o < K
    s = tl.load(topv_ptr + b * K + o, mask=m, other=float("-inf")).to(tl.float32)
    idx = tl.load(topi_ptr + b * K + o, mask=m, other=0)
    cls = (idx % C).to(tl.int32)
    valid = m & (s >= thr) & (cls != BG)
    bp = boxes_ptr + b * sbb + (idx // C) * sbn
    if CLASS_BOXES:
        bp += cls * sbc
    a1 = tl.load(bp, mask=valid, other=0.0).to(tl.float32)
    b1 = tl.load(bp + sbk, mask=valid, other=0.0).to(tl.float32)
    a2 = tl.load(bp + 2 * sbk, mask=valid, other=0.0).to(tl.float32)
    b2 = tl.load(bp + 3 * sbk, mask=valid, other=0.0).to(tl.float32)
    if CENTER:
        a1, b1, a2, b2 = a1 - a2 / 2, b1 - b2 / 2, a1 + a2 / 2, b1 + b2 / 2
    cp = cand_ptr + b * 4 * K + o
    tl.store(cp, tl.minimum(a1, a2), mask=m)
    tl.store(cp + K, tl.minimum(b1, b2), mask=m)
    tl.store(cp + 2 * K, tl.maximum(a1, a2), mask=m)
    tl.store(cp + 3 * K, tl.maximum(b1, b2), mask=m)
    tl.store(cls_ptr + b * K + o, tl.where(valid, cls, -1), mask=m)


@triton.jit
def _suppressed(lo0, lo1, hi0, hi1, area, l0, l1, h0, h1, iou_thr, ONNX_RULE: tl.constexpr, BLOCK: tl.constexpr):
    """Which candidates (lo*, hi*, area) the kept box (l*, h*) suppresses: IoU >= threshold
    (TensorRT), or > threshold with empty boxes never suppressed (ONNX)."""
    ai = (h0 - l0) * (h1 - l1)
    iw = tl.minimum(hi0, h0) - tl.maximum(lo0, l0)
    ih = tl.minimum(hi1, h1) - tl.maximum(lo1, l1)
    inter = iw * ih
    ok = (iw > 0.0) & (ih > 0.0)
    union = area + ai - inter
    iou = tl.where(ok & (union > 0.0), inter / tl.where(union > 0.0, union, 1.0), 0.0)
    if ONNX_RULE:
        return ok & (area > 0.0) & (tl.broadcast_to(ai, [BLOCK]) > 0.0) & (union > 0.0) & (iou > iou_thr)
    return iou >= iou_thr


@triton.jit
def _nms_greedy_kernel(cand_ptr, cls_ptr, alive_ptr, keep_ptr, nkeep_ptr, K, MAX_OUT, iou_thr,
                       ONNX_RULE: tl.constexpr, AGNOSTIC: tl.constexpr, CHUNKED: tl.constexpr,
                       BLOCK: tl.constexpr):
    """Greedy NMS for one row of score-sorted candidates (one program per image or (image, class)).

    Each step keeps the best live candidate and suppresses what overlaps it; the next
    keeper is the first live candidate left, so the loop runs once per *kept* box.
    Without CHUNKED every candidate stays in registers (K <= BLOCK); with it they are
    streamed from memory in BLOCK chunks and the live flags live in ``alive_ptr``.
    """
    row = tl.program_id(0).to(tl.int64)
    cb = cand_ptr + row * 4 * K
    kb = keep_ptr + row * MAX_OUT
    lanes = tl.arange(0, BLOCK)
    cnt = tl.full([], 0, tl.int32)
    if not CHUNKED:
        m = lanes < K
        lo0 = tl.load(cb + lanes, mask=m, other=0.0)
        lo1 = tl.load(cb + K + lanes, mask=m, other=0.0)
        hi0 = tl.load(cb + 2 * K + lanes, mask=m, other=0.0)
        hi1 = tl.load(cb + 3 * K + lanes, mask=m, other=0.0)
        cls = tl.load(cls_ptr + row * K + lanes, mask=m, other=-1)
        area = (hi0 - lo0) * (hi1 - lo1)
        alive = cls >= 0
        i = tl.min(tl.where(alive, lanes, BLOCK), axis=0)
        while (i < BLOCK) & (cnt < MAX_OUT):
            tl.store(kb + cnt, i)
            cnt += 1
            l0 = tl.load(cb + i)
            l1 = tl.load(cb + K + i)
            h0 = tl.load(cb + 2 * K + i)
            h1 = tl.load(cb + 3 * K + i)
            ci = tl.load(cls_ptr + row * K + i)
            sup = _suppressed(lo0, lo1, hi0, hi1, area, l0, l1, h0, h1, iou_thr, ONNX_RULE, BLOCK)
            if not AGNOSTIC:
                sup = sup & (cls == ci)
            alive = alive & (~sup) & (lanes != i)
            i = tl.min(tl.where(alive, lanes, BLOCK), axis=0)
    else:
        ab = alive_ptr + row * K
        c0 = tl.full([], 0, tl.int32)
        i = tl.full([], K, tl.int32)
        while c0 < K:                                   # live = valid; first live candidate
            o = c0 + lanes
            a = tl.load(cls_ptr + row * K + o, mask=o < K, other=-1) >= 0
            tl.store(ab + o, a.to(tl.int8), mask=o < K)
            i = tl.minimum(i, tl.min(tl.where(a, o, K), axis=0))
            c0 += BLOCK
        tl.debug_barrier()
        while (i < K) & (cnt < MAX_OUT):
            tl.store(kb + cnt, i)
            cnt += 1
            l0 = tl.load(cb + i)
            l1 = tl.load(cb + K + i)
            h0 = tl.load(cb + 2 * K + i)
            h1 = tl.load(cb + 3 * K + i)
            ci = tl.load(cls_ptr + row * K + i)
            nxt = tl.full([], K, tl.int32)
            c0 = (i + 1) // BLOCK * BLOCK
            while c0 < K:
                o = c0 + lanes
                m = (o > i) & (o < K)
                a = tl.load(ab + o, mask=m, other=0) != 0
                lm = m & a
                lo0 = tl.load(cb + o, mask=lm, other=0.0)
                lo1 = tl.load(cb + K + o, mask=lm, other=0.0)
                hi0 = tl.load(cb + 2 * K + o, mask=lm, other=0.0)
                hi1 = tl.load(cb + 3 * K + o, mask=lm, other=0.0)
                area = (hi0 - lo0) * (hi1 - lo1)
                sup = _suppressed(lo0, lo1, hi0, hi1, area, l0, l1, h0, h1, iou_thr, ONNX_RULE, BLOCK)
                if not AGNOSTIC:
                    sup = sup & (tl.load(cls_ptr + row * K + o, mask=lm, other=-1) == ci)
                a = lm & (~sup)
                tl.store(ab + o, a.to(tl.int8), mask=m)
                nxt = tl.minimum(nxt, tl.min(tl.where(a, o, K), axis=0))
                c0 += BLOCK
            tl.debug_barrier()
            i = nxt
    tl.store(nkeep_ptr + row, cnt)


@triton.jit
def _nms_output_kernel(keep_ptr, nkeep_ptr, topv_ptr, topi_ptr, boxes_ptr, num_ptr, obox_ptr, oscore_ptr,
                       ocls_ptr, K, C, MAX_OUT, sbb, sbn, sbc, sbk, CLASS_BOXES: tl.constexpr,
                       CENTER: tl.constexpr, SIGMOID: tl.constexpr, BLOCK: tl.constexpr):
    """Write the kept detections in score order, zeros after them, and the count."""
    b = tl.program_id(0).to(tl.int64)
    o = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cnt = tl.load(nkeep_ptr + b)
    om = o < MAX_OUT
    m = om & (o < cnt)
    pos = tl.load(keep_ptr + b * MAX_OUT + o, mask=m, other=0)
    s = tl.load(topv_ptr + b * K + pos, mask=m, other=0.0).to(tl.float32)
    idx = tl.load(topi_ptr + b * K + pos, mask=m, other=0)
    cls = (idx % C).to(tl.int32)
    bp = boxes_ptr + b * sbb + (idx // C) * sbn
    if CLASS_BOXES:
        bp += cls * sbc
    a1 = tl.load(bp, mask=m, other=0.0).to(tl.float32)
    b1 = tl.load(bp + sbk, mask=m, other=0.0).to(tl.float32)
    a2 = tl.load(bp + 2 * sbk, mask=m, other=0.0).to(tl.float32)
    b2 = tl.load(bp + 3 * sbk, mask=m, other=0.0).to(tl.float32)
    if CENTER:
        a1, b1, a2, b2 = a1 - a2 / 2, b1 - b2 / 2, a1 + a2 / 2, b1 + b2 / 2
    if SIGMOID:
        s = tl.sigmoid(s)
    ob = obox_ptr + (b * MAX_OUT + o) * 4
    tl.store(ob, tl.where(m, a1, 0.0).to(obox_ptr.dtype.element_ty), mask=om)
    tl.store(ob + 1, tl.where(m, b1, 0.0).to(obox_ptr.dtype.element_ty), mask=om)
    tl.store(ob + 2, tl.where(m, a2, 0.0).to(obox_ptr.dtype.element_ty), mask=om)
    tl.store(ob + 3, tl.where(m, b2, 0.0).to(obox_ptr.dtype.element_ty), mask=om)
    tl.store(oscore_ptr + b * MAX_OUT + o, tl.where(m, s, 0.0).to(oscore_ptr.dtype.element_ty), mask=om)
    tl.store(ocls_ptr + b * MAX_OUT + o, tl.where(m, cls, 0), mask=om)
    if tl.program_id(1) == 0:
        tl.store(num_ptr + b, cnt)


def greedy_launch_config(k: int) -> tuple[int, bool, int]:
    """(BLOCK, CHUNKED, num_warps): all candidates in registers up to 4096 (8 per thread)."""
    if k <= _MAX_REGISTER_BLOCK:
        block = max(16, next_pow2(k))
        return block, False, max(1, min(16, block // 256))
    return 1024, True, 8


def _box_strides(boxes: Any) -> tuple:
    if boxes.dim() == 4:
        return boxes.stride(0), boxes.stride(1), boxes.stride(2), boxes.stride(3)
    return boxes.stride(0), boxes.stride(1), 0, boxes.stride(2)


def _efficient_nms_triton(p: EfficientNMS, boxes: Any, scores: Any, outputs: list, workspace: Any) -> None:
    import torch

    num, obox, oscore, ocls = outputs
    b, n, c = scores.shape
    m = p.max_output_boxes
    if b == 0:
        return
    if n * c == 0 or m == 0:
        for t in outputs:
            t.zero_()
        return
    k = min(n * c, TOPK_LIMIT)
    masked, topv, topi, cand, cls, keep, nkeep = _util.carve(workspace, p._parts(b, n, c, scores.dtype),
                                                             scores.device, p.name)
    if 0 <= p.background_class < c or not scores.is_contiguous():
        total = b * n * c
        _nms_mask_kernel[(cdiv(total, 1024),)](scores, masked, total, n * c, c, *scores.stride(),
                                                     p.background_class, BLOCK=1024, num_warps=4)
        flat = masked
    else:
        flat = scores.view(b, n * c)
    torch.topk(flat, k, dim=1, largest=True, sorted=True, out=(topv, topi))
    sb = _box_strides(boxes)
    gblock = min(1024, next_pow2(k))
    _nms_gather_kernel[(b, cdiv(k, gblock))](topv, topi, boxes, cand, cls, k, c, float(p._raw_threshold()),
                                                   p.background_class, *sb, CLASS_BOXES=boxes.dim() == 4,
                                                   CENTER=p.box_coding == 1, BLOCK=gblock, num_warps=4)
    block, chunked, warps = greedy_launch_config(k)
    _nms_greedy_kernel[(b,)](cand, cls, cls, keep, nkeep, k, m, float(p.iou_threshold), ONNX_RULE=False,
                             AGNOSTIC=p.class_agnostic, CHUNKED=chunked, BLOCK=block, num_warps=warps)
    oblock = min(1024, next_pow2(m))
    _nms_output_kernel[(b, cdiv(m, oblock))](keep, nkeep, topv, topi, boxes, num, obox, oscore, ocls, k, c, m,
                                                   *sb, CLASS_BOXES=boxes.dim() == 4, CENTER=p.box_coding == 1,
                                                   SIGMOID=p.score_activation, BLOCK=oblock, num_warps=4)


# ---- ONNX NonMaxSuppression ------------------------------------------------------------------

def _scalar(t: Any, default: Any, kind: type) -> Any:
    if t is None or t.numel() == 0:
        return default
    return kind(t.reshape(-1)[0].item())      # host read: this op's output shape depends on values anyway


def _onnx_nms(p: NonMaxSuppression, inputs: list, tactic: str) -> Any:
    import torch

    boxes, scores = inputs[0], inputs[1]
    max_per_class = _scalar(_util.opt(inputs, 2), 0, int)
    iou_thr = _scalar(_util.opt(inputs, 3), 0.0, float)
    score_t = _util.opt(inputs, 4)
    dev = scores.device
    b, c, n = scores.shape
    if not 0.0 <= iou_thr <= 1.0:
        raise PluginError(f"Plugin NonMaxSuppression: iou_threshold must be within [0, 1], got {iou_thr}.")
    empty = torch.zeros(0, 3, dtype=torch.int64, device=dev)
    if max_per_class <= 0 or n == 0 or b * c == 0:
        return empty
    s = scores.float().reshape(b * c, n)
    if score_t is not None and score_t.numel():
        s = torch.where(s > _scalar(score_t, 0.0, float), s, torch.full_like(s, -math.inf))
    vals, order = torch.sort(s, dim=1, descending=True, stable=True)
    k = int((vals > -math.inf).sum(1).max())
    if k == 0:
        return empty
    vals, order = vals[:, :k].contiguous(), order[:, :k].contiguous()
    rows = torch.arange(b * c, device=dev)
    raw = boxes.float()[(rows // c)[:, None], order]                                     # [P, k, 4]
    cand = _corners(raw, p.center_point_box == 1, reorder=p.center_point_box == 0)
    cls = torch.where(vals > -math.inf, 0, -1).to(torch.int32)
    mo = min(max_per_class, k)
    if tactic == "torch":
        keep, counts = _greedy_torch(cand, cls, mo, iou_thr, onnx_rule=True, agnostic=True)
    else:
        keep = torch.empty(b * c, mo, dtype=torch.int32, device=dev)
        counts = torch.empty(b * c, dtype=torch.int32, device=dev)
        block, chunked, warps = greedy_launch_config(k)
        alive = torch.empty(b * c, k, dtype=torch.int8, device=dev) if chunked else cls
        _nms_greedy_kernel[(b * c,)](cand.permute(0, 2, 1).contiguous(), cls, alive, keep, counts, k, mo, iou_thr,
                                     ONNX_RULE=True, AGNOSTIC=True, CHUNKED=chunked, BLOCK=block, num_warps=warps)
    slot = torch.arange(mo, device=dev)
    r, j = torch.nonzero(slot[None, :] < counts[:, None].long(), as_tuple=True)
    box_idx = order[r, keep[r, j].long()]
    return torch.stack([r // c, r % c, box_idx], 1).to(torch.int64)
