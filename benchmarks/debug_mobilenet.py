"""Localize a wrong FP16 result: torch fp16 vs fp32, then per layer Kiln FP16 vs Kiln FP32 (eager)."""
import numpy as np, torch, torchvision, kiln
torch.manual_seed(0)
m = torchvision.models.mobilenet_v3_large().eval()
x = torch.randn(1, 3, 224, 224)
torch.onnx.export(m, (x,), "/tmp/mnv3.onnx", input_names=["input"], opset_version=17, dynamo=False)
ref = m(x).detach().numpy()
rel = lambda a, b: float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(np.asarray(b, np.float64)), 1e-30))
mh = m.cuda().half()
print("torch fp16 vs fp32:", rel(mh(x.cuda().half()).float().cpu().detach().numpy(), ref), "ref norm", np.linalg.norm(ref))
e32 = kiln.build(kiln.onnx.parse("/tmp/mnv3.onnx"), kiln.BuildConfig(device="cuda", profiles={"input": (1, 3, 224, 224)}, optimization_level=0))
e16 = kiln.build(kiln.onnx.parse("/tmp/mnv3.onnx"), kiln.BuildConfig(device="cuda", precision="fp16", profiles={"input": (1, 3, 224, 224)}, optimization_level=0))
a = e32.context(cuda_graph=False).run_all({"input": x.numpy()})
b = e16.context(cuda_graph=False).run_all({"input": x.numpy()})
kinds = {l["outputs"][0]: (l["name"], l["kind"], l["attrs"].get("activation")) for l in e16.layers}
n = 0
for name, v in b.items():
    if name in a and a[name].shape == v.shape:
        r = rel(v.astype(np.float32), a[name])
        if r > 1e-2 or n < 3:
            print(f"{name:<50} {kinds.get(name)} relL2 {r:.2e} maxabs32 {np.abs(a[name]).max():.3g} maxabs16 {np.abs(v.astype(np.float32)).max():.3g} nonfinite {int((~np.isfinite(v.astype(np.float32))).sum())}")
            n += 1
            if n > 12:
                break
