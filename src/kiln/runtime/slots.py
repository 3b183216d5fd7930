"""A program's steps over numbered slots: how a CPU program runs, with no per-step lookups or checks.

Every value a program touches (its inputs, the outer values a subgraph body reads, its constants and
each step's outputs) has one index into a list. Constant inputs sit in a template list, placed once; a
run copies the template, puts the inputs in, and calls each step's function on arguments fetched by
precomputed indices. The plan holds the functions the steps had when it was
made (``Program.select`` makes a new one). A value is dropped, by index, after its last reader, as
``Program`` plans it. A CPU program needs no
device moves and no concatenation buffers, so nothing is checked per step; a subgraph body (Loop, If,
Scan) keeps its plan across iterations and runs.

A step that only re-views its input (Slice, Shuffle, Squeeze, Unsqueeze, Flatten with every other input a
constant) replays the view it made for the input's layout: its first run at a (shape, strides, dtype) runs
the layer and, where the result shares the input's storage, keeps the view's sizes, strides and offset from
the input's; later runs at that layout make the view with one ``as_strided``. A result that is a copy (a
reversed slice, a reshape of non-viewable strides) keeps the layout running the layer.

Layers that are not faster on the run's count run on one thread whatever that count: those the build measured so
(a layer's ``threads``, kiln.builder.tactics.select_threads), else, in engines without it, small layers
(kiln.kernels.cpu_threads ``layer_threads``). Each stretch of steps from a one-thread step to the last one before a
step that wants the run's count (small simple steps run on either) is one region; on more than one thread, a run drops to one thread at a region's
first step and comes back after its last (one switch per region, not per layer). A GEMM-like step whose shapes
the plan does not fix makes that choice at run time, per input shape (after its first run there), and switches
around itself alone.
"""
from __future__ import annotations

from operator import itemgetter
from typing import Any, Callable

import torch

from kiln.errors import EngineFormatError, ShapeError
from kiln.kernels.cpu_threads import ALL, ANY, ONE, SHAPE, layer_threads

_NONE = 0          # the slot that always holds None: an absent optional input

# Layer kinds whose "torch" tactic returns a view of input 0 decided by its layout and the other inputs alone.
VIEW_KINDS = frozenset(("Slice", "Shuffle", "Squeeze", "Unsqueeze", "Flatten"))
MAX_VIEW_LAYOUTS = 16       # input layouts a view step remembers (then it starts afresh)


def _no_args(slots: list) -> tuple:
    return ()


def view_replay(fn: Callable[..., tuple]) -> Callable[..., tuple]:
    """``fn`` (a view layer's step) replaying, per input layout, the view it returned; see the module docstring."""
    views: dict[tuple, tuple | None] = {}

    def run(x, *rest):
        if not isinstance(x, torch.Tensor):
            return fn(x, *rest)
        key = (x.shape, x.stride(), x.dtype)
        hit = views.get(key, False)
        if hit:
            size, stride, offset = hit
            if not offset:          # as_strided keeps the input's storage offset
                return (x.as_strided(size, stride),)
            return (x.as_strided(size, stride, x.storage_offset() + offset),)
        if hit is None:
            return fn(x, *rest)
        outs = fn(x, *rest)
        y = outs[0]
        same = (len(outs) == 1 and isinstance(y, torch.Tensor) and x.numel() > 0 and y.dtype == x.dtype
                and y.device == x.device and y.untyped_storage().data_ptr() == x.untyped_storage().data_ptr())
        if len(views) >= MAX_VIEW_LAYOUTS:
            views.clear()
        views[key] = (tuple(y.shape), y.stride(), y.storage_offset() - x.storage_offset()) if same else None
        return outs
    return run


def _replays_view(step: Any) -> bool:
    """A view kind's own tactic whose inputs past the first are constants or absent."""
    return (step.kind in VIEW_KINDS and step.tactic == "torch" and 0 not in step.fixed
            and all(n is None or i in step.fixed for i, n in enumerate(step.ins) if i > 0))


def one_thread_regions(choices: list[str]) -> tuple[tuple[int, int], ...]:
    """(first, last) step indices of each stretch that runs on one thread: it starts and ends at a step that
    wants one thread (ONE) and holds no step that wants the run's count (ALL, SHAPE); ANY steps run on either."""
    regions = []
    first = last = None
    for i, choice in enumerate(choices + [ALL]):
        if choice == ONE:
            first = i if first is None else first
            last = i
        elif choice != ANY and first is not None:
            regions.append((first, last))
            first = None
    return tuple(regions)


def _switching(fn: Callable[..., tuple], plan: "SlotPlan", enter: bool, leave: bool) -> Callable[..., tuple]:
    """``fn`` dropping to one thread before it (``enter``) and back to the run's count after it (``leave``)."""
    def run(*args):
        n = plan.threads_now
        if n > 1 and enter:
            torch.set_num_threads(1)
        out = fn(*args)
        if n > 1 and leave:
            torch.set_num_threads(n)
        return out
    return run


MAX_SHAPE_CHOICES = 16     # input shapes a step choosing its threads at run time remembers (then it starts afresh)


