#!/usr/bin/env bash
# On an AVX-512 CPU the test suite runs the AVX-512 copy of the CPU kernels (the copy PyTorch's own
# choice selects, see csrc/cpu/dispatch.h), and the AVX2 copy only in
# tests/test_edge_cases.py::test_vectorized_and_default_kernels_agree. This runs the numerical
# suites again on the AVX2 copy (ATEN_CPU_CAPABILITY=avx2, PyTorch's own override, which ours
# follows). On any other CPU the main suite already ran the AVX2 (or portable) copy: nothing to do.
#
#   scripts/test_avx2.sh [pytest options...]   (CI runs it after scripts/test.sh)
set -euo pipefail
source "$(dirname "$0")/env.sh"
bn_ensure xdist:pytest-xdist
CAP="$("$PY" -c 'import bn_cuda; print(bn_cuda.build_info()["cpu_capability"])')"
if [ "$CAP" != "avx512" ] && [ "$CAP" != "avx512_bf16" ]; then
  echo "== avx2: this CPU runs the $CAP kernels, which the main suite tested; nothing more to run"
  exit 0
fi
PARALLEL=()
if bn_has xdist; then PARALLEL=(-n "$(nproc)"); fi
echo "== avx2: the numerical suites on the AVX2 copy of the CPU kernels"
unset BN_CUDA_CPU_CAPABILITY  # (it would override ours)
ATEN_CPU_CAPABILITY=avx2 exec "$PY" -m pytest -q -p no:cacheprovider "${PARALLEL[@]}" \
  tests/test_numerics.py tests/test_functional.py tests/test_edge_cases.py tests/test_variants.py "$@"
