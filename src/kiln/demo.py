"""`kiln demo`: the whole path on a small built-in model, in seconds, on any machine."""
from __future__ import annotations

import os
import time

import numpy as np


def demo_model(seed: int = 0):
    """A small CNN classifier as an ONNX ModelProto (conv+BN+ReLU blocks, residual, pool, FC, softmax)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def w(name, shape, scale=0.2):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def conv_bn_relu(x, cin, cout, name, stride=1):
        nodes.append(helper.make_node("Conv", [x, w(f"{name}.w", (cout, cin, 3, 3)), w(f"{name}.b", (cout,))],
                                      [f"{name}.conv"], name=f"/{name}/Conv", pads=[1, 1, 1, 1],
                                      strides=[stride, stride]))
        inits.append(numpy_helper.from_array(rng.uniform(0.5, 1.5, cout).astype(np.float32), f"{name}.gamma"))
        inits.append(numpy_helper.from_array(rng.uniform(-0.2, 0.2, cout).astype(np.float32), f"{name}.beta"))
        inits.append(numpy_helper.from_array(rng.uniform(-0.2, 0.2, cout).astype(np.float32), f"{name}.mean"))
        inits.append(numpy_helper.from_array(rng.uniform(0.5, 1.5, cout).astype(np.float32), f"{name}.var"))
        nodes.append(helper.make_node("BatchNormalization", [f"{name}.conv", f"{name}.gamma", f"{name}.beta",
                                                             f"{name}.mean", f"{name}.var"], [f"{name}.bn"],
                                      name=f"/{name}/BatchNormalization"))
        nodes.append(helper.make_node("Relu", [f"{name}.bn"], [f"{name}.out"], name=f"/{name}/Relu"))
        return f"{name}.out"

    x = conv_bn_relu("input", 3, 16, "stem", stride=2)
    y = conv_bn_relu(x, 16, 16, "block1")
    y = conv_bn_relu(y, 16, 16, "block2")
    nodes.append(helper.make_node("Add", [x, y], ["res"], name="/residual/Add"))
    z = conv_bn_relu("res", 16, 32, "down", stride=2)
    nodes.append(helper.make_node("GlobalAveragePool", [z], ["pool"], name="/head/GlobalAveragePool"))
    nodes.append(helper.make_node("Flatten", ["pool"], ["flat"], name="/head/Flatten"))
    nodes.append(helper.make_node("Gemm", ["flat", w("fc.w", (10, 32)), w("fc.b", (10,))], ["logits"],
                                  name="/head/Gemm", transB=1))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], name="/head/Softmax", axis=-1))
    graph = helper.make_graph(nodes, "kiln_demo",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 64, 64])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="kiln-demo")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def run_demo(device: str | None = None, precision: str = "fp32", out_dir: str = ".") -> int:
    import onnx

    import kiln
    os.makedirs(out_dir, exist_ok=True)
    onnx_path = os.path.join(out_dir, "demo.onnx")
    engine_path = os.path.join(out_dir, "demo.kiln")
    onnx.save(demo_model(), onnx_path)
    print(f"1. wrote the example model {onnx_path} (small CNN: conv+BN+ReLU blocks, residual add, pool, FC, softmax)")
    t0 = time.perf_counter()
    network = kiln.onnx.parse(onnx_path)
    config = kiln.BuildConfig(precision=precision, device=device,
                              profiles={"input": ((1, 3, 64, 64), (8, 3, 64, 64), (32, 3, 64, 64))})
    engine = kiln.build(network, config)
    engine.save(engine_path)
    print(f"2. built {engine_path} for {engine.header['device']['name']} ({engine.device}, {precision}) in "
          f"{time.perf_counter() - t0:.2f} s: {len(network.layers)} ONNX-derived layers → {len(engine.layers)} "
          f"engine layers")
    engine = kiln.load(engine_path)
    ctx = engine.context()
    batch = np.random.default_rng(1).standard_normal((8, 3, 64, 64)).astype(np.float32)
    out = ctx.run({"input": batch})["probs"]
    times = []
    for _ in range(20):
        t = time.perf_counter()
        ctx.run({"input": batch})
        times.append((time.perf_counter() - t) * 1e3)
    print(f"3. loaded it back and ran batch 8: median {np.median(times):.3f} ms over 20 runs "
          f"(output {list(out.shape)}, rows sum to {out.sum(1).mean():.4f})")
    try:
        import onnxruntime as ort
        ref = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"]).run(None, {"input": batch})[0]
        err = float(np.abs(out - ref).max())
        tol = 1e-2 if precision != "fp32" else 1e-5
        print(f"4. ONNX Runtime agrees: max abs difference {err:.2e} (tolerance {tol:g})")
        if err > tol:
            print("   MISMATCH: Kiln and ONNX Runtime disagree beyond tolerance.")
            return 1
    except ImportError:
        print("4. (onnxruntime not installed: skipped the cross-check)")
    print("5. the engine's layers (after BatchNorm folding):")
    for layer in engine.layers:
        print(f"   {layer['name']:<28} {layer['kind']:<15} {layer['precision'] or '-':<6} "
              f"from {', '.join(layer['origin']) or '-'}")
    print(f"Next: kiln inspect {engine_path} · kiln run {engine_path} · kiln view {onnx_path} · "
          f"kiln compare {onnx_path} --per-layer")
    return 0
