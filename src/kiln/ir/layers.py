"""The layer vocabulary: every kind a Network may hold, its input arity, typed attributes and flags.

TensorRT's classic layers first, then what modern ONNX models need. Each kind
declares its attributes once (``attr``: a type, one default, enum values, a lower
bound); kernels in ``kiln.kernels`` implement them. ``check_layer`` validates a
layer's attributes when it is added to a Network, and the engine loader
validates every plan layer against the same schema (``attrs_problem`` with
``encoded=True``: arrays, subgraphs and plugins as the plan writes them).
Inputs marked *host* are read as values (shapes, indices) and live on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from kiln.errors import KilnError, NetworkError
from kiln.ir.dtypes import ALL_TYPES, is_type_name

VARIADIC = 1 << 30
INT64 = (-(1 << 63), (1 << 63) - 1)
REQUIRED: Any = type("Required", (), {"__repr__": lambda self: "REQUIRED"})()

# Attribute types: a name, or alternatives joined by "|" ("ints|str": a list of ints or an enum string).
ATTR_TYPES = ("int", "float", "bool", "str", "scalar", "ints", "floats", "strs", "dtype", "array", "graph",
              "plugin", "program", "int_lists")

ACTIVATIONS = ("relu", "sigmoid", "tanh", "leaky_relu", "elu", "selu", "softplus", "softsign", "clip", "hard_sigmoid",
               "gelu", "gelu_tanh", "silu", "swish", "mish", "hard_swish", "thresholded_relu", "celu", "scaled_tanh",
               "shrink")
ELEMENTWISE_OPS = ("sum", "sub", "prod", "div", "max", "min", "pow", "mod", "fmod", "floor_div", "and", "or", "xor",
                   "equal", "greater", "less", "greater_equal", "less_equal", "bitshift_left", "bitshift_right",
                   "bitwise_and", "bitwise_or", "bitwise_xor", "prelu")
UNARY_OPS = ("exp", "log", "sqrt", "recip", "abs", "neg", "sin", "cos", "tan", "sinh", "cosh", "asin", "acos", "atan",
             "asinh", "acosh", "atanh", "ceil", "floor", "round", "erf", "not", "sign", "isnan", "isinf", "bitwise_not",
             "identity")
REDUCE_OPS = ("sum", "mean", "max", "min", "prod", "l1", "l2", "log_sum", "log_sum_exp", "sum_square")


@dataclass(frozen=True)
class Attr:
    """A typed layer attribute. ``default`` REQUIRED means the layer must set it; None as a value is
    allowed when ``optional`` (a default of None makes an attribute optional)."""

    type: str
    default: Any = REQUIRED
    choices: tuple | None = None
    optional: bool = False
    lo: float | None = None            # smallest number allowed (numbers and their lists)
    doc: str = ""
    hi: float | None = None            # largest number allowed

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


def attr(type_: str, default: Any = REQUIRED, *, choices: tuple | None = None, optional: bool = False,
         lo: float | None = None, doc: str = "", hi: float | None = None) -> Attr:
    """Declare an attribute: ``attr("ints", lo=1)``, ``attr("str", "DCR", choices=("DCR", "CRD"))``."""
    bad = [t for t in type_.split("|") if t not in ATTR_TYPES]
    if bad:
        raise NetworkError(f"Attribute type {bad[0]!r} is not one of {', '.join(ATTR_TYPES)}.")
    spec = Attr(type_, default, tuple(choices) if choices is not None else None, optional or default is None, lo, doc,
                hi)
    if not spec.required and (why := value_problem(spec, default, encoded=False)):
        raise NetworkError(f"Attribute default {default!r} does not fit its declaration: it {why}.")
    return spec


@dataclass(frozen=True)
class LayerKind:
    name: str
    min_inputs: int
    max_inputs: int
    doc: str
    host_inputs: tuple[int, ...] = ()    # input positions read as host values (shape tensors)
    attrs: Mapping[str, Attr] = field(default_factory=dict)
    optional_inputs: tuple[int, ...] = ()   # positions below min_inputs that may still be empty (None)
    control_flow: bool = False           # runs subgraphs (If, Loop, Scan); inputs stay where they are
    host: str = "device"                 # "device"; "capable": may run on the host; "always": runs there
    channels_last: bool = False          # may produce a channels-last (NHWC) output
    fp32_internal: bool = False          # accumulates/normalizes in FP32 in a low-precision build
    outputs: Callable[[Mapping[str, Any]], "int | str"] | None = None   # output count from attrs, or why they clash


LAYER_KINDS: dict[str, LayerKind] = {}


def define_layer(name: str, min_inputs: int, max_inputs: int, doc: str, host_inputs: tuple[int, ...] = (),
                 attrs: Mapping[str, Attr] | None = None, **flags: Any) -> None:
    """Add a kind to the vocabulary; defining one twice is an error."""
    if name in LAYER_KINDS:
        raise NetworkError(f"Layer kind {name!r} is defined twice; pick another name.")
    LAYER_KINDS[name] = LayerKind(name, min_inputs, max_inputs, doc, host_inputs, dict(attrs or {}), **flags)


def attr_default(kind: str, name: str) -> Any:
    """The declared default of ``kind``'s attribute ``name``: the one value every kernel assumes when a
    layer leaves the attribute out."""
    a = LAYER_KINDS[kind].attrs[name]
    if a.required:
        raise NetworkError(f"Attribute {name!r} of {kind} layers is required; it has no default.")
    return a.default


def check_layer(layer, num_inputs: int) -> None:
    """Refuse an unknown kind, a wrong input count, or attributes outside the kind's schema."""
    spec = LAYER_KINDS.get(layer.kind)
    if spec is None:
        raise NetworkError(f"Layer {layer.name!r} has unknown kind {layer.kind!r}; known kinds: "
                           f"{', '.join(sorted(LAYER_KINDS))}. Use a Plugin layer for custom operations.")
    if not spec.min_inputs <= num_inputs <= spec.max_inputs:
        hi = "any number of" if spec.max_inputs >= VARIADIC else f"at most {spec.max_inputs}"
        raise NetworkError(f"Layer {layer.name!r} ({layer.kind}) takes at least {spec.min_inputs} and {hi} inputs, "
                           f"got {num_inputs}.")
    why = attrs_problem(layer.kind, layer.attrs, encoded=False)
    if why:
        raise NetworkError(f"Layer {layer.name!r} ({layer.kind}) {why}; see kiln.ir.layers for its attributes.")


