"""The fake (meta) kernels refuse what the real kernels refuse, as they refuse it.

Every case builds one call of a ``torch.ops.bn_cuda`` op on a device ("cpu": the real kernel and
its C++ preparation, csrc/common/glue.cpp / staged.cpp; "meta": the fake kernel of bn_cuda/ops.py
or bn_cuda/staged.py) and runs it on both: the same exception type (ValueError for
TORCH_CHECK_VALUE, TypeError for TORCH_CHECK_TYPE, RuntimeError for TORCH_CHECK) with the same
message, which names the argument. Calls both accept return the same shapes and dtypes. Tensors
are made on the device itself (``.to("meta")`` would not keep an expanded tensor's strides).
"""

import math

import pytest
import torch

import bn_cuda  # noqa: F401  (registers the ops)
from bn_cuda import staged

ops = torch.ops.bn_cuda
SHAPE = (4, 3, 5)  # axis [1]: C = 3


def _x(d, shape=SHAPE, dtype=torch.float32):
    return torch.randn(shape, device=d).to(dtype)


def _c(d, n=3, dtype=torch.float32):
    return torch.rand(n, device=d).to(dtype) + 0.5


def _i(d, n=3):
    return torch.ones(n, dtype=torch.long, device=d)


def _expanded(d, n=3):
    return torch.ones(1, device=d).expand(n)


# --- argument builders, one per op: keyword overrides of a valid call --------------------------

def forward_train(d, **kw):
    a = dict(input=_x(d), weight=_c(d), bias=_c(d), running_mean=_c(d), running_var=_c(d), momentum=0.1, eps=1e-5,
             axis=[1])
    a.update({k: (v(d) if callable(v) else v) for k, v in kw.items()})
    return ops.forward_train(*a.values())


def forward_infer(d, **kw):
    a = dict(input=_x(d), weight=_c(d), bias=_c(d), running_mean=_c(d), running_var=_c(d), eps=1e-5, axis=[1])
    a.update({k: (v(d) if callable(v) else v) for k, v in kw.items()})
    return ops.forward_infer(*a.values())


def backward(d, **kw):
    a = dict(grad_out=_x(d), input=_x(d), weight=_c(d), save_mean=_c(d), save_invstd=_c(d), train=True, axis=[1],
             output_mask=[True, True, True])
    a.update({k: (v(d) if callable(v) else v) for k, v in kw.items()})
    return ops.backward(*a.values())


def batch_stats(d, **kw):
    a = dict(input=_x(d), axis=[1], mask=None, ghosts=1)
    a.update({k: (v(d) if callable(v) else v) for k, v in kw.items()})
    return ops.batch_stats(*a.values())


def gather_stats(d, **kw):
    a = dict(mean=_x(d, (2, 3)), m2=_x(d, (2, 3)).abs(), count=torch.full((2, 3), 4.0, device=d),
             running_mean=_c(d), running_var=_c(d), momentum=0.1, eps=1e-5, unbiased_running_var=True)
    a.update({k: (v(d) if callable(v) else v) for k, v in kw.items()})
    return ops.gather_stats(*a.values())


def normalize(d, **kw):
    g = kw.get("ghosts", 1)
    g = g if isinstance(g, int) and g > 0 else 1
    a = dict(input=_x(d), mean=_c(d, 3 * g), invstd=_c(d, 3 * g), weight=_c(d, 3 * g), bias=_c(d, 3 * g), axis=[1],
             ghosts=1)
    a.update({k: (v(d) if callable(v) else v) for k, v in kw.items()})
    return ops.normalize(*a.values())


def grad_sums(d, **kw):
    g = kw.get("ghosts", 1)
    g = g if isinstance(g, int) and g > 0 else 1
    a = dict(grad_out=_x(d), input=_x(d), mean=_c(d, 3 * g), invstd=_c(d, 3 * g), axis=[1], ghosts=1)
    a.update({k: (v(d) if callable(v) else v) for k, v in kw.items()})
    return ops.grad_sums(*a.values())


def grad_input(d, **kw):
    g = kw.get("ghosts", 1)
    g = g if isinstance(g, int) and g > 0 else 1
    a = dict(grad_out=_x(d), input=_x(d), mean=_c(d, 3 * g), invstd=_c(d, 3 * g), weight=_c(d, 3 * g),
             sum_dy=_c(d, 3 * g), sum_dy_xmu=_c(d, 3 * g), count=torch.full((3 * g,), 20.0 / g, device=d), axis=[1],
             mask=None, ghosts=1)
    a.update({k: (v(d) if callable(v) else v) for k, v in kw.items()})
    return ops.grad_input(*a.values())


def ghost_backward(d, **kw):
    g = kw.get("ghosts", 1)
    g = g if isinstance(g, int) and g > 0 else 1
    a = dict(grad_out=_x(d), input=_x(d), mean=_c(d, 3 * g), invstd=_c(d, 3 * g), weight=_c(d, 3 * g), axis=[1],
             ghosts=1, output_mask=[True, True, True])
    a.update({k: (v(d) if callable(v) else v) for k, v in kw.items()})
    return ops.ghost_backward(*a.values())


