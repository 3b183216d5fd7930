#!/usr/bin/env bash
# One GPU session for the hardening wave: GPU-marked tests, the real-model corpus on CUDA (FP32 engines vs
# ONNX Runtime, FP16 engines vs ONNX Runtime running onnxconverter-common's FP16 model), and a speed check
# of ResNet-50 and BERT against BENCHMARKS.md. Run from the repository root on the GPU machine; results in $OUT.
# CORPUS: a copied corpus folder (scripts/fetch_corpus.py layout); WHEELS: extra wheels to install first.
set -u
OUT=${OUT:-/tmp/kiln-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:$PWD/tests:$PWD/tests/corpus:$PWD/benchmarks:${PYTHONPATH:-} PYTHONUNBUFFERED=1
if [ -n "${WHEELS:-}" ]; then
  python -m pip install -q --no-index --no-deps --target /tmp/site "$WHEELS"/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
if [ "${TESTS:-1}" = 1 ]; then
  echo "== GPU tests"
  timeout "${T1:-240}" python -m pytest -q -p no:cacheprovider tests --ignore=tests/onnx/test_conformance.py \
    --ignore=tests/test_zoo.py --ignore=tests/viewer --ignore=tests/fuzz -o addopts="" -m "gpu and not slow" \
    2>&1 | tee "$OUT/gpu_tests.log" | tail -15
fi
if [ -n "${CORPUS:-}" ]; then
  echo "== corpus on CUDA"
  timeout "${T2:-300}" python scripts/corpus_table.py --corpus "$CORPUS" --out "$OUT/real-models-${PART:-a}.md" \
    ${ONLY:+--only "$ONLY"} 2>&1 | tail -40
fi
if [ "${SPEED:-0}" = 1 ]; then
  echo "== speed (Kiln and eager peers, no torch.compile)"
  timeout "${T3:-240}" python benchmarks/harness.py --models "${MODELS:-resnet50}" --batches "${BATCHES:-256}" --no-compile --out "$OUT" \
    2>&1 | grep -vi warn | tail -25
fi
