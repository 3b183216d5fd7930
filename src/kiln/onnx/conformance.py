"""The ONNX backend test suite, run against Kiln: exclusions, the run itself, and results by op.

The exclusion list is data (``tests/onnx/conformance_exclusions.toml``): each entry is a
regular expression that must match a whole case name (without the ``_cpu``/``_cuda``
suffix), the devices it applies to, and the reason. The pytest runner and
``scripts/conformance_report.py`` both read it through ``load_exclusions``; the report
runs every case anyway, so an exclusion that has started passing shows up.
"""
from __future__ import annotations

import re
import time
import unittest
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class Exclusion:
    pattern: str
    reason: str
    devices: tuple[str, ...] = DEVICES

    def matches(self, case: str, device: str) -> bool:
        """``case`` is the name without the device suffix, e.g. ``test_bernoulli``."""
        return device in self.devices and re.fullmatch(self.pattern, case) is not None


def load_exclusions(path: str | Path) -> list[Exclusion]:
    """Read the exclusion file; an entry without a reason is an error (the reason is the point)."""
    import tomllib
    with open(path, "rb") as f:
        data = tomllib.load(f)
    out = []
    for i, entry in enumerate(data.get("exclude", [])):
        pattern, reason = entry.get("pattern"), (entry.get("reason") or "").strip()
        if not pattern or not reason:
            raise ValueError(f"{path}: exclusion #{i + 1} needs both 'pattern' and 'reason' (got {entry!r}).")
        re.compile(pattern)
        devices = tuple(entry.get("devices", DEVICES))
        bad = [d for d in devices if d not in DEVICES]
        if bad:
            raise ValueError(f"{path}: exclusion {pattern!r} names unknown devices {bad}; use {list(DEVICES)}.")
        out.append(Exclusion(pattern, reason, devices))
    return out


def exclusion_for(case: str, device: str, exclusions: Iterable[Exclusion]) -> Exclusion | None:
    return next((e for e in exclusions if e.matches(case, device)), None)


def split_device(test_name: str) -> tuple[str, str]:
    """``test_add_cpu`` → (``test_add``, ``cpu``)."""
    base, _, dev = test_name.rpartition("_")
    return base, dev


def backend_test(module_name: str, exclusions: Iterable[Exclusion] = (), devices: Iterable[str] = DEVICES):
    """An ``onnx.backend.test.BackendTest`` over Kiln with the exclusions applied as skips."""
    import onnx.backend.test

    import kiln.onnx.backend as backend
    bt = onnx.backend.test.BackendTest(backend, module_name)
    devices = tuple(devices)
    for d in DEVICES:
        if d not in devices:
            bt.exclude(f"_{d}$")
    for e in exclusions:
        for d in e.devices:
            bt.exclude(f"^(?:{e.pattern})_{d}$")
    return bt


def run_suite(devices: Iterable[str] = ("cpu",), pattern: str | None = None) -> dict[str, dict]:
    """Run every case (no exclusions) on ``devices``; test name → {outcome, message, seconds, category}.

    outcome is pass, fail (wrong answer), error (Kiln refused or crashed) or skip.
    """
    bt = backend_test("kiln_conformance", devices=devices)
    if pattern:
        bt.include(pattern)
    results: dict[str, dict] = {}

    class _Result(unittest.TestResult):
        def startTest(self, test):
            self._t0 = time.perf_counter()
            super().startTest(test)

        def _put(self, test, outcome, message=""):
            results[test._testMethodName] = {"outcome": outcome, "message": message,
                                             "seconds": round(time.perf_counter() - self._t0, 3),
                                             "category": type(test).__name__.replace("OnnxBackend", "")
                                             .replace("ModelTest", "")}

        def addSuccess(self, test):
            self._put(test, "pass")

        def addFailure(self, test, err):
            self._put(test, "fail", _first_line(err[1]))

        def addError(self, test, err):
            self._put(test, "error", f"{type(err[1]).__name__}: {_first_line(err[1])}")

        def addSkip(self, test, reason):
            results[test._testMethodName] = {"outcome": "skip", "message": reason, "seconds": 0.0,
                                             "category": type(test).__name__}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bt.test_suite.run(_Result())
    return {k: v for k, v in results.items() if not v["message"].startswith("no matched include")}


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    return lines[0][:300] if lines else type(exc).__name__


# ---- which op a case exercises ------------------------------------------------------------------

def _snake(name: str) -> str:
    s = re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name)
    s = re.sub(r"(?<=[A-Z])([A-Z][a-z])", r"_\1", s)
    return s.lower()


_ALIASES = {"sce": "SoftmaxCrossEntropyLoss", "nllloss": "NegativeLogLikelihoodLoss",
            "l1normalization": "LpNormalization", "l2normalization": "LpNormalization",
            "mvn": "MeanVarianceNormalization", "strnorm": "StringNormalizer",
            "strnormalizer": "StringNormalizer", "convtranspose": "ConvTranspose", "batchnorm": "BatchNormalization",
            "instancenorm": "InstanceNormalization", "training_dropout": "Dropout", "top_k": "TopK",
            "basic_deform_conv": "DeformConv", "deform_conv": "DeformConv", "nesterov_momentum": "Momentum",
            "gradient_of": "Gradient", "ai_onnx_ml_array_feature_extractor": "ArrayFeatureExtractor",
            "ai_onnx_ml_binarizer": "Binarizer", "ai_onnx_ml_label_encoder": "LabelEncoder",
            "ai_onnx_ml_tree_ensemble": "TreeEnsemble", "image_decoder": "ImageDecoder",
            "castlike": "CastLike", "affine_grid": "AffineGrid", "flexattention": "FlexAttention",
            "basic_conv": "Conv", "edge_pad": "Pad", "reflect_pad": "Pad", "wrap_pad": "Pad", "simple_rnn": "RNN",
            "tril": "Trilu", "triu": "Trilu", "less_equal": "LessOrEqual", "greater_equal": "GreaterOrEqual"}
_OP_INDEX: list[tuple[str, str]] | None = None


def op_of_case(case: str, category: str = "Node") -> str:
    """The ONNX op a node case tests, from its name (``test_reduce_sum_keepdims`` → ReduceSum);
    model cases (real, simple, pytorch-*) are grouped as ``(models)``."""
    global _OP_INDEX
    if category not in ("Node", "NodeModel"):
        return "(models)"
    if _OP_INDEX is None:
        import onnx.defs
        names = {s.name for s in onnx.defs.get_all_schemas_with_history()}
        idx = [(_snake(n), n) for n in names] + [(n.lower(), n) for n in names] + list(_ALIASES.items())
        _OP_INDEX = sorted(set(idx), key=lambda kv: -len(kv[0]))
    body = case[5:] if case.startswith("test_") else case
    for key, op in _OP_INDEX:
        rest = body[len(key):] if body.startswith(key) else None
        if rest is not None and (not rest or rest[0] == "_" or rest[0].isdigit()):     # test_loop11, test_scan9_sum
            return op
    return "(other)"
