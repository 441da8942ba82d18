#!/usr/bin/env bash
# Set up (if needed), build, and run the benchmark: the GPU default set when a CUDA device is
# visible, the quick CPU preset otherwise. Extra arguments go to `python -m benchmarks.bench`.
set -euo pipefail
source "$(dirname "$0")/env.sh"
bn_ensure tqdm:tqdm matplotlib:matplotlib rich:rich
bn_build
if [ $# -eq 0 ]; then
  if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    set -- --preset gpu-default
  else
    set -- --quick
  fi
fi
exec "$PY" -m benchmarks.bench "$@"
