#!/usr/bin/env bash
# One GPU session: GPU-marked tests, the conformance suite on CUDA, the plugin benchmark, YOLOv5l speed.
set -u
OUT=${OUT:-/tmp/kiln-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:$PWD/tests:$PWD/benchmarks:${PYTHONPATH:-} PYTHONUNBUFFERED=1
pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || true
echo "== GPU tests"
timeout "${T1:-170}" python -m pytest -q -m gpu -p no:cacheprovider tests --ignore=tests/onnx/test_conformance.py \
  --ignore=tests/test_zoo.py --ignore=tests/viewer -o addopts="" -m "gpu and not slow" 2>&1 | tee "$OUT/gpu_tests.log" | tail -12
echo "== conformance on CUDA"
timeout "${T2:-170}" python scripts/conformance_report.py --device cuda --results-only 2>&1 | tail -6
cp docs/conformance/cuda.json "$OUT/" 2>/dev/null
echo "== plugin benchmark"
timeout "${T3:-110}" python benchmarks/plugins_bench.py 2>&1 | tail -22
echo "== YOLOv5l"
timeout "${T4:-100}" python benchmarks/harness.py --models yolov5l --compile-deadline 40 2>&1 | grep -E "b=|rror"