def outputs_problem(kind: str, attrs: Mapping[str, Any], n_outputs: int) -> str | None:
    """How ``n_outputs`` disagrees with the output count a layer of ``kind`` with ``attrs`` (already checked against
    the schema) has (a phrase), or None; kinds whose count their attrs do not fix always agree."""
    count = LAYER_KINDS[kind].outputs
    want = count(attrs) if count is not None else n_outputs
    if isinstance(want, str):
        return want
    return None if want == n_outputs else f"has {n_outputs} outputs where its attributes give {want}"


# ---- attribute validation ---------------------------------------------------------------------

Subplan = Callable[[Any], "str | None"]


def attrs_problem(kind: str, attrs: Any, encoded: bool, subplan: Subplan | None = None) -> str | None:
    """How ``attrs`` break ``kind``'s schema (a phrase), or None.

    ``encoded``: attrs as a plan stores them (JSON, with ``__array__``/``__graph__``/``__plugin__``
    records); ``subplan`` then checks each ``__graph__`` plan. Otherwise they are a Network's values.
    """
    spec = LAYER_KINDS[kind]
    if not isinstance(attrs, dict):
        return "has attributes that are not a table"
    unknown = [k for k in attrs if k not in spec.attrs]
    if unknown:
        return f"has unknown attribute {str(unknown[0])[:40]!r} (its attributes: {', '.join(spec.attrs) or 'none'})"
    for name, a in spec.attrs.items():
        if name not in attrs:
            if a.required:
                return f"lacks the required attribute {name!r} ({a.type})"
            continue
        why = value_problem(a, attrs[name], encoded, subplan)
        if why:
            return f"attribute {name!r} {why}"
    return None


def value_problem(a: Attr, v: Any, encoded: bool, subplan: Subplan | None = None) -> str | None:
    """How one value breaks its declaration (a phrase starting with a verb), or None."""
    if v is None:
        return None if a.optional else f"must be {a.type}, not null"
    reasons = []
    for t in a.type.split("|"):
        why = _CHECKS[t](a, v, encoded, subplan)
        if why is None:
            return None
        reasons.append(why)
    return reasons[0] if len(reasons) == 1 else f"must be one of {a.type.replace('|', ', ')}, got {_show(v)}"


def _show(v: Any) -> str:
    s = repr(v)
    return f"{type(v).__name__} {s[:40]}{'...' if len(s) > 40 else ''}"


def _number(v: Any, encoded: bool, kinds: str) -> Any:
    """``v`` as a Python number if it is one of the numpy kinds in ``kinds`` ("b", "i", "u", "f"), else None.

    JSON numbers, numpy scalars (a Network's values) and 0-d ``__array__`` records (how a plan
    stores a numpy scalar) count; bools count only for "b".
    """
    if isinstance(v, bool):
        return v if "b" in kinds else None
    if isinstance(v, int):
        return v if "i" in kinds else None
    if isinstance(v, float):
        return v if "f" in kinds else None
    if not encoded and isinstance(v, np.generic) and v.dtype.kind in kinds:
        return v.item()
    if encoded and isinstance(v, dict) and set(v) == {"__array__"} and isinstance(v["__array__"], dict):
        rec, kind = v["__array__"], _kind_of(v["__array__"].get("dtype"))
        if kind and kind in kinds and rec.get("shape") == [] and isinstance(rec.get("data"), list) \
                and len(rec["data"]) == 1 and _plain_number(rec["data"][0]):
            return rec["data"][0]
    return None


def _kind_of(name: Any) -> str:
    """The numpy kind letter of a Kiln numeric type name ("" for anything else)."""
    if not isinstance(name, str) or name not in ALL_TYPES:
        return ""
    return next((k for prefix, k in (("bool", "b"), ("uint", "u"), ("int", "i"), ("float", "f"), ("bfloat", "f"))
                 if name.startswith(prefix)), "")


def _plain_number(x: Any) -> bool:
    """A JSON number that a numpy array of any numeric type can hold (bools included)."""
    return isinstance(x, float) or isinstance(x, int) and INT64[0] <= x < (1 << 64)


def _int(a: Attr, v: Any, encoded: bool, subplan=None) -> str | None:
    n = _number(v, encoded, "iu")
    if n is None or not isinstance(n, int):
        return f"must be an integer, got {_show(v)}"
    if not INT64[0] <= n <= INT64[1]:
        return f"must fit in 64 bits, got {n}"
    return _bound(a, n)


def _float(a: Attr, v: Any, encoded: bool, subplan=None) -> str | None:
    n = _number(v, encoded, "iuf")
    if n is None:
        return f"must be a number, got {_show(v)}"
    if isinstance(n, int) and not INT64[0] <= n <= INT64[1]:
        return f"must fit in 64 bits, got {n}"
    return _bound(a, n)


def _bool(a: Attr, v: Any, encoded: bool, subplan=None) -> str | None:
    n = _number(v, encoded, "biu")          # ONNX flags are 0/1 integers
    if n is None or not INT64[0] <= int(n) <= INT64[1]:
        return f"must be true/false (or 0/1), got {_show(v)}"
    return None


