"""The rewrite driver: patterns, fixpoint, decline reasons in KILN_LOG=passes, failing rules named.

Networks are built by hand; values are checked by building the rewritten network and comparing
with numpy on the same inputs.
"""
from __future__ import annotations

import numpy as np
import pytest

import kiln
from kiln.builder.shapes import infer_shapes
from kiln.errors import ShapeError
from kiln.passes import PassManager
from kiln.passes._match import remove_dead, scalar, substitute
from kiln.passes.base import RewriteError, Stats
from kiln.passes.fuse_attention import FuseAttention
from kiln.passes.fuse_patterns import FusePatterns
from kiln.passes.rewrite import Const, Match, Mul, Op, Rule, RulePass, Scalar, Sub, Unary, Var, rewrite

x = Var("x")


def _run(net: kiln.Network, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return kiln.build(net, kiln.BuildConfig(device="cpu", optimization_level=0)).context().run(feeds)


def _fold_scales(m: Match) -> None:
    """(x·a)·b → x·(a·b)."""
    net, outer = m.net, m.root
    c = net.add_constant(np.float32(scalar(m["a"]) * scalar(m["b"])), name=net.unique_name("c"))
    new = net.add_elementwise(m["x"], c, "prod", name=net.unique_name(outer.name + "/folded"))
    substitute(net, new, outer, outer.outputs, [outer, m["inner"]])


FOLD = Rule("(x·a)·b -> x·(ab)", Mul(Mul(x, Scalar("a"), name="inner"), Scalar("b")), None, _fold_scales)


def _scale_chain(factors: list[float]) -> kiln.Network:
    net = kiln.Network()
    t = net.add_input("x", "float32", (4,))
    for i, f in enumerate(factors):
        t = net.add_elementwise(t, np.float32(f), "prod", name=f"m{i}").output
    net.mark_output(t, "y")
    return net


# ---- fixpoint ------------------------------------------------------------------------------------
def test_rules_apply_until_nothing_changes() -> None:
    """Swept from the outputs back, the first sweep leaves x·6·20 (each fold makes a layer the sweep has
    passed); the driver sweeps again until one x·120 is left."""
    net = _scale_chain([2, 3, 4, 5])
    stats = Stats()
    assert rewrite(net, [FOLD], reverse=True, stats=stats)
    assert stats.fires[FOLD.name] == 3          # two folds in the first sweep, one in the second
    assert [layer.kind for layer in net.layers] == ["ElementWise"]
    assert scalar(net.layers[0].inputs[1]) == 120.0
    assert not rewrite(net, [FOLD], reverse=True)          # the fixpoint: nothing left to do
    xv = np.arange(4, dtype=np.float32) - 1.5
    np.testing.assert_array_equal(_run(net, {"x": xv})["y"], xv * np.float32(120))


# ---- operand orders, variables, exclusivity -------------------------------------------------------
def _silu_net(order: str, extra_reader: bool = False) -> kiln.Network:
    net = kiln.Network()
    a = net.add_input("x", "float32", (5,))
    s = net.add_activation(a, "sigmoid", name="sig").output
    y = net.add_elementwise(*((a, s) if order == "x*s" else (s, a)), "prod", name="mul")
    net.mark_output(y.output, "y")
    if extra_reader:
        net.mark_output(net.add_unary(s, "neg", name="other").output, "z")
    return net


@pytest.mark.parametrize("order", ["x*s", "s*x"])
def test_commutative_operands_match_in_either_order(order: str) -> None:
    net = _silu_net(order)
    assert FusePatterns()(net).modified
    assert [(layer.kind, layer.attrs.get("type")) for layer in net.layers] == [("Activation", "silu")]
    xv = np.linspace(-3, 3, 5, dtype=np.float32)
    np.testing.assert_allclose(_run(net, {"x": xv})["y"], xv / (1 + np.exp(-xv.astype(np.float64))), rtol=1e-6)


def test_non_commutative_operands_keep_their_order() -> None:
    """x − 1 matches Sub(x, 1); 1 − x does not."""
    fired = []

    def mark(m: Match) -> None:
        fired.append(m.root.name)
        m.root.attrs["seen"] = True

    rule = Rule("x-1", Sub(x, Const(1.0), seen=None), None, mark)
    net = kiln.Network()
    a = net.add_input("x", "float32", (2,))
    net.mark_output(net.add_elementwise(a, np.float32(1), "sub", name="x_minus_1").output, "p")
    net.mark_output(net.add_elementwise(np.float32(1), a, "sub", name="one_minus_x").output, "q")
    rewrite(net, [rule])
    assert fired == ["x_minus_1"]


def test_a_variable_matches_one_tensor() -> None:
    """x·σ(y) with y ≠ x is no SiLU."""
    net = kiln.Network()
    a = net.add_input("a", "float32", (3,))
    b = net.add_input("b", "float32", (3,))
    s = net.add_activation(b, "sigmoid").output
    net.mark_output(net.add_elementwise(a, s, "prod").output, "y")
    assert not FusePatterns()(net).modified
    assert [layer.kind for layer in net.layers] == ["Activation", "ElementWise"]


def test_an_inner_value_read_elsewhere_declines_with_its_name(monkeypatch, capsys) -> None:
    monkeypatch.setenv("KILN_LOG", "passes")
    net = _silu_net("x*s", extra_reader=True)
    assert not FusePatterns()(net).modified
    err = capsys.readouterr().err
    assert "rule silu: x·σ(x): fired 0, left declined 1" in err
    assert f"declined 1x: {net.layers[0].outputs[0].name!r} is read outside the pattern" in err


def test_one_op_object_used_twice_is_one_layer() -> None:
    """In d·d the two factors must be the same layer's output: (x−1)·(x−1) matches, (x−1)·(y−1) does not."""
    d = Sub(x, Const(1.0), name="d", shared=True)
    hits = []
    def mark(m: Match) -> None:
        hits.append(m.root.name)
        m.root.attrs["seen"] = True

    rule = Rule("square", Mul(d, d, seen=None), None, mark)
    assert rule.kinds == ("ElementWise",)
    net = kiln.Network()
    a = net.add_input("x", "float32", (2,))
    b = net.add_input("y", "float32", (2,))
    da = net.add_elementwise(a, np.float32(1), "sub").output
    db = net.add_elementwise(b, np.float32(1), "sub").output
    net.mark_output(net.add_elementwise(da, da, "prod", name="sq").output, "p")
    net.mark_output(net.add_elementwise(da, db, "prod", name="cross").output, "q")
    rewrite(net, [rule])
    assert hits == ["sq"]


# ---- decline reasons and counts -------------------------------------------------------------------
def _abs_of_neg(m: Match) -> str | None:
    return None if m.root.attrs.get("op") == "abs" else "not an abs"


def _drop_neg(m: Match) -> None:
    m.root.set_input(0, m["x"])
    remove_dead(m.net, [m["neg"]])


NEG = Rule("abs(-x) -> abs(x)", Op("Unary", Unary("neg", x, name="neg")), _abs_of_neg, _drop_neg)


def test_decline_reasons_and_counts_are_logged(monkeypatch, capsys) -> None:
    monkeypatch.setenv("KILN_LOG", "passes")
    net = kiln.Network()
    a = net.add_input("x", "float32", (3,))
    for i, op in enumerate(["abs", "exp", "abs", "sqrt"]):
        net.mark_output(net.add_unary(net.add_unary(a, "neg").output, op, name=f"u{i}").output, f"y{i}")
    assert rewrite(net, [NEG])
    err = capsys.readouterr().err.splitlines()
    assert "kiln passes: rule abs(-x) -> abs(x): fired 2, left declined 2" in err
    assert "kiln passes:   declined 2x: not an abs" in err
    assert sorted(layer.attrs["op"] for layer in net.layers) == ["abs", "abs", "exp", "neg", "neg", "sqrt"]
    xv = np.array([-1.0, 0.5, 2.0], np.float32)
    out = _run(net, {"x": xv})
    np.testing.assert_array_equal(out["y0"], np.abs(xv))
    np.testing.assert_allclose(out["y1"], np.exp(-xv), rtol=1e-6)


def test_nothing_is_printed_without_kiln_log(monkeypatch, capsys) -> None:
    monkeypatch.delenv("KILN_LOG", raising=False)
    net = kiln.Network()
    a = net.add_input("x", "float32", (3,))
    net.mark_output(net.add_unary(net.add_unary(a, "neg").output, "abs").output, "y")
    assert rewrite(net, [NEG])
    assert capsys.readouterr().err == ""


def test_pass_manager_logs_passes_and_rules(monkeypatch, capsys) -> None:
    monkeypatch.setenv("KILN_LOG", "passes")
    net = _silu_net("s*x")
    PassManager([FusePatterns()])(net)
    err = capsys.readouterr().err
    assert "kiln passes: pass pattern fusion (SiLU, GELU, LayerNorm): ran 2x, changed the network 1x" in err
    assert "kiln passes: rule silu: x·σ(x): fired 1, left declined 0" in err


def test_rules_that_never_settle_are_an_error() -> None:
    """A rule that fires without changing what it matches would sweep forever."""
    rule = Rule("x-1 (changes nothing)", Sub(x, Const(1.0)), None, lambda m: None)
    net = kiln.Network()
    a = net.add_input("x", "float32", (2,))
    net.mark_output(net.add_elementwise(a, np.float32(1), "sub").output, "p")
    with pytest.raises(RewriteError, match=r"still firing after 64 sweeps: x-1 \(changes nothing\)"):
        rewrite(net, [rule])


# ---- errors name the failing rule and what ran before -----------------------------------------
class _Negs(RulePass):
    name = "neg removal"
    rules = [NEG]


def _boom(m: Match) -> None:
    raise ZeroDivisionError("division by zero")


def _failing_net() -> kiln.Network:
    net = kiln.Network()
    a = net.add_input("x", "float32", (3,))
    net.mark_output(net.add_unary(net.add_unary(a, "neg").output, "abs", name="u").output, "y")
    net.mark_output(net.add_unary(net.add_unary(a, "exp").output, "log", name="v").output, "z")
    return net


def test_a_failing_rule_is_named_with_the_rules_and_passes_before_it() -> None:
    class Broken(RulePass):
        name = "broken pass"
        rules = [Rule("log(exp(x)) -> x", Unary("log", Unary("exp", x)), None, _boom)]

    net = _failing_net()
    with pytest.raises(RewriteError) as info:
        PassManager([_Negs(), Broken()])(net)
    msg = str(info.value)
    assert "Rewrite rule 'log(exp(x)) -> x' at layer 'v' failed (ZeroDivisionError: division by zero)" in msg
    assert "passes run before it: neg removal" in msg
    assert "rules fired before it: abs(-x) -> abs(x) x1" in msg
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_a_failing_pass_is_named_with_the_passes_before_it() -> None:
    class Crashing(kiln.passes.Pass):
        name = "crashing pass"

        def call(self, net):
            raise KeyError("k")

    with pytest.raises(RewriteError, match=r"^Pass 'crashing pass' failed \(KeyError: 'k'\); "
                                           r"passes run before it: neg removal;"):
        PassManager([_Negs(), Crashing()])(_failing_net())


def test_a_kiln_error_from_a_pass_keeps_its_class_and_message() -> None:
    """Bad input stays a one-line KilnError (the CLI prints it); the pass is named in a note."""
    class Refusing(kiln.passes.Pass):
        name = "refusing pass"

        def call(self, net):
            raise ShapeError("The input is too big; lower --max-shapes.")

    with pytest.raises(ShapeError) as info:
        PassManager([Refusing()])(_failing_net())
    assert str(info.value) == "The input is too big; lower --max-shapes."
    assert any("refusing pass" in note for note in info.value.__notes__)


def test_a_rule_pattern_must_be_rooted_at_a_layer() -> None:
    with pytest.raises(TypeError, match="root must be an Op"):
        Rule("bad", x, None, lambda m: None)


# ---- attention: a declined match leaves the network as it was ------------------------------------
def test_declined_attention_adds_no_layer() -> None:
    """Kᵀ = permute(Z) with Q and V of different ranks is declined; the K transpose the old pass made
    before finding that out stayed behind as a dead layer."""
    net = kiln.Network()
    q = net.add_input("q", "float32", (2, 4, 8))
    z = net.add_input("z", "float32", (8, 2, 4))
    v = net.add_input("v", "float32", (1, 2, 4, 8))
    kt = net.add_shuffle(z, first_transpose=[1, 0, 2], name="kt").output          # [2, 8, 4]
    s = net.add_matmul(q, kt, name="qk").output
    p = net.add_softmax(s, axis=-1, name="sm").output
    net.mark_output(net.add_matmul(p, v, name="pv").output, "y")
    infer_shapes(net)
    before = [(layer.kind, layer.name) for layer in net.layers]
    assert not FuseAttention()(net).modified
    assert [(layer.kind, layer.name) for layer in net.layers] == before
