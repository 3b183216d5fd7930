"""The builder's 8-bit tactic policy (kiln/builder/tactics.py): at the default optimization level an 8-bit layer
is also timed on the alternative tile tables and the TMA kernel, where its default table is slow enough to be
worth their compiles; every extra is judged against the first candidate's outputs."""
from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
from test_int8_kernels import _attrs

import kiln.builder.tactics as bt
from kiln.builder.config import BuildConfig
from kiln.builder.timing_cache import TimingCache
from kiln.kernels import KernelContext, tactics_for
from kiln.triton_support import HAS_TRITON


def _offered(kind: str, attrs: dict, level: int, codes: str = "int8") -> tuple[list[str], list[str]]:
    ctx = KernelContext(device="cuda", input_dtypes=(codes, codes, "int32"))
    timed, extras = bt.candidates(kind, tactics_for(kind, attrs, ctx), level)
    return [c.name for c in timed], [c.name for c in extras]


@pytest.mark.skipif(not HAS_TRITON, reason="the Triton tactics are offered only with Triton installed")
def test_8bit_layers_offer_their_tile_tables_and_the_tma_kernel_from_the_default_level(monkeypatch):
    import kiln.kernels.int8_tma as it
    monkeypatch.setattr(it, "hopper", lambda: True)
    fc = _attrs(np.ones(4, np.float32), to="int8", out_scale=0.1)
    base = ["triton_int8", "reference", "int_mm"]
    extra = ["triton_int8_wide", "triton_int8_small", "triton_int8_tma", "triton_int8_tma_persistent"]
    assert bt.EIGHT_BIT_LEVEL == BuildConfig().optimization_level       # the policy applies to default builds
    assert _offered("QFullyConnected", fc, 3) == (base, extra)
    assert _offered("QFullyConnected", fc, 2) == (base, [])             # below the default level: the default table
    assert _offered("QFullyConnected", fc, 4) == (base[:1] + extra[:2] + base[1:2] + extra[2:] + base[2:], [])
    fp8 = _offered("QFullyConnected", fc, 3, "float8_e4m3fn")
    assert fp8 == (["triton_fp8", "reference", "scaled_mm"],
                   ["triton_fp8_wide", "triton_fp8_small", "triton_fp8_tma", "triton_fp8_tma_persistent"])
    conv3 = {**fc, "stride": [1, 1], "pads": [1, 1, 1, 1], "dilation": [1, 1], "groups": 1}
    assert _offered("QConvolution", conv3, 3) == (["triton_int8", "reference"], extra[:3])    # not persistent
    monkeypatch.setattr(it, "hopper", lambda: False)
    assert _offered("QFullyConnected", fc, 3) == (base, extra[:2])     # no TMA before compute capability 9.0
    # float layers keep their alternative tables for levels 4-5
    conv = {"stride": [1, 1], "pads": [1, 1, 1, 1], "dilation": [1, 1], "groups": 1, "activation": None}
    ctx = KernelContext(device="cuda", precision="fp16", input_dtypes=("float16", "float16", "float16"))
    assert bt.candidates("Convolution", tactics_for("Convolution", conv, ctx), 3)[1] == []


class _Fake:
    """A tactic that returns ``x * factor`` after ``sleep_s``, or raises; counts its makes."""

    def __init__(self, name: str, factor: float = 2.0, sleep_s: float = 0.0, broken: bool = False) -> None:
        self.name, self.factor, self.sleep_s, self.broken, self.makes = name, factor, sleep_s, broken, 0

    def make(self, attrs, ctx):
        self.makes += 1

        def run(x):
            if self.broken:
                raise RuntimeError("not on these shapes")
            if self.sleep_s:
                time.sleep(self.sleep_s)
            return (x * self.factor,)
        return run


def _layer():
    x = SimpleNamespace(name="x", is_constant=True, value=np.arange(64, dtype=np.float32).reshape(8, 8),
                        producer=None)
    return SimpleNamespace(kind="QFullyConnected", attrs={}, precision="fp32", name="fc", inputs=[x],
                           outputs=[SimpleNamespace(dtype="float32")])


