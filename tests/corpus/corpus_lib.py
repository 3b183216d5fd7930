"""The real-model corpus: its manifest (validated), where the fetched models live, their inputs, the
ONNX Runtime reference, and the FP32 acceptance rule.

Shared by tests/corpus/test_corpus.py, scripts/fetch_corpus.py and scripts/corpus_table.py. The
manifest is data: every field is checked against a closed schema before use, ids and file names
against patterns that cannot form a path outside the corpus folder.
"""
from __future__ import annotations

import hashlib
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = Path(__file__).with_name("manifest.toml")
ENV_DIR = "KILN_CORPUS_DIR"
MODEL_FILE = "model.onnx"

_ID = re.compile(r"[a-z0-9][a-z0-9_]{0,63}")
_PKG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9.+!-]{0,49}")
_ARCHIVE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,199}\.(whl|tar\.gz)")
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_SHA = re.compile(r"[0-9a-f]{64}")
_INPUT = re.compile(r"[A-Za-z0-9_.:/-]{1,200}")
_DTYPES = {"float32": np.float32, "int64": np.int64, "int32": np.int32, "bool": np.bool_, "uint8": np.uint8}
_GENERATORS = {"image", "audio", "uniform", "normal", "tokens", "constant"}
_TOOLS = {"ort_optimizer", "ort_quantize_static_qdq", "ort_quantize_dynamic"}


class ManifestError(ValueError):
    """The corpus manifest breaks its schema."""


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    file: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Extra:
    member: str
    name: str
    sha256: str


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str
    gen: str
    params: dict[str, Any]


@dataclass(frozen=True)
class Model:
    id: str
    task: str
    category: str
    exporter: str
    sha256: str
    inputs: tuple[InputSpec, ...]
    package: str | None = None
    member: str | None = None
    extras: tuple[Extra, ...] = ()
    derive: dict[str, Any] | None = None
    derived_with: str | None = None
    known_failure: str | None = None
    fp16_fp32_layers: tuple[str, ...] = ()
    fp16_why: str | None = None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {i.name: i.shape for i in self.inputs}


@dataclass
class Manifest:
    packages: dict[str, Package]
    models: list[Model] = field(default_factory=list)

    def model(self, model_id: str) -> Model:
        for m in self.models:
            if m.id == model_id:
                return m
        raise KeyError(model_id)

    def source(self, model: Model) -> Model:
        """The shipped model a derived one is made from (itself when it is not derived)."""
        return self.model(model.derive["from"]) if model.derive else model


def _need(table: dict, key: str, kind: type, where: str, pattern: re.Pattern | None = None):
    if key not in table:
        raise ManifestError(f"{where}: missing '{key}'.")
    value = table[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise ManifestError(f"{where}: '{key}' must be {kind.__name__}, got {type(value).__name__}.")
    if pattern is not None and not pattern.fullmatch(value):
        raise ManifestError(f"{where}: '{key}' = {value!r} does not match {pattern.pattern}.")
    return value


def _only(table: dict, allowed: set[str], where: str) -> None:
    extra = sorted(set(table) - allowed)
    if extra:
        raise ManifestError(f"{where}: unknown keys {extra}.")


def _input(name: str, t: dict, where: str) -> InputSpec:
    if not _INPUT.fullmatch(name):
        raise ManifestError(f"{where}: input name {name!r} is not allowed.")
    where = f"{where} input {name!r}"
    shape = _need(t, "shape", list, where)
    if not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d <= 1 << 16 for d in shape) or len(shape) > 6:
        raise ManifestError(f"{where}: shape must be up to 6 positive ints, got {shape}.")
    dtype = t.get("dtype", "float32")
    if dtype not in _DTYPES:
        raise ManifestError(f"{where}: dtype {dtype!r} is not one of {sorted(_DTYPES)}.")
    gen = _need(t, "gen", str, where)
    if gen not in _GENERATORS:
        raise ManifestError(f"{where}: gen {gen!r} is not one of {sorted(_GENERATORS)}.")
    params = {k: v for k, v in t.items() if k not in ("shape", "dtype", "gen")}
    if gen == "tokens" and "high" not in params:
        raise ManifestError(f"{where}: tokens need 'high' (the vocabulary size).")
    _only(params, {"mean", "std", "scale", "layout", "amplitude", "low", "high", "value"}, where)
    for k, v in params.items():
        ok = (isinstance(v, (int, float)) and not isinstance(v, bool)) or \
             (k in ("mean", "std") and isinstance(v, list) and all(isinstance(x, (int, float)) for x in v)) or \
             (k == "layout" and v in ("NCHW", "NHWC"))
        if not ok:
            raise ManifestError(f"{where}: {k} = {v!r} is not allowed.")
    return InputSpec(name, tuple(shape), dtype, gen, params)


