"""The index map of a chain of view layers, and its canonical form (for the shuffle passes).

A chain of reshapes, transposes, squeezes and selects reads its source through one index map.
``ViewMap`` follows the chain on *atoms*: each source dim is factored into atoms (major first),
a reshape that cuts through an atom splits it everywhere (the finest common factorization of all
the shapes along the chain), a transpose permutes groups of atoms, a select fixes the atoms of its
axis. At the end every output dim is a run of atoms, so the whole chain is

    split-reshape the source into its atoms → permute → select the fixed atoms → merge-reshape,

where the split and the permute are views of any input, the selects are views, and the merge is a
view wherever the merged atoms are adjacent in memory (always for a contiguous source). The chain
itself may have merged dims that the final shape splits again, which forces a copy; the canonical
form merges only what the output needs.

Dims are symbolic where the network's are (passes/symbolic.py): an atom of size ``S`` or ``B·S``
splits only into factors that divide it as monomials, so a chain that collapses does so for every
shape of the profile, and the canonical form is written with 0 (copy the input's dim) and -1.
"""
from __future__ import annotations

from typing import Any

from kiln.ir.network import Layer, Network, Tensor
from kiln.passes.symbolic import Dim, Sym, concrete, ir_dim, nontrivial, quotient, reshape_attr, sample_binding, \
    sym_shape

VIEW_KINDS = ("Shuffle", "Squeeze", "Unsqueeze", "Flatten", "Select", "Identity")


class NotAView(Exception):
    """The chain's index map is not a split/permute/select/merge of its source."""


class _Atom:
    __slots__ = ("size",)

    def __init__(self, size: Dim) -> None:
        self.size = size


def static_shape(t: Tensor | None) -> tuple[Dim, ...] | None:
    """``t``'s dims (ints and symbolic monomials) when all are known, else None."""
    return sym_shape(t)


def view_steps(layer: Layer) -> list[tuple] | None:
    """The layer as ("reshape", shape) / ("perm", perm) / ("select", axis, index) steps, or None when
    it is not a view layer with static shapes."""
    if layer.kind not in VIEW_KINDS or len(layer.outputs) != 1 or not layer.inputs:
        return None
    src, out = static_shape(layer.inputs[0]), static_shape(layer.outputs[0])
    if src is None or out is None:
        return None
    a = layer.attrs
    if layer.kind == "Select":
        axis = a.get("axis", 0) % len(src)
        index = int(a["index"])
        if index < 0 and not isinstance(src[axis], int):
            return None
        return [("select", axis, index + src[axis] if index < 0 else index)]
    if layer.kind != "Shuffle":
        return [("reshape", out)]
    p1, p2 = a.get("first_transpose"), a.get("second_transpose")
    if p1 == "reverse":
        p1 = list(reversed(range(len(src))))
    steps: list[tuple] = []
    if p1 is not None:
        steps.append(("perm", tuple(p1)))
    if a.get("reshape") is not None or len(layer.inputs) > 1:
        mid = out if p2 is None else tuple(out[list(p2).index(i)] for i in range(len(out)))
        steps.append(("reshape", mid))
    if p2 is not None:
        steps.append(("perm", tuple(p2)))
    return steps


def is_view(layer: Layer | None) -> bool:
    return layer is not None and view_steps(layer) is not None


