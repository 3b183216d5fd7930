"""Quantized GGUF tensors load as float32 values equal to the gguf library's own dequantization.

Each block is random bytes except its FP16 scale fields, which are set to random signed powers of two: every
product and sum of the decoding is then exact in float32, so Kiln's values must equal the reference exactly,
whatever the order of operations.
"""
from __future__ import annotations

import numpy as np
import pytest

from kiln.errors import ViewerError
from kiln.viewer.formats import open_model
from kiln.viewer.formats._ggml import DECODERS
from kiln.viewer.weights import load

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")
from gguf.quants import dequantize  # noqa: E402

# type -> byte offsets of its FP16 scale fields within a block
SCALES = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
          "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def _blocks(qtype, rows: int, seed: int) -> np.ndarray:
    """``rows`` rows of two random blocks each, scale fields set to +-2**k (k in -12..3)."""
    block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, 2, block_bytes), dtype=np.uint8)
    for at in SCALES[qtype.name]:
        scale = rng.choice([-1.0, 1.0], (rows, 2)) * 2.0 ** rng.integers(-12, 4, (rows, 2))
        raw[:, :, at:at + 2] = scale.astype("<f2")[..., None].view(np.uint8).reshape(rows, 2, 2)
    return raw.reshape(rows, 2 * block_bytes)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """A GGUF file with one 3-row tensor per decoded type, and the raw blocks written for each."""
    path = tmp_path_factory.mktemp("gguf") / "quants.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    written = {}
    for seed, name in enumerate(DECODERS):
        qtype = gguf.GGMLQuantizationType[name]
        written[name] = (qtype, _blocks(qtype, 3, seed))
        writer.add_tensor(f"{name.lower()}.weight", written[name][1], raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, written


def test_decoders_cover_the_common_types():
    assert set(SCALES) == set(DECODERS)


@pytest.mark.parametrize("name", list(SCALES))
def test_dequantized_like_the_gguf_library(quantized, name):
    path, written = quantized
    qtype, raw = written[name]
    w = open_model(path).graph.weights[f"{name.lower()}.weight"]
    want = dequantize(raw, qtype)
    assert w.dtype == name and w.shape == list(want.shape) == [3, 2 * gguf.GGML_QUANT_SIZES[qtype][0]]
    got = w.load()
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    assert np.count_nonzero(got) > got.size // 2


def test_undecoded_type_says_so_in_one_line(tmp_path):
    path = tmp_path / "iq.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    qtype = gguf.GGMLQuantizationType.IQ4_NL
    writer.add_tensor("iq.weight", np.zeros((2, gguf.GGML_QUANT_SIZES[qtype][1]), np.uint8), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    w = open_model(path).graph.weights["iq.weight"]
    assert w.shape == [2, 32] and w.dtype == "IQ4_NL"
    with pytest.raises(ViewerError, match="IQ4_NL") as err:
        load(w)
    assert "\n" not in str(err.value) and "iq.gguf" in str(err.value)


def test_rows_of_partial_blocks_are_refused(tmp_path):
    """ggml stores whole blocks per row: a Q8_0 tensor whose rows are 48 elements long is damaged."""
    path = tmp_path / "bad.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("q.weight", np.zeros((3, 34), np.uint8), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = bytearray(path.read_bytes())
    at = data.index(b"q.weight") + len(b"q.weight")
    assert int.from_bytes(data[at + 4:at + 12], "little") == 32          # n_dims (4 bytes), then ne[0]
    data[at + 4:at + 12] = (48).to_bytes(8, "little")
    data[at + 12:at + 20] = (2).to_bytes(8, "little")                   # 2 rows of 48: 96 values, 3 blocks
    path.write_bytes(bytes(data))
    with pytest.raises(ViewerError, match="rows of 48 elements, not whole blocks of 32") as err:
        open_model(path)
    assert "\n" not in str(err.value)