def _model(t: dict, packages: dict[str, Package]) -> Model:
    where = f"model {t.get('id', '?')!r}"
    _only(t, {"id", "package", "member", "sha256", "extras", "task", "category", "exporter", "inputs", "derive",
              "derived_with", "known_failure", "fp16_fp32_layers", "fp16_why"}, where)
    mid = _need(t, "id", str, where, _ID)
    common = dict(id=mid, task=_need(t, "task", str, where), category=_need(t, "category", str, where),
                  exporter=_need(t, "exporter", str, where), sha256=_need(t, "sha256", str, where, _SHA))
    inputs = _need(t, "inputs", dict, where)
    common["inputs"] = tuple(_input(n, spec, where) for n, spec in inputs.items())
    failure = t.get("known_failure")
    if failure is not None and (not isinstance(failure, str) or "\n" in failure):
        raise ManifestError(f"{where}: known_failure must be one line of text.")
    common["known_failure"] = failure
    keep = t.get("fp16_fp32_layers", [])
    why = t.get("fp16_why")
    if not isinstance(keep, list) or not all(isinstance(k, str) and k for k in keep):
        raise ManifestError(f"{where}: fp16_fp32_layers must be a list of --fp32-layers patterns.")
    if bool(keep) != isinstance(why, str) or (why is not None and "\n" in why):
        raise ManifestError(f"{where}: fp16_fp32_layers and fp16_why (one line: why FP16 needs them) go together.")
    common["fp16_fp32_layers"], common["fp16_why"] = tuple(keep), why
    if "derive" in t:
        d = _need(t, "derive", dict, where)
        _only(d, {"from", "tool", "model_type", "num_heads", "hidden_size", "calibration_seeds"}, where + " derive")
        _need(d, "from", str, where + " derive", _ID)
        if d.get("tool") not in _TOOLS:
            raise ManifestError(f"{where}: derive.tool must be one of {sorted(_TOOLS)}.")
        return Model(**common, derive=dict(d), derived_with=_need(t, "derived_with", str, where))
    pkg = _need(t, "package", str, where)
    if pkg not in packages:
        raise ManifestError(f"{where}: package {pkg!r} has no [[package]] entry.")
    extras = []
    for e in t.get("extras", []):
        _only(e, {"member", "name", "sha256"}, where + " extra")
        name = _need(e, "name", str, where + " extra", _FILE_NAME)
        if name == MODEL_FILE:
            raise ManifestError(f"{where}: an extra cannot be named {MODEL_FILE}.")
        extras.append(Extra(_need(e, "member", str, where + " extra"), name, _need(e, "sha256", str, where, _SHA)))
    return Model(**common, package=pkg, member=_need(t, "member", str, where), extras=tuple(extras))


