"""Build of bn_cuda._C: C++ CPU kernels always; CUDA kernels whenever a CUDA toolkit and a CUDA
build of torch are present (a visible GPU is not needed).

Knobs (environment):
  BN_CUDA_FORCE_CUDA=1   fail loudly when the CUDA kernels cannot be built
  BN_CUDA_CPU_ONLY=1     skip the CUDA kernels
  BN_CUDA_EMULATE=1      no CPU kernels: the CUDA kernels and their host code compiled by the C++
                         compiler and run on CPU tensors by a host emulation (csrc/emulate/; used
                         by scripts/emulate.sh to test the CUDA code where no GPU is; not a GPU run)
  TORCH_CUDA_ARCH_LIST   CUDA archs (default "8.0;9.0+PTX")
  MAX_JOBS               parallel compile jobs (default: CPU count)
  CUDA_HOME              toolkit root (default: /usr/local/cuda when it has bin/nvcc)
"""

import json
import os
import platform
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
VERSION = "0.1.0"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


FORCE_CUDA = _flag("BN_CUDA_FORCE_CUDA")
CPU_ONLY = _flag("BN_CUDA_CPU_ONLY")
EMULATE = _flag("BN_CUDA_EMULATE")
if FORCE_CUDA and CPU_ONLY:
    raise SystemExit("bn_cuda: BN_CUDA_FORCE_CUDA=1 and BN_CUDA_CPU_ONLY=1 contradict each other; set one.")
if EMULATE and (FORCE_CUDA or CPU_ONLY):
    raise SystemExit("bn_cuda: BN_CUDA_EMULATE=1 builds neither the CUDA nor the CPU kernels; "
                     "unset BN_CUDA_FORCE_CUDA / BN_CUDA_CPU_ONLY.")

# torch.utils.cpp_extension reads CUDA_HOME when it is imported. /usr/local/bin/nvcc may be a
# wrapper script, from which torch would guess CUDA_HOME=/usr/local and then fail to link
# -lcudart; point it at the real toolkit first.
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
    for candidate in ("/usr/local/cuda",):
        if (Path(candidate) / "bin" / "nvcc").exists():
            os.environ["CUDA_HOME"] = candidate
            break
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))

import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402


def _cuda_reason_missing():
    if CPU_ONLY:
        return "BN_CUDA_CPU_ONLY=1"
    if EMULATE:
        return "BN_CUDA_EMULATE=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if cpp_extension.CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME)"
    if not (Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc").exists():
        return f"no nvcc under CUDA_HOME={cpp_extension.CUDA_HOME}"
    return None


missing = _cuda_reason_missing()
WITH_CUDA = missing is None
if FORCE_CUDA and not WITH_CUDA:
    raise RuntimeError(f"bn_cuda: BN_CUDA_FORCE_CUDA=1 but the CUDA kernels cannot be built: {missing}")
if EMULATE:
    print("bn_cuda: building the CUDA kernels for the host emulation (BN_CUDA_EMULATE=1): not for use")
elif not WITH_CUDA:
    print(f"bn_cuda: building the CPU kernels only ({missing})")

ARCHS = os.environ["TORCH_CUDA_ARCH_LIST"] if WITH_CUDA else ""

# Public torch-free headers travel inside the package (bn_cuda.get_include()).
src_inc = ROOT / "csrc" / "include" / "bn_cuda"
pkg_inc = ROOT / "bn_cuda" / "include" / "bn_cuda"
if pkg_inc.exists():
    shutil.rmtree(pkg_inc)
shutil.copytree(src_inc, pkg_inc)

# What this build was made against, read by bn_cuda/__init__.py before it loads _C.
meta = {
    "version": VERSION,
    "torch": torch.__version__,
    "cuda": torch.version.cuda if WITH_CUDA else None,
    "cuda_archs": ARCHS,
    "with_cuda": WITH_CUDA,
    "emulated_cuda": EMULATE,
}
(ROOT / "bn_cuda" / "_build_meta.json").write_text(json.dumps(meta, indent=2) + "\n")

sources = ["csrc/ops.cpp"]
sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "common").glob("*.cpp"))
sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
include_dirs = [str(ROOT / "csrc"), str(ROOT / "csrc" / "include")]


def _q(s: str) -> str:
    return '"' + s + '"'


