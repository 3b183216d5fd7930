"""A served model: an engine, its execution contexts, its v2 metadata and the checks on a request."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from kiln.errors import KilnError
from kiln.ir.dtypes import np_dtype
from kiln.serve.errors import BadRequest

# Kiln dtype -> KServe v2 datatype: the closed table of what the protocol can carry
V2_TYPES = {"bool": "BOOL", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32", "uint64": "UINT64",
            "int8": "INT8", "int16": "INT16", "int32": "INT32", "int64": "INT64", "float16": "FP16",
            "bfloat16": "BF16", "float32": "FP32", "float64": "FP64"}
VERSION = "1"
PLATFORM = "kiln_engine"


@dataclass(frozen=True)
class ModelOptions:
    """How one model is served (the `kiln serve` flags)."""

    batching: bool = True
    max_batch: int | None = None          # rows per merged batch; None: the engine's largest profile batch
    max_queue_delay_us: int = 0           # how long the oldest request may wait for others to join it
    preferred_batch_sizes: tuple[int, ...] = ()
    instances: int = 1                    # execution contexts, each with its own worker (and CUDA stream)
    max_queue: int = 512                  # queued requests per model before new ones get 503 / UNAVAILABLE
    timeout_ms: float | None = 60_000.0   # per request, queue plus compute; a request may ask for less
    warmup: bool = False                  # run every batch size once per instance at load (CUDA graphs)
    buckets: str = "auto"                 # "on": merged batches of power-of-two rows; "auto": on for GPU engines

    def __post_init__(self) -> None:
        for name in ("instances", "max_queue"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise KilnError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
        if self.max_batch is not None and (not isinstance(self.max_batch, int) or self.max_batch < 1):
            raise KilnError(f"max_batch must be a positive integer, got {self.max_batch!r}.")
        if not isinstance(self.max_queue_delay_us, int) or self.max_queue_delay_us < 0:
            raise KilnError(f"max_queue_delay_us must be an integer >= 0, got {self.max_queue_delay_us!r}.")
        if any(not isinstance(p, int) or p < 1 for p in self.preferred_batch_sizes):
            raise KilnError(f"preferred batch sizes must be positive integers, got {self.preferred_batch_sizes!r}.")
        if self.buckets not in ("auto", "on", "off"):
            raise KilnError(f"buckets is 'auto', 'on' or 'off', got {self.buckets!r}.")
        if self.timeout_ms is not None and not (self.timeout_ms > 0 and math.isfinite(self.timeout_ms)):
            raise KilnError(f"timeout_ms must be a positive number of milliseconds, got {self.timeout_ms!r}.")


@dataclass(frozen=True)
class TensorMeta:
    """One input or output as the protocol describes it: name, v2 datatype, shape with -1 for dynamic dims."""

    name: str
    dtype: str                      # Kiln dtype name
    datatype: str                   # v2 datatype
    shape: tuple[int, ...]

    @cached_property
    def np_dtype(self) -> np.dtype:
        return np_dtype(self.dtype)

    @cached_property
    def wire_dtype(self) -> np.dtype:
        """The dtype as the protocol carries it: little-endian."""
        dt = self.np_dtype
        return dt.newbyteorder("<") if dt.byteorder not in "|" else dt

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


def _meta(model: str, spec: dict[str, Any], what: str) -> TensorMeta:
    dtype = spec["dtype"]
    if dtype not in V2_TYPES:
        raise KilnError(f"Model {model!r} {what} {spec['name']!r} is {dtype}, which the KServe v2 protocol cannot "
                        f"carry; serve an engine whose inputs and outputs are numeric tensors.")
    if spec["shape"] is None:
        raise KilnError(f"Model {model!r} {what} {spec['name']!r} has no known rank; rebuild the engine from a model "
                        f"that declares its {what} shapes.")
    return TensorMeta(spec["name"], dtype, V2_TYPES[dtype],
                      tuple(d if isinstance(d, int) and d >= 0 else -1 for d in spec["shape"]))


class ServedModel:
    """An engine behind the protocol: v2 metadata, request checks, and how requests merge into batches.

    A model batches when every input and output has the same symbolic first dimension: requests
    are then concatenated along it and their outputs split back by rows.
    """

    def __init__(self, name: str, engine: Any, options: ModelOptions) -> None:
        self.name = name
        self.engine = engine
        self.options = options
        self.inputs = [_meta(name, s, "input") for s in engine.inputs]
        self.outputs = [_meta(name, s, "output") for s in engine.outputs]
        self._by_name = {t.name: t for t in self.inputs}
        self.input_names = [t.name for t in self.inputs]         # the engine's input order
        self.output_names = [t.name for t in self.outputs]
        self.input_dtypes = {t.name: t.wire_dtype for t in self.inputs}
        self.output_dtypes = {t.name: t.np_dtype for t in self.outputs}
        self.input_layouts: dict = {}                          # kiln.serve.ipc's checked descriptors, by bytes
        self.output_layouts: dict = {}
        self._checked: dict[tuple, tuple[int, tuple]] = {}     # input shapes -> check_request's answer
        self._merged: dict[tuple, bool] = {}                   # (rows, merge key) -> merged_fits
        self._profiles = [p for p in engine.profiles if p]
        firsts = {(s["shape"] or [None])[0] for s in [*engine.inputs, *engine.outputs]}
        self.batch_axis = len(firsts) == 1 and isinstance(next(iter(firsts)), str) and all(
            s["shape"] for s in engine.inputs)
        self.max_batch = self._max_batch() if self.batch_axis and options.batching else 1
        on = options.buckets == "on" or (options.buckets == "auto" and getattr(engine, "device", "cpu") == "cuda")
        # merged batches of these row counts only: a GPU engine then replays a few CUDA graphs instead of
        # recording one per batch size
        self.buckets = tuple(sorted({1 << k for k in range(self.max_batch.bit_length())} | {self.max_batch})) \
            if on and self.max_batch > 1 else ()

    def _max_batch(self) -> int:
        """The merge limit: --max-batch, capped by the largest batch any profile takes."""
        limit = max((min(p[n]["max"][0] for n in self._by_name if n in p) for p in self._profiles
                     if all(n in p for n in self._by_name)), default=None)
        if limit is None:
            return self.options.max_batch or 1
        return min(self.options.max_batch or limit, limit)

    # ---- metadata ----------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "versions": [VERSION], "platform": PLATFORM,
                "inputs": [t.as_dict() for t in self.inputs], "outputs": [t.as_dict() for t in self.outputs]}

    def input(self, name: Any) -> TensorMeta:
        meta = self._by_name.get(name) if isinstance(name, str) else None
        if meta is None:
            raise BadRequest(f"{name!r} is not an input of model {self.name!r}; its inputs are "
                             f"{[t.name for t in self.inputs]}.")
        return meta

    def check_outputs(self, names: list[Any]) -> list[str]:
        """The requested output names (all outputs for an empty list), each checked."""
        if not names:
            return list(self.output_names)
        for n in names:
            if n not in self.output_names:
                raise BadRequest(f"{n!r} is not an output of model {self.name!r}; its outputs are "
                                 f"{self.output_names}.")
        if len(set(names)) != len(names):
            raise BadRequest(f"An output of model {self.name!r} is requested twice; name each output once.")
        return list(names)

    # ---- request checks ------------------------------------------------------------------
    def check_shape(self, meta: TensorMeta, shape: Any) -> tuple[int, ...]:
        """A declared shape as a tuple, checked against the input's rank and fixed dims."""
        if not isinstance(shape, (list, tuple)) or not all(type(d) is int for d in shape):
            raise BadRequest(f"Input {meta.name!r} has shape {shape!r}; a shape is a list of whole numbers.")
        if len(shape) != len(meta.shape):
            raise BadRequest(f"Input {meta.name!r} of model {self.name!r} has rank {len(meta.shape)} "
                             f"(shape {list(meta.shape)}), got shape {list(shape)}.")
        for d, want in zip(shape, meta.shape):
            if d < 0 or (want != -1 and d != want):
                raise BadRequest(f"Input {meta.name!r} of model {self.name!r} must have shape {list(meta.shape)} "
                                 f"(-1: any size), got {list(shape)}.")
        return tuple(shape)

    def fits(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        """True when one optimization profile holds all these input shapes (or the engine has none)."""
        if not self._profiles:
            return True
        return any(all(n not in p or (len(s) == len(p[n]["min"]) and all(
            lo <= d <= hi for lo, d, hi in zip(p[n]["min"], s, p[n]["max"]))) for n, s in shapes.items())
            for p in self._profiles)

    def check_request(self, arrays: dict[str, np.ndarray]) -> tuple[int, tuple]:
        """Checks a whole request: every input given, shapes in one profile. Returns (rows, merge key):
        requests with equal keys may be concatenated along the batch axis."""
        try:
            seen = tuple(arrays[t.name].shape for t in self.inputs)
        except KeyError:
            seen = None
        hit = self._checked.get(seen) if seen is not None else None
        if hit is not None:
            return hit
        answer = self._check_request(arrays)
        if seen is not None:
            _remember(self._checked, seen, answer)
        return answer

    def _check_request(self, arrays: dict[str, np.ndarray]) -> tuple[int, tuple]:
        missing = [t.name for t in self.inputs if t.name not in arrays]
        if missing:
            raise BadRequest(f"Input {missing[0]!r} is missing; model {self.name!r} takes "
                             f"{[t.name for t in self.inputs]}.")
        shapes = {t.name: arrays[t.name].shape for t in self.inputs}
        if not self.fits(shapes):
            ranges = "; ".join(", ".join(f"{n} {tuple(r['min'])}..{tuple(r['max'])}" for n, r in p.items())
                               for p in self._profiles)
            given = ", ".join(f"{n} {s}" for n, s in shapes.items())
            raise BadRequest(f"Input shapes {given} are outside every optimization profile of model "
                             f"{self.name!r} ({ranges}); send shapes inside one profile.")
        if not self.batch_axis:
            return 0, tuple(shapes.values())
        rows = {s[0] for s in shapes.values()}
        if len(rows) != 1:
            raise BadRequest(f"The inputs of model {self.name!r} share their first (batch) dimension, got "
                             f"{', '.join(f'{n} {s}' for n, s in shapes.items())}.")
        return rows.pop(), tuple(s[1:] for s in shapes.values())

    def warmup_feeds(self) -> list[dict[str, np.ndarray]]:
        """Zero inputs at each batch size a merged batch can have (other dims: the first profile's opt)."""
        p = self._profiles[0] if self._profiles else {}
        dims = {t.name: list(p[t.name]["opt"]) if t.name in p else list(t.shape) for t in self.inputs}
        if any(d < 0 for ds in dims.values() for d in ds):
            return []
        sizes = (self.buckets or range(1, self.max_batch + 1)) if self.batch_axis else [None]
        feeds = [{t.name: np.zeros([b, *dims[t.name][1:]] if b else dims[t.name], t.np_dtype) for t in self.inputs}
                 for b in sizes]
        return [f for f in feeds if self.fits({n: a.shape for n, a in f.items()})]

    def merged_fits(self, rows: int, key: tuple) -> bool:
        """Whether ``rows`` rows of requests with merge key ``key`` still make one valid batch."""
        if rows > self.max_batch:
            return False
        hit = self._merged.get((rows, key))
        if hit is None:
            hit = self.fits({t.name: (rows, *rest) for t, rest in zip(self.inputs, key)})
            _remember(self._merged, (rows, key), hit)
        return hit


def _remember(cache: dict, key: Any, value: Any, most: int = 1024) -> None:
    """Keeps ``value`` under ``key``; a full cache starts over (request shapes are few in practice)."""
    if len(cache) >= most:
        cache.clear()
    cache[key] = value
