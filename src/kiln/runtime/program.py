"""A compiled plan: a flat list of steps over named values, run with no graph logic.

``Program`` is what the runtime executes. It is built from the plan an engine
stores (layers with their chosen tactic) by calling each tactic's maker once.
Values that die after a step are dropped at once, so peak memory follows
liveness even without an arena. A CPU program runs as a slot plan
(kiln.runtime.slots): the same steps over list indices fixed when it is made.

A range engine's layers may name a tactic per shape bucket (``bucket_tactics``).
Every bucket's tactics are made when the program is built, so a run at a new
shape makes no kernel; ``select(bucket)`` swaps in the bucket's functions (only
those that differ from the layers' own tactics) before a run.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kiln.errors import EngineFormatError, IncompatibleEngineError, KilnError, PluginError, ShapeError
from kiln.ir.dtypes import np_dtype, torch_dtype
from kiln.ir.layers import LAYER_KINDS
from kiln.kernels import KernelContext, Tactic, get_tactic
from kiln.kernels.cpu_threads import ALL, ONE, SHAPE, gemm_like, layer_threads
from kiln.runtime.concat_elision import elide_concats
from kiln.runtime.residual_in_place import sum_into_residuals
from kiln.runtime.shape_cache import cached_per_shape, keep_shape_steps


_MEASURED = {"one": ONE, "all": ALL}     # a layer's ``threads`` (engine/schema.py LAYER_THREADS): its thread choice


class Step:
    __slots__ = ("name", "kind", "fn", "ins", "outs", "targets", "frees", "dynamic", "tactic", "precision", "fixed",
                 "threads")

    def __init__(self, name, kind, fn, ins, outs, targets, dynamic, tactic, precision):
        self.name, self.kind, self.fn, self.ins, self.outs = name, kind, fn, ins, outs
        self.targets = targets          # per input: required device type ("cpu"/"cuda") or None
        self.frees: list[str] = []
        self.dynamic = dynamic
        self.tactic = tactic
        self.precision = precision
        self.fixed: dict[int, torch.Tensor] = {}    # constant inputs, already on the device they are read on
        self.threads = ALL              # a CPU step's thread choice (kernels/cpu_threads.py layer_threads)


def decode_attr(value: Any, weights: dict[str, torch.Tensor], device: str, plugin_factory) -> Any:
    """Turn a plan attr back into what makers take (subplans → Programs, plugin records → plugins)."""
    if isinstance(value, dict):
        if "__graph__" in value:
            return Program(value["__graph__"], weights, device, plugin_factory)
        if "__array__" in value:
            a = value["__array__"]
            return np.asarray(a["data"]).astype(np_dtype(a["dtype"]) if a["dtype"] != "object" else object) \
                .reshape(a["shape"])
        if "__plugin__" in value:
            plugin = plugin_factory(value["__plugin__"])
            return plugin
        return {k: decode_attr(v, weights, device, plugin_factory) for k, v in value.items()}
    if isinstance(value, list):
        return [decode_attr(v, weights, device, plugin_factory) for v in value]
    return value


def check_tactic(layer: dict, name: str, device: str) -> Tactic:
    """The registered tactic ``name`` of the plan layer's kind, which must run where the layer runs."""
    kind = layer["kind"]
    try:
        tac = get_tactic(kind, name)
    except KilnError:
        raise EngineFormatError(f"The engine's layer {layer['name'][:60]!r} ({kind}) names tactic {name[:40]!r}, "
                                f"which is not a {kind} tactic of this Kiln; the file is damaged or needs a newer "
                                f"Kiln. Rebuild it with kiln build.") from None
    run_on = "cpu" if layer.get("host") or device == "cpu" else device
    if run_on not in tac.devices:
        raise EngineFormatError(f"The engine's layer {layer['name'][:60]!r} ({kind}) names tactic {tac.name!r}, "
                                f"which runs only on {', '.join(tac.devices)}, but the layer runs on {run_on}; "
                                f"the file is damaged or forged. Rebuild it with kiln build.")
    return tac