def _scalar(a: Attr, v: Any, encoded: bool, subplan=None) -> str | None:
    n = _number(v, encoded, "biuf")
    if n is None or isinstance(n, int) and not INT64[0] <= n <= INT64[1]:
        return f"must be a number or a bool, got {_show(v)}"
    return None


def _bound(a: Attr, n: float) -> str | None:
    if a.lo is not None and not n >= a.lo:
        return f"must be at least {a.lo}, got {n}"
    return f"must be at most {a.hi}, got {n}" if a.hi is not None and not n <= a.hi else None


def _str(a: Attr, v: Any, encoded: bool, subplan=None) -> str | None:
    if not isinstance(v, str):
        return f"must be a string, got {_show(v)}"
    if a.choices is not None and v not in a.choices:
        return f"must be one of {', '.join(map(str, a.choices))}, got {v[:40]!r}"
    return None


def _dtype(a: Attr, v: Any, encoded: bool, subplan=None) -> str | None:
    return None if is_type_name(v) else f"must be a data type name ({', '.join(ALL_TYPES)}), got {_show(v)}"


def _list_of(check: Callable) -> Callable:
    def run(a: Attr, v: Any, encoded: bool, subplan=None) -> str | None:
        if not isinstance(v, (list, tuple) if not encoded else list):
            return f"must be a list, got {_show(v)}"
        for x in v:
            why = check(a, x, encoded)
            if why:
                return f"holds an item that {why}"
        return None
    return run


def _array(a: Attr, v: Any, encoded: bool, subplan=None) -> str | None:
    if not encoded:
        return None if isinstance(v, (np.ndarray, np.generic)) else f"must be an array, got {_show(v)}"
    rec = v.get("__array__") if isinstance(v, dict) and set(v) == {"__array__"} else None
    if not isinstance(rec, dict) or set(rec) != {"dtype", "shape", "data"}:
        return "must be an array record {'__array__': {dtype, shape, data}}"
    dt, shape, data = rec["dtype"], rec["shape"], rec["data"]
    if dt != "object" and not _kind_of(dt):
        return f"holds an array of unknown type {_show(dt)}"
    if not isinstance(shape, list) or not all(type(d) is int and 0 <= d <= INT64[1] for d in shape) \
            or not isinstance(data, list) or int(np.prod(shape, dtype=object)) != len(data):
        return "holds an array whose shape does not match its data"
    if not all(isinstance(x, str) if dt == "object" else _plain_number(x) for x in data):
        return f"holds {dt} array data that is not all {'strings' if dt == 'object' else 'numbers'}"
    return None


def _graph(a: Attr, v: Any, encoded: bool, subplan=None) -> str | None:
    if not encoded:
        return None if hasattr(v, "layers") and hasattr(v, "outputs") else f"must be a Network, got {_show(v)}"
    if not (isinstance(v, dict) and set(v) == {"__graph__"}):
        return "must be a subgraph record {'__graph__': plan}"
    return subplan(v["__graph__"]) if subplan is not None else None


def plugin_record_problem(rec: Any) -> str | None:
    """How a plugin record {name, namespace, version, fields} is malformed, or None."""
    if not (isinstance(rec, dict) and isinstance(rec.get("name"), str) and isinstance(rec.get("namespace", ""), str)
            and isinstance(rec.get("version"), str) and isinstance(rec.get("fields", {}), dict)
            and set(rec) <= {"name", "namespace", "version", "fields"}):
        return "must be a plugin record {name, namespace, version, fields}"
    return None


def _plugin(a: Attr, v: Any, encoded: bool, subplan=None) -> str | None:
    if not encoded:
        return None if callable(getattr(v, "record", None)) else f"must be a kiln.Plugin, got {_show(v)}"
    if not (isinstance(v, dict) and set(v) == {"__plugin__"}):
        return "must be a plugin record {'__plugin__': {...}}"
    return plugin_record_problem(v["__plugin__"])


def _program(a: Attr, v: Any, encoded: bool, subplan=None) -> str | None:
    from kiln.ir.pointwise import validate_program
    try:
        validate_program(v, None)        # the layer's input count is checked against the refs when it is made
    except KilnError as exc:
        return "is not a valid program: " + str(exc).split(" (a step is")[0].removeprefix("Pointwise program ")
    return None


def _int_lists(a: Attr, v: Any, encoded: bool, subplan=None) -> str | None:
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        return f"must be a table of integer lists, got {_show(v)}"
    for x in v.values():
        why = _CHECKS["ints"](a, x, encoded)
        if why:
            return why
    return None


_CHECKS: dict[str, Callable[..., str | None]] = {
    "int": _int, "float": _float, "bool": _bool, "str": _str, "scalar": _scalar, "ints": _list_of(_int),
    "floats": _list_of(_float), "strs": _list_of(_str), "dtype": _dtype, "array": _array, "graph": _graph,
    "plugin": _plugin, "program": _program, "int_lists": _int_lists,
}


# ---- shared attribute groups --------------------------------------------------------------------

# a fused activation (passes/fuse_epilogue.py): y = act(y) with the Activation layer's alpha and beta
_EPILOGUE = {"activation": attr("str", None, choices=ACTIVATIONS, doc="None: no activation"),
             "alpha": attr("float", 0.0, optional=True, doc="a clip's lower bound (None: unbounded)"),
             "beta": attr("float", 0.0, optional=True, doc="a clip's upper bound (None: unbounded)")}
_CONV = {"stride": attr("ints", lo=1), "pads": attr("ints", doc="begins then ends"), "dilation": attr("ints", lo=1),
         "groups": attr("int", 1, lo=1)}
