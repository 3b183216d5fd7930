"""Range engines: a tactic per shape bucket, timed at build, stored in the engine file, picked at run time.

The fastest FullyConnected tactic is forced to differ by batch (two test tactics, ``small`` and
``large``, and a timer that calls ``small`` fastest up to batch 8 and ``large`` above), so the engine
must hold both and run each in its bucket; outputs are checked against ONNX Runtime.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import kiln
from kiln.builder import tactics as tactics_mod
from kiln.builder.buckets import MAX_POINTS, profile_points, timing_points
from kiln.builder.config import Profile
from kiln.engine import read_engine, write_engine
from kiln.errors import EngineFormatError
from kiln.kernels.registry import TACTICS, get_tactic
from kiln.runtime.buckets import BucketTable
from _models import assert_close_fp32, ort_run

PROFILE = {"x": ((1, 16), (4, 16), (64, 16))}
POINTS = [1, 2, 4, 8, 32, 64]       # min 1, opt 4, max 64 and three of the doublings 2, 8, 16, 32
SMALL_UP_TO = 8                     # the forced timer's small/large boundary


def _model(path: Path) -> Path:
    r = np.random.default_rng(0)
    w, b = r.standard_normal((16, 8)).astype(np.float32), r.standard_normal(8).astype(np.float32)
    g = helper.make_graph([helper.make_node("Gemm", ["x", "W", "B"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
                          "fc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
                          [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))
    return path


def _force(monkeypatch, kind: str, wrote: list | None = None) -> list[tuple[str, int]]:
    """Two test tactics for ``kind``, ``small`` and ``large`` (its torch maker under other names), each call of
    any ``kind`` tactic recorded as (tactic, batch) in the list returned; the build's timer finds ``small``
    fastest up to batch SMALL_UP_TO, ``large`` above, and the registry's own tactics slower than both.
    With ``wrote``, ``small`` may write into a buffer it is given (``writes_into``), noting each batch it does."""
    get_tactic(kind, "torch")                       # loads the registry
    ran: list[tuple[str, int]] = []
    own = next(t for t in TACTICS[kind] if t.name == "torch")

    def tagged(t, name):
        def make(attrs, ctx):
            fn = t.make(attrs, ctx)

            def run(*args, out=None):
                ran.append((name, args[0].shape[0]))
                ys = fn(*args)
                if out is None:
                    return ys
                wrote.append(args[0].shape[0])
                buf = out(tuple(ys[0].shape), ys[0].dtype, ys[0].device)
                buf.copy_(ys[0])
                return (buf,)
            run.tactic = name
            return run
        return dataclasses.replace(t, name=name, make=make, priority=100 if name in ("small", "large") else t.priority,
                                   writes_into=name == "small" and wrote is not None)

    def timer(fn, args, reps):
        small = args[0].shape[0] <= SMALL_UP_TO
        return {"small": 1.0 if small else 2.0, "large": 2.0 if small else 1.0}.get(getattr(fn, "tactic", ""), 3.0)

    monkeypatch.setitem(TACTICS, kind, [tagged(t, t.name) for t in TACTICS[kind]]
                        + [tagged(own, "small"), tagged(own, "large")])
    monkeypatch.setattr(tactics_mod, "_time_cpu", timer)
    monkeypatch.setattr(tactics_mod, "_time", timer)
    return ran


@pytest.fixture
def forced(monkeypatch) -> list[tuple[str, int]]:
    """FullyConnected's choice forced by batch (see _force)."""
    return _force(monkeypatch, "FullyConnected")


@pytest.fixture
def saved(forced, tmp_path: Path) -> tuple[Path, Path]:
    onnx_path = _model(tmp_path / "fc.onnx")
    engine = kiln.build(kiln.onnx.parse(onnx_path), kiln.BuildConfig(device="cpu", profiles=PROFILE))
    engine.save(tmp_path / "fc.kiln")
    return onnx_path, tmp_path / "fc.kiln"