def keras_grads(dev, **kw):  # (not `d`: keras_grads has an argument d)
    g = kw.get("ghosts", 1)
    g = g if isinstance(g, int) and g > 0 else 1
    a = dict(d_scale=_c(dev, 3 * g), d_shift=_c(dev, 3 * g), r=_c(dev), d=_c(dev), gamma=_c(dev), adj_scale=_c(dev),
             adj_bias=_c(dev), beta=True, ghosts=1, output_mask=[True, True, True, True])
    a.update({k: (v(dev) if callable(v) else v) for k, v in kw.items()})
    return ops.keras_grads(*a.values())


def keras_backward(dev, **kw):
    g = kw.get("ghosts", 1)
    g = g if isinstance(g, int) and g > 0 else 1
    a = dict(grad_out=_x(dev), input=_x(dev), mean=_c(dev, 3 * g), invstd=_c(dev, 3 * g), weight=_c(dev, 3 * g),
             axis=[1], ghosts=1, r=_c(dev), d=_c(dev), gamma=_c(dev), adj_scale=_c(dev), adj_bias=_c(dev), beta=True,
             output_mask=[True] * 5)
    a.update({k: (v(dev) if callable(v) else v) for k, v in kw.items()})
    return ops.keras_backward(*a.values())


def keras_forward(d, **kw):
    a = dict(input=_x(d), axis=[1], mask=None, ghosts=1, gamma=_c(d), beta=_c(d), adj_scale=None, adj_bias=None,
             moving_mean=_c(d), moving_variance=_c(d), moving_stddev=None, renorm_mean=None, renorm_stddev=None,
             momentum=0.9, renorm_momentum=0.9, eps=1e-3, rmin=None, rmax=None, dmax=None, always_update=False)
    a.update({k: (v(d) if callable(v) else v) for k, v in kw.items()})
    return ops.keras_forward(*a.values())


def _keras(d, op, kw):
    g = kw.get("ghosts", 1)
    g = g if isinstance(g, int) and g > 0 else 1
    a = dict(mean=_c(d, 3 * g), second=_c(d, 3 * g), count=torch.full((3 * g,), 4.0, device=d))
    if op == "keras_coeffs":
        a.update(gamma=_c(d), beta=_c(d), adj_scale=_c(d), adj_bias=_c(d))
    a.update(moving_mean=_c(d), moving_variance=_c(d), moving_stddev=None, renorm_mean=None, renorm_stddev=None,
             ghosts=1, momentum=0.9, renorm_momentum=0.9, eps=1e-3, rmin=None, rmax=None, dmax=None,
             always_update=False)
    a.update({k: (v(d) if callable(v) else v) for k, v in kw.items()})
    return getattr(ops, op)(*a.values())


def keras_finalize(d, **kw):
    return _keras(d, "keras_finalize", kw)


def keras_coeffs(d, **kw):
    return _keras(d, "keras_coeffs", kw)


def _renorm(d):
    return _c(d)


# --- refusals: (op, overrides, exception type, regex naming the argument) ----------------------

