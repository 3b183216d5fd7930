"""Explicit quantization folded into 8-bit layers (CUDA builds): DequantizeLinear -> convolution or GEMM
[-> QuantizeLinear] becomes one QConvolution or QFullyConnected that reads the 8-bit codes.

Cases:
- Q(conv(DQ(x), W, b?, r?)) with a 2-D convolution (its fused activation and residual included), the conv
  output read only by Q -> QConvolution writing Q's codes: the requantization runs in its epilogue; a residual
  r = DQ(codes) (TensorRT's placement on a residual add's shortcut) is read as its codes;
- Q(gemm(DQ(x), W, b?)) for FullyConnected, MatMul (constant 2-D B, A not transposed) and Gemm (constant 2-D
  B, alpha = beta = 1, A 2-D and not transposed, C absent, scalar or one per column) -> QFullyConnected
  writing Q's codes;
- the same without the QuantizeLinear (the float output is read elsewhere, or is a network output) -> the
  8-bit layer writing float;
- Q(y) of such a float output y (a ResNet block's output: the next block's input and its shortcut) -> the
  layer's second output, the codes computed from y as stored: no separate pass over y;
- Q(y) of a layer or RMS normalization's output y (a transformer block's LayerNorm: the next GEMMs' quantized
  input and the next residual add's float operand) -> the Normalization's codes output (attrs codes_scale,
  codes_zero_point, codes_to; after y and its sum output), computed from y as stored in the same pass;
- a convolution or GEMM reading a dequantized activation that none of these fits stays dequantized (float
  arithmetic on 8-bit-rounded values, the same numbers), and the build warns once naming it and why; so do
  other layers between DequantizeLinear and QuantizeLinear (ONNX Runtime's quantized Add, pooling).
The activation's DequantizeLinear is per tensor (int8, uint8 or FP8 E4M3 codes; an integer zero point, 0 for
FP8); the weight is quantized symmetrically per output channel or per tensor (int8 or FP8 E4M3): TensorRT's
explicit quantization, as ONNX Runtime's quantize_static (QDQ) and Kiln's own PTQ write it. The bias becomes
int32 codes in units of x_scale * w_scale, as ONNX Runtime stores it (a float bias is rounded to them).

Constant folding (a default pass) turns each weight's DequantizeLinear into a float constant; the
``RecordQuantizedConstants`` pass runs first, makes those constants itself and keeps their codes and scales in
the network's metadata, found by the float value's content (and its transpose's, which epilogue fusion makes
of a MatMul weight). The fold takes a weight's codes back when its float value is exactly their
dequantization, or, channel by channel, a multiple of it (batch normalization folded into the convolution:
new scales); a weight another pass changed otherwise is no longer 8-bit, and stays float.
"""
from __future__ import annotations

import hashlib
import warnings
from typing import NamedTuple

import numpy as np

from kiln.ir.network import Layer, Network, Tensor
from kiln.passes._match import scalar, substitute
from kiln.passes.base import Pass, PassResult, Stats
from kiln.passes.rewrite import ANY, Match, Op, Rule, Var, rewrite

RECORDS = "quantized_constants"       # network metadata: digest of a float constant's content -> Record
CODES = ("int8", "uint8", "float8_e4m3fn")
FLOAT_OUT = ("float32", "float16", "bfloat16")
GEMMS = ("Convolution", "FullyConnected", "MatMul", "Gemm")
QUANTIZED_KINDS = ("QConvolution", "QFullyConnected")
UNQUANTIZED = ("QuantizeLinear", "DequantizeLinear", *QUANTIZED_KINDS)     # never warned about
INT32 = (-(2 ** 31), 2 ** 31 - 1)


class QuantizationWarning(UserWarning):
    """A Q/DQ pattern the build runs dequantized instead of with 8-bit kernels."""


class Record(NamedTuple):
    """A constant that was DequantizeLinear(codes, scale) with zero points 0: ``scale`` along ``axis``; ``name``
    is the codes' constant's (an 8-bit layer's weight takes it back)."""

    codes: np.ndarray
    scale: np.ndarray
    axis: int
    name: str