class ViewMap:
    """The composite of view steps over a source of a given static shape, on atoms."""

    def __init__(self, shape: tuple[Dim, ...]) -> None:
        self.src: list[list[_Atom]] = [[_Atom(d)] if nontrivial(d) else [] for d in shape]
        self.dims: list[list[_Atom]] = [list(g) for g in self.src]
        self.fixed: dict[_Atom, int] = {}

    @classmethod
    def of(cls, shape: tuple[Dim, ...], layers: list[Layer]) -> ViewMap:
        m = cls(shape)
        for layer in layers:
            for step in view_steps(layer) or ():
                m.apply(step)
        return m

    def apply(self, step: tuple) -> None:
        if step[0] == "perm":
            if sorted(step[1]) != list(range(len(self.dims))):
                raise NotAView(f"permutation {step[1]} of rank {len(self.dims)}")
            self.dims = [self.dims[p] for p in step[1]]
        elif step[0] == "reshape":
            self._reshape(step[1])
        else:
            _, axis, index = step
            if len(self.dims[axis]) > 1 and any(isinstance(a.size, Sym) for a in self.dims[axis]):
                raise NotAView(f"select from a dim of symbolic atoms {[a.size for a in self.dims[axis]]}")
            for atom in reversed(self.dims[axis]):
                if isinstance(atom.size, Sym):
                    self.fixed[atom] = index
                    index = 0
                    continue
                self.fixed[atom] = index % atom.size
                index //= atom.size
            del self.dims[axis]

    def _split(self, atom: _Atom, major: Dim) -> tuple[_Atom, _Atom]:
        a, b = _Atom(major), _Atom(quotient(atom.size, major))
        for groups in (self.src, self.dims):
            for g in groups:
                if atom in g:
                    i = g.index(atom)
                    g[i:i + 1] = [a, b]
        return a, b

    def _reshape(self, shape: tuple[Dim, ...]) -> None:
        flat = [a for g in self.dims for a in g]
        new: list[list[_Atom]] = []
        i = 0
        for d in shape:
            group: list[_Atom] = []
            need = d
            while nontrivial(need):
                if i >= len(flat):
                    raise NotAView(f"reshape to {shape} runs out of elements")
                atom = flat[i]
                rest = quotient(need, atom.size)
                if rest is not None:
                    group.append(atom)
                    need = rest
                    i += 1
                elif quotient(atom.size, need) is not None:
                    a, b = self._split(atom, need)
                    flat[i:i + 1] = [a, b]
                    group.append(a)
                    need = 1
                    i += 1
                else:
                    raise NotAView(f"reshape to {shape} does not split its input's dims")
            new.append(group)
        if i != len(flat):
            raise NotAView(f"reshape to {shape} leaves elements over")
        self.dims = new

    # ---- the canonical form ------------------------------------------------------------------
    def canonical(self, out_shape: tuple[Dim, ...], sizes: dict[_Atom, Dim] | None = None) -> dict[str, Any]:
        """split (source atom sizes), perm, selects (indices, each on axis 0) and merge (the final
        shape, or None when the selects already leave it); ``sizes`` overrides atom sizes."""
        size = (lambda a: sizes.get(a, a.size)) if sizes else (lambda a: a.size)
        atoms = [a for g in self.src for a in g]
        fixed = [a for a in atoms if a in self.fixed]
        order = fixed + [a for g in self.dims for a in g]
        perm = [atoms.index(a) for a in order]
        now = [size(a) for g in self.dims for a in g]
        return {"split": [size(a) for a in atoms], "perm": perm, "selects": [self.fixed[a] for a in fixed],
                "merge": None if now == list(out_shape) else list(out_shape)}

    def last_atom(self) -> _Atom | None:
        """The source's last-dim atom when the map moves leading dims only: the last dim is one
        atom, unsplit, and stays the output's whole last dim."""
        if not self.src or len(self.src[-1]) != 1 or not self.dims or self.dims[-1] != self.src[-1]:
            return None
        atom = self.src[-1][0]
        return None if atom in self.fixed else atom


def local_readers(t: Tensor, net: Network) -> bool:
    """Every reader of ``t`` is a layer of ``net`` itself (none inside an If/Loop body)."""
    return all(layer.network is net for layer, _ in t.uses)


def layer_steps(layers: list[Layer]) -> list[tuple]:
    return [step for layer in layers for step in view_steps(layer) or ()]


def form_steps(form: dict[str, Any], shape: tuple[Dim, ...]) -> list[tuple]:
    """The canonical form as view steps from a source of ``shape`` (what ``emit`` builds)."""
    steps: list[tuple] = []
    if list(form["split"]) != list(shape):
        steps.append(("reshape", tuple(form["split"])))
    if form["perm"] != list(range(len(form["perm"]))):
        steps.append(("perm", tuple(form["perm"])))
    steps += [("select", 0, i) for i in form["selects"]]
    if form["merge"] is not None:
        steps.append(("reshape", tuple(form["merge"])))
    return steps


def predicted_copies(shape: tuple[Dim, ...], steps: list[tuple]) -> int:
    """How many reshapes among ``steps`` copy when the source is contiguous (run on the meta device,
    symbolic dims at a generic binding: no size-1 dims, which only ever make more reshapes views).
    A Shuffle holds one reshape at most, so this counts copying layers."""
    import torch
    b = sample_binding([*shape, *(d for st in steps if st[0] == "reshape" for d in st[1])])
    x = torch.empty([concrete(d, b) for d in shape], device="meta")
    copies = 0
    for step in steps:
        if step[0] == "perm":
            x = x.permute(step[1])
        elif step[0] == "select":
            x = x.select(step[1], step[2])
        else:
            y = x.reshape([concrete(d, b) for d in step[1]])
            copies += not y._is_view() and y.numel() > 1
            x = y
    return copies


