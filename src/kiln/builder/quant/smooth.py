"""Activation smoothing before 8-bit quantization: the input channels of a quantized layer are rescaled so that
their ranges are closer to one another, the factor moved into the layer's weight (SmoothQuant, Xiao et al. 2023,
``s = amax(x_c)^alpha / amax(w_c)^(1 - alpha)``), and the division folded, exactly, into the float layer that
makes the input (as cross-layer equalization, Nagel et al. 2019, folds its factors through ReLU).

A per-tensor activation scale serves every channel of a tensor alike, so a channel whose range is a tenth of the
widest one gets a tenth of the codes; per-channel weight scales absorb a per-input-channel factor at the cost
of coarser steps for the weight rows the large factors inflate. ``alpha`` balances the two.

A site is a quantized activation ``x`` whose value is ``act(producer(...))``: the producer a convolution,
fully-connected layer or matmul with a constant weight (and constant bias), then only layers that commute with a
positive per-channel factor (ReLU, leaky ReLU, max/average pooling, batch norm, a constant bias add along the
channels, Identity, Flatten), each tensor on the way read by the next layer alone, and ``x`` read only by
layers being quantized. Then ``x / s`` is ``producer`` with its output channel ``c``'s weights and bias divided
by ``s_c``, and each reader computes the same with its weight's input channel ``c`` times ``s_c``. Per-channel
weight scales make the producer's own 8-bit codes unchanged. Anything else (hard-swish, SiLU, a residual add, a
second reader) is not a site: the factor could not be folded without a new layer.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import numpy as np

from kiln.errors import BuildError
from kiln.ir.network import Layer, Network

ALPHA = 0.5                # SmoothQuant's default migration strength
_HOMOGENEOUS = ("relu", "leaky_relu")     # f(x / s) = f(x) / s for s > 0


class Site(NamedTuple):
    """A quantized activation ``tensor`` whose channels can be rescaled: the ``producer`` that makes it (its
    weight's output-channel axis ``out_axis``), the ``chain`` of layers between, the ``readers`` (each with its
    weight's input-channel axis) and the axis the readers see the channels along: 1 (NCHW), or -1 (the last axis;
    after a Flatten each channel is a run of consecutive features)."""

    tensor: str
    producer: Layer
    out_axis: int
    chain: list[Layer]
    readers: list[tuple[Layer, int]]
    channel_axis: int

    @property
    def channels(self) -> int:
        return int(self.producer.inputs[1].value.shape[self.out_axis])


def _weight_out_axis(layer: Layer) -> int | None:
    """The output-channel axis of a producer's constant weight, or None when it cannot take a factor."""
    ins, a = layer.inputs, layer.attrs
    if layer.kind not in ("Convolution", "FullyConnected", "MatMul") or len(ins) < 2 or ins[1] is None \
            or not ins[1].is_constant or ins[1].dtype != "float32":
        return None
    if len(ins) > 3 or (len(ins) > 2 and ins[2] is not None and not ins[2].is_constant):
        return None
    if a.get("activation") not in (None, *_HOMOGENEOUS) or a.get("residual"):
        return None
    w = ins[1].value
    if layer.kind == "MatMul":
        return (0 if a.get("transpose_b") else 1) if w.ndim == 2 and not a.get("transpose_a") else None
    return 0 if w.ndim >= 2 else None


def _reader_in_axis(layer: Layer, out_axis: int) -> int | None:
    """A quantized reader's weight input-channel axis (the one its activation's channels meet)."""
    w = layer.inputs[1].value
    if layer.kind == "Convolution":
        return 1 if layer.attrs.get("groups", 1) == 1 else None
    return 1 - out_axis if w.ndim == 2 else None


def _commutes(layer: Layer) -> bool:
    """Whether ``layer`` (reading the chain at position 0) commutes with a positive per-channel factor, given
    that a bias add's constant runs along the channels (checked by ``_bias_axis``)."""
    k, a = layer.kind, layer.attrs
    if k == "Activation":
        return a.get("type") in _HOMOGENEOUS
    if k == "Pooling":
        return a.get("type") in ("max", "average") and not a.get("return_indices")
    if k == "ElementWise":
        return a.get("op") == "sum" and len(layer.inputs) == 2 and layer.inputs[1] is not None \
            and layer.inputs[1].is_constant
    if k == "Normalization":       # batch norm: y = scale * (x - mean) / sqrt(var + eps) + bias
        ins = layer.inputs
        return a.get("type") == "batch" and len(ins) == 5 and all(
            t is not None and t.is_constant and t.value.ndim == 1 for t in ins[1:])
    return k == "Identity" or (k == "Flatten" and a.get("axis", 1) == 1)


