"""BuildConfig and optimization profiles."""
from __future__ import annotations

import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from kiln.errors import BuildError
from kiln.ir.dtypes import PRECISIONS

# What a CPU build does with each reduced precision (torch's CPU kernels; no tensor cores).
CPU_PRECISION_NOTES = {
    "tf32": "TF32 is a GPU matrix-math mode; a CPU build computes in plain FP32, so it has no effect there.",
    "fp16": "a CPU build stores weights and activations in FP16 and computes them with torch's FP16 CPU kernels: "
            "the results carry FP16 rounding, and most CPUs run them many times slower than FP32. Use it on CPU "
            "to check FP16 accuracy; build for cuda for speed.",
    "bf16": "a CPU build stores weights and activations in BF16 and computes them with torch's BF16 CPU kernels: "
            "the results carry BF16 rounding, and CPUs without BF16 matrix instructions (AMX) run them many "
            "times slower than FP32. Use it on CPU to check BF16 accuracy; build for cuda for speed.",
}
DimRange = tuple[Sequence[int], Sequence[int], Sequence[int]]


@dataclass
class Profile:
    """min/opt/max shape per dynamic input, as in TensorRT's optimization profiles."""

    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    @classmethod
    def make(cls, spec: "Profile | dict[str, Any]") -> "Profile":
        if isinstance(spec, Profile):
            return spec
        if not isinstance(spec, dict):
            raise BuildError(f"A profile is a mapping {{input name: shape or (min, opt, max)}}, not "
                             f"{type(spec).__name__}.")
        shapes = {}
        for name, value in spec.items():
            if isinstance(value, dict):
                if not {"min", "opt", "max"} <= set(value):
                    raise BuildError(f"Profile for input {name!r} is a mapping without min, opt and max shapes.")
                value = (value["min"], value["opt"], value["max"])
            if isinstance(value, np.ndarray):
                value = value.tolist()
            if not isinstance(value, (list, tuple)):
                raise BuildError(f"Profile for input {name!r} is {type(value).__name__}; give a shape (a list of "
                                 f"ints) or (min, opt, max) shapes.")
            if len(value) == 3 and all(isinstance(v, (list, tuple)) for v in value):
                mn, opt, mx = (_dims(name, v) for v in value)
            else:                       # one static shape
                mn = opt = mx = _dims(name, value)
            for which, dims in (("min", mn), ("opt", opt), ("max", mx)):
                if any(d < 0 for d in dims):
                    raise BuildError(
                        f"Profile for input {name!r} has {which} shape {list(dims)}; a profile gives every dim a "
                        f"size (0 or more; -1 marks a dynamic dim in a model, not in a profile), e.g. "
                        f"{list(max(d, 1) for d in dims)}.")
            if not (len(mn) == len(opt) == len(mx)):
                raise BuildError(f"Profile for input {name!r} has min/opt/max of different ranks: {mn}, {opt}, {mx}.")
            _check_order(name, mn, opt, mx)
            shapes[name] = (mn, opt, mx)
        return cls(shapes)

    def to_json(self) -> dict[str, dict[str, list[int]]]:
        return {n: {"min": list(a), "opt": list(b), "max": list(c)} for n, (a, b, c) in self.shapes.items()}


def _check_order(name: str, mn: tuple[int, ...], opt: tuple[int, ...], mx: tuple[int, ...]) -> None:
    """Refuse, naming the first offending dim and its three values, a profile without min <= opt <= max."""
    for i, (a, b, c) in enumerate(zip(mn, opt, mx)):
        if a > c:
            raise BuildError(f"Profile for input {name!r} has min {a} > max {c} in dim {i} (min {a}, opt {b}, "
                             f"max {c}); give min <= opt <= max in every dim.")
        if not a <= b <= c:
            raise BuildError(f"Profile for input {name!r} has opt {b} outside [min {a}, max {c}] in dim {i} (min {a}, "
                             f"opt {b}, max {c}); give an opt shape between min and max.")


def _dims(name: str, shape: Any) -> tuple[int, ...]:
    """A profile shape as ints; refuses dims that are not whole numbers (Profile.make refuses negative ones)."""
    if isinstance(shape, np.ndarray):
        shape = shape.tolist()
    if not isinstance(shape, (list, tuple)):
        raise BuildError(f"Profile for input {name!r} has shape {shape!r}; a shape is a list of ints.")
    dims = []
    for d in shape:
        if not _is_int(d):
            raise BuildError(f"Profile for input {name!r} has dim {d!r} in shape {list(shape)!r}; dims are whole "
                             f"numbers.")
        dims.append(int(d))
    return tuple(dims)


