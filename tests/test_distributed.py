"""Synchronized batch norm across processes (bn_cuda.nn.SyncBatchNorm, BatchNormalization(synchronized=True)).

Groups of 2 and 3 gloo processes on 127.0.0.1 run the layers on uneven (and empty) per-rank parts of a
global batch; each rank builds the whole global batch from a seed and checks its part against
single-process batch norm on the concatenated batch (torch's ``F.batch_norm``, bn_cuda's own plain
path, the Keras layer unsynchronized with ``fused=False``) in float64: outputs, input gradients,
weight gradients summed over the ranks, running statistics. Several checks share one spawned group,
and every group runs under a wall-clock bound (processes are killed, the test fails) so a hang
cannot block CI.
"""

from __future__ import annotations

import copy
import multiprocessing
import os
import queue
import socket
import time
import traceback
from contextlib import contextmanager
from datetime import timedelta
from typing import Callable, Dict, List, Optional, Sequence

import pytest
import torch
import torch.distributed as dist

import bn_cuda
from bn_cuda import BatchNormalization
from bn_cuda.distributed import sync_batch_norm
from bn_cuda.nn import SyncBatchNorm

GROUP_TIMEOUT_S = 100.0  # wall-clock bound on one spawned group
TOL = dict(rtol=1e-9, atol=1e-9)  # float64 against float64 references

SIZES_3 = [[2, 3, 5], [0, 1, 4], [0, 0, 3], [1, 1, 1], [0, 0, 0]]
SIZES_2 = [[2, 3], [0, 4], [1, 1], [0, 0]]


# ---------------------------------------------------------------------------------------------
# Spawning


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, scenario: str, args: tuple, results) -> None:
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=60))
        try:
            SCENARIOS[scenario](rank, world, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, None))
    except BaseException:  # noqa: B902  (report everything, including SystemExit)
        results.put((rank, traceback.format_exc()))


def _run_once(world: int, scenario: str, args: tuple, timeout: float):
    """Spawn the group once: ``(errors by rank, ranks without a result, exit codes)``."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, scenario, args, results), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    reports: Dict[int, Optional[str]] = {}
    grace = None
    try:
        while len(reports) < world:
            now = time.monotonic()
            if now > deadline or (grace is not None and now > grace):
                break
            try:
                rank, err = results.get(timeout=0.5)
                reports[rank] = err
                if err is not None and grace is None:  # the others may now wait forever: give them 5 s
                    grace = time.monotonic() + 5.0
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and grace is None:  # crashed without a report (a signal)
                    grace = time.monotonic() + 5.0
    finally:
        for p in procs:
            p.join(timeout=max(0.0, min(5.0, deadline - time.monotonic())))
            if p.is_alive():
                p.kill()
                p.join()
    errors = {r: e for r, e in reports.items() if e is not None}
    missing = [r for r in range(world) if r not in reports]
    return errors, missing, {r: procs[r].exitcode for r in missing}


def run_group(world: int, scenario: str, *args, timeout: float = GROUP_TIMEOUT_S) -> None:
    """Run ``SCENARIOS[scenario](rank, world, *args)`` in ``world`` gloo processes; fail on any error
    or on the timeout (after which every process is killed)."""
    for attempt in range(2):
        errors, missing, codes = _run_once(world, scenario, args, timeout)
        port_taken = any("address already in use" in e.lower() for e in errors.values())
        if not (port_taken and attempt == 0):  # (another process took the free port in between: retry)
            break
    if errors:
        rank = min(errors)
        pytest.fail(f"scenario {scenario!r}: rank {rank} failed:\n{errors[rank]}", pytrace=False)
    if missing:
        pytest.fail(f"scenario {scenario!r}: ranks {missing} gave no result within {timeout:.0f} s "
                    f"(exit codes {codes}): a hang or a crash", pytrace=False)


# ---------------------------------------------------------------------------------------------
# Helpers used inside the workers


def _global_batch(sizes: Sequence[int], rest: Sequence[int], seed: int, channels_last: bool = False):
    """The global input and upstream gradient (every rank builds the same), float64."""
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    feat_off = torch.linspace(-2.0, 3.0, rest[0]).reshape(-1, *[1] * (len(rest) - 1))
    x = torch.randn(n, *rest, generator=g, dtype=torch.float64) * 2.0 + feat_off
    dy = torch.randn(n, *rest, generator=g, dtype=torch.float64)
    if channels_last:
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    return x, dy


def _part(t: torch.Tensor, sizes: Sequence[int], rank: int) -> torch.Tensor:
    start = sum(sizes[:rank])
    return t[start:start + sizes[rank]]


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone(memory_format=torch.preserve_format).requires_grad_()


def _summed(t: Optional[torch.Tensor], group=None) -> Optional[torch.Tensor]:
    if t is None:
        return None
    t = t.detach().clone()
    dist.all_reduce(t, group=group)
    return t


def _close(actual, expected, what: str, **tol) -> None:
    torch.testing.assert_close(actual.detach(), expected.detach().to(actual.dtype), **(tol or TOL),
                               msg=lambda m: f"{what}: {m}")


def _same_layout(out: torch.Tensor, x: torch.Tensor, what: str) -> None:
    assert out.shape == x.shape, f"{what}: output shape {tuple(out.shape)}"
    for fmt in (torch.contiguous_format, torch.channels_last):
        if x.dim() == 4 and x.is_contiguous(memory_format=fmt):
            assert out.is_contiguous(memory_format=fmt), f"{what}: output not in the input's {fmt}"


@contextmanager
def _count_collectives():
    """Counts the collectives issued (all-gather / all-reduce), by wrapping torch.distributed's."""
    counts = {"n": 0}
    names = [n for n in ("all_gather_single", "all_gather_into_tensor", "all_reduce", "all_gather")
             if hasattr(dist, n)]
    saved = {n: getattr(dist, n) for n in names}

    def wrap(fn):
        def counted(*args, **kwargs):
            counts["n"] += 1
            return fn(*args, **kwargs)
        return counted

    for n in names:
        setattr(dist, n, wrap(saved[n]))
    try:
        yield counts
    finally:
        for n, fn in saved.items():
            setattr(dist, n, fn)


