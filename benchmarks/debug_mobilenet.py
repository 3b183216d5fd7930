"""Localize a wrong FP16 result: build MobileNetV3 at opt level 0/3, with and without CUDA graphs,
and compare each against the FP32 torch output; then per layer, eager FP16 vs FP32 engine."""
import sys, os, numpy as np, torch, torchvision, kiln
torch.manual_seed(0)
m = torchvision.models.mobilenet_v3_large().eval()
x = torch.randn(1, 3, 224, 224)
torch.onnx.export(m, (x,), "/tmp/mnv3.onnx", input_names=["input"], opset_version=17, dynamo=False)
ref = m(x).detach().numpy()
rel = lambda a, b: float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))
for lvl in (0, 3):
    for prec in ("fp32", "fp16"):
        e = kiln.build(kiln.onnx.parse("/tmp/mnv3.onnx"), kiln.BuildConfig(device="cuda", precision=prec,
                                                                             profiles={"input": (1, 3, 224, 224)}, optimization_level=lvl))
        for g in (False, True):
            out = list(e.context(cuda_graph=g).run({"input": x.numpy()}).values())[0]
            print(f"level {lvl} {prec} graph {g}: relL2 {rel(out, ref):.2e}  tactics "
                  f"{sorted(set(l['kind'] + ':' + l['tactic'] for l in e.layers))}", flush=True)