def parse_manifest(doc: dict) -> Manifest:
    """The manifest from its TOML tables, checked field by field."""
    _only(doc, {"package", "model"}, "manifest")
    packages: dict[str, Package] = {}
    for p in doc.get("package", []):
        where = f"package {p.get('name', '?')!r}"
        _only(p, {"name", "version", "file", "sha256", "size"}, where)
        pkg = Package(_need(p, "name", str, where, _PKG), _need(p, "version", str, where, _VERSION),
                      _need(p, "file", str, where, _ARCHIVE), _need(p, "sha256", str, where, _SHA),
                      _need(p, "size", int, where))
        if pkg.name in packages:
            raise ManifestError(f"{where}: listed twice.")
        if not 0 < pkg.size <= 1 << 30:
            raise ManifestError(f"{where}: size {pkg.size} is out of range.")
        packages[pkg.name] = pkg
    manifest = Manifest(packages)
    seen: set[str] = set()
    for t in doc.get("model", []):
        m = _model(t, packages)
        if m.id in seen:
            raise ManifestError(f"model {m.id!r} is listed twice.")
        if m.derive and m.derive["from"] not in seen:
            raise ManifestError(f"model {m.id!r} derives from {m.derive['from']!r}, which must be listed before it.")
        seen.add(m.id)
        manifest.models.append(m)
    return manifest


def load_manifest(path: Path = MANIFEST) -> Manifest:
    with open(path, "rb") as f:
        return parse_manifest(tomllib.load(f))


