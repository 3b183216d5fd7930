"""Every corpus model parses to the same Network from its file (kiln.onnx.reader, no onnx) as from onnx.load's
ModelProto. A model with nodes only ONNX Runtime runs parses with fallback islands, which read the file with onnx
(islands embed onnx's messages): for those the two parses must still agree."""
from __future__ import annotations

import onnx
import pytest
from _networks import network_signature

import corpus_lib as cl
import kiln.onnx
from kiln.errors import UnsupportedOperatorError

MANIFEST = cl.load_manifest()
ROOT = cl.corpus_dir()


@pytest.mark.parametrize("model", [pytest.param(m, id=m.id) for m in MANIFEST.models])
def test_the_file_reader_parses_as_onnx_load(model: cl.Model) -> None:
    problem = cl.model_problem(ROOT, model)
    if problem:
        pytest.skip(f"real-model corpus not available ({problem}); fetch it with: python scripts/fetch_corpus.py")
    path = str(cl.model_path(ROOT, model))
    try:
        ours, fallback = kiln.onnx.parse(path), None
    except UnsupportedOperatorError:
        ours, fallback = kiln.onnx.parse(path, fallback="onnxruntime"), "onnxruntime"
    ref = kiln.onnx.parse(onnx.load(path), fallback=fallback)
    assert network_signature(ours) == network_signature(ref)
    assert ours.metadata == dict(ref.metadata, source=path)
