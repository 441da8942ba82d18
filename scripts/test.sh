#!/usr/bin/env bash
# Set up (if needed), build, and run the test suite. Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "$0")/env.sh"
bn_ensure pytest:pytest
# tensorflow + tf_keras are the semantic oracle of the parity tests; installed only into the
# project's own .venv (never into a preinstalled interpreter), or when CI requires them.
# matplotlib: the benchmark's chart, checked by the benchmark smoke test. onnx + onnxscript +
# onnxruntime: the ONNX export tests (exported models run in ONNX Runtime).
if [ "$BN_OWN_VENV" = "1" ] || [ "${BN_CUDA_REQUIRE_TF:-0}" = "1" ]; then
  bn_ensure tensorflow:tensorflow-cpu tf_keras:tf-keras matplotlib:matplotlib onnx:onnx onnxscript:onnxscript \
    onnxruntime:onnxruntime
fi
bn_build
export TF_CPP_MIN_LOG_LEVEL=2
exec "$PY" -m pytest tests -q -ra "$@"