def corpus_dir(override: str | os.PathLike | None = None) -> Path:
    """Where the corpus lives: the given folder, else $KILN_CORPUS_DIR, else ~/.cache/kiln/corpus."""
    if override:
        return Path(override).expanduser()
    env = os.environ.get(ENV_DIR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "kiln" / "corpus"


def model_path(root: Path, model: Model) -> Path:
    return root / "models" / model.id / MODEL_FILE


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def installed_onnxruntime() -> str:
    import onnxruntime
    return f"onnxruntime=={onnxruntime.__version__}"


def model_problem(root: Path, model: Model) -> str | None:
    """Why this model cannot be used from ``root`` (missing or altered files), or None."""
    path = model_path(root, model)
    files = [(path, model.sha256)] + [(path.parent / e.name, e.sha256) for e in model.extras]
    for f, sha in files:
        if not f.is_file():
            return f"{f} is missing"
        if model.derive and model.derived_with != installed_onnxruntime():
            continue            # another onnxruntime writes other bytes; the source's checksum still holds
        if sha256_file(f) != sha:
            return f"{f} does not have the pinned SHA-256"
    return None


# ---------------------------------------------------------------- inputs

def _smooth_image(rng: np.random.Generator, h: int, w: int, c: int) -> np.ndarray:
    """A uint8 image [h, w, c] with smooth regions, edges and fine noise (not white noise)."""
    gh, gw = max(2, h // 8), max(2, w // 8)
    coarse = rng.uniform(0, 255, (gh, gw, c))
    ys = np.linspace(0, gh - 1, h)
    xs = np.linspace(0, gw - 1, w)
    y0 = np.floor(ys).astype(int).clip(0, gh - 2)
    x0 = np.floor(xs).astype(int).clip(0, gw - 2)
    fy = (ys - y0)[:, None, None]
    fx = (xs - x0)[None, :, None]
    top = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x0 + 1] * fx
    bot = coarse[y0 + 1][:, x0] * (1 - fx) + coarse[y0 + 1][:, x0 + 1] * fx
    img = top * (1 - fy) + bot * fy
    img[h // 3: h // 3 + max(1, h // 10), :, :] = rng.uniform(0, 255, c)     # a sharp band, like a text line
    img += rng.normal(0, 6, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _image(rng: np.random.Generator, spec: InputSpec) -> np.ndarray:
    p = spec.params
    nhwc = p.get("layout", "NCHW") == "NHWC"
    n, *rest = spec.shape
    h, w, c = rest if nhwc else (rest[1], rest[2], rest[0])
    batch = np.stack([_smooth_image(rng, h, w, c) for _ in range(n)]).astype(np.float64)   # [n, h, w, c]
    mean = np.asarray(p.get("mean", [0.0]), np.float64)
    std = np.asarray(p.get("std", [1.0]), np.float64)
    x = (batch * p.get("scale", 1 / 255) - mean) / std
    return x if nhwc else x.transpose(0, 3, 1, 2)


def _audio(rng: np.random.Generator, spec: InputSpec) -> np.ndarray:
    """Voiced-like audio at 16 kHz: two harmonic tones with vibrato, an envelope and noise."""
    n = spec.shape[-1]
    rows = int(np.prod(spec.shape[:-1], dtype=np.int64)) if len(spec.shape) > 1 else 1
    t = np.arange(rows * n) / 16000.0
    f0 = rng.uniform(100, 250)
    phase = 2 * np.pi * f0 * (t + 0.002 * np.sin(2 * np.pi * 5 * t))
    wave = 0.5 * np.sin(phase) + 0.25 * np.sin(2 * phase + rng.uniform(0, np.pi)) + 0.05 * rng.standard_normal(t.size)
    wave *= 0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(2, 6) * t)
    wave = wave / max(np.abs(wave).max(), 1e-9) * 0.9
    return (wave * spec.params.get("amplitude", 1.0)).reshape(spec.shape)


def make_feeds(model: Model, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for ``model`` from its manifest generators; the same seed gives the same arrays."""
    base = int.from_bytes(hashlib.sha256(model.id.encode()).digest()[:4], "little")
    feeds = {}
    for k, spec in enumerate(model.inputs):
        rng = np.random.default_rng([seed, base, k])
        p = spec.params
        if spec.gen == "image":
            x = _image(rng, spec)
        elif spec.gen == "audio":
            x = _audio(rng, spec)
        elif spec.gen == "uniform":
            x = rng.uniform(p.get("low", 0.0), p.get("high", 1.0), spec.shape)
        elif spec.gen == "normal":
            x = rng.normal(p.get("mean", 0.0), p.get("std", 1.0), spec.shape)
        elif spec.gen == "tokens":
            x = rng.integers(int(p.get("low", 0)), int(p["high"]), spec.shape)
        else:
            x = np.full(spec.shape, p.get("value", 0))
        feeds[spec.name] = np.asarray(x).astype(_DTYPES[spec.dtype])
    return feeds


# ---------------------------------------------------------------- reference and acceptance

def ort_session(model: Path | bytes, providers: list[str] | None = None):
    """ONNX Runtime (default optimizations, which the exact-integer setting needs) with exact integer matmuls.

    ``session.x64quantprecision`` makes ORT's x86 u8s8 GEMM avoid the 16-bit saturating
    multiply-add (on AVX2 without VNNI the default kernel saturates for full-range int8 weights and
    gives wrong MatMulInteger results)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.x64quantprecision", "1")
    so.log_severity_level = 3
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, so, providers=providers or ["CPUExecutionProvider"])


def reference(path: Path, feeds: dict[str, np.ndarray], context) -> tuple[dict[str, np.ndarray], list[str]]:
    """The reference outputs for Kiln's ``context`` and any problems in Kiln's quantizers: plain
    ONNX Runtime, or :func:`pinned_reference` for a model that quantizes activations."""
    if quantizes_activations(path):
        return pinned_reference(path, feeds, context.run_all(feeds))
    return ort_run(path, feeds), []


def ort_run(model: Path | bytes, feeds: dict[str, np.ndarray], providers: list[str] | None = None
            ) -> dict[str, np.ndarray]:
    sess = ort_session(model, providers)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds)))


QUANTIZERS = ("DynamicQuantizeLinear", "QuantizeLinear")


def quantizes_activations(path: Path) -> bool:
    """Whether the main graph rounds float tensors to integers at run time (QuantizeLinear or
    DynamicQuantizeLinear): there two correct FP32 implementations may round a value that lies
    within float rounding of a tie to different integers, so outputs alone cannot be held to the
    FP32 bound and :func:`pinned_reference` is used instead."""
    import onnx
    graph = onnx.load(str(path), load_external_data=False).graph
    return any(n.op_type in QUANTIZERS and n.domain in ("", "ai.onnx") for n in graph.node)