def _dequantized(codes: np.ndarray, scale: np.ndarray, axis: int) -> np.ndarray:
    """codes * scale in float32 (DequantizeLinear's arithmetic), the scale per tensor or along ``axis``."""
    s = np.asarray(scale, np.float32)
    if s.size > 1:
        shape = [1] * codes.ndim
        shape[axis] = -1
        s = s.reshape(shape)
    return (codes.astype(np.float32) * s.reshape(s.shape if s.size > 1 else ())).astype(np.float32)


def _digest(value: np.ndarray) -> str:
    return hashlib.sha1(value.dtype.str.encode() + np.ascontiguousarray(value).tobytes()).hexdigest()


def _find(t: Tensor | None, records: dict[str, Record]) -> Record | None:
    """The record whose dequantization ``t``'s value exactly is, if any."""
    if t is None or not t.is_constant or t.dtype != "float32":
        return None
    rec = records.get(_digest(np.asarray(t.value)))
    return rec if rec is not None and np.array_equal(t.value, _dequantized(*rec[:3])) else None


class RecordQuantizedConstants(Pass):
    """Each DequantizeLinear of constant int8/int32/FP8 codes with zero points 0 and a float32 result becomes
    that float constant, its codes and scales kept in ``network.metadata[RECORDS]`` (runs before constant
    folding, which would drop them)."""

    name = "record quantized constants"

    def call(self, net: Network) -> PassResult:
        records: dict[str, Record] = net.metadata.setdefault(RECORDS, {})
        changed = False
        for dq in [layer for layer in net.layers if layer.kind == "DequantizeLinear"]:
            found = _constant_codes(dq)
            out = dq.outputs[0]
            if found is None or out in net.outputs:
                continue
            value = _dequantized(*found)
            c = net.add_constant(value, name=net.unique_name(f"{out.name}_dequantized"))
            codes, scale, axis = found
            name = dq.inputs[0].name
            net.replace_all_uses(out, c)
            net.remove_layer(dq)
            records[_digest(value)] = Record(codes, scale, axis, name)
            if value.ndim == 2:
                records[_digest(value.T)] = Record(codes.T, scale, 1 - axis, name)
            changed = True
        net.remove_unused_constants()
        return PassResult(net, changed)


def _constant_codes(dq: Layer) -> tuple[np.ndarray, np.ndarray, int] | None:
    ins = dq.inputs
    codes, scale, zp = ins[0], ins[1], ins[2] if len(ins) > 2 else None
    if not (codes is not None and codes.is_constant and codes.dtype in ("int8", "int32", "float8_e4m3fn")
            and scale is not None and scale.is_constant and scale.dtype == "float32"
            and dq.attrs.get("to", "float32") == "float32" and not dq.attrs.get("block_size")):
        return None
    if zp is not None and (not zp.is_constant or np.any(np.asarray(zp.value).astype(np.float32) != 0)):
        return None
    s = np.asarray(scale.value, np.float32)
    axis = int(dq.attrs.get("axis", 1))
    axis = axis + codes.value.ndim if axis < 0 else axis
    if s.size > 1 and not (s.ndim == 1 and 0 <= axis < codes.value.ndim and codes.value.shape[axis] == s.size):
        return None
    return np.asarray(codes.value), s.reshape(-1) if s.size > 1 else s.reshape(()), axis


class Plan(NamedTuple):
    """What the fold of one layer makes: the new kind, its weight and bias codes, its attributes and the
    residual it reads (a float tensor or 8-bit codes)."""

    kind: str
    weight: np.ndarray
    weight_name: str
    bias: np.ndarray
    attrs: dict
    residual: Tensor | None = None


