"""The rule-based passes build the same networks as the hand-written loops they replaced.

Each model's optimized network (layer kinds, names, attrs, tensor names, shapes and dtypes, in
order) is compared with the fingerprint recorded from the code before the change
(``data/rewrite_fingerprints.json``). The models here cover every rule: BN folding, stem pooling,
projection shortcuts and 1×1 chains (resnet_like), SiLU and residual epilogues (mini_yolo),
attention, add+norm and parallel linear layers (mt_bert), LayerNorm and GELU decompositions
(zoo_bert_base_opset14). ``tests/passes/fingerprints.py`` checks the rest of the recorded models.
"""
from __future__ import annotations

import json

import pytest

from fingerprints import DATA, cases, digest

MODELS = ["resnet_like", "mini_yolo", "mt_bert", "zoo_bert_base_opset14"]


@pytest.mark.parametrize("name", MODELS)
def test_optimized_network_is_unchanged(name: str, tmp_path) -> None:
    recorded = json.loads(DATA.read_text())[name]
    lines = cases()[name](tmp_path)
    assert len(lines) - 1 == recorded["layers"]
    assert digest(lines) == recorded["sha256"], \
        f"{name}: the passes now build another network; compare with `tests/passes/fingerprints.py --dump DIR {name}`"
