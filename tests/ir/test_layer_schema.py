"""The per-kind layer schema (kiln.ir.layers): declared attributes, checked when a layer is added.

The kernels' own op tables are the independent reference for the enums: every op the schema
admits has an implementation and every implemented op is admitted.
"""
from __future__ import annotations

import numpy as np
import pytest

import kiln
from kiln.errors import NetworkError
from kiln.ir.layers import (ACTIVATIONS, ATTR_TYPES, ELEMENTWISE_OPS, LAYER_KINDS, REQUIRED, UNARY_OPS, attr,
                            attrs_problem, value_problem)


def _net() -> tuple[kiln.Network, object]:
    net = kiln.Network("t")
    return net, net.add_input("x", "float32", (1, 2, 8, 8))


def _refused(fn, *words: str) -> str:
    with pytest.raises(NetworkError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    return msg


# ---- declarations -------------------------------------------------------------------------------

def test_every_declared_attribute_is_well_formed() -> None:
    for kind in LAYER_KINDS.values():
        for name, a in kind.attrs.items():
            assert all(t in ATTR_TYPES for t in a.type.split("|")), (kind.name, name)
            if a.default is not REQUIRED:
                assert value_problem(a, a.default, encoded=False) is None, (kind.name, name, a.default)
            if a.choices is not None:
                assert "str" in a.type.split("|"), (kind.name, name)
                if isinstance(a.default, str):
                    assert a.default in a.choices, (kind.name, name)


def test_optional_inputs_lie_below_the_minimum() -> None:
    """Positions at or above min_inputs are optional anyway; an exception below it must be a real position."""
    for kind in LAYER_KINDS.values():
        assert all(0 <= i < kind.min_inputs for i in kind.optional_inputs), kind.name
        assert all(0 <= i < kind.max_inputs for i in kind.host_inputs), kind.name


def test_a_default_outside_its_declaration_is_refused() -> None:
    _refused(lambda: attr("int", "one"), "default")
    _refused(lambda: attr("str", "median", choices=("max", "average")), "default", "median")
    _refused(lambda: attr("ints", [0], lo=1), "default")
    _refused(lambda: attr("complex"), "complex")


# ---- the enums against the kernels' tables ----------------------------------------------------------

def test_elementwise_and_unary_enums_match_the_kernels() -> None:
    from kiln.kernels.pointwise import _BINARY, _UNARY
    assert set(ELEMENTWISE_OPS) == set(_BINARY)
    assert set(UNARY_OPS) == set(_UNARY) | {"isinf"}        # isinf is made by its own branch (detect_*)


def test_every_activation_type_has_an_implementation() -> None:
    import torch

    from kiln.errors import BuildError
    from kiln.kernels.pointwise import activation_fn
    x = torch.linspace(-3, 3, 7)
    for name in ACTIVATIONS:
        y = activation_fn(name, 0.5, 1.0)(x)
        assert y.shape == x.shape, name
    with pytest.raises(BuildError):
        activation_fn("not_an_activation")


# ---- check_layer at build ----------------------------------------------------------------------------

W = np.ones((4, 2, 3, 3), np.float32)


@pytest.mark.parametrize("kw,words", [
    ({"stride": ["2", "2"]}, ("'stride'", "integer", "str")),
    ({"stride": [0, 1]}, ("'stride'", "at least 1")),
    ({"stride": [2**64, 1]}, ("'stride'", "64 bits")),
    ({"groups": True}, ("'groups'", "integer", "bool")),
    ({"groups": 1.0}, ("'groups'", "integer", "float")),
], ids=["str-stride", "zero-stride", "huge-stride", "bool-groups", "float-groups"])
def test_conv_attributes_of_the_wrong_type_are_refused_at_add(kw, words) -> None:
    net, x = _net()
    _refused(lambda: net.add_convolution(x, W, **kw, name="c"), "'c' (Convolution)", *words)


def test_unknown_missing_and_out_of_enum_attributes_are_refused() -> None:
    net, x = _net()
    _refused(lambda: net.add_layer("Activation", [x], {"type": "relu", "payload": 1}, name="a"),
             "'a' (Activation)", "unknown attribute 'payload'")
    _refused(lambda: net.add_layer("Activation", [x], {"alpha": 1.0}, name="b"), "lacks", "'type'")
    _refused(lambda: net.add_pooling(x, "median", [2, 2], name="p"), "'type'", "max, average, lp", "median")
    _refused(lambda: net.add_cast(x, "object", name="k"), "'to'", "data type")
    _refused(lambda: net.add_layer("Unary", [x], {"op": "exp", "detect_positive": "yes"}, name="u"),
             "'detect_positive'", "true/false")


def test_values_a_network_really_holds_are_accepted() -> None:
    """numpy scalars (what passes compute), tuples, None for optional attrs, ONNX 0/1 flags, arrays."""
    net, x = _net()
    net.add_layer("Attention", [x, x, x], {"scale": np.float32(0.125), "causal": 0})
    net.add_layer("Shuffle", [x], {"first_transpose": (0, 2, 3, 1), "reshape": None, "second_transpose": None,
                                   "allowzero": np.bool_(False)})
    net.add_layer("Shuffle", [x], {"first_transpose": "reverse"})
    net.add_layer("Activation", [x], {"type": "clip", "alpha": None, "beta": 6})
    net.add_layer("ConstantOfShape", [x], {"value": np.ones(1, np.int64)})
    net.add_convolution(x, W, stride=(np.int64(2), 2))
    assert len(net.layers) == 6


def test_encoded_values_follow_the_same_schema() -> None:
    """Plan attrs: numbers as JSON, numpy scalars as 0-d array records, arrays as records with matching data."""
    scalar = {"__array__": {"dtype": "float32", "shape": [], "data": [0.125]}}
    assert attrs_problem("Attention", {"scale": scalar, "causal": False}, encoded=True) is None
    assert attrs_problem("ConstantOfShape", {"value": {"__array__": {"dtype": "int64", "shape": [1], "data": [3]}}},
                         encoded=True) is None
    bad = {"__array__": {"dtype": "int64", "shape": [2**40, 2**40], "data": [3]}}
    assert "shape does not match" in attrs_problem("ConstantOfShape", {"value": bad}, encoded=True)
    bad = {"__array__": {"dtype": "object", "shape": [1], "data": [{"__reduce__": "os.system"}]}}
    assert "not all strings" in attrs_problem("ConstantOfShape", {"value": bad}, encoded=True)
    assert "subgraph record" in attrs_problem("Loop", {"body": {"layers": []}}, encoded=True)
    assert "plugin record" in attrs_problem("Plugin", {"plugin": {"__plugin__": ["x"]}}, encoded=True)
    assert "must be a list" in attrs_problem("Squeeze", {"axes": (0, 1)}, encoded=True)   # JSON has no tuples
