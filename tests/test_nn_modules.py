"""bn_cuda.nn.BatchNorm1d/2d/3d against torch.nn.BatchNorm1d/2d/3d in float64 (outputs, every
gradient, running statistics, num_batches_tracked, state_dict), and convert_batchnorm on a model."""

import copy

import pytest
import torch

import bn_cuda
from bn_cuda.nn import (BatchNorm1d, BatchNorm2d, BatchNorm3d, LazyBatchNorm1d, LazyBatchNorm2d, LazyBatchNorm3d,
                        SyncBatchNorm, convert_batchnorm)

DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.cuda)] if torch.cuda.is_available() else [])

PAIRS = {
    "1d-2D": (BatchNorm1d, torch.nn.BatchNorm1d, (7, 17)),
    "1d-3D": (BatchNorm1d, torch.nn.BatchNorm1d, (3, 5, 49)),
    "2d": (BatchNorm2d, torch.nn.BatchNorm2d, (3, 17, 7, 7)),
    "2d-channels_last": (BatchNorm2d, torch.nn.BatchNorm2d, (2, 3, 7, 5)),
    "2d-C1": (BatchNorm2d, torch.nn.BatchNorm2d, (4, 1, 7, 7)),
    "3d": (BatchNorm3d, torch.nn.BatchNorm3d, (2, 3, 5, 7, 1)),
}


def _data(shape, seed, device):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    bshape = [1, c] + [1] * (len(shape) - 2)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * (0.5 + torch.rand(bshape, generator=g, dtype=torch.float64))
    return (x + 1e3 * torch.randn(bshape, generator=g, dtype=torch.float64)).to(device)


def _compare_steps(ours, ref, name, shape, device, seed, first=None):
    """Two training steps and one evaluation call of both modules on the same fresh data (seeded from
    `seed`): outputs and their memory format, input gradients, then every buffer. `first(ours, ref)`
    runs after the first forward, which is then repeated (a lazy module's materialization)."""
    for step in range(3):
        ours.train(step < 2)
        ref.train(step < 2)
        x = _data(shape, seed + step, device)
        if name == "2d-channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        yo, yr = ours(xo), ref(xr)
        if step == 0 and first is not None:
            first(ours, ref)
            yo, yr = ours(xo), ref(xr)
        assert yo.is_contiguous(memory_format=torch.channels_last) == yr.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(yo, yr, rtol=1e-9, atol=1e-9)
        gy = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 10 + step), dtype=torch.float64).to(device)
        yo.backward(gy)
        yr.backward(gy)
        torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-7, atol=1e-9)
    for (n, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=n)


def _module_pair(name, kwargs, device, seed):
    """(ours, torch's) float64 layers of PAIRS[name] with ``kwargs``, the same random affine
    parameters (seeded) and buffers."""
    ours_cls, torch_cls, shape = PAIRS[name]
    c = shape[1]
    ours = ours_cls(c, **kwargs).double().to(device)
    ref = torch_cls(c, **kwargs).double().to(device)
    if ref.affine:
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed)
            ref.weight.copy_(torch.rand(c, generator=g, dtype=torch.float64) + 0.5)
            ref.bias.copy_(torch.randn(c, generator=g, dtype=torch.float64))
    ours.load_state_dict(ref.state_dict())
    return ours, ref


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("kwargs", [{}, {"momentum": None}, {"affine": False}, {"track_running_stats": False},
                                    {"momentum": 0.3, "eps": 1e-3}])
def test_matches_torch_module(device, name, kwargs):
    shape = PAIRS[name][2]
    ours, ref = _module_pair(name, kwargs, device, seed=1)
    assert list(ours.state_dict()) == list(ref.state_dict())
    _compare_steps(ours, ref, name, shape, device, seed=10)
    if ref.affine:
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-7, atol=1e-9)


