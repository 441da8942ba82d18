"""The host emulation of the CUDA kernels (csrc/emulate/, scripts/emulate.sh) tested on its own.

scripts/emulate.sh runs the whole suite over the CUDA kernels under this emulation; these tests
show what that run can and cannot see: bn_cuda's warp / block Welford merge and CUDA's index
variables computed right, a missing barrier changing a result in at least one scheduling order,
and divergent barriers, exits while others wait, partial-warp shuffles and out-of-limit launches
refused with a message instead of a hang.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import bn_cuda

ROOT = Path(__file__).resolve().parents[1]
ORDERS = ("forward", "reverse")


def _cuda_include():
    for base in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if base and (Path(base) / "include" / "cuda_fp16.h").is_file():
            return Path(base) / "include"
    return None


def test_build_is_the_one_the_environment_expects():
    # scripts/emulate.sh sets BN_CUDA_EXPECT_EMULATED=1: there the CPU ops must be the CUDA bodies
    # over the emulated kernels; everywhere else, the CPU kernels.
    expected = os.environ.get("BN_CUDA_EXPECT_EMULATED") == "1"
    assert bn_cuda.build_info()["emulated_cuda"] is expected


# The fibers' context switch: the default (assembly on x86-64) and the portable ucontext one.
@pytest.fixture(scope="module", params=["default-switch", "ucontext"])
def selftest(request, tmp_path_factory):
    inc = _cuda_include()
    cxx = shutil.which("g++") or shutil.which("c++")
    if inc is None or cxx is None:
        pytest.skip("the emulation needs a C++ compiler and a CUDA toolkit's headers (set CUDA_HOME)")
    exe = tmp_path_factory.mktemp("emu") / "selftest"
    emu = ROOT / "csrc" / "emulate"
    backend = ["-DBN_EMU_UCONTEXT"] if request.param == "ucontext" else []
    subprocess.run(
        [cxx, "-std=c++17", "-O1", "-ffp-contract=off", "-Wno-unknown-pragmas", *backend,
         f"-I{emu}", f"-I{ROOT / 'csrc' / 'include'}", f"-I{inc}", str(emu / "selftest.cpp"),
         str(emu / "runtime.cpp"), "-o", str(exe)],
        check=True, capture_output=True, text=True,
    )

    def run(case, order):
        env = dict(os.environ, BN_CUDA_EMULATE_ORDER=order)
        r = subprocess.run([str(exe), case], env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return r.stdout

    return run


@pytest.mark.parametrize("order", ORDERS)
def test_block_welford_merge_matches_float64(selftest, order):
    out = selftest("welford", order)
    assert out.startswith("welford ok")
    rows = re.findall(r"block \d+ mean (\S+) (\S+) m2 (\S+) (\S+) n (\S+) (\S+)", out)
    assert len(rows) == 7
    for mean, ref_mean, m2, ref_m2, n, ref_n in rows:
        assert float(n) == float(ref_n)
        assert abs(float(mean) - float(ref_mean)) < 1e-2  # float32 at an offset of 1e4 (ulp 1e-3)
        assert abs(float(m2) - float(ref_m2)) < 1e-3 * float(ref_m2)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case", ["where", "rotate", "shuffle"])
def test_index_variables_barriers_and_shuffles(selftest, case, order):
    out = selftest(case, order)
    assert out.splitlines() == [f"{case} ok", "mismatches 0"]


def test_missing_barrier_changes_the_result_in_some_order(selftest):
    bad = [int(re.search(r"mismatches (\d+)", selftest("rotate_racy", o)).group(1)) for o in ORDERS]
    assert max(bad) > 0, bad


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("case,message", [
    ("divergent", r"reached __syncthreads\(\) at .*selftest.cpp:\d+ while 128 thread\(s\) wait at"),
    ("exit", r"thread \(5, 0, 0\) exited while \d+ thread\(s\) wait at __syncthreads\(\)"),
    ("partial_warp", r"full-mask shuffle in a warp of 16 threads"),
    ("lane_exit", r"(exited while 1 lane\(s\) of its warp wait in a shuffle|shuffle after 31 lane\(s\))"),
])
def test_undefined_cuda_is_refused_with_a_message(selftest, case, message, order):
    out = selftest(case, order)
    assert re.search(rf"^{case} error 719: .*{message}", out, re.M), out  # cudaErrorLaunchFailure


def test_launch_limits(selftest):
    out = selftest("limits", "forward").splitlines()
    assert out == [
        "grid_y error 9: launch with grid (1, 70000, 1): out of CUDA's limits",  # cudaErrorInvalidConfiguration
        "block error 9: launch with block (2048, 1, 1): out of CUDA's limits",
        "empty_grid error 9: launch with grid (0, 1, 1): out of CUDA's limits",
    ]