def test_engine_holds_a_tactic_per_bucket_and_runs_each(forced, saved) -> None:
    onnx_path, path = saved
    header, _ = read_engine(str(path))
    assert [b["shapes"]["x"] for b in header["buckets"]] == [[n, 16] for n in POINTS]
    assert all(b["profile"] == 0 for b in header["buckets"])
    (fc,) = [layer for layer in header["plan"]["layers"] if layer["kind"] == "FullyConnected"]
    assert fc["tactic"] == "small"                                  # the opt point, batch 4
    assert fc["bucket_tactics"] == ["small" if n <= SMALL_UP_TO else "large" for n in POINTS]
    assert all("bucket_tactics" not in layer for layer in header["plan"]["layers"] if layer is not fc)

    ctx = kiln.load(path).context()
    rng = np.random.default_rng(1)
    for batch, want in ((3, "small"), (40, "large"), (8, "small"), (9, "large"), (1, "small"), (64, "large")):
        forced.clear()
        x = rng.standard_normal((batch, 16)).astype(np.float32)
        got = ctx.run({"x": x})["y"]
        assert forced == [(want, batch)], (batch, forced)
        assert_close_fp32(got, ort_run(onnx_path, {"x": x})["y"], f"batch {batch}")


@pytest.mark.gpu
def test_each_bucket_is_recorded_in_its_own_cuda_graph(forced, tmp_path: Path) -> None:
    """On the GPU: the first run at a shape records a graph with its bucket's tactic; a second run whose input
    sits where the first one's did may record a graph reading it in place (kiln.runtime.graphs), with the same
    tactic; after that Python calls nothing, the graphs replay; results match ONNX Runtime."""
    onnx_path = _model(tmp_path / "fc.onnx")
    kiln.build(kiln.onnx.parse(onnx_path), kiln.BuildConfig(device="cuda", profiles=PROFILE)).save(tmp_path / "g.kiln")
    engine = kiln.load(tmp_path / "g.kiln")
    assert _fc(engine.header)["bucket_tactics"] == ["small" if n <= SMALL_UP_TO else "large" for n in POINTS]
    ctx = engine.context()
    rng = np.random.default_rng(2)
    for batch, want, calls in ((3, "small", "first"), (40, "large", "first"), (3, "small", "maybe"),
                               (3, "small", "none"), (64, "large", "first")):
        x = rng.standard_normal((batch, 16)).astype(np.float32)
        forced.clear()
        got = ctx.run({"x": x})["y"]
        called = {name for name, _ in forced}
        assert called == {"first": {want}, "maybe": called & {want}, "none": set()}[calls], (batch, forced)
        assert_close_fp32(got, ort_run(onnx_path, {"x": x})["y"], f"batch {batch}")
    assert ctx.graphs is not None and ctx.graph_error is None and len(ctx.graphs.graphs) == 3


def test_profile_and_run_all_use_the_bucket_too(forced, saved) -> None:
    _, path = saved
    ctx = kiln.load(path).context()
    x = np.ones((20, 16), np.float32)
    rows = ctx.profile([torch.from_numpy(x)], runs=1)
    assert [r["tactic"] for r in rows if r["kind"] == "FullyConnected"] == ["large"]
    forced.clear()
    ctx.run_all({"x": np.ones((2, 16), np.float32)})
    assert forced == [("small", 2)]


def test_two_profiles_each_have_their_buckets(forced, tmp_path: Path) -> None:
    onnx_path = _model(tmp_path / "fc.onnx")
    profiles = [{"x": ((1, 16), (2, 16), (8, 16))}, {"x": ((16, 16), (32, 16), (64, 16))}]
    kiln.build(kiln.onnx.parse(onnx_path), kiln.BuildConfig(device="cpu", profiles=profiles)).save(tmp_path / "p.kiln")
    engine = kiln.load(tmp_path / "p.kiln")
    assert [(b["profile"], b["shapes"]["x"][0]) for b in engine.header["buckets"]] == \
        [(0, 1), (0, 2), (0, 4), (0, 8), (1, 16), (1, 32), (1, 64)]
    assert _fc(engine.header)["tactic"] == "small"                   # profile 0's opt point
    ctx = engine.context()
    for batch, want in ((5, "small"), (20, "large"), (64, "large"), (8, "small")):
        forced.clear()
        x = np.full((batch, 16), 0.5, np.float32)
        assert_close_fp32(ctx.run({"x": x})["y"], ort_run(onnx_path, {"x": x})["y"], f"batch {batch}")
        assert forced == [(want, batch)]


