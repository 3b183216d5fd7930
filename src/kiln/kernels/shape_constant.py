"""ShapeConstant: run the body, a Program over inputs of the layer's input shapes that reads only their shapes
(and the constants the build passes in after them, attrs ``outer``).

The tactic computes the body on every call; the runtime keeps its outputs per input shape
(kiln.runtime.shape_cache), so a run at a shape seen before runs no body layer.
"""
from __future__ import annotations

from kiln.kernels.registry import tactic


@tactic("ShapeConstant")
def make_shape_constant(attrs, ctx):
    body, outer, n_in = attrs["body"], attrs.get("outer") or [], attrs.get("num_inputs")   # None: no outer values

    def run(*xs):
        return tuple(body.run_env(dict(zip(outer, xs[n_in:])), list(xs[:n_in])))
    return run