LAZY = {BatchNorm1d: (LazyBatchNorm1d, torch.nn.LazyBatchNorm1d), BatchNorm2d: (LazyBatchNorm2d, torch.nn.LazyBatchNorm2d),
        BatchNorm3d: (LazyBatchNorm3d, torch.nn.LazyBatchNorm3d)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("kwargs", [{}, {"momentum": None}, {"affine": False}, {"track_running_stats": False}])
def test_lazy_matches_torch_lazy_module(device, name, kwargs):
    """LazyBatchNorm1d/2d/3d: num_features from the first input, then the eager class, computing what
    torch's lazy layers compute (outputs, gradients, buffers over training steps and evaluation)."""
    eager_cls, _, shape = PAIRS[name]
    lazy_cls, torch_lazy_cls = LAZY[eager_cls]
    ours = lazy_cls(**kwargs, device=device, dtype=torch.float64)
    ref = torch_lazy_cls(**kwargs, device=device, dtype=torch.float64)
    assert ours.has_uninitialized_params() and list(ours.state_dict()) == list(ref.state_dict())

    def materialized(ours, ref):
        assert type(ours) is eager_cls and ours.num_features == shape[1]
        if ours.affine:  # random affine parameters, the same in both
            with torch.no_grad():
                g = torch.Generator().manual_seed(2)
                for a, b in ((ours.weight, ref.weight), (ours.bias, ref.bias)):
                    b.copy_(torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5)
                    a.copy_(b)

    _compare_steps(ours, ref, name, shape, device, seed=30, first=materialized)


@pytest.mark.parametrize("cls, bad", [(LazyBatchNorm1d, (5,)), (LazyBatchNorm1d, (2, 3, 4, 5)),
                                      (LazyBatchNorm2d, (2, 3, 4)), (LazyBatchNorm3d, (2, 3))])
def test_lazy_rank_error_before_materializing(cls, bad):
    """A first input of the wrong rank is refused naming the ranks, and the layer stays lazy (torch's
    lazy layers raise an IndexError for a 1-D input, and materialize before refusing other ranks)."""
    bn = cls()
    with pytest.raises(ValueError, match=rf"expected .*D input \(got {len(bad)}D input\)"):
        bn(torch.randn(bad))
    assert type(bn) is cls and bn.has_uninitialized_params()
    good = {LazyBatchNorm1d: (4, 3), LazyBatchNorm2d: (4, 3, 2, 2), LazyBatchNorm3d: (4, 3, 2, 2, 1)}[cls]
    bn(_data(good, 0, "cpu").float())
    assert bn.num_features == 3 and int(bn.num_batches_tracked) == 1


@pytest.mark.parametrize("cls, bad", [(BatchNorm1d, (2, 3, 4, 5)), (BatchNorm1d, (3,)), (BatchNorm2d, (2, 3, 4)),
                                      (BatchNorm3d, (2, 3, 4, 5))])
def test_input_rank_error(cls, bad):
    bn = cls(3)
    with pytest.raises(ValueError, match=rf"got {len(bad)}D input"):
        bn(torch.randn(bad))
    assert int(bn.num_batches_tracked) == 0


@pytest.mark.parametrize("cls", [BatchNorm2d, SyncBatchNorm])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_failing_call_changes_no_buffer(cls, momentum):
    """A call that raises (wrong channel count) leaves the running statistics and
    num_batches_tracked as they were; the next good call counts as the first."""
    bn = cls(3, momentum=momentum)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises((RuntimeError, ValueError), match="3"):
        bn(torch.randn(4, 5, 2, 2))
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    x = _data((4, 3, 2, 2), 0, "cpu").float()
    bn(x)
    ref = torch.nn.BatchNorm2d(3, momentum=momentum)
    ref(x)
    assert int(bn.num_batches_tracked) == 1
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)


def test_convert_batchnorm_model():
    """convert_batchnorm swaps torch's BatchNorm1d/2d/3d and SyncBatchNorm (also nested, and the
    root), shares their parameters and buffers, keeps subclasses and other modules, and the model
    computes what it computed before."""

    class Custom(torch.nn.BatchNorm2d):  # a subclass may override forward: kept
        pass

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8, momentum=None), torch.nn.ReLU(),
        torch.nn.Sequential(torch.nn.Conv2d(8, 8, 1), torch.nn.BatchNorm2d(8, affine=False)),
        Custom(8), torch.nn.SyncBatchNorm(8), torch.nn.Flatten(), torch.nn.Linear(8 * 25, 17), torch.nn.BatchNorm1d(17),
    ).double()
    ref = copy.deepcopy(model)  # torch's layers, unconverted
    params_before = {n: p for n, p in model.named_parameters()}
    converted = convert_batchnorm(model)
    assert converted is model
    assert type(model[1]) is BatchNorm2d and type(model[3][1]) is BatchNorm2d and type(model[8]) is BatchNorm1d
    assert type(model[4]) is Custom and type(model[5]) is SyncBatchNorm
    assert model[1].momentum is None and not model[3][1].affine
    for n, p in model.named_parameters():
        assert p is params_before[n], n
    for _ in range(2):
        x = torch.randn(6, 3, 5, 5, dtype=torch.float64)
        torch.testing.assert_close(model(x), ref(x), rtol=1e-9, atol=1e-9)
    for (n, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=n)
    model.eval()
    ref.eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-9, atol=1e-9)
    bn = torch.nn.BatchNorm3d(4)
    assert type(convert_batchnorm(bn)) is BatchNorm3d
    assert bn_cuda.nn.convert_batchnorm is convert_batchnorm


