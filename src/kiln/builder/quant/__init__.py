"""Post-training quantization: calibrate a float network on the user's data and make it an explicitly
quantized one (Q/DQ layers around convolutions and GEMMs), which the builder then builds like any other.

``quantize(network, config)`` is the builder's hook for ``BuildConfig(quantize="int8", calibration=...)``;
calibrators.py holds the range algorithms, calibrate.py the data and the FP32 runs, smooth.py the activation
smoothing folded into the float network first, insert.py the rewrite,
cache.py the calibration cache, accuracy.py the ``accuracy=`` target and sensitivity search
(kiln.engine.quant_record reads back what the engine header records of it).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple

from kiln.errors import BuildError
from kiln.ir.network import Network
from kiln.builder.quant.calibrators import CALIBRATORS, check_calibrator

MODES = ("int8", "fp8")
__all__ = ["CALIBRATORS", "MODES", "QuantPlan", "check_device", "dequantized_note", "evaluator", "plan", "quantize",
           "quantized"]


def dequantized_note(layers: list[dict[str, Any]], device: str) -> str | None:
    """One line saying what an engine with Q/DQ layers (its plan ``layers``) computes on ``device``; None for
    an engine without them."""
    if not any(layer.get("kind") in ("QuantizeLinear", "DequantizeLinear") for layer in layers):
        return None
    if device == "cuda":
        return ("the engine's remaining Q/DQ layers (those the 8-bit fold left, named in its warnings) run "
                "dequantized: float arithmetic on 8-bit-rounded values.")
    return ("the engine's Q/DQ layers run dequantized (float arithmetic on 8-bit-rounded values): 8-bit kernels "
            "are GPU-only.")


def check_device(mode: str, device: str, capability: tuple[int, int] | None = None) -> None:
    """Refuse a quantization mode the device cannot run: FP8 needs FP8 tensor cores (compute capability 8.9
    or later)."""
    if mode not in MODES:
        raise BuildError(f"Quantization {mode!r} is not one of {', '.join(MODES)}.")
    if mode != "fp8":
        return
    if device != "cuda":
        raise BuildError("--fp8 needs a GPU with FP8 tensor cores (compute capability 8.9 or later, e.g. L4, "
                         "H100); a CPU build cannot use it. Use --int8, or build on such a GPU.")
    if capability is None:
        import torch
        capability = torch.cuda.get_device_capability()
    if tuple(capability) < (8, 9):
        raise BuildError(f"--fp8 needs FP8 tensor cores (compute capability 8.9 or later); this GPU is "
                         f"{capability[0]}.{capability[1]}. Use --int8.")


class QuantPlan(NamedTuple):
    """What a post-training quantization of a network quantizes: the layers (by name, in network order), the
    amax of every activation they read, the calibration batches (None when the ranges came from a cache) and, for
    bias correction, the float and quantized mean input of each weight position of its convolutions and
    fully-connected layers, by layer name (empty without it; calibrate.window_means); and the smoothing factors by
    activation tensor (empty without smoothing; smooth.py). The ranges and means are those of the smoothed
    network."""

    layers: list[str]
    amax: dict[str, float]
    batches: list | None
    means: dict[str, tuple] = {}
    smooth: dict[str, Any] = {}


def plan(network: Network, config: Any, progress: Callable[[str, float], None] | None = None,
         need_batches: bool = False) -> QuantPlan:
    """The layers ``config`` quantizes in ``network`` and their activation ranges, read from
    ``config.calib_cache`` or found by calibrating on ``config.calibration`` (read even with a cache when
    ``need_batches``)."""
    from kiln.builder.precision import fp32_matches
    from kiln.builder.quant import cache
    from kiln.builder.quant import smooth
    from kiln.builder.quant.calibrate import calibrate, load_batches, window_means
    from kiln.builder.quant.insert import corrects_bias, refuse_quantized, targets
    mode = config.quantize
    device = config.resolved_device()
    check_device(mode, device)
    check_calibrator(config.calibrator, config.percentile)
    refuse_quantized(network)
    exclude = fp32_matches(network, config.fp32_layers) | _matches(network, config.fp16_layers, "--fp16-layers")
    chosen = targets(network, exclude)
    if not chosen:
        raise BuildError(f"--{mode} found no convolution, fully-connected layer or GEMM/matmul with a constant "
                         f"weight to quantize in {network.name!r}; build it without --{mode}.")
    names = list(dict.fromkeys(t.layer.inputs[i].name for t in chosen for i in t.acts))
    correct = bool(config.bias_correction)
    corrected = [t.layer for t in chosen if correct and corrects_bias(t)]
    sites = smooth.sites(network, chosen) if config.smoothing and mode == "int8" else []
    model = cache.fingerprint(network)
    how = cache.settings(config.calibrator, config.percentile, mode, correct, smooth.ALPHA if sites else None)
    found = cache.load(config.calib_cache, model, how, names, [layer.name for layer in corrected],
                       {s.tensor: s.channels for s in sites}) if config.calib_cache else None
    amax, means, factors = found if found is not None else (None, {}, {})
    batches = None
    if amax is None or need_batches:
        if config.calibration is None:
            why = ("calibration data" if amax is None else
                   "calibration data to measure the error on (--accuracy, compare --per-layer)")
            raise BuildError(f"--{mode} needs {why}: give --calib DIR|FILE.npz|FILE.npy"
                             f"{' (or an existing --calib-cache)' if amax is None else ''}.")
        batches = load_batches(config.calibration, network, config.calib_preprocess)
    if amax is None:
        (progress or (lambda stage, frac: None))("calibrate", 0.0)
        maxima, factors = smooth.calibrate(network, sites, names, batches, device) if sites else (None, {})
        net = smooth.smoothed(network, factors)
        amax = calibrate(net, names, batches, device, config.calibrator, config.percentile, mode=mode, maxima=maxima)
        means = window_means(net, corrected, amax, batches, device, mode) if corrected else {}
        if config.calib_cache:
            cache.save(config.calib_cache, model, how, amax, means, factors)
    return QuantPlan([t.layer.name for t in chosen], amax, batches, means, factors)


def quantized(network: Network, layers: Iterable[str], amax: dict[str, float], mode: str,
              means: dict[str, tuple] | None = None, factors: dict[str, Any] | None = None) -> Network:
    """A copy of ``network``, smoothed by ``factors`` (smooth.smoothed), with Q/DQ layers around the ``layers``
    named (scales from ``amax``; bias correction from ``means``, see insert.insert); its
    ``metadata["quantization"]["layers"]`` records each quantized layer's scales."""
    from kiln.builder.quant.insert import insert, targets
    from kiln.builder.quant.smooth import smoothed
    names = set(layers)
    net = smoothed(network, factors or {})
    chosen = [t for t in targets(net, set()) if t.layer.name in names]
    net.metadata["quantization"] = {"layers": insert(net, chosen, amax, mode, means)}
    return net


