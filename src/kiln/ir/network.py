"""The network: tensors with symbolic shapes, layers, and the builder-facing API.

A ``Network`` is what the parser produces and what a user can build by hand
(``network.add_convolution(...)``). It is value-centric in the manner of
onnx-ir: a ``Tensor`` knows its producer and its uses, so passes can rewire
freely. NOTE: kiln.ir must not import torch or onnx.
"""
from __future__ import annotations

import gc
import itertools
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from kiln.errors import NetworkError
from kiln.ir.dtypes import dtype_name
from kiln.ir.layers import check_layer   # the vocabulary check lives beside the vocabulary

Dim = int | str | None
Shape = tuple[Dim, ...]


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a large network is made or rewritten: each of
    its runs walks every live object, and a 100k-layer network is millions of them. It resumes
    (if it was on) when the block ends."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


_DTYPE_NAMES: dict[Any, str] = {}


def _dtype_name(dtype: Any) -> str:
    """dtype_name, remembered per distinct dtype (every tensor asks)."""
    try:
        return _DTYPE_NAMES[dtype]
    except (KeyError, TypeError):
        name = dtype_name(dtype)
        try:
            if len(_DTYPE_NAMES) < 256:
                _DTYPE_NAMES[dtype] = name
        except TypeError:
            pass
        return name


class Tensor:
    """A value in the network: a network input, a constant (weights) or a layer output."""

    __slots__ = ("name", "shape", "dtype", "producer", "uses", "value", "network", "__weakref__")

    def __init__(self, name: str, dtype: str, shape: Sequence[Dim] | None = None,
                 value: np.ndarray | None = None) -> None:
        self.name = name
        self.dtype = _dtype_name(dtype)
        self.shape: Shape | None = tuple(shape) if shape is not None else None
        self.producer: Layer | None = None
        self.uses: list[tuple[Layer, int]] = UseList()
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
            if isinstance(old.uses, UseList):
                try:
                    old.uses.remove((self, index))
                except ValueError:
                    pass
            else:
                old.uses = [(layer, i) for (layer, i) in old.uses if not (layer is self and i == index)]
        self.inputs[index] = tensor
        if tensor is not None:
            tensor.uses.append((self, index))

    def __repr__(self) -> str:
        ins = ", ".join("-" if t is None else t.name for t in self.inputs)
        outs = ", ".join(t.name for t in self.outputs)
        return f"Layer({self.name!r}, {self.kind}, ({ins}) -> ({outs}))"


class _IndexedList(list):
    """A list whose membership test is O(1) and whose ``index`` (hence ``remove``) is amortized O(1)
    for the edits passes make, walking forward or backward. Items are told apart by ``_key``.

    The index is made on the first lookup in a list longer than ``SMALL`` (shorter lists are searched
    directly). Positions are remembered per item; the items below position ``_valid`` have theirs
    right, and an edit only lowers ``_valid`` to where it happened, so a lookup rescans from there up
    to the item it looks for.
    """

    __slots__ = ("_count", "_pos", "_valid")
    SMALL = 16
    # _count (the index) is left unset until needed: a list is made for every tensor

    def __reduce__(self):
        return (type(self), (list(self),))

    @staticmethod
    def _key(x: Any) -> Any:
        return id(x)

    def _indexed(self) -> bool:
        """Whether the index is kept (made now if the list has grown past SMALL)."""
        if getattr(self, "_count", None) is not None:
            return True
        if len(self) <= self.SMALL:
            return False
        self._reindex()
        return True

    def _reindex(self) -> None:
        self._count = {}
        for x in self:
            self._gain(x)
        self._pos: dict[Any, int] = {}
        self._valid = 0

    def _gain(self, x: Any) -> None:
        k = self._key(x)
        self._count[k] = self._count.get(k, 0) + 1

    def _lose(self, x: Any) -> None:
        k = self._key(x)
        n = self._count.get(k, 0) - 1
        if n > 0:
            self._count[k] = n
        else:
            self._count.pop(k, None)
            self._pos.pop(k, None)

    def __contains__(self, x: object) -> bool:
        k = self._key(x)
        if not self._indexed():
            return any(self._key(y) == k for y in list.__iter__(self))
        # an item in the list is alive, so no other live object shares its id
        return k in self._count

    def index(self, x: Any, *args: int) -> int:  # type: ignore[override]
        k = self._key(x)
        if args or not self._indexed():
            lo, hi = (args + (0, len(self)))[:2] if args else (0, len(self))
            for i in range(max(0, lo), min(len(self), hi)):
                if self._key(list.__getitem__(self, i)) == k:
                    return i
            raise ValueError(f"{x!r} is not in the list")
        if k not in self._count:
            raise ValueError(f"{x!r} is not in the list")
        p = self._pos.get(k)
        if p is not None and p < self._valid and self._key(list.__getitem__(self, p)) == k:
            return p
        n, step = len(self), 64
        while self._valid < n:          # rescan forward in growing chunks (map/zip/update run in C)
            lo, hi = self._valid, min(n, self._valid + step)
            self._pos.update(zip(map(self._key, list.__getitem__(self, slice(lo, hi))), range(lo, hi)))
            self._valid, step = hi, step * 2
            p = self._pos.get(k)
            if p is not None and lo <= p < hi:
                return p
        raise ValueError(f"{x!r} is not in the list")     # unreachable while the index is kept

    def _edited(self, at: int) -> None:
        self._valid = min(self._valid, max(0, at))

    def append(self, x: Any) -> None:
        n = len(self)
        list.append(self, x)
        if getattr(self, "_count", None) is not None:
            self._gain(x)
            if self._valid == n:
                self._pos[self._key(x)] = n
                self._valid = n + 1

    def extend(self, xs: Iterable[Any]) -> None:
        for x in list(xs):
            self.append(x)

    def __iadd__(self, xs):
        self.extend(xs)
        return self

    def insert(self, i: int, x: Any) -> None:
        n = len(self)
        at = max(0, min(n, i + n if i < 0 else i))
        list.insert(self, at, x)
        if getattr(self, "_count", None) is not None:
            self._gain(x)
            self._edited(at)

    def remove(self, x: Any) -> None:
        i = self.index(x)
        x = list.__getitem__(self, i)
        list.__delitem__(self, i)
        if getattr(self, "_count", None) is not None:
            self._lose(x)
            self._edited(i)

    def pop(self, i: int = -1) -> Any:
        n = len(self)
        x = list.pop(self, i)
        if getattr(self, "_count", None) is not None:
            self._lose(x)
            self._edited(i + n if i < 0 else i)
        return x

    def clear(self) -> None:
        list.clear(self)
        self._count = None

    def __setitem__(self, i, v) -> None:
        list.__setitem__(self, i, v)
        self._count = None

    def __delitem__(self, i) -> None:
        list.__delitem__(self, i)
        self._count = None

    def __imul__(self, k: int):
        list.__imul__(self, k)
        self._count = None
        return self

    def sort(self, *args, **kwargs) -> None:
        list.sort(self, *args, **kwargs)
        self._count = None

    def reverse(self) -> None:
        list.reverse(self)
        self._count = None