REFUSED = [
    # forward_train (prepare_forward, training)
    (forward_train, dict(input=lambda d: _i(d, 60).view(SHAPE)), TypeError, r"input must be a floating-point tensor"),
    (forward_train, dict(input=lambda d: _c(d)), ValueError, r"input must have at least 2 dimensions"),
    (forward_train, dict(eps=-1.0), ValueError, r"eps must be > 0 in training, got -1"),
    (forward_train, dict(eps=0.0), ValueError, r"eps must be > 0 in training, got 0"),
    (forward_train, dict(eps=math.nan), ValueError, r"eps must be finite, got nan"),
    (forward_train, dict(eps=math.inf), ValueError, r"eps must be finite, got inf"),
    (forward_train, dict(eps=1e-50), ValueError, r"eps=1e-50 rounds to 0 in float32"),
    (forward_train, dict(input=lambda d: _x(d, dtype=torch.float16), eps=1e-50), ValueError,
     r"eps=1e-50 rounds to 0 in float32, the accumulation type of Half input"),
    (forward_train, dict(axis=[3]), ValueError, r"axis 3 is out of range"),
    (forward_train, dict(axis=[]), ValueError, r"axis must name at least one feature axis"),
    (forward_train, dict(axis=[1, -2]), ValueError, r"axis contains"),
    (forward_train, dict(weight=lambda d: _c(d, 5)), RuntimeError, r"weight has shape \[5\]"),
    (forward_train, dict(weight=lambda d: _c(d).view(3, 1)), RuntimeError, r"weight has shape \[3, 1\]"),
    (forward_train, dict(weight=_i), TypeError, r"weight must be a floating-point tensor"),
    (forward_train, dict(bias=lambda d: _c(d, 15)), RuntimeError, r"bias has shape \[15\]"),
    (forward_train, dict(running_mean=lambda d: _c(d, 4)), RuntimeError, r"running_mean has shape \[4\]"),
    (forward_train, dict(running_var=lambda d: torch.ones(3, device=d, dtype=torch.complex64)), TypeError,
     r"running_var must be a floating-point tensor"),
    (forward_train, dict(running_var=_expanded), ValueError, r"running_var is updated in place, but its elements"),
    (forward_train, dict(running_mean=lambda d: torch.zeros(1, 1, device=d).expand(1, 3, 1)), ValueError,
     r"running_mean is updated in place"),
    (forward_train, dict(input=None), TypeError, r"input must be a tensor, got None"),
    # forward_infer (prepare_forward, evaluation)
    (forward_infer, dict(running_mean=None), ValueError, r"running_mean and running_var are required .*got None and a"),
    (forward_infer, dict(running_var=None), ValueError,
     r"running_mean and running_var are required .*a tensor and None"),
    (forward_infer, dict(eps=-1e-3), ValueError, r"eps must be >= 0, got -0.001"),
    (forward_infer, dict(eps=math.nan), ValueError, r"eps must be finite"),
    (forward_infer, dict(input=lambda d: _i(d, 60).view(SHAPE)), TypeError, r"input must be a floating-point"),
    (forward_infer, dict(input=lambda d: _c(d)), ValueError, r"input must have at least 2 dimensions"),
    (forward_infer, dict(running_var=lambda d: _c(d, 5)), RuntimeError, r"running_var has shape \[5\]"),
    (forward_infer, dict(weight=lambda d: _i(d)), TypeError, r"weight must be a floating-point"),
    # backward (prepare_backward)
    (backward, dict(grad_out=lambda d: _x(d, (4, 3, 4))), RuntimeError, r"grad_out has shape \[4, 3, 4\]"),
    (backward, dict(grad_out=lambda d: _i(d, 60).view(SHAPE)), TypeError, r"grad_out must be a floating-point"),
    (backward, dict(grad_out=lambda d: _c(d), input=lambda d: _c(d)), ValueError,
     r"input must have at least 2 dimensions"),
    (backward, dict(input=lambda d: _x(d, dtype=torch.int32)), TypeError, r"input must be a floating-point"),
    (backward, dict(save_mean=lambda d: _c(d, 5)), RuntimeError, r"save_mean has shape \[5\]"),
    (backward, dict(save_invstd=_i), TypeError, r"save_invstd must be a floating-point"),
    (backward, dict(weight=lambda d: _c(d, 2)), RuntimeError, r"weight has shape \[2\]"),
    (backward, dict(axis=[5]), ValueError, r"axis 5 is out of range"),
    (backward, dict(save_mean=None), TypeError, r"save_mean must be a tensor, got None"),
    (backward, dict(save_invstd=None), TypeError, r"save_invstd must be a tensor, got None"),
    (backward, dict(grad_out=None), TypeError, r"grad_out must be a tensor, got None"),
    # batch_stats (plan_ghosts, expand_mask)
    (batch_stats, dict(ghosts=3), ValueError, r"ghosts=3 must divide the batch size, got a batch of 4"),
    (batch_stats, dict(ghosts=0), ValueError, r"ghosts must be >= 1, got 0"),
    (batch_stats, dict(ghosts=-2), ValueError, r"ghosts must be >= 1, got -2"),
    (batch_stats, dict(ghosts=2 ** 62), ValueError, r"ghosts=4611686018427387904 times the 3 features overflows"),
    (batch_stats, dict(ghosts=2, axis=[0]), ValueError, r"batch dim 0 cannot be a feature axis"),
    (batch_stats, dict(mask=lambda d: torch.ones(4, 1, 5, device=d)), TypeError, r"mask must be a bool"),
    (batch_stats, dict(mask=lambda d: torch.ones(3, dtype=torch.bool, device=d)), RuntimeError,
     r"mask of shape \[3\] does not broadcast"),
    (batch_stats, dict(mask=lambda d: torch.ones(2, 4, 3, 5, dtype=torch.bool, device=d)), RuntimeError,
     r"mask of shape \[2, 4, 3, 5\] does not broadcast"),
    (batch_stats, dict(input=lambda d: _i(d, 60).view(SHAPE)), TypeError, r"input must be a floating-point"),
    (batch_stats, dict(input=lambda d: _c(d)), ValueError, r"input must have at least 2 dimensions"),
    (batch_stats, dict(axis=[-4]), ValueError, r"axis -4 is out of range"),
    (batch_stats, dict(input=None, mask=lambda d: torch.ones(SHAPE, dtype=torch.bool, device=d)), TypeError,
     r"input must be a tensor, got None"),
    # gather_stats (prepare_gather, stat_triple)
    (gather_stats, dict(mean=lambda d: _x(d, (1, 2, 3))), ValueError, r"mean must be \(C,\) or \(W, C\)"),
    (gather_stats, dict(m2=lambda d: _x(d, (2, 4))), RuntimeError, r"mean, m2 and count must have the same shape"),
    (gather_stats, dict(count=lambda d: torch.ones(2, 3, dtype=torch.long, device=d)), TypeError,
     r"count must be a floating-point"),
    (gather_stats, dict(mean=lambda d: torch.ones(2, 3, dtype=torch.long, device=d)), TypeError,
     r"mean must be a floating-point"),
    (gather_stats, dict(eps=0.0), ValueError, r"eps must be finite and > 0, got 0"),
    (gather_stats, dict(eps=math.nan), ValueError, r"eps must be finite and > 0, got nan"),
    (gather_stats, dict(eps=1e-50), ValueError,
     r"gather_stats: eps=1e-50 rounds to 0 in float32, the accumulation type of Float statistics"),
    (gather_stats, dict(running_mean=lambda d: _c(d, 2)), RuntimeError, r"running_mean has shape \[2\]"),
    (gather_stats, dict(running_var=_i), TypeError, r"running_var must be a floating-point"),
    (gather_stats, dict(running_var=_expanded), ValueError, r"running_var is updated in place"),
    (gather_stats, dict(m2=None), TypeError, r"m2 must be a tensor, got None"),
    # normalize (plan_ghosts, check_ghost_entries, prepare_forward)
    (normalize, dict(ghosts=2, axis=[2], mean=lambda d: _c(d, 10).view(5, 2), invstd=lambda d: _c(d, 10), weight=None,
                     bias=None), RuntimeError,
     r"mean has shape \[5, 2\] \(10 elements\) but the input of shape \[2, 2, 3, 5\] has 10 features along axis "
     r"\[1, 3\]; expected shape \[2, 5\], \[10\] or \[1, 2, 1, 5\]"),
    (normalize, dict(mean=lambda d: _c(d, 5)), RuntimeError, r"mean has shape \[5\]"),
    (normalize, dict(invstd=_i), TypeError, r"invstd must be a floating-point"),
    (normalize, dict(weight=lambda d: _c(d, 6)), RuntimeError, r"weight has shape \[6\]"),
    (normalize, dict(bias=lambda d: _c(d).view(1, 1, 3)), RuntimeError, r"bias has shape \[1, 1, 3\]"),
    (normalize, dict(ghosts=2, mean=lambda d: _c(d, 3)), RuntimeError,
     r"mean has shape \[3\] \(3 elements\) .* and ghosts=2: expected ghosts \* C = 6"),
    (normalize, dict(ghosts=2, bias=lambda d: _c(d, 3)), RuntimeError, r"bias has shape \[3\] .* ghosts=2"),
    (normalize, dict(ghosts=3), ValueError, r"ghosts=3 must divide the batch size"),
    (normalize, dict(ghosts=0), ValueError, r"ghosts must be >= 1, got 0"),
    (normalize, dict(input=lambda d: _x(d, dtype=torch.float64).to(torch.int16)), TypeError,
     r"input must be a floating-point"),
    (normalize, dict(mean=None), TypeError, r"normalize: mean must be a tensor, got None"),
    # grad_sums (plan_ghosts, check_grad_out_shape, prepare_backward)
    (grad_sums, dict(grad_out=lambda d: _x(d, (4, 3))), RuntimeError, r"grad_out has shape \[4, 3\]"),
    (grad_sums, dict(grad_out=lambda d: _i(d, 60).view(SHAPE)), TypeError, r"grad_out must be a floating-point"),
    (grad_sums, dict(mean=lambda d: _c(d, 4)), RuntimeError, r"mean has shape \[4\]"),
    (grad_sums, dict(ghosts=2, invstd=lambda d: _c(d, 3)), RuntimeError, r"invstd has shape \[3\] .* ghosts=2"),
    (grad_sums, dict(ghosts=3), ValueError, r"ghosts=3 must divide"),
    (grad_sums, dict(input=lambda d: _c(d), grad_out=lambda d: _c(d)), ValueError,
     r"input must have at least 2 dimensions"),
    (grad_sums, dict(invstd=None), TypeError, r"grad_sums: invstd must be a tensor, got None"),
    # grad_input (plan_masked_ghosts, prepare_backward, feature_tensor of the sums)
    (grad_input, dict(count=lambda d: _c(d, 4)), RuntimeError, r"count has shape \[4\]"),
    (grad_input, dict(sum_dy=_i), TypeError, r"sum_dy must be a floating-point"),
    (grad_input, dict(sum_dy_xmu=lambda d: _c(d, 3).view(3, 1)), RuntimeError, r"sum_dy_xmu has shape \[3, 1\]"),
    (grad_input, dict(mask=lambda d: torch.ones(4, 1, 5, dtype=torch.int32, device=d)), TypeError,
     r"mask must be a bool"),
    (grad_input, dict(mask=lambda d: torch.ones(4, 2, 5, dtype=torch.bool, device=d)), RuntimeError,
     r"mask of shape \[4, 2, 5\]"),
    (grad_input, dict(ghosts=2, sum_dy_xmu=lambda d: _c(d, 3)), RuntimeError,
     r"sum_dy_xmu has shape \[3\] .* ghosts=2"),
    (grad_input, dict(ghosts=2, weight=lambda d: _c(d, 3)), RuntimeError, r"weight has shape \[3\] .* ghosts=2"),
    (grad_input, dict(weight=lambda d: _c(d, 4)), RuntimeError, r"weight has shape \[4\]"),
    (grad_input, dict(grad_out=lambda d: _x(d, (2, 3, 5))), RuntimeError, r"grad_out has shape \[2, 3, 5\]"),
    (grad_input, dict(ghosts=5), ValueError, r"ghosts=5 must divide"),
    (grad_input, dict(sum_dy=None), TypeError, r"grad_input: sum_dy must be a tensor, got None"),
    # keras_forward (batch_stats', keras_coeffs' and normalize's checks in turn)
    (keras_forward, dict(ghosts=3), ValueError, r"ghosts=3 must divide"),
    (keras_forward, dict(gamma=lambda d: _c(d, 4)), RuntimeError, r"keras_coeffs: gamma has shape \[4\]"),
    (keras_forward, dict(moving_stddev=_renorm), ValueError, r"go together \(renorm\)"),
    (keras_forward, dict(eps=0.0), ValueError, r"eps must be finite and > 0"),
    (keras_forward, dict(mask=lambda d: torch.ones(4, 2, 5, dtype=torch.bool, device=d)), RuntimeError,
     r"mask of shape \[4, 2, 5\] does not broadcast"),
    (keras_forward, dict(input=lambda d: _i(d, 60).view(SHAPE)), TypeError, r"input must be a floating-point"),
    (keras_forward, dict(moving_mean=None), TypeError, r"moving_mean must be a tensor, got None"),
    # keras_backward (prepare_ghost_backward, then prepare_keras_grads, named as keras_backward)
    (keras_backward, dict(gamma=lambda d: _c(d, 5)), RuntimeError, r"keras_backward: gamma has shape \[5\]"),
    (keras_backward, dict(d=None), ValueError, r"keras_backward: r and d go together"),
    (keras_backward, dict(mean=lambda d: _c(d, 4)), RuntimeError, r"mean has shape \[4\]"),
    (keras_backward, dict(ghosts=0), ValueError, r"ghosts must be >= 1, got 0"),
    # keras_grads (prepare_keras_grads)
    (keras_grads, dict(ghosts=2, d_scale=lambda d: _c(d, 4), d_shift=lambda d: _c(d, 4)), RuntimeError,
     r"keras_grads: r has shape \[3\] but d_scale has ghosts \* C = 4 entries with ghosts=2, so C = 2"),
    (keras_grads, dict(ghosts=4, d_scale=lambda d: _c(d, 6), d_shift=lambda d: _c(d, 6)), ValueError,
     r"d_scale must be flat with ghosts \* C entries, got shape \[6\] for ghosts=4"),
    (keras_grads, dict(ghosts=0), ValueError, r"keras_grads: ghosts must be >= 1, got 0"),
    (keras_grads, dict(d_shift=lambda d: _c(d, 4)), RuntimeError, r"d_scale and d_shift must have the same shape"),
    (keras_grads, dict(d=None), ValueError, r"r and d go together"),
    (keras_grads, dict(gamma=lambda d: _c(d, 5)), RuntimeError, r"gamma has shape \[5\]"),
    (keras_grads, dict(adj_bias=_i), TypeError, r"adj_bias must be a floating-point"),
    (keras_grads, dict(d_scale=_i), TypeError, r"d_scale must be a floating-point"),
    (keras_grads, dict(d_scale=None), TypeError, r"keras_grads: d_scale must be a tensor, got None"),
    # ghost_backward (plan_ghosts, prepare_backward)
    (ghost_backward, dict(ghosts=2, invstd=lambda d: _c(d, 3)), RuntimeError, r"invstd has shape \[3\] .* ghosts=2"),
    (ghost_backward, dict(ghosts=2, weight=lambda d: _c(d, 3)), RuntimeError, r"weight has shape \[3\] .* ghosts=2"),
    (ghost_backward, dict(mean=lambda d: _c(d, 4)), RuntimeError, r"mean has shape \[4\]"),
    (ghost_backward, dict(grad_out=lambda d: _x(d, (2, 3, 5))), RuntimeError, r"grad_out has shape \[2, 3, 5\]"),
    (ghost_backward, dict(ghosts=3), ValueError, r"ghosts=3 must divide"),
    (ghost_backward, dict(input=lambda d: _i(d, 60).view(SHAPE)), TypeError, r"input must be a floating-point"),
    (ghost_backward, dict(mean=None), TypeError, r"ghost_backward: mean must be a tensor, got None"),
]

