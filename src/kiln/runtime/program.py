"""A compiled plan: a flat list of steps over named values, run with no graph logic.

``Program`` is what the runtime executes. It is built from the plan an engine
stores (layers with their chosen tactic) by calling each tactic's maker once.
Values that die after a step are dropped at once, so peak memory follows
liveness even without an arena.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kiln.errors import EngineFormatError, PluginError, ShapeError
from kiln.ir.dtypes import np_dtype, torch_dtype
from kiln.ir.layers import LAYER_KINDS
from kiln.kernels import KernelContext, get_tactic
from kiln.runtime.concat_elision import elide_concats


class Step:
    __slots__ = ("name", "kind", "fn", "ins", "outs", "targets", "frees", "dynamic", "tactic", "precision", "fixed")

    def __init__(self, name, kind, fn, ins, outs, targets, dynamic, tactic, precision):
        self.name, self.kind, self.fn, self.ins, self.outs = name, kind, fn, ins, outs
        self.targets = targets          # per input: required device type ("cpu"/"cuda") or None
        self.frees: list[str] = []
        self.dynamic = dynamic
        self.tactic = tactic
        self.precision = precision
        self.fixed: dict[int, torch.Tensor] = {}    # constant inputs, already on the device they are read on


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
        self.steps: list[Step] = []
        for layer in plan["layers"]:
            try:
                self.steps.append(self._step(layer, weights, device, plugin_factory, tensors, moved))
            except (EngineFormatError, PluginError, ShapeError):
                raise
            except Exception as exc:        # a forged or foreign plan: never a traceback
                name = layer.get("name", "?") if isinstance(layer, dict) else "?"
                raise EngineFormatError(f"The engine's layer {name!r} cannot be set up ({type(exc).__name__}: "
                                        f"{exc}); the plan is damaged or from another Kiln. Rebuild it with "
                                        f"kiln build.") from None
        self._plan_liveness()
        self._concat_buffers = elide_concats(self, plan, device)

    def _step(self, layer: dict, weights, device: str, plugin_factory, tensors: dict, moved: dict) -> Step:
        kind = layer["kind"]
        if kind not in LAYER_KINDS:
            raise EngineFormatError(f"The engine's layer {layer['name']!r} has unknown kind {kind!r}; "
                                    f"the file is damaged or needs a newer Kiln.")
        tac = get_tactic(kind, layer.get("tactic") or "torch")
        run_on = "cpu" if layer.get("host") or device == "cpu" else device
        if run_on not in tac.devices:
            raise EngineFormatError(f"The engine's layer {layer['name']!r} ({kind}) names tactic {tac.name!r}, "
                                    f"which runs only on {', '.join(tac.devices)}, but the layer runs on {run_on}; "
                                    f"the file is damaged or forged. Rebuild it with kiln build.")
        attrs = {k: decode_attr(v, weights, device, plugin_factory) for k, v in layer.get("attrs", {}).items()}
        out_dtypes = tuple(tensors.get(n, {}).get("dtype", "float32") for n in layer["outputs"])
        in_dtypes = tuple(tensors.get(n, {}).get("dtype") if n else None for n in layer["inputs"])
        ctx = KernelContext(device=run_on, precision=layer.get("precision") or "fp32", layer_name=layer["name"],
                            input_dtypes=in_dtypes, output_dtypes=out_dtypes)
        fn = tac.make(attrs, ctx)
        host_pos = set(LAYER_KINDS[kind].host_inputs)
        targets = []
        for i, n in enumerate(layer["inputs"]):
            if n is None or device == "cpu":
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
        return step

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

    def output_dtype(self, index: int) -> torch.dtype:
        return torch_dtype(self._out_dtypes[index])

    def run_env(self, env: dict[str, torch.Tensor], inputs: list[torch.Tensor], timer=None) -> list[torch.Tensor]:
        """Run every step; ``timer`` (optional) wraps each step: timer(step, thunk) -> outputs."""
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
                raise ShapeError(f"Layer {step.name!r} ({step.kind}) failed on inputs "
                                 f"{[tuple(a.shape) if isinstance(a, torch.Tensor) else a if a is None else type(a).__name__ for a in args]}: "
                                 f"{str(exc).splitlines()[0]}") from exc
            for n, v in zip(step.outs, outs):
                values[n] = v
            for n in step.frees:
                values.pop(n, None)
        return [values[n] for n in self.outputs]