def _by_shape(fn: Callable[..., tuple], kind: str, plan: "SlotPlan") -> Callable[..., tuple]:
    """``fn`` on one thread where ``layer_threads`` says so for the shapes it is given (decided after its first
    call at those shapes, which runs on the run's count)."""
    choices: dict[tuple, bool] = {}

    def run(*args):
        n = plan.threads_now
        if n <= 1:
            return fn(*args)
        key = tuple([a.shape if isinstance(a, torch.Tensor) else None for a in args])
        one = choices.get(key)
        if one is None:
            out = fn(*args)
            if len(choices) >= MAX_SHAPE_CHOICES:
                choices.clear()
            choices[key] = layer_threads(kind, [None if s is None else tuple(s) for s in key],
                                         [tuple(o.shape) for o in out if isinstance(o, torch.Tensor)]) == ONE
            return out
        if not one:
            return fn(*args)
        torch.set_num_threads(1)
        out = fn(*args)
        torch.set_num_threads(n)
        return out
    return run


class SlotPlan:
    """The steps of a ``Program`` compiled to slot indices; ``run`` executes them."""

    __slots__ = ("template", "input_slots", "outer", "output_getter", "n_outputs", "steps", "regions", "switches",
                 "threads_now")

    def __init__(self, program: Any) -> None:
        index: dict[str, int] = {}
        template: list[Any] = [None]
        fixed_slot: dict[int, int] = {}

        def named(name: str) -> int:
            if name not in index:
                index[name] = len(template)
                template.append(program.constants.get(name) if name in program.outputs else None)
            return index[name]

        def constant(value: Any) -> int:
            if id(value) not in fixed_slot:
                fixed_slot[id(value)] = len(template)
                template.append(value)
            return fixed_slot[id(value)]

        self.input_slots = tuple(named(n) for n in program.inputs)
        known = set(program.inputs)
        outer: dict[str, int] = {}          # names read before anything here defines them: the caller's values
        steps = []
        for step in program.steps:
            ins = []
            for i, n in enumerate(step.ins):
                if n is None:
                    ins.append(_NONE)
                elif i in step.fixed:
                    ins.append(constant(step.fixed[i]))
                else:
                    if n not in known:
                        outer[n] = named(n)
                        known.add(n)
                    ins.append(named(n))
            outs = tuple(named(n) for n in step.outs)
            known.update(step.outs)
            n_in = len(ins)
            get: Callable[[list], tuple] = _no_args if not ins else itemgetter(*ins) if n_in > 1 else \
                (lambda slots, i=ins[0]: (slots[i],))
            a, b = (ins + [_NONE, _NONE])[:2]
            frees = tuple(index[n] for n in step.frees if n in index)
            fn = view_replay(step.fn) if _replays_view(step) else step.fn
            steps.append([fn, n_in, a, b, get, outs[0] if len(outs) == 1 else -1, outs, frees, step])
        self.threads_now = 1
        self.regions = one_thread_regions([step.threads for step in program.steps])
        shaped = [i for i, step in enumerate(program.steps) if step.threads == SHAPE]
        for i in shaped:
            steps[i][0] = _by_shape(steps[i][0], program.steps[i].kind, self)
        self.switches = bool(self.regions or shaped)
        for first, last in self.regions:
            steps[first][0] = _switching(steps[first][0], self, True, first == last)
            if last != first:
                steps[last][0] = _switching(steps[last][0], self, False, True)
        for n in program.outputs:
            if n not in known and n not in program.constants:
                outer[n] = named(n)
        self.outer = tuple(outer.items())
        self.template = template
        self.steps = tuple(tuple(s) for s in steps)
        out_slots = [named(n) for n in program.outputs]
        self.n_outputs = len(out_slots)
        self.output_getter = itemgetter(*out_slots) if out_slots else _no_args

    def run(self, env: dict[str, Any], inputs: list[Any], timer: Callable | None = None) -> list[Any]:
        """The program's outputs for ``inputs``; ``env`` holds the outer values a subgraph body reads; ``timer``
        (optional) wraps each step: timer(step, thunk) -> outputs."""
        slots = self.template.copy()
        if self.outer:
            try:
                for name, i in self.outer:
                    slots[i] = env[name]
            except KeyError as exc:
                raise EngineFormatError(f"The engine's plan reads value {str(exc.args[0])[:80]!r}, which no layer, "
                                        f"input or weight defines; the file is damaged. Rebuild it with "
                                        f"kiln build.") from None
        if len(inputs) < len(self.input_slots):
            raise EngineFormatError(f"The engine's plan takes {len(self.input_slots)} inputs here but was given "
                                    f"{len(inputs)}; the file is damaged. Rebuild it with kiln build.")
        for i, v in zip(self.input_slots, inputs):
            slots[i] = v
        step = get = None
        n = self.threads_now = torch.get_num_threads() if self.switches else 1
        try:
            if timer is not None:
                for fn, _, _, _, get, _, outs, frees, step in self.steps:
                    args = get(slots)
                    for i, v in zip(outs, timer(step, lambda: fn(*args))):
                        slots[i] = v
                    for i in frees:
                        slots[i] = None
                steps: tuple = ()
            else:
                steps = self.steps
            for fn, n_in, a, b, get, out, outs, frees, step in steps:
                if n_in == 1:
                    r = fn(slots[a])
                elif n_in == 2:
                    r = fn(slots[a], slots[b])
                else:
                    r = fn(*get(slots))
                if out >= 0:
                    slots[out] = r[0]
                else:
                    for i, v in zip(outs, r):
                        slots[i] = v
                for i in frees:
                    slots[i] = None
        except (ShapeError, RuntimeError, IndexError, ValueError) as exc:
            if isinstance(exc, ShapeError) or step is None:
                raise
            from kiln.runtime.program import layer_failure
            raise layer_failure(step, list(get(slots)), exc) from exc
        finally:
            if n > 1 and torch.get_num_threads() != n:      # a step failed on one thread
                torch.set_num_threads(n)
        got = self.output_getter(slots)
        return [got] if self.n_outputs == 1 else list(got)