def evaluator(network: Network, p: QuantPlan, config: Any):
    """An accuracy.Evaluator of ``network`` quantized as ``p`` says, on its calibration batches, built as
    ``config`` builds (device, float precision, FP32 layers)."""
    from kiln.builder.quant.accuracy import Evaluator
    return Evaluator(network, lambda names: quantized(network, names, p.amax, config.quantize, p.means,
                                                                p.smooth), p.batches,
                     config.resolved_device(), config.precision, config.fp32_layers)


def quantize(network: Network, config: Any, progress: Callable[[str, float], None] | None = None,
             planned: QuantPlan | None = None) -> Network:
    """A copy of ``network`` with Q/DQ layers around the layers ``config`` quantizes (``planned``, or see
    ``plan``); with ``config.accuracy``, the fewest layers the target needs stay unquantized (accuracy.search),
    and ``metadata["quantization"]["accuracy"]`` says which and what was measured; ``["bias_correction"]`` says
    whether biases were corrected."""
    from kiln.builder.quant.accuracy import parse_target, samples, search
    from kiln.engine.quant_record import finite_or_none
    say = progress or (lambda stage, frac: None)
    accuracy = config.accuracy
    p = planned or plan(network, config, say, need_batches=bool(accuracy))
    layers = p.layers
    record = None
    if accuracy:
        target = parse_target(accuracy)
        say("accuracy", 0.0)
        found = search(evaluator(network, p, config), layers, target, config.precision,
                       progress=lambda frac: say("accuracy", frac))
        layers = [n for n in layers if n not in found.kept]
        record = {"target": str(target), "metric": target.metric, "achieved": finite_or_none(found.achieved),
                  "all_quantized": finite_or_none(found.quantized_metric), "kept": found.kept, "quantized": len(layers),
                  "samples": samples(p.batches)}
    net = quantized(network, layers, p.amax, config.quantize, p.means, p.smooth)
    net.metadata["quantization"]["bias_correction"] = bool(config.bias_correction)
    if record is not None:
        net.metadata["quantization"]["accuracy"] = record
    return net


def _matches(net: Network, patterns, flag: str) -> set[int]:
    """fp32_matches for another flag's patterns (its error names that flag)."""
    try:
        from kiln.builder.precision import fp32_matches
        return fp32_matches(net, patterns)
    except BuildError as exc:
        raise BuildError(str(exc).replace("--fp32-layers", flag)) from None