_WINDOW = {"stride": attr("ints", None, lo=1), "pads": attr("ints", None), "dilation": attr("ints", None, lo=1)}
# ONNX's auto_pad SAME: pads from the input's size, which the builder resolves once shapes are known
_AUTO_PAD = {"auto_pad": attr("str", None, choices=("SAME_UPPER", "SAME_LOWER"), doc="pads follow from the input size "
                              "(builder/autopad.py writes them into pads)")}
# the builder adds these to layers that run subgraphs: the outer tensors they read (appended to the inputs)
_SUBGRAPH = {"outer": attr("strs", None, doc="outer tensors the subgraphs read, appended to the inputs"),
             "num_inputs": attr("int", None, lo=0, doc="the layer's own inputs, before the outer ones")}
_AXIS = {"axis": attr("int", 0)}
_TO = {"to": attr("dtype", doc="output data type")}


def _flags(*names: str, default: bool = False) -> dict[str, Attr]:
    return {n: attr("bool", default) for n in names}


# ---- TensorRT's classic layers ---------------------------------------------------------------
define_layer("Activation", 1, 1, "y = f(x)", attrs={
    "type": attr("str", choices=ACTIVATIONS), "alpha": _EPILOGUE["alpha"], "beta": _EPILOGUE["beta"]})
define_layer("Concatenation", 1, VARIADIC, "join along attrs axis", attrs={"axis": attr("int")}, host="capable")
define_layer("Convolution", 2, 4, "N-d convolution (1/2/3-D): x, weight, bias?, residual?; fused epilogue "
             "y = act(conv + r), or act(conv) + r with residual_after_activation; pool: a fused max pool after it",
             attrs={**_CONV, **_AUTO_PAD, **_EPILOGUE, **_flags("residual", "residual_after_activation"),
                    "pool": attr("int_lists", None, doc="fused max pool {kernel, stride, pads}")}, channels_last=True)
define_layer("Conv1x1Chain", 6, 8, "two 1x1 convolutions back to back: x, W3, b3, residual?, W1, b1, x2?, W2? → y = "
             "act(conv(x, W3) + b3 + residual + conv(x2, W2, stride2)), z = act2(conv(y, W1) + b1) "
             "(passes/fuse_conv_chain.py)",
             attrs={"activation": _EPILOGUE["activation"], "activation2": _EPILOGUE["activation"],
                    "stride2": attr("ints", None, lo=1)}, optional_inputs=(3,), channels_last=True)
define_layer("Conv1x1Sum", 5, 5, "two 1x1 convolutions added: x1, W1, x2, W2, b → y = act(conv(x1, W1, stride1) + "
             "conv(x2, W2, stride2) + b) (passes/fuse_projection.py)",
             attrs={"stride1": attr("ints", lo=1), "stride2": attr("ints", lo=1), **_EPILOGUE}, channels_last=True)
define_layer("Deconvolution", 2, 3, "transposed convolution: x, weight [Cin, Cout/g, k...], bias?",
             attrs={**_CONV, "output_padding": attr("ints", None)})
define_layer("FullyConnected", 2, 3, "y = x @ weight.T + bias over the last axis; weight [N, K]", attrs=_EPILOGUE)
define_layer("ElementWise", 1, VARIADIC, "broadcasting binary (or n-ary) op",
             attrs={"op": attr("str", choices=ELEMENTWISE_OPS)}, host="capable")
define_layer("Pooling", 1, 1, "max/average/Lp pooling; kernel None pools globally; return_indices adds the argmax "
             "output", attrs={"type": attr("str", choices=("max", "average", "lp")), "kernel": attr("ints", None, lo=1),
                              **_WINDOW, **_AUTO_PAD, **_flags("ceil_mode", "count_include_pad", "return_indices"),
                              "p": attr("int", 2, lo=1), "storage_order": attr("int", 0)}, channels_last=True)
define_layer("Padding", 1, 4, "x, pads?, value?, axes?", host_inputs=(1, 3), attrs={
    "pads": attr("ints", None, doc="begins then ends; None: the pads input"),
    "mode": attr("str", "constant", choices=("constant", "reflect", "edge", "wrap")), "value": attr("scalar", 0.0)})
define_layer("Flatten", 1, 1, "2-D view: dims before attrs axis, dims after", attrs={"axis": attr("int", 1)},
             host="capable")
define_layer("LRN", 1, 1, "local response normalization across channels", attrs={
    "size": attr("int", lo=1), "alpha": attr("float", 1e-4), "beta": attr("float", 0.75), "bias": attr("float", 1.0)},
    fp32_internal=True)
define_layer("SoftMax", 1, 1, "softmax (log: log-softmax); computed in FP32",
             attrs={"axis": attr("int", -1), **_flags("log")}, fp32_internal=True)
define_layer("RNN", 3, 8, "ONNX-style RNN/GRU/LSTM: X, W, R, B?, sequence_lens?, initial_h?, initial_c?, P?", attrs={
    "cell": attr("str", choices=("rnn", "gru", "lstm")),
    "direction": attr("str", "forward", choices=("forward", "reverse", "bidirectional")),
    "hidden_size": attr("int", lo=1), "activations": attr("strs", None, doc="ONNX activation names per gate"),
    "activation_alpha": attr("floats", None), "activation_beta": attr("floats", None), "clip": attr("float", None),
    **_flags("linear_before_reset", "input_forget"), "layout": attr("int", 0)})
