"""The plugin contract: what a custom layer declares so the engine can carry it.

A plugin is a class with a name, namespace and version, typed fields (its
attributes, serialized into the engine as JSON), a shape/dtype rule for its
outputs, and one implementation per tactic. The engine file stores only the
record ``(name, namespace, version, fields)``; loading re-creates the plugin
through the registry, never by importing code the file names.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

from kiln.errors import PluginError

_REQUIRED = object()
_INIT_LOCK = threading.RLock()
_FIELD_TYPES = (bool, int, float, str, list)


@dataclass(frozen=True)
class TensorDesc:
    """What a plugin knows about an input or output before any data exists."""

    shape: tuple[int | str | None, ...]   # str = symbolic dimension, None = unknown
    dtype: str                             # numpy-style name: "float32", "float16", "int64", ...
    layout: str = "linear"                 # "linear" (row-major) or "channels_last"

    @property
    def rank(self) -> int:
        return len(self.shape)


@dataclass(frozen=True)
class Field:
    """A typed plugin attribute; ``default`` omitted means the field is required."""

    type: type
    default: Any = _REQUIRED
    doc: str = ""
    choices: tuple | None = None

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED


def field(type_: type, default: Any = _REQUIRED, doc: str = "", choices: Sequence | None = None) -> Any:
    """Declare a plugin field: ``mode: str = field(str, "avg", choices=("avg", "max"))``."""
    if type_ not in _FIELD_TYPES:
        raise PluginError(f"Plugin field type {type_.__name__} is not serializable; use bool, int, float, str or list.")
    return Field(type_, default, doc, tuple(choices) if choices is not None else None)


def _check(plugin: str, name: str, spec: Field, value: Any) -> Any:
    if spec.type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if spec.type is list and isinstance(value, tuple):
        value = list(value)
    if spec.type is int and isinstance(value, bool) or not isinstance(value, spec.type):
        raise PluginError(
            f"Plugin {plugin!r} field {name!r} must be {spec.type.__name__}, got {type(value).__name__} {value!r}; "
            f"pass a {spec.type.__name__}.")
    if spec.choices is not None and value not in spec.choices:
        raise PluginError(f"Plugin {plugin!r} field {name!r} must be one of {list(spec.choices)}, got {value!r}.")
    return value


class Plugin:
    """Base class of every plugin. Subclass, declare fields, register.

    Subclasses set ``name``, ``namespace``, ``version``; declare fields as class
    attributes made with :func:`field`; implement :meth:`output_descs` and
    :meth:`forward`. ``tactics`` lists the implementations per device kind, fastest
    guess first; the builder may time them and keeps the winner.
    """

    name: ClassVar[str] = ""
    namespace: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    # Let this plugin replace Kiln's built-in converter for an ONNX op of the same name.
    overrides_builtin: ClassVar[bool] = False
    tactics: ClassVar[dict[str, tuple[str, ...]]] = {"cpu": ("torch",), "cuda": ("torch",)}
    # True when output shapes depend on input values (e.g. NonMaxSuppression): such a
    # layer allocates its outputs itself and cannot be captured in a CUDA graph.
    data_dependent_shapes: ClassVar[bool] = False
    fields: ClassVar[dict[str, Field]] = {}

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        specs: dict[str, Field] = {}
        for base in reversed(cls.__mro__[1:]):
            specs.update(getattr(base, "fields", {}) or {})
        for key, value in list(vars(cls).items()):
            if isinstance(value, Field):
                specs[key] = value
        cls.fields = specs

    def __init__(self, **values: Any) -> None:
        unknown = sorted(set(values) - set(self.fields))
        if unknown:
            raise PluginError(f"Plugin {self.key_str()} has no field {unknown[0]!r}; its fields are {sorted(self.fields)}.")
        for key, spec in self.fields.items():
            if key in values:
                setattr(self, key, _check(self.name, key, spec, values[key]))
            elif spec.required:
                raise PluginError(f"Plugin {self.key_str()} needs field {key!r} ({spec.type.__name__}); set it as a node attribute.")
            else:
                setattr(self, key, list(spec.default) if isinstance(spec.default, list) else spec.default)

    @classmethod
    def onnx_fields(cls, attrs: dict[str, Any], opset: int) -> dict[str, Any]:
        """Field values from an ONNX node's attributes (arrays as lists, ``plugin_*`` keys removed) at
        ``opset``. The attributes are the fields by default; a plugin whose names, defaults or
        versions differ from ONNX's overrides this."""
        return attrs

    # ---- identity and serialization -------------------------------------------------
    @classmethod
    def key(cls) -> tuple[str, str, str]:
        return (cls.name, cls.namespace, str(cls.version))

    @classmethod
    def key_str(cls) -> str:
        ns = f"{cls.namespace}::" if cls.namespace else ""
        return f"{ns}{cls.name} v{cls.version}"

    def field_values(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.fields}

    def record(self) -> dict[str, Any]:
        """The JSON record an engine stores for this plugin instance."""
        return {"name": self.name, "namespace": self.namespace, "version": str(self.version),
                "fields": self.field_values()}

    # ---- the contract -----------------------------------------------------------------
    def output_descs(self, inputs: list[TensorDesc]) -> list[TensorDesc]:
        """Output shapes (symbolic dims allowed) and dtypes from input descriptions."""
        raise NotImplementedError(f"Plugin {self.key_str()} must implement output_descs().")

    def supports(self, index: int, desc: TensorDesc, num_inputs: int) -> bool:
        """Whether input/output ``index`` (inputs first, then outputs) may take this dtype/layout."""
        return desc.layout == "linear" and desc.dtype in ("float32", "float16", "bfloat16", "int32", "int64", "bool")

    def workspace_size(self, inputs: list[TensorDesc]) -> int:
        """Scratch bytes the GPU path needs; the runtime hands it a buffer of this size."""
        return 0

    def configure(self, inputs: list[TensorDesc], outputs: list[TensorDesc]) -> None:
        """Called with the concrete input and output descriptions before the layer first runs a new
        input shape (in an execution context, or when the builder times the layer), after
        :meth:`initialize`. Check or precompute per-shape state here; raise PluginError to refuse."""

    def initialize(self) -> None:
        """Called once per plugin instance before it first runs (each execution context has its own
        instances; the builder's instance is initialized before it is timed). Allocate constants here."""

    def ensure_initialized(self) -> None:
        """Run :meth:`initialize` if this instance has not run it yet (thread-safe; the runtime calls this)."""
        if self.__dict__.get("_initialized"):
            return
        with _INIT_LOCK:
            if not self.__dict__.get("_initialized"):
                self.initialize()
                self.__dict__["_initialized"] = True

    def forward(self, inputs: list[Any], outputs: list[Any], workspace: Any, tactic: str) -> list[Any] | None:
        """Compute the layer. Write into ``outputs`` (pre-allocated torch tensors on the
        inputs' device; no allocation or synchronization on the GPU path, so CUDA-graph
        replay works). Plugins with ``data_dependent_shapes`` get ``outputs=None`` and
        return new tensors instead."""
        raise NotImplementedError(f"Plugin {self.key_str()} must implement forward().")

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.field_values().items())
        return f"{type(self).__name__}({fields})"


def describe_fields(cls: type[Plugin]) -> list[dict[str, Any]]:
    """Fields as plain dicts, for `kiln plugins` and the viewer."""
    out = []
    for key, spec in cls.fields.items():
        out.append({"name": key, "type": spec.type.__name__,
                    "default": None if spec.required else spec.default,
                    "required": spec.required, "doc": spec.doc,
                    "choices": list(spec.choices) if spec.choices else None})
    return out


