"""Kiln as an ONNX backend (``onnx.backend.base.Backend``), for the ONNX conformance suite.

``prepare`` parses the model and builds an engine for the requested device;
``BackendRep.run`` executes it. Engines are static-shaped where they can be: a
model whose inputs are fully static is built at once; one with dynamic or
missing input dims is built on first ``run`` with a profile fixed at the shapes
given (one engine per distinct input signature), as other backends defer.

Usage: ``onnx.backend.test.BackendTest(kiln.onnx.backend, __name__)``.
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import numpy as np
from onnx.backend.base import Backend, BackendRep

from kiln.errors import KilnError, ParseError

_DEVICES = {"CPU": "cpu", "CUDA": "cuda"}


def _kiln_device(device: str) -> str:
    name = str(device).split(":")[0].upper()
    if name not in _DEVICES:
        raise KilnError(f"Device {device!r} is not supported by the Kiln backend; use 'CPU' or 'CUDA'.")
    return _DEVICES[name]


def _check_model(model) -> None:
    """Reject what the ONNX checker rejects, as a one-line ParseError (never a crash later)."""
    import onnx
    try:
        onnx.checker.check_model(model)
    except Exception as exc:    # onnx raises ValidationError (and friends) for invalid models
        first = str(exc).strip().splitlines()
        raise ParseError(f"The model is not valid ONNX ({first[0] if first else type(exc).__name__}); "
                         f"fix it so that onnx.checker.check_model accepts it.") from None


def _graph_inputs(model) -> list:
    inits = {i.name for i in model.graph.initializer} | {s.values.name for s in model.graph.sparse_initializer}
    return [vi for vi in model.graph.input if vi.name not in inits]


def _is_tensor(vi) -> bool:
    return vi.type.HasField("tensor_type")


def _feed(v: Any) -> Any:
    """Arrays pass as they are; sequences (lists) and empty optionals (None) stay Python values."""
    if isinstance(v, (np.ndarray, list)) or v is None:
        return v
    return np.asarray(v)


def _declared_dtype(vi) -> str | None:
    if not _is_tensor(vi) or not vi.type.tensor_type.elem_type:
        return None
    from kiln.onnx.validate import _ONNX_DTYPES
    return _ONNX_DTYPES.get(int(vi.type.tensor_type.elem_type))


def _to_torch(a: Any):
    """An array as the engine holds it: float8 natively, sub-byte types by value, bfloat16 by its bits."""
    if not isinstance(a, np.ndarray) or a.dtype == object or a.dtype.kind in "US":
        return a                     # sequences, empty optionals, strings: the engine's own checks apply
    from kiln.ir.dtypes import from_numpy
    return from_numpy(np.array(a, copy=True, order="C"))


def _to_numpy(v: Any, declared: str | None) -> Any:
    """Engine results back to numpy, narrow ONNX types restored from their engine representation."""
    if isinstance(v, list):
        return [_to_numpy(x, None) for x in v]
    if v is None:
        return None
    import torch

    from kiln.ir.dtypes import NARROW_TYPES, np_dtype
    from kiln.ir.dtypes import to_numpy
    if isinstance(v, torch.Tensor):
        v = to_numpy(v)
    if declared in NARROW_TYPES and isinstance(v, np.ndarray) and v.dtype.name != declared:
        v = v.astype(np_dtype(declared))
    return v


def _static_dims(vi) -> list[int] | None:
    """The input's dims when all are known numbers, else None (the parser takes -1 and 0 as dynamic)."""
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
        return None
    dims = []
    for d in tt.shape.dim:
        if not d.HasField("dim_value") or d.dim_value <= 0:
            return None
        dims.append(int(d.dim_value))
    return dims