def test_extras_are_timed_where_the_layer_is_slow_and_judged_by_the_first_candidate(monkeypatch):
    monkeypatch.setattr(bt, "EIGHT_BIT_EXTRA_MS", 1.0)

    def times(base_sleep: float, cache: TimingCache):
        first, second = _Fake("first", sleep_s=base_sleep), _Fake("second", sleep_s=base_sleep)
        extras = [_Fake("good"), _Fake("wrong", factor=3.0), _Fake("broken", broken=True)]
        got = bt._layer_times(_layer(), [first, second], {}, "cpu", "cpu0", cache, 3, extras)
        return got, [first, second, *extras]

    fast, _ = times(0.0, TimingCache())
    assert set(fast) == {"first", "second"}                      # under the threshold: no extra is compiled
    cache = TimingCache()
    slow, fakes = times(0.003, cache)
    assert set(slow) == {"first", "second", "good", "wrong", "broken"}
    assert slow["first"] >= 3.0 and slow["good"] < slow["first"]
    assert slow["wrong"] == slow["broken"] == float("inf")     # a wrong answer or a failure is no tactic
    assert [f.makes for f in fakes] == [1, 1, 1, 1, 1]
    # all cached: nothing runs again
    again, fakes = times(0.003, cache)
    assert again == slow and [f.makes for f in fakes] == [0, 0, 0, 0, 0]
    # the candidates cached (a level-2 build), the extras not: the first candidate runs again to judge them
    cache = TimingCache()
    bt._layer_times(_layer(), [_Fake("first", sleep_s=0.003), _Fake("second", sleep_s=0.003)], {}, "cpu", "cpu0",
                    cache, 3)
    partial, fakes = times(0.003, cache)
    assert [f.makes for f in fakes] == [1, 0, 1, 1, 1]
    assert partial["wrong"] == float("inf") and np.isfinite(partial["good"])


@pytest.mark.gpu
def test_gpu_default_level_times_every_8bit_table_of_a_large_layer():
    """BERT's FFN1 (16384 tokens) as an int8 QFullyConnected at the default level on the GPU: the default
    candidates, then (the layer takes well over the threshold) the wide and small tables and, on Hopper, both
    TMA tactics; each agrees with the first candidate (finite time)."""
    import torch
    ws = np.full(3072, 2e-4, np.float32)
    attrs = _attrs(ws, to="int8", out_scale=0.02, activation="relu")
    rng = np.random.default_rng(0)
    w = SimpleNamespace(name="w", is_constant=True, value=rng.integers(-127, 128, (3072, 768)).astype(np.int8))
    b = SimpleNamespace(name="b", is_constant=True, value=rng.integers(-5000, 5000, 3072).astype(np.int32))
    x = SimpleNamespace(name="x", is_constant=False, producer=None)
    layer = SimpleNamespace(kind="QFullyConnected", attrs=attrs, precision="fp16", name="ffn1", inputs=[x, w, b],
                            outputs=[SimpleNamespace(dtype="int8")])
    ctx = KernelContext(device="cuda", input_dtypes=("int8", "int8", "int32"))
    cands, extras = bt.candidates("QFullyConnected", tactics_for("QFullyConnected", attrs, ctx), 3)
    hopper = torch.cuda.get_device_capability() >= (9, 0)
    assert {"triton_int8_wide", "triton_int8_small"} <= {c.name for c in extras}
    assert ("triton_int8_tma" in {c.name for c in extras}) == hopper
    vals = {"x": torch.empty((16384, 768), dtype=torch.int8, device="meta")}       # 128 sequences of 128
    times = bt._layer_times(layer, cands, vals, "cuda", "gpu", TimingCache(), 10, extras)
    assert set(times) == {c.name for c in cands + extras}
    assert all(np.isfinite(t) for t in times.values()), times
