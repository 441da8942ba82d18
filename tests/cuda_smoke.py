"""A short sweep of every CUDA kernel variant, for compute-sanitizer (benchmarks/device_check.sh).

Covers fp32/fp64/fp16/bf16, channels-first (vectorized and unaligned) and channels-last (wide
and narrow feature tiles), training forward (with running stats), inference forward, and backward
with every output mask; checks each result against a float64 CPU reference so a silent error
also fails. Usage: python tests/cuda_smoke.py [--small]
"""

import sys

import torch

import bn_cuda

SMALL = "--small" in sys.argv


def ref_train(x, w, b, eps=1e-5):
    xd = x.double().cpu()
    dims = [0] + list(range(2, x.dim()))
    mean = xd.mean(dims, keepdim=True)
    var = xd.var(dims, unbiased=False, keepdim=True)
    shape = [1, -1] + [1] * (x.dim() - 2)
    return (xd - mean) / torch.sqrt(var + eps) * w.double().cpu().view(shape) + b.double().cpu().view(shape)


def main() -> int:
    assert torch.cuda.is_available(), "needs a CUDA device"
    dev = "cuda"
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 17, 7, 7), (2, 64, 9, 9), (5, 3, 1), (8, 1000), (4, 40, 6)]
    if not SMALL:
        shapes += [(16, 256, 14, 14), (33, 130, 5, 3)]
    failures = 0
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        tol = {torch.float32: 1e-4, torch.float64: 1e-10, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
        for shape in shapes:
            for fmt in ("contiguous", "channels_last", "offset"):
                if fmt == "channels_last" and len(shape) != 4:
                    continue
                c = shape[1]
                base = torch.randn(shape, generator=g) * torch.rand(c, generator=g).view(1, -1, *[1] * (len(shape) - 2)) * 3
                base = base + torch.randn(c, generator=g).view(1, -1, *[1] * (len(shape) - 2)) * 5
                x = base.to(dev, dtype)
                if fmt == "channels_last":
                    x = x.contiguous(memory_format=torch.channels_last)
                elif fmt == "offset":  # misaligned start: forces the scalar (vec = 1) path
                    buf = torch.empty(x.numel() + 1, device=dev, dtype=dtype)
                    buf[1:] = x.reshape(-1)
                    x = buf[1:].view(shape)
                w = torch.randn(c, generator=g).to(dev)
                b = torch.randn(c, generator=g).to(dev)
                rm, rv = torch.zeros(c, device=dev), torch.ones(c, device=dev)
                xr = x.detach().requires_grad_(True)
                wr = w.clone().requires_grad_(True)
                br = b.clone().requires_grad_(True)
                y = bn_cuda.functional.batch_norm(xr, rm, rv, wr, br, training=True)
                err = (y.double().cpu() - ref_train(x, w, b)).abs().max().item()
                gy = torch.randn_like(y)
                y.backward(gy)
                yi = bn_cuda.functional.batch_norm(x, rm, rv, w, b, training=False)
                for mask in ([True, False, False], [False, True, True], [True, True, True]):
                    torch.ops.bn_cuda.backward(gy, x, w, torch.zeros(c, device=dev), torch.ones(c, device=dev),
                                               False, [1], mask)
                torch.cuda.synchronize()
                ok = err < tol * 10 and torch.isfinite(xr.grad).all().item() and torch.isfinite(yi).all().item()
                if not ok:
                    failures += 1
                print(f"{str(dtype):15s} {str(shape):18s} {fmt:14s} max|y-ref|={err:.2e} {'ok' if ok else 'FAIL'}")
    # Staged ops: masked statistics, ghost rows (channels-last) and split ghosts (channels-first).
    from bn_cuda import staged

    for dtype in (torch.float32, torch.float16):
        for shape, fmt in (((8, 24, 5, 5), "channels_last"), ((8, 24, 5, 5), "contiguous"), ((12, 7, 33), "contiguous")):
            x = torch.randn(shape, generator=g).to(dev, dtype)
            if fmt == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            axis = [1] if len(shape) == 4 else [-1]
            mask = (torch.rand(shape[:-1] + (1,), generator=g) > 0.3).to(dev)
            for ghosts, m in ((1, None), (4, None), (1, mask), (2, mask)):
                mean, m2, cnt = staged.batch_stats(x, axis, m, ghosts=ghosts)
                gm, ginv, gc = staged.gather_stats(mean[None], m2[None], cnt[None], None, None, 0.1, 1e-3)
                y = staged.normalize(x, gm, ginv, None, None, axis, ghosts=ghosts)
                gy = torch.randn_like(y)
                sdy, sdyx = staged.grad_sums(gy, x, gm, ginv, axis, ghosts=ghosts)
                gx = staged.grad_input(gy, x, gm, ginv, None, sdy, sdyx, gc, axis, m, ghosts=ghosts)
                ok = bool(torch.isfinite(y).all() and torch.isfinite(gx).all())
                if m is None:  # the one-pass backward: bitwise grad_sums + grad_input
                    gx1, gw1, gb1 = staged.ghost_backward(gy, x, gm, ginv, None, axis, ghosts=ghosts)
                    ok = ok and torch.equal(gx1, gx) and torch.equal(gb1, sdy) and torch.equal(gw1, sdyx * ginv)
                    # and with keras_grads in the finalize kernel (keras_backward): bitwise the two ops
                    fv = gb1.numel() // ghosts
                    fac = [torch.rand(fv, generator=g).to(dev, gw1.dtype) + 0.5 for _ in range(5)]
                    kb = staged.keras_backward(gy, x, gm, ginv, None, axis, ghosts, *fac, True)
                    kg = staged.keras_grads(gw1, gb1, *fac, True, ghosts)
                    ok = ok and torch.equal(kb[0], gx1) and all(torch.equal(a, b) for a, b in zip(kb[1:], kg))
                torch.cuda.synchronize()
                failures += 0 if ok else 1
                print(f"staged {str(dtype):15s} {str(shape):14s} {fmt:14s} ghosts={ghosts} mask={m is not None} "
                      f"{'ok' if ok else 'FAIL'}")
    # Keras epilogues (keras_finalize, keras_coeffs with every factor) and the layer's fused steps.
    for ghosts in (1, 3):
        c = 19
        xs = torch.randn(6 * ghosts, c, generator=g).to(dev)
        mean, m2, cnt = staged.batch_stats(xs, [1], None, ghosts=ghosts)
        bufs = [torch.rand(c, generator=g).to(dev) + 0.5 for _ in range(5)]
        rd = staged.keras_finalize(mean, m2 / cnt, cnt, *bufs, ghosts, 0.9, 0.9, 1e-3, 0.5, 2.0, 1.0)
        vecs = [torch.rand(c, generator=g).to(dev) for _ in range(4)]
        out = staged.keras_coeffs(mean, m2, cnt, *vecs, *bufs, ghosts, 0.9, 0.9, 1e-3, 0.5, 2.0, 1.0)
        torch.cuda.synchronize()
        ok = all(bool(torch.isfinite(t).all()) for t in (*rd, *out, *bufs))
        failures += 0 if ok else 1
        print(f"keras_finalize / keras_coeffs ghosts={ghosts} {'ok' if ok else 'FAIL'}")
    adj = (torch.rand(12, generator=g).to(dev) + 0.5, torch.rand(12, generator=g).to(dev))
    for name, kwargs in (("ghost", dict(virtual_batch_size=2)),
                         ("renorm", dict(renorm=True, renorm_clipping={"rmax": 2.0, "dmax": 1.0})),
                         ("ghost+renorm", dict(virtual_batch_size=4, renorm=True)),
                         ("adjustment", dict(adjustment=lambda s: adj)), ("mask", dict())):
        layer = bn_cuda.BatchNormalization(**kwargs)
        layer.build((8, 5, 12), device=torch.device(dev))
        x = torch.randn(8, 5, 12, generator=g).to(dev).requires_grad_(True)
        mask = (torch.rand(8, 5, generator=g) > 0.3).to(dev) if name == "mask" else None
        y = layer(x, training=True, mask=mask)
        y.backward(torch.randn_like(y))
        torch.cuda.synchronize()
        ok = bool(torch.isfinite(y).all() and torch.isfinite(x.grad).all() and torch.isfinite(layer.gamma.grad).all())
        failures += 0 if ok else 1
        print(f"keras layer step {name:14s} {'ok' if ok else 'FAIL'}")
    print("failures:", failures)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
