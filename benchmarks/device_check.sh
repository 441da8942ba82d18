#!/usr/bin/env bash
# GPU check, run on a machine with an NVIDIA GPU (torch, nvcc, compute-sanitizer preinstalled;
# no network). Builds from source, runs the test suite on CUDA tensors (opcheck included),
# compute-sanitizer memcheck/racecheck on a small subset, and the GPU benchmark, then writes a
# summary. Usage: benchmarks/device_check.sh OUT_DIR   (finishes within ~8 minutes on an H100)
set -uo pipefail
OUT="${1:-${OUT:-/tmp/bn_cuda_device_check}}"
mkdir -p "$OUT"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
WORK="$(mktemp -d)"
PY="${BN_CUDA_PYTHON:-python3}"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
SUMMARY="$OUT/summary.md"
status=0
DEADLINE=${BN_CUDA_CHECK_SECONDS:-540}  # start no step after this many seconds (the lease is short)
step() {  # step NAME TIMEOUT CMD...: run, log to $WORK/NAME.log, record the result
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS
  if [ $SECONDS -ge "$DEADLINE" ]; then
    echo "| $name | SKIPPED (out of time) | |" >>"$SUMMARY"; status=1; return
  fi
  [ $((SECONDS + limit)) -gt $((DEADLINE + 60)) ] && limit=$((DEADLINE + 60 - SECONDS))
  timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  local verdict="PASS"; [ $rc -ne 0 ] && { verdict="FAIL (rc=$rc)"; status=1; }
  echo "| $name | $verdict | $((SECONDS - t0)) s |" >>"$SUMMARY"
  echo "== $name: $verdict in $((SECONDS - t0)) s"; tail -n 5 "$WORK/$name.log"
}
measure() { local keep=$status; step "$@"; status=$keep; }  # a step whose failure or skip is reported, not fatal

{
  echo "# bn_cuda device check"
  echo
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
  echo "- gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
  echo "- torch: $($PY -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)' 2>&1)"
  echo "- nvcc: $(nvcc --version 2>/dev/null | tail -1)"
  echo
  echo "| step | result | time |"
  echo "|---|---|---|"
} >"$SUMMARY"

# Build only for the GPU at hand (fast), with every core.
ARCH="$($PY -c 'import torch; p=torch.cuda.get_device_capability(); print(f"{p[0]}.{p[1]}")' 2>/dev/null || echo 9.0)"
step build 300 env TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" BN_CUDA_FORCE_CUDA=1 \
  "$PY" setup.py -q build_ext --inplace
$PY -c "import bn_cuda; print(bn_cuda.build_info())" >>"$WORK/build.log" 2>&1
if [ $status -ne 0 ]; then  # nothing else can run: keep the lease for a rerun
  { echo; echo "## build log tail"; echo '```'; tail -n 60 "$WORK/build.log"; echo '```'; } >>"$SUMMARY"
  cp "$WORK/build.log" "$OUT/build.log" 2>/dev/null
  echo "status: FAIL" >>"$SUMMARY"; tail -n 80 "$WORK/build.log"; exit 1
fi

# Does a C++ exception thrown in our extension reach Python? (On one GPU image every such throw
# segfaulted inside the unwinder: that takes the error tests down with it, so they then run
# in separate worker processes and the crash is reported, not the whole suite lost.)
cat >"$WORK/probe.py" <<'PY'
import torch
try:
    torch.ones(2) + torch.ones(3)
except RuntimeError:
    print("torch's own C++ exception: caught")
import bn_cuda  # noqa: E402
for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
    try:
        torch.ops.bn_cuda.forward_train(torch.randn(5, device=device), None, None, None, None, 0.1, 1e-5, [0])
    except ValueError as e:
        print(f"bn_cuda C++ exception ({device}): caught:", str(e)[:80])
    else:
        raise SystemExit(f"bn_cuda accepted a 1-D input on {device}")