def _concat_model(path: Path) -> Path:
    """y = concat(conv(x), conv(relu(x))) over channels: both convolutions may write into y's buffer."""
    r = np.random.default_rng(3)
    w1, w2 = r.standard_normal((4, 3, 3, 3)).astype(np.float32), r.standard_normal((5, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W1"], ["a"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["x"], ["rx"]),
             helper.make_node("Conv", ["rx", "W2"], ["b"], pads=[1, 1, 1, 1]),
             helper.make_node("Concat", ["a", "b"], ["y"], axis=1)]
    g = helper.make_graph(nodes, "cat", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 9, 6, 6])],
                          [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    return path


@pytest.mark.parametrize("opt", [2, 16])     # the layers' own tactic: small (writes in place) or large (cannot)
def test_concatenation_writes_in_place_in_the_buckets_whose_tactics_can(monkeypatch, tmp_path: Path, opt) -> None:
    """Concatenation elision is planned per bucket: ``small`` convolutions write into the concatenation's
    buffer, ``large`` ones cannot and are copied; switching buckets back and forth keeps every result right.
    (The elision runs on the GPU only; here it is planned as there, over CPU tensors.)"""
    from kiln.runtime import concat_elision, program
    monkeypatch.setattr(program, "elide_concats", lambda prog, plan, device: concat_elision.elide_concats(prog, plan,
                                                                                                           "cuda"))
    wrote: list[int] = []
    ran = _force(monkeypatch, "Convolution", wrote)
    onnx_path = _concat_model(tmp_path / "cat.onnx")
    engine = kiln.build(kiln.onnx.parse(onnx_path),
                        kiln.BuildConfig(device="cpu", profiles={"x": ((1, 3, 6, 6), (opt, 3, 6, 6), (16, 3, 6, 6))}))
    convs = [layer for layer in engine.layers if layer["kind"] == "Convolution"]
    assert {c["tactic"] for c in convs} == {"small" if opt <= SMALL_UP_TO else "large"}
    assert len(convs) == 2 and all(c["bucket_tactics"] == ["small"] * 4 + ["large"] for c in convs)   # 1 2 4 8 | 16
    ctx = engine.context()
    rng = np.random.default_rng(4)
    for batch in (2, 12, 3, 16, 1):
        ran.clear()
        wrote.clear()
        x = rng.standard_normal((batch, 3, 6, 6)).astype(np.float32)
        assert_close_fp32(ctx.run({"x": x})["y"], ort_run(onnx_path, {"x": x})["y"], f"batch {batch}")
        small = batch <= SMALL_UP_TO
        assert ran == [("small" if small else "large", batch)] * 2, (batch, ran)
        assert wrote == ([batch] * 2 if small else []), (batch, wrote)


def test_warm_up_runs_every_bucket_once(forced, saved) -> None:
    ctx = kiln.load(saved[1]).context()
    forced.clear()
    assert ctx.warm_up() == len(POINTS)          # the profile's min, opt and max are bucket points too
    assert sorted(forced, key=lambda f: f[1]) == [("small" if n <= SMALL_UP_TO else "large", n) for n in POINTS]


def test_a_static_build_has_no_bucket_table(forced, tmp_path: Path) -> None:
    engine = kiln.build(kiln.onnx.parse(_model(tmp_path / "fc.onnx")),
                        kiln.BuildConfig(device="cpu", profiles={"x": (32, 16)}))
    assert "buckets" not in engine.header
    assert all("bucket_tactics" not in layer for layer in engine.layers)
    assert [layer["tactic"] for layer in engine.layers if layer["kind"] == "FullyConnected"] == ["large"]
    forced.clear()
    assert engine.context().warm_up() == 1 and forced == [("large", 32)]


def test_a_warm_timing_cache_times_nothing(forced, tmp_path: Path, monkeypatch) -> None:
    """Every point's times are cached: a second build with the cache measures no tactic."""
    net = kiln.onnx.parse(_model(tmp_path / "fc.onnx"))
    config = kiln.BuildConfig(device="cpu", profiles=PROFILE, timing_cache=str(tmp_path / "t.cache"))
    first = kiln.build(net, config)
    timed: list = []
    monkeypatch.setattr(tactics_mod, "_time_cpu", lambda fn, args, reps: timed.append(1) or 1.0)
    second = kiln.build(net, kiln.BuildConfig(device="cpu", profiles=PROFILE, timing_cache=str(tmp_path / "t.cache")))
    assert timed == [] and second.header["build"]["timing_cache"]["misses"] == 0
    assert second.header["buckets"] == first.header["buckets"]


# ---- forged bucket tables ----------------------------------------------------------------------

def _forge(src: Path, dst: Path, edit) -> Path:
    header, weights = read_engine(str(src))
    edit(header)
    write_engine(str(dst), {k: v for k, v in header.items() if k != "weights"}, dict(weights))
    return dst


def _fc(h: dict) -> dict:
    return next(layer for layer in h["plan"]["layers"] if layer["kind"] == "FullyConnected")


@pytest.mark.parametrize("edit, words", [
    (lambda h: _fc(h)["bucket_tactics"].__setitem__(0, "fastest_ever"), ["'fastest_ever'", "not a FullyConnected"]),
    (lambda h: _fc(h)["bucket_tactics"].__setitem__(0, "os.system('x')"), ["bucket tactics"]),
    (lambda h: _fc(h)["bucket_tactics"].__setitem__(0, "cublaslt_gelu"), ["runs only on cuda"]),
    (lambda h: _fc(h)["bucket_tactics"].pop(), ["bucket tactics"]),
    (lambda h: h["buckets"][1]["shapes"]["x"].__setitem__(0, 2.5), ["bucket 1"]),
    (lambda h: h["buckets"][1]["shapes"]["x"].__setitem__(0, "2"), ["bucket 1"]),
    (lambda h: h["buckets"][1]["shapes"]["x"].__setitem__(0, True), ["bucket 1"]),
    (lambda h: h["buckets"][1]["shapes"]["x"].__setitem__(0, 65), ["bucket 1", "outside profile 0"]),
    (lambda h: h["buckets"][1]["shapes"]["x"].__setitem__(1, 8), ["bucket 1", "outside profile 0"]),
    (lambda h: h["buckets"][1].update(profile=3), ["bucket 1", "no optimization profile"]),
    (lambda h: h["buckets"][1].update(code="import os"), ["bucket 1", "unknown key"]),
    (lambda h: h["buckets"][1]["shapes"].update(z=[1]), ["bucket 1"]),
    (lambda h: (h["buckets"].pop(), _fc(h)["bucket_tactics"].pop()), ["max shapes"]),
    (lambda h: h["buckets"].pop(), ["bucket tactics must be 5"]),
    (lambda h: h.update(buckets=[]), ["bucket table"]),
    (lambda h: h.pop("buckets"), ["no bucket table"]),
])
def test_forged_bucket_tables_are_refused_in_one_line(saved, tmp_path: Path, edit, words) -> None:
    _, path = saved
    with pytest.raises(EngineFormatError) as info:
        kiln.load(_forge(path, tmp_path / "forged.kiln", edit))
    msg = str(info.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


# ---- the points and the bucket rule --------------------------------------------------------------

def test_points_of_a_two_dim_profile() -> None:
    """BERT-like batch 1..64 x sequence 16..512, opt (8, 128): min, opt, max and three doublings."""
    p = Profile.make({"ids": ((1, 16), (8, 128), (64, 512))})
    got = [pt["ids"] for pt in profile_points(p)]
    assert len(got) == MAX_POINTS
    # doublings from the min: (2,32) (4,64) (8,128)=opt (16,256) (32,512); of the four besides opt, the
    # 1st, 2nd and 4th are kept (positions round(k * 5/4) for k = 1, 2, 3)
    assert got == [(1, 16), (2, 32), (4, 64), (8, 128), (32, 512), (64, 512)]


def test_points_of_static_and_small_profiles() -> None:
    assert [pt["x"] for pt in profile_points(Profile.make({"x": (3, 7)}))] == [(3, 7)]
    assert [pt["x"] for pt in profile_points(Profile.make({"x": ((3, 7), (3, 7), (5, 7))}))] == [(3, 7), (4, 7), (5, 7)]
    assert [pt["x"] for pt in profile_points(Profile.make({"x": ((0, 2), (1, 2), (2, 2))}))] == [(0, 2), (1, 2), (2, 2)]


def test_timing_points_fill_other_inputs_and_find_the_opt_point() -> None:
    profiles = [Profile.make({"x": ((1, 4), (2, 4), (4, 4))}), Profile.make({"x": ((8, 4), (8, 4), (16, 4))})]
    opt = {"x": (2, 4), "s": (3,)}
    points, default, table = timing_points(profiles, opt)
    assert [p["x"] for p in points] == [(1, 4), (2, 4), (4, 4), (8, 4), (16, 4)]
    assert all(p["s"] == (3,) for p in points) and default == 1
    assert [b["profile"] for b in table] == [0, 0, 0, 1, 1]


def test_bucket_rule_against_brute_force() -> None:
    """The first point of a profile holding the shape that is >= it in every dim, for every shape."""
    header = {"profiles": [{"a": {"min": [1, 2], "opt": [2, 4], "max": [8, 8]}},
                           {"a": {"min": [9, 2], "opt": [9, 2], "max": [12, 8]}}],
              "buckets": [{"profile": 0, "shapes": {"a": [2, 2]}}, {"profile": 0, "shapes": {"a": [2, 8]}},
                          {"profile": 0, "shapes": {"a": [4, 4]}}, {"profile": 0, "shapes": {"a": [8, 8]}},
                          {"profile": 1, "shapes": {"a": [12, 8]}}]}
    table = BucketTable(header, ["a"])
    for n in range(0, 14):
        for s in range(0, 10):
            want = None
            for j, b in enumerate(header["buckets"]):
                prof = header["profiles"][b["profile"]]["a"]
                inside = prof["min"][0] <= n <= prof["max"][0] and prof["min"][1] <= s <= prof["max"][1]
                if inside and n <= b["shapes"]["a"][0] and s <= b["shapes"]["a"][1]:
                    want = j
                    break
            assert table.pick([(n, s)]) == want, (n, s)
    assert table.pick([(3, 3)]) == 2 and table.pick([(1, 5)]) == 1 and table.pick([(10, 3)]) == 4


def test_inspect_shows_each_buckets_tactic(forced, saved, capsys) -> None:
    from kiln.cli import main
    _, path = saved
    assert main(["inspect", str(path)]) == 0
    want = ", ".join("small" if n <= SMALL_UP_TO else "large" for n in POINTS)
    assert f"tactic small (per bucket: {want})" in capsys.readouterr().out


def test_a_tactic_that_sets_up_per_shape_is_left_to_static_builds(monkeypatch, tmp_path: Path) -> None:
    """A tactic flagged shape_setup (cuDNN attention plans per shape) and fastest everywhere is chosen by a static
    build and never by a range build, whose first run at a new shape would pay its set-up."""
    get_tactic("FullyConnected", "torch")
    own = next(t for t in TACTICS["FullyConnected"] if t.name == "torch")

    def named(name):
        def make(attrs, ctx):
            fn = own.make(attrs, ctx)

            def run(*args):
                return fn(*args)
            run.tactic = name
            return run
        return dataclasses.replace(own, name=name, make=make, shape_setup=name == "planned", priority=100)

    monkeypatch.setitem(TACTICS, "FullyConnected", [own, named("planned"), named("planless")])
    times = {"planned": 1.0, "planless": 2.0}
    monkeypatch.setattr(tactics_mod, "_time_cpu", lambda fn, args, reps: times.get(getattr(fn, "tactic", ""), 3.0))
    monkeypatch.setattr(tactics_mod, "_time_cpu_interleaved",
                        lambda fns, args, reps: [times.get(getattr(f, "tactic", ""), 3.0) for f in fns])
    net = kiln.onnx.parse(_model(tmp_path / "fc.onnx"))
    static = kiln.build(net, kiln.BuildConfig(device="cpu", profiles={"x": (4, 16)}))
    ranged = kiln.build(net, kiln.BuildConfig(device="cpu", profiles=PROFILE))
    fc = [(s["tactic"], r["tactic"], r.get("bucket_tactics")) for s, r in zip(static.layers, ranged.layers)
          if s["kind"] == "FullyConnected"]
    assert fc and all(st == "planned" and rt == "planless" and set(bt or [rt]) == {"planless"} for st, rt, bt in fc)