define_layer("DynamicQuantizeLSTM", 12, 12, "ONNX Runtime's DynamicQuantizeLSTM: X, W codes [dirs, input, 4H], R codes "
             "[dirs, H, 4H], B?, sequence_lens?, initial_h?, initial_c?, P?, W_scale, W_zero_point, R_scale, "
             "R_zero_point (scales per direction or per column); products on activations quantized to uint8 per call "
             "(kernels/rnn_quant.py); outputs Y, Y_h, Y_c", optional_inputs=(3, 4, 5, 6, 7), attrs={
                 "direction": attr("str", "forward", choices=("forward", "reverse", "bidirectional")),
                 "hidden_size": attr("int", lo=1), "activations": attr("strs", None, doc="ONNX activation names"),
                 "activation_alpha": attr("floats", None), "activation_beta": attr("floats", None),
                 "clip": attr("float", None), **_flags("input_forget"),
                 "sequence_output": attr("bool", True, doc="the node has a Y output (else finished rows hold their "
                                                           "state in the recurrent product's operand)")})
define_layer("Scale", 1, 4, "y = (x * scale + shift) ** power; x, scale?, shift?, power?", attrs={
    "mode": attr("str", "channel", choices=("uniform", "channel", "elementwise")), "channel_axis": attr("int", 1)})
define_layer("Shuffle", 1, 2, "transpose → reshape (0 copies a dim, -1 infers) → transpose; x, shape?",
             host_inputs=(1,), attrs={
                 "first_transpose": attr("ints|str", None, choices=("reverse",), doc="'reverse': of any rank"),
                 "reshape": attr("ints", None), "second_transpose": attr("ints", None), **_flags("allowzero")},
             host="capable")
define_layer("Squeeze", 1, 2, "remove size-1 axes: x, axes?", host_inputs=(1,), attrs={"axes": attr("ints", None)},
             host="capable")
define_layer("Unsqueeze", 1, 2, "insert size-1 axes: x, axes?", host_inputs=(1,), attrs={"axes": attr("ints", None)},
             host="capable")
define_layer("Unary", 1, 1, "y = op(x)", attrs={"op": attr("str", choices=UNARY_OPS),
                                              **_flags("detect_positive", "detect_negative", default=True)},
             host="capable")
define_layer("Plugin", 0, VARIADIC, "a custom layer (a kiln.Plugin instance)", attrs={
    "plugin": attr("plugin"), "plugin_tactic": attr("str", None, doc="the plugin's own implementation choice")})
define_layer("OrtIsland", 1, VARIADIC, "ONNX nodes Kiln cannot map, run by ONNX Runtime on the CPU "
             "(kiln.onnx.fallback): the island's ONNX model (uint8 bytes), then its inputs", attrs={
                 "opset": attr("int", lo=1, doc="the ai.onnx opset the model imports"),
                 "ops": attr("strs", doc="the model's node ops in order, 'domain::op' outside ai.onnx"),
                 "sha256": attr("str", doc="SHA-256 of the model bytes")})
define_layer("Constant", 0, 0, "a constant value; produced by folding or by hand", attrs={"value": attr("array")})
define_layer("Identity", 1, 1, "y = x (kept only where a copy is needed)", host="capable")

# ---- what modern ONNX models need ------------------------------------------------------------
define_layer("MatMul", 2, 2, "batched matrix product with numpy broadcasting",
             attrs={**_flags("transpose_a", "transpose_b"), **_EPILOGUE})
define_layer("Gemm", 2, 3, "y = alpha * op(A) @ op(B) + beta * C", attrs={
    "alpha": attr("float", 1.0), "beta": attr("float", 1.0), **_flags("trans_a", "trans_b")})
define_layer("Reduce", 1, 2, "x, axes?; accumulates in FP32", host_inputs=(1,), attrs={
    "op": attr("str", choices=REDUCE_OPS), "axes": attr("ints", None), "keepdims": attr("bool", True),
    **_flags("noop_with_empty_axes")}, host="capable", fp32_internal=True)
define_layer("ArgReduce", 1, 1, "index of max/min", attrs={
    "op": attr("str", choices=("max", "min")), **_AXIS, "keepdims": attr("bool", True),
    **_flags("select_last_index")}, host="capable")
define_layer("Gather", 2, 2, "take along attrs axis with an index tensor (negative indices wrap)", attrs=_AXIS,
             host="capable")
define_layer("GatherElements", 2, 2, "take_along_axis", attrs=_AXIS)
define_layer("GatherND", 2, 2, "gather by index tuples", attrs={"batch_dims": attr("int", 0, lo=0)})
_REDUCTION = {"reduction": attr("str", "none", choices=("none", "add", "mul", "max", "min"))}
define_layer("ScatterND", 3, 3, "data, indices, updates", attrs=_REDUCTION)
define_layer("ScatterElements", 3, 3, "data, indices, updates", attrs={**_AXIS, **_REDUCTION})
define_layer("Slice", 3, 5, "x, starts, ends, axes?, steps?", host_inputs=(1, 2, 3, 4), host="capable")
define_layer("Resize", 1, 4, "x, roi?, scales?, sizes?", host_inputs=(1, 2, 3), attrs={
    "mode": attr("str", "nearest", choices=("nearest", "linear", "cubic")),
    "coordinate_transformation_mode": attr("str", "half_pixel", choices=(
        "half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric",
        "tf_crop_and_resize")),
    "nearest_mode": attr("str", "round_prefer_floor", choices=("round_prefer_floor", "round_prefer_ceil", "floor",
                                                               "ceil")),
    "cubic_coeff_a": attr("float", -0.75), **_flags("exclude_outside", "antialias"),
    "extrapolation_value": attr("float", 0.0), "axes": attr("ints", None),
    "keep_aspect_ratio_policy": attr("str", "stretch", choices=("stretch", "not_larger", "not_smaller"))})