for _op in (keras_finalize, keras_coeffs):
    _second = "var" if _op is keras_finalize else "m2"
    REFUSED += [
        (_op, dict(ghosts=0), ValueError, r"ghosts must be >= 1, got 0"),
        (_op, dict(ghosts=2, mean=lambda d: _c(d, 3), second=lambda d: _c(d, 3), count=lambda d: _c(d, 3)),
         ValueError, r"mean must be flat with ghosts \* C entries, got shape \[3\] for ghosts=2"),
        (_op, dict(mean=lambda d: _c(d).view(1, 3), second=lambda d: _c(d).view(1, 3),
                   count=lambda d: _c(d).view(1, 3)), ValueError, r"mean must be flat"),
        (_op, dict(second=lambda d: _c(d, 4)), RuntimeError, rf"mean, {_second} and count must have the same shape"),
        (_op, dict(count=_i), TypeError, r"count must be a floating-point"),
        (_op, dict(second=_i), TypeError, rf"{_second} must be a floating-point"),
        (_op, dict(eps=0.0), ValueError, r"eps must be finite and > 0, got 0"),
        (_op, dict(eps=-1.0), ValueError, r"eps must be finite and > 0, got -1"),
        (_op, dict(eps=math.inf), ValueError, r"eps must be finite and > 0, got inf"),
        (_op, dict(eps=1e-50), ValueError, r"eps=1e-50 rounds to 0 in float32, the accumulation type of Float"),
        (_op, dict(momentum=math.inf), ValueError, r"momentum must be finite, got inf"),
        (_op, dict(renorm_momentum=math.nan), ValueError, r"renorm_momentum must be finite, got nan"),
        (_op, dict(rmin=math.nan), ValueError, r"rmin must be a number, got nan"),
        (_op, dict(rmax=math.nan), ValueError, r"rmax must be a number, got nan"),
        (_op, dict(dmax=-1.0), ValueError, r"dmax must be >= 0, got -1"),
        (_op, dict(dmax=math.nan), ValueError, r"dmax must be >= 0, got nan"),
        (_op, dict(rmin=3.0, rmax=2.0), ValueError, r"rmin must be <= rmax, got rmin=3, rmax=2"),
        (_op, dict(moving_stddev=_renorm), ValueError, r"moving_stddev, renorm_mean and renorm_stddev go together"),
        (_op, dict(moving_stddev=_renorm, renorm_mean=_renorm), ValueError, r"go together \(renorm\)"),
        (_op, dict(renorm_stddev=_renorm), ValueError, r"go together"),
        (_op, dict(moving_mean=lambda d: _c(d, 4)), RuntimeError, r"moving_mean has shape \[4\]"),
        (_op, dict(moving_variance=lambda d: _c(d).view(3, 1)), RuntimeError, r"moving_variance has shape \[3, 1\]"),
        (_op, dict(moving_mean=_i), TypeError, r"moving_mean must be a floating-point"),
        (_op, dict(moving_variance=_expanded), ValueError, r"moving_variance is updated in place, but its elements"),
        (_op, dict(moving_stddev=_renorm, renorm_mean=_renorm, renorm_stddev=lambda d: _c(d, 2)), RuntimeError,
         r"renorm_stddev has shape \[2\]"),
        (_op, dict(moving_mean=None), TypeError, r"moving_mean must be a tensor, got None"),
        (_op, dict(second=None), TypeError, rf"{_second} must be a tensor, got None"),
    ]
