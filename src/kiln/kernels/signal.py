"""Signal processing: DFT, STFT, window functions and the mel filter bank, on torch.fft.

ONNX carries complex numbers as a trailing axis of 2 (real, imaginary) and real signals
as a trailing axis of 1. FFTs run in float32 at least (torch has no half-precision FFT
on the CPU) and are cast back to the input's type.
"""
from __future__ import annotations

import math

import torch

from kiln.errors import ShapeError
from kiln.ir.dtypes import torch_dtype
from kiln.kernels._util import ints, norm_axis
from kiln.kernels.registry import tactic


def _as_complex(x: torch.Tensor) -> torch.Tensor:
    """[..., 1] real or [..., 2] complex → a complex tensor without the trailing axis."""
    work = x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32)
    if work.shape[-1] == 1:
        return torch.complex(work[..., 0], torch.zeros_like(work[..., 0]))
    if work.shape[-1] == 2:
        return torch.complex(work[..., 0].contiguous(), work[..., 1].contiguous())
    raise ShapeError(f"A DFT input's last axis must be 1 (real) or 2 (complex), got {x.shape[-1]}.")


def _fit(z: torch.Tensor, dim: int, n: int) -> torch.Tensor:
    """Truncate or zero-pad ``z`` to length ``n`` along ``dim``."""
    have = z.shape[dim]
    if have >= n:
        return z.narrow(dim, 0, n)
    pad_shape = list(z.shape)
    pad_shape[dim] = n - have
    return torch.cat([z, torch.zeros(pad_shape, dtype=z.dtype, device=z.device)], dim)


@tactic("DFT")
def make_dft(attrs, ctx):
    inverse = bool(attrs.get("inverse", 0))
    onesided = bool(attrs.get("onesided", 0))
    axis_attr = attrs.get("axis", 1)

    def run(x, dft_length=None, axis=None):
        ax = int(axis.reshape(-1)[0].item()) if axis is not None else axis_attr
        ax = norm_axis(ax, x.dim())
        if ax == x.dim() - 1:
            raise ShapeError("DFT's axis cannot be the last one, which holds the real/imaginary parts.")
        z = _as_complex(x)
        n = ints(dft_length)[0] if dft_length is not None else None
        if inverse and onesided:          # Hermitian half-spectrum → real signal [..., n, 1]
            m = z.shape[ax]
            y = torch.fft.irfft(z, n=n if n is not None else 2 * (m - 1), dim=ax)
            return (y.unsqueeze(-1).to(x.dtype),)
        if n is not None:
            z = _fit(z, ax, n)
        y = torch.fft.ifft(z, dim=ax) if inverse else torch.fft.fft(z, dim=ax)
        if onesided:
            y = y.narrow(ax, 0, y.shape[ax] // 2 + 1)
        return (torch.view_as_real(y).to(x.dtype),)
    return run


@tactic("STFT")
def make_stft(attrs, ctx):
    onesided = bool(attrs.get("onesided", 1))

    def run(signal, frame_step, window=None, frame_length=None):
        step = ints(frame_step)[0]
        if frame_length is not None:
            length = ints(frame_length)[0]
        elif window is not None:
            length = window.shape[0]
        else:
            raise ShapeError("STFT needs a window or a frame_length to know the frame size.")
        z = _as_complex(signal)                                  # [batch, signal_length]
        frames = z.unfold(1, length, step)                        # [batch, frames, length]
        if window is not None:
            frames = frames * window.to(frames.real.dtype)
        y = torch.fft.fft(frames, dim=-1)
        if onesided:
            y = y[..., : length // 2 + 1]
        return (torch.view_as_real(y).to(signal.dtype),)
    return run


@tactic("Window")
def make_window(attrs, ctx):
    kind = attrs["type"]
    periodic = bool(attrs.get("periodic", 1))
    out = torch_dtype(attrs.get("to", "float32"))
    dev = ctx.device      # inputs are host values; the window is made where its readers run

    def run(size):
        n = ints(size)[0]
        denom = n if periodic else n - 1
        k = torch.arange(n, dtype=torch.float64)
        phase = 2 * math.pi * k / denom if denom else torch.zeros(n, dtype=torch.float64)
        if kind == "hann":
            w = torch.sin(phase / 2) ** 2
        elif kind == "hamming":
            alpha = 25.0 / 46.0
            w = alpha - (1 - alpha) * torch.cos(phase)
        elif kind == "blackman":
            w = 0.42 - 0.5 * torch.cos(phase) + 0.08 * torch.cos(2 * phase)
        else:
            raise ShapeError(f"Unknown window type {kind!r}; use hann, hamming or blackman.")
        return (w.to(out).to(dev),)
    return run


def _hz_to_mel(hz: float) -> float:
    return 2595.0 * math.log10(1.0 + hz / 700.0)


def _mel_to_hz(mel: float) -> float:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


@tactic("MelWeightMatrix")
def make_mel_weight_matrix(attrs, ctx):
    out = torch_dtype(attrs.get("to", "float32"))
    dev = ctx.device

    def run(num_mel_bins, dft_length, sample_rate, lower_edge_hertz, upper_edge_hertz):
        bins, n_fft, rate = ints(num_mel_bins)[0], ints(dft_length)[0], ints(sample_rate)[0]
        lo = float(lower_edge_hertz.reshape(-1)[0].item())
        hi = float(upper_edge_hertz.reshape(-1)[0].item())
        lo_mel, hi_mel = _hz_to_mel(lo), _hz_to_mel(hi)
        # bins + 2 equally spaced mel points (the ONNX reference divides the range by bins + 2)
        step = (hi_mel - lo_mel) / (bins + 2)
        edges = [int(((n_fft + 1) * _mel_to_hz(lo_mel + i * step)) // rate) for i in range(bins + 2)]
        w = torch.zeros(n_fft // 2 + 1, bins, dtype=torch.float64)
        for i in range(bins):
            left, center, right = edges[i], edges[i + 1], edges[i + 2]
            if center == left:
                w[center, i] = 1.0
            else:
                for j in range(left, center + 1):
                    w[j, i] = (j - left) / (center - left)
            for j in range(center, right):
                w[j, i] = (right - j) / (right - center)
        return (w.to(out).to(dev),)
    return run