# An 8-bit type's codes of a float output, written beside it (QuantizeLinear folded in: passes/fold_qdq.py), as
# saturate(round(y / codes_scale) + codes_zero_point) from y as stored; codes_scale None: no codes output.
CODE_TYPES = ("int8", "uint8", "float8_e4m3fn")
_F32 = np.finfo(np.float32)
_CODES = {"codes_scale": attr("float", None, lo=float(_F32.tiny), hi=float(_F32.max), doc="a float output's codes "
                              "at this scale, a normal float32 (None: no codes output)"),
          "codes_zero_point": attr("int", 0, lo=-128, hi=255, doc="0 for FP8 codes"),
          "codes_to": attr("str", None, choices=CODE_TYPES, doc="the codes' 8-bit type (set with codes_scale)")}


def _flag(v: Any) -> bool:
    """A checked bool attribute's value, as a Network or a plan (a 0-d record) holds it."""
    return bool(_number(v, isinstance(v, dict), "biu"))


def _with_codes(first: int, attrs: Mapping[str, Any]) -> int | str:
    """``first`` outputs, then the codes when codes_scale is set (with codes_to)."""
    codes = attrs.get("codes_scale") is not None
    if codes != (attrs.get("codes_to") is not None):
        return "sets only one of codes_scale and codes_to"
    return first + codes


define_layer("Normalization", 1, 6, "x, scale?, bias?, (mean, var for batch), residual?; statistics in FP32. With a "
             "residual (layer/rms only) the layer normalizes x + residual. Outputs: y; then the sum x + residual "
             "with sum_output; then y's 8-bit codes with codes_scale",
             attrs={"type": attr("str", "layer", choices=("layer", "instance", "group", "batch", "rms")),
                    "axis": attr("int", -1), "epsilon": attr("float", 1e-5), "num_groups": attr("int", 1, lo=1),
                    **_flags("sum_output"), **_CODES}, fp32_internal=True,
             outputs=lambda a: _with_codes(1 + _flag(a.get("sum_output")), a))
define_layer("Cast", 1, 1, "convert to another data type", attrs={
    **_TO, "saturate": attr("bool", True), "round_mode": attr("str", "up", choices=("up", "down", "nearest"))},
    host="capable")
define_layer("Shape", 1, 1, "the input's shape as int64 (host)",
             attrs={"start": attr("int", 0), "end": attr("int", None)}, host="always")
define_layer("Size", 1, 1, "element count as int64 scalar (host)", host="always")
define_layer("ShapeConstant", 1, VARIADIC, "tensors that are functions of the inputs' shapes alone (body: a Network "
             "over inputs of those shapes that reads only their shapes); the runtime computes them once per input "
             "shape and keeps them", attrs={"body": attr("graph"), **_SUBGRAPH}, host="always")
define_layer("TopK", 2, 2, "x, k; outputs values, indices", host_inputs=(1,), attrs={
    "axis": attr("int", -1), "largest": attr("bool", True), "sorted": attr("bool", True)})
define_layer("If", 1, 1, "cond; then_branch, else_branch (Networks); a constant cond is folded at build", attrs={
    "then_branch": attr("graph"), "else_branch": attr("graph"), **_SUBGRAPH}, control_flow=True)
define_layer("Loop", 2, VARIADIC, "ONNX Loop: max_trip_count?, cond?, carried...; body (Network)",
             attrs={"body": attr("graph"), **_SUBGRAPH}, optional_inputs=(0, 1), control_flow=True)
define_layer("Scan", 1, VARIADIC, "ONNX Scan (batched: v8, a leading batch axis and sequence_lens)", attrs={
    "body": attr("graph"), "num_scan_inputs": attr("int", lo=0), "scan_input_axes": attr("ints", None),
    "scan_input_directions": attr("ints", None), "scan_output_axes": attr("ints", None),
    "scan_output_directions": attr("ints", None), **_flags("batched"), **_SUBGRAPH}, optional_inputs=(0,),
    control_flow=True)
define_layer("Where", 3, 3, "select: cond ? a : b with broadcasting", host="capable")
define_layer("Expand", 2, 2, "broadcast x to shape (host)", host_inputs=(1,))
define_layer("Tile", 2, 2, "repeat x by repeats (host)", host_inputs=(1,))
define_layer("ConstantOfShape", 1, 1, "filled tensor of the shape (host)", host_inputs=(0,),
             attrs={"value": attr("array", None, doc="one element (None: float32 zero)")})
define_layer("Range", 3, 3, "start, limit, delta", host_inputs=(0, 1, 2), host="capable")
define_layer("Split", 1, 2, "x, split? → parts along axis: sizes from split, or equal parts over the outputs",
             host_inputs=(1,),
             attrs={**_AXIS, "split": attr("ints", None, lo=0), "num_outputs": attr("int", None, lo=1)})
define_layer("Einsum", 1, VARIADIC, "Einstein summation", attrs={"equation": attr("str")})
define_layer("CumSum", 2, 2, "x, axis; cumulative sum (op prod: product)", host_inputs=(1,), attrs={
    **_flags("exclusive", "reverse"), "op": attr("str", "sum", choices=("sum", "prod"))})
define_layer("NonZero", 1, 1, "indices of non-zero elements, [rank, n] int64 (data-dependent shape)")
define_layer("OneHot", 3, 3, "indices, depth, values", host_inputs=(1,), attrs={"axis": attr("int", -1)})
define_layer("Trilu", 1, 2, "x, k?", host_inputs=(1,), attrs={"upper": attr("bool", True)})
_BLOCKS = {"blocksize": attr("int", lo=1), "mode": attr("str", "DCR", choices=("DCR", "CRD"))}
define_layer("DepthToSpace", 1, 1, "channels to spatial blocks", attrs=_BLOCKS)
define_layer("SpaceToDepth", 1, 1, "spatial blocks to channels", attrs=_BLOCKS)
define_layer("Attention", 3, 4, "fused scaled-dot-product attention: q, k, v, mask?", attrs={
    "scale": attr("float", None, doc="None: 1/sqrt(head size)"), **_flags("causal")})

