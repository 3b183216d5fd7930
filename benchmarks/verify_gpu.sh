#!/usr/bin/env bash
# GPU check of changes made without a GPU: GPU-marked tests, kernel profiles, FP16 accuracy and speed of
# chosen rows. Env: MODELS/BATCHES (harness rows), PROFILE ("model batch;..." for kernel_profile), COMPILE=1.
set -u
OUT=${OUT:-/tmp/kiln-gpu-out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD/src:$PWD/tests:$PWD/benchmarks:${PYTHONPATH:-} PYTHONUNBUFFERED=1
pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || true
nvidia-smi --query-gpu=name --format=csv,noheader
if [ "${TESTS:-1}" = 1 ]; then
  echo "== GPU tests"
  timeout "${T1:-240}" python -m pytest -q -p no:cacheprovider tests --ignore=tests/onnx/test_conformance.py \
    --ignore=tests/test_zoo.py --ignore=tests/viewer -o addopts="" -m "gpu and not slow" -W ignore \
    > "$OUT/gpu_tests.log" 2>&1
  grep -E "passed|failed|FAILED|Error" "$OUT/gpu_tests.log" | tail -15
fi
IFS=';' read -ra PROFS <<< "${PROFILE:-}"
for p in "${PROFS[@]}"; do
  [ -n "$p" ] && timeout 150 python benchmarks/kernel_profile.py $p --no-compile --top 14 2>&1 | grep -E "^==|^ +[0-9]"
done
if [ -n "${MODELS:-}" ]; then
  echo "== harness"
  timeout "${T2:-400}" python benchmarks/harness.py --models "$MODELS" --batches "${BATCHES:-1}" \
    $([ "${COMPILE:-0}" = 1 ] || echo --no-compile) 2>&1 | grep -E "b=|rror"
fi