# -- torch-style module ------------------------------------------------------------------------


def _check_sync_module(rank: int, world: int, sizes, *, channels_last: bool, momentum=0.1, rest=(3, 2, 2),
                       affine=True, steps: int = 2, seed: int = 0, group=None, ranks=None) -> None:
    """bn_cuda.nn.SyncBatchNorm on this rank's part == torch BatchNorm / bn_cuda plain on the whole."""
    ranks = list(range(world)) if ranks is None else ranks
    me = ranks.index(rank)
    c = rest[0]
    ref = torch.nn.BatchNorm2d(c, momentum=momentum, affine=affine).double()  # F.batch_norm (any rank >= 2)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 100)
        for t in (ref.running_mean, ref.running_var) + ((ref.weight, ref.bias) if affine else ()):
            t.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
    ours = SyncBatchNorm(c, momentum=momentum, affine=affine, process_group=group).double()
    ours.load_state_dict(ref.state_dict())
    plain_rm, plain_rv = ref.running_mean.clone(), ref.running_var.clone()
    for step in range(steps):
        x, dy = _global_batch(sizes, rest, seed + step, channels_last and len(rest) == 3)
        xr = _leaf(_part(x, sizes, me))
        out = ours(xr)
        out.backward(_part(dy, sizes, me))
        xg = _leaf(x)
        factor = momentum if momentum is not None else 1.0 / (step + 1)  # (cumulative average)
        ref_out = torch.nn.functional.batch_norm(xg, ref.running_mean, ref.running_var, ref.weight, ref.bias,
                                                 True, factor, ref.eps)
        ref_out.backward(dy)
        plain = bn_cuda.functional.batch_norm(x, plain_rm, plain_rv, ref.weight, ref.bias, True, factor, ref.eps)
        what = f"SyncBatchNorm sizes={sizes} step={step} channels_last={channels_last} momentum={momentum}"
        _same_layout(out, xr, what)
        _close(out, _part(ref_out, sizes, me), f"{what}: output vs F.batch_norm")
        _close(out, _part(plain, sizes, me), f"{what}: output vs bn_cuda plain")
        _close(xr.grad, _part(xg.grad, sizes, me), f"{what}: grad_input")
        if affine:
            _close(_summed(ours.weight.grad, group), ref.weight.grad, f"{what}: summed grad_weight")
            _close(_summed(ours.bias.grad, group), ref.bias.grad, f"{what}: summed grad_bias")
            for p in (ours.weight, ours.bias, ref.weight, ref.bias):
                p.grad = None
        _close(ours.running_mean, ref.running_mean, f"{what}: running_mean")
        _close(ours.running_var, ref.running_var, f"{what}: running_var")
        _close(ours.running_mean, plain_rm, f"{what}: running_mean vs bn_cuda plain")
        _close(ours.running_var, plain_rv, f"{what}: running_var vs bn_cuda plain")
        assert int(ours.num_batches_tracked) == step + 1
    if sum(sizes) == 0:
        _close(ours.running_mean, torch.rand(c, generator=torch.Generator().manual_seed(seed + 100),
                                             dtype=torch.float64) + 0.5, "all-empty: running_mean unchanged")