# ---- sequences and optionals (values are Python lists of tensors / None at run time) ---------
define_layer("SequenceEmpty", 0, 0, "an empty sequence", attrs={"dtype": attr("dtype", "float32", doc="element type")})
define_layer("SequenceConstruct", 1, VARIADIC, "a sequence of the inputs, in order")
define_layer("SequenceAt", 2, 2, "seq, position (negative counts from the end) → that element", host_inputs=(1,))
define_layer("SequenceInsert", 2, 3, "seq, tensor, position? → a new sequence with tensor inserted (default: at the "
             "end)", host_inputs=(2,))
define_layer("SequenceErase", 1, 2, "seq, position? → a new sequence without that element (default: the last)",
             host_inputs=(1,))
define_layer("SequenceLength", 1, 1, "number of elements as an int64 scalar")
define_layer("SplitToSequence", 1, 2, "x, split? → sequence of chunks along axis; keepdims for split-by-1",
             host_inputs=(1,), attrs={**_AXIS, "keepdims": attr("bool", True)})
define_layer("ConcatFromSequence", 1, 1, "join a sequence's tensors along axis (new_axis: stack instead)",
             attrs={**_AXIS, **_flags("new_axis")})
define_layer("SequenceMap", 1, VARIADIC, "run body (Network) once per element of the first input (a sequence); "
             "further sequence inputs are walked in step, tensor inputs are passed whole; outputs are sequences",
             attrs={"body": attr("graph"), **_SUBGRAPH})
define_layer("Optional", 0, 1, "wrap a tensor or sequence as an optional; no input → an empty optional (None)")
define_layer("OptionalHasElement", 0, 1, "bool scalar: the optional (or tensor/sequence) input is present")
define_layer("OptionalGetElement", 1, 1, "the value inside an optional (a tensor or a sequence)")

# ---- quantization (TensorRT's IQuantizeLayer / IDequantizeLayer) ------------------------------
_QUANT = {"axis": attr("int", 1), "block_size": attr("int", 0, lo=0, doc="0: per-tensor or per-axis"), **_TO}
define_layer("QuantizeLinear", 2, 3, "y = saturate(round(x / scale) + zero_point); x, scale, zero_point?",
             attrs={**_QUANT, "saturate": attr("bool", True)})
define_layer("DequantizeLinear", 2, 3, "y = (x - zero_point) * scale; x, scale, zero_point?", attrs=_QUANT)
define_layer("DynamicQuantizeLinear", 1, 1, "uint8 quantization with scale/zero point from the data's range; "
             "outputs y, scale, zero_point")
# 8-bit layers folded from DequantizeLinear -> conv/GEMM -> QuantizeLinear (passes/fold_qdq.py): the product runs on
# the 8-bit codes (int32 or FP32 accumulation); the epilogue dequantizes, adds the bias, the residual and the
# activation, and requantizes to ``to`` with out_scale (an 8-bit ``to``) or stores a float ``to``, and then, with
# codes_scale, also that float output's 8-bit codes as a second output.
_QUANTIZED = {"x_scale": attr("float", lo=0.0, doc="scale of the input codes"),
              "x_zero_point": attr("int", 0, doc="zero point of the input codes"),
              "w_scale": attr("array", doc="float32 weight scale per output channel"),
              "out_scale": attr("float", None, lo=0.0, doc="scale of 8-bit output codes (None: float output)"),
              "out_zero_point": attr("int", 0), **_TO, **_EPILOGUE, **_flags("residual_after_activation"),
              **_CODES}
define_layer("QConvolution", 3, 4, "8-bit 2-D convolution: x codes [N, Cin, H, W], weight codes [Cout, Cin/g, kh, kw], "
             "bias int32 [Cout] in units of x_scale * w_scale, residual? (like the output: float, or 8-bit codes "
             "with residual_scale)", attrs={
                 **_CONV, **_QUANTIZED, "residual_scale": attr("float", None, lo=0.0, doc="None: a float residual"),
                 "residual_zero_point": attr("int", 0)}, channels_last=True, outputs=lambda a: _with_codes(1, a))
define_layer("QFullyConnected", 3, 3, "8-bit y = x @ weight.T + bias over the last axis: x codes [..., K], weight "
             "codes [N, K], bias int32 [N] in units of x_scale * w_scale", attrs=_QUANTIZED,
             outputs=lambda a: _with_codes(1, a))

# ---- signal processing ------------------------------------------------------------------------
define_layer("DFT", 1, 3, "x [..., n, 1 or 2], dft_length?, axis? → complex as a trailing 2", host_inputs=(1, 2),
             attrs={**_flags("inverse", "onesided"), "axis": attr("int", 1)})
define_layer("STFT", 2, 4, "signal, frame_step, window?, frame_length?", host_inputs=(1, 3),
             attrs={"onesided": attr("bool", True)})
define_layer("Window", 1, 1, "size (host) → window", host_inputs=(0,), attrs={
    "type": attr("str", choices=("hann", "hamming", "blackman")), "periodic": attr("bool", True),
    "to": attr("dtype", "float32")})
define_layer("MelWeightMatrix", 5, 5, "num_mel_bins, dft_length, sample_rate, lower_edge_hertz, upper_edge_hertz "
             "(host)", host_inputs=(0, 1, 2, 3, 4), attrs={"to": attr("dtype", "float32")})

# ---- normalization with statistics outputs, unpooling -------------------------------------
define_layer("LayerNormStats", 1, 3, "layer normalization that also returns Mean and InvStdDev: x, scale?, bias? → "
             "y, mean, inv_std_dev", attrs={"axis": attr("int", -1), "epsilon": attr("float", 1e-5),
                                            "stash_type": attr("int", 1, doc="1: float32 statistics")})