define_macros = [
    ("BN_CUDA_VERSION_STR", _q(VERSION)),
    ("BN_CUDA_TORCH_VERSION", _q(torch.__version__)),
    ("BN_CUDA_CUDA_VERSION", _q(torch.version.cuda if WITH_CUDA else "")),
    ("BN_CUDA_ARCHS", _q(ARCHS)),
    ("BN_CUDA_WITH_CUDA", "1" if WITH_CUDA else "0"),
]
# -fno-math-errno: sqrt need not set errno, so loops calling it vectorize (vsqrtps; the same
# correctly rounded results as the scalar sqrtss).
cxx_flags = ["-O3", "-fno-math-errno", "-fopenmp", "-Wall", "-Wno-unused-function", "-Wno-psabi"]
extra = {"cxx": cxx_flags}
link_args = ["-fopenmp"]


def _loaded_libstdcxx():
    """The shared C++ runtime this process (that is, torch) has loaded, by its full path; or None.

    Some toolchains link libstdc++ statically (the GPU image's /opt/gcc/bin/g++ wrapper passes
    -static-libstdc++, and there a plain -lstdc++ also resolved to the static archive). The
    extension then had a private copy of the C++ runtime: its streams formatted nothing or crashed
    (building any message, even on valid calls) and its c10::Error throws segfaulted instead of
    raising. Linked by full path, ahead of the driver's own -lstdc++, the shared library torch uses
    resolves every C++ runtime symbol and is NEEDED by the extension, whatever the driver adds.
    """
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            for line in maps:
                path = line.split()[-1]
                if "/libstdc++.so" in path and os.path.isfile(path):
                    return path
    except OSError:
        pass
    return None


if sys.platform.startswith("linux"):
    link_args.append(_loaded_libstdcxx() or "-lstdc++")


def _emulation_sources():
    """Sources and include folders of the BN_CUDA_EMULATE build (see csrc/emulate/cuda_emu.h).

    The public headers are copied to build/emulate/include with launch.cuh's one-line launches
    `kernel<<<cfg>>>(args);` rewritten as `bn_emu::launch(bn_emu::Config(cfg), [&] { kernel(args); });`,
    and each csrc/cuda/*.cu gets a .cpp wrapper that includes the emulation header first.
    """
    import re

    toolkit = [Path(p) for p in (os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME, "/usr/local/cuda") if p]
    cuda_inc = next((p / "include" for p in toolkit if (p / "include" / "cuda_fp16.h").is_file()), None)
    if cuda_inc is None:
        raise SystemExit("bn_cuda: BN_CUDA_EMULATE=1 needs a CUDA toolkit's headers (cuda_runtime.h, "
                         "cuda_fp16.h); set CUDA_HOME")
    gen = ROOT / "build" / "emulate"
    if gen.exists():
        shutil.rmtree(gen)
    shutil.copytree(src_inc, gen / "include" / "bn_cuda")
    launch = gen / "include" / "bn_cuda" / "cuda" / "launch.cuh"
    pattern = re.compile(r"^(\s*)(\S.*?)<<<(.+?)>>>\((.*)\);\s*$")
    text = launch.read_text()
    lines, rewritten = [], 0
    for line in text.splitlines():
        m = pattern.match(line)
        if m:
            ind, kernel, cfg, args = m.groups()
            line = f"{ind}::bn_emu::launch(::bn_emu::Config({cfg}), [&] {{ {kernel}({args}); }});"
            rewritten += 1
        lines.append(line)
    launches = sum(line.count("<<<") for line in text.splitlines() if not line.lstrip().startswith("//"))
    if rewritten == 0 or rewritten != launches:
        raise SystemExit(f"bn_cuda: BN_CUDA_EMULATE=1 rewrote {rewritten} of launch.cuh's {launches} "
                         "launches; keep each launch on one line: kernel<<<cfg>>>(args);")
    launch.write_text("\n".join(lines) + "\n")
    wrappers = []
    for cu in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        w = gen / "src" / (cu.stem + ".cpp")
        w.parent.mkdir(parents=True, exist_ok=True)
        w.write_text(f'#include "emulate/cuda_emu.h"\n#include "cuda/{cu.name}"\n')
        wrappers.append(str(w.relative_to(ROOT)))
    return wrappers, [str(gen / "include"), str(cuda_inc)]


