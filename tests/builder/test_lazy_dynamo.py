"""kiln.builder.lazy_dynamo: meta-tensor evaluation inside ``dynamo_deferred`` does not import
torch._dynamo, gives the shapes and dtypes torch's CPU kernels give, and leaves torch's wrappers as it
found them (the real dynamo-disabled kernel is built once torch._dynamo is imported). Run in a fresh
interpreter: the test session may have imported torch._dynamo already."""
from __future__ import annotations

import subprocess
import sys

_SCRIPT = r'''
import sys
import torch
import torch.nn.functional as F
from kiln.builder import lazy_dynamo as L

ops = {
    "relu": lambda x, w: torch.relu(x), "add": lambda x, w: x + x, "mul": lambda x, w: x * 2,
    "gelu": lambda x, w: F.gelu(x), "softmax": lambda x, w: torch.softmax(x, -1),
    "layer_norm": lambda x, w: F.layer_norm(x, (6,)), "conv": lambda x, w: F.conv2d(x, w, padding=1),
    "where": lambda x, w: torch.where(x > 0, x, -x), "mean": lambda x, w: x.mean(-1),
    "cat": lambda x, w: torch.cat([x, x], 1), "half": lambda x, w: torch.exp(x.half()),
    "hardswish": lambda x, w: F.hardswish(x), "pow_int": lambda x, w: torch.pow(x.long(), 2),
}
assert "torch._dynamo" not in sys.modules
real_x, real_w = torch.randn(2, 8, 6, 6), torch.randn(4, 8, 3, 3)
want = {k: (tuple(f(real_x, real_w).shape), f(real_x, real_w).dtype) for k, f in ops.items()}
wrapped = L._disable_wrapped()
assert len(wrapped) > 50, len(wrapped)

def stand_ins():
    return [fn for fn, _ in wrapped if isinstance(fn.__dict__.get(L._CACHE), L._Deferred)]

meta_x, meta_w = torch.empty(2, 8, 6, 6, device="meta"), torch.empty(4, 8, 3, 3, device="meta")
with L.dynamo_deferred():
    assert stand_ins()
    got = {k: (tuple(f(meta_x, meta_w).shape), f(meta_x, meta_w).dtype) for k, f in ops.items()}
    assert "torch._dynamo" not in sys.modules, "a meta kernel imported torch._dynamo"
assert got == want, (got, want)
assert not stand_ins(), "stand-ins left in torch's wrappers"

with L.dynamo_deferred():
    import torch._dynamo
    torch.relu(meta_x)
built = [fn for fn, _ in wrapped if fn.__dict__.get(L._CACHE) is not None]
assert built and not stand_ins(), "the real dynamo-disabled kernel was not built once dynamo was imported"
with L.dynamo_deferred():             # dynamo imported: nothing placed
    assert not stand_ins()
    torch.add(meta_x, meta_x)
print("ok")
'''


def test_meta_kernels_without_dynamo_import() -> None:
    r = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr[-3000:]