define_layer("BatchNormTraining", 5, 5, "batch normalization with batch statistics: x, scale, bias, running_mean, "
             "running_var → y, new running_mean, new running_var",
             attrs={"epsilon": attr("float", 1e-5), "momentum": attr("float", 0.9)})
define_layer("MaxUnpool", 2, 3, "x, indices, output_shape? → scatter x to the indices", host_inputs=(2,), attrs={
    "kernel": attr("ints", lo=1), "stride": attr("ints", None, lo=1), "pads": attr("ints", None)})

# ---- ONNX conformance additions ------------------------------------------------------------------
define_layer("MultiHeadAttention", 3, 7, "ONNX Attention (opset 23+): q, k, v, mask?, past_key?, past_value?, "
             "nonpad_kv_seqlen?; outputs y, present_key, present_value, qk_matmul_output", attrs={
                 "scale": attr("float", None), **_flags("is_causal"), "q_num_heads": attr("int", None, lo=1),
                 "kv_num_heads": attr("int", None, lo=1), "softcap": attr("float", 0.0),
                 "qk_matmul_output_mode": attr("int", 0), "left_window_size": attr("int", -1),
                 "right_window_size": attr("int", -1)})
define_layer("RotaryEmbedding", 3, 4, "x, cos_cache, sin_cache, position_ids?", attrs={
    **_flags("interleaved"), "num_heads": attr("int", 0, lo=0), "rotary_embedding_dim": attr("int", 0, lo=0)})
define_layer("NLLLoss", 2, 3, "negative log-likelihood: log-probs [N, C, ...], target [N, ...], weight? [C]", attrs={
    "reduction": attr("str", "mean", choices=("none", "sum", "mean")), "ignore_index": attr("int", None)})
define_layer("Unique", 1, 1, "unique values (or slices along axis; None: flattened); outputs y, first indices, "
             "inverse indices, counts; sorted, else order of first occurrence; data-dependent shape",
             attrs={"axis": attr("int", None), "sorted": attr("bool", True)})
define_layer("Compress", 2, 2, "x, condition (1-D bool) → the slices along axis (flattened when None) where it holds",
             attrs={"axis": attr("int", None)})
define_layer("ReverseSequence", 2, 2, "x, sequence_lens → each batch's first lens[b] steps reversed",
             attrs={"batch_axis": attr("int", 1), "time_axis": attr("int", 0)})
define_layer("TensorScatter", 2, 3, "cache, update, write_indices? → cache with update written per batch at the index "
             "along axis", attrs={"axis": attr("int", -2),
                                  "mode": attr("str", "linear", choices=("linear", "circular"))})
define_layer("EyeLike", 1, 1, "a 2-D identity-like tensor shaped like x (output dtype from the layer)",
             attrs={"k": attr("int", 0)})
define_layer("CenterCropPad", 2, 2, "x, shape (host) → centered crop or zero pad to shape on axes", host_inputs=(1,),
             attrs={"axes": attr("ints", None)})
define_layer("BitCast", 1, 1, "reinterpret the bits as another type of the same element size", attrs=_TO)
define_layer("Col2Im", 3, 3, "columns [N, C*prod(block), L], image_shape, block_shape (host) → image, summing "
             "overlaps", host_inputs=(1, 2), attrs={"dilations": attr("ints", None, lo=1), "pads": attr("ints", None),
                                                    "strides": attr("ints", None, lo=1)})
define_layer("Hardmax", 1, 1, "one-hot of the (first) maximum along axis", attrs={"axis": attr("int", -1)})
define_layer("Det", 1, 1, "determinant of the trailing square matrices")
_INTEGER = {"op": attr("str", choices=("matmul", "conv")), **_WINDOW, "groups": _CONV["groups"]}
define_layer("QLinearOp", 8, 9, "quantized matmul/conv with requantization: a, a_scale, a_zero_point?, b, b_scale, "
             "b_zero_point?, y_scale, y_zero_point?, bias? (int32, conv); integer arithmetic, round half to even, "
             "saturate", attrs=_INTEGER, optional_inputs=(2, 5, 7))
define_layer("IntegerOp", 2, 4, "integer matmul/conv: a, b, a_zero_point?, b_zero_point? → int32", attrs=_INTEGER)
define_layer("Select", 1, 1, "x indexed at one constant position along axis; a view, no copy",
             attrs={**_AXIS, "index": attr("int")}, host="capable")
define_layer("LinearAttention", 3, 6, "ONNX LinearAttention (opset 27): query, key, value, past_state?, decay?, beta?; "
             "outputs output, present_state", attrs={
                 "update_rule": attr("str", "gated_delta", choices=("linear", "gated", "delta", "gated_delta")),
                 "q_num_heads": attr("int", lo=1), "kv_num_heads": attr("int", lo=1), "scale": attr("float", 0.0)})
define_layer("TfIdfVectorizer", 1, 1, "n-gram counts of integer token rows → float32 [N, columns]", attrs={
    "pool_int64s": attr("ints"), "ngram_counts": attr("ints", lo=0), "ngram_indexes": attr("ints", lo=0),
    "min_gram_length": attr("int", lo=1), "max_gram_length": attr("int", lo=1), "max_skip_count": attr("int", lo=0),
    "mode": attr("str", "TF", choices=("TF", "IDF", "TFIDF")), "weights": attr("floats", None)})
define_layer("Pointwise", 1, VARIADIC, "a fused chain of element-wise ops over broadcast inputs; program: steps in "
             "SSA order, each {op, args, alpha?, beta?}, args 'iN' (input N), 'vN' (step N) or a number; "
             "the last step is the output", attrs={"program": attr("program")})