def _check_collective_counts(rank: int, world: int) -> None:
    """One collective per training forward, one per backward (after the first call's feature check);
    none in eval mode."""
    bn = SyncBatchNorm(4).double()
    x = torch.randn(3 + rank, 4, 5, dtype=torch.float64, requires_grad=True)
    bn(x).sum().backward()  # first call: + the feature-count exchange
    with _count_collectives() as counts:
        y = bn(x)
        assert counts["n"] == 1, f"training forward issued {counts['n']} collectives"
        y.sum().backward()
        assert counts["n"] == 2, f"forward + backward issued {counts['n']} collectives"
        bn.eval()
        bn(x).sum().backward()
        assert counts["n"] == 2, "eval mode issued a collective"
        frozen = SyncBatchNorm(4, track_running_stats=False).double().eval()  # batch stats, unsynchronized
        _close(frozen(x), torch.nn.functional.batch_norm(x, None, None, frozen.weight, frozen.bias, True),
               "eval without running stats")
        assert counts["n"] == 2, "eval mode without running stats issued a collective"


def _check_process_groups(rank: int, world: int) -> None:
    """process_group scopes the statistics; a group of one runs the plain path (no collective)."""
    singles = [dist.new_group([r]) for r in range(world)]
    pair = dist.new_group([0, 1])
    if rank in (0, 1):
        _check_sync_module(rank, world, [3, 2], channels_last=True, group=pair, ranks=[0, 1], seed=7)
    bn = SyncBatchNorm(3, process_group=singles[rank]).double()
    x = torch.randn(4, 3, 2, dtype=torch.float64)
    with _count_collectives() as counts:
        out = bn(x)
    assert counts["n"] == 0, "a group of one process issued a collective"
    _close(out, torch.nn.functional.batch_norm(x, None, None, training=True), "group of one")


def _check_feature_mismatch(rank: int, world: int) -> None:
    """A rank with another feature count raises on every rank (no hang, no garbage)."""
    c = 3 if rank == 0 else 4
    x = torch.randn(2, c, 3, dtype=torch.float64)
    for layer in (SyncBatchNorm(c), BatchNormalization(axis=1, synchronized=True),
                  BatchNormalization(axis=1, synchronized=True, virtual_batch_size=1),
                  BatchNormalization(axis=1, synchronized=True, fused=False)):
        with pytest.raises(RuntimeError) as info:
            layer.double()(x, training=True) if isinstance(layer, BatchNormalization) else layer.double()(x)
        msg = str(info.value)
        assert f"has {c}" in msg and f"has {7 - c}" in msg, msg
    # A module with weights checks its own feature count first, locally, before any collective.
    with _count_collectives() as counts, pytest.raises(ValueError, match="expected 3 channels"):
        SyncBatchNorm(3)(torch.randn(2, 4, 3))
    assert counts["n"] == 0
    dist.barrier()