PY
step exception-probe 60 "$PY" "$WORK/probe.py"
# The extension must use torch's shared C++ runtime (DT_NEEDED) and its messages keep their numbers.
step link-check 60 "$PY" -m pytest tests/test_build.py -q -p no:cacheprovider -k "cxx or build_info"
{ echo "compiler: $(${CXX:-c++} --version 2>&1 | head -1) ($(command -v ${CXX:-c++}))"; which -a g++ c++ gcc;
  ldd bn_cuda/_C*.so | grep -E "stdc|gcc|gomp"; readelf -d bn_cuda/_C*.so | grep NEEDED; } >>"$WORK/exception-probe.log" 2>&1
# Workers for the CUDA tests: three quarters of the cores, at most 12, each with one CPU thread for
# its float64 references (8 workers of 16 OpenMP threads each on 16 cores oversubscribed them).
WORKERS=$(( $(nproc) * 3 / 4 )); [ "$WORKERS" -gt 12 ] && WORKERS=12; [ "$WORKERS" -lt 1 ] && WORKERS=1
XDIST=""; "$PY" -c "import xdist" 2>/dev/null && XDIST="-n $WORKERS --max-worker-restart 400"

# Every CUDA test (tests parametrized on "cuda", tests/test_cuda.py, opcheck on CUDA); the
# CPU-only tests and the tensorflow parity tests run in CI.
# (-v: each result is logged as it comes, so a run cut short by its time limit still says which
# tests failed; the failures are listed in the summary)
# The files whose CUDA paths have run least on a GPU first (xdist hands tests out in collection
# order), so that a run cut short by its time limit has checked them.
FIRST="tests/test_cuda.py tests/test_staged.py tests/test_variants.py tests/test_keras_api.py tests/test_errors.py tests/test_bad_input.py"
TEST_FILES="$FIRST $(ls tests/test_*.py | grep -v -x -F "$(tr ' ' '\n' <<<"$FIRST")" | tr '\n' ' ')"
step pytest-cuda "${BN_CUDA_PYTEST_SECONDS:-220}" env OMP_NUM_THREADS=1 "$PY" -m pytest $TEST_FILES -v -ra -m cuda --durations=10 -p no:cacheprovider $XDIST

# compute-sanitizer on a small sweep of every kernel variant (dtypes, layouts, staged ops, masks,
# ghost rows): out-of-bounds accesses, then reads of memory nobody wrote.
if command -v compute-sanitizer >/dev/null 2>&1; then
  step memcheck "${BN_CUDA_SANITIZER_SECONDS:-120}" compute-sanitizer --tool memcheck --error-exitcode 9 "$PY" tests/cuda_smoke.py --small
  step initcheck "${BN_CUDA_SANITIZER_SECONDS:-120}" compute-sanitizer --tool initcheck --error-exitcode 9 "$PY" tests/cuda_smoke.py --small
else
  echo "| sanitizer | SKIPPED (no compute-sanitizer) | |" >>"$SUMMARY"
fi

# GPU benchmark (default GPU preset), results next to the summary.
[ -z "${BN_CUDA_SKIP_BENCH:-}" ] && step bench 220 "$PY" -m benchmarks.bench --preset gpu-default --time-budget 150 --out "$WORK/bench"

# What changed since the last committed run of the same preset (same GPU model first): bn_cuda's
# time old / new, and its ratio against torch in each run (benchmarks/compare.py).
[ -f "$WORK/bench/gpu-default.json" ] && "$PY" -m benchmarks.compare --against-latest benchmarks/results \
  "$WORK/bench/gpu-default.json" --top 12 --out "$WORK/compare-eager.md" >"$WORK/compare.log" 2>&1

# Which kernel of a call costs what (device times from torch.profiler), for the next perf change.
step kernel-profile 60 "$PY" -m benchmarks.kernel_profile --out "$WORK/kernel_profile.md"

# Host time per call (enqueue time on the GPU) against torch's, tiny tensors (benchmarks/host_time.py).
step host-time 60 "$PY" -m benchmarks.host_time --device cuda --out "$WORK/host"

# Kernel time without the host's launch cost: the same cases (bf16 / fp16, ghost and renorm
# included) replayed from CUDA graphs; small tensors are launch-bound in the eager table above.
[ -z "${BN_CUDA_SKIP_BENCH:-}" ] && step bench-graphs 120 "$PY" -m benchmarks.bench --preset gpu-default \
  --cuda-graphs --dtype bf16,fp16 --no-compile --time-budget 70 --no-chart --name gpu-graphs --out "$WORK/bench"
