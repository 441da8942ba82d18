"""How the extension was built: build_info(), the torch-mismatch error, the shared C++ runtime."""

import struct
import sys

import pytest
import torch

import bn_cuda


def test_build_info_keys_and_values():
    info = bn_cuda.build_info()
    for key in ("version", "torch", "cuda", "cuda_archs", "with_cuda", "cpu_capability"):
        assert key in info, key
    assert isinstance(info["version"], str) and info["version"][0].isdigit()
    assert info["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert isinstance(info["with_cuda"], bool)
    # with_cuda says whether CUDA kernels are registered, not whether a GPU is visible
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("bn_cuda::forward_train", "CUDA")
    assert has_cuda_kernel == info["with_cuda"]
    if info["with_cuda"]:
        assert info["cuda"] and info["cuda_archs"]
    else:
        assert info["cuda"] is None


def test_torch_mismatch_is_an_actionable_import_error(monkeypatch):
    monkeypatch.setattr(bn_cuda, "_read_meta", lambda: {"torch": "1.0.0+cu000", "cuda": "9.9"})
    with pytest.raises(ImportError) as exc:
        bn_cuda._load_native()
    msg = str(exc.value)
    assert "1.0.0+cu000" in msg and torch.__version__ in msg and "Rebuild" in msg


def _dt_needed(path):
    """DT_NEEDED entries of an ELF64 little-endian shared object (no binutils needed)."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "not an ELF64 LE file"
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    SHT_DYNAMIC, DT_NEEDED = 6, 1
    needed = []
    for sh in sections:
        if sh[1] != SHT_DYNAMIC:
            continue
        strtab = sections[sh[6]]  # sh_link: the section of the names
        str_off = strtab[4]
        for off in range(sh[4], sh[4] + sh[5], 16):
            tag, val = struct.unpack_from("<qQ", data, off)
            if tag == 0:
                break
            if tag == DT_NEEDED:
                end = data.index(b"\0", str_off + val)
                needed.append(data[str_off + val:end].decode())
    return needed


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ELF check")
def test_extension_links_the_shared_cxx_runtime():
    """The extension must use the process's shared libstdc++: a toolchain that links it statically
    (the GPU image's g++ wrapper did) gives the module a private C++ runtime, and then C++ errors
    crashed the process there, and numbers went missing from error messages here."""
    needed = _dt_needed(bn_cuda._C.__file__)
    assert any(n.startswith("libstdc++") for n in needed), needed


def test_cxx_error_reaches_python_with_its_numbers():
    x = torch.randn(4, 3, 5)
    with pytest.raises((ValueError, RuntimeError), match=r"weight.*\b7\b.*\b3\b|weight.*\b3\b.*\b7\b"):
        torch.ops.bn_cuda.forward_train(x, torch.ones(7), None, None, None, 0.1, 1e-5, [1])
