"""`kiln compare`: the same inputs through Kiln and ONNX Runtime, outputs diffed (Polygraphy's run --onnxrt)."""
from __future__ import annotations

import numpy as np

from kiln.errors import KilnError


def compare(model: str, engine_path: str | None = None, device: str | None = None,
            shapes: dict[str, tuple[int, ...]] | None = None, rtol: float | None = None, atol: float | None = None,
            fp16: bool = False, seed: int = 0) -> int:
    try:
        import onnxruntime as ort
    except ImportError:
        raise KilnError("kiln compare needs onnxruntime; pip install onnxruntime.") from None
    import kiln
    shapes = shapes or {}
    if engine_path:
        engine = kiln.load(engine_path)
    else:
        net = kiln.onnx.parse(model)
        prof = {t.name: shapes[t.name] for t in net.inputs if t.name in shapes}
        engine = kiln.build(net, kiln.BuildConfig(precision="fp16" if fp16 else "fp32", device=device,
                                                  profiles=prof or None))
    rng = np.random.default_rng(seed)
    from kiln.cli import _default_shape, _random
    feeds = {}
    for spec in engine.inputs:
        shape = shapes.get(spec["name"]) or _default_shape(engine, spec)
        feeds[spec["name"]] = _random(rng, spec["dtype"], shape)
    ours = engine.context().run(feeds)
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    theirs = dict(zip(names, sess.run(None, feeds)))
    low = engine.precision in ("fp16", "bf16")
    rtol = rtol if rtol is not None else (1e-2 if low else 1e-4)
    atol = atol if atol is not None else (1e-2 if low else 1e-5)
    ok = True
    for name in names:
        a, b = np.asarray(ours[name], np.float64), np.asarray(theirs[name], np.float64)
        if a.shape != b.shape:
            print(f"{name}: shape {a.shape} vs ONNX Runtime {b.shape}  MISMATCH")
            ok = False
            continue
        diff = np.abs(a - b)
        rel = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
        good = bool(np.all(diff <= atol + rtol * np.abs(b)))
        ok &= good
        print(f"{name}: {list(a.shape)} max abs {diff.max() if diff.size else 0:.3e} rel L2 {rel:.3e}  "
              f"{'OK' if good else 'MISMATCH'} (rtol {rtol:g}, atol {atol:g})")
    return 0 if ok else 1
