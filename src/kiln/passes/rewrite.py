"""Rewrite rules and the one driver that applies them.

A ``Rule`` is a pattern written as the maths it matches, a ``check`` that returns ``None`` to
accept a match or a sentence saying why it declines, and a ``rewrite`` that edits the Network::

    x = Var("x")
    SILU = Rule("silu", Mul(x, Act("sigmoid", x)), None, to_silu)          # x·σ(x) → silu(x)

Patterns:
- ``Var("x")`` matches any tensor; a name used twice must match the same tensor;
- ``Const(0.5)`` matches a one-element constant within a relative 1e-3 of the value, ``Scalar("eps")``
  any one-element constant, ``ConstTensor("g")`` any constant tensor; ``ANY`` matches anything, a
  missing input too;
- ``Op(kind, *inputs, name=..., shared=..., **attrs)`` matches the output of a layer of that kind
  (a tuple of kinds: any of them) whose attrs equal the given values (a callable: a test of the
  value) and whose inputs match ``inputs`` (ending with ``...``: more inputs may follow);
  ``Mul``, ``Add``, ``Div``, ``Sub``, ``Unary`` and ``Act`` are shorthands. One ``Op`` object used
  twice in a pattern is one layer (``d = Sub(x, m)`` then ``Div(d, Sqrt(... Mul(d, d) ...))``);
- ``OneOf(p, q)`` matches what either matches.
The matcher tries both operand orders of commutative element-wise ops (sum, prod, max, min) and
hands every match to ``check`` until one is accepted. A matched layer's output other than the
root's must be read only inside the match and not be a network output, unless its ``Op`` says
``shared=True``.

``rewrite(net, rules)`` sweeps the layers in order (or in reverse) trying the rules whose root
kind fits, in the order given, until a sweep changes nothing. It counts how often each rule fired
and, in that last sweep, the matches declined and why (``KILN_LOG=passes`` prints both). An
exception inside a rule is raised again as ``RewriteError`` naming the rule and what ran before it,
and so are rules still firing after MAX_SWEEPS sweeps.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from kiln.ir.network import Layer, Network, Tensor
from kiln.passes._match import scalar
from kiln.passes.base import Pass, PassResult, RewriteError, Stats, history, log_enabled, reraise

COMMUTATIVE = {("ElementWise", "sum"), ("ElementWise", "prod"), ("ElementWise", "max"), ("ElementWise", "min")}
MAX_SWEEPS = 64


class Pattern:
    """A pattern over the value graph (see the module docstring)."""


@dataclass(eq=False)
class Var(Pattern):
    name: str


@dataclass(eq=False)
class _Any(Pattern):
    pass


ANY = _Any()


@dataclass(eq=False)
class Const(Pattern):
    value: float
    tol: float = 1e-3
    name: str | None = None


@dataclass(eq=False)
class Scalar(Pattern):
    name: str | None = None


@dataclass(eq=False)
class ConstTensor(Pattern):
    name: str | None = None


@dataclass(eq=False)
class OneOf(Pattern):
    options: tuple[Pattern, ...]

    def __init__(self, *options: Pattern) -> None:
        self.options = options


@dataclass(eq=False)
class Op(Pattern):
    kind: str | tuple[str, ...]
    inputs: tuple[Any, ...]
    attrs: dict[str, Any]
    name: str | None = None
    shared: bool = False

    def __init__(self, kind: str | tuple[str, ...], *inputs: Any, name: str | None = None, shared: bool = False,
                 **attrs: Any) -> None:
        self.kind, self.inputs, self.attrs, self.name, self.shared = kind, inputs, attrs, name, shared
        self.fixed = [(k, v) for k, v in attrs.items() if not callable(v)]
        self.tests = [(k, v) for k, v in attrs.items() if callable(v)]

    @property
    def kinds(self) -> tuple[str, ...]:
        return (self.kind,) if isinstance(self.kind, str) else tuple(self.kind)


def Mul(a: Pattern, b: Pattern, **kw: Any) -> Op:       # noqa: N802 (the maths reads as a call)
    return Op("ElementWise", a, b, op="prod", **kw)


def Add(a: Pattern, b: Pattern, **kw: Any) -> Op:       # noqa: N802
    return Op("ElementWise", a, b, op="sum", **kw)


def Sub(a: Pattern, b: Pattern, **kw: Any) -> Op:       # noqa: N802
    return Op("ElementWise", a, b, op="sub", **kw)


def Div(a: Pattern, b: Pattern, **kw: Any) -> Op:       # noqa: N802
    return Op("ElementWise", a, b, op="div", **kw)


def Unary(op: str, a: Pattern, **kw: Any) -> Op:        # noqa: N802
    return Op("Unary", a, op=op, **kw)


def Act(kind: str, a: Pattern, **kw: Any) -> Op:        # noqa: N802
    return Op("Activation", a, type=kind, **kw)


class Match(dict):
    """A match: pattern names → the tensors and layers they matched, plus ``net``, ``root`` and
    ``layers`` (every matched layer, the root first). ``check`` may store what it computed for
    ``rewrite`` under new keys."""

    def __init__(self, net: Network, root: Layer, env: dict) -> None:
        super().__init__((k, v) for k, v in env.items() if isinstance(k, str))
        self.net = net
        self.root = root
        self.layers: list[Layer] = [v for k, v in env.items() if isinstance(k, tuple) and k[0] == "layer"]


@dataclass
class Rule:
    """``pattern`` matched at a root layer; ``check(match)`` → None or why it declines;
    ``rewrite(match)`` edits ``match.net``."""

    name: str
    pattern: Op
    check: Callable[[Match], str | None] | None
    rewrite: Callable[[Match], None]
    kinds: tuple[str, ...] = field(init=False)
    could_match: Callable[[Layer], bool] = field(init=False, repr=False)
    key: tuple[str, Any] | None = field(init=False, repr=False)       # one attr the root must have

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, Op):
            raise TypeError(f"Rule {self.name!r}: the pattern's root must be an Op")
        self.kinds = self.pattern.kinds
        self.could_match = _first_level(self.pattern)
        self.key = self.pattern.fixed[0] if self.pattern.fixed else None


# ---- matching ------------------------------------------------------------------------------------
def _attrs_fit(p: Op, layer: Layer) -> bool:
    a = layer.attrs
    for k, v in p.fixed:
        if a.get(k) != v:
            return False
    for k, fn in p.tests:
        if not fn(a.get(k)):
            return False
    return True


def _first_level(p: Op) -> Callable[[Layer], bool]:
    """A quick test that a layer of one of ``p``'s kinds can be the root of a match: its attrs, and
    the producers' kinds and constness of its inputs (in either order where the op commutes)."""
    pats = p.inputs[:-1] if p.inputs and p.inputs[-1] is Ellipsis else p.inputs
    need = [frozenset(q.kinds) if isinstance(q, Op) else "const" if isinstance(q, (Const, Scalar, ConstTensor))
            else None for q in pats]
    if all(n is None for n in need):
        return lambda layer: _attrs_fit(p, layer)

    def fits(ins) -> bool:
        for n, t in zip(need, ins):
            if n is None:
                continue
            if t is None or (not t.is_constant if n == "const" else t.producer is None or t.producer.kind not in n):
                return False
        return True

    def quick(layer: Layer) -> bool:
        ins = layer.inputs
        if len(ins) < len(need) or not _attrs_fit(p, layer):
            return False
        if fits(ins):
            return True
        return len(need) == 2 and (layer.kind, layer.attrs.get("op")) in COMMUTATIVE and fits((ins[1], ins[0]))
    return quick