REFUSED += [
    (keras_coeffs, dict(gamma=lambda d: _c(d, 5)), RuntimeError, r"gamma has shape \[5\]"),
    (keras_coeffs, dict(adj_bias=_i), TypeError, r"adj_bias must be a floating-point"),
    (keras_coeffs, dict(beta=lambda d: _c(d).view(3, 1)), RuntimeError, r"beta has shape \[3, 1\]"),
]


def _case_id(case):
    op, kw, exc, _ = case
    parts = [f"{k}={'fn' if callable(v) else v}" for k, v in kw.items()]
    return f"{op.__name__}-{exc.__name__}-{','.join(parts)}"


def _outcome(op, kw, device):
    try:
        return op(device, **kw)
    except Exception as e:  # noqa: BLE001  (compared below)
        return e


@pytest.mark.parametrize("case", REFUSED, ids=[_case_id(c) for c in REFUSED])
def test_fake_kernel_refuses_as_the_real_kernel(case):
    op, kw, exc, match = case
    errors = {d: _outcome(op, kw, d) for d in ("cpu", "meta")}
    for d, e in errors.items():
        assert isinstance(e, BaseException), f"{d} accepted the call"
        assert type(e) is exc, f"{d}: {type(e).__name__}: {e}"
    for d in ("cpu", "meta"):
        with pytest.raises(exc, match=match):
            raise errors[d]
    if match not in NEAR_IDENTICAL:
        assert str(errors["meta"]) == str(errors["cpu"])


