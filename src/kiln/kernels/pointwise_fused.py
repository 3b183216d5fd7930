"""The Pointwise layer: a fused element-wise program, step by step in torch or as one generated
Triton kernel on the GPU.

A program is data (it comes from the pointwise-fusion pass or from an engine file), so both tactics
first check it against the closed grammar of ``kiln.ir.pointwise`` (``validate_program``). The
Triton source is generated from the checked steps only (op templates from the table, integer
indices, float literals), cached in the per-user folder (kiln/codecache.py) and imported, so
Triton's JIT sees real source.
"""
from __future__ import annotations

import hashlib
import math
import os
import threading
from typing import Any

import torch

from kiln import codecache
from kiln.errors import BuildError
from kiln.ir.pointwise import BINARY, OPS, ProgramStep, Ref, program_error, validate_program
from kiln.kernels.pointwise import activation_fn
from kiln.kernels.registry import tactic

MAX_RANK = 6

# The Triton form of each op; the keys are the closed op table (binary ops read {0} and {1}).
_TRITON = {
    "sum": "{0} + {1}", "sub": "{0} - {1}", "prod": "{0} * {1}", "div": "{0} / {1}",
    "max": "tl.maximum({0}, {1})", "min": "tl.minimum({0}, {1})", "pow": "tl.exp({1} * tl.log({0}))",
    "exp": "tl.exp({0})", "log": "tl.log({0})", "sqrt": "tl.sqrt({0})", "recip": "1.0 / {0}",
    "abs": "tl.abs({0})", "neg": "-{0}", "erf": "tl.math.erf({0})", "sin": "tl.sin({0})", "cos": "tl.cos({0})",
    "relu": "tl.maximum({0}, 0.0)", "sigmoid": "1.0 / (1.0 + tl.exp(-{0}))", "tanh": "_tanh({0})",
    "silu": "{0} / (1.0 + tl.exp(-{0}))", "gelu": "0.5 * {0} * (1.0 + tl.math.erf({0} * 0.7071067811865476))",
    "gelu_tanh": "0.5 * {0} * (1.0 + _tanh(0.7978845608028654 * ({0} + 0.044715 * {0} * {0} * {0})))",
    "leaky_relu": "tl.where({0} >= 0, {0}, {0} * {alpha})",
    "hard_sigmoid": "tl.minimum(tl.maximum({alpha} * {0} + {beta}, 0.0), 1.0)",
    "hard_swish": "{0} * tl.minimum(tl.maximum({0} / 6.0 + 0.5, 0.0), 1.0)",
    "softplus": "tl.where({0} > 20.0, {0}, tl.log(1.0 + tl.exp({0})))",
    "clip": "tl.minimum(tl.maximum({0}, {alpha}), {beta})",
}
_BINARY = {"sum": torch.add, "sub": torch.sub, "prod": torch.mul, "div": torch.div, "max": torch.maximum,
           "min": torch.minimum, "pow": torch.pow}
_UNARY = {"exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt, "recip": torch.reciprocal, "abs": torch.abs,
          "neg": torch.neg, "erf": torch.erf, "sin": torch.sin, "cos": torch.cos}
assert set(_TRITON) == set(OPS) and set(_BINARY) == set(BINARY), "the kernels cover exactly the grammar's ops"


def _n_inputs(ctx) -> int | None:
    return len(ctx.input_dtypes) or None


def _torch_step(op: str, args: list, alpha: float, beta: float):
    if op in _BINARY:
        a, b = args
        if not isinstance(a, torch.Tensor):          # a literal on the left: fill on the device, no copy
            a = torch.full_like(b, a)
        if not isinstance(b, torch.Tensor) and op in ("max", "min"):
            return torch.clamp(a, min=b) if op == "max" else torch.clamp(a, max=b)
        return _BINARY[op](a, b)
    (a,) = args
    if op in _UNARY:
        return _UNARY[op](a)
    return activation_fn(op, alpha, beta)(a)


_FLOATS = frozenset(("float32", "float64", "float16", "bfloat16"))