def test_convert_batchnorm_lazy_layers():
    """torch's lazy layers that have not seen an input become bn_cuda's, sharing the uninitialized
    parameters and buffers (an optimizer built on them sees the materialized ones); a lazy layer that
    has already become BatchNorm2d converts as one; the model computes what torch's does."""
    def make():  # (an uninitialized lazy layer cannot be deep-copied)
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Conv2d(3, 5, 3, padding=1, dtype=torch.float64),
            torch.nn.LazyBatchNorm2d(momentum=None, dtype=torch.float64),
            torch.nn.Flatten(), torch.nn.LazyBatchNorm1d(affine=False, dtype=torch.float64),
        )

    model, ref = make(), make()
    done = torch.nn.LazyBatchNorm2d(dtype=torch.float64)
    done(torch.randn(4, 5, 3, 3, dtype=torch.float64))  # now a torch BatchNorm2d
    weight = model[1].weight
    convert_batchnorm(model)
    assert type(model[1]) is LazyBatchNorm2d and type(model[3]) is LazyBatchNorm1d
    assert model[1].momentum is None and not model[3].affine and model[1].weight is weight
    assert type(convert_batchnorm(done)) is BatchNorm2d
    for step in range(2):
        x = torch.randn(6, 3, 5, 5, dtype=torch.float64)
        torch.testing.assert_close(model(x), ref(x), rtol=1e-9, atol=1e-9)
    assert type(model[1]) is BatchNorm2d and type(model[3]) is BatchNorm1d
    assert weight.shape == (5,) and model[1].weight is weight and model[3].num_features == 125
    for (n, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=n)


def test_converted_model_compiles_fullgraph():
    """A converted model runs under torch.compile(fullgraph=True) (custom ops with fake kernels, the
    num_batches_tracked update traced) and matches torch's modules: outputs, gradients, buffers."""
    torch.manual_seed(0)

    def net():
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).double()

    model, ref = net(), net()
    ref.load_state_dict(model.state_dict())
    convert_batchnorm(model)
    compiled = torch.compile(model, fullgraph=True)
    for _ in range(2):
        x = torch.randn(5, 3, 6, 6, dtype=torch.float64)
        a, b = compiled(x), ref(x)
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
        a.square().sum().backward()
        b.square().sum().backward()
    torch.testing.assert_close(model[0].weight.grad, ref[0].weight.grad, rtol=1e-7, atol=1e-9)
    for (n, p), (_, q) in zip(model.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-9, msg=n)


def test_torch_export_of_inference_models():
    """torch.export traces a converted torch model and a Keras layer in inference (the ops' fake
    kernels), and the exported programs compute what the modules do."""
    import bn_cuda

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    bn_cuda.nn.convert_batchnorm(model)
    model.eval()
    keras = bn_cuda.BatchNormalization(axis=1)
    keras.build((2, 4, 6, 6))
    with torch.no_grad():
        keras.moving_mean.uniform_(-1, 1)
    keras.eval()
    for m, shape in ((model, (2, 3, 8, 8)), (keras, (2, 4, 6, 6))):
        program = torch.export.export(m, (torch.randn(shape),))
        x = torch.randn(shape)
        torch.testing.assert_close(program.module()(x), m(x))
        assert any("bn_cuda" in str(n.target) for n in program.graph.nodes)


