"""ONNX export (bn_cuda/onnx.py): models holding bn_cuda's batch norms export with torch.onnx.export
(both exporters) and ONNX Runtime reproduces them against a float64 reference; training mode is
refused without moving any statistic; an exported program translates with
bn_cuda.onnx.custom_translation_table().

Needs onnx, onnxscript and onnxruntime (installed with tensorflow by scripts/test.sh; CI fails when
these tests are skipped, as the tensorflow parity tests)."""

from __future__ import annotations

import warnings

import pytest
import torch

pytestmark = pytest.mark.onnx

onnx = pytest.importorskip("onnx", exc_type=ImportError)
pytest.importorskip("onnxscript", exc_type=ImportError)
ort = pytest.importorskip("onnxruntime", exc_type=ImportError)

import bn_cuda  # noqa: E402
from conftest import assert_close_ref, hand_reference, make_features, make_input, reference_batch_norm  # noqa: E402


def _export(model, args, dynamo=True, tmp_path=None, **kw):
    """(ONNX ModelProto, ONNX Runtime session) of ``model`` exported with ``args``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            prog = torch.onnx.export(model, args, dynamo=True, verbose=False, **kw)
            proto = prog.model_proto
        else:
            path = tmp_path / "model.onnx"
            torch.onnx.export(model, args, str(path), dynamo=False, **kw)
            proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    return proto, ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _export_program(ep):
    """(ModelProto, session) of a torch.export program through bn_cuda's translation table."""
    return _export(ep, (), custom_translation_table=bn_cuda.onnx.custom_translation_table())


def _run(session, *xs):
    feeds = {i.name: x.detach().contiguous().numpy() for i, x in zip(session.get_inputs(), xs)}
    return [torch.from_numpy(o) for o in session.run(None, feeds)]


def _ops(proto):
    return [n.op_type for n in proto.graph.node]


def _random_stats(module):
    with torch.no_grad():
        for name, kind in (("weight", "weight"), ("bias", "bias"), ("running_mean", "mean"),
                           ("running_var", "var")):
            t = getattr(module, name)
            t.copy_(make_features(t.shape, kind=kind))


class _Functional(torch.nn.Module):
    """bn_cuda.functional.batch_norm in evaluation mode over ``axis``, per-feature tensors of
    ``pshape`` (the feature dims', flat, or Keras's rank-preserving one)."""

    def __init__(self, fshape, pshape, axis, weight=True, bias=True, dtype=torch.float32):
        super().__init__()
        self.axis = axis
        self.register_buffer("rm", make_features(fshape, dtype, kind="mean").reshape(pshape))
        self.register_buffer("rv", make_features(fshape, dtype, kind="var").reshape(pshape))
        self.w = torch.nn.Parameter(make_features(fshape, dtype).reshape(pshape)) if weight else None
        self.b = torch.nn.Parameter(make_features(fshape, dtype, kind="bias").reshape(pshape)) if bias else None

    def forward(self, x):
        return bn_cuda.functional.batch_norm(x, self.rm, self.rv, self.w, self.b, False, 0.1, 1e-3, axis=self.axis)

    def reference(self, x):
        return reference_batch_norm(x, self.rm, self.rv, self.w, self.b, eps=1e-3, axis=self.axis)["out"]


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("cls,shape", [(bn_cuda.nn.BatchNorm1d, (3, 17)), (bn_cuda.nn.BatchNorm1d, (2, 3, 7)),
                                       (bn_cuda.nn.BatchNorm2d, (2, 1, 7, 7)), (bn_cuda.nn.BatchNorm2d, (3, 17, 1, 1)),
                                       (bn_cuda.nn.BatchNorm3d, (2, 3, 1, 7, 5)),
                                       (bn_cuda.nn.SyncBatchNorm, (2, 3, 7, 7))])
