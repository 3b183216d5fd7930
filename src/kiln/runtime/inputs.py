"""Engine inputs for running and timing engines (`kiln run`, `kiln bench`, kiln.bench): default shapes, seeded random
data, output summaries."""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

from kiln.errors import KilnError


def default_shape(engine: Any, spec: dict[str, Any]) -> tuple[int, ...]:
    """The shape of input ``spec`` when none is given: its profile's opt shape, else its static shape."""
    for p in engine.profiles:
        if spec["name"] in p:
            return tuple(p[spec["name"]]["opt"])
    dims = spec["shape"] or []
    if any(not isinstance(d, int) for d in dims):
        raise KilnError(f"Input {spec['name']!r} has dynamic shape {dims}; give --shapes {spec['name']}:DIMS.")
    return tuple(dims)


def random_input(rng: Any, dtype: str, shape: Sequence[int]) -> Any:
    """A seeded random array of ``dtype`` and ``shape`` (an ndarray also for shape ())."""
    import numpy as np

    from kiln.ir.dtypes import np_dtype
    need = math.prod(shape) * 8                 # the generator's float64/int64 draw
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        free = None
    if free is not None and need > free:
        raise KilnError(f"A random input of shape {tuple(shape)} needs {need / 2**30:.1f} GiB, more than the "
                        f"{free / 2**30:.1f} GiB of free memory; give smaller --shapes or the data with --input.")
    try:
        if dtype == "bool":
            return np.asarray(rng.random(shape) > 0.5)
        if dtype.startswith(("int", "uint")):
            return np.asarray(rng.integers(0, 16, size=shape)).astype(np_dtype(dtype))
        return np.asarray(rng.standard_normal(shape)).astype(np_dtype(dtype))
    except MemoryError:
        raise KilnError(f"A random input of shape {tuple(shape)} ({need / 2**30:.1f} GiB) could not be allocated; "
                        f"give smaller --shapes or the data with --input.") from None


def summary(name: str, arr: Any) -> str:
    """One line about a tensor: dtype, shape and value statistics (non-finite values counted apart)."""
    import numpy as np
    a = np.asarray(arr)
    head = f"{name}: {a.dtype} {list(a.shape)}"
    if a.size == 0:
        return head + " (empty)"
    if a.dtype.kind == "c":                    # complex outputs (DFT/STFT): summarize the magnitudes
        a = np.abs(a)
        head += " |z|"
    if a.dtype.kind == "f" or a.dtype.name == "bfloat16":
        f = a.astype(np.float64)
        fin = f[np.isfinite(f)]
        stats = (f" min {fin.min():.6g} max {fin.max():.6g} mean {fin.mean():.6g} std {fin.std():.6g}"
                 if fin.size else "")
        bad = int(f.size - fin.size)
        return head + stats + (f" non-finite {bad}" if bad else "")
    if a.dtype.kind in "iub":
        return head + f" min {a.min()} max {a.max()}"
    return head