@pytest.mark.parametrize("config", [{}, {"virtual_batch_size": 2, "renorm": True}])
def test_torch_export_of_training_models(config):
    """torch.export in training mode: the exported program normalizes with the batch statistics
    and updates the running statistics (or the Keras layer's moving variables, ghost batches and
    renorm included) as the eager module does, through the ops' declared mutations."""
    import copy

    import bn_cuda

    class KerasTraining(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = bn_cuda.BatchNormalization(axis=1, momentum=0.5, **config)

        def forward(self, x):
            return self.bn(x, training=True)

    torch.manual_seed(1)
    if config:
        model = KerasTraining()
        model.bn.build((4, 4, 6, 6))
    else:
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), bn_cuda.nn.BatchNorm2d(4), torch.nn.ReLU()).train()
    shape = (4, 4, 6, 6) if config else (4, 3, 8, 8)
    eager = copy.deepcopy(model)
    program = torch.export.export(model, (torch.randn(shape),))
    assert any("bn_cuda" in str(n.target) for n in program.graph.nodes)
    exported = program.module()
    for step in range(2):
        x = torch.randn(shape) * (1 + step) + step
        torch.testing.assert_close(exported(x), eager(x), rtol=1e-5, atol=1e-6)
    buffers = dict(exported.named_buffers())
    for name, want in eager.named_buffers():
        torch.testing.assert_close(buffers[name], want, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("config", [{}, {"virtual_batch_size": 3}, {"virtual_batch_size": 2, "renorm": True}])
def test_torch_export_with_a_dynamic_batch(config):
    """torch.export with a dynamic batch dim: one exported training program serves every batch
    size (the ghost count is symbolic in the staged ops' schemas), with the eager layer's outputs
    and moving variables after each step, ghost batches and renorm included."""
    import copy

    import bn_cuda
    from torch.export import Dim

    vbs = config.get("virtual_batch_size", 1)

    class KerasTraining(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = bn_cuda.BatchNormalization(momentum=0.5, **config)

        def forward(self, x):
            return self.bn(x, training=True)

    model = KerasTraining()
    model.bn.build((4 * vbs, 5, 3))
    eager = copy.deepcopy(model)
    ghosts = Dim("ghosts", min=2, max=4096)
    program = torch.export.export(model, (torch.randn(4 * vbs, 5, 3),), dynamic_shapes={"x": {0: vbs * ghosts}})
    exported = program.module()
    g = torch.Generator().manual_seed(6)
    for n in (2, 7, 3, 12):
        x = torch.randn(n * vbs, 5, 3, generator=g) * torch.linspace(0.5, 2, 3) + 1.5
        torch.testing.assert_close(exported(x), eager(x), rtol=1e-5, atol=1e-6, msg=f"batch {n * vbs}")
        buffers = dict(exported.named_buffers())
        for name, want in eager.named_buffers():
            torch.testing.assert_close(buffers[name], want, rtol=1e-6, atol=1e-7, msg=f"{name} after batch {n * vbs}")


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing(use_reentrant):
    """torch.utils.checkpoint over a block with the drop-in modules: the gradients and the running
    statistics equal torch.nn.BatchNorm2d's under the same checkpointing (the recomputation updates
    the running statistics a second time in both) and so does num_batches_tracked: counted before
    the call, as torch counts it (the non-reentrant recomputation stops once the saved tensors are
    rebuilt, inside the block's last call: a count taken after the call would differ there)."""
    from torch.utils.checkpoint import checkpoint

    import bn_cuda

    def block(bn):
        torch.manual_seed(4)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), bn(4), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3),
                                   bn(4)).double()

    x = torch.randn(2, 3, 9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    results = []
    for bn in (bn_cuda.nn.BatchNorm2d, torch.nn.BatchNorm2d):
        model = block(bn)
        xr = x.clone().requires_grad_()
        checkpoint(model, xr, use_reentrant=use_reentrant).pow(2).sum().backward()
        results.append((model, xr.grad))
    (ours, gx), (ref, gx_ref) = results
    torch.testing.assert_close(gx, gx_ref, rtol=1e-10, atol=1e-12)
    for p, q in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)
    for (name, a), (_, b) in zip(ours.named_buffers(), ref.named_buffers()):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)


