"""Tactics: the implementations of each layer kind, several per kind where they differ.

A tactic is registered with ``@tactic("Convolution", "cudnn", devices=("cuda",))``
on a *maker*: ``make(attrs, ctx) -> run`` where ``run(*inputs) -> tuple[outputs]``
takes and returns torch tensors. Makers do per-layer work once (attribute
parsing, weight re-layout); ``run`` is what executes per inference.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from kiln.errors import BuildError

Run = Callable[..., tuple]
Maker = Callable[[dict[str, Any], "KernelContext"], Run]


@dataclass
class KernelContext:
    """What a maker may know beyond the layer's attrs."""

    device: str = "cpu"                 # "cpu" or "cuda"
    precision: str = "fp32"             # the layer's precision: fp32, tf32, fp16, bf16
    layer_name: str = ""
    input_dtypes: tuple[str | None, ...] = ()
    output_dtypes: tuple[str, ...] = ()
    # Runs a subgraph (If/Loop/Scan bodies): (network, {outer tensor name: value}, [inputs]) -> outputs
    run_subgraph: Callable[..., Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Tactic:
    kind: str
    name: str
    make: Maker
    devices: tuple[str, ...]
    supports: Callable[[dict[str, Any], KernelContext], bool] | None = None
    # Data-dependent output shapes (NonZero, NMS): not capturable in a CUDA graph.
    dynamic: bool = False
    # Lower runs first where nothing is timed (optimization level 0, layers whose shapes the build cannot know):
    # one number for every device, or (device, number) pairs where the order differs by device.
    priority: int | tuple[tuple[str, int], ...] = 0
    # run(..., out=alloc) may write its output into alloc(shape, dtype, device), a channel slice of a
    # concatenation's buffer (runtime/concat_elision.py), and return that view.
    writes_into: bool = False
    # Timed only at optimization levels ≥ this (alternative tile tables of a generated kernel: each
    # costs a compile per layer shape, so the default level times the main table only).
    min_level: int = 0
    # Sets itself up per input shape at its first call there (cuDNN's attention builds an execution plan):
    # not timed for range engines, whose first run at a new shape would pay it.
    shape_setup: bool = False

    def priority_on(self, device: str) -> int:
        """This tactic's priority on ``device`` (lower runs first where nothing is timed)."""
        return self.priority if isinstance(self.priority, int) else dict(self.priority)[device]


TACTICS: dict[str, list[Tactic]] = {}


def tactic(kind: str, name: str = "torch", devices: tuple[str, ...] = ("cpu", "cuda"),
           supports: Callable[[dict[str, Any], KernelContext], bool] | None = None,
           dynamic: bool = False, priority: int | dict[str, int] = 0, writes_into: bool = False,
           min_level: int = 0, shape_setup: bool = False) -> Callable[[Maker], Maker]:
    """Register ``make`` as tactic ``name`` of layer ``kind``; a duplicate is an error. ``priority``: an int, or
    {device: int} for every device in ``devices``."""
    if isinstance(priority, dict):
        if set(priority) != set(devices):
            raise BuildError(f"Tactic {name!r} for layer kind {kind!r} gives priorities for {sorted(priority)}, "
                             f"not for its devices {sorted(devices)}.")
        priority = tuple(sorted(priority.items()))

    def deco(make: Maker) -> Maker:
        entries = TACTICS.setdefault(kind, [])
        if any(t.name == name for t in entries):
            raise BuildError(f"Tactic {name!r} for layer kind {kind!r} is registered twice.")
        entries.append(Tactic(kind, name, make, tuple(devices), supports, dynamic, priority, writes_into, min_level,
                              shape_setup))
        return make
    return deco


def tactics_for(kind: str, attrs: dict[str, Any], ctx: KernelContext) -> list[Tactic]:
    """Valid tactics for this layer on this device, in preference order."""
    _load_all()
    found = [t for t in TACTICS.get(kind, []) if ctx.device in t.devices and (t.supports is None or t.supports(attrs, ctx))]
    return sorted(found, key=lambda t: t.priority_on(ctx.device))


def plain_first(tactics: list) -> list:
    """``tactics`` with ``torch``'s first where it is one of them (the plain implementation: the one shape
    evaluation and constant folding run and the builder checks the others against), the rest in their order."""
    return sorted(tactics, key=lambda t: t.name != "torch")


def get_tactic(kind: str, name: str) -> Tactic:
    _load_all()
    for t in TACTICS.get(kind, []):
        if t.name == name:
            return t
    raise BuildError(f"Layer kind {kind!r} has no tactic {name!r}; this engine needs a newer Kiln.")


def _load_all() -> None:
    """Import every kernel module once (each registers its tactics)."""
    from kiln._discovery import import_submodules
    import_submodules("kiln.kernels", skip=("registry",))