class LayerList(_IndexedList):
    """The network's layers in execution order (see _IndexedList: O(1) ``in``, cheap ``remove``)."""

    __slots__ = ()


class UseList(_IndexedList):
    """A tensor's readers as (layer, input position) pairs, in the order they were added; removing
    one stays cheap however many readers the tensor has."""

    __slots__ = ()

    @staticmethod
    def _key(x: Any) -> Any:
        return (id(x[0]), x[1])


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
        self.layers = LayerList()
        self.tensors: dict[str, Tensor] = {}
        self.metadata: dict[str, Any] = {}
        self._names = itertools.count()
        self._layer_names: set[str] | None = None   # every layer name given out or added (made on first use)
        self.outer: Network | None = None     # enclosing network, for subgraphs

    @property
    def layers(self) -> LayerList:
        """The layers in execution order (assigning any list keeps it a LayerList)."""
        return self._layers

    @layers.setter
    def layers(self, value: Iterable[Layer]) -> None:
        self._layers = value if isinstance(value, LayerList) else LayerList(value)

    # ---- naming: the one service for tensor and layer names ------------------------------
    def unique_name(self, base: str) -> str:
        """A tensor name: ``base``, or ``base_N`` (N from this network's counter) while it is taken."""
        name = base
        while name in self.tensors:
            name = f"{base}_{next(self._names)}"
        return name

    def unique_layer_name(self, kind: str, base: str | None = None) -> str:
        """A layer name no layer of this network has had, reserved now: ``base``, else ``base/kind_1``,
        ``base/kind_2``, ... (a node's layers, in the parser); without ``base``, ``kind_<position>``."""
        taken = self._layer_names
        if taken is None:
            taken = self._layer_names = {layer.name for layer in self.layers}
        if base is not None:
            name, k = base, 0
            while name in taken:
                k += 1
                name = f"{base}/{kind}_{k}"
        else:
            i = len(self.layers)
            name = f"{kind}_{i}"
            while name in taken:
                i += 1
                name = f"{kind}_{i}"
        taken.add(name)
        return name

    def _add_tensor(self, tensor: Tensor) -> Tensor:
        if tensor.name in self.tensors:
            raise NetworkError(f"Tensor name {tensor.name!r} is used twice in network {self.name!r}; names must be unique.")
        tensor.network = self
        self.tensors[tensor.name] = tensor
        return tensor

    # ---- building ----------------------------------------------------------------------
    def add_input(self, name: str, dtype: str, shape: Sequence[Dim]) -> Tensor:
        """Declare a network input; str dims (``"batch"``), -1 or None are dynamic sizes (the build's
        profile fixes them)."""
        if shape is not None:
            shape = [f"{name}_dim{i}" if d is None or isinstance(d, int) and d < 0 else d for i, d in enumerate(shape)]
        t = self._add_tensor(Tensor(name, dtype, shape))
        self.inputs.append(t)
        return t

    def add_constant(self, value: Any, name: str | None = None) -> Tensor:
        """Weights or any constant; ``value`` is anything numpy can hold."""
        arr = np.asarray(value)
        name = name or self.unique_name("const")
        return self._add_tensor(Tensor(name, arr.dtype, arr.shape, value=arr))

    def add_layer(self, kind: str, inputs: Sequence[Tensor | None], attrs: dict[str, Any] | None = None,
                  num_outputs: int = 1, name: str | None = None, origin: Iterable[str] = (),
                  output_names: Sequence[str] | None = None, output_dtypes: Sequence[str] | None = None) -> Layer:
        """Add a layer of any vocabulary kind; the typed helpers below call this."""
        if name is None:
            name = self.unique_layer_name(kind)
        elif self._layer_names is not None:
            self._layer_names.add(name)
        layer = Layer(name, kind, attrs, origin)
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
        self.detach_layer(layer)
        self.layers.remove(layer)

    def remove_layers(self, layers: Iterable[Layer]) -> None:
        """Remove several layers at once (one pass over the layer list); readers go before what they read."""
        gone = set()
        for layer in layers:
            self.detach_layer(layer)
            gone.add(id(layer))
        if gone:
            self.layers = [l for l in self.layers if id(l) not in gone]

    def detach_layer(self, layer: Layer) -> None:
        """remove_layer without the edit of the layer list: the layer stops reading its inputs and its
        outputs leave the name table (refused while something still reads them)."""
        for i, t in enumerate(layer.inputs):
            if t is not None:
                layer.set_input(i, None)
        for t in layer.outputs:
            if t.uses or t in self.outputs:
                raise NetworkError(f"Cannot remove layer {layer.name!r}: its output {t.name!r} is still used.")
            self.tensors.pop(t.name, None)

    def remove_unused_constants(self) -> None:
        for name, t in list(self.tensors.items()):
            if t.is_constant and not t.uses and t not in self.outputs:
                del self.tensors[name]

    def constants(self) -> list[Tensor]:
        return [t for t in self.tensors.values() if t.is_constant]

    def toposort(self) -> None:
        """Reorder layers so each comes after its inputs' producers; an order that already is one
        stays as it is, otherwise each layer goes as early as the order allows (Kahn's algorithm,
        ties broken by the current position)."""
        import heapq
        pos = {id(l): i for i, l in enumerate(self.layers)}
        if all(pos.get(id(t.producer), -1) < i for i, layer in enumerate(self.layers)
               for t in _all_inputs(layer) if t is not None and t.producer is not None):
            return
        waits = [0] * len(self.layers)
        readers: list[list[int]] = [[] for _ in self.layers]
        for i, layer in enumerate(self.layers):
            deps = {pos[id(t.producer)] for t in _all_inputs(layer)
                    if t is not None and t.producer is not None and id(t.producer) in pos}
            waits[i] = len(deps)
            for d in deps:
                readers[d].append(i)
        ready = [i for i, w in enumerate(waits) if w == 0]
        heapq.heapify(ready)
        order: list[Layer] = []
        while ready:
            i = heapq.heappop(ready)
            order.append(self.layers[i])
            for r in readers[i]:
                waits[r] -= 1
                if waits[r] == 0:
                    heapq.heappush(ready, r)
        if len(order) < len(self.layers):
            stuck = next(l for i, l in enumerate(self.layers) if waits[i] > 0)
            raise NetworkError(f"Network {self.name!r} has a cycle through layer {stuck.name!r}; "
                               f"a network must be acyclic.")
        if any(a is not b for a, b in zip(order, self.layers)):
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
            nl.attrs = _copy_attrs(layer.attrs, memo)
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
            if key not in ("tensors", "inputs", "_layers", "outputs"):
                setattr(new, key, copy.deepcopy(value, memo))
        return new

    def summary(self) -> str:
        return "\n".join([repr(self)] + ["  " + repr(layer) for layer in self.layers])


def _copy_attrs(attrs: dict[str, Any], memo: dict) -> dict[str, Any]:
    """A deep copy of a layer's attrs; plain values are copied directly (deepcopy is slow on many small ones)."""
    import copy

    def c(v: Any) -> Any:
        if v is None or isinstance(v, (str, int, float, bool)):
            return v
        if type(v) is list:
            return [c(x) for x in v]
        if type(v) is dict:
            return {k: c(x) for k, x in v.items()}
        return copy.deepcopy(v, memo)
    return {k: c(v) for k, v in attrs.items()}


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
