"""The network: tensors with symbolic shapes, layers, and the builder-facing API.

A ``Network`` is what the parser produces and what a user can build by hand
(``network.add_convolution(...)``). It is value-centric in the manner of
onnx-ir: a ``Tensor`` knows its producer and its uses, so passes can rewire
freely. NOTE: kiln.ir must not import torch or onnx.
"""
from __future__ import annotations

import itertools
from typing import Any, Iterable, Sequence

import numpy as np

from kiln.errors import NetworkError
from kiln.ir.dtypes import dtype_name

Dim = int | str | None
Shape = tuple[Dim, ...]


class Tensor:
    """A value in the network: a network input, a constant (weights) or a layer output."""

    __slots__ = ("name", "shape", "dtype", "producer", "uses", "value", "network", "__weakref__")

    def __init__(self, name: str, dtype: str, shape: Sequence[Dim] | None = None,
                 value: np.ndarray | None = None) -> None:
        self.name = name
        self.dtype = dtype_name(dtype)
        self.shape: Shape | None = tuple(shape) if shape is not None else None
        self.producer: Layer | None = None
        self.uses: list[tuple[Layer, int]] = []
        self.value = value
        self.network: Network | None = None

    @property
    def is_constant(self) -> bool:
        return self.value is not None

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)

    def __repr__(self) -> str:
        shape = "?" if self.shape is None else "x".join("?" if d is None else str(d) for d in self.shape)
        kind = "const " if self.is_constant else ""
        return f"Tensor({self.name!r}, {kind}{self.dtype}[{shape}])"


class Layer:
    """One operation. ``kind`` is a layer-vocabulary name (see ``kiln.ir.layers``)."""

    __slots__ = ("name", "kind", "inputs", "outputs", "attrs", "origin", "precision", "tactic", "network")

    def __init__(self, name: str, kind: str, attrs: dict[str, Any] | None = None,
                 origin: Iterable[str] = ()) -> None:
        self.name = name
        self.kind = kind
        self.inputs: list[Tensor | None] = []
        self.outputs: list[Tensor] = []
        self.attrs: dict[str, Any] = dict(attrs or {})
        self.origin: list[str] = list(origin)
        self.precision: str | None = None
        self.tactic: str | None = None
        self.network: Network | None = None

    @property
    def output(self) -> Tensor:
        return self.outputs[0]

    def set_input(self, index: int, tensor: Tensor | None) -> None:
        old = self.inputs[index]
        if old is not None:
            old.uses = [(layer, i) for (layer, i) in old.uses if not (layer is self and i == index)]
        self.inputs[index] = tensor
        if tensor is not None:
            tensor.uses.append((self, index))

    def __repr__(self) -> str:
        ins = ", ".join("-" if t is None else t.name for t in self.inputs)
        outs = ", ".join(t.name for t in self.outputs)
        return f"Layer({self.name!r}, {self.kind}, ({ins}) -> ({outs}))"


from kiln.ir.api import LayerAPI  # noqa: E402


