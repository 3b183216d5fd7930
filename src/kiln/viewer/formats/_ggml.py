"""GGML block quantization decoded to float32: the legacy 32-element types and the 256-element K-quants.

Layouts follow ggml's block structs (little-endian, FP16 scales): Q4_0 ``d, qs[16]``; Q4_1 ``d, m, qs[16]``;
Q5_0 ``d, qh[4], qs[16]``; Q5_1 ``d, m, qh[4], qs[16]``; Q8_0 ``d, qs[32]``;
Q2_K ``scales[16], qs[64], d, dmin``; Q3_K ``hmask[32], qs[64], scales[12], d``; Q4_K ``d, dmin, scales[12],
qs[128]``; Q5_K ``d, dmin, scales[12], qh[32], qs[128]``; Q6_K ``ql[128], qh[64], scales[16], d``.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

_U8 = np.uint8


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The FP16 field at byte ``at`` of every block, as a float32 column."""
    return blocks[:, at:at + 2].copy().view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Low nibbles of all bytes, then high nibbles (the order the 32-element types store them in)."""
    return np.concatenate([qs & 0xF, qs >> 4], axis=1).astype(np.int32)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: bit j of the little-endian 32-bit ``qh`` as the fifth bit (16) of element j."""
    bits = qh.copy().view("<u4").astype(np.int64) >> np.arange(32)
    return ((bits & 1) << 4).astype(np.int32)


def _q4_0(b: np.ndarray) -> np.ndarray:
    return (_nibbles(b[:, 2:18]) - 8) * _f16(b, 0)


def _q4_1(b: np.ndarray) -> np.ndarray:
    return _nibbles(b[:, 4:20]) * _f16(b, 0) + _f16(b, 2)


def _q5_0(b: np.ndarray) -> np.ndarray:
    return ((_nibbles(b[:, 6:22]) | _high_bits(b[:, 2:6])) - 16) * _f16(b, 0)


def _q5_1(b: np.ndarray) -> np.ndarray:
    return (_nibbles(b[:, 8:24]) | _high_bits(b[:, 4:8])) * _f16(b, 0) + _f16(b, 2)


def _q8_0(b: np.ndarray) -> np.ndarray:
    return b[:, 2:34].view(np.int8).astype(np.float32) * _f16(b, 0)


def _two_bit_planes(qs: np.ndarray) -> np.ndarray:
    """Q2_K/Q3_K: per 128-element half (32 bytes of ``qs``), the 2-bit fields at shifts 0, 2, 4, 6 in turn."""
    halves = [qs[:, 32 * h:32 * h + 32] for h in range(qs.shape[1] // 32)]
    return np.concatenate([(q >> (2 * j)) & 3 for q in halves for j in range(4)], axis=1).astype(np.int32)


def _q2_k(b: np.ndarray) -> np.ndarray:
    sc = np.repeat(b[:, :16], 16, axis=1)                                   # one scale byte per 16 elements
    d, dmin = _f16(b, 80), _f16(b, 82)
    return d * (sc & 0xF) * _two_bit_planes(b[:, 16:80]) - dmin * (sc >> 4)


def _q3_k_scales(raw: np.ndarray) -> np.ndarray:
    """The 16 signed 6-bit scales packed in 12 bytes: low 4 bits from bytes 0-7, high 2 bits from bytes 8-11."""
    low = np.concatenate([raw[:, :8] & 0xF, raw[:, :8] >> 4], axis=1).astype(np.int32)
    high = np.concatenate([(raw[:, 8:12] >> (2 * k)) & 3 for k in range(4)], axis=1).astype(np.int32)
    return (low | (high << 4)) - 32


def _q3_k(b: np.ndarray) -> np.ndarray:
    hmask = b[:, :32]
    high = np.concatenate([(hmask >> i) & 1 for i in range(8)], axis=1).astype(np.int32)   # bit i: 32 elements
    q = _two_bit_planes(b[:, 32:96]) - 4 * (1 - high)
    return _f16(b, 108) * np.repeat(_q3_k_scales(b[:, 96:108]), 16, axis=1) * q


def _k_scales_mins(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: eight 6-bit scales and eight 6-bit mins packed in 12 bytes."""
    r = raw.astype(np.int32)
    sc = np.concatenate([r[:, 0:4] & 63, (r[:, 8:12] & 0xF) | ((r[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([r[:, 4:8] & 63, (r[:, 8:12] >> 4) | ((r[:, 4:8] >> 6) << 4)], axis=1)
    return np.repeat(sc, 32, axis=1), np.repeat(mn, 32, axis=1)            # each covers 32 elements


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: per 32 bytes, their low nibbles then their high nibbles."""
    return np.concatenate([_nibbles(qs[:, 32 * c:32 * c + 32]) for c in range(4)], axis=1)


def _q4_k(b: np.ndarray) -> np.ndarray:
    sc, mn = _k_scales_mins(b[:, 4:16])
    return _f16(b, 0) * sc * _k_nibbles(b[:, 16:144]) - _f16(b, 2) * mn


def _q5_k(b: np.ndarray) -> np.ndarray:
    sc, mn = _k_scales_mins(b[:, 4:16])
    qh = b[:, 16:48]
    high = np.concatenate([(qh >> i) & 1 for i in range(8)], axis=1).astype(np.int32) << 4
    return _f16(b, 0) * sc * (_k_nibbles(b[:, 48:176]) | high) - _f16(b, 2) * mn


def _q6_k(b: np.ndarray) -> np.ndarray:
    parts = []
    for h in range(2):                                                       # two halves of 128 elements
        ql, qh = b[:, 64 * h:64 * h + 64], b[:, 128 + 32 * h:160 + 32 * h]
        for k, low in enumerate((ql[:, :32] & 0xF, ql[:, 32:] & 0xF, ql[:, :32] >> 4, ql[:, 32:] >> 4)):
            parts.append((low | (((qh >> (2 * k)) & 3) << 4)).astype(np.int32) - 32)
    sc = np.repeat(b[:, 192:208].view(np.int8).astype(np.float32), 16, axis=1)
    return _f16(b, 208) * sc * np.concatenate(parts, axis=1)


DECODERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1, "Q8_0": _q8_0,
    "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k,
}


def dequantize(tname: str, data: bytes, block_bytes: int) -> np.ndarray | None:
    """The float32 values of ``data`` (whole blocks of type ``tname``), or None for a type not decoded here."""
    decode = DECODERS.get(tname)
    if decode is None:
        return None
    blocks = np.frombuffer(data, dtype=_U8).reshape(-1, block_bytes)
    return decode(blocks).astype(np.float32).reshape(-1)
