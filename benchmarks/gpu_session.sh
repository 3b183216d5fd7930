#!/usr/bin/env bash
# One GPU session for the hardening wave: GPU-marked tests, the real-model corpus on CUDA (FP32 engines vs
# ONNX Runtime, FP16 engines vs ONNX Runtime running onnxconverter-common's FP16 model), and a speed check
# of ResNet-50 and BERT against BENCHMARKS.md. Run from the repository root on the GPU machine; results in $OUT.
# CORPUS: a copied corpus folder (scripts/fetch_corpus.py layout); WHEELS: extra wheels to install first.
# QUANT="model:batches;...": the FP16/INT8/FP8 rows; RANGE=models: range engines; SHM=1: kiln serve with and
# without system shared memory; FRONTENDS=N: also where one request's time goes at concurrency 1 and the sweep
# with N front-end processes; ENGINE_LOAD=1: the engine process alone on a CUDA MLP, staged batch buffers on and
# off; PROBE=models: first_run_probe.py --fresh-cache per model (Triton kernel-cache misses
# and the first and second run at new shapes); CPU16=1: cpu_bench.py's zoo and corpus rows on all the host's cores
# and on 1 (WHEELS must then hold onednn-cpu-gomp's wheel, or Kiln's oneDNN tactics are missing there)
# (each section only when its variable is set).
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
if [ -n "${QUANT:-}" ]; then       # e.g. QUANT="bert_base:1,32;resnet50:256"
  echo "== 8-bit rows (FP16 baseline in the same run)"
  timeout "${T4:-400}" python benchmarks/quant_bench.py --rows "$QUANT" --profile --out "$OUT" 2>&1 | grep -vi warn | cut -c1-200
fi
if [ -n "${RANGE:-}" ]; then       # e.g. RANGE=yolov5l,bert_base,resnet50
  echo "== range engines vs static vs torch.compile(dynamic=True)"
  timeout "${T5:-500}" python benchmarks/range_bench.py --models "$RANGE" --out "$OUT" 2>&1 | grep -vi warn | tail -40
fi
if [ "${SHM:-0}" = 1 ]; then
  echo "== kiln serve, ResNet-50 FP16 over gRPC, system shared memory off/on"
  python benchmarks/serve_bench.py models --out /tmp/serve-models --names resnet50 2>&1 | tail -3
  timeout "${T6:-400}" python benchmarks/serve_bench.py sweep --repo /tmp/serve-models --model resnet50 --protocols grpc \
    --shm off,on --server-flag=--warmup --server-flag=--instances=2 --engine-bench 2>&1 | tail -30
fi
if [ -n "${FRONTENDS:-}" ]; then
  echo "== kiln serve: one request's stages at concurrency 1, then the sweep with $FRONTENDS front ends"
  [ -d /tmp/serve-models ] || python benchmarks/serve_bench.py models --out /tmp/serve-models --names resnet50 2>&1 | tail -3
  timeout "${T7:-120}" python benchmarks/serve_bench.py latency --repo /tmp/serve-models --model resnet50 --protocols grpc \
    --shm off,on --server-flag=--warmup --server-flag=--instances=2 2>&1 | tail -20
  timeout "${T8:-300}" python benchmarks/serve_bench.py sweep --repo /tmp/serve-models --model resnet50 --protocols grpc \
    --shm on --server-flag=--warmup --server-flag=--instances=2 --server-flag=--frontends="$FRONTENDS" --engine-bench \
    2>&1 | tail -30
fi
if [ "${ENGINE_LOAD:-0}" = 1 ]; then
  echo "== kiln serve's engine process alone, a CUDA MLP with ResNet-50's input size: staged batch buffers on vs off"
  timeout "${T9:-400}" python benchmarks/serve_bench.py engine-load --device cuda --widths 150528,1000 --batches 1,4,16 \
    --staged on,off --instances 2 --rounds 3 2>&1 | grep -vi warn | tail -24
fi
if [ -n "${PROBE:-}" ]; then
  for m in ${PROBE//,/ }; do
    echo "== first runs at new shapes: $m (fresh Triton cache)"
    timeout "${T9:-200}" python benchmarks/first_run_probe.py --model "$m" --shapes 4 --top 8 --fresh-cache 2>&1 \
      | grep -E "^build|^== |^second|misses|^  [0-9]+ x" | cut -c1-240
  done
fi
if [ "${CPU16:-0}" = 1 ]; then
  echo "== CPU engines on this host's cores (oneDNN: $(python -c 'import kiln.kernels.dnnl_api as d; print(d.library() is not None)' 2>&1 | tail -1))"
  timeout "${T10:-500}" python benchmarks/cpu_bench.py --batches 1 --threads 0,1 --rounds 15 --budget 15 --no-openvino \
    --out "$OUT/cpu16.json" 2>&1 | grep -E " t[0-9]+ |geometric" | cut -c1-200
fi
