"""The engine file: round trips across processes, and every refusal the format promises.

Files are damaged and re-signed here with the layout documented in
kiln/engine/format.py (64-byte prelude, JSON header, aligned weights, two
CRC-32s), written out independently of Kiln's writer, so a forged file gets past
the checksums and reaches the checks behind them.
"""
from __future__ import annotations

import json
import os
import platform
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

import kiln
import kiln.onnx
from _models import ModelCase, assert_close_fp32, ort_run
from kiln.errors import EngineFormatError, IncompatibleEngineError, KilnError, PluginError

PRELUDE = struct.Struct("<8sII QQQ II 16s")   # magic, version, reserved, H, W, L, crc(header), crc(weights), reserved
REPO_SRC = str(Path(kiln.__file__).resolve().parents[1])


# ---- helpers --------------------------------------------------------------------------------

def _parts(data: bytes) -> tuple[tuple, dict[str, Any], bytes]:
    fields = PRELUDE.unpack(data[:PRELUDE.size])
    h_len, w_off, w_len = fields[3], fields[4], fields[5]
    return fields, json.loads(data[PRELUDE.size:PRELUDE.size + h_len]), data[w_off:w_off + w_len]


def forge(src: Path, dst: Path, edit: Callable[[dict[str, Any]], None] | None = None, *, version: int | None = None,
          h_len: int | None = None, w_len: int | None = None) -> Path:
    """Copy an engine with its header edited, checksums recomputed (a well-signed but foreign/odd file)."""
    fields, header, weights = _parts(src.read_bytes())
    if edit is not None:
        edit(header)
    head = json.dumps(header).encode()
    w_off = (PRELUDE.size + len(head) + 63) // 64 * 64
    pre = PRELUDE.pack(fields[0], fields[1] if version is None else version, 0,
                       len(head) if h_len is None else h_len, w_off, len(weights) if w_len is None else w_len,
                       zlib.crc32(head), zlib.crc32(weights), b"\0" * 16)
    dst.write_bytes(pre + head + b"\0" * (w_off - PRELUDE.size - len(head)) + weights)
    return dst


def refusal(path: Path, kind: type[KilnError] | tuple[type[KilnError], ...] = EngineFormatError) -> str:
    """Load ``path`` expecting a refusal of ``kind``; return its (one-line) message."""
    with pytest.raises(kind) as info:
        kiln.load(path)
    msg = str(info.value)
    assert "\n" not in msg, f"refusal is not one line: {msg!r}"
    return msg


@pytest.fixture(scope="module")
def built(model_case, cpu_engine, tmp_path_factory) -> tuple[ModelCase, Path, dict[str, np.ndarray],
                                                               dict[str, np.ndarray]]:
    """conv_bn built for the CPU and saved: (case, engine path, inputs, outputs of the in-memory engine)."""
    case = model_case("conv_bn")
    engine = cpu_engine("conv_bn")
    path = tmp_path_factory.mktemp("engine") / "conv_bn.kiln"
    engine.save(path)
    feeds = case.feeds(3, seed=5)
    return case, path, feeds, engine.context().run(feeds)


