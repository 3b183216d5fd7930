"""Small transformer exports shared by the add+norm and copy tests, with ONNX Runtime as the reference.

- ``bert``: transformers' BertModel (post-LN, eager attention, additive mask from attention_mask);
- ``mha``: pre-LN encoder blocks on ``nn.MultiheadAttention(batch_first=True)``, the form torchvision's
  ViT exports at opset 17 (packed QKV, Transpose/Reshape/Gather chains around the attention).
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import torch

import kiln


def export(model: torch.nn.Module, args: tuple, names: list[str], outputs: list[str],
           axes: dict | None = None) -> bytes:
    """``model`` as ONNX bytes (opset 17, TorchScript exporter); ``axes``: torch.onnx's dynamic_axes."""
    f = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), args, f, input_names=names, output_names=outputs, opset_version=17,
                          dynamo=False, dynamic_axes=axes)
    return f.getvalue()


def bert_module(layers: int = 2) -> tuple[torch.nn.Module, object]:
    """A seeded BertModel (hidden 64, 4 heads, random norm weights and biases) taking (ids, mask) and
    returning the last hidden state; and its config."""
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    cfg = BertConfig(num_hidden_layers=layers, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                     vocab_size=1000, attn_implementation="eager")

    class Bert(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = BertModel(cfg, add_pooling_layer=False)
            for name, p in self.m.named_parameters():     # random norm weights and biases, not 1 and 0
                if name.endswith("LayerNorm.weight"):
                    p.data.uniform_(0.5, 1.5)
                elif p.dim() == 1:
                    p.data.normal_(0.0, 0.2)

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.m(input_ids=ids, attention_mask=mask).last_hidden_state
    return Bert(), cfg


def bert(batch: int = 2, seq: int = 16, layers: int = 2) -> tuple[bytes, dict[str, np.ndarray]]:
    module, cfg = bert_module(layers)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (batch, seq))
    mask = np.ones((batch, seq), np.int64)
    mask[:, seq - seq // 4:] = 0
    model = export(module, (torch.from_numpy(ids), torch.from_numpy(mask)), ["input_ids", "attention_mask"],
                    ["hidden"])
    return model, {"input_ids": ids, "attention_mask": mask}


class EncoderBlock(torch.nn.Module):
    """torchvision's ViT encoder block: LN → MHA → +x → LN → MLP → +."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = torch.nn.LayerNorm(d, eps=1e-6), torch.nn.LayerNorm(d, eps=1e-6)
        self.self_attention = torch.nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 2 * d), torch.nn.GELU(), torch.nn.Linear(2 * d, d))
        for ln in (self.ln_1, self.ln_2):
            ln.weight.data.uniform_(0.5, 1.5)
            ln.bias.data.normal_(0.0, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + y
        return x + self.mlp(self.ln_2(x))


class Encoder(torch.nn.Module):
    def __init__(self, d: int, heads: int, blocks: int) -> None:
        super().__init__()
        self.layers = torch.nn.Sequential(*(EncoderBlock(d, heads) for _ in range(blocks)))
        self.ln = torch.nn.LayerNorm(d, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.layers(x))


def mha(batch: int = 2, seq: int = 10, d: int = 64, heads: int = 4, blocks: int = 2) -> tuple[bytes, dict]:
    torch.manual_seed(0)
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)      # the fused fast path has no ONNX export
    try:
        x = np.random.default_rng(0).standard_normal((batch, seq, d)).astype(np.float32)
        model = export(Encoder(d, heads, blocks), (torch.from_numpy(x),), ["x"], ["y"])
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return model, {"x": x}


def build(model: bytes, feeds: dict[str, np.ndarray], level: int = 3, precision: str = "fp32"):
    profiles = {n: tuple(v.shape) for n, v in feeds.items()}
    return kiln.build(kiln.onnx.parse(model), kiln.BuildConfig(device="cpu", profiles=profiles, precision=precision,
                                                                optimization_level=level))


def check(model: bytes, engine, feeds: dict[str, np.ndarray], tol: float = 2e-5) -> None:
    import onnxruntime as ort
    ref = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, feeds)
    got = list(engine.context().run(feeds).values())
    assert len(got) == len(ref)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)