def _match(p: Any, t: Tensor | None, env: dict) -> Iterator[dict]:
    if isinstance(p, Op):
        if t is None or t.producer is None:
            return
        for e in _match_layer(p, t.producer, env):
            if not p.shared:
                e = {**e, ("inner", id(t)): t}
            yield e
    elif isinstance(p, Var):
        if t is None:
            return
        bound = env.get(p.name)
        if bound is None:
            yield {**env, p.name: t}
        elif bound is t:
            yield env
    elif isinstance(p, Const):
        v = scalar(t)
        if v is not None and abs(v - p.value) <= p.tol * max(1.0, abs(p.value)):
            yield {**env, p.name: t} if p.name else env
    elif isinstance(p, Scalar):
        if scalar(t) is not None:
            yield {**env, p.name: t} if p.name else env
    elif isinstance(p, ConstTensor):
        if t is not None and t.is_constant:
            yield {**env, p.name: t} if p.name else env
    elif isinstance(p, OneOf):
        for option in p.options:
            yield from _match(option, t, env)
    elif p is ANY:
        yield env
    else:
        raise TypeError(f"not a pattern: {p!r}")


def _match_layer(p: Op, layer: Layer, env: dict) -> Iterator[dict]:
    key = ("layer", id(p))
    seen = env.get(key)
    if seen is not None:                        # the same Op met again: the same layer
        if seen is layer:
            yield env
        return
    if layer.kind not in p.kinds or not _attrs_fit(p, layer):
        return
    pats = p.inputs
    more = bool(pats) and pats[-1] is Ellipsis
    if more:
        pats = pats[:-1]
    ins = layer.inputs
    if len(ins) < len(pats) if more else len(ins) != len(pats):
        return
    env = {**env, key: layer}
    if p.name:
        env[p.name] = layer
    orders = [(pats, ins[:len(pats)])]
    if len(pats) == 2 and not more and pats[0] is not pats[1] and (layer.kind, layer.attrs.get("op")) in COMMUTATIVE:
        orders.append((pats, (ins[1], ins[0])))
    for ps, ts in orders:
        yield from _match_all(ps, ts, env)


