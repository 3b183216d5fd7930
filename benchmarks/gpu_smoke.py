"""Quick GPU check of the core paths: build on CUDA (fp32/fp16/bf16), CUDA-graph replay, fusions,
tactic timing; compares with ONNX Runtime on the CPU. Prints one line per case."""
from __future__ import annotations

import io
import math
import os
import sys
import time
import traceback

import numpy as np
import torch

import kiln
from kiln.demo import demo_model


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


class Att(torch.nn.Module):
    def __init__(s, d=64, h=4):
        super().__init__()
        s.h = h
        s.q, s.k, s.v, s.o = (torch.nn.Linear(d, d) for _ in range(4))
        s.ln, s.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        s.ff, s.ff2 = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(s, x, mask):
        B, S, D = x.shape
        h = s.h
        q = s.q(x).view(B, S, h, D // h).transpose(1, 2)
        k = s.k(x).view(B, S, h, D // h).transpose(1, 2)
        v = s.v(x).view(B, S, h, D // h).transpose(1, 2)
        sc = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(D // h)
        sc = sc + (1.0 - mask[:, None, None, :]) * -10000.0
        a = torch.matmul(torch.softmax(sc, -1), v).transpose(1, 2).reshape(B, S, D)
        x = s.ln(x + s.o(a))
        return s.ln2(x + s.ff2(torch.nn.functional.gelu(s.ff(x))))


def case(name, onnx_bytes, feeds, profiles, precision):
    import onnxruntime as ort
    ref = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    t0 = time.perf_counter()
    eng = kiln.build(kiln.onnx.parse(onnx_bytes), kiln.BuildConfig(precision=precision, device="cuda",
                                                                   profiles=profiles))
    bt = time.perf_counter() - t0
    path = f"/tmp/{name}_{precision}.kiln"
    eng.save(path)
    eng = kiln.load(path)
    ctx = eng.context()
    out = list(ctx.run(feeds).values())[0]
    out2 = list(ctx.run(feeds).values())[0]
    tfeeds = {k: torch.from_numpy(v).cuda() for k, v in feeds.items()}
    out3 = list(ctx.run(tfeeds).values())[0].cpu().numpy()
    kinds = sorted({l["kind"] + ":" + str(l["tactic"]) for l in eng.layers})
    print(f"{name:<10} {precision:<5} relL2 {rel(out, ref):.2e} max {np.abs(out - ref).max():.2e} "
          f"replay-same {np.array_equal(out, out2)} torch-io {rel(out3, ref):.1e} graph {ctx.graphs is not None} {ctx.graph_error or ''} {[st.kind for st in ctx.program.steps if st.dynamic]} "
          f"layers {len(eng.layers)} build {bt:.1f}s", flush=True)


def main():
    print(torch.cuda.get_device_name(0), torch.__version__, flush=True)
    rng = np.random.default_rng(0)
    demo = demo_model().SerializeToString()
    x = rng.standard_normal((8, 3, 64, 64)).astype(np.float32)
    for p in ("fp32", "fp16", "bf16"):
        try:
            case("demo", demo, {"input": x}, {"input": ((1, 3, 64, 64), (8, 3, 64, 64), (32, 3, 64, 64))}, p)
        except Exception:
            traceback.print_exc()
    m = Att().eval()
    xx = torch.randn(4, 32, 64)
    mask = torch.ones(4, 32)
    mask[1, 20:] = 0
    for opset in (14, 17):
        f = io.BytesIO()
        torch.onnx.export(m, (xx, mask), f, input_names=["x", "mask"], output_names=["y"], opset_version=opset,
                          dynamo=False, dynamic_axes={"x": {0: "b", 1: "s"}, "mask": {0: "b", 1: "s"}})
        for p in ("fp32", "fp16"):
            try:
                case(f"att{opset}", f.getvalue(), {"x": xx.numpy(), "mask": mask.numpy()},
                     {"x": ((1, 1, 64), (4, 32, 64), (8, 64, 64)), "mask": ((1, 1), (4, 32), (8, 64))}, p)
            except Exception:
                traceback.print_exc()


if __name__ == "__main__":
    sys.exit(main())