def _activation(dq: Layer) -> tuple[float, int, str] | str:
    """(scale, zero point, codes dtype) of a per-tensor activation DequantizeLinear, or why it is not one."""
    codes, s = dq.inputs[0], scalar(dq.inputs[1])
    zp = dq.inputs[2] if len(dq.inputs) > 2 else None
    if codes is None or codes.is_constant or codes.dtype not in CODES:
        return f"its input is dequantized from {codes.dtype if codes is not None else 'nothing'}, not int8, uint8 " \
               f"or FP8 E4M3 activations"
    if s is None or not np.isfinite(s) or s <= 0 or dq.inputs[1].dtype != "float32" or dq.attrs.get("block_size"):
        return "its input's scale is not one positive float32 (per-channel or blocked activations)"
    z = 0 if zp is None else scalar(zp)
    if z is None or (codes.dtype == "float8_e4m3fn" and z != 0):
        return "its input's zero point is not one value (0 for FP8)"
    return float(np.float32(s)), int(z), codes.dtype


def _weight(layer: Layer, records: dict[str, Record]) -> tuple[np.ndarray, np.ndarray, str] | str:
    """The weight codes as [N, ...] (output channel first), a float32 scale per output channel, and the name the
    codes had."""
    a = layer.attrs
    if layer.kind == "Convolution":
        out_axis, nd = 0, 4
    elif layer.kind == "FullyConnected":
        out_axis, nd = 0, 2
    else:
        trans = a.get("transpose_b") if layer.kind == "MatMul" else a.get("trans_b")
        out_axis, nd = (0 if trans else 1), 2
    w = layer.inputs[1] if len(layer.inputs) > 1 else None
    rec = _find(w, records) or _rescaled(w, records, out_axis)
    if rec is None:
        return "its weight is not a constant quantized with DequantizeLinear (zero points 0), or a pass rewrote it"
    codes, scale, axis, name = rec
    if codes.dtype.name not in ("int8", "float8_e4m3fn"):
        return f"its weight codes are {codes.dtype.name}, not int8 or FP8 E4M3"
    if codes.ndim != nd:
        return f"its weight is {codes.ndim}-D, not {nd}-D"
    if scale.size > 1 and axis != out_axis:
        return "its weight is not quantized per output channel or per tensor"
    n = codes.shape[out_axis]
    ws = np.broadcast_to(scale.reshape(-1), (n,)).astype(np.float32)
    return np.ascontiguousarray(codes if out_axis == 0 else codes.T), ws, name


def _rescaled(t: Tensor | None, records: dict[str, Record], axis: int) -> Record | None:
    """A record of a quantized weight that ``t``'s value is, output channel by output channel (along ``axis``),
    a multiple of: batch normalization folded into a quantized convolution scales each channel by gamma / sigma.
    The record is returned with those channels' scales (least squares, float32), when every channel is within
    1e-6 of its largest magnitude of codes * scale (float rounding of the folding: the same weight)."""
    if t is None or not t.is_constant or t.dtype != "float32" or not 0 <= axis < t.value.ndim:
        return None
    w = np.moveaxis(np.asarray(t.value, np.float64), axis, 0).reshape(t.value.shape[axis], -1)
    for rec in {id(r): r for r in records.values()}.values():
        if rec.codes.shape != t.value.shape or rec.codes.dtype.name not in ("int8", "float8_e4m3fn"):
            continue
        c = np.moveaxis(rec.codes.astype(np.float64), axis, 0).reshape(w.shape)
        cc = (c * c).sum(1)
        s = np.where(cc > 0, (w * c).sum(1) / np.where(cc > 0, cc, 1.0), 0.0).astype(np.float32)
        err = np.abs(c * s.astype(np.float64)[:, None] - w).max(1, initial=0.0)
        if np.all(err <= 1e-6 * np.abs(w).max(1, initial=0.0)):
            return Record(rec.codes, s, axis, rec.name)
    return None


