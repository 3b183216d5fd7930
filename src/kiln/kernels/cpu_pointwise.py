"""The Pointwise layer on the CPU, writing each intermediate value in place where it dies.

Tactic ``inplace`` runs the same checked program as the ``torch`` tactic (kernels/pointwise_fused.py), op by
op with the same torch kernels, but a step whose first operand is an intermediate value this program made
(not an input, not a value an op returned unchanged) and that no later step reads writes its result into
that value (``a.add_(b)``, ``a.tanh_()``...) instead of allocating a new tensor. It does so only where the
result has the operand's shape and dtype (a broadcast that would grow it, or a type promotion, runs the op
out of place), so its outputs are bit for bit the ``torch`` tactic's. On large activations this saves an
allocation and a pass over fresh memory per step; on small ones it costs about what the ``torch`` tactic
does, and the builder's timing picks between them.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from kiln.ir.pointwise import Ref, validate_program
from kiln.kernels.pointwise_fused import _torch_step as torch_step
from kiln.kernels.registry import KernelContext, tactic

# in-place forms of the grammar's ops, each the same kernel as its out-of-place form in the torch tactic
_BINARY_IN_PLACE = {"sum": torch.Tensor.add_, "sub": torch.Tensor.sub_, "prod": torch.Tensor.mul_,
                    "div": torch.Tensor.div_}
_UNARY_IN_PLACE = {
    "exp": torch.Tensor.exp_, "log": torch.Tensor.log_, "sqrt": torch.Tensor.sqrt_,
    "recip": torch.Tensor.reciprocal_, "abs": torch.Tensor.abs_, "neg": torch.Tensor.neg_, "erf": torch.Tensor.erf_,
    "sin": torch.Tensor.sin_, "cos": torch.Tensor.cos_, "relu": torch.Tensor.relu_,
    "sigmoid": torch.Tensor.sigmoid_, "tanh": torch.Tensor.tanh_,
    "gelu": lambda y: torch.ops.aten.gelu_(y), "gelu_tanh": lambda y: torch.ops.aten.gelu_(y, approximate="tanh"),
}


def _ok(attrs: dict[str, Any], ctx: KernelContext) -> bool:
    return ctx.device == "cpu"


def _fits(a: torch.Tensor, b: Any) -> bool:
    """Whether ``a op= b`` gives ``a op b``'s shape and dtype."""
    if not isinstance(b, torch.Tensor):
        return a.is_floating_point()
    if b.dtype != a.dtype:
        return False
    if b.shape == a.shape:
        return True
    return b.dim() <= a.dim() and all(d == 1 or d == e for d, e in zip(reversed(b.shape), reversed(a.shape)))


@tactic("Pointwise", "inplace", devices=("cpu",), supports=_ok, priority=1)
def make_pointwise_inplace(attrs: dict[str, Any], ctx: KernelContext) -> Callable[..., tuple]:
    steps = validate_program(attrs.get("program"), len(ctx.input_dtypes) or None)
    last_use: dict[int, int] = {}
    for k, s in enumerate(steps):
        for a in s.args:
            if isinstance(a, Ref) and a.kind == "v":
                last_use[a.index] = k
    plan = []
    for k, s in enumerate(steps):
        first = s.args[0]
        dies = isinstance(first, Ref) and first.kind == "v" and last_use[first.index] == k and s.args.count(first) == 1
        in_place = (_BINARY_IN_PLACE.get(s.op) if len(s.args) == 2 else _UNARY_IN_PLACE.get(s.op)) if dies else None
        getters = tuple((a.kind == "i", a.index, None) if isinstance(a, Ref) else (None, 0, a) for a in s.args)
        plan.append((getters, in_place, first.index if dies else -1, s.op, s.alpha, s.beta))

    def run(*xs):
        vals: list = []
        owned: list[bool] = []
        for getters, in_place, dying, op, alpha, beta in plan:
            args = [lit if is_input is None else xs[i] if is_input else vals[i] for is_input, i, lit in getters]
            if in_place is not None and owned[dying]:
                if len(args) == 1:
                    vals.append(in_place(args[0]))
                    owned.append(True)
                    continue
                if _fits(args[0], args[1]):
                    vals.append(in_place(args[0], args[1]))
                    owned.append(True)
                    continue
            r = torch_step(op, args, alpha, beta)
            vals.append(r)
            owned.append(all(r is not x for x in args))
        return (vals[-1],)
    return run
