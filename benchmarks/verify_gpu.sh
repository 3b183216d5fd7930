#!/usr/bin/env bash
# GPU check of changes made without a GPU: GPU-marked tests, FP16 accuracy + per-layer profile of chosen rows,
# the plugin benchmark. Usage: bash benchmarks/verify_gpu.sh  (env MODELS_A/BATCH_A, MODELS_B/BATCH_B override)
set -u
OUT=${OUT:-/tmp/kiln-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:$PWD/tests:$PWD/benchmarks:${PYTHONPATH:-} PYTHONUNBUFFERED=1
pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || true
nvidia-smi --query-gpu=name --format=csv,noheader
echo "== GPU tests"
timeout "${T1:-170}" python -m pytest -q -p no:cacheprovider tests --ignore=tests/onnx/test_conformance.py \
  --ignore=tests/test_zoo.py --ignore=tests/viewer -o addopts="" -m "gpu and not slow" -x 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
echo "== harness A"
timeout "${T2:-200}" python benchmarks/harness.py --models "${MODELS_A:-resnet50,mobilenet_v3_large}" \
  --batches "${BATCH_A:-1}" --no-compile --profile 2>&1 | grep -vE "Warning|warn" | tail -60
echo "== harness B"
timeout "${T3:-150}" python benchmarks/harness.py --models "${MODELS_B:-vit_b_16,bert_base}" \
  --batches "${BATCH_B:-32}" --no-compile --profile 2>&1 | grep -vE "Warning|warn" | tail -60
echo "== plugin benchmark"
timeout "${T4:-100}" python benchmarks/plugins_bench.py 2>&1 | tail -22
