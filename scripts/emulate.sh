#!/usr/bin/env bash
# Test the CUDA code where there is no GPU: build bn_cuda with BN_CUDA_EMULATE=1 in a copy of the
# tracked tree (build/emulated/), where the CPU ops are ops_cuda.cpp's bodies over the CUDA kernels
# run by a host emulation (csrc/emulate/: each thread a fiber, switched at __syncthreads() and warp
# shuffles; strict about divergent barriers and launch limits), and run the whole test suite there,
# once with the emulation's forward scheduling order and once with the reverse one (a missing
# barrier shows in one of them), then the kernel suites once more with grids planned for fewer
# multiprocessors. CI runs it after the main job. It exercises the kernels' indexing,
# planning, workspace layout, reductions and the CUDA host code; it is not a GPU run (memory
# model, timing, the GPU's own arithmetic units are the device check's: benchmarks/device_check.sh).
#
#   scripts/emulate.sh [pytest options...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/env.sh"   # PY: the interpreter scripts/test.sh uses (creates .venv if needed)
WORK="$ROOT/build/emulated"
"$ROOT/scripts/copy_tree.sh" "$WORK"
cd "$WORK"
export BN_CUDA_PYTHON="$PY" BN_CUDA_EMULATE=1 BN_CUDA_EXPECT_EMULATED=1
unset BN_CUDA_FORCE_CUDA BN_CUDA_CPU_ONLY
# The emulation runs on one host thread per process: the suites go out to pytest-xdist workers,
# one per core (BN_CUDA_EMULATE_JOBS; at most 8, and 1, or no pytest-xdist, runs them in-process).
bn_ensure xdist:pytest-xdist
JOBS="${BN_CUDA_EMULATE_JOBS:-$(nproc)}"
[ "$JOBS" -gt 8 ] && JOBS=8
PARALLEL=()
if [ "$JOBS" -gt 1 ] && bn_has xdist; then PARALLEL=(-n "$JOBS"); fi
for order in forward reverse; do
  echo "== emulate: the CUDA kernels under the host emulation, $order order, in $WORK (${PARALLEL[*]:-in-process})"
  BN_CUDA_EMULATE_ORDER=$order ./scripts/test.sh -p no:cacheprovider "${PARALLEL[@]}" "$@"
  export BN_CUDA_SKIP_BUILD=1
done
# The planners size grids by the multiprocessor count (132 above, an H100 / H200): the kernel
# suites once more on 7, where the grid-stride loops take many more turns.
echo "== emulate: the kernel suites planned for 7 multiprocessors"
BN_CUDA_EMULATE_SMS=7 TF_CPP_MIN_LOG_LEVEL=2 "$PY" -m pytest -q -ra -p no:cacheprovider "${PARALLEL[@]}" "$@" \
  tests/test_cuda.py tests/test_functional.py tests/test_staged.py tests/test_variants.py