def _hypots(steps: tuple[ProgramStep, ...]) -> dict[int, tuple[Ref, Ref]]:
    """``sqrt(a*a + b*b)`` (each square as ``pow(x, 2)`` or ``x*x``) whose squares and sum feed nothing else:
    {index of the sqrt step: (a, b)}, for one ``torch.hypot``."""
    uses: dict[int, int] = {}
    for s in steps:
        for a in s.args:
            if isinstance(a, Ref) and a.kind == "v":
                uses[a.index] = uses.get(a.index, 0) + 1

    def once(a) -> ProgramStep | None:          # the step behind ``a`` if nothing else reads it
        return steps[a.index] if isinstance(a, Ref) and a.kind == "v" and uses.get(a.index) == 1 else None

    def root(a) -> Ref | None:                  # x where ``a`` is x*x or pow(x, 2) read only here
        s = once(a)
        if s is None or not isinstance(s.args[0], Ref):
            return None
        if s.op == "pow" and not isinstance(s.args[1], Ref) and float(s.args[1]) == 2.0:
            return s.args[0]
        return s.args[0] if s.op == "prod" and s.args[1] == s.args[0] else None
    found = {}
    for k, s in enumerate(steps):
        total = once(s.args[0]) if s.op == "sqrt" else None
        if total is not None and total.op == "sum":
            a, b = root(total.args[0]), root(total.args[1])
            if a is not None and b is not None:
                found[k] = (a, b)
    return found


@tactic("Pointwise")
def make_pointwise_torch(attrs, ctx):
    """The steps in order, one torch op each; with floating inputs of one dtype, ``sqrt(a*a + b*b)`` is one
    ``torch.hypot`` (its squares and sum are skipped): equal within rounding, and with no overflow of the
    squares."""
    steps = validate_program(attrs.get("program"), _n_inputs(ctx))
    dtypes = set(ctx.input_dtypes)
    hypots = _hypots(steps) if dtypes and dtypes <= _FLOATS and len(dtypes) == 1 else {}
    skipped = {r.index for k in hypots for r in (steps[k].args[0], *steps[steps[k].args[0].index].args)}
    if len(skipped) == len(steps) - 1 and len(steps) - 1 in hypots:      # the program is one hypot
        i, j = (r.index for r in hypots[len(steps) - 1])
        if all(r.kind == "i" for r in hypots[len(steps) - 1]):
            return lambda *xs: (torch.hypot(xs[i], xs[j]),)

    def run(*xs):
        vals = []
        for k, s in enumerate(steps):
            if k in skipped:
                vals.append(None)
                continue
            pair = hypots.get(k)
            if pair is not None:
                vals.append(torch.hypot(*[(xs if r.kind == "i" else vals)[r.index] for r in pair]))
                continue
            args = [(xs if a.kind == "i" else vals)[a.index] if isinstance(a, Ref) else a for a in s.args]
            vals.append(_torch_step(s.op, args, s.alpha, s.beta))
        return (vals[-1],)
    return run


# ---- code generation (from checked steps only) ----------------------------------------------
def _lit(v: float) -> str:
    v = float(v)
    if math.isnan(v):
        return "float('nan')"
    if math.isinf(v):
        return "float('inf')" if v > 0 else "float('-inf')"
    return repr(v)


def _operand(a: Ref | float) -> str:
    if isinstance(a, Ref):
        return f"{'x' if a.kind == 'i' else 'v'}{int(a.index)}"
    return _lit(a)


def _expr(step: ProgramStep) -> str:
    a = [_operand(x) for x in step.args]
    if step.op == "pow" and not isinstance(step.args[1], Ref):
        e = float(step.args[1])
        if e.is_integer() and 0 <= e <= 4:
            return " * ".join([a[0]] * int(e)) if e else "tl.full(" + a[0] + ".shape, 1.0, tl.float32)"
        if e == 0.5:
            return f"tl.sqrt({a[0]})"
    return _TRITON[step.op].format(*a, alpha=_lit(step.alpha), beta=_lit(step.beta))