def test_convert_layer_registered_twice():
    """A layer used twice (registered under two names, or under two parents) becomes ONE bn_cuda
    layer registered in each place, for convert_batchnorm and convert_sync_batchnorm alike (a walk
    over named_children() visits it once and left the second registration as torch's)."""
    for convert, kind in ((convert_batchnorm, BatchNorm2d), (SyncBatchNorm.convert_sync_batchnorm, SyncBatchNorm)):
        bn = torch.nn.BatchNorm2d(3)
        inner = torch.nn.Sequential(bn)
        model = torch.nn.Sequential(bn, torch.nn.ReLU(), bn, inner, torch.nn.Sequential(inner))
        convert(model)
        assert type(model[0]) is kind and model[2] is model[0] and model[3][0] is model[0]
        assert model[4][0] is model[3]
        assert model[0].weight is bn.weight and model[0].running_mean is bn.running_mean


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_fx_symbolic_trace(train):
    """torch.fx.symbolic_trace (torchvision's feature extraction, FX graph passes) traces a model with
    bn_cuda's layers: each is one call of bn_cuda.nn.batch_norm_module with its parameters and
    buffers, in the mode it was traced in; the graph module computes what the model does and updates
    the same buffers."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), BatchNorm2d(5), torch.nn.ReLU(), torch.nn.Flatten(2),
                                BatchNorm1d(5, momentum=None), torch.nn.Flatten(), BatchNorm1d(5 * 36)).double()
    model.train(train)
    ref = copy.deepcopy(model)
    gm = torch.fx.symbolic_trace(model)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(bn_cuda.nn.batch_norm_module) == 3
    for step in range(2):
        x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
        torch.testing.assert_close(gm(x), ref(x), rtol=1e-9, atol=1e-9)
    for (n, a), (_, b) in zip(gm.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=n)
    assert int(model[4].num_batches_tracked) == (2 if train else 0)  # (the model's own buffers, shared)
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        bn_cuda.nn.batch_norm_module(x[0], None, None, None, None, None, True, True, 0.1, 1e-5, (4,))


def test_compiled_cumulative_average_does_not_recompile():
    """momentum=None reads num_batches_tracked on the host (as torch does): under torch.compile that
    call runs eagerly (a graph break), so the graph is not recompiled for each step's new factor;
    the statistics are torch's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), BatchNorm2d(4, momentum=None), torch.nn.ReLU())
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4, momentum=None), torch.nn.ReLU())
    ref.load_state_dict(model.state_dict())
    compiled = torch.compile(model, backend="aot_eager")
    xs = [torch.randn(3, 3, 5, 5) for _ in range(6)]  # (one shape: a new one would recompile once anyway)
    torch.testing.assert_close(compiled(xs[0]), ref(xs[0]), rtol=1e-5, atol=1e-5)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for x in xs[1:]:
            torch.testing.assert_close(compiled(x), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model[1].running_var, ref[1].running_var, rtol=1e-5, atol=1e-6)
    assert int(model[1].num_batches_tracked) == 6