[ -f "$WORK/bench/gpu-graphs.json" ] && "$PY" -m benchmarks.compare --against-latest benchmarks/results \
  "$WORK/bench/gpu-graphs.json" --top 12 --out "$WORK/compare-graphs.md" >>"$WORK/compare.log" 2>&1


# With time left: a minute of random configurations through the CUDA kernels against float64
# (and the one-launch channels-first path against the three-launch one, bitwise).
step crosscheck-cuda 80 "$PY" scripts/crosscheck_kernels.py --device cuda --seed 1 --minutes 1

# With time left: an evaluation-mode batch norm inside compiled models (BN -> ReLU, conv -> BN -> ReLU
# with freezing), torch's against ours routed to torch operations and against our operator forced
# (benchmarks/compile_eval.py: the measurement behind ops.infer_for_inductor's CUDA routing).
# (a measurement, not a check: reported, not fatal; rows are written as they finish)
measure compile-eval 120 "$PY" -m benchmarks.compile_eval --device cuda --out "$WORK/bench"

# With time left: the CPU tests too (they also run in CI).
[ -z "${BN_CUDA_SKIP_REST:-}" ] && step pytest-rest 120 "$PY" -m pytest tests -q -ra -m "not cuda and not tf" -x -p no:cacheprovider \
  --ignore=tests/test_distributed.py --ignore=tests/test_consumer_ext.py

{
  echo
  echo "## exception probe"; echo '```'; cat "$WORK/exception-probe.log"; echo '```'
  echo "## pytest (cuda): failures, then the tail"; echo '```'
  grep -E "(FAILED|ERROR)( |$)" "$WORK/pytest-cuda.log" | grep -v "^FAILED\|^ERROR" | sed 's/^\[gw[0-9]*\] //' | sort -u | head -80
  echo "(passed: $(grep -c ' PASSED ' "$WORK/pytest-cuda.log"), failed: $(grep -c ' FAILED ' "$WORK/pytest-cuda.log"), skipped: $(grep -c ' SKIPPED ' "$WORK/pytest-cuda.log"))"
  tail -n 40 "$WORK/pytest-cuda.log"; echo '```'
  [ -f "$WORK/crosscheck-cuda.log" ] && { echo "## crosscheck (cuda)"; echo '```'; grep -A1 "^FAILED" "$WORK/crosscheck-cuda.log" | head -40; tail -n 4 "$WORK/crosscheck-cuda.log"; echo '```'; }
  [ -f "$WORK/bench.log" ] && { echo "## benchmark"; echo '```'; tail -n 80 "$WORK/bench.log"; echo '```'; }
  [ -f "$WORK/compare-eager.md" ] && { echo; echo "## against the last committed run, eager"; cat "$WORK/compare-eager.md"; }
  [ -f "$WORK/compare-graphs.md" ] && { echo; echo "## against the last committed run, CUDA graphs"; cat "$WORK/compare-graphs.md"; }
  [ -f "$WORK/kernel_profile.md" ] && { echo; cat "$WORK/kernel_profile.md"; }
  [ -f "$WORK/host/host-time.md" ] && { echo; sed 's/^# /## /' "$WORK/host/host-time.md"; }
  [ -f "$WORK/bench/compile-eval.md" ] && { echo; sed 's/^# /## /' "$WORK/bench/compile-eval.md"; }
} >>"$SUMMARY"

# At most 8 files come back: the summary, the logs, the benchmark's JSON/CSV/PNG, and a tarball.
for f in "$WORK"/bench/gpu-default.json "$WORK"/bench/gpu-default.csv "$WORK"/bench/gpu-default.png \
         "$WORK"/bench/gpu-graphs.json; do
  [ -f "$f" ] && cp "$f" "$OUT/" 2>/dev/null
done
tar -czf "$OUT/logs.tar.gz" -C "$WORK" . 2>/dev/null
cp "$WORK/pytest-cuda.log" "$OUT/pytest-cuda.log" 2>/dev/null
echo "status: $([ $status -eq 0 ] && echo PASS || echo FAIL)" >>"$SUMMARY"
cat "$SUMMARY" | head -20
exit $status