def _bias(layer: Layer, records: dict[str, Record], mult: np.ndarray) -> np.ndarray | str:
    """int32 bias codes in units of ``mult`` = x_scale * w_scale per output channel."""
    b = layer.inputs[2] if len(layer.inputs) > 2 else None
    n = mult.size
    if b is None:
        return np.zeros(n, np.int32)
    if not b.is_constant or b.value.size not in (1, n) or (b.value.size == n and b.value.ndim > 1
                                                            and b.value.shape[-1] != n):
        return "its bias is not a constant with one value per output channel"
    rec = _find(b, records)
    if rec is not None and rec.codes.dtype == np.int32 and rec.codes.size == n and np.array_equal(
            np.broadcast_to(rec.scale, (n,)), mult):
        return rec.codes.reshape(n).astype(np.int32)
    q = np.rint(np.broadcast_to(np.asarray(b.value, np.float64).reshape(-1), (n,)) / mult.astype(np.float64))
    if not np.all(np.isfinite(q)) or q.min(initial=0) < INT32[0] or q.max(initial=0) > INT32[1]:
        return "its bias does not fit int32 codes at x_scale * w_scale"
    return q.astype(np.int32)


def _shape_problem(layer: Layer) -> str | None:
    a, x = layer.attrs, layer.inputs[0]
    if layer.kind == "Convolution":
        if len(a["stride"]) != 2:
            return "it is not a 2-D convolution"
        if a.get("pool") or a.get("auto_pad"):
            return "it has a fused pool or an unresolved auto_pad"
    if layer.kind == "MatMul" and a.get("transpose_a"):
        return "its A operand is transposed"
    if layer.kind == "Gemm" and (a.get("trans_a") or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0
                                 or x.shape is None or len(x.shape) != 2):
        return "it is a Gemm with alpha/beta other than 1, or a transposed or non-2-D A"
    return None


def plan(layer: Layer, q: Layer | None = None) -> Plan | str:
    """The 8-bit layer ``layer`` (reading a DequantizeLinear) folds into, writing ``q``'s codes when ``q`` (the
    QuantizeLinear reading its output) is given; or why it cannot fold."""
    net = layer.network
    records = net.metadata.get(RECORDS, {})
    dq = layer.inputs[0].producer
    act = _activation(dq)
    why = act if isinstance(act, str) else _shape_problem(layer)
    if why:
        return why
    xs, xz, xdt = act
    w = _weight(layer, records)
    if isinstance(w, str):
        return w
    codes, ws, wname = w
    if (codes.dtype.name == "float8_e4m3fn") != (xdt == "float8_e4m3fn"):
        return f"its weight codes ({codes.dtype.name}) and input codes ({xdt}) are not both int8 or both FP8"
    mult = (np.float32(xs) * ws).astype(np.float32)
    bias = _bias(layer, records, mult)
    if isinstance(bias, str):
        return bias
    out = layer.outputs[0]
    attrs = {"x_scale": xs, "x_zero_point": xz, "w_scale": ws, "out_scale": None, "out_zero_point": 0,
             "to": out.dtype, "activation": layer.attrs.get("activation"), "alpha": layer.attrs.get("alpha", 0.0),
             "beta": layer.attrs.get("beta", 0.0),
             "residual_after_activation": bool(layer.attrs.get("residual_after_activation"))}
    if q is not None:
        oq = _output(q)
        if isinstance(oq, str):
            return oq
        attrs.update(oq)
    elif out.dtype not in FLOAT_OUT:
        return f"its output is {out.dtype}"
    if layer.kind == "Convolution":
        attrs.update({k: layer.attrs[k] for k in ("stride", "pads", "dilation")}, groups=layer.attrs.get("groups", 1))
        residual = layer.inputs[3] if len(layer.inputs) > 3 else None
        rdq = residual.producer if residual is not None else None
        found = _activation(rdq) if rdq is not None and rdq.kind == "DequantizeLinear" else None
        if isinstance(found, tuple):        # a dequantized residual: its codes, dequantized in the epilogue
            residual = rdq.inputs[0]
            attrs.update(residual_scale=found[0], residual_zero_point=found[1])
        return Plan("QConvolution", codes, wname, bias, attrs, residual)
    return Plan("QFullyConnected", codes, wname, bias, attrs)


