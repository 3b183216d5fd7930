"""The Pointwise layer: a fused element-wise program, step by step in torch or as one generated
Triton kernel on the GPU.

The Triton source is generated from the program (one line per step, FP32 arithmetic, inputs read
through broadcast strides), written to a cache directory and imported, so Triton's JIT sees real
source. Kernels are cached by program and rank.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
import threading

import torch

from kiln.errors import BuildError
from kiln.kernels.pointwise import activation_fn
from kiln.kernels.registry import tactic

MAX_RANK = 6


def _torch_step(op: str, args: list, alpha: float, beta: float):
    if op in ("sum", "sub", "prod", "div", "max", "min", "pow"):
        a, b = args
        if not isinstance(a, torch.Tensor):          # a literal on the left: fill on the device, no copy
            a = torch.full_like(b, a)
        if not isinstance(b, torch.Tensor) and op in ("max", "min"):
            return torch.clamp(a, min=b) if op == "max" else torch.clamp(a, max=b)
        return {"sum": torch.add, "sub": torch.sub, "prod": torch.mul, "div": torch.div, "max": torch.maximum,
                "min": torch.minimum, "pow": torch.pow}[op](a, b)
    (a,) = args
    unary = {"exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt, "recip": torch.reciprocal, "abs": torch.abs,
             "neg": torch.neg, "erf": torch.erf, "sin": torch.sin, "cos": torch.cos}
    if op in unary:
        return unary[op](a)
    return activation_fn(op, alpha, beta)(a)


@tactic("Pointwise")
def make_pointwise_torch(attrs, ctx):
    program = attrs["program"]

    def run(*xs):
        vals = []
        for step in program:
            args = [xs[int(a[1:])] if isinstance(a, str) and a[0] == "i" else
                    vals[int(a[1:])] if isinstance(a, str) else float(a)
                    for a in step["args"]]
            vals.append(_torch_step(step["op"], args, step.get("alpha", 0.0), step.get("beta", 0.0)))
        return (vals[-1],)
    return run


# ---- code generation ------------------------------------------------------------------------
def _lit(v: float) -> str:
    return repr(float(v)) if v == v and abs(v) != float("inf") else ("float('nan')" if v != v else
                                                                          f"float('{'-' if v < 0 else ''}inf')")


def _expr(step: dict, ref) -> str:
    op = step["op"]
    a = [ref(x) for x in step["args"]]
    al, be = _lit(step.get("alpha", 0.0)), _lit(step.get("beta", 0.0))
    if op == "pow":
        e = step["args"][1]
        if isinstance(e, (int, float)) and float(e).is_integer() and 0 <= e <= 4:
            return " * ".join([a[0]] * int(e)) if e else "tl.full(" + a[0] + ".shape, 1.0, tl.float32)"
        if isinstance(e, (int, float)) and e == 0.5:
            return f"tl.sqrt({a[0]})"
        return f"tl.exp({a[1]} * tl.log({a[0]}))"
    table = {
        "sum": "{0} + {1}", "sub": "{0} - {1}", "prod": "{0} * {1}", "div": "{0} / {1}",
        "max": "tl.maximum({0}, {1})", "min": "tl.minimum({0}, {1})",
        "exp": "tl.exp({0})", "log": "tl.log({0})", "sqrt": "tl.sqrt({0})", "recip": "1.0 / {0}",
        "abs": "tl.abs({0})", "neg": "-{0}", "erf": "tl.math.erf({0})", "sin": "tl.sin({0})", "cos": "tl.cos({0})",
        "relu": "tl.maximum({0}, 0.0)", "sigmoid": "1.0 / (1.0 + tl.exp(-{0}))", "tanh": "_tanh({0})",
        "silu": "{0} / (1.0 + tl.exp(-{0}))", "gelu": "0.5 * {0} * (1.0 + tl.math.erf({0} * 0.7071067811865476))",
        "gelu_tanh": "0.5 * {0} * (1.0 + _tanh(0.7978845608028654 * ({0} + 0.044715 * {0} * {0} * {0})))",
        "leaky_relu": "tl.where({0} >= 0, {0}, {0} * " + al + ")",
        "hard_sigmoid": "tl.minimum(tl.maximum(" + al + " * {0} + " + be + ", 0.0), 1.0)",
        "hard_swish": "{0} * tl.minimum(tl.maximum({0} / 6.0 + 0.5, 0.0), 1.0)",
        "softplus": "tl.where({0} > 20.0, {0}, tl.log(1.0 + tl.exp({0})))",
        "clip": "tl.minimum(tl.maximum({0}, " + al + "), " + be + ")",
    }
    if op not in table:
        raise BuildError(f"Pointwise op {op!r} has no Triton form.")
    return table[op].format(*a)


def source(program: list[dict], n_in: int, rank: int) -> str:
    """The Triton module for ``program`` over ``n_in`` inputs of the given (padded) rank."""
    sizes = ", ".join(f"D{d}" for d in range(rank))
    strides = ", ".join(f"S{i}_{d}" for i in range(n_in) for d in range(rank))
    ins = ", ".join(f"in{i}" for i in range(n_in))
    lines = ["import triton", "import triton.language as tl", "", "",
             "@triton.jit", "def _tanh(x):", "    e = tl.exp(-2.0 * tl.abs(x))", "    t = (1.0 - e) / (1.0 + e)",
             "    return tl.where(x >= 0, t, -t)", "", "",
             "@triton.jit",
             f"def kernel(out_ptr, {ins}, n, {sizes}, {strides}, BLOCK: tl.constexpr):",
             "    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)",
             "    mask = offs < n",
             "    rem = offs"]
    for d in reversed(range(rank)):
        lines += [f"    j{d} = rem % D{d}", f"    rem = rem // D{d}"]
    for i in range(n_in):
        off = " + ".join(f"j{d} * S{i}_{d}" for d in range(rank))
        lines.append(f"    x{i} = tl.load(in{i} + ({off}), mask=mask, other=0.0).to(tl.float32)")

    def ref(a):
        if isinstance(a, str):
            return ("x" if a[0] == "i" else "v") + a[1:]
        return _lit(a)
    for k, step in enumerate(program):
        lines.append(f"    v{k} = {_expr(step, ref)}")
    lines.append(f"    tl.store(out_ptr + offs, v{len(program) - 1}.to(out_ptr.dtype.element_ty), mask=mask)")
    return "\n".join(lines) + "\n"


_KERNELS: dict[str, object] = {}
_LOCK = threading.Lock()


def compiled(program: list[dict], n_in: int, rank: int):
    src = source(program, n_in, rank)
    key = hashlib.sha1((src + os.environ.get("TRITON_INTERPRET", "")).encode()).hexdigest()[:20]
    with _LOCK:
        hit = _KERNELS.get(key)
        if hit is not None:
            return hit
        folder = os.path.join(tempfile.gettempdir(), "kiln-triton")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"pointwise_{key}.py")
        if not os.path.exists(path):
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                f.write(src)
            os.replace(tmp, path)
        spec = importlib.util.spec_from_file_location(f"kiln_pointwise_{key}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _KERNELS[key] = module.kernel
        return module.kernel


def run_triton(program: list[dict], xs: list[torch.Tensor], block: int = 1024) -> torch.Tensor:
    shape = torch.broadcast_shapes(*[x.shape for x in xs])
    rank = max(1, len(shape))
    if rank > MAX_RANK:
        raise BuildError(f"Pointwise fusion handles rank <= {MAX_RANK}, got {rank}.")
    full = (1,) * (rank - len(shape)) + tuple(shape)
    out = torch.empty(shape, dtype=xs[0].dtype, device=xs[0].device)
    n = out.numel()
    if n == 0:
        return out
    strides = []
    for x in xs:
        e = x.reshape((1,) * (rank - x.dim()) + tuple(x.shape)).expand(full)
        strides += [s if full[d] > 1 else 0 for d, s in enumerate(e.stride())]
    kernel = compiled(program, len(xs), rank)
    kernel[((n + block - 1) // block,)](out, *xs, n, *full, *strides, BLOCK=block, num_warps=4)
    return out


def _triton_ok(attrs, ctx):
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@tactic("Pointwise", "triton", devices=("cuda",), supports=_triton_ok)
def make_pointwise_triton(attrs, ctx):
    program = attrs["program"]
    ref = make_pointwise_torch(attrs, ctx)

    def run(*xs):
        if xs[0].is_meta:
            return ref(*xs)
        return (run_triton(program, list(xs)),)
    return run