def test_nn_modules_export_as_batch_normalization(cls, shape, dynamo, tmp_path):
    c = shape[1]
    bn = cls(c, eps=1e-3)
    _random_stats(bn)
    model = torch.nn.Sequential(bn).eval()
    x = make_input(shape)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    proto, sess = _export(model, (x,), dynamo=dynamo, tmp_path=tmp_path, **({"optimize": False} if dynamo else {}))
    # torch's own batch-norm node: ONNX BatchNormalization, which runtimes fold into a Conv
    assert _ops(proto) == ["BatchNormalization"], _ops(proto)
    x2 = make_input(shape)  # (other data than the traced one)
    ref = reference_batch_norm(x2, bn.running_mean, bn.running_var, bn.weight, bn.bias, eps=1e-3)["out"]
    assert_close_ref(_run(sess, x2)[0], ref, torch.float32, "onnxruntime")
    assert_close_ref(model(x2), ref, torch.float32, "eager after export")
    for k, v in bn.state_dict().items():  # exporting moved nothing
        assert torch.equal(v, before[k]), k


def test_conv_bn_folds_and_dynamic_batch(tmp_path):
    bn = bn_cuda.nn.BatchNorm2d(17)
    _random_stats(bn)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 17, 3), bn, torch.nn.ReLU()).eval()
    x = make_input((2, 3, 9, 9))
    batch = torch.export.Dim("batch", min=1)
    proto, sess = _export(model, (x,), dynamic_shapes={"input": {0: batch}})
    assert "BatchNormalization" not in _ops(proto) and "Conv" in _ops(proto)  # folded into the Conv
    for n in (1, 5):
        x2 = make_input((n, 3, 9, 9)).to(memory_format=torch.channels_last)
        with torch.no_grad():
            conv = torch.nn.functional.conv2d(x2.double(), model[0].weight.double(), model[0].bias.double())
        ref = reference_batch_norm(conv, bn.running_mean, bn.running_var, bn.weight, bn.bias)["out"].relu()
        assert_close_ref(_run(sess, x2)[0], ref, torch.float32, f"batch {n}")


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("shape,axis,pshape", [
    ((2, 5, 7, 3), -1, (3,)),                 # channels-last feature axis
    ((2, 3, 4, 5), (1, 2), (3, 4)),           # two feature axes, feature-dims shape
    ((3, 4, 2, 6), (1, 3), (24,)),            # two feature axes, flat
    ((4, 17, 7), 1, (1, 17, 1)),              # Keras's rank-preserving shape
    ((5, 1000), 1, (1000,)),
])
@pytest.mark.parametrize("affine", [True, False])
def test_functional_exports_as_mul_add(shape, axis, pshape, affine, dynamo, tmp_path):
    fshape = [shape[a] for a in sorted(a % len(shape) for a in ([axis] if isinstance(axis, int) else axis))]
    model = _Functional(fshape, pshape, axis, weight=affine, bias=affine).eval()
    x = make_input(shape, axis=axis, offset=3.0)
    proto, sess = _export(model, (x,), dynamo=dynamo, tmp_path=tmp_path)
    if dynamo:  # feature axis 1 alone: BatchNormalization; any other: Mul / Add
        want = "BatchNormalization" if axis == 1 else "Mul"
        assert want in _ops(proto), _ops(proto)
    x2 = make_input(shape, axis=axis, offset=-2.0)
    assert_close_ref(_run(sess, x2)[0], model.reference(x2), torch.float32, "onnxruntime")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("path", ["export", "translation_table"])