def _jit(fn, *args, **kwargs):
    """A torch.jit call without its deprecation warning (TorchScript is deprecated, not removed:
    torch's batch norms still script, so the drop-ins must)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return fn(*args, **kwargs)


def _script(module):
    return _jit(torch.jit.script, module)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize("kwargs", [{}, {"momentum": None}, {"affine": False}, {"track_running_stats": False},
                                    {"momentum": 0.3, "eps": 1e-3}])
def test_torch_jit_script_matches_torch_script(device, name, kwargs):
    """torch.jit.script of BatchNorm1d/2d/3d (torch's own are scriptable): the script calls our
    kernels (bn_cuda::forward_train / forward_infer in its graph) and computes what torch's scripted
    layer computes (outputs, memory format, gradients, buffers over two training steps and an
    evaluation call); it survives torch.jit.save / load."""
    shape = PAIRS[name][2]
    ours, ref = _module_pair(name, kwargs, device, seed=3)
    scripted, ref_scripted = _script(ours), _script(ref)
    graph = str(scripted.graph) + "".join(str(m.graph) for m in [scripted._c._get_method("_scripted_forward")])
    assert "bn_cuda::forward_train" in graph
    assert ("bn_cuda::forward_infer" in graph) == ref.track_running_stats  # (else eval uses batch statistics)
    _compare_steps(scripted, ref_scripted, name, shape, device, seed=50)
    if ref.affine:
        torch.testing.assert_close(scripted.weight.grad, ref_scripted.weight.grad, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(scripted.bias.grad, ref_scripted.bias.grad, rtol=1e-7, atol=1e-9)
    import io
    buffer = io.BytesIO()
    _jit(torch.jit.save, scripted, buffer)
    buffer.seek(0)
    loaded = _jit(torch.jit.load, buffer, map_location=device)
    x = _data(shape, 60, device)
    for train in (False, True):
        loaded.train(train)
        scripted.train(train)
        assert torch.equal(loaded(x), scripted(x))
    assert torch.equal(loaded.running_var, scripted.running_var) if ref.track_running_stats else True


@pytest.mark.parametrize("momentum", [0.1, None])
def test_torch_jit_script_errors_change_no_buffer(momentum):
    """The scripted layer refuses a wrong rank, one value per feature in training and a wrong channel
    count with the eager layer's messages, and changes no buffer (num_batches_tracked included)."""
    scripted = _script(BatchNorm2d(3, momentum=momentum))
    before = {k: v.clone() for k, v in scripted.state_dict().items()}
    for bad, match in (((2, 3, 4), r"expected 4D input \(got 3D input\)"),
                       ((1, 3, 1, 1), r"expected more than 1 value per feature when training, got input of shape "
                                      r"\[1, 3, 1, 1\]"),
                       ((4, 5, 2, 2), r"weight has shape \[3\].*5 features")):
        # (a raise in TorchScript reaches Python as torch.jit.Error, as with torch's scripted layers;
        # the kernels' errors as RuntimeError)
        with pytest.raises((torch.jit.Error, RuntimeError), match=match):
            scripted(torch.randn(bad))
        for k, v in scripted.state_dict().items():
            assert torch.equal(v, before[k]), (bad, k)
    x = _data((4, 3, 2, 2), 1, "cpu").float()
    ref = torch.nn.BatchNorm2d(3, momentum=momentum)
    for _ in range(3):
        scripted(x)
        ref(x)
    assert int(scripted.num_batches_tracked) == 3
    torch.testing.assert_close(scripted.running_var, ref.running_var)


def test_torch_jit_script_of_a_converted_model():
    """A model converted by convert_batchnorm scripts as a whole (the conversion must not break a
    user's torch.jit.script export) and trains like the scripted original."""
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 17, 3), torch.nn.BatchNorm2d(17), torch.nn.ReLU(),
                                torch.nn.Flatten(2), torch.nn.BatchNorm1d(17, momentum=None)).double()
    ref = _script(copy.deepcopy(model))
    scripted = _script(convert_batchnorm(model))
    assert type(model[1]) is BatchNorm2d and type(model[4]) is BatchNorm1d
    for step in range(3):
        scripted.train(step < 2)
        ref.train(step < 2)
        x = torch.randn(5, 3, 9, 9, dtype=torch.float64)
        xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        yo, yr = scripted(xo), ref(xr)
        torch.testing.assert_close(yo, yr, rtol=1e-9, atol=1e-9)
        yo.sum().backward()
        yr.sum().backward()
        torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-7, atol=1e-9)
    for (n, a), (_, b) in zip(scripted.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=n)


def _fusable_model():
    """Every batch-norm pattern of torch's fuser table once, in a model that runs: (conv, bn,
    relu) in 1, 2 and 3 dimensions, (conv, bn), (linear, bn), (convtranspose, bn), (bn, relu)."""
    nn = torch.nn
    return nn.ModuleDict({
        "c1": nn.Sequential(nn.Conv1d(3, 17, 3), nn.BatchNorm1d(17), nn.ReLU()),
        "c2": nn.Sequential(nn.Conv2d(3, 17, 3), nn.BatchNorm2d(17), nn.ReLU()),
        "c3": nn.Sequential(nn.Conv3d(3, 5, 3), nn.BatchNorm3d(5)),
        "lin": nn.Sequential(nn.Linear(7, 17), nn.BatchNorm1d(17)),
        "ct": nn.Sequential(nn.ConvTranspose2d(3, 5, 3), nn.BatchNorm2d(5)),
        "br": nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()),
    })


_FUSE_GROUPS = {"c1": ["0", "1", "2"], "c2": ["0", "1", "2"], "c3": ["0", "1"], "lin": ["0", "1"], "ct": ["0", "1"],
                "br": ["0", "1"]}
_FUSE_INPUTS = {"c1": (4, 3, 9), "c2": (4, 3, 9, 7), "c3": (2, 3, 5, 5, 5), "lin": (6, 7), "ct": (4, 3, 5, 5),
                "br": (4, 3, 5, 7)}


