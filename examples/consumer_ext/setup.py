"""A tiny extension built on bn_cuda's public headers and dispatcher-callable ops.

    pip install --no-build-isolation .      (with bn_cuda importable)
"""

import os
from pathlib import Path

from setuptools import setup

if not os.environ.get("CUDA_HOME") and (Path("/usr/local/cuda") / "bin" / "nvcc").exists():
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import bn_cuda  # noqa: E402
import torch  # noqa: E402
from torch.utils import cpp_extension  # noqa: E402

here = Path(__file__).resolve().parent
with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
sources = [str(here / "csrc" / "consumer.cpp")]
# BN_CUDA_NAMESPACE puts our copy of bn_cuda's header code in a namespace of our own, so it can
# never clash with the symbols inside bn_cuda._C.
macros = [("BN_CUDA_NAMESPACE", "consumer_bn")]
kw = dict(include_dirs=[bn_cuda.get_include()], extra_compile_args={"cxx": ["-O2"], "nvcc": ["-O2"]},
          define_macros=macros)
if with_cuda:
    sources.append(str(here / "csrc" / "stats.cu"))
    macros.append(("CONSUMER_WITH_CUDA", "1"))
    ext = cpp_extension.CUDAExtension("consumer_ext", sources, **kw)
else:
    ext = cpp_extension.CppExtension("consumer_ext", sources, **kw)

setup(name="consumer_ext", version="0.0.1", ext_modules=[ext],
      cmdclass={"build_ext": cpp_extension.BuildExtension})