def sites(net: Network, quantized: Sequence) -> list[Site]:
    """The sites among the activations read by ``quantized`` (insert.Target list), one per tensor."""
    targets = {id(t.layer): t for t in quantized}
    outputs = {t.name for t in net.outputs}
    found: dict[str, Site] = {}
    for t in quantized:
        x = t.layer.inputs[0]
        if x.name in found or x.name in outputs or x.producer is None:
            continue
        readers = [(layer, _reader_in_axis(layer, targets[id(layer)].axis)) if pos == 0 and id(layer) in targets
                   else (layer, None) for layer, pos in x.uses]
        if any(ax is None for _, ax in readers):
            continue
        chain: list[Layer] = []
        y = x
        while y.producer is not None and _weight_out_axis(y.producer) is None and _commutes(y.producer):
            chain.insert(0, y.producer)
            y = y.producer.inputs[0]
            if len(y.uses) != 1 or y.name in outputs:
                break
        producer = y.producer
        if producer is None or _weight_out_axis(producer) is None or (y is not x and len(y.uses) != 1) \
                or (y is not x and y.name in outputs):
            continue
        kinds = {layer.kind for layer in chain}
        conv_readers = {r.kind == "Convolution" for r, _ in readers}
        if producer.kind == "Convolution" and "Flatten" not in kinds and conv_readers == {True}:
            axis = 1
        elif conv_readers == {False} and ("Flatten" in kinds if producer.kind == "Convolution"
                                          else not kinds & {"Pooling", "Flatten"}):
            axis = -1
        else:
            continue
        if any(layer.kind == "ElementWise" and _bias_axis(layer, producer, axis, "Flatten" in kinds) is None
               for layer in chain):
            continue
        found[x.name] = Site(x.name, producer, _weight_out_axis(producer), chain, readers, axis)
    return list(found.values())


def _bias_axis(layer: Layer, producer: Layer, axis: int, flat: bool) -> int | None:
    """The axis along which a chain's bias constant holds one value per channel, or None when it is not such a
    constant (a Flatten's features, a scalar, another axis)."""
    c = layer.inputs[1].value
    n = int(producer.inputs[1].value.shape[_weight_out_axis(producer)])
    at = c.ndim - (producer.inputs[1].value.ndim - 1) if axis == 1 else c.ndim - 1
    if flat or at < 0 or c.shape[at] != n or any(d != 1 for i, d in enumerate(c.shape) if i != at):
        return None
    return at