if EMULATE:
    # The CPU kernels are not registered (ops_cpu*.cpp): the CPU key runs ops_cuda.cpp's bodies.
    sources += ["csrc/cuda/ops_cuda.cpp", "csrc/emulate/runtime.cpp"]
    emu_sources, emu_includes = _emulation_sources()
    sources += emu_sources
    include_dirs = emu_includes[:1] + include_dirs + emu_includes[1:]
    define_macros.append(("BN_CUDA_EMULATE", "1"))
    cxx_flags += ["-ffp-contract=off", "-Wno-unknown-pragmas"]

if WITH_CUDA:
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cpp"))
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
    define_macros.append(("BN_CUDA_HAS_CUDA", "1"))
    # ATen's CUDA headers include cusparse.h & co., which pip's torch ships under
    # nvidia/cu13/include rather than inside the toolkit.
    try:
        import nvidia  # type: ignore

        for base in nvidia.__path__:
            for sub in ("cu13", "cu12"):
                inc = Path(base) / sub / "include"
                if inc.is_dir():
                    include_dirs.append(str(inc))
    except ImportError:
        pass
    extra["nvcc"] = ["-O3", "-lineinfo", "-std=c++17"]
    ext = cpp_extension.CUDAExtension(
        "bn_cuda._C", sources, include_dirs=include_dirs, define_macros=define_macros,
        extra_compile_args=extra, extra_link_args=link_args,
    )
else:
    ext = cpp_extension.CppExtension(
        "bn_cuda._C", sources, include_dirs=include_dirs, define_macros=define_macros,
        extra_compile_args=extra, extra_link_args=link_args,
    )

# The per-capability copies of the CPU kernels and their flags (ATen's own for these capabilities,
# plus F16C, which every AVX2 / AVX-512 CPU has). GCC 12 warns "'__Y' may be used uninitialized"
# inside its own avx512fintrin.h wherever at::vec's 512-bit float16 / bfloat16 conversions are
# inlined (its _mm512_undefined_* idiom): silenced for that file only.
CAPABILITY_SOURCES = {
    "kernels_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"],
    "kernels_avx512.cpp": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                           "-Wno-maybe-uninitialized", "-Wno-uninitialized"],
}
# The bfloat16 kernels once more with AVX512_BF16's conversion instruction (kernels_impl.h: narrow).
CAPABILITY_SOURCES["kernels_avx512_bf16.cpp"] = CAPABILITY_SOURCES["kernels_avx512.cpp"] + ["-mavx512bf16"]


class BuildExt(cpp_extension.BuildExtension):
    """Compiles csrc/cpu/kernels_avx2.cpp, kernels_avx512.cpp and kernels_avx512_bf16.cpp with their
    instruction sets' flags and every other source without.

    Those kernels are picked at run time (cpu::capability()), so only their translation units may
    use AVX2 / AVX-512 instructions. A `#pragma GCC target` inside the file is not enough: GCC 13's
    libstdc++ refuses to inline its always_inline helpers across the target switch.
    """

    def build_extension(self, ext):
        special = [s for s in ext.sources if Path(s).name in CAPABILITY_SOURCES]
        if special and platform.machine().lower() in ("x86_64", "amd64"):
            ext.sources = [s for s in ext.sources if s not in special]
            for src in special:
                flags = CAPABILITY_SOURCES[Path(src).name]
                args = ext.extra_compile_args
                if isinstance(args, dict):
                    args = {k: list(v) for k, v in args.items()}
                    args["cxx"] = args.get("cxx", []) + flags
                else:
                    args = list(args or []) + flags
                objects = self.compiler.compile(
                    [src], output_dir=self.build_temp, macros=ext.define_macros,
                    include_dirs=ext.include_dirs, debug=self.debug, extra_postargs=args,
                    depends=ext.depends,
                )
                ext.extra_objects = list(ext.extra_objects or []) + objects
        super().build_extension(ext)


setup(
    name="bn_cuda",
    version=VERSION,
    description="TensorFlow/Keras BatchNormalization for PyTorch on fused C++/CUDA kernels",
    packages=find_packages(include=["bn_cuda", "bn_cuda.*"]),
    package_data={"bn_cuda": ["_build_meta.json", "include/bn_cuda/*.h", "include/bn_cuda/**/*"]},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=True)},
    python_requires=">=3.9",
    zip_safe=False,
)
