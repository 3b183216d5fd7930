"""Calibration data and activation ranges: read the user's tensors, run the FP32 network on them with Kiln's
own engine (the tensors to observe marked as extra outputs), and reduce what each tensor took to one amax
with a calibrator.

Calibration data is a ``.npy`` file (single-input models), an ``.npz`` file (one array per input name), a
folder of such files (sorted by name) or of images (images.py, single image input), or, from Python, a list
of ``{input: array}`` batches. Arrays hold
samples along their first axis; a model whose batch dim is fixed at B is fed B samples at a time, one whose
batch dim is dynamic at most ``CALIB_BATCH``.
"""
from __future__ import annotations

import copy
import itertools
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from kiln.errors import BuildError
from kiln.ir.dtypes import np_dtype
from kiln.ir.network import Layer, Network
from kiln.builder.quant.calibrators import Histogram, entropy_amax, fake_quantize, mse_amax, percentile_amax
from kiln.builder.quant.images import IMAGE_EXTENSIONS, Preprocess, read_images

CALIB_BATCH = 32
Batch = dict[str, np.ndarray]


def load_batches(source: Any, net: Network, prep: Preprocess | None = None) -> list[Batch]:
    """The calibration batches ``source`` gives for ``net``'s inputs, each checked against the input's
    dtype and static dims; images are preprocessed by ``prep``."""
    if isinstance(source, (str, os.PathLike)):
        files = _files(os.fspath(source))
        images = [p for p in files if p.lower().endswith(IMAGE_EXTENSIONS)]
        arrays = [_read(p, net) for p in files if p not in images]
        if images:
            if len(net.inputs) != 1:
                raise BuildError(f"Calibration images feed a model with one input; this one has "
                                 f"{[t.name for t in net.inputs]}: give an .npz per batch instead.")
            arrays.append({net.inputs[0].name: read_images(images, list(net.inputs[0].shape or []),
                                                           prep or Preprocess())})
    elif isinstance(source, Mapping):
        arrays = [dict(source)]
    elif isinstance(source, Sequence) and all(isinstance(b, Mapping) for b in source):
        arrays = [dict(b) for b in source]
    else:
        raise BuildError(f"Calibration data is a path (.npy, .npz or a folder of them) or a list of "
                         f"{{input: array}} batches, not {type(source).__name__}.")
    batches = [b for a in arrays for b in _split(_checked(a, net), net)]
    if not batches:
        raise BuildError("The calibration data holds no samples; give at least one batch of inputs.")
    return batches


def _files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise BuildError(f"Calibration data {path!r} does not exist; give a .npy or .npz file or a folder of them.")
    try:
        names = sorted(os.listdir(path))
    except OSError as exc:
        raise BuildError(f"Calibration folder {path!r} cannot be read ({exc.strerror or exc}); check its "
                         f"permissions.") from None
    files = [os.path.join(path, n) for n in names if n.lower().endswith((".npy", ".npz") + IMAGE_EXTENSIONS)
             and os.path.isfile(os.path.join(path, n))]
    if not files:
        raise BuildError(f"Calibration folder {path!r} holds no .npy, .npz or image files; give the inputs as "
                         f"numpy files (numpy.save) or images ({', '.join(IMAGE_EXTENSIONS)}).")
    return files


def _read(path: str, net: Network) -> dict[str, np.ndarray]:
    names = [t.name for t in net.inputs]
    try:
        if path.lower().endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise BuildError(f"Calibration file {path!r} is not a readable numpy file "
                         f"({' '.join(str(exc).split()) or type(exc).__name__}); save it with numpy.save/savez.") \
            from None
    if not isinstance(arr, np.ndarray):
        raise BuildError(f"Calibration file {path!r} is not a numpy array; save it with numpy.save.")
    if len(names) != 1:
        raise BuildError(f"Calibration file {path!r} is one array but the model has inputs {names}; give an .npz "
                         f"with one array per input name (numpy.savez(path, **arrays)).")
    return {names[0]: arr}


