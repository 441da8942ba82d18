# Sourced by scripts/test.sh and scripts/bench.sh: find (or create) a Python with torch, install
# what is missing, and build bn_cuda._C in place. Works offline when torch and the tools are
# already installed (e.g. a GPU machine with a preinstalled torch).
#
#   BN_CUDA_PYTHON=/path/to/python   use this interpreter
#   BN_CUDA_TORCH=2.14.1             torch version for a new .venv
#   BN_CUDA_REQUIRE_TF=1             install tensorflow + tf_keras and onnx (+ onnxscript, onnxruntime);
#                                    skipped parity / ONNX tests fail the run (CI)
#   BN_CUDA_SKIP_BUILD=1             do not (re)build the extension
set -euo pipefail
BN_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$BN_ROOT"

bn_has() { "$PY" -c "import $1" >/dev/null 2>&1; }

bn_pick_python() {
  if [ -n "${BN_CUDA_PYTHON:-}" ]; then echo "$BN_CUDA_PYTHON"; return; fi
  if [ -x "$BN_ROOT/.venv/bin/python" ]; then echo "$BN_ROOT/.venv/bin/python"; return; fi
  for p in python3 python; do
    if command -v "$p" >/dev/null 2>&1 && "$p" -c "import torch" >/dev/null 2>&1; then
      command -v "$p"; return
    fi
  done
}

PY="$(bn_pick_python || true)"
BN_OWN_VENV=0
if [ -z "$PY" ]; then
  echo "== bn_cuda: no Python with torch found; creating .venv with torch==${BN_CUDA_TORCH:-2.14.1}"
  python3 -m venv "$BN_ROOT/.venv"
  PY="$BN_ROOT/.venv/bin/python"
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q "torch==${BN_CUDA_TORCH:-2.14.1}"
fi
case "$PY" in "$BN_ROOT/.venv/"*) BN_OWN_VENV=1 ;; esac
export PY

# module:pip-name pairs; installed only when missing (nothing is fetched when all are present).
bn_ensure() {
  local missing=()
  for pair in "$@"; do
    bn_has "${pair%%:*}" || missing+=("${pair##*:}")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "== bn_cuda: installing ${missing[*]}"
    "$PY" -m pip install -q "${missing[@]}" || echo "== bn_cuda: could not install ${missing[*]} (offline?)"
  fi
}

bn_ensure numpy:numpy ninja:ninja pybind11:pybind11 setuptools:setuptools

bn_build() {
  if [ "${BN_CUDA_SKIP_BUILD:-0}" = "1" ]; then return; fi
  echo "== bn_cuda: building the extension in place (MAX_JOBS=${MAX_JOBS:-$(nproc)})"
  local t0=$SECONDS
  MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" setup.py -q build_ext --inplace >"$BN_ROOT/build.log" 2>&1 || {
    tail -n 60 "$BN_ROOT/build.log"; echo "== bn_cuda: build failed (full log: build.log)"; return 1; }
  echo "== bn_cuda: built in $((SECONDS - t0)) s: $("$PY" -c 'import bn_cuda; print(bn_cuda.build_info())')"
}