def _run_fresh_process(runs: list[tuple[Path, dict[str, np.ndarray]]], out_dir: Path) -> list[dict[str, np.ndarray]]:
    """Load and run each (engine, feeds) of ``runs`` in one new interpreter; their outputs come back as .npz files."""
    out_dir.mkdir(exist_ok=True)
    jobs = []
    for i, (engine, feeds) in enumerate(runs):
        np.savez(out_dir / f"in{i}.npz", **feeds)
        jobs.append((str(engine), str(out_dir / f"in{i}.npz"), str(out_dir / f"out{i}.npz")))
    code = textwrap.dedent(f"""
        import sys, numpy as np, kiln
        assert "kiln.onnx" not in sys.modules and "onnx" not in sys.modules
        for engine, feeds, out in {jobs!r}:
            np.savez(out, **kiln.load(engine).context().run(dict(np.load(feeds))))
        assert "kiln.onnx" not in sys.modules and "onnx" not in sys.modules
        print("ran", len({jobs!r}))
    """)
    env = dict(os.environ, PYTHONPATH=REPO_SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [dict(np.load(out)) for _, _, out in jobs]


ROUND_TRIP_MODELS = ["mini_bert", "lstm", "mini_yolo"]


@pytest.fixture(scope="module")
def fresh(built, model_case, cpu_engine, tmp_path_factory) -> dict[str, tuple[dict, dict]]:
    """conv_bn and ROUND_TRIP_MODELS saved, then loaded and run in ONE new interpreter (that never imports
    kiln.onnx or onnx): name → (feeds, outputs there)."""
    folder = tmp_path_factory.mktemp("fresh")
    runs = {"conv_bn": (built[1], built[2])}
    for name in ROUND_TRIP_MODELS:
        cpu_engine(name).save(folder / f"{name}.kiln")
        runs[name] = (folder / f"{name}.kiln", model_case(name).feeds(2, seed=1))
    outs = _run_fresh_process(list(runs.values()), folder)
    return {name: (feeds, out) for (name, (_, feeds)), out in zip(runs.items(), outs)}


# ---- round trips ----------------------------------------------------------------------------

def test_round_trip_in_a_fresh_process(built, fresh) -> None:
    case, path, feeds, expected = built
    got = fresh["conv_bn"][1]
    assert sorted(got) == sorted(expected)
    ref = ort_run(case.path, feeds)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name])
        assert_close_fp32(got[name], ref[name], name)


@pytest.mark.parametrize("name", ROUND_TRIP_MODELS)
def test_round_trip_other_models(name: str, model_case, fresh) -> None:
    """Multiple outputs, int64 inputs, a second symbolic axis, RNN weights, host shape arithmetic."""
    case = model_case(name)
    feeds, got = fresh[name]
    ref = ort_run(case.path, feeds)
    for out in ref:
        assert_close_fp32(got[out], ref[out], f"{name} {out}")