def _checked(arrays: dict[str, Any], net: Network) -> Batch:
    names = [t.name for t in net.inputs]
    unknown = [k for k in arrays if k not in names]
    missing = [n for n in names if n not in arrays]
    if unknown or missing:
        raise BuildError(f"Calibration data names inputs {sorted(arrays)} but the model's inputs are {names}; give "
                         f"one array per input, keyed by its name.")
    out = {}
    for t in net.inputs:
        a = np.asarray(arrays[t.name])
        want = np_dtype(t.dtype)
        if a.dtype != want:
            if not (a.dtype.kind == "f" and want.kind == "f"):
                raise BuildError(f"Calibration data for input {t.name!r} is {a.dtype} but the model expects "
                                 f"{want}; convert it (a.astype({want.name!r})).")
            a = a.astype(want)
        dims = list(t.shape or [])
        if t.shape is not None and (a.ndim != len(dims) or any(
                isinstance(d, int) and i > 0 and d != s for i, (d, s) in enumerate(zip(dims, a.shape)))):
            want_s = "x".join(str(d) if isinstance(d, int) else "?" for d in dims)
            raise BuildError(f"Calibration data for input {t.name!r} has shape {list(a.shape)} but the model "
                             f"expects {want_s} (samples along the first axis); preprocess it to that shape.")
        out[t.name] = a
    sizes = {len(a) if a.ndim else 1 for a in out.values()}
    if len(sizes) != 1:
        raise BuildError(f"Calibration arrays hold different numbers of samples ({sorted(sizes)}); give each input "
                         f"the same number.")
    return out


def _split(arrays: Batch, net: Network) -> list[Batch]:
    first = net.inputs[0].shape[0] if net.inputs and net.inputs[0].shape else None
    n = len(next(iter(arrays.values())))
    step = first if isinstance(first, int) and first > 0 else CALIB_BATCH
    if isinstance(first, int) and n % first:
        raise BuildError(f"Calibration data holds {n} samples but the model's batch dim is fixed at {first}; give a "
                         f"multiple of {first}.")
    return [{k: np.ascontiguousarray(a[i:i + step]) for k, a in arrays.items()} for i in range(0, n, step)]


def observe(net: Network, names: Iterable[str], batches: list[Batch], device: str,
            each: Callable[[dict[str, np.ndarray]], None]) -> None:
    """Run ``net`` in FP32 on every batch and call ``each`` with the values of tensors ``names`` (network
    inputs, or intermediates marked as extra outputs of a copy)."""
    names = list(names)
    g = copy.deepcopy(net)
    for n in names:
        if g.tensors[n] not in g.inputs:
            g.mark_output(g.tensors[n])
    ctx = engine_for(g, batches, device).context()
    for b in batches:
        outs = ctx.run(b, outputs=[n for n in names if n not in b])
        each({n: b[n] if n in b else outs[n] for n in names})


def engine_for(net: Network, batches: list[Batch], device: str, precision: str = "fp32",
               fp32_layers: Sequence[str] = ()):
    """An engine of ``net`` for the batches' shapes on ``device``, in ``precision`` (``fp32_layers`` kept in FP32
    in FP16/BF16), with untimed tactics and no CUDA graph: built to be run a few times."""
    from kiln.builder.build import build
    from kiln.builder.config import BuildConfig
    shapes = {t.name: [b[t.name].shape for b in batches] for t in net.inputs}
    profiles = {k: (tuple(np.min(s, axis=0)), tuple(s[-1]), tuple(np.max(s, axis=0))) for k, s in shapes.items()}
    low = precision in ("fp16", "bf16")
    return build(net, BuildConfig(device=device, precision=precision, profiles=profiles, optimization_level=0,
                                  cuda_graph=False, fp32_layers=tuple(fp32_layers) if low else ()))