def collapsed_copies(shape: tuple[Dim, ...], steps: list[tuple], out_shape: tuple[Dim, ...]) -> int:
    """Copies left once ``steps`` from a source of ``shape`` are collapsed to their canonical form."""
    try:
        m = ViewMap(shape)
        for step in steps:
            m.apply(step)
        return predicted_copies(shape, form_steps(m.canonical(out_shape), shape))
    except NotAView:
        return predicted_copies(shape, steps)


def chain_to(t: Tensor) -> tuple[Tensor, list[Layer]]:
    """The longest chain of static view layers producing ``t``: (its source, the layers in order)."""
    chain: list[Layer] = []
    while t.producer is not None and is_view(t.producer):
        chain.insert(0, t.producer)
        t = t.producer.inputs[0]
    return t, chain


def emit(net: Network, src: Tensor, form: dict[str, Any], out_shape: tuple[Dim, ...], name: str, origin: list[str],
         before: Layer, cache: dict | None = None) -> tuple[Tensor, list[Layer]]:
    """Add the layers of a canonical form reading ``src`` right before ``before``; returns the
    final tensor and the new layers. ``cache`` shares identical leading layers (q, k and v of one
    packed projection)."""
    split, perm, selects, merge = form["split"], form["perm"], form["selects"], form["merge"]
    made: list[Layer] = []
    cur = src
    cur_shape = list(static_shape(src) or ())

    def drop_made() -> None:
        for layer in reversed(made):
            if not layer.outputs[0].uses:
                net.remove_layer(layer)

    def add(kind: str, attrs: dict, shape: list[Dim], key) -> None:
        nonlocal cur, cur_shape
        hit = cache.get(key) if cache is not None else None
        if hit is not None and hit.producer is not None and hit.producer in net.layers and hit.producer.inputs[0] is cur:
            cur, cur_shape = hit, shape
            return
        if attrs.get("reshape") is not None:        # the target as static dims, 0 (copied) and -1
            p1 = attrs["first_transpose"]
            seen = [cur_shape[p] for p in p1] if p1 is not None else cur_shape
            attrs["reshape"] = reshape_attr(tuple(seen), tuple(attrs["reshape"]))
            if attrs["reshape"] is None:
                drop_made()
                raise NotAView(f"reshape of {seen} to {shape} cannot be written for every shape")
        layer = net.add_layer(kind, [cur], attrs, name=net.unique_name(f"{name}/{kind.lower()}"), origin=origin)
        net.layers.remove(layer)
        net.layers.insert(net.layers.index(before), layer)
        layer.outputs[0].shape, layer.outputs[0].dtype = tuple(ir_dim(d) for d in shape), src.dtype
        made.append(layer)
        if cache is not None:
            cache[key] = layer.outputs[0]
        cur, cur_shape = layer.outputs[0], shape

    def shuffle(p1, reshape, p2) -> dict:
        return {"first_transpose": p1, "reshape": reshape, "second_transpose": p2, "allowzero": False}

    identity = perm == list(range(len(perm)))
    permuted = [split[p] for p in perm]
    if split == cur_shape:                       # nothing to split: transpose first, merge in the same layer
        fold = merge if not selects else None
        if not identity or fold is not None:
            add("Shuffle", shuffle(None if identity else perm, fold, None), fold or permuted,
                (id(src), "t", tuple(perm), tuple(fold or ())))
        if fold is not None:
            merge = None
    else:
        add("Shuffle", shuffle(None, split, None if identity else perm), permuted,
            (id(src), "s", tuple(split), tuple(perm)))
    for index in selects:
        add("Select", {"axis": 0, "index": index}, cur_shape[1:], (id(cur), "select", index))
    if merge is not None and list(merge) != cur_shape:
        add("Shuffle", shuffle(None, list(merge), None), list(merge), (id(cur), "m", tuple(merge)))
    if list(cur_shape) != list(out_shape):        # not expected: the form is built to end there
        drop_made()
        raise NotAView(f"canonical form ends at {cur_shape}, expected {list(out_shape)}")
    return cur, made