@pytest.mark.parametrize("qat", [False, True], ids=["eval", "qat"])
def test_quantization_fuse_modules_with_fuser_method_mapping(qat):
    """torch.ao.quantization.fuse_modules (eval) and fuse_modules_qat (training) fuse a converted
    model with bn_cuda.nn.fuser_method_mapping(): the same fused module types as for torch's layers,
    holding our layers' tensors, computing what torch's fusion of the original model computes."""
    from torch.ao.quantization import fuse_modules, fuse_modules_qat
    fuse = fuse_modules_qat if qat else fuse_modules
    torch.manual_seed(5)
    model = _fusable_model().double()
    g = torch.Generator().manual_seed(6)
    for m in model.modules():  # running statistics and affine parameters of their own
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
            m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
    model.train(qat)
    ref = copy.deepcopy(model)
    convert_batchnorm(model)
    assert type(model["c2"][1]) is BatchNorm2d and type(model["lin"][1]) is BatchNorm1d
    with pytest.raises(AssertionError, match="did not find fuser method"):  # (torch's table alone)
        fuse(copy.deepcopy(model["c2"]), [["0", "1", "2"]])
    bn_weights = {name: seq[0 if name == "br" else 1].weight for name, seq in model.items()}
    mapping = bn_cuda.nn.fuser_method_mapping()
    for name, group in _FUSE_GROUPS.items():
        if qat and name == "ct":  # (torch refuses this one in QAT: so must we, with its message)
            for m, kw in ((model, {"fuse_custom_config_dict": {"additional_fuser_method_mapping": mapping}}), (ref, {})):
                with pytest.raises(Exception, match="ConvTranspose\\+BatchNorm not yet supported in QAT"):
                    fuse(m[name], [group], inplace=True, **kw)
            continue
        fused = fuse(model[name], [group], inplace=True,
                     fuse_custom_config_dict={"additional_fuser_method_mapping": mapping})
        fused_ref = fuse(ref[name], [group], inplace=True)
        assert [type(m) for m in fused] == [type(m) for m in fused_ref], name
        x = torch.randn(_FUSE_INPUTS[name], generator=g, dtype=torch.float64)
        if qat:  # (QAT modules keep the batch norm, sharing our layer's parameters)
            assert any(p is bn_weights[name] for p in fused.parameters()), name
        else:
            fused.eval()
            fused_ref.eval()
        torch.testing.assert_close(fused(x), fused_ref(x), rtol=1e-9, atol=1e-9, msg=name)