# The fake kernels validate axis with bn_cuda.ops.normalize_axes (the Python wrappers' check), whose
# message for a repeated axis does not name the dimension.
NEAR_IDENTICAL = {r"axis contains"}


# --- calls both accept: the same output shapes and dtypes --------------------------------------

ACCEPTED = [
    (forward_train, dict()),
    (forward_train, dict(weight=lambda d: _c(d).view(1, 3, 1), running_mean=lambda d: _c(d).view(1, 3, 1))),
    (forward_train, dict(input=lambda d: _x(d, dtype=torch.float64), eps=1e-50)),  # (fp64: no float32 rounding)
    (forward_train, dict(input=lambda d: _x(d, dtype=torch.bfloat16), running_var=lambda d: _c(d, dtype=torch.half))),
    (forward_train, dict(axis=[1, 2], weight=lambda d: _c(d, 15), bias=lambda d: _c(d, 15).view(3, 5),
                         running_mean=None, running_var=None)),
    (forward_infer, dict(eps=0.0)),
    (forward_infer, dict(running_var=_expanded)),  # (read, not updated: an expanded tensor is fine)
    (backward, dict(grad_out=lambda d: _x(d, dtype=torch.float64), weight=None)),
    (backward, dict(output_mask=[True, False, True], input=lambda d: _x(d, dtype=torch.float16),
                    grad_out=lambda d: _x(d, dtype=torch.float16))),
    (batch_stats, dict(mask=lambda d: torch.ones(4, 1, 5, dtype=torch.bool, device=d))),
    (batch_stats, dict(mask=lambda d: torch.ones(5, dtype=torch.uint8, device=d), ghosts=2)),
    (batch_stats, dict(ghosts=2, axis=[2])),
    (batch_stats, dict(ghosts=4, axis=[1, 2])),
    (batch_stats, dict(input=lambda d: _x(d, (0, 3, 5)), ghosts=7)),  # (an empty batch: any ghost count)
    (gather_stats, dict(running_mean=lambda d: _c(d).view(1, 3), running_var=None)),
    (gather_stats, dict(mean=lambda d: _c(d), m2=lambda d: _c(d), count=lambda d: _c(d, dtype=torch.half))),
    (gather_stats, dict(momentum=math.inf)),  # (gather_stats does not check its momentum)
    # float64 statistics: no float32 rounding of eps
    (gather_stats, dict(mean=lambda d: _c(d, dtype=torch.float64), m2=lambda d: _c(d, dtype=torch.float64),
                        count=lambda d: _c(d, dtype=torch.float64), eps=1e-50)),
    (normalize, dict(weight=None, bias=lambda d: _c(d).view(1, 3, 1))),
    (normalize, dict(ghosts=2)),
    # ghost batches split next to the features: (G, C) and the split input's Keras shape are accepted
    (normalize, dict(ghosts=2, mean=lambda d: _c(d, 6).view(2, 3), invstd=lambda d: _c(d, 6).view(1, 2, 3, 1))),
    # ghost rows: a non-channels-last layout of the same shape splits, and takes (G, C)
    (normalize, dict(ghosts=2, axis=[2], input=lambda d: _x(d, (4, 5, 3)).transpose(1, 2),
                     mean=lambda d: _c(d, 10).view(2, 5), invstd=lambda d: _c(d, 10), weight=None, bias=None)),
    # ghost rows (channels-last: features innermost) take the split forms too
    (normalize, dict(ghosts=2, axis=[2], mean=lambda d: _c(d, 10).view(2, 5), invstd=lambda d: _c(d, 10).view(1, 2, 1, 5),
                     weight=None, bias=None)),
    (grad_sums, dict(ghosts=4)),
    (grad_sums, dict(mean=lambda d: _c(d).view(1, 3, 1), grad_out=lambda d: _x(d, dtype=torch.float64))),
    (grad_input, dict(mask=lambda d: torch.ones(4, 1, 1, dtype=torch.bool, device=d), ghosts=2)),
    (grad_input, dict(weight=None)),
    (ghost_backward, dict()),
    (keras_grads, dict()),
    (keras_backward, dict()),
    (keras_backward, dict(ghosts=2, r=None, d=None, adj_scale=None, output_mask=[False, True, True, False, True])),
    (keras_forward, dict()),
    (keras_forward, dict(ghosts=2, moving_stddev=_renorm, renorm_mean=_renorm, renorm_stddev=_renorm, rmax=2.0,
                         mask=lambda d: torch.ones(4, 1, 5, dtype=torch.bool, device=d), always_update=True)),
    (keras_forward, dict(axis=[2], ghosts=4, gamma=lambda d: _c(d, 5), beta=None, adj_scale=lambda d: _c(d, 5),
                         adj_bias=lambda d: _c(d, 5), moving_mean=lambda d: _c(d, 5), moving_variance=lambda d: _c(d, 5))),
    (keras_forward, dict(input=lambda d: _x(d, (0, 3, 5)), ghosts=2)),
    (keras_grads, dict(ghosts=3, d_scale=lambda d: _c(d, 9), d_shift=lambda d: _c(d, 9), r=None, d=None, gamma=None,
                       output_mask=[True, True, False, True])),
    (keras_grads, dict(d_scale=lambda d: _c(d, dtype=torch.float64), d_shift=lambda d: _c(d, dtype=torch.half),
                       adj_scale=lambda d: _c(d).view(1, 3), beta=False)),
    (ghost_backward, dict(ghosts=2, weight=None, output_mask=[False, True, True])),
    (ghost_backward, dict(ghosts=4, axis=[2], input=lambda d: _x(d, (4, 5, 3)), grad_out=lambda d: _x(d, (4, 5, 3)),
                          output_mask=[True, False, False])),
    (ghost_backward, dict(input=lambda d: _x(d, (0, 3, 5)), grad_out=lambda d: _x(d, (0, 3, 5)), ghosts=2)),
    (keras_finalize, dict()),
    (keras_finalize, dict(ghosts=2, moving_mean=lambda d: _c(d).view(1, 3), rmin=0.5, rmax=0.5, dmax=0.0)),
    (keras_finalize, dict(moving_stddev=_renorm, renorm_mean=_renorm, renorm_stddev=_renorm, rmin=-math.inf)),
    (keras_coeffs, dict(ghosts=4, gamma=None, adj_scale=lambda d: _c(d).view(1, 3))),
    (keras_coeffs, dict(moving_stddev=_renorm, renorm_mean=_renorm, renorm_stddev=_renorm, dmax=math.inf)),
    (keras_coeffs, dict(mean=lambda d: _c(d, dtype=torch.float64), second=lambda d: _c(d, dtype=torch.float64),
                        count=lambda d: _c(d, dtype=torch.float64), eps=1e-50)),
]


