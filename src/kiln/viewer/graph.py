"""The one small view graph that every format reader produces.

Readers in ``kiln.viewer.formats`` turn a file into a :class:`ViewModel`; layout,
the web app and headless export only ever see this structure.
NOTE: this module must not import torch, onnx or any format library.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

# Node categories drive colours in the page and in exports.
CATEGORIES = (
    "conv", "activation", "normalization", "pooling", "shape", "tensor",
    "elementwise", "matmul", "reduce", "control", "plugin", "data", "quantization",
    "recurrent", "attention", "custom", "other",
)


@dataclass
class ViewTensor:
    """A value flowing along an edge (or a graph input/output)."""

    name: str
    shape: list[int | str | None] | None = None
    dtype: str | None = None
    quantization: dict[str, Any] | None = None   # scale/zero_point etc. where the format has them
    doc: str | None = None


@dataclass
class ViewWeight:
    """A stored tensor (initializer); values are read only when asked for."""

    name: str
    shape: list[int] | None
    dtype: str | None
    load: Callable[[], Any] | None = None   # returns a numpy array on demand
    nbytes: int | None = None


@dataclass
class ViewArgument:
    """One named input or output slot of a node, holding zero or more tensor names."""

    name: str
    values: list[str] = field(default_factory=list)


@dataclass
class ViewNode:
    id: str
    name: str
    op_type: str
    category: str = "other"
    attributes: dict[str, Any] = field(default_factory=dict)
    inputs: list[ViewArgument] = field(default_factory=list)
    outputs: list[ViewArgument] = field(default_factory=list)
    group: tuple[str, ...] = ()           # name-scope path, outermost first
    subgraphs: dict[str, "ViewGraph"] = field(default_factory=dict)   # If/Loop bodies
    doc: str | None = None
    overlay: dict[str, Any] = field(default_factory=dict)   # engine facts: origin, precision, tactic, time_ms
    properties: dict[str, Any] = field(default_factory=dict)   # extra facts for the sidebar (domain, version)


@dataclass
class ViewGraph:
    name: str
    nodes: list[ViewNode] = field(default_factory=list)
    inputs: list[ViewTensor] = field(default_factory=list)
    outputs: list[ViewTensor] = field(default_factory=list)
    tensors: dict[str, ViewTensor] = field(default_factory=dict)   # every named value, by name
    weights: dict[str, ViewWeight] = field(default_factory=dict)   # initializers, by tensor name


@dataclass
class ViewModel:
    format: str                                   # "ONNX", "Kiln engine", "Keras", ...
    path: str | None = None
    producer: str | None = None
    version: str | None = None                    # e.g. "opset 17"
    properties: dict[str, Any] = field(default_factory=dict)
    graphs: list[ViewGraph] = field(default_factory=list)   # first is the main graph
    file_size: int | None = None
    warnings: list[str] = field(default_factory=list)   # one line each: what the page and `kiln view` warn of

    @property
    def graph(self) -> ViewGraph:
        return self.graphs[0]