def _near_tie(v: np.ndarray, slack: np.ndarray | float) -> np.ndarray:
    return np.abs(v - np.floor(v) - 0.5) <= slack


def _quantizer_problems(node, values: dict[str, np.ndarray], mine: dict[str, np.ndarray]) -> list[str]:
    """Kiln's outputs of one quantizer against ONNX's rule applied to the reference input ``x``.

    A float input is accepted within the FP32 bound (``fp32_tolerance``) of the reference, so a
    quantized value may differ by one step only where ``x / scale`` lies that close to a tie."""
    x = np.asarray(values[node.input[0]]).astype(np.float64)
    tol = fp32_tolerance(x)
    y = mine[node.output[0]].astype(np.int64)
    if node.op_type == "DynamicQuantizeLinear":
        scale, zp = float(mine[node.output[1]]), float(mine[node.output[2]])
        lo, hi = min(0.0, float(x.min())), max(0.0, float(x.max()))
        want = (hi - lo) / 255 if hi > lo else 1.0
        if abs(scale - want) > 2 * tol / 255 + 1e-6 * want:
            return [f"{node.name!r} (DynamicQuantizeLinear) scale {scale:.9g}, ONNX's rule gives {want:.9g}"]
        z = -lo / scale
        if zp != np.clip(np.round(z), 0, 255) and not _near_tie(np.asarray(z), tol / scale + 1e-6 * abs(z)):
            return [f"{node.name!r} (DynamicQuantizeLinear) zero point {zp:g}, ONNX's rule gives {np.round(z):g}"]
        scale_b, zp_b, qmin, qmax = np.float64(scale), np.float64(zp), 0, 255
    else:
        scale_b = np.asarray(values[node.input[1]]).astype(np.float64)
        zp_v = np.asarray(values[node.input[2]]) if len(node.input) > 2 and node.input[2] else None
        zp_b = zp_v.astype(np.float64) if zp_v is not None else np.float64(0)
        qmin, qmax = (0, 255) if zp_v is None or zp_v.dtype == np.uint8 else \
            (int(np.iinfo(zp_v.dtype).min), int(np.iinfo(zp_v.dtype).max))
        if scale_b.ndim == 1 and scale_b.size > 1:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % x.ndim
            shape = [1] * x.ndim
            shape[axis] = scale_b.size
            scale_b = scale_b.reshape(shape)
            zp_b = zp_b.reshape(shape) if np.ndim(zp_b) else zp_b
    v = x / scale_b
    want = np.clip(np.round(v) + zp_b, qmin, qmax)
    off = np.abs(y - want)
    bad = (off > 1) | ((off == 1) & ~_near_tie(v, tol / np.abs(scale_b) + 1e-6 * np.abs(v)))
    if bad.any():
        i = tuple(int(k) for k in np.argwhere(bad)[0])
        return [f"{node.name!r} ({node.op_type}) quantized {x[i]:.9g} to {y[i]}, ONNX's rule gives {int(want[i])} "
                f"({int(bad.sum())} of {y.size} values)"]
    return []


