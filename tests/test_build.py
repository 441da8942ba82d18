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


_TF_FIRST = """
import tensorflow
import bn_cuda, torch
layer = bn_cuda.BatchNormalization(virtual_batch_size=2)
x = torch.randn(4, 5, 3, requires_grad=True)
layer(x, training=True).sum().backward()
assert x.grad is not None
print("tf-first ok")
"""

_BN_FIRST = """
import bn_cuda, torch
import numpy as np, tensorflow, tf_keras
keras_layer = tf_keras.layers.BatchNormalization(renorm=True)
keras_layer(np.random.randn(4, 3).astype("float32"), training=True)
layer = bn_cuda.BatchNormalization.from_keras(keras_layer)
opt = torch.optim.Adam(layer.parameters())
layer(torch.randn(4, 3), training=True).sum().backward()
opt.step()                                   # torch loads triton here
torch.compile(lambda t: t * 2)(torch.ones(2))
print("bn-first ok")
"""


@pytest.mark.tf
@pytest.mark.parametrize("script,word", [(_TF_FIRST, "tf-first ok"), (_BN_FIRST, "bn-first ok")])
def test_tensorflow_in_the_same_process(script, word):
    """triton crashes the process when it loads after tensorflow. `import bn_cuda` loads it first,
    so tensorflow may come after (and an optimizer step, torch.compile work); after tensorflow,
    bn_cuda loads nothing, works, and warns how to order the imports."""
    pytest.importorskip("tf_keras", exc_type=ImportError)
    import subprocess
    import os

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(bn_cuda._HERE.parent),
                                                                    os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0 and word in done.stdout, (done.returncode, done.stderr[-2000:])
    if script is _TF_FIRST:
        assert "Import bn_cuda (or torch._dynamo) before tensorflow" in done.stderr