def _control_flow_model(path: Path) -> Path:
    """If on a computed condition, a Loop carrying a tensor, and RoiAlign (a built-in plugin)."""
    import onnx
    from onnx import TensorProto as T, helper, numpy_helper
    vi = helper.make_tensor_value_info
    then_g = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["t"])], "then", [], [vi("t", T.FLOAT, ["n", 3])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [], [vi("e", T.FLOAT, ["n", 3])])
    body = helper.make_graph(
        [helper.make_node("Cast", ["i"], ["fi"], to=T.FLOAT), helper.make_node("Add", ["acc", "fi"], ["acc2"]),
         helper.make_node("Identity", ["c"], ["c2"])], "body",
        [vi("i", T.INT64, []), vi("c", T.BOOL, []), vi("acc", T.FLOAT, ["n", 3])],
        [vi("c2", T.BOOL, []), vi("acc2", T.FLOAT, ["n", 3])])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0), helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Loop", ["trip", "true", "y"], ["z"], body=body),
             helper.make_node("RoiAlign", ["img", "rois", "bidx"], ["ra"], output_height=2, output_width=2,
                              sampling_ratio=2, spatial_scale=1.0)]
    g = helper.make_graph(
        nodes, "control", [vi("x", T.FLOAT, ["n", 3]), vi("img", T.FLOAT, [1, 2, 8, 8]), vi("rois", T.FLOAT, [2, 4])],
        [vi("z", T.FLOAT, ["n", 3]), vi("ra", T.FLOAT, [2, 2, 2, 2])],
        [numpy_helper.from_array(np.float32(0), "zero"), numpy_helper.from_array(np.float32(2), "two"),
         numpy_helper.from_array(np.int64(3), "trip"), numpy_helper.from_array(np.bool_(True), "true"),
         numpy_helper.from_array(np.zeros(2, np.int64), "bidx")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_round_trip_control_flow_and_plugin(tmp_path: Path) -> None:
    """Subgraph plans and plugin records survive the file and the structure checks on load."""
    path = _control_flow_model(tmp_path / "control.onnx")
    engine = kiln.build(kiln.onnx.parse(path), kiln.BuildConfig(device="cpu", profiles={"x": ((1, 3), (2, 3), (4, 3))}))
    assert {"If", "Loop", "Plugin"} <= {l["kind"] for l in engine.layers}
    engine.save(tmp_path / "control.kiln")
    rng = np.random.default_rng(0)
    runs = [(tmp_path / "control.kiln",
             {"x": sign * np.abs(rng.standard_normal((2, 3))).astype(np.float32),      # both branches of the If
              "img": rng.standard_normal((1, 2, 8, 8)).astype(np.float32),
              "rois": np.array([[0, 0, 4, 4], [1, 2, 7, 6]], np.float32)}) for sign in (1, -1)]
    for (_, feeds), got in zip(runs, _run_fresh_process(runs, tmp_path / "runs")):
        ref = ort_run(path, feeds)
        for k in ref:
            assert_close_fp32(got[k], ref[k], k)


def test_round_trip_bf16_weights(tmp_path: Path) -> None:
    """BF16 weights (no numpy dtype of their own) survive the file; values checked against numpy."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 8)).astype(np.float32)
    net = kiln.Network("fc")
    x = net.add_input("x", "float32", (4, 8))
    net.mark_output(net.add_fully_connected(x, w).output, "y")
    try:
        engine = kiln.build(net, kiln.BuildConfig(device="cpu", precision="bf16"))
    except KilnError as exc:
        pytest.skip(f"bf16 CPU builds unavailable: {exc}")
    engine.save(tmp_path / "bf16.kiln")
    xv = rng.standard_normal((4, 8)).astype(np.float32)
    got = kiln.load(tmp_path / "bf16.kiln").context().run({"x": xv})["y"]
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, engine.context().run({"x": xv})["y"])
    ref = xv @ w.T
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 3e-2


def test_save_is_atomic_and_deterministic(built, tmp_path: Path) -> None:
    _, path, feeds, _ = built
    engine = kiln.load(path)
    engine.save(tmp_path / "again.kiln")
    assert (tmp_path / "again.kiln").read_bytes() == path.read_bytes()
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


# ---- refusals: foreign device, other format version ----------------------------------------

def test_refuses_engine_for_another_cpu_arch(built, tmp_path: Path) -> None:
    _, path, _, _ = built
    foreign = "riscv64" if platform.machine() != "riscv64" else "aarch64"
    bad = forge(path, tmp_path / "arch.kiln", lambda h: h["device"].update(arch=foreign))
    msg = refusal(bad, IncompatibleEngineError)
    assert foreign in msg and platform.machine() in msg, msg
    assert "kiln build" in msg and "--device cpu" in msg, msg


def test_refuses_engine_for_another_gpu(built, tmp_path: Path) -> None:
    import torch
    _, path, _, _ = built
    bad = forge(path, tmp_path / "gpu.kiln",
                lambda h: h["device"].update(kind="cuda", name="NVIDIA Z100 (forged)", compute_capability="12.7",
                                             cuda="99.0", cudnn="99999"))
    msg = refusal(bad, IncompatibleEngineError)
    assert "NVIDIA Z100 (forged)" in msg and "12.7" in msg, msg
    assert "kiln build" in msg and "--device cuda" in msg, msg
    if torch.cuda.is_available():
        here = torch.cuda.get_device_name()
        assert here in msg, f"the message should name this GPU ({here}): {msg}"
    else:
        assert "no CUDA GPU" in msg, msg


@pytest.mark.gpu
def test_refuses_engine_for_another_compute_capability(tmp_path: Path) -> None:
    """Same GPU name, different compute capability (e.g. a MIG or driver mismatch) is still refused."""
    import torch
    net = kiln.Network("relu")
    net.mark_output(net.add_activation(net.add_input("x", "float32", (2, 2)), "relu").output, "y")
    path = tmp_path / "cuda.kiln"
    kiln.build(net, kiln.BuildConfig(device="cuda")).save(path)
    bad = forge(path, tmp_path / "cc.kiln", lambda h: h["device"].update(compute_capability="1.0"))
    msg = refusal(bad, IncompatibleEngineError)
    major, minor = torch.cuda.get_device_capability()
    assert "1.0" in msg and f"{major}.{minor}" in msg and "kiln build" in msg, msg


def test_refuses_unknown_device_kind(built, tmp_path: Path) -> None:
    _, path, _, _ = built
    msg = refusal(forge(path, tmp_path / "tpu.kiln", lambda h: h["device"].update(kind="tpu")),
                  IncompatibleEngineError)
    assert "'tpu'" in msg and "kiln build" in msg, msg


@pytest.mark.parametrize("version", [0, 2, 7, 2**32 - 1])
def test_refuses_other_format_version(built, tmp_path: Path, version: int) -> None:
    _, path, _, _ = built
    msg = refusal(forge(path, tmp_path / "v.kiln", version=version), IncompatibleEngineError)
    assert f"version {version}" in msg and f"version {kiln.engine.FORMAT_VERSION}" in msg, msg
    assert "kiln build" in msg, msg


# ---- refusals: damaged and foreign files ----------------------------------------------------

def test_refuses_truncated_files(built, tmp_path: Path) -> None:
    _, path, _, _ = built
    data = path.read_bytes()
    fields, _, _ = _parts(data)
    h_len, w_off = fields[3], fields[4]
    cuts = {0, 1, 7, 8, 12, 16, 40, 63, 64, 65, 64 + h_len // 2, 64 + h_len - 1, 64 + h_len, w_off - 1, w_off,
            w_off + 1, (w_off + len(data)) // 2, len(data) - 64, len(data) - 1}
    cuts |= set(range(0, len(data), max(1, len(data) // 40)))
    bad = tmp_path / "cut.kiln"
    for n in sorted(c for c in cuts if 0 <= c < len(data)):
        bad.write_bytes(data[:n])
        msg = refusal(bad)
        assert repr(str(bad)) in msg and ("damaged" in msg or "not a Kiln engine" in msg), f"cut at {n}: {msg}"


def test_bit_flips_are_refused_or_harmless(built, tmp_path: Path) -> None:
    """A flipped bit in the header or weights is refused; only unused bytes (reserved, padding) may load,
    and then the outputs must be exactly the original ones."""
    _, path, feeds, expected = built
    data = path.read_bytes()
    fields, _, _ = _parts(data)
    h_len, w_off = fields[3], fields[4]
    offsets = set(range(0, 64)) | set(range(64, 64 + h_len, max(1, h_len // 60))) \
        | set(range(w_off, len(data), max(1, (len(data) - w_off) // 60))) | {len(data) - 1}
    bad = tmp_path / "flip.kiln"
    loaded = []
    for off in sorted(offsets):
        for bit in (0, 7):
            b = bytearray(data)
            b[off] ^= 1 << bit
            bad.write_bytes(bytes(b))
            try:
                engine = kiln.load(bad)
            except (EngineFormatError, IncompatibleEngineError) as exc:
                assert "\n" not in str(exc)
                continue
            out = engine.context().run(feeds)
            for k in expected:
                np.testing.assert_array_equal(out[k], expected[k], err_msg=f"bit {bit} at offset {off} changed {k}")
            loaded.append(off)
    unused = set(range(12, 16)) | set(range(48, 64)) | set(range(64 + h_len, w_off))
    assert set(loaded) <= unused, f"flips at used offsets loaded: {sorted(set(loaded) - unused)}"
    assert not set(range(64, 64 + h_len)) & set(loaded)


@pytest.mark.parametrize("content", [b"", b"K", b"KILNENG", b"KILNENG\x00", b"\x00" * 64, b"GIF89a" + b"\x00" * 100,
                                     bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))],
                         ids=["empty", "one-byte", "magic-prefix", "magic-only", "zeros", "gif", "random"])
def test_refuses_non_kiln_files(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "x.kiln"
    p.write_bytes(content)
    msg = refusal(p)
    assert repr(str(p)) in msg and ("not a Kiln engine" in msg or "damaged" in msg), msg


def test_refuses_an_onnx_file_directory_and_missing_path(model_case, tmp_path: Path) -> None:
    msg = refusal(model_case("conv_bn").path)
    assert "not a Kiln engine" in msg and "kiln build" in msg, msg
    assert "does not exist" in refusal(tmp_path / "missing.kiln")
    assert "directory" in refusal(tmp_path)


@pytest.mark.parametrize("field,value", [("h_len", 1 << 62), ("h_len", (1 << 64) - 1), ("h_len", 1 << 30),
                                         ("w_len", 1 << 62), ("w_len", (1 << 64) - 1)])
def test_absurd_section_sizes_are_refused_fast_without_allocating(built, tmp_path: Path, field: str,
                                                                  value: int) -> None:
    _, path, _, _ = built
    bad = forge(path, tmp_path / "huge.kiln", **{field: value})
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        refusal(bad)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 2.0
    assert peak < 16 << 20, f"refusing the file allocated {peak} bytes"


@pytest.mark.parametrize("entry", [
    {"shape": [2**32, 2**32], "nbytes": 0},          # int64 product wraps to 0
    {"shape": [2**40, 2**40]},
    {"shape": [-1, 4], "nbytes": -16},
    {"shape": [3, "x"]},
    {"shape": 12},
    {"dtype": "object"},
    {"dtype": "complex1024"},
    {"offset": -64},
    {"offset": 1 << 62},
], ids=lambda e: json.dumps(e))
def test_absurd_weight_entries_are_refused(built, tmp_path: Path, entry: dict[str, Any]) -> None:
    _, path, _, _ = built

    def edit(h: dict[str, Any]) -> None:
        key = next(iter(h["weights"]))
        h["weights"][key].update(entry)
    tracemalloc.start()
    try:
        msg = refusal(forge(path, tmp_path / "w.kiln", edit))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "weight" in msg, msg
    assert peak < 16 << 20


@pytest.mark.parametrize("edit", [
    lambda h: h.update(plan=5),
    lambda h: h.update(plan=[]),
    lambda h: h.update(device=["cpu"]),
    lambda h: h["device"].pop("kind"),
    lambda h: h["plan"].pop("layers"),
    lambda h: h["plan"].update(inputs={"input": 1}),
    lambda h: h["plan"]["layers"][0].pop("inputs"),
    lambda h: h["plan"]["layers"][0].update(outputs=None),
    lambda h: h["plan"]["layers"][0].update(inputs=["nowhere"]),
    lambda h: h["plan"]["layers"].reverse(),
    lambda h: h["plan"]["outputs"].append({"name": "ghost", "dtype": "float32", "shape": [1]}),
    lambda h: h.update(profiles=[{"input": {"min": "small"}}]),
    lambda h: h["plan"]["layers"][0]["attrs"].update(p={"__plugin__": ["not", "a", "record"]}),
], ids=["plan-int", "plan-list", "device-list", "no-kind", "no-layers", "inputs-dict", "layer-no-inputs",
        "layer-outputs-null", "dangling-input", "layers-out-of-order", "ghost-output", "profile-junk",
        "plugin-junk"])
def test_well_signed_but_malformed_headers_are_refused(built, tmp_path: Path, edit) -> None:
    """Checksums pass (the file was forged), so these reach the structure checks: one EngineFormatError each."""
    _, path, _, _ = built
    msg = refusal(forge(path, tmp_path / "m.kiln", edit))
    assert "damaged" in msg, msg


# ---- loading executes no code ---------------------------------------------------------------

def test_loading_imports_and_runs_nothing_from_the_file(built, tmp_path: Path, monkeypatch) -> None:
    """Pickle-style payloads and plugin records naming a module stay data: nothing is imported or run."""
    _, path, _, _ = built
    marker = tmp_path / "pwned"
    pkg = tmp_path / "site"
    pkg.mkdir()
    (pkg / "kiln_evil_payload.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n")
    monkeypatch.syspath_prepend(str(pkg))
    payload = {"__reduce__": ["os.system", [f"touch {marker}"]], "py/object": "kiln_evil_payload.Thing",
               "__class__": "kiln_evil_payload", "!!python/object/apply:os.system": [f"touch {marker}"]}
    record = {"name": "kiln_evil_payload", "namespace": "kiln_evil_payload", "version": "1",
              "fields": {"module": "kiln_evil_payload", "__reduce__": ["os.system", ["true"]]}}

    def edit(h: dict[str, Any]) -> None:      # a plugin record is schema-valid only on a Plugin layer
        h["build"]["payload"] = payload
        h["plan"]["layers"][0].update(kind="Plugin", tactic="torch", attrs={"plugin": {"__plugin__": record}})
    bad = forge(path, tmp_path / "evil.kiln", edit)
    kiln.load(path).context()             # first load pulls in Kiln's own lazy imports; not counted below
    before = set(sys.modules)
    with pytest.raises(PluginError) as info:
        kiln.load(bad)
    assert "kiln_evil_payload" in str(info.value) and "not registered" in str(info.value)
    assert not marker.exists()
    new = {m for m in set(sys.modules) - before if not m.startswith(("kiln.", "importlib"))}
    assert "kiln_evil_payload" not in sys.modules and not new, f"loading imported {sorted(new)}"


def test_payload_in_attrs_of_a_loadable_engine_stays_data(built, tmp_path: Path) -> None:
    """A header with pickle-like dicts but no plugin record loads and runs; the dicts are inert."""
    _, path, feeds, expected = built
    marker = tmp_path / "pwned"

    def edit(h: dict[str, Any]) -> None:
        h["build"]["payload"] = {"__reduce__": ["os.system", [f"touch {marker}"]]}
    kiln.load(path).context()
    before = set(sys.modules)
    out = kiln.load(forge(path, tmp_path / "inert.kiln", edit)).context().run(feeds)
    for k in expected:
        np.testing.assert_array_equal(out[k], expected[k])
    assert not marker.exists()
    assert not {m for m in set(sys.modules) - before if not m.startswith("kiln.")}


def test_engine_file_holds_no_pickle(built) -> None:
    _, path, _, _ = built
    data = path.read_bytes()
    fields, header, _ = _parts(data)
    assert data[:8] == b"KILNENG\x00" and fields[1] == kiln.engine.FORMAT_VERSION
    assert isinstance(header, dict) and {"device", "plan", "weights"} <= set(header)
    assert b"\x80\x04\x95" not in data and b"\x80\x05\x95" not in data     # pickle protocol 4/5 frames


@pytest.mark.parametrize("edit", [
    lambda h: h["plan"]["layers"][0]["attrs"].clear(),
    lambda h: h["plan"]["layers"][0]["attrs"].update(stride="wide", pads=None),
    lambda h: h["plan"]["layers"][0].update(tactic="torch", kind="Pooling"),
], ids=["attrs-gone", "attrs-junk", "kind-swapped"])
def test_well_signed_plans_with_bad_attrs_fail_at_context_in_one_line(built, tmp_path: Path, edit) -> None:
    """A forged layer whose attributes no tactic can take: the context refuses it as a damaged file
    (one line naming the layer), never a traceback."""
    _, path, _, _ = built
    bad = forge(path, tmp_path / "m.kiln", edit)
    with pytest.raises(EngineFormatError) as info:
        kiln.load(bad).context()
    msg = str(info.value)
    assert "\n" not in msg and "damaged" in msg and "layer" in msg, msg