def _match_all(pats: tuple, ts: Any, env: dict) -> Iterator[dict]:
    if not pats:
        yield env
        return
    for e in _match(pats[0], ts[0], env):
        yield from _match_all(pats[1:], ts[1:], e)


def matches(pattern: Op, net: Network, layer: Layer) -> Iterator[Match | str]:
    """Every way ``pattern`` matches with ``layer`` as its root: a Match, or the reason a match
    reads an inner value outside itself."""
    for env in _match_layer(pattern, layer, {}):
        mine = {id(v) for k, v in env.items() if isinstance(k, tuple) and k[0] == "layer"}
        leak = next((t for k, t in env.items() if isinstance(k, tuple) and k[0] == "inner"
                     and (any(id(u) not in mine for u, _ in t.uses) or any(o is t for o in net.outputs))), None)
        if leak is not None:
            yield f"{leak.name!r} is read outside the pattern"
            continue
        yield Match(net, layer, env)


# ---- the driver ----------------------------------------------------------------------------------
def _try(rule: Rule, net: Network, layer: Layer, stats: Stats, declines: Counter) -> bool:
    for m in matches(rule.pattern, net, layer):
        reason = m if isinstance(m, str) else rule.check(m) if rule.check is not None else None
        if reason is not None:
            declines[rule.name, reason] += 1
            continue
        rule.rewrite(m)
        stats.fired(rule.name)
        return True
    return False


def rewrite(net: Network, rules: list[Rule], reverse: bool = False, stats: Stats | None = None) -> bool:
    """Apply ``rules`` until a sweep over the layers changes nothing; whether anything changed.

    Each sweep visits the layers present when it starts (in reverse with ``reverse``), skips those
    removed meanwhile, and at each one tries the rules for its kind in order; the first that fires
    ends the visit. Counts go to ``stats``; without it, ``KILN_LOG=passes`` prints them at the end."""
    log = stats is None and log_enabled("passes")
    stats = stats if stats is not None else Stats()
    by_kind: dict[str, list[Rule]] = {}
    for rule in rules:
        for kind in rule.kinds:
            by_kind.setdefault(kind, []).append(rule)
    changed = False
    for _ in range(MAX_SWEEPS):
        fired: list[str] = []
        declines: Counter = Counter()
        layers = list(net.layers)
        for layer in reversed(layers) if reverse else layers:
            here = by_kind.get(layer.kind)
            if here is None:
                continue
            alive = None
            for rule in here:
                key = rule.key
                if key is not None and layer.attrs.get(key[0]) != key[1] or not rule.could_match(layer):
                    continue
                if alive is None:
                    alive = layer in net.layers
                if not alive:
                    break
                try:
                    hit = _try(rule, net, layer, stats, declines)
                except Exception as exc:
                    reraise(exc, f"Rewrite rule {rule.name!r} at layer {layer.name!r}", stats)
                if hit:
                    fired.append(rule.name)
                    break
        if not fired:
            break
        changed = True
    else:
        raise RewriteError(f"Rewrite rules still firing after {MAX_SWEEPS} sweeps: {', '.join(dict.fromkeys(fired))} "
                           f"(a rule that does not remove what it matches); {history(stats)}")
    for rule in rules:              # the matches left declined where the rules settled, and why
        stats.declines.pop(rule.name, None)
    for (name, reason), n in declines.items():
        stats.declined(name, reason, n)
    if log:
        stats.print()
    return changed


class RulePass(Pass):
    """A pass made of rewrite rules: ``rules`` applied by ``rewrite`` (``reverse``: sweeping from the
    network's outputs back)."""

    rules: list[Rule] = []
    reverse = False

    def __call__(self, net: Network, stats: Stats | None = None) -> PassResult:
        return PassResult(net, rewrite(net, self.rules, self.reverse, stats))

    def call(self, net: Network) -> PassResult:
        return self(net)
