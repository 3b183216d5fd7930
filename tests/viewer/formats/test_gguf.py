from __future__ import annotations

import numpy as np
import pytest

from kiln.viewer.formats import open_model

from .conftest import check_damaged, check_detect, check_export, input_weight, node

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")


@pytest.fixture
def gguf_file(tmp_path):
    path = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(2)
    w.add_context_length(128)
    w.add_name("tiny-llama")
    w.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(8, 4))
    w.add_tensor("blk.0.attn_q.weight", np.ones((4, 4), dtype=np.float16))
    w.add_tensor("blk.1.attn_q.weight", np.full((4, 4), 3, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_reads_tensors_and_architecture(gguf_file):
    model = open_model(gguf_file)
    assert model.format == "GGUF"
    assert model.properties["architecture"] == "llama"
    assert model.properties["llama.block_count"] == 2
    assert model.properties["llama.context_length"] == 128
    g = model.graph
    assert g.name == "tiny-llama"
    assert len(g.weights) == 3 and len(g.nodes) == 3
    emb = input_weight(g, node(g, "token_embd"), "weight")
    assert emb.shape == [8, 4] and emb.dtype == "f32"
    assert emb.load()[7, 3] == 31
    q = node(g, "blk.1.attn_q")
    assert q.group == ("blk", "1")
    assert input_weight(g, q, "weight").load()[0, 0] == 3
    assert input_weight(g, node(g, "blk.0.attn_q"), "weight").dtype == "f16"


def test_quantized_tensor_listed(tmp_path):
    path = tmp_path / "q.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    raw = np.zeros((2, 34), dtype=np.uint8)   # two Q8_0 blocks = 64 values
    w.add_tensor("q.weight", raw, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    wt = open_model(path).graph.weights["q.weight"]
    assert wt.dtype == "Q8_0" and wt.shape == [2, 32] and wt.nbytes == 68


def test_detect_and_damage(gguf_file, tmp_path):
    check_detect(gguf_file, tmp_path, "GGUF", ".safetensors")
    check_damaged(gguf_file, tmp_path, magic_len=8)


def test_export(gguf_file, tmp_path):
    check_export(open_model(gguf_file), tmp_path)