@pytest.mark.parametrize("case", ACCEPTED, ids=[_case_id((c[0], c[1], object, None)) for c in ACCEPTED])
def test_fake_kernel_accepts_as_the_real_kernel(case):
    op, kw = case
    outs = {d: _outcome(op, kw, d) for d in ("cpu", "meta")}
    for d, out in outs.items():
        assert not isinstance(out, BaseException), f"{d} refused: {type(out).__name__}: {out}"
    cpu, meta = ((o,) if isinstance(o, torch.Tensor) else tuple(o) for o in (outs["cpu"], outs["meta"]))
    assert [(t.shape, t.dtype) for t in meta] == [(t.shape, t.dtype) for t in cpu]


@pytest.mark.parametrize("op", ["gather_stats", "keras_finalize", "keras_coeffs"])
@pytest.mark.parametrize("layout", ["same", "overlapping", "disjoint"])
def test_updated_tensors_sharing_memory(op, layout):
    """check_disjoint: statistics updated in place must not share memory (the same tensor, or
    overlapping slices of one buffer); disjoint slices of one buffer are fine."""
    def call(d):
        buf = torch.ones(8, device=d)
        a, b = {"same": (buf[:3], buf[:3]), "overlapping": (buf[:3], buf[2:5]), "disjoint": (buf[:3], buf[3:6])}[layout]
        if layout == "same":
            b = a
        if op == "gather_stats":
            return gather_stats(d, running_mean=a, running_var=b)
        return (keras_finalize if op == "keras_finalize" else keras_coeffs)(d, moving_mean=a, moving_variance=b)

    first, second = ("running_mean", "running_var") if op == "gather_stats" else ("moving_mean", "moving_variance")
    outcomes = {d: _outcome(call, {}, d) for d in ("cpu", "meta")}
    for d, out in outcomes.items():
        if layout == "disjoint":
            assert not isinstance(out, BaseException), f"{d}: {out}"
        else:
            assert isinstance(out, ValueError), f"{d}: {out!r}"
            assert f"{first} and {second} are updated in place but share memory" in str(out)