class KilnRep(BackendRep):
    """A prepared model: one engine per input-shape signature (one when the model is static)."""

    def __init__(self, model, device: str, **build_options: Any) -> None:
        self.model = model
        self.device = device
        self.build_options = build_options
        self.inputs = _graph_inputs(model)
        self.output_names = [vi.name for vi in model.graph.output]
        self.output_types = {vi.name: _declared_dtype(vi) for vi in model.graph.output}
        self._contexts: dict[tuple, Any] = {}
        self._static = all(_static_dims(vi) is not None for vi in self.inputs if _is_tensor(vi))
        self._network = None
        if self._static:
            self._context_for(self._static_key())
        else:
            self._network = self._parse(model) if all(self._has_rank(vi) for vi in self.inputs
                                                      if _is_tensor(vi)) else None

    def _static_key(self) -> tuple:
        return tuple(tuple(_static_dims(vi)) if _is_tensor(vi) else None for vi in self.inputs)

    @staticmethod
    def _has_rank(vi) -> bool:
        return vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")

    @staticmethod
    def _parse(model):
        from kiln.onnx.parser import parse
        return parse(model)

    def _context_for(self, shapes: tuple[tuple[int, ...], ...]):
        ctx = self._contexts.get(shapes)
        if ctx is not None:
            return ctx
        from kiln.builder.build import build
        from kiln.builder.config import BuildConfig
        network = self._network
        profile = None
        if network is None:
            if self._static:
                network = self._parse(self.model)
            else:
                # inputs without a declared rank: pin their shapes in a copy of the model
                model = copy.deepcopy(self.model)
                by_name = {vi.name: vi for vi in model.graph.input}
                for vi, shape in zip(self.inputs, shapes):
                    target = by_name[vi.name]
                    if shape is not None and not self._has_rank(target) and _is_tensor(target):
                        for d in shape:
                            target.type.tensor_type.shape.dim.add().dim_value = int(d)
                network = self._parse(model)
        if not self._static:
            profile = {vi.name: tuple(s) for vi, s in zip(self.inputs, shapes)
                       if _is_tensor(vi) and any(not isinstance(d, int) for d in (network.tensors[vi.name].shape or ()))}
        config = BuildConfig(device=self.device, profiles=profile or None,
                             optimization_level=int(self.build_options.get("optimization_level", 0)),
                             precision=self.build_options.get("precision", "fp32"))
        engine = build(network, config)
        ctx = engine.context()
        self._contexts[shapes] = ctx
        return ctx

    def run(self, inputs: Any, **kwargs: Any) -> tuple[Any, ...]:
        """Run on ``inputs`` (a list in graph-input order, a dict by name, or one array)."""
        if isinstance(inputs, dict):
            feeds = {k: _feed(v) for k, v in inputs.items()}
        else:
            if isinstance(inputs, np.ndarray) or not isinstance(inputs, (list, tuple)):
                inputs = [inputs]
            if len(inputs) != len(self.inputs):
                raise KilnError(f"The model takes {len(self.inputs)} inputs "
                                f"({', '.join(vi.name for vi in self.inputs)}); got {len(inputs)}.")
            feeds = {vi.name: _feed(v) for vi, v in zip(self.inputs, inputs)}
        if self._static:
            ctx = self._context_for(self._static_key())
        else:
            ctx = self._context_for(tuple(tuple(int(d) for d in feeds[vi.name].shape)
                                          if _is_tensor(vi) and vi.name in feeds else None for vi in self.inputs))
        # torch in, torch out: the backend does the numpy conversions itself (narrow types included)
        feeds = {k: _to_torch(v) for k, v in feeds.items()}
        results = ctx.run(feeds)
        return tuple(_to_numpy(results[n], self.output_types.get(n)) for n in self.output_names)


class KilnBackend(Backend):
    """``onnx.backend.base.Backend`` for Kiln (the class methods the ONNX test runner calls)."""

    @classmethod
    def is_compatible(cls, model, device: str = "CPU", **kwargs: Any) -> bool:
        return True

    @classmethod
    def prepare(cls, model, device: str = "CPU", **kwargs: Any) -> KilnRep:
        """Check and parse ``model`` and build its engine for ``device`` ("CPU" or "CUDA")."""
        import onnx
        if isinstance(model, (bytes, bytearray)):
            model = onnx.load_from_string(bytes(model))
        elif isinstance(model, str):
            model = onnx.load(model)
        _check_model(model)
        return KilnRep(model, _kiln_device(device), **kwargs)

    @classmethod
    def run_model(cls, model, inputs: Any, device: str = "CPU", **kwargs: Any) -> tuple[Any, ...]:
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def run_node(cls, node, inputs: Sequence[Any], device: str = "CPU", outputs_info=None,
                 **kwargs: Any) -> tuple[Any, ...]:
        """Run one node: wrap it in a model whose input types come from ``inputs``."""
        from onnx import helper
        from onnx.helper import np_dtype_to_tensor_dtype
        arrays = [np.asarray(x) for x in inputs]
        ins = [helper.make_tensor_value_info(name, np_dtype_to_tensor_dtype(a.dtype), a.shape)
               for name, a in zip(node.input, arrays)]
        if outputs_info is not None:
            outs = [helper.make_tensor_value_info(name, np_dtype_to_tensor_dtype(np.dtype(dt)), shape)
                    for name, (dt, shape) in zip(node.output, outputs_info)]
        else:
            outs = [helper.make_empty_tensor_value_info(name) for name in node.output]
        graph = helper.make_graph([node], "run_node", ins, outs)
        opset = kwargs.pop("opset_version", None)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)] if opset else None)
        if outputs_info is None:        # output types from ONNX's own inference (the checker wants them)
            import onnx
            inferred = onnx.shape_inference.infer_shapes(model)
            types = {vi.name: vi.type for vi in list(inferred.graph.value_info) + list(inferred.graph.output)
                     if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type}
            for vi in model.graph.output:
                if vi.name in types:
                    vi.type.CopyFrom(types[vi.name])
        return cls.run_model(model, arrays, device, **kwargs)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        try:
            kind = _kiln_device(device)
        except KilnError:
            return False
        if kind == "cuda":
            import torch
            return torch.cuda.is_available()
        return True


# The ONNX test runner takes the backend as a module or class with these names.
prepare = KilnBackend.prepare
run_model = KilnBackend.run_model
run_node = KilnBackend.run_node
supports_device = KilnBackend.supports_device
is_compatible = KilnBackend.is_compatible
