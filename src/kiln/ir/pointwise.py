"""The Pointwise layer's program: a closed grammar, checked before anything runs or is generated from it.

A program is data (from the pointwise-fusion pass or from an engine file). Each step is
``{"op": OP, "args": [ARG, ...], "alpha"?: number, "beta"?: number}`` with OP from ``OPS`` and its
arity, and each ARG either ``"i<k>"`` (layer input k), ``"v<k>"`` (the value of an earlier step k)
or a real number. ``validate_program`` returns the checked steps; kernels generate code from those
only. This module imports nothing heavy, so the engine-file schema checks programs at load.
"""
from __future__ import annotations

import numbers
import re
from typing import Any, NamedTuple

from kiln.errors import BuildError

MAX_STEPS = 1024
BINARY = ("sum", "sub", "prod", "div", "max", "min", "pow")
UNARY = ("exp", "log", "sqrt", "recip", "abs", "neg", "erf", "sin", "cos", "relu", "sigmoid", "tanh", "silu",
         "gelu", "gelu_tanh", "leaky_relu", "hard_sigmoid", "hard_swish", "softplus", "clip")
OPS: dict[str, int] = {**{op: 2 for op in BINARY}, **{op: 1 for op in UNARY}}     # op -> arity
_KEYS = {"op", "args", "alpha", "beta"}
_REF = re.compile(r"([iv])(0|[1-9][0-9]{0,5})")


class Ref(NamedTuple):
    kind: str       # "i": a layer input, "v": an earlier step's value
    index: int


class ProgramStep(NamedTuple):
    op: str
    args: tuple[Ref | float, ...]
    alpha: float
    beta: float


def program_error(where: str, problem: str) -> BuildError:
    return BuildError(f"Pointwise program {where}: {problem} (a step is {{op, args, alpha?, beta?}} with an op "
                      f"from Kiln's table and args 'iK' for input K, 'vK' for step K, or numbers).")


def _show(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:               # an int past Python's digit limit, nesting past the recursion limit
        text = f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise program_error(where, f"{_show(value)} is not a number")
    try:
        return float(value)
    except (OverflowError, TypeError, ValueError):
        raise program_error(where, f"{_show(value)} is out of range for a float") from None


def validate_program(program: Any, n_inputs: int | None) -> tuple[ProgramStep, ...]:
    """The checked steps of ``program`` over ``n_inputs`` layer inputs (None: not known here);
    anything outside the grammar raises one BuildError naming the step."""
    if not isinstance(program, (list, tuple)) or not program:
        raise program_error("attribute", f"expected a non-empty list of steps, got {_show(program)}")
    if len(program) > MAX_STEPS:
        raise program_error("attribute", f"{len(program)} steps is more than the {MAX_STEPS} allowed")
    steps = []
    for k, step in enumerate(program):
        where = f"step {k}"
        if not isinstance(step, dict):
            raise program_error(where, f"expected an object, got {_show(step)}")
        extra = [key for key in step if key not in _KEYS]
        if extra:
            raise program_error(where, f"unknown key {_show(extra[0])}")
        op = step.get("op")
        if not isinstance(op, str) or op not in OPS:
            raise program_error(where, f"unknown op {_show(op)}")
        args = step.get("args")
        if not isinstance(args, (list, tuple)) or len(args) != OPS[op]:
            raise program_error(where, f"{op} takes {OPS[op]} argument(s), got {_show(args)}")
        checked: list[Ref | float] = []
        for a in args:
            if isinstance(a, str):
                m = _REF.fullmatch(a)
                if m is None:
                    raise program_error(where, f"argument {_show(a)} is neither 'iK', 'vK' nor a number")
                ref = Ref(m.group(1), int(m.group(2)))
                if ref.kind == "i" and n_inputs is not None and ref.index >= n_inputs:
                    raise program_error(where, f"argument {a!r} names input {ref.index} of a layer with {n_inputs}")
                if ref.kind == "v" and ref.index >= k:
                    raise program_error(where, f"argument {a!r} names a step that does not come before it")
                checked.append(ref)
            else:
                checked.append(_number(a, where))
        if not any(isinstance(a, Ref) for a in checked):
            raise program_error(where, f"{op} reads no input or earlier step")
        steps.append(ProgramStep(op, tuple(checked), _number(step.get("alpha", 0.0), where),
                                 _number(step.get("beta", 0.0), where)))
    return tuple(steps)