def test_compiled_ghost_count_is_checked_without_specializing():
    """Under torch.compile with a dynamic batch and a symbolic ghost count, the fake kernels check
    the ghost entries and the divisibility without a graph per batch size; a batch the ghost count
    does not divide is refused while tracing, naming ghosts."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def step(x, vbs: int):
        ghosts = x.shape[0] // vbs
        mean, m2, count = staged.batch_stats(x, [1], None, ghosts)
        invstd = torch.rsqrt(m2 / count.clamp_min(1) + 1e-3)
        return staged.normalize(x, mean, invstd, None, None, [1], ghosts)

    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=True)
    for n in (4, 6, 10, 14):
        x = torch.randn(n, 3, 5)
        torch.testing.assert_close(compiled(x, 2), step(x, 2))
    assert counter.frame_count == 1

    def fixed(x):
        return staged.batch_stats(x, [1], None, 3)[0]

    fn = torch.compile(fixed, backend="eager", fullgraph=True, dynamic=True)
    fn(torch.randn(6, 3, 5))
    with pytest.raises(RuntimeError, match=r"ghosts=3 must divide the batch size, got a batch of 7"):
        fn(torch.randn(7, 3, 5))


def test_compiled_call_is_refused_while_tracing():
    """A call the real kernel refuses is refused when torch.compile traces it (the fake kernel),
    with the real kernel's message, before anything runs."""
    rm = torch.zeros(3)

    def f(x, w):
        return bn_cuda.ops.batch_norm_train(x, w, None, rm, torch.ones(1).expand(3), 0.1, 1e-5, [1])[0]

    with pytest.raises(ValueError, match="running_var is updated in place"):
        f(torch.randn(4, 3, 5), torch.ones(3))
    with pytest.raises(RuntimeError, match=r"running_var is updated in place"):
        torch.compile(f, backend="eager", fullgraph=True)(torch.randn(4, 3, 5), torch.ones(3))
    with pytest.raises(RuntimeError, match=r"weight has shape \[5\]"):
        torch.compile(f, backend="eager", fullgraph=True)(torch.randn(4, 3, 5), torch.ones(5))
    assert torch.equal(rm, torch.zeros(3))