def test_other_dtypes(dtype, path):
    """16-bit input with float32 statistics: the coefficients in float32, one cast each way;
    float64 in float64."""
    model = _Functional([6], (6,), -1, dtype=torch.float64 if dtype == torch.float64 else torch.float32).eval()
    x = make_input((4, 5, 6), axis=-1).to(dtype)
    if path == "export":
        proto, sess = _export(model, (x,))
    else:
        proto, sess = _export_program(torch.export.export(model, (x,)))
    if dtype == torch.bfloat16:  # (ONNX Runtime's CPU provider runs no bfloat16 Mul: the graph only)
        assert _ops(proto).count("Cast") >= 2 and "Sub" in _ops(proto)
        return
    out = _run(sess, x)[0]
    assert out.dtype == dtype
    if dtype == torch.float64:  # (eps, 1 / sqrt and every constant in float64: no float32 digit lost)
        torch.testing.assert_close(out, model(x).detach(), rtol=1e-14, atol=1e-14)
    assert_close_ref(out, model.reference(x), dtype, "onnxruntime")


def _trained_keras(shape, **kw):
    layer = bn_cuda.BatchNormalization(**kw)
    for k in range(3):
        layer(make_input(shape, axis=kw.get("axis", -1), offset=k), training=True)
    return layer.eval()


@pytest.mark.parametrize("kw", [
    dict(axis=-1),
    dict(axis=1),
    dict(axis=-1, virtual_batch_size=2, renorm=True, renorm_clipping={"rmax": 2.0, "dmax": 1.0}),
    dict(axis=[1, 3], center=False),
    dict(axis=-1, fused=False, scale=False),
])
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_keras_layer(kw, dynamo, tmp_path):
    shape = (4, 5, 3, 6)
    layer = _trained_keras(shape, **kw)
    model = torch.nn.Sequential(layer).eval()  # (the TorchScript exporter restores the container's mode)
    x = make_input(shape, axis=kw["axis"], offset=1.5)
    proto, sess = _export(model, (x,), dynamo=dynamo, tmp_path=tmp_path)
    assert not any(op.startswith("bn_cuda") for op in _ops(proto))
    axes = layer._axes
    flat = lambda name: None if getattr(layer, name) is None else getattr(layer, name)  # noqa: E731
    ref = reference_batch_norm(x, flat("moving_mean"), flat("moving_variance"), flat("gamma"), flat("beta"),
                               eps=layer.epsilon, axis=axes)["out"]
    assert_close_ref(_run(sess, x)[0], ref, torch.float32, "onnxruntime")
    with torch.no_grad():
        assert_close_ref(layer(x), ref, torch.float32, "eager")


def test_exported_program_with_translation_table():
    """A program from torch.export holds bn_cuda::forward_infer; the table translates it."""
    model = _Functional([3, 4], (3, 4), (1, 3)).eval()
    x = make_input((2, 3, 5, 4), axis=(1, 3))
    ep = torch.export.export(model, (x,))
    assert any("bn_cuda.forward_infer" in str(n.target) for n in ep.graph.nodes)
    proto, sess = _export_program(ep)
    assert "Mul" in _ops(proto)
    x2 = make_input((2, 3, 5, 4), axis=(1, 3), offset=4.0)
    assert_close_ref(_run(sess, x2)[0], model.reference(x2), torch.float32, "onnxruntime")


@pytest.mark.parametrize("affine", [True, False])
def test_translation_table_gives_batch_normalization_for_axis_1(affine):
    """As the model's own export: a feature axis at dim 1 becomes BatchNormalization, which the
    exporter's optimizer folds into the Conv before it."""
    bn = bn_cuda.nn.BatchNorm2d(17, affine=affine)
    if affine:
        _random_stats(bn)
    else:
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 17, 3), bn).eval()
    proto, _ = _export_program(torch.export.export(model, (make_input((2, 3, 9, 9)),)))
    assert _ops(proto) == ["Conv"], _ops(proto)
    proto, sess = _export_program(torch.export.export(torch.nn.Sequential(bn), (make_input((2, 17, 3, 3)),)))
    assert "BatchNormalization" in _ops(proto), _ops(proto)
    x2 = make_input((2, 17, 3, 3))  # (the program's static shape)
    ref = reference_batch_norm(x2, bn.running_mean, bn.running_var, bn.weight, bn.bias)["out"]
    assert_close_ref(_run(sess, x2)[0], ref, torch.float32, "onnxruntime")