class Network(LayerAPI):
    """A graph of layers over tensors, with marked inputs and outputs.

    Layers are kept in a valid execution order (each layer after its inputs'
    producers). Subgraphs (``If`` branches, ``Loop`` bodies) are Networks held in
    a layer's attrs; they may read tensors of the enclosing network by name.
    """

    def __init__(self, name: str = "network") -> None:
        self.name = name
        self.inputs: list[Tensor] = []
        self.outputs: list[Tensor] = []
        self.layers: list[Layer] = []
        self.tensors: dict[str, Tensor] = {}
        self.metadata: dict[str, Any] = {}
        self._names = itertools.count()
        self.outer: Network | None = None     # enclosing network, for subgraphs

    # ---- naming ------------------------------------------------------------------------
    def unique_name(self, base: str) -> str:
        name = base
        while name in self.tensors or any(l.name == name for l in ()):
            name = f"{base}_{next(self._names)}"
        return name

    def _add_tensor(self, tensor: Tensor) -> Tensor:
        if tensor.name in self.tensors:
            raise NetworkError(f"Tensor name {tensor.name!r} is used twice in network {self.name!r}; names must be unique.")
        tensor.network = self
        self.tensors[tensor.name] = tensor
        return tensor

    # ---- building ----------------------------------------------------------------------
    def add_input(self, name: str, dtype: str, shape: Sequence[Dim]) -> Tensor:
        """Declare a network input; use str dims (``"batch"``) for dynamic sizes."""
        t = self._add_tensor(Tensor(name, dtype, shape))
        self.inputs.append(t)
        return t

    def add_constant(self, value: Any, name: str | None = None) -> Tensor:
        """Weights or any constant; ``value`` is anything numpy can hold."""
        arr = np.asarray(value)
        name = name or self.unique_name("const")
        return self._add_tensor(Tensor(name, dtype_name(arr.dtype), arr.shape, value=arr))

    def add_layer(self, kind: str, inputs: Sequence[Tensor | None], attrs: dict[str, Any] | None = None,
                  num_outputs: int = 1, name: str | None = None, origin: Iterable[str] = (),
                  output_names: Sequence[str] | None = None, output_dtypes: Sequence[str] | None = None) -> Layer:
        """Add a layer of any vocabulary kind; the typed helpers below call this."""
        from kiln.ir.layers import check_layer   # vocabulary check lives beside the vocabulary
        layer = Layer(name or self.unique_layer_name(kind), kind, attrs, origin)
        check_layer(layer, len(inputs))
        for t in inputs:
            if t is not None and not isinstance(t, Tensor):
                raise NetworkError(f"Layer {layer.name!r} ({kind}) got {type(t).__name__} as an input; pass a Tensor "
                                   f"(network.add_input or network.add_constant).")
        layer.network = self
        for i, t in enumerate(inputs):
            layer.inputs.append(None)
            layer.set_input(i, t)
        names = list(output_names) if output_names else [self.unique_name(f"{layer.name}_out{i}" if num_outputs > 1
                                                                          else f"{layer.name}_out")
                                                         for i in range(num_outputs)]
        for i, n in enumerate(names):
            dt = output_dtypes[i] if output_dtypes else "float32"
            t = self._add_tensor(Tensor(n, dt))
            t.producer = layer
            layer.outputs.append(t)
        self.layers.append(layer)
        return layer

    def unique_layer_name(self, kind: str) -> str:
        existing = getattr(self, "_layer_names", None)
        if existing is None:
            existing = self._layer_names = set()
        i = len(self.layers)
        name = f"{kind}_{i}"
        while name in existing:
            i += 1
            name = f"{kind}_{i}"
        existing.add(name)
        return name

    def mark_output(self, tensor: Tensor, name: str | None = None) -> None:
        if name is not None and name != tensor.name:
            self.rename(tensor, name)
        if tensor not in self.outputs:
            self.outputs.append(tensor)

    def rename(self, tensor: Tensor, name: str) -> None:
        if name in self.tensors and self.tensors[name] is not tensor:
            raise NetworkError(f"Cannot rename {tensor.name!r} to {name!r}: that name is taken.")
        del self.tensors[tensor.name]
        tensor.name = name
        self.tensors[name] = tensor

    # ---- editing (for passes) ----------------------------------------------------------
    def replace_all_uses(self, old: Tensor, new: Tensor) -> None:
        """Point every consumer (and the output list) of ``old`` at ``new``."""
        for layer, i in list(old.uses):
            layer.set_input(i, new)
        self.outputs = [new if t is old else t for t in self.outputs]

    def remove_layer(self, layer: Layer) -> None:
        for i, t in enumerate(layer.inputs):
            if t is not None:
                layer.set_input(i, None)
        for t in layer.outputs:
            if t.uses or t in self.outputs:
                raise NetworkError(f"Cannot remove layer {layer.name!r}: its output {t.name!r} is still used.")
            self.tensors.pop(t.name, None)
        self.layers.remove(layer)

    def remove_unused_constants(self) -> None:
        for name, t in list(self.tensors.items()):
            if t.is_constant and not t.uses and t not in self.outputs:
                del self.tensors[name]

    def constants(self) -> list[Tensor]:
        return [t for t in self.tensors.values() if t.is_constant]

    def toposort(self) -> None:
        """Reorder layers so each comes after its inputs' producers (stable)."""
        placed: set[int] = set()
        order: list[Layer] = []
        pending = list(self.layers)
        ids = {id(l) for l in self.layers}
        while pending:
            progressed = False
            rest = []
            for layer in pending:
                deps = [t.producer for t in _all_inputs(layer) if t is not None and t.producer is not None
                        and id(t.producer) in ids]
                if all(id(d) in placed for d in deps):
                    order.append(layer)
                    placed.add(id(layer))
                    progressed = True
                else:
                    rest.append(layer)
            if not progressed:
                raise NetworkError(f"Network {self.name!r} has a cycle through layer {rest[0].name!r}; "
                                   f"a network must be acyclic.")
            pending = rest
        self.layers = order

    def __repr__(self) -> str:
        return f"Network({self.name!r}, {len(self.layers)} layers, inputs={[t.name for t in self.inputs]}, " \
               f"outputs={[t.name for t in self.outputs]})"

    def __deepcopy__(self, memo: dict) -> "Network":
        """Copy layer by layer: the default deepcopy recurses along producer/uses links and
        overflows the stack on networks a few hundred layers deep."""
        import copy
        new = Network.__new__(Network)
        memo[id(self)] = new

        def tensor(t: Tensor) -> Tensor:
            c = memo.get(id(t))
            if c is None:
                c = memo[id(t)] = Tensor(t.name, t.dtype, t.shape,
                                         None if t.value is None else copy.deepcopy(t.value, memo))
                c.network = memo.get(id(t.network), t.network)
            return c

        new.tensors = {}
        for name, t in self.tensors.items():
            new.tensors[name] = tensor(t)
            new.tensors[name].network = new
        new.inputs = [tensor(t) for t in self.inputs]
        new.layers = []
        for layer in self.layers:
            nl = Layer(layer.name, layer.kind, None, layer.origin)
            memo[id(layer)] = nl
            nl.precision, nl.tactic = layer.precision, layer.tactic
            nl.network = memo.get(id(layer.network), new)
            nl.attrs = copy.deepcopy(layer.attrs, memo)
            for i, t in enumerate(layer.inputs):
                nl.inputs.append(None)
                nl.set_input(i, None if t is None else tensor(t))
            for t in layer.outputs:
                o = tensor(t)
                o.producer = nl
                nl.outputs.append(o)
            new.layers.append(nl)
        new.outputs = [tensor(t) for t in self.outputs]
        for key, value in self.__dict__.items():
            if key not in ("tensors", "inputs", "layers", "outputs"):
                setattr(new, key, copy.deepcopy(value, memo))
        return new

    def summary(self) -> str:
        lines = [repr(self)]
        for layer in self.layers:
            lines.append(f"  {layer.name}: {layer.kind} {layer.attrs_brief()}" if hasattr(layer, "attrs_brief")
                         else "  " + repr(layer))
        return "\n".join(lines)


def _all_inputs(layer: Layer) -> list[Tensor | None]:
    """A layer's inputs plus the outer tensors its subgraphs read."""
    ins = list(layer.inputs)
    for g in subgraphs(layer):
        ins.extend(outer_reads(g))
    return ins


def subgraphs(layer: Layer) -> list[Network]:
    out = []
    for v in layer.attrs.values():
        if isinstance(v, Network):
            out.append(v)
    return out


def outer_reads(graph: Network) -> list[Tensor]:
    """Tensors of enclosing networks that a subgraph (or its subgraphs) reads."""
    found: list[Tensor] = []
    seen: set[int] = set()
    for layer in graph.layers:
        for t in _all_inputs(layer):
            if t is not None and t.network is not graph and not _owned_by(t, graph) and id(t) not in seen:
                seen.add(id(t))
                found.append(t)
    for t in graph.outputs:
        if t.network is not graph and not _owned_by(t, graph) and id(t) not in seen:
            seen.add(id(t))
            found.append(t)
    return found


def _owned_by(t: Tensor, graph: Network) -> bool:
    n = t.network
    while n is not None:
        if n is graph:
            return True
        n = n.outer
    return False