def pinned_reference(path: Path, feeds: dict[str, np.ndarray], mine: dict[str, np.ndarray]
                     ) -> tuple[dict[str, np.ndarray], list[str]]:
    """ONNX Runtime's outputs with each quantizer's outputs pinned to Kiln's (``mine``: every tensor
    of Kiln's run), and the quantizers whose results break ONNX's rounding rule for the reference's
    own input. Together: every float value within the FP32 bound, every integer decision exact
    except at a tie that float rounding may decide either way."""
    import onnx
    from onnx import helper, numpy_helper
    model = onnx.load(str(path))
    graph = model.graph
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    pinned, kept, quantizers = {}, [], []
    for node in graph.node:
        outs = [o for o in node.output if o]
        if node.op_type in QUANTIZERS and node.domain in ("", "ai.onnx") and all(o in mine for o in outs) \
                and mine[outs[0]].dtype.kind in "iu":
            quantizers.append(node)
            pinned.update({o: np.asarray(mine[o]) for o in outs})
        else:
            kept.append(node)
    if not quantizers:
        return ort_run(path, feeds), []
    del graph.node[:]
    graph.node.extend(kept)
    known = {o.name for o in graph.output}
    for name, value in pinned.items():
        dtype = helper.np_dtype_to_tensor_dtype(value.dtype)
        graph.input.append(helper.make_tensor_value_info(name, dtype, value.shape))
        known.discard(name)
    for name in {i for node in quantizers for i in node.input if i} - known - set(feeds) - set(consts) - set(pinned):
        graph.output.append(onnx.ValueInfoProto(name=name))
    sess = ort_session(model.SerializeToString())
    names = [o.name for o in sess.get_outputs()]
    ref = dict(zip(names, sess.run(names, {**feeds, **pinned})))
    values = {**consts, **feeds, **ref}
    problems = [p for node in quantizers for p in _quantizer_problems(node, values, pinned)]
    outputs = {o.name: ref[o.name] if o.name in ref else pinned[o.name] for o in onnx.load(
        str(path), load_external_data=False).graph.output}
    return outputs, problems


@dataclass(frozen=True)
class OutputCheck:
    name: str
    max_abs: float
    tolerance: float
    rel_l2: float
    problem: str | None = None       # shape or dtype mismatch, non-finite values

    @property
    def ok(self) -> bool:
        return self.problem is None and self.max_abs <= self.tolerance


FP16_ULPS = 4


def fp32_tolerance(ref: np.ndarray) -> float:
    """The acceptance bound for one output: 1e-5 + 1e-4 * max|ref| for FP32; a model that computes and returns
    FP16 (Keras mixed precision) rounds every value to FP16, so there two implementations may differ by a few
    FP16 units in the last place: 1e-5 + FP16_ULPS * 2**-10 * max|ref|."""
    peak = float(np.max(np.abs(ref.astype(np.float64)))) if ref.size else 0.0
    return 1e-5 + (FP16_ULPS * 2.0 ** -10 if ref.dtype == np.float16 else 1e-4) * peak


def rel_l2(got: np.ndarray, ref: np.ndarray) -> float:
    g, r = got.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    return float(np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30)) if r.size else 0.0


def compare(got: dict[str, Any], ref: dict[str, np.ndarray]) -> list[OutputCheck]:
    """Each reference output against Kiln's: max abs error, the FP32 bound and the relative L2 error."""
    checks = []
    for name, r in ref.items():
        r = np.asarray(r)
        if name not in got:
            checks.append(OutputCheck(name, float("inf"), 0.0, float("inf"), "missing from Kiln's outputs"))
            continue
        g = np.asarray(got[name])
        if g.shape != r.shape:
            checks.append(OutputCheck(name, float("inf"), 0.0, float("inf"), f"shape {g.shape} != reference {r.shape}"))
            continue
        if r.dtype == np.bool_ or g.dtype == np.bool_:
            g, r = g.astype(np.int64), r.astype(np.int64)
        diff = np.abs(g.astype(np.float64) - r.astype(np.float64))
        bad = None if np.isfinite(diff[np.isfinite(r.astype(np.float64))]).all() else "non-finite values"
        err = float(diff.max()) if diff.size else 0.0
        checks.append(OutputCheck(name, err, fp32_tolerance(r), rel_l2(g, r), bad))
    return checks


def build_engine(path: Path, model: Model, precision: str = "fp32", device: str = "cpu"):
    """Parse with Kiln and build for ``device`` at the manifest's shapes."""
    import kiln
    import kiln.onnx
    network = kiln.onnx.parse(str(path))
    return kiln.build(network, kiln.BuildConfig(precision=precision, device=device, profiles=model.shapes()))


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