def _check_refusals_before_collectives(rank: int, world: int) -> None:
    """A call that fails on every rank fails before any collective and changes no running
    statistic: a weight of the wrong size or dtype, an inference-mode input that a gradient needs."""
    x = torch.randn(4, 3, 2)
    rm, rv = torch.zeros(3), torch.ones(3)
    for weight, exc, pattern in ((torch.ones(4), RuntimeError, r"weight has shape \[4\]"),
                                 (torch.ones(3, dtype=torch.int64), TypeError, "weight must be a floating-point")):
        with _count_collectives() as counts, pytest.raises(exc, match=pattern):
            sync_batch_norm(x, rm, rv, weight, None)
        assert counts["n"] == 0, "a refused call issued a collective"
    with torch.inference_mode():
        xi = x.clone()
    with _count_collectives() as counts, pytest.raises(RuntimeError, match="input is an inference tensor"):
        sync_batch_norm(xi, rm, rv, torch.ones(3, requires_grad=True), None)
    assert counts["n"] == 0
    layer = BatchNormalization(axis=1, synchronized=True, renorm=True)
    layer.build((4, 3, 2))
    state = {k: v.clone() for k, v in layer.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(RuntimeError, match="input is an inference tensor"):
        layer(xi, training=True)
    for k, v in layer.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, state[k]), f"a refused call changed {k}"
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    dist.barrier()