def _output(q: Layer) -> dict | str:
    """The requantization attrs of a per-tensor QuantizeLinear, or why it is not one."""
    s, to = scalar(q.inputs[1]), q.attrs["to"]
    zp = q.inputs[2] if len(q.inputs) > 2 else None
    z = 0 if zp is None else scalar(zp)
    if to not in CODES or s is None or not np.isfinite(s) or s <= 0 or q.attrs.get("block_size") or z is None:
        return "its QuantizeLinear is not per tensor to int8, uint8 or FP8 E4M3"
    if to == "float8_e4m3fn" and (z != 0 or not q.attrs.get("saturate", True)):
        return "its FP8 QuantizeLinear has a zero point or does not saturate"
    return {"out_scale": float(np.float32(s)), "out_zero_point": int(z), "to": to}


def _fits(m: Match) -> str | None:
    found = plan(m["gemm"], m.get("q"))
    if isinstance(found, str):
        return found
    m["plan"] = found
    return None


def _fold(m: Match) -> None:
    net, layer, q, p = m.net, m["gemm"], m.get("q"), m["plan"]
    dq = layer.inputs[0].producer
    rdq = layer.inputs[3].producer if p.residual is not None and p.residual is not layer.inputs[3] else None
    w = net.add_constant(p.weight, name=net.unique_name(p.weight_name))
    b = net.add_constant(p.bias, name=net.unique_name(f"{layer.name}_bias_codes"))
    ins = [dq.inputs[0], w, b] + ([p.residual] if p.residual is not None else [])
    fused = [d for d in dict.fromkeys([dq, rdq]) if d is not None and all(u is layer for u, _ in d.outputs[0].uses)]
    origin = list(dict.fromkeys([o for x in [*fused, layer, *([q] if q else [])] for o in x.origin]))
    new = net.add_layer(p.kind, ins, p.attrs, name=net.unique_layer_name(p.kind, layer.name), origin=origin)
    last = q if q is not None else layer
    substitute(net, new, layer, [last.outputs[0]], [last, layer, dq, *([rdq] if rdq is not None else [])])
    new.name = layer.name
    net.remove_unused_constants()


_GEMM = Op(GEMMS, Op("DequantizeLinear", Var("x"), ANY, ..., name="dq", shared=True), ..., name="gemm")


def _second_fits(m: Match) -> str | None:
    layer, q = m["layer"], m["q"]
    if q.inputs[0] is not layer.outputs[0]:
        return "the QuantizeLinear reads another output than the layer's first"
    if layer.attrs.get("codes_scale") is not None or layer.attrs.get("out_scale") is not None:
        return f"{layer.name!r} already writes codes"
    if layer.kind == "Normalization" and (layer.attrs.get("type", "layer") not in ("layer", "rms")
                                          or layer.outputs[0].dtype not in FLOAT_OUT):
        return "it is not a layer or RMS norm with a float output"
    found = _output(q)
    if isinstance(found, str):
        return found
    m["codes"] = {"codes_scale": found["out_scale"], "codes_zero_point": found["out_zero_point"],
                  "codes_to": found["to"]}
    return None


def _second_output(m: Match) -> None:
    """The layer again, with the codes as one more output after its others."""
    net, layer, q = m.net, m["layer"], m["q"]
    outs = list(layer.outputs)
    new = net.add_layer(layer.kind, list(layer.inputs), {**layer.attrs, **m["codes"]}, num_outputs=len(outs) + 1,
                        name=net.unique_layer_name(layer.kind, layer.name),
                        origin=list(dict.fromkeys(layer.origin + q.origin)),
                        output_dtypes=[o.dtype for o in outs] + [q.attrs["to"]])
    substitute(net, new, layer, [*outs, q.outputs[0]], [q, layer])
    new.name = layer.name