@pytest.mark.parametrize("which", ["module", "keras", "sync"])
def test_training_mode_is_refused_and_moves_nothing(which, tmp_path):
    if which == "module":
        layer = bn_cuda.nn.BatchNorm2d(3)
        x = make_input((2, 3, 4, 4))
    elif which == "sync":
        layer = bn_cuda.nn.SyncBatchNorm(3)
        x = make_input((2, 3, 4, 4))
    else:
        layer = _trained_keras((4, 3, 5), axis=-1, virtual_batch_size=2, renorm=True).train()
        x = make_input((4, 3, 5), axis=-1)
    state = lambda: dict(layer.named_buffers(), **dict(layer.named_parameters()))  # noqa: E731
    before = {k: v.detach().clone() for k, v in state().items()}
    assert before
    model = torch.nn.Sequential(layer).train()
    with pytest.raises(Exception, match="exports evaluation mode only"):
        _export(model, (x,))
    with pytest.raises(Exception, match="exports evaluation mode only"):  # (the TorchScript exporter, asked to)
        _export(model, (x,), dynamo=False, tmp_path=tmp_path, training=torch.onnx.TrainingMode.TRAINING)
    for k, v in state().items():
        assert torch.equal(v, before[k]), k
    assert not bn_cuda.onnx.exporting()
    # and the layer trains as before
    layer(x).sum().backward() if which != "keras" else layer(x, training=True)


def test_export_does_not_change_other_tracing():
    """Outside ONNX export the ops stay bn_cuda's: torch.export, torch.jit.trace."""
    bn = bn_cuda.nn.BatchNorm2d(3).eval()
    x = make_input((2, 3, 4, 4))
    ep = torch.export.export(torch.nn.Sequential(bn), (x,))
    assert any("bn_cuda.forward_infer" in str(n.target) for n in ep.graph.nodes)
    traced = torch.jit.trace(torch.nn.Sequential(bn), (x,))
    assert "bn_cuda::forward_infer" in str(traced.inlined_graph)


@pytest.mark.parametrize("path", ["export", "translation_table"])
def test_large_offset_keeps_its_digits(path):
    """Inputs around 1e4 with a spread of 1 (running statistics to match), float32: the exported
    (x - mean) * scale + bias keeps float32 accuracy, where the folded x * scale + shift would be
    off by ~1e-3 of the output."""
    model = _Functional([17], (17,), -1).eval()
    with torch.no_grad():
        model.rm.add_(1e4)
    x = make_input((6, 7, 17), axis=-1, offset=1e4)
    if path == "export":
        proto, sess = _export(model, (x,))
    else:
        proto, sess = _export_program(torch.export.export(model, (x,)))
    ref = model.reference(x)
    assert float(ref.abs().max()) < 20  # (O(1) outputs: the offset cancels)
    assert_close_ref(_run(sess, x)[0], ref, torch.float32, "onnxruntime")


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("which", ["module_eval", "module_train", "functional_axis1", "functional_axis-1"])
def test_batch_statistics_without_running_statistics_export(which, dynamo, tmp_path):
    """Nothing to update: a layer without running statistics (either mode) and the functional API
    given none export, normalizing with each batch's statistics, as torch's do."""
    if which.startswith("module"):
        bn = bn_cuda.nn.BatchNorm2d(3, track_running_stats=False)
        with torch.no_grad():
            bn.weight.copy_(make_features([3]))
            bn.bias.copy_(make_features([3], kind="bias"))
        model = torch.nn.Sequential(bn).train(which == "module_train")
        shape, axis = (4, 3, 5, 5), 1

        def ref(x):
            return hand_reference(x, bn.weight, bn.bias, 1e-5, 1)
    else:
        axis = 1 if which.endswith("axis1") else -1

        class Model(torch.nn.Module):
            def forward(self, x):
                return bn_cuda.functional.batch_norm(x, None, None, training=True, eps=1e-3, axis=axis)
        model, shape = Model(), (4, 5, 6)

        def ref(x):
            return hand_reference(x, eps=1e-3, axis=axis)
    x = make_input(shape, axis=axis, offset=2.0)
    kw = {} if dynamo else {"training": torch.onnx.TrainingMode.PRESERVE}
    proto, sess = _export(model, (x,), dynamo=dynamo, tmp_path=tmp_path, **kw)
    x2 = make_input(shape, axis=axis, offset=-1.0)
    assert_close_ref(_run(sess, x2)[0], ref(x2), torch.float32, "onnxruntime")


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("wshape", [(4, 3), (5,), (1, 3, 1, 1)])
def test_wrong_weight_shape_is_refused_by_both_exporters(wshape, dynamo, tmp_path):
    """bn_cuda's check and message, also where the exporter traces sizes as tensors (dynamo=False)
    or falls back to torch.export's strict mode (which cannot trace the message closures): a
    weight of shape (4, 3) for features (3, 4) has the right element count."""

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("rm", torch.zeros(3, 4))
            self.register_buffer("rv", torch.ones(3, 4))
            self.w = torch.nn.Parameter(torch.ones(wshape))

        def forward(self, x):
            return bn_cuda.functional.batch_norm(x, self.rm, self.rv, self.w, None, False, axis=(1, 2))
    with pytest.raises(Exception, match=r"weight has shape \[" + ", ".join(map(str, wshape)) + r"\]"):
        _export(Model(), (make_input((2, 3, 4, 5), axis=(1, 2)),), dynamo=dynamo, tmp_path=tmp_path)