def calibrate(net: Network, names: Sequence[str], batches: list[Batch], device: str, calibrator: str,
              percentile: float, levels: int = 128, mode: str = "int8",
              maxima: Mapping[str, float] | None = None) -> dict[str, float]:
    """amax per tensor of ``names`` over the calibration batches, by ``calibrator`` (see calibrators.py);
    ``levels`` is the number of magnitude steps of the 8-bit type (entropy), ``mode`` the 8-bit type (mse);
    ``maxima``: each tensor's largest magnitude when already measured (no run for it then)."""
    amax = {n: float(maxima[n]) for n in names} if maxima is not None else {n: 0.0 for n in names}

    def take_max(values: dict[str, np.ndarray]) -> None:
        for n, v in values.items():
            v = np.abs(np.asarray(v, np.float64))
            v = v[np.isfinite(v)]
            if v.size:
                amax[n] = max(amax[n], float(v.max()))
    if maxima is None:
        observe(net, names, batches, device, take_max)
    if calibrator == "max":
        return amax
    hists = {n: Histogram(amax[n]) for n in names}
    observe(net, names, batches, device, lambda values: [hists[n].add(v) for n, v in values.items()])
    if calibrator == "percentile":
        return {n: percentile_amax(h, percentile) for n, h in hists.items()}
    if calibrator == "mse":
        return {n: mse_amax(h, mode) for n, h in hists.items()}
    return {n: entropy_amax(h, levels) for n, h in hists.items()}


def window_means(net: Network, layers: Sequence[Layer], amax: Mapping[str, float], batches: list[Batch],
                 device: str, mode: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per convolution or fully-connected layer of ``layers`` (by name), the mean input each weight position
    reads over the calibration batches and the layer's output positions (zero where its window reaches into
    padding; [C_in, *kernel], or [K] for a fully-connected layer), in float and after symmetric quantization to
    ``mode`` with the range ``amax`` of the input: what bias correction needs (insert.corrected_bias)."""
    from kiln.builder.quant.insert import TYPES, act_scale
    qmax = TYPES[mode][1]
    readers: dict[str, list[Layer]] = {}
    for layer in layers:
        readers.setdefault(layer.inputs[0].name, []).append(layer)
    sums: dict[str, list] = {layer.name: [0.0, 0.0, 0] for layer in layers}

    def add(values: dict[str, np.ndarray]) -> None:
        for n, v in values.items():
            v = np.nan_to_num(np.asarray(v, np.float64), nan=0.0, posinf=0.0, neginf=0.0)
            scale = float(act_scale(amax[n], qmax)) * qmax
            q = fake_quantize(v / scale, mode) * scale
            for layer in readers[n]:
                acc = sums[layer.name]
                (a, k), (b, _) = _window_sums(v, layer), _window_sums(q, layer)
                acc[0], acc[1], acc[2] = acc[0] + a, acc[1] + b, acc[2] + k
    observe(net, list(readers), batches, device, add)
    return {n: (np.asarray(a / max(k, 1)), np.asarray(b / max(k, 1))) for n, (a, b, k) in sums.items()}


def _window_sums(x: np.ndarray, layer: Layer) -> tuple[np.ndarray, int]:
    """The sum, over samples and ``layer``'s output positions, of the input each weight position reads (a
    convolution's zero padding reads 0), and the number of output positions summed."""
    if layer.kind != "Convolution":
        v = x.reshape(-1, x.shape[-1])
        return v.sum(0), len(v)
    kernel = layer.inputs[1].value.shape[2:]
    nd, a = len(kernel), layer.attrs
    stride, dilation = list(a.get("stride") or [1] * nd), list(a.get("dilation") or [1] * nd)
    pads = list(a.get("pads") or [0] * (2 * nd))
    if a.get("auto_pad"):
        pads = _same_pads(x.shape[2:], kernel, stride, dilation, a["auto_pad"])
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    out = [(xp.shape[2 + i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(nd)]
    sums = np.zeros((x.shape[1], *kernel))
    for at in itertools.product(*(range(k) for k in kernel)):
        window = tuple(slice(o * d, o * d + s * (n - 1) + 1, s) for o, d, s, n in zip(at, dilation, stride, out))
        sums[(slice(None), *at)] = xp[(slice(None), slice(None), *window)].sum(axis=(0, *range(2, 2 + nd)))
    return sums, x.shape[0] * int(np.prod(out))


def _same_pads(size: Sequence[int], kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int],
               mode: str) -> list[int]:
    """ONNX auto_pad SAME_UPPER/SAME_LOWER: begins then ends, so that each output size is ceil(size / stride)."""
    total = [max((-(-n // s) - 1) * s + d * (k - 1) + 1 - n, 0) for n, k, s, d in zip(size, kernel, stride, dilation)]
    small = [t // 2 for t in total]
    begin = small if mode == "SAME_UPPER" else [t - h for t, h in zip(total, small)]
    return begin + [t - b for t, b in zip(total, begin)]