class FoldQDQ(Pass):
    """The rules in the module docstring; then one warning line per reason naming the layers left dequantized.
    Forgets the records once nothing more folds."""

    name = "fold Q/DQ into 8-bit layers"
    rules = [
        Rule("Q(gemm(DQ(x))) -> 8-bit layer writing codes", Op("QuantizeLinear", _GEMM, ANY, ..., name="q"),
             _fits, _fold),
        Rule("gemm(DQ(x)) -> 8-bit layer writing float", _GEMM, _fits, _fold),
        Rule("Q(8-bit layer's float output) -> its second output",
             Op("QuantizeLinear", Op(QUANTIZED_KINDS, ..., name="layer", shared=True), ANY, ..., name="q"),
             _second_fits, _second_output),
        Rule("Q(layer/RMS norm's output) -> its codes output",
             Op("QuantizeLinear", Op("Normalization", ..., name="layer", shared=True), ANY, ..., name="q"),
             _second_fits, _second_output),
    ]

    def __init__(self) -> None:
        self.warned: set[str] = set()

    def __call__(self, net: Network, stats: Stats | None = None) -> PassResult:
        changed = rewrite(net, self.rules, reverse=True, stats=stats)     # a Q is met before its layer
        if changed:
            net.toposort()
            return PassResult(net, True)
        left: dict[str, list[str]] = {}
        for layer in net.layers:
            if layer.name in self.warned or layer.kind in UNQUANTIZED or not reads_dequantized(layer):
                continue
            if layer.kind in GEMMS:
                why = plan(layer)
            elif any(u.kind == "QuantizeLinear" for o in layer.outputs for u, _ in o.uses):
                why = f"Kiln has no 8-bit kernel for {layer.kind} layers between DequantizeLinear and QuantizeLinear"
            else:
                continue
            if isinstance(why, str):
                self.warned.add(layer.name)
                left.setdefault(why, []).append(f"{layer.name!r} ({layer.kind}; ONNX "
                                                f"{', '.join(layer.origin) or layer.name})")
        for why, names in left.items():          # one line per reason
            more = f" and {len(names) - 8} more" if len(names) > 8 else ""
            warnings.warn(f"{len(names)} layer(s) read a dequantized input but run dequantized, without 8-bit "
                          f"kernels, because {why}: {', '.join(names[:8])}{more}.", QuantizationWarning, stacklevel=2)
        net.metadata.pop(RECORDS, None)
        return PassResult(net, False)

    def call(self, net: Network) -> PassResult:
        return self(net)


def reads_dequantized(layer: Layer) -> bool:
    """Whether ``layer`` reads an activation through DequantizeLinear (its first input for a GEMM, any input
    otherwise)."""
    ins = layer.inputs[:1] if layer.kind in GEMMS else layer.inputs
    return any(t is not None and t.producer is not None and t.producer.kind == "DequantizeLinear"
               and t.producer.inputs[0] is not None and not t.producer.inputs[0].is_constant for t in ins)


def label_quantized(net: Network, precision: str) -> None:
    """After precision assignment: the 8-bit layers' precision is "int8" or "fp8"; in an FP16/BF16 build a float
    output that is not a network output has the low precision's type, and a QuantizeLinear reads a low-precision
    input as it is, without the Cast to FP32 put before it (its division runs in FP32 either way)."""
    low = {"fp16": "float16", "bf16": "bfloat16"}.get(precision)
    for layer in net.layers:
        if layer.kind not in QUANTIZED_KINDS:
            continue
        layer.precision = "fp8" if layer.inputs[0].dtype == "float8_e4m3fn" else "int8"
        out = layer.outputs[0]
        if low and layer.attrs["to"] == "float32" and out not in net.outputs:
            layer.attrs["to"] = out.dtype = low
    if low:
        for cast in [layer for layer in net.layers if layer.kind == "Cast" and layer.attrs["to"] == "float32"]:
            y, p = cast.outputs[0], cast.inputs[0].producer
            made_low = p is not None and ((p.precision or "").split()[:1] == [precision] if p.kind not in QUANTIZED_KINDS
                                          else p.attrs["to"] == low)
            if made_low and y.uses and y not in net.outputs and all(
                    u.kind == "QuantizeLinear" and i == 0 for u, i in y.uses):
                for u, i in list(y.uses):
                    u.set_input(i, cast.inputs[0])
                net.remove_layer(cast)