@dataclass
class BuildConfig:
    """How to build: precision, target device, shapes, effort.

    ``profiles`` is one mapping ``{input: (min, opt, max)}`` (or a static shape per
    input) or a list of them. ``optimization_level`` 0 takes the first valid tactic
    per layer; higher levels time more candidates on the device (timing cache).
    ``fp32_layers``: in an FP16/BF16 build, layers whose name or ONNX node name matches one of these
    fnmatch patterns run in FP32 with FP32 weights (TensorRT's per-layer precision constraint), for
    layers whose FP16 rounding costs too much accuracy; ``kiln compare --per-layer`` finds them.
    """

    precision: str = "fp32"
    device: str | None = None          # "cpu", "cuda", or None for cuda when available
    profiles: Any = None
    workspace: int | None = None       # bytes the build may use for activations and scratch
    optimization_level: int = 3
    timing_cache: str | None = None
    cuda_graph: bool = True
    fp32_layers: tuple[str, ...] = ()  # fnmatch patterns of layers kept in FP32 in an FP16/BF16 build
    fallback: str | None = None        # "onnxruntime": build the network's ONNX Runtime islands (kiln.onnx.fallback)
    quantize: str | None = None        # "int8" / "fp8": post-training quantization (kiln.builder.quant)
    calibration: Any = None            # .npy/.npz file, folder of them, or a list of {input: array} batches
    calibrator: str | None = None      # "max", "percentile", "entropy", "mse"; None: default_calibrator
    percentile: float = 99.99          # the percentile calibrator's percent
    calib_cache: str | None = None     # JSON calibration cache: read when it exists, else written
    fp16_layers: tuple[str, ...] = ()  # fnmatch patterns of layers a quantized build leaves unquantized
    calib_preprocess: Any = None       # kiln.builder.quant.images.Preprocess for calibration images
    accuracy: str | None = None        # "rel_l2<=X", "max_abs<=X", "top1_agree>=X": kiln.builder.quant.accuracy
    bias_correction: bool = True       # PTQ corrects conv/FC biases for quantization's mean shift (quant.insert)
    smoothing: bool = True             # INT8 PTQ folds SmoothQuant factors into ReLU-like layer chains (quant.smooth)


    def __post_init__(self) -> None:
        p = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}.get(self.precision,
                                                                                            self.precision)
        if p not in PRECISIONS:
            raise BuildError(f"Precision {self.precision!r} is not one of {', '.join(PRECISIONS)}.")
        self.precision = p
        if self.device not in (None, "cpu", "cuda"):
            raise BuildError(f"Device {self.device!r} is not supported; use 'cpu' or 'cuda'.")
        if not _is_int(self.optimization_level) or not 0 <= self.optimization_level <= 5:
            raise BuildError(f"optimization_level must be an integer 0..5, got {self.optimization_level!r}.")
        self.profile_list()                 # a malformed profile is refused before any work
        if self.workspace is not None and (not _is_int(self.workspace) or self.workspace <= 0):
            raise BuildError(f"workspace is a memory limit in bytes and must be a positive integer, got "
                             f"{self.workspace!r}; leave it None for no limit.")
        if self.timing_cache is not None:
            from kiln.builder.timing_cache import check_cache_path
            self.timing_cache = os.fspath(self.timing_cache)
            check_cache_path(self.timing_cache)
        if isinstance(self.fp32_layers, str):
            self.fp32_layers = tuple(p for p in self.fp32_layers.split(",") if p)
        self.fp32_layers = tuple(self.fp32_layers)
        if self.fallback not in (None, "onnxruntime"):
            raise BuildError(f"fallback {self.fallback!r} is not supported; use 'onnxruntime' (or None for no fallback).")
        self._check_quantize()
        if self.fp32_layers and self.precision not in ("fp16", "bf16") and not self.quantize:
            raise BuildError(f"fp32_layers keeps layers of an FP16 or BF16 build in FP32; this build is already "
                             f"{self.precision}. Add --fp16 or --bf16, or drop --fp32-layers.")

    def _check_quantize(self) -> None:
        if isinstance(self.fp16_layers, str):
            self.fp16_layers = tuple(p for p in self.fp16_layers.split(",") if p)
        self.fp16_layers = tuple(self.fp16_layers)
        if self.quantize is None:
            if self.fp16_layers or self.calibration is not None or self.calib_cache or self.accuracy:
                raise BuildError("fp16_layers, calibration data, a calibration cache and an accuracy target belong to "
                                 "a quantized build; add --int8 (or --fp8), or drop them.")
            return
        if self.accuracy is not None:
            from kiln.builder.quant.accuracy import parse_target
            parse_target(self.accuracy)
        from kiln.builder.quant import MODES
        from kiln.builder.quant.calibrators import check_calibrator, default_calibrator
        if self.quantize not in MODES:
            raise BuildError(f"quantize {self.quantize!r} is not one of {', '.join(MODES)}.")
        if self.calibrator is None:
            self.calibrator = default_calibrator(self.quantize)
        check_calibrator(self.calibrator, self.percentile)
        if self.calib_cache is not None:
            self.calib_cache = os.fspath(self.calib_cache)

    def precision_note(self, device: str) -> str | None:
        """What this precision means on ``device`` when that is not what the flag promises, else None."""
        if device == "cpu":
            return CPU_PRECISION_NOTES.get(self.precision)
        return None

    def resolved_device(self) -> str:
        import torch
        if self.device is None:
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise BuildError("This machine has no CUDA GPU that torch can use; build with device='cpu' "
                             "(--device cpu) or build on the GPU machine the engine is for.")
        return self.device

    def profile_list(self) -> list[Profile]:
        if self.profiles is None:
            return []
        items = self.profiles if isinstance(self.profiles, (list, tuple)) else [self.profiles]
        return [Profile.make(p) for p in items]


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)