def _graphs_of(fn, *args):
    """The FX graphs torch.compile(fullgraph=True) hands its backend for ``fn(*args)``, and the result."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    backend = EagerAndRecordGraphs()
    torch._dynamo.reset()
    out = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return backend.graphs, out


def _bn_cuda_targets(graphs):
    return [str(n.target) for g in graphs for n in g.graph.nodes if "bn_cuda" in str(n.target)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_compiled_inference_of_cuda_tensors_is_torch_operations(device, dtype):
    """Under torch.compile an evaluation-mode batch norm of CUDA tensors traces as torch operations
    (bn_cuda.ops.infer_for_inductor: the kernel's (x - mean) * (weight / sqrt(var + eps)) + bias in
    the accumulation dtype), which Inductor fuses with a following ReLU and folds into a convolution
    under freezing, as it does torch's own batch norm; of CPU tensors it stays bn_cuda's operator.
    Either way the result is the eager kernel's to rounding (the torch operations are also compared
    on CPU, called directly), on inputs whose mean is 1e4 times their spread, with float32
    statistics for bf16 input, in channels_last; torch.export records bn_cuda::forward_infer."""
    torch.manual_seed(7)
    c = 17
    layer = BatchNorm2d(c).to(device)
    with torch.no_grad():
        layer.running_mean.copy_(1e4 + torch.randn(c, dtype=torch.float64).to(device))
        layer.running_var.copy_(torch.rand(c, dtype=torch.float64).to(device) + 0.5)
        layer.weight.copy_(torch.rand(c) + 0.5)
        layer.bias.copy_(torch.randn(c))
    if dtype == torch.float64:
        layer.double()
    layer.eval()
    model = torch.nn.Sequential(layer, torch.nn.ReLU())
    x = (layer.running_mean.double().reshape(1, c, 1, 1) + torch.randn(5, c, 7, 7, dtype=torch.float64, device=device))
    x = x.to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    graphs, out = _graphs_of(model, x)
    assert _bn_cuda_targets(graphs) == ([] if device == "cuda" else ["bn_cuda.forward_infer.default"])
    params = (layer.weight, layer.bias, layer.running_mean, layer.running_var, layer.eps, [1])
    direct_graphs, direct = _graphs_of(lambda t: bn_cuda.ops.infer_for_inductor(t, *params).relu(), x)
    assert _bn_cuda_targets(direct_graphs) == []
    eager = model(x)
    tol = {torch.float32: 2e-6, torch.bfloat16: 1e-2, torch.float64: 1e-13}[dtype]
    g = torch.randn_like(eager)
    ys = (eager, out, direct)
    grads = [torch.autograd.grad(y, (x, layer.weight, layer.bias), g) for y in ys]
    for y, gs in zip(ys[1:], grads[1:]):
        torch.testing.assert_close(y, eager, rtol=tol, atol=tol)
        assert y.is_contiguous(memory_format=torch.channels_last)
        for a, e, name in zip(gs, grads[0], ("input", "weight", "bias")):
            torch.testing.assert_close(a, e, rtol=tol * 10, atol=tol * 10, msg=name)
    ep = torch.export.export(model, (x.detach(),))
    assert any("bn_cuda.forward_infer" in str(n.target) for n in ep.graph.nodes)


def test_compiled_inference_fuses_under_inductor():
    """Inductor compiles a converted Conv2d -> BatchNorm2d -> ReLU evaluation model on CPU (with and
    without freezing) to what torch's model compiles to, within float32 rounding, and its errors keep their
    messages: a wrong per-feature size and integer input (the fake kernel's error, which Dynamo
    raises as a RuntimeError holding its message, or the kernel's where Dynamo runs the frame)."""
    import torch._inductor.config as inductor_config
    torch.manual_seed(8)
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 17, 3), torch.nn.BatchNorm2d(17), torch.nn.ReLU()).eval()
    with torch.no_grad():
        ref[1].running_mean.uniform_(-1, 1)
        ref[1].running_var.uniform_(0.5, 1.5)
        ref[1].weight.uniform_(0.5, 1.5)
        ref[1].bias.uniform_(-1, 1)
    model = convert_batchnorm(copy.deepcopy(ref))
    x = torch.randn(4, 3, 9, 9)
    for freezing in (False, True):
        torch._dynamo.reset()
        with inductor_config.patch(freezing=freezing), torch.no_grad():
            out = torch.compile(model)(x)
        torch.testing.assert_close(out, ref(x), rtol=1e-5, atol=1e-5)
    layer = BatchNorm2d(3).eval()
    for bad, err, match in ((torch.randn(4, 5, 2, 2), (ValueError, RuntimeError), r"weight has shape \[3\].*5 features"),
                            (torch.ones(4, 3, 2, 2, dtype=torch.int64), (TypeError, RuntimeError),
                             "input must be a floating-point")):
        torch._dynamo.reset()
        with pytest.raises(err, match=match):
            torch.compile(layer, backend="eager")(bad)
        torch._dynamo.reset()  # (the torch operations CUDA tensors take: their own checks, same messages)
        with pytest.raises(err, match=match):
            torch.compile(lambda t: bn_cuda.ops.infer_for_inductor(t, layer.weight, layer.bias, layer.running_mean,
                                                                   layer.running_var, 1e-5, [1]), backend="eager")(bad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("axis, shape", [((-1, 1), (4, 5)), ((3, 1), (4, 5)), ((1, 3), (1, 4, 1, 5)), ((2,), (2,)),
                                         ((1, 2), (8,)), ((1,), (4,))])
def test_infer_for_inductor_matches_the_operator(dtype, axis, shape):
    """bn_cuda.ops.infer_for_inductor (what CUDA tensors trace as under torch.compile) computes what
    bn_cuda::forward_infer computes, for feature axes in any order and per-feature tensors in the
    feature dims' shape, flat or Keras-shaped, float32 statistics for bf16 input; on a strided
    (transposed) input."""
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(3, 5, 2, 4, generator=g, dtype=torch.float64) * 2 + 7).transpose(1, 3).to(dtype)
    pdt = torch.float32 if dtype == torch.bfloat16 else dtype
    w, b, m = (torch.randn(shape, generator=g, dtype=torch.float64).to(pdt) for _ in range(3))
    v = (torch.rand(shape, generator=g, dtype=torch.float64) + 0.5).to(pdt)
    want = torch.ops.bn_cuda.forward_infer(x, w, b, m, v, 1e-5, list(axis))
    got = bn_cuda.ops.infer_for_inductor(x, w, b, m, v, 1e-5, list(axis))
    assert got.dtype == want.dtype == dtype
    tol = {torch.float64: 1e-13, torch.float32: 2e-6, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
