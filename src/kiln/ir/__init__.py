"""The network IR: tensors with symbolic shapes, layers, the layer vocabulary, verification."""
from __future__ import annotations

from kiln.ir.dtypes import ALL_TYPES, dtype_name, np_dtype
from kiln.ir.layers import LAYER_KINDS, LayerKind, define_layer
from kiln.ir.network import Layer, Network, Tensor
from kiln.ir.verify import verify

__all__ = ["ALL_TYPES", "LAYER_KINDS", "Layer", "LayerKind", "Network", "Tensor", "define_layer", "dtype_name",
           "np_dtype", "verify"]