def _set_up(make, layer: Any) -> Step:
    """``make(layer)``, with any failure but Kiln's own refusals as one line naming the layer."""
    try:
        return make(layer)
    except (EngineFormatError, IncompatibleEngineError, PluginError, ShapeError):
        raise                       # Kiln's own line: e.g. a tactic whose library is not installed here
    except Exception as exc:        # a forged or foreign plan: never a traceback
        name = layer.get("name", "?") if isinstance(layer, dict) else "?"
        raise EngineFormatError(f"The engine's layer {name!r} cannot be set up ({type(exc).__name__}: "
                                f"{exc}); the plan is damaged or from another Kiln. Rebuild it with "
                                f"kiln build.") from None


def layer_failure(step: Step, args: list, exc: Exception) -> ShapeError:
    """The one-line error for a step whose function raised ``exc`` on ``args``."""
    shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else a if a is None else type(a).__name__ for a in args]
    why = (str(exc).splitlines() or [type(exc).__name__])[0]
    return ShapeError(f"Layer {step.name!r} ({step.kind}) failed on inputs {shapes}: {why}")


class Program:
    """Executable form of a plan (the top-level network or a subgraph body)."""

    def __init__(self, plan: dict, weights: dict[str, torch.Tensor], device: str, plugin_factory=None) -> None:
        self.device = device
        self.inputs: list[str] = [t["name"] for t in plan["inputs"]]
        self.outputs: list[str] = [t["name"] for t in plan["outputs"]]
        self._out_dtypes = [t["dtype"] for t in plan["outputs"]]
        tensors = plan.get("tensors", {})
        self.constants: dict[str, torch.Tensor] = {}
        for name, key in plan.get("weights", {}).items():
            if key not in weights:
                raise EngineFormatError(f"The engine's plan names weight {key!r} that the file does not hold; "
                                        f"the file is damaged. Rebuild it with kiln build.")
            self.constants[name] = weights[key]
        moved: dict[tuple[str, str], torch.Tensor] = {}
        make = (lambda layer: self._step(layer, weights, device, plugin_factory, tensors, moved))
        self.steps: list[Step] = [_set_up(make, layer) for layer in plan["layers"]]
        self._plan_liveness()
        keep_shape_steps(self)
        sum_into_residuals(self)
        raw = [(s.fn, s.tactic) for s in self.steps]
        self._concat_buffers = elide_concats(self, plan, device)
        self._variants: list[tuple[list[tuple[int, Any, str]], list]] = [([], self._concat_buffers)]
        self._variant = 0
        self._bucket_variant: list[int] = []
        if any(layer.get("bucket_tactics") for layer in plan["layers"]):
            self._bucket_variants(plan, make, raw)

    def _bucket_variants(self, plan: dict, make, raw: list) -> None:
        """Make every bucket's tactics; each distinct choice of them is a variant: the steps whose function
        differs from the layers' own tactics, and the concatenation buffers of that choice."""
        layers = plan["layers"]
        multi = [i for i, layer in enumerate(layers) if layer.get("bucket_tactics")]
        made: dict[tuple[int, str], Step | None] = {(i, self.steps[i].tactic): None for i in multi}   # None: own
        self._base = base = [(s.fn, s.tactic) for s in self.steps]
        own = tuple(base[i][1] for i in multi)
        keys: dict[tuple, int] = {own: 0}
        for b in range(len(layers[multi[0]]["bucket_tactics"])):
            key = tuple(layers[i]["bucket_tactics"][b] for i in multi)
            if key not in keys:
                for i, name in zip(multi, key):
                    if (i, name) not in made:
                        made[(i, name)] = _set_up(make, {**layers[i], "tactic": name})
                        self.steps[i].dynamic = self.steps[i].dynamic or made[(i, name)].dynamic
                for j, step in enumerate(self.steps):
                    step.fn, step.tactic = raw[j]
                for i, name in zip(multi, key):
                    if made[(i, name)] is not None:
                        self.steps[i].fn, self.steps[i].tactic = made[(i, name)].fn, name
                buffers = elide_concats(self, plan, self.device)
                diffs = [(j, s.fn, s.tactic) for j, s in enumerate(self.steps) if s.fn is not base[j][0]]
                keys[key] = len(self._variants)
                self._variants.append((diffs, buffers))
            self._bucket_variant.append(keys[key])
        for step, (fn, tac) in zip(self.steps, base):
            step.fn, step.tactic = fn, tac

    def select(self, bucket: int | None) -> None:
        """Run the tactics of ``bucket`` (an index into the engine's bucket table; None: the layers' own)."""
        v = self._bucket_variant[bucket] if bucket is not None and self._bucket_variant else 0
        if v == self._variant:
            return
        steps = self.steps
        for j, _, _ in self._variants[self._variant][0]:
            steps[j].fn, steps[j].tactic = self._base[j]
        for j, fn, tac in self._variants[v][0]:
            steps[j].fn, steps[j].tactic = fn, tac
        self._concat_buffers = self._variants[v][1]
        self._variant = v
        self._slot_plan = None

    def _step(self, layer: dict, weights, device: str, plugin_factory, tensors: dict, moved: dict) -> Step:
        kind = layer["kind"]
        if kind not in LAYER_KINDS:
            raise EngineFormatError(f"The engine's layer {layer['name']!r} has unknown kind {kind!r}; "
                                    f"the file is damaged or needs a newer Kiln.")
        tac = check_tactic(layer, layer.get("tactic") or "torch", device)
        run_on = "cpu" if layer.get("host") or device == "cpu" else device
        attrs = {k: decode_attr(v, weights, device, plugin_factory) for k, v in layer.get("attrs", {}).items()}
        out_dtypes = tuple(tensors.get(n, {}).get("dtype", "float32") for n in layer["outputs"])
        in_dtypes = tuple(tensors.get(n, {}).get("dtype") if n else None for n in layer["inputs"])
        ctx = KernelContext(device=run_on, precision=layer.get("precision") or "fp32", layer_name=layer["name"],
                            input_dtypes=in_dtypes, output_dtypes=out_dtypes)
        fn = cached_per_shape(kind, tac.make(attrs, ctx), self)
        host_pos = set(LAYER_KINDS[kind].host_inputs)
        targets = []
        reads_metadata = LAYER_KINDS[kind].host == "always"     # Shape, Size: only the input's shape is read
        for i, n in enumerate(layer["inputs"]):
            if n is None or device == "cpu" or reads_metadata:
                targets.append(None)
            elif layer.get("host") or i in host_pos:
                targets.append("cpu")
            elif LAYER_KINDS[kind].control_flow:      # subgraph inputs stay where they are
                targets.append(None)
            else:
                targets.append(device)
        step = Step(layer["name"], kind, fn, list(layer["inputs"]), list(layer["outputs"]), targets,
                    tac.dynamic, tac.name, layer.get("precision"))
        for i, n in enumerate(step.ins):
            if n in self.constants:
                want = targets[i] or ("cpu" if run_on == "cpu" else device)
                if (n, want) not in moved:
                    moved[(n, want)] = self.constants[n].to(want)
                step.fixed[i] = moved[(n, want)]
        if device == "cpu":
            step.threads = _MEASURED.get(layer.get("threads")) or self._thread_choice(kind, layer, tensors)
        return step

    def _thread_choice(self, kind: str, layer: dict, tensors: dict) -> str:
        """For a layer without a measured ``threads`` (an engine built on one thread or before Kiln measured them):
        ``layer_threads`` from the plan's static shapes; where one is not static, SHAPE for a GEMM-like layer
        (chosen per input shape at run time), else the engine's count."""
        def shape(name: str) -> tuple[int, ...] | None:
            dims = tuple(self.constants[name].shape) if name in self.constants else \
                tensors.get(name, {}).get("shape") if isinstance(tensors.get(name), dict) else None
            ok = isinstance(dims, (list, tuple)) and all(type(d) is int and 0 <= d for d in dims)
            return tuple(dims) if ok else None
        ins = [shape(n) if n else None for n in layer["inputs"]]
        outs = [shape(n) for n in layer["outputs"]]
        if any(s is None for s in outs) or any(s is None for s, n in zip(ins, layer["inputs"]) if n):
            return SHAPE if gemm_like(kind) else ALL
        return layer_threads(kind, ins, outs)

    def _plan_liveness(self) -> None:
        keep = set(self.outputs)
        last: dict[str, int] = {}
        for i, step in enumerate(self.steps):
            for n in step.ins:
                if n is not None:
                    last[n] = i
        for n, i in last.items():
            if n not in keep:
                self.steps[i].frees.append(n)

    # CUDA-graph support: host values moved to the device are remembered during the warm-up
    # runs ("collect") and served from that cache while capturing ("replay"): values that
    # depend only on shapes are the same, and no host-to-device copy is recorded.
    move_mode: str | None = None
    move_cache: dict | None = None

    def _move(self, v: torch.Tensor, target: str) -> torch.Tensor:
        mode = self.move_mode
        if mode is None or target == "cpu" or v.device.type != "cpu":
            return v.to(target)
        key = (tuple(v.shape), v.dtype)
        if mode == "collect":
            out = v.to(target)
            self.move_cache.setdefault(key, []).append((v.clone(), out))
            return out
        for host, dev in self.move_cache.get(key, []):
            if host.shape == v.shape and torch.equal(host, v):
                return dev
        raise RuntimeError(f"a host value of shape {tuple(v.shape)} changed between warm-up and capture")

    _slot_plan = None       # a CPU program's SlotPlan, made at its first run (again after select())

    def output_dtype(self, index: int) -> torch.dtype:
        return torch_dtype(self._out_dtypes[index])

    def run_env(self, env: dict[str, torch.Tensor], inputs: list[torch.Tensor], timer=None) -> list[torch.Tensor]:
        """Run every step; ``timer`` (optional) wraps each step: timer(step, thunk) -> outputs. A CPU program
        runs its slot plan (kiln.runtime.slots), timed or not, so a profile times what a run runs."""
        if self.device == "cpu":
            plan = self._slot_plan
            if plan is None:
                from kiln.runtime.slots import SlotPlan
                plan = self._slot_plan = SlotPlan(self)
            return plan.run(env, inputs, timer)
        values = dict(env)
        for buf in self._concat_buffers:
            buf.current = None
        for name, value in zip(self.inputs, inputs):
            values[name] = value
        for n in self.outputs:
            if n in self.constants and n not in values:
                values[n] = self.constants[n]
        for step in self.steps:
            args = []
            fixed = step.fixed
            for i, (n, target) in enumerate(zip(step.ins, step.targets)):
                if n is None:
                    args.append(None)
                    continue
                if i in fixed:
                    args.append(fixed[i])
                    continue
                v = values[n]
                if target is not None and isinstance(v, torch.Tensor) and v.device.type != target:
                    v = self._move(v, target)
                args.append(v)
            try:
                outs = step.fn(*args) if timer is None else timer(step, lambda: step.fn(*args))
            except (ShapeError, RuntimeError, IndexError, ValueError) as exc:
                if isinstance(exc, ShapeError):
                    raise
                raise layer_failure(step, args, exc) from exc
            for n, v in zip(step.outs, outs):
                values[n] = v
            for n in step.frees:
                values.pop(n, None)
        return [values[n] for n in self.outputs]
