#!/usr/bin/env bash
# The GPU test session (run on the GPU machine from the repository root):
# core GPU tests, built-in plugin kernels at full size and their benchmark, the ONNX conformance
# suite on CUDA, and the full-size model zoo against ONNX Runtime. Results land in $OUT.
set -u
OUT=${OUT:-/tmp/kiln-gpu-out}
mkdir -p "$OUT"
pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || true
export PYTHONPATH=$PWD/src:$PWD/tests:$PWD/benchmarks:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
echo "== GPU tests"
timeout "${T_GPU:-150}" python -m pytest -q -m gpu -p no:cacheprovider tests \
  --ignore=tests/onnx/test_conformance.py --ignore=tests/test_zoo.py 2>&1 | tail -25
echo "== plugin benchmark"
timeout "${T_PLUG:-120}" python benchmarks/plugins_bench.py 2>&1 | tail -20
echo "== conformance on CUDA"
timeout "${T_CONF:-200}" python -m pytest -q -p no:cacheprovider -n 16 tests/onnx/test_conformance.py -k cuda \
  --junitxml="$OUT/conformance_cuda.xml" 2>&1 | tail -4
echo "== zoo accuracy"
timeout "${T_ZOO:-240}" python -m pytest -q -m slow -p no:cacheprovider tests/test_zoo.py -s 2>&1 | tail -30
