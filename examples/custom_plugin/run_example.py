"""Build the example with the plugin, then load and run the engine in a fresh process.

    python run_example.py [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))

CHILD = r"""
import sys, numpy as np
sys.path.insert(0, {here!r})
import swish_plugin                     # the user registers the plugin; the engine file only names it
import kiln
x = np.random.default_rng(1).standard_normal((2, 3, 16, 16)).astype(np.float32)
y = kiln.load({engine!r}).context().run({{"x": x}})["y"]
np.save({out!r}, y)
np.save({inp!r}, x)
"""


def reference(x: np.ndarray, w: np.ndarray, beta: float) -> np.ndarray:
    """numpy: 3x3 conv (pad 1), swish-beta, global average pool."""
    n, c, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros((n, w.shape[0], h, wd), np.float64)
    for i in range(3):
        for j in range(3):
            out += np.einsum("nchw,oc->nohw", xp[:, :, i:i + h, j:j + wd], w[:, :, i, j])
    s = out / (1 + np.exp(-beta * out))
    return s.mean(axis=(2, 3), keepdims=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--workdir", default=HERE)
    args = ap.parse_args()
    sys.path.insert(0, HERE)
    import onnx

    import kiln
    import make_model
    import swish_plugin  # noqa: F401  (registers SwishBeta)
    model = make_model.make(os.path.join(args.workdir, "model.onnx"))
    engine_path = os.path.join(args.workdir, "swish.kiln")
    network = kiln.onnx.parse(model)
    engine = kiln.build(network, kiln.BuildConfig(device=args.device,
                                                  profiles={"x": ((1, 3, 16, 16), (2, 3, 16, 16), (4, 3, 16, 16))}))
    engine.save(engine_path)
    print(f"built {engine_path}: " + ", ".join(f"{layer['name']} [{layer['kind']}]" for layer in engine.layers))
    out, inp = os.path.join(args.workdir, "y.npy"), os.path.join(args.workdir, "x.npy")
    code = CHILD.format(here=HERE, engine=engine_path, out=out, inp=inp)
    subprocess.run([sys.executable, "-c", code], check=True)
    y, x = np.load(out), np.load(inp)
    w = onnx.numpy_helper.to_array(onnx.load(model).graph.initializer[0])
    err = float(np.abs(y - reference(x, w, 1.7)).max())
    print(f"fresh process loaded the engine and ran it; max abs error vs numpy: {err:.2e}")
    return 0 if err < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