def channel_amax(x: np.ndarray, site: Site) -> np.ndarray:
    """The largest magnitude of each producer channel in the site's activation ``x`` (a Flatten's features of one
    channel together)."""
    v = np.abs(np.asarray(x, np.float64))
    if site.channel_axis == 1:
        return v.max(axis=(0, *range(2, v.ndim))) if v.ndim > 2 else v.max(axis=0)
    v = v.reshape(-1, site.channels, v.shape[-1] // site.channels)
    return v.max(axis=(0, 2))


def factors(site: Site, amax: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """SmoothQuant's per-channel factor ``amax(x_c)^alpha / amax(w_c)^(1 - alpha)`` (``w_c``: every reader's
    weights for channel c), divided by their geometric mean so the activation keeps its magnitude; a channel that
    was always zero, or whose weights are, keeps the geometric mean (factor 1 after the division)."""
    w = np.zeros(site.channels)
    for layer, ax in site.readers:
        v = np.abs(layer.inputs[1].value.astype(np.float64))
        col = np.moveaxis(v, ax, 0).reshape(v.shape[ax], -1).max(axis=1)
        w = np.maximum(w, col.reshape(site.channels, -1).max(axis=1))
    a = np.asarray(amax, np.float64)
    ok = (a > 0) & (w > 0) & np.isfinite(a)
    s = np.ones(site.channels)
    if ok.any():
        s[ok] = a[ok] ** alpha / w[ok] ** (1.0 - alpha)
        s[ok] /= np.exp(np.mean(np.log(s[ok])))
    return s


def apply(net: Network, found: Sequence[Site], scale: Mapping[str, np.ndarray]) -> None:
    """Rescale ``net`` in place (its function unchanged up to float rounding): each site's producer's output
    channels divided by ``scale[site.tensor]``, its chain's bias constants and batch-norm means and biases too, its
    readers' weight input channels multiplied. New constants are made, so a weight shared with another layer is
    left as it is."""
    for site in found:
        if site.tensor not in scale:
            continue
        s = np.asarray(scale[site.tensor], np.float64)
        p = site.producer
        _set(net, p, 1, _along(p.inputs[1].value, s, site.out_axis, divide=True))
        if len(p.inputs) > 2 and p.inputs[2] is not None:
            _set(net, p, 2, _along(p.inputs[2].value, s, p.inputs[2].value.ndim - 1, divide=True))
        for layer in site.chain:
            if layer.kind == "ElementWise":
                at = _bias_axis(layer, p, site.channel_axis, False)
                _set(net, layer, 1, _along(layer.inputs[1].value, s, at, divide=True))
            elif layer.kind == "Normalization":      # reads x / s: its mean and bias take 1 / s too
                for i in (2, 3):
                    _set(net, layer, i, _along(layer.inputs[i].value, s, 0, divide=True))
        for layer, ax in site.readers:
            w = layer.inputs[1].value
            rep = np.repeat(s, w.shape[ax] // len(s))
            _set(net, layer, 1, _along(w, rep, ax, divide=False))


def _along(v: np.ndarray, s: np.ndarray, axis: int, divide: bool) -> np.ndarray:
    shape = [1] * v.ndim
    shape[axis] = -1
    f = s.reshape(shape)
    return (v.astype(np.float64) / f if divide else v.astype(np.float64) * f).astype(v.dtype)


def _set(net: Network, layer: Layer, i: int, value: np.ndarray) -> None:
    old = layer.inputs[i]
    layer.set_input(i, net.add_constant(value, name=net.unique_name(f"{old.name}_smoothed")))


def calibrate(net: Network, found: Sequence[Site], names: Sequence[str], batches: list, device: str,
              alpha: float = ALPHA) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """One FP32 run of ``net`` over the calibration batches: the smoothing factors of the sites ``found`` (from
    each channel's largest magnitude) and the largest magnitude of every tensor of ``names`` in the smoothed
    network (a site's: its channels' maxima divided by their factors), so the max calibrator needs no second run."""
    from kiln.builder.quant.calibrate import observe
    by_name = {s.tensor: s for s in found}
    peak = {n: np.zeros(by_name[n].channels) if n in by_name else 0.0 for n in names}

    def take(values: dict[str, np.ndarray]) -> None:
        for n, v in values.items():
            v = np.asarray(v, np.float64)
            v = np.where(np.isfinite(v), v, 0.0)
            peak[n] = np.maximum(peak[n], channel_amax(v, by_name[n]) if n in by_name else np.abs(v).max(initial=0.0))
    observe(net, names, batches, device, take)
    scale = {n: factors(s, peak[n], alpha) for n, s in by_name.items()}
    maxima = {n: float(np.max(peak[n] / scale[n], initial=0.0)) if n in scale else float(peak[n]) for n in names}
    return maxima, scale


def smoothed(net: Network, scale: Mapping[str, np.ndarray]) -> Network:
    """A copy of ``net`` with the factors ``scale`` (by activation tensor) folded in (``apply``); a tensor that is
    not a site of the copy is refused."""
    import copy

    from kiln.builder.quant.insert import targets
    out = copy.deepcopy(net)
    if not scale:
        return out
    found = [s for s in sites(out, targets(out, set())) if s.tensor in scale]
    bad = sorted(set(scale) - {s.tensor for s in found})
    bad += [s.tensor for s in found if len(scale[s.tensor]) != s.channels]
    if bad:
        raise BuildError(f"Smoothing factors for {bad[0]!r} do not fit this network "
                         f"(no such rescalable activation, or another channel count); give a new --calib-cache path "
                         f"to calibrate again.")
    apply(out, found, scale)
    return out