def test_strict_fallback_exports():
    """A model that only torch.export's strict mode traces (numpy in its forward): the default
    exporter falls back to it, and bn_cuda's batch norm exports there too."""
    import numpy as np

    bn = bn_cuda.nn.BatchNorm2d(3)
    _random_stats(bn)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = bn

        def forward(self, x):
            return self.bn(torch.from_numpy(np.tanh(x.numpy())))
    model = Model().eval()
    x = make_input((2, 3, 4, 4))
    proto, sess = _export(model, (x,))
    ref = reference_batch_norm(torch.tanh(x.double()), bn.running_mean, bn.running_var, bn.weight, bn.bias)["out"]
    assert_close_ref(_run(sess, x)[0], ref, torch.float32, "onnxruntime")


def test_momentum_none_training_is_refused_by_name():
    """momentum=None reads its step count on the host: refused before that, naming the layer."""
    bn = bn_cuda.nn.BatchNorm2d(3, momentum=None)
    with pytest.raises(Exception, match=r"bn_cuda.nn.BatchNorm2d: .*exports evaluation mode only"):
        _export(torch.nn.Sequential(bn).train(), (make_input((2, 3, 4, 4)),))
    assert int(bn.num_batches_tracked) == 0 and torch.equal(bn.running_mean, torch.zeros(3))


def test_unbuilt_keras_layer_under_torchscript_trace(tmp_path):
    """A TorchScript trace cannot build the layer (torch refuses a state_dict that changes while
    traced): a clear error, and the layer is left unbuilt; the default exporter builds it."""
    layer = bn_cuda.BatchNormalization(axis=-1)
    x = make_input((4, 3, 5), axis=-1)
    with pytest.raises(RuntimeError, match="is not built"):
        _export(torch.nn.Sequential(layer).eval(), (x,), dynamo=False, tmp_path=tmp_path)
    assert not layer.built
    proto, sess = _export(torch.nn.Sequential(layer).eval(), (x,))
    ref = reference_batch_norm(x, torch.zeros(5), torch.ones(5), eps=1e-3, axis=-1)["out"]
    assert_close_ref(_run(sess, x)[0], ref, torch.float32, "onnxruntime")
