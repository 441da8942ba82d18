#!/usr/bin/env bash
# Build and test bn_cuda against another torch release: the CPU build, in a venv of its own
# (.venv-torch<VERSION>) and a copy of the tracked tree (build/compat-torch<VERSION>/), so the main
# build is left alone. CI runs it for torch 2.11, the release on the GPU machine of the device check:
# the autograd nodes are written for both of torch's node handles (std::shared_ptr before 2.13,
# c10::intrusive_ptr since), and this is where the older one is compiled and exercised.
#
#   scripts/compat.sh [TORCH_VERSION] [pytest options...]  (default 2.11.0; the whole suite runs)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
V="${1:-2.11.0}"
shift || true
VENV="$ROOT/.venv-torch$V"
if ! "$VENV/bin/python" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$V')" 2>/dev/null; then
  echo "== compat: creating $VENV with torch==$V"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "torch==$V" numpy pytest ninja pybind11 setuptools
fi
WORK="$ROOT/build/compat-torch$V"
"$ROOT/scripts/copy_tree.sh" "$WORK"
cd "$WORK"
echo "== compat: torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)'), CPU build, in $WORK"
# Link as the GPU image's g++ wrapper does: -static-libstdc++, with only the static archive on
# the library path (there a plain -lstdc++ linked the static runtime too, and the extension's
# messages came out without their numbers or crashed it). setup.py must still link the process's
# shared libstdc++: test_build.py checks the extension's DT_NEEDED and the message checks fail.
ARCHIVE="$(${CXX:-c++} -print-file-name=libstdc++.a)"
if [ -f "$ARCHIVE" ]; then
  mkdir -p "$WORK/static-libstdcxx"
  ln -sf "$ARCHIVE" "$WORK/static-libstdcxx/libstdc++.a"
  export LDFLAGS="${LDFLAGS:+$LDFLAGS }-static-libstdc++ -L$WORK/static-libstdcxx"
  echo "== compat: linking as a static-libstdc++ toolchain does (LDFLAGS=$LDFLAGS)"
fi
# (the CPU build: the CUDA sources do not include torch except ops_cuda.cpp, compiled against this
# release on the GPU machine; no tensorflow parity tests here, the main run has them)
exec env -u BN_CUDA_REQUIRE_TF -u BN_CUDA_FORCE_CUDA BN_CUDA_CPU_ONLY=1 BN_CUDA_PYTHON="$VENV/bin/python" \
  ./scripts/test.sh -p no:cacheprovider "$@"
