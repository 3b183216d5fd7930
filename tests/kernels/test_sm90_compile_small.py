"""The small layout kernels (space-to-depth regrouping, NHWC nearest upsampling, the conv epilogue
writing into a concatenation slice) compile for Hopper (sm_90) without a GPU: the interpreter
forgives what the compiler rejects, so each goes through Triton's real pipeline to a cubin."""
from __future__ import annotations

import textwrap

import pytest

from _sm90_probe import run_probe

_PROBE = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import torch
    from sm90_compile import Recorder, compile_sm90
    import kiln.kernels.conv_s2d as s2d
    import kiln.kernels.epilogue_triton as ep
    import kiln.kernels.resize_triton as rt

    log, names = [], []
    real_s2d, real_ep, real_up = s2d._s2d_kernel, ep._epilogue_kernel, rt._kernel()
    s2d._s2d_kernel = Recorder(real_s2d, log)
    ep._epilogue_kernel = Recorder(real_ep, log)
    rt._kernel = lambda: Recorder(real_up, log)
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        x = torch.zeros(2, 3, 16, 16, dtype=dtype)
        s2d.s2d_input(x, 2, 6, 6, [2, 2, 2, 2], use_triton=True)
        names.append(f"s2d_{dtype}")
        y = torch.zeros(2, 8, 4, 4, dtype=dtype).contiguous(memory_format=torch.channels_last)
        buf = torch.zeros(2, 4, 4, 24, dtype=dtype).permute(0, 3, 1, 2)
        ep.apply_epilogue(y, torch.zeros(8, dtype=dtype), None, "silu", out=buf[:, 8:16])
        names.append(f"epilogue_slice_{dtype}")
        rt.upsample_nearest_nhwc(y, 2, 2)
        names.append(f"upsample_{dtype}")
    out = {}
    for name, (fn, grid, args, kwargs) in zip(names, log):
        out[name] = bool(compile_sm90(fn, args, kwargs).asm["cubin"])
    print(json.dumps(out))
""")


def test_layout_kernels_compile_for_sm90():
    pytest.importorskip("triton")
    out = run_probe(_PROBE)
    assert len(out) == 9 and all(out.values()), out
