"""Builds examples/consumer_ext against the installed bn_cuda (public headers + dispatcher
header) and checks its numbers against bn_cuda.functional.batch_norm. The CUDA part compiles
wherever nvcc and a CUDA torch exist and runs where a GPU is visible."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

import bn_cuda

ROOT = Path(__file__).resolve().parents[1] / "examples" / "consumer_ext"


def _cuda_home():
    home = os.environ.get("CUDA_HOME")
    if not home and (Path("/usr/local/cuda") / "bin" / "nvcc").exists():
        home = "/usr/local/cuda"
    return home


@pytest.fixture(scope="module")
def consumer():
    home = _cuda_home()
    if home:
        os.environ.setdefault("CUDA_HOME", home)
    from torch.utils import cpp_extension

    if home and cpp_extension.CUDA_HOME != home:
        cpp_extension.CUDA_HOME = home  # imported earlier with a guessed root
    with_cuda = torch.version.cuda is not None and home is not None and bn_cuda.build_info()["with_cuda"]
    sources = [str(ROOT / "csrc" / "consumer.cpp")]
    flags = ["-O1", "-DBN_CUDA_NAMESPACE=consumer_bn"]
    cuda_flags = list(flags)
    if with_cuda:
        sources.append(str(ROOT / "csrc" / "stats.cu"))
        flags.append("-DCONSUMER_WITH_CUDA=1")
        cuda_flags.append("-DCONSUMER_WITH_CUDA=1")
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    build_dir = tempfile.mkdtemp(prefix="bn_cuda_consumer_")
    try:
        mod = cpp_extension.load(
            name="consumer_ext_test", sources=sources, extra_include_paths=[bn_cuda.get_include()],
            extra_cflags=flags, extra_cuda_cflags=cuda_flags, with_cuda=with_cuda,
            build_directory=build_dir, verbose=False,
        )
        yield mod
    finally:
        shutil.rmtree(build_dir, ignore_errors=True)


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("shape", [(4, 3, 7, 7), (2, 17, 49), (5, 1, 1)])
def test_channel_stats_with_public_headers(consumer, device, shape):
    g = torch.Generator().manual_seed(1)
    c = shape[1]
    x = (torch.randn(shape, generator=g) * torch.rand(c, generator=g).view(1, c, *[1] * (len(shape) - 2))
         + 100 * torch.randn(c, generator=g).view(1, c, *[1] * (len(shape) - 2))).to(device)
    mean, var = consumer.channel_stats(x)
    dims = [0] + list(range(2, x.dim()))
    ref_var, ref_mean = torch.var_mean(x.double().cpu(), dims, unbiased=False)
    torch.testing.assert_close(mean.double().cpu(), ref_mean, rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(var.double().cpu(), ref_var, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("device", _devices())
def test_ops_through_dispatcher(consumer, device):
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(6, 5, 4, 3, generator=g) * 2 + torch.arange(5.0).view(1, 5, 1, 1)).to(device)
    w, b = torch.randn(5, generator=g).to(device), torch.randn(5, generator=g).to(device)
    rm1, rv1 = torch.zeros(5, device=device), torch.ones(5, device=device)
    rm2, rv2 = rm1.clone(), rv1.clone()
    y = consumer.bn_train(x, w, b, rm1, rv1, 0.1, 1e-5)
    ref = bn_cuda.functional.batch_norm(x, rm2, rv2, w, b, training=True, momentum=0.1, eps=1e-5)
    assert torch.equal(y, ref)
    assert torch.equal(rm1, rm2) and torch.equal(rv1, rv2)
    yi = consumer.bn_infer(x, w, b, rm1, rv1, 1e-5)
    assert torch.equal(yi, bn_cuda.functional.batch_norm(x, rm1, rv1, w, b, training=False))


@pytest.mark.parametrize("device", _devices())
def test_staged_ops_through_dispatcher(consumer, device):
    """The staged ops (batch_stats, gather_stats, normalize) called from C++ through bn_cuda/ops.h."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(5, 17, 7, generator=g) * (torch.rand(17, 1, generator=g) + 0.5)
         + 1e3 * torch.randn(17, 1, generator=g)).to(device)
    w, b = torch.randn(17, generator=g).to(device), torch.randn(17, generator=g).to(device)
    y = consumer.bn_staged(x, w, b, 1e-5)
    torch.testing.assert_close(y, bn_cuda.functional.batch_norm(x, None, None, w, b, training=True, eps=1e-5),
                               rtol=1e-5, atol=1e-5)
    mask = torch.rand(5, 1, 7, generator=g).to(device) > 0.4
    mean, m2, count = consumer.masked_stats(x, mask)
    xd, wd = x.double().cpu(), mask.expand_as(x).double().cpu()
    n = wd.sum((0, 2))
    ref_mean = (xd * wd).sum((0, 2)) / n
    ref_m2 = (wd * (xd - ref_mean.view(1, -1, 1)) ** 2).sum((0, 2))
    torch.testing.assert_close(count.double().cpu(), n)
    torch.testing.assert_close(mean.double().cpu(), ref_mean, rtol=1e-7, atol=1e-4)
    torch.testing.assert_close(m2.double().cpu(), ref_m2, rtol=1e-4, atol=1e-3)