def _source(steps: tuple[ProgramStep, ...], n_in: int, rank: int) -> str:
    n_in, rank = int(n_in), int(rank)
    sizes = ", ".join(f"D{d}" for d in range(rank))
    strides = ", ".join(f"S{i}_{d}" for i in range(n_in) for d in range(rank))
    ins = ", ".join(f"in{i}" for i in range(n_in))
    # the element count, the sizes and the outer strides change with the input shape: not specialized, so a range
    # engine's new shape reuses the compiled kernel (the innermost strides, 1, 0 or a channel count, do not change)
    generic = ["n"] + [f"D{d}" for d in range(rank)] + [f"S{i}_{d}" for i in range(n_in) for d in range(rank - 1)]
    lines = ["import triton", "import triton.language as tl", "", "",
             "@triton.jit", "def _tanh(x):", "    e = tl.exp(-2.0 * tl.abs(x))", "    t = (1.0 - e) / (1.0 + e)",
             "    return tl.where(x >= 0, t, -t)", "", "",
             f"@triton.jit(do_not_specialize={generic!r})",
             f"def kernel(out_ptr, {ins}, n, {sizes}, {strides}, BLOCK: tl.constexpr):",
             "    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)",
             "    mask = offs < n",
             "    rem = offs"]
    for d in reversed(range(rank)):
        lines += [f"    j{d} = rem % D{d}", f"    rem = rem // D{d}"]
    for i in range(n_in):
        off = " + ".join(f"j{d} * S{i}_{d}" for d in range(rank))
        lines.append(f"    x{i} = tl.load(in{i} + ({off}), mask=mask, other=0.0).to(tl.float32)")
    for k, step in enumerate(steps):
        lines.append(f"    v{k} = {_expr(step)}")
    lines.append(f"    tl.store(out_ptr + offs, v{len(steps) - 1}.to(out_ptr.dtype.element_ty), mask=mask)")
    return "\n".join(lines) + "\n"


def source(program: Any, n_in: int, rank: int) -> str:
    """The Triton module for ``program`` over ``n_in`` inputs of the given (padded) rank."""
    return _source(validate_program(program, n_in), n_in, rank)


_KERNELS: dict[tuple, object] = {}
_LOCK = threading.Lock()


def _compiled(steps: tuple[ProgramStep, ...], n_in: int, rank: int):
    key = (repr(steps), n_in, rank, os.environ.get("TRITON_INTERPRET", ""))    # repr: NaN literals match
    hit = _KERNELS.get(key)
    if hit is not None:
        return hit
    for k, step in enumerate(steps):
        if any(isinstance(a, Ref) and a.kind == "i" and a.index >= n_in for a in step.args):
            raise program_error(f"step {k}", f"reads an input past the {n_in} given to it")
    src = _source(steps, n_in, rank)
    with _LOCK:
        hit = _KERNELS.get(key)
        if hit is None:
            digest = hashlib.sha256(src.encode()).hexdigest()
            hit = _KERNELS[key] = codecache.import_source(src, "kernels", f"kiln_pointwise_{digest[:20]}").kernel
        return hit


def compiled(program: Any, n_in: int, rank: int):
    """The Triton kernel for ``program`` (checked first), imported through the per-user cache."""
    return _compiled(validate_program(program, n_in), n_in, rank)


def _run_triton(steps: tuple[ProgramStep, ...], xs: list[torch.Tensor], block: int = 1024) -> torch.Tensor:
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
    kernel = _compiled(steps, len(xs), rank)
    kernel[((n + block - 1) // block,)](out, *xs, n, *full, *strides, BLOCK=block, num_warps=4)
    return out


def run_triton(program: Any, xs: list[torch.Tensor], block: int = 1024) -> torch.Tensor:
    """``program`` (checked first) over broadcast ``xs`` as one generated Triton kernel."""
    return _run_triton(validate_program(program, len(xs)), xs, block)


def _triton_ok(attrs, ctx):
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@tactic("Pointwise", "triton", devices=("cuda",), supports=_triton_ok)
def make_pointwise_triton(attrs, ctx):
    steps = validate_program(attrs.get("program"), _n_inputs(ctx))
    ref = make_pointwise_torch(attrs, ctx)

    def run(*xs):
        if xs[0].is_meta:
            return ref(*xs)
        return (_run_triton(steps, list(xs)),)
    return run