def _check_convert(rank: int, world: int) -> None:
    """convert_sync_batchnorm on a small model: same parameters / buffers / flags, synchronized numbers."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), torch.nn.SyncBatchNorm(4, momentum=None)),
        BatchNormalization(axis=1, momentum=0.9), torch.nn.Flatten(), torch.nn.Linear(4 * 5 * 5, 2),
        torch.nn.BatchNorm1d(2, affine=False),
    ).double()
    model[4].build([None, 4, 5, 5])
    model[4].double()
    model[1].weight.requires_grad_(False)
    model[3][1].eval()
    reference = copy.deepcopy(model)
    originals = {n: (id(p), p.requires_grad) for n, p in model.named_parameters()}
    buffers = {n: id(b) for n, b in model.named_buffers()}
    converted = SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(converted[1], SyncBatchNorm) and isinstance(converted[3][1], SyncBatchNorm)
    assert isinstance(converted[7], SyncBatchNorm) and not converted[7].affine
    assert isinstance(converted[4], BatchNormalization) and converted[4].synchronized
    assert {n: (id(p), p.requires_grad) for n, p in converted.named_parameters()} == originals
    assert {n: id(b) for n, b in converted.named_buffers()} == buffers
    assert converted[1].training and not converted[3][1].training and converted[3][1].momentum is None
    assert list(converted.state_dict()) == list(reference.state_dict())

    sizes = [3, 2, 4][:world]
    x, _ = _global_batch(sizes, (2, 5, 5), seed=11)
    xr = _leaf(_part(x, sizes, rank))
    out = converted(xr)
    out.square().sum().backward()
    # Reference: the unconverted copy on the whole batch, its Keras layer unsynchronized with tf's
    # synchronized (non-fused) maths.
    reference[4].synchronized = False
    reference[4].fused = False
    xg = _leaf(x)
    ref_out = reference(xg)
    ref_out.square().sum().backward()
    _close(out, _part(ref_out, sizes, rank), "converted model output")
    _close(xr.grad, _part(xg.grad, sizes, rank), "converted model grad_input")
    for (name, p), (_, q) in zip(converted.named_parameters(), reference.named_parameters()):
        if p.requires_grad:
            _close(_summed(p.grad), q.grad, f"converted model: summed grad of {name}")
    for (name, b), (_, r) in zip(converted.named_buffers(), reference.named_buffers()):
        _close(b.double(), r.double(), f"converted model: buffer {name}")


# -- Keras layer -------------------------------------------------------------------------------


def _keras_pair(shape, world: int, **kw):
    """The synchronized layer and its single-process reference (unsynchronized, fused=False: tf_keras's
    non-fused maths, biased moving variance), same weights, float64."""
    ours = BatchNormalization(synchronized=True, **kw)
    ref_kw = dict(kw, fused=False)
    if kw.get("virtual_batch_size"):
        ref_kw["virtual_batch_size"] = kw["virtual_batch_size"] * world  # ghost g spans every rank's ghost g
    ref = BatchNormalization(**ref_kw)
    for layer in (ours, ref):
        layer.build([None, *shape[1:]])
        layer.double()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name in ["gamma", "beta"] + ref._variables():
            t = getattr(ref, name)
            if t is not None:
                t.copy_(torch.rand(t.shape, generator=g, dtype=torch.float64) + 0.5)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _check_keras(rank: int, world: int, sizes, *, channels_last: bool = False, axis=1, rest=(3, 2, 2),
                 steps: int = 2, seed: int = 0, mask: bool = False, **kw) -> None:
    ours, ref = _keras_pair((None, *rest), world, axis=axis, momentum=0.8, epsilon=1e-3, **kw)
    initial = {n: getattr(ours, n).detach().clone() for n in ours._variables()}
    for step in range(steps):
        x, dy = _global_batch(sizes, rest, seed + step, channels_last)
        m = None
        if mask:
            m = torch.rand(x.shape[:-1], generator=torch.Generator().manual_seed(seed + 50 + step)) > 0.3
        xr = _leaf(_part(x, sizes, rank))
        out = ours(xr, training=True, mask=None if m is None else _part(m, sizes, rank))
        out.backward(_part(dy, sizes, rank))
        xg = _leaf(x)
        ref_out = ref(xg, training=True, mask=m)
        ref_out.backward(dy)
        what = f"BatchNormalization({kw}, axis={axis}) sizes={sizes} step={step} channels_last={channels_last}"
        _same_layout(out, xr, what)
        _close(out, _part(ref_out, sizes, rank), f"{what}: output")
        _close(xr.grad, _part(xg.grad, sizes, rank), f"{what}: grad_input")
        for name in ("gamma", "beta"):
            # (the reference's own maths give NaN gradients for an empty batch; ours are 0)
            expected = getattr(ref, name).grad if sum(sizes) else torch.zeros_like(getattr(ours, name))
            _close(_summed(getattr(ours, name).grad), expected, f"{what}: summed grad of {name}")
            getattr(ours, name).grad = getattr(ref, name).grad = None
        for name in ours._variables():
            expected = initial[name] if sum(sizes) == 0 else getattr(ref, name)
            _close(getattr(ours, name), expected, f"{what}: {name}")


def _ghost_reference(xs: List[torch.Tensor], vbs: int, eps: float, gamma, beta):
    """Ghost batch norm where global ghost g is the union of every rank's ghost g (ranks may hold
    different numbers of ghosts), written out in float64: (outputs per rank, mean, var averaged over
    the global ghosts)."""
    views = [x.reshape(vbs, x.shape[0] // vbs, *x.shape[1:]) for x in xs]
    most = max(v.shape[1] for v in views)
    stats = []
    for g in range(most):
        parts = torch.cat([v[:, g] for v in views if v.shape[1] > g])
        dims = [0] + list(range(1, parts.dim() - 1))
        mean = parts.mean(dims)
        stats.append((mean, (parts - mean).square().mean(dims)))
    outs = []
    for v in views:
        ghosts = [(v[:, g] - stats[g][0]) / torch.sqrt(stats[g][1] + eps) * gamma + beta for g in range(v.shape[1])]
        outs.append(torch.stack(ghosts, 1).reshape(-1, *v.shape[2:]) if ghosts else v.reshape(0, *v.shape[2:]))
    return outs, torch.stack([s[0] for s in stats]).mean(0), torch.stack([s[1] for s in stats]).mean(0)


def _check_keras_uneven_ghosts(rank: int, world: int, sizes, vbs: int = 1, rest=(2, 3)) -> None:
    """Ghosts with per-rank batch sizes that give each rank a different number of ghosts."""
    for fused in (None, False):
        layer = BatchNormalization(axis=-1, momentum=0.8, virtual_batch_size=vbs, synchronized=True, fused=fused)
        layer.build([None, *rest])
        layer.double()
        with torch.no_grad():
            layer.gamma.copy_(torch.tensor([1.5, 0.5, 0.75], dtype=torch.float64).reshape(layer.gamma.shape))
            layer.beta.copy_(torch.tensor([0.25, -1.0, 0.5], dtype=torch.float64).reshape(layer.beta.shape))
        mm, mv = layer.moving_mean.clone(), layer.moving_variance.clone()
        x, dy = _global_batch(sizes, rest[::-1], seed=21)
        x, dy = x.transpose(1, -1).contiguous(), dy.transpose(1, -1).contiguous()  # channels last (axis=-1)
        xs = [_leaf(_part(x, sizes, r)) for r in range(world)]
        gamma = layer.gamma.detach().reshape(-1).clone().requires_grad_()
        beta = layer.beta.detach().reshape(-1).clone().requires_grad_()
        ref_outs, ref_mean, ref_var = _ghost_reference(xs, vbs, layer.epsilon, gamma, beta)
        live = [r for r in range(world) if sizes[r]]
        torch.autograd.backward([ref_outs[r] for r in live], [_part(dy, sizes, r) for r in live])
        xr = _leaf(_part(x, sizes, rank))
        out = layer(xr, training=True)
        out.backward(_part(dy, sizes, rank))
        what = f"uneven ghosts sizes={sizes} vbs={vbs} fused={fused}"
        _close(out, ref_outs[rank], f"{what}: output")
        _close(xr.grad, xs[rank].grad if sizes[rank] else torch.zeros_like(xr), f"{what}: grad_input")
        _close(_summed(layer.gamma.grad).reshape(-1), gamma.grad, f"{what}: summed grad of gamma")
        _close(_summed(layer.beta.grad).reshape(-1), beta.grad, f"{what}: summed grad of beta")
        _close(layer.moving_mean.reshape(-1), mm.reshape(-1) * 0.8 + ref_mean.detach() * 0.2, f"{what}: moving_mean")
        _close(layer.moving_variance.reshape(-1), mv.reshape(-1) * 0.8 + ref_var.detach() * 0.2,
               f"{what}: moving_variance")


# ---------------------------------------------------------------------------------------------
# Scenarios (each runs in every rank of one spawned group)


def _scenario_module(rank: int, world: int) -> None:
    for sizes in (SIZES_3 if world == 3 else SIZES_2):
        _check_sync_module(rank, world, sizes, channels_last=False)
        _check_sync_module(rank, world, sizes, channels_last=True, momentum=None)
    _check_sync_module(rank, world, [2, 1, 3][:world], channels_last=False, rest=(3,), affine=False)  # (N, C)
    _check_sync_module(rank, world, [1, 0, 2][:world], channels_last=False, rest=(2, 2, 2, 2))  # 5-D
    _check_collective_counts(rank, world)
    if world >= 3:
        _check_process_groups(rank, world)
    _check_convert(rank, world)
    _check_feature_mismatch(rank, world)
    _check_refusals_before_collectives(rank, world)


def _scenario_keras(rank: int, world: int) -> None:
    all_sizes = SIZES_3 if world == 3 else SIZES_2
    for sizes in all_sizes:
        _check_keras(rank, world, sizes)  # staged kernels
        _check_keras(rank, world, sizes, channels_last=True, renorm=True,
                     renorm_clipping={"rmax": 3.0, "rmin": 0.5, "dmax": 1.0}, renorm_momentum=0.7)
    for sizes in all_sizes[:2]:
        _check_keras(rank, world, sizes, fused=False, channels_last=True)  # composite + all-reduce
        _check_keras(rank, world, sizes, axis=-1, rest=(2, 3), mask=True)  # masked: composite
        _check_keras(rank, world, sizes, axis=[1, 2], rest=(2, 3, 2))  # two feature axes
    _check_keras(rank, world, [0] * world, axis=-1, rest=(2, 3), mask=True)
    for fused in (None, False):  # ghost batches, equal batch sizes: single-process with vbs * world
        _check_keras(rank, world, [4] * world, virtual_batch_size=2, fused=fused)
        _check_keras(rank, world, [4] * world, virtual_batch_size=2, fused=fused, channels_last=True, renorm=True,
                     renorm_clipping={"rmax": 1.1, "dmax": 0.2})
        _check_keras(rank, world, [2] * world, virtual_batch_size=1, fused=fused, axis=-1, rest=(2, 3))
        _check_keras(rank, world, [0] * world, virtual_batch_size=2, fused=fused)  # all empty
    for sizes in ([2, 3, 5][:world], [0, 1, 4][:world], [1, 1, 1][:world]):  # different ghost counts
        _check_keras_uneven_ghosts(rank, world, sizes)
    _check_keras_uneven_ghosts(rank, world, [4, 2, 6][:world], vbs=2)


# -- against tf_keras: float32 results of each rank, compared in the parent -------------------

TF_CASES = {  # name: (layer kwargs, per-rank batch sizes, per-sample shape, global virtual_batch_size)
    "nhwc": (dict(axis=-1), [2, 3], (4, 4, 3), None),
    "nchw_renorm": (dict(axis=1, renorm=True, renorm_clipping={"rmax": 2.0, "rmin": 0.8, "dmax": 0.5},
                         renorm_momentum=0.7), [3, 1], (3, 4, 4), None),
    "ghosts": (dict(axis=-1, virtual_batch_size=2), [4, 4], (3, 2, 3), 4),
}


def _tf_case_weights(names: Sequence[str], shapes: Dict[str, Sequence[int]]) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(13)
    return {n: torch.rand(tuple(shapes[n]), generator=g) + 0.5 for n in names}


def _scenario_keras_tf(rank: int, world: int, out_dir: str) -> None:
    for name, (kw, sizes, rest, _) in TF_CASES.items():
        layer = BatchNormalization(momentum=0.8, epsilon=1e-3, synchronized=True, **kw)
        layer.build([None, *rest])
        names = ["gamma", "beta"] + layer._variables()
        with torch.no_grad():
            for n, value in _tf_case_weights(names, {n: getattr(layer, n).shape for n in names}).items():
                getattr(layer, n).copy_(value)
        saved: Dict[str, torch.Tensor] = {}
        for step in range(2):
            x, dy = _global_batch(sizes, rest, seed=30 + step)
            xr = _leaf(_part(x, sizes, rank).float())
            out = layer(xr, training=True)
            out.backward(_part(dy, sizes, rank).float())
            saved[f"out{step}"], saved[f"grad{step}"] = out.detach(), xr.grad
            for n in ("gamma", "beta"):
                saved[f"grad_{n}{step}"] = _summed(getattr(layer, n).grad)
                getattr(layer, n).grad = None
        saved.update({n: getattr(layer, n).detach().clone() for n in layer._variables()})
        torch.save(saved, os.path.join(out_dir, f"{name}_{rank}.pt"))


SCENARIOS: Dict[str, Callable[..., None]] = {
    "module": _scenario_module,
    "keras": _scenario_keras,
    "keras_tf": _scenario_keras_tf,
}


# ---------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("world", [2, 3])
def test_sync_batch_norm_module(world):
    run_group(world, "module")


@pytest.mark.parametrize("world", [2, 3])
def test_keras_synchronized(world):
    run_group(world, "keras")


@pytest.mark.tf
def test_keras_synchronized_matches_tf_keras(tmp_path):
    """Each rank's part of the result == tf_keras's synchronized layer on the concatenated batch
    (float32; tf_keras computes E[x^2] - E[x]^2 and feeds the biased variance to moving_variance)."""
    import torch._dynamo  # noqa: F401  (triton, pulled in by dynamo, crashes when loaded after tensorflow)

    tf_keras = pytest.importorskip("tf_keras", exc_type=ImportError)
    import tensorflow as tf

    run_group(2, "keras_tf", str(tmp_path))
    for name, (kw, sizes, rest, global_vbs) in TF_CASES.items():
        results = [torch.load(tmp_path / f"{name}_{r}.pt") for r in range(2)]
        tf_kw = dict(kw, virtual_batch_size=global_vbs) if global_vbs else kw
        theirs = tf_keras.layers.BatchNormalization(momentum=0.8, epsilon=1e-3, synchronized=True, **tf_kw)
        theirs.build((None, *rest))
        names = ["gamma", "beta"] + [n for n in ("moving_mean", "moving_variance", "moving_stddev", "renorm_mean",
                                                 "renorm_stddev") if n in results[0]]
        shapes = {n: tuple(getattr(theirs, n).shape) for n in names}
        for n, value in _tf_case_weights(names, shapes).items():
            getattr(theirs, n).assign(value.numpy())
        tol = dict(rtol=2e-4, atol=2e-4)
        for step in range(2):
            x, dy = _global_batch(sizes, rest, seed=30 + step)
            xt = tf.constant(x.float().numpy())
            with tf.GradientTape() as tape:
                tape.watch(xt)
                y = theirs(xt, training=True)
            gx, gg, gb = tape.gradient(y, [xt, theirs.gamma, theirs.beta],
                                       output_gradients=tf.constant(dy.float().numpy()))
            y, gx = torch.from_numpy(y.numpy()), torch.from_numpy(gx.numpy())
            for r in range(2):
                what = f"tf_keras parity {name} step {step} rank {r}"
                _close(results[r][f"out{step}"], _part(y, sizes, r), f"{what}: output", **tol)
                _close(results[r][f"grad{step}"], _part(gx, sizes, r), f"{what}: grad_input", **tol)
            _close(results[0][f"grad_gamma{step}"].reshape(-1), torch.from_numpy(gg.numpy()).reshape(-1),
                   f"{name}: summed grad of gamma", **tol)
            _close(results[0][f"grad_beta{step}"].reshape(-1), torch.from_numpy(gb.numpy()).reshape(-1),
                   f"{name}: summed grad of beta", **tol)
        for n in names[2:]:
            _close(results[0][n].reshape(-1), torch.from_numpy(getattr(theirs, n).numpy()).reshape(-1),
                   f"{name}: {n}", **tol)


def test_single_process_is_plain_batch_norm():
    """No initialized group: the torch module's semantics on the plain kernels, no collective."""
    assert not dist.is_initialized()
    torch.manual_seed(0)
    for momentum in (0.1, None):
        ref = torch.nn.SyncBatchNorm(3, momentum=momentum).double()
        ours = SyncBatchNorm(3, momentum=momentum).double()
        assert list(ours.state_dict()) == list(ref.state_dict())
        assert [n for n, _ in ours.named_buffers()] == [n for n, _ in ref.named_buffers()]
        for step in range(3):
            x = torch.randn(5, 3, 4, 4, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
            _close(ours(x), torch.nn.functional.batch_norm(
                x, ref.running_mean, ref.running_var, ref.weight, ref.bias, True,
                momentum if momentum is not None else 1.0 / (step + 1)), "single process")
            ref.num_batches_tracked += 1
            _close(ours.running_mean, ref.running_mean, "running_mean")
            _close(ours.running_var, ref.running_var, "running_var")
        assert int(ours.num_batches_tracked) == 3
        ours.eval()
        x = torch.randn(2, 3, 4, dtype=torch.float64)
        _close(ours(x), torch.nn.functional.batch_norm(x, ref.running_mean, ref.running_var, ref.weight, ref.bias),
               "eval")
    with pytest.raises(ValueError, match="expected at least 2D input"):
        SyncBatchNorm(3)(torch.randn(3))
    with pytest.raises(ValueError, match="number of input channels should be non-zero"):
        SyncBatchNorm(3)(torch.randn(2, 0, 3))
    with pytest.raises(ValueError, match="more than 1 value"):
        SyncBatchNorm(3)(torch.randn(1, 3))
    assert isinstance(SyncBatchNorm(3), torch.nn.modules.batchnorm._BatchNorm)
    assert SyncBatchNorm(3, bias=False).bias is None
    assert bn_cuda.nn.SyncBatchNorm is SyncBatchNorm


def test_convert_single_process():
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(3), torch.nn.Sequential(torch.nn.BatchNorm3d(2, eps=1e-3)))
    model[1][0].weight.requires_grad_(False)
    out = SyncBatchNorm.convert_sync_batchnorm(model, process_group=None)
    assert out is model and isinstance(model[0], SyncBatchNorm) and model[1][0].eps == 1e-3
    assert not model[1][0].weight.requires_grad
    single = SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm2d(4).eval())
    assert isinstance(single, SyncBatchNorm) and not single.training
    again = SyncBatchNorm.convert_sync_batchnorm(single)
    assert isinstance(again, SyncBatchNorm) and again.running_mean is single.running_mean


@pytest.mark.parametrize("lazy", [torch.nn.LazyBatchNorm2d, bn_cuda.nn.LazyBatchNorm1d])
def test_convert_sync_refuses_unmaterialized_lazy_layers(lazy):
    """A lazy layer that has not seen an input has no feature count and SyncBatchNorm no lazy form:
    refused, naming it, before any layer is replaced; after a dry run it converts."""
    model = torch.nn.Sequential(torch.nn.BatchNorm1d(3), lazy())
    with pytest.raises(ValueError, match=rf"convert_sync_batchnorm: {lazy.__name__} 1 has not seen an input yet"):
        SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(model[0]) is torch.nn.BatchNorm1d
    x = torch.randn(4, 3, 5, 5) if lazy is torch.nn.LazyBatchNorm2d else torch.randn(4, 3)
    model[1](x)
    SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(model[1]) is SyncBatchNorm and model[1].num_features == 3
