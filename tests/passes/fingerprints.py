"""Fingerprints of optimized networks: what the passes made of the test and zoo models.

A fingerprint lists, in layer order, each layer's kind, name, attributes and the names, shapes and
dtypes of its inputs and outputs. ``tests/passes/test_rewrite_identity.py`` compares them against
``data/rewrite_fingerprints.json``, recorded before the fusion passes became rules, so a rewrite of
the pass machinery that changes any built network fails there.

    TRITON_INTERPRET=1 .venv/bin/python tests/passes/fingerprints.py --record   # rewrite the JSON
    TRITON_INTERPRET=1 .venv/bin/python tests/passes/fingerprints.py --dump DIR # one text file per model

Re-record for a change meant to alter what the passes build, or one that renames what the parser
makes (tensor and layer names are part of the fingerprint), and say which in its commit.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parent / "data" / "rewrite_fingerprints.json"


def _value(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return {"array": v.tolist(), "dtype": str(v.dtype)}
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, dict):
        return {str(k): _value(x) for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))}
    if isinstance(v, (list, tuple)):
        return [_value(x) for x in v]
    if v is None or isinstance(v, (str, int, bool)):
        return v
    return f"<{type(v).__name__}>"     # subgraphs and other objects: their type only


def _tensor(t) -> str:
    if t is None:
        return "-"
    const = "=" if t.is_constant else ""
    return f"{const}{t.name}:{t.dtype}{list(t.shape) if t.shape is not None else '?'}"


def fingerprint(net) -> list[str]:
    """One line per layer, in order, then the network outputs."""
    lines = []
    for layer in net.layers:
        attrs = json.dumps(_value(layer.attrs), sort_keys=True)
        ins = ",".join(_tensor(t) for t in layer.inputs)
        outs = ",".join(_tensor(t) for t in layer.outputs)
        lines.append(f"{layer.kind} {layer.name!r} {attrs} ({ins}) -> ({outs})")
    lines.append("outputs " + ",".join(_tensor(t) for t in net.outputs))
    return lines


def _prepared(path: Path | bytes, profiles: dict) -> list[str]:
    import kiln
    import kiln.onnx
    from unittest import mock

    from kiln.builder.build import prepare
    from kiln.passes import fusion_passes
    net = kiln.onnx.parse(path if isinstance(path, bytes) else str(path))
    # every fusion rule, the GPU-only ones too (Pass.devices), so that the fingerprints cover them on a CPU
    with mock.patch("kiln.builder.build.fusion_passes", lambda device=None: fusion_passes()):
        return fingerprint(prepare(net, kiln.BuildConfig(device="cpu", profiles=profiles)).net)


def cases() -> dict[str, Callable[[Path], list[str]]]:
    """Model name → a maker of its fingerprint (exports into the given folder)."""
    sys.path.insert(0, str(ROOT))
    from tests import _models as tm
    from tests.passes import mini_transformers as mt

    def case(make: Callable) -> Callable[[Path], list[str]]:
        def run(tmp: Path) -> list[str]:
            c = make(tmp)
            return _prepared(c.path, c.profiles())
        return run

    def bytes_case(make: Callable) -> Callable[[Path], list[str]]:
        def run(tmp: Path) -> list[str]:
            model, feeds = make()
            return _prepared(model, {n: tuple(v.shape) for n, v in feeds.items()})
        return run

    def zoo_case(name: str) -> Callable[[Path], list[str]]:
        def run(tmp: Path) -> list[str]:
            sys.path.insert(0, str(ROOT / "benchmarks"))
            from zoo import zoo
            m = zoo(small=True)[name]
            return _prepared(m.export(tmp), m.profiles())
        return run

    out: dict[str, Callable[[Path], list[str]]] = {
        "conv_bn": case(tm.conv_bn), "mini_yolo": case(tm.mini_yolo), "mini_bert": case(tm.mini_bert),
        "rnn": case(tm.rnn), "unet": case(tm.unet), "vit_tiny": case(tm.vit_tiny),
        "mobilenet_v3": case(tm.mobilenet_v3),
        "mt_bert": bytes_case(mt.bert), "mt_mha": bytes_case(mt.mha),
    }
    for name in ("yolov5l", "yolov8l_like", "unet", "lstm_2x_bidirectional", "bert_base_opset14",
                 "bert_base_opset17"):
        out["zoo_" + name] = zoo_case(name)
    out["resnet_like"] = case(_resnet_like)
    return out


def _resnet_like(tmp: Path):
    """A small ResNet (no torchvision needed): a 7×7 stem with BN, ReLU and a 3×3/2 max pool, then
    bottleneck blocks with projection shortcuts, 1×1 convolutions over 16-128 channels."""
    import torch
    import torch.nn as nn
    from tests._models import InputSpec, ModelCase, export, randomize_bn

    def cbn(cin: int, cout: int, k: int = 1, s: int = 1) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, k, s, k // 2, bias=False), nn.BatchNorm2d(cout)]

    class Block(nn.Module):
        def __init__(self, cin: int, mid: int, cout: int, s: int) -> None:
            super().__init__()
            self.body = nn.Sequential(*cbn(cin, mid), nn.ReLU(), *cbn(mid, mid, 3, s), nn.ReLU(), *cbn(mid, cout))
            self.short = nn.Sequential(*cbn(cin, cout, 1, s)) if s != 1 or cin != cout else nn.Identity()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.body(x) + self.short(x))

    torch.manual_seed(0)
    net = nn.Sequential(*cbn(3, 16, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                        Block(16, 16, 64, 1), Block(64, 16, 64, 1), Block(64, 32, 128, 2), Block(128, 32, 128, 1),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))
    path = export(randomize_bn(net, 3), (torch.randn(2, 3, 32, 32),), tmp / "resnet_like.onnx", ["x"], ["y"],
                  {"x": {0: "batch"}, "y": {0: "batch"}})
    return ModelCase("resnet_like", path, {"x": InputSpec("float32", ("B", 3, 32, 32))}, ["y"])


def digest(lines: list[str]) -> str:
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--record", action="store_true", help=f"write {DATA.relative_to(ROOT)}")
    ap.add_argument("--dump", metavar="DIR", help="write one fingerprint text file per model to DIR")
    ap.add_argument("names", nargs="*", help="models (default: all)")
    args = ap.parse_args()
    makers = cases()
    names = args.names or list(makers)
    recorded = json.loads(DATA.read_text()) if DATA.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            lines = makers[name](Path(tmp))
            recorded[name] = {"layers": len(lines) - 1, "sha256": digest(lines)}
            print(name, recorded[name])
            if args.dump:
                Path(args.dump).mkdir(parents=True, exist_ok=True)
                (Path(args.dump) / f"{name}.txt").write_text("\n".join(lines) + "\n")
            if args.record:
                DATA.parent.mkdir(parents=True, exist_ok=True)
                DATA.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
