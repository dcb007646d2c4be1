"""Meta-ACON's computation: ``y = acon_c(x, p1, p2, beta)`` with
``beta = sigmoid(bn2(fc2(bn1(fc1(mean(x))))))`` per sample and channel.

The paper's code runs the generator on (N, C, 1, 1) tensors with 1x1
convolutions; here the convolutions are matrix products on views of their
weights (a 1x1 convolution's backward on (N, C, 1, 1) costs several times
more), and the BatchNorms run on the (N, C) values with the modules' own
parameters, buffers and rules (momentum, ``momentum=None``,
``track_running_stats``, eval mode). Two forms compute the same thing:

- :func:`meta_acon_c_plain`: ordinary differentiable PyTorch ops around the
  fused acon op, for ``torch.compile``, ``torch.export``, ``torch.func``,
  autocast, ONNX export and ``impl="reference"``;
- :class:`MetaAconCFunction`: generator and activation as one autograd node
  whose backward runs the fused backward op, then the generator's gradients
  in a handful of ATen calls, and adds the mean's gradient into the x-sized
  gradient in place. Plain eager calls use it: on small maps a dozen
  autograd nodes of small ops would cost more than the activation itself.

Both take the mean as a sum and fold 1/count into the (N, C)-sized work, so
the mean's gradient never exists at x's size.
"""

import math
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops, reference

__all__ = ["MetaAconCFunction", "meta_acon_c", "meta_acon_c_plain"]

_forward_op = torch.ops.acon.acon_c_forward.default
_backward_op = torch.ops.acon.acon_c_backward.default
_sigmoid_backward = torch.ops.aten.sigmoid_backward.default
_batch_norm_backward = torch.ops.aten.native_batch_norm_backward.default


def _reduced_axes(x: Tensor, cdim: int) -> List[int]:
    return [i for i in range(1, x.dim()) if i != cdim]


def _mean(x: Tensor, cdim: int) -> Tensor:
    """x averaged over every axis but batch and channel, (N, C), as a sum and
    a division on (N, C): the sum's gradient is an expanded view, where
    ``x.mean``'s would be divided at x's size."""
    other = _reduced_axes(x, cdim)
    return x.sum(dim=other) / math.prod([x.shape[i] for i in other]) if other else x


def batch_norm_mode(bn):
    """(running_mean, running_var, use_batch_statistics, momentum), as
    ``nn.BatchNorm2d.forward`` chooses them, counting the batch in
    ``num_batches_tracked`` as that forward does.
    Buffers are read from ``bn._buffers``: ``nn.Module.__getattr__`` costs
    about a microsecond per access here."""
    buffers = bn._buffers
    running_mean, running_var = buffers.get("running_mean"), buffers.get("running_var")
    momentum = 0.0 if bn.momentum is None else bn.momentum
    tracked = buffers.get("num_batches_tracked")
    if bn.training and bn.track_running_stats and tracked is not None:
        tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            momentum = 1.0 / float(tracked)
    use_batch = bn.training or (running_mean is None and running_var is None)
    if bn.training and not bn.track_running_stats:
        running_mean = running_var = None
    return running_mean, running_var, use_batch, momentum


def _generator_params(module):
    """fc1.weight, fc1.bias, fc2.weight, fc2.bias, then bn1's and bn2's
    weight and bias with norm=True."""
    fc1, fc2 = module.fc1._parameters, module.fc2._parameters
    params = [fc1["weight"], fc1["bias"], fc2["weight"], fc2["bias"]]
    if module.norm:
        bn1, bn2 = module.bn1._parameters, module.bn2._parameters
        params += [bn1["weight"], bn1["bias"], bn2["weight"], bn2["bias"]]
    return params


def _beta(x, cdim, w1, b1, w2, b2, norm1, norm2) -> Tensor:
    """The generator in differentiable ops; norm1 / norm2 normalise (N, .)
    values, or are None."""
    h = F.linear(_mean(x, cdim), w1.flatten(1), b1)
    if norm1 is not None:
        h = norm1(h)
    h = F.linear(h, w2.flatten(1), b2)
    if norm2 is not None:
        h = norm2(h)
    return torch.sigmoid(h)


def _module_norm(bn):
    def norm(h):
        running_mean, running_var, use_batch, momentum = batch_norm_mode(bn)
        return F.batch_norm(h, running_mean, running_var, bn.weight, bn.bias, use_batch, momentum, bn.eps)

    return norm


def meta_acon_c_plain(module, x: Tensor, cdim: int, acon_c) -> Tensor:
    """Meta-ACON in ordinary ops (the generator) around ``acon_c``."""
    norm1, norm2 = (_module_norm(module.bn1), _module_norm(module.bn2)) if module.norm else (None, None)
    beta = _beta(x, cdim, *_generator_params(module)[:4], norm1, norm2)
    if beta.dtype != x.dtype:
        beta = beta.float()  # e.g. float32 x under autocast: the op takes float32
    return acon_c(x, module.p1, module.p2, beta, cdim)


def _batch_norm_forward(bn, h):
    """BatchNorm of (N, .) values, updating bn's running statistics as its
    forward does; returns the output and what its backward needs."""
    running_mean, running_var, use_batch, momentum = batch_norm_mode(bn)
    weight, bias = bn._parameters["weight"], bn._parameters["bias"]
    out, save_mean, save_invstd = torch.native_batch_norm(
        h, weight, bias, running_mean, running_var, use_batch, momentum, bn.eps
    )
    return out, (h, running_mean, running_var, save_mean, save_invstd, use_batch, bn.eps)


class MetaAconCFunction(torch.autograd.Function):
    """Meta-ACON as one autograd node (classic form: cheap to apply).

    Inputs: the MetaAconC module, x, the channel axis, p1, p2, then the
    generator's parameters (see ``_generator_params``). Under
    ``create_graph=True`` the backward recomputes everything in ordinary
    differentiable ops, with the normalisation the forward used and the
    running statistics left alone, so the gradients are differentiable.
    """

    @staticmethod
    def forward(ctx, module, x, cdim, p1, p2, w1, b1, w2, b2, *bn_params):
        other = _reduced_axes(x, cdim)
        count = math.prod([x.shape[i] for i in other])
        total = x.sum(dim=other) if other else x
        a1 = torch.addmm(b1, total, w1.flatten(1).t(), alpha=1.0 / count)
        steps = (None, None)
        if module.norm:
            a1, step1 = _batch_norm_forward(module.bn1, a1)
        h = torch.addmm(b2, a1, w2.flatten(1).t())
        if module.norm:
            h, step2 = _batch_norm_forward(module.bn2, h)
            steps = (step1, step2)
        beta = torch.sigmoid(h)
        ctx.cdim, ctx.count, ctx.norm, ctx.steps = cdim, count, module.norm, steps
        ctx.save_for_backward(x, p1, p2, w1, b1, w2, b2, *bn_params, total, a1, beta)
        return _forward_op(x, p1, p2, beta, cdim)

    @staticmethod
    def backward(ctx, grad_y):
        saved = ctx.saved_tensors
        x, p1, p2, w1, b1, w2, b2 = saved[:7]
        bn_params = saved[7:-3]
        total, a1, beta = saved[-3:]
        if torch.is_grad_enabled():
            return _differentiable_grads(ctx, grad_y, x, p1, p2, w1, b1, w2, b2, *bn_params)
        needs = ctx.needs_input_grad
        want_x = needs[1]
        want_generator = want_x or any(needs[5:])
        dx, dp1, dp2, dbeta = _backward_op(
            grad_y, x, p1, p2, beta, ctx.cdim, [want_x, needs[3] or needs[4] or want_generator]
        )
        grads = [None] * len(needs)
        grads[3], grads[4] = (dp1, dp2) if needs[3] or needs[4] else (None, None)
        if not want_generator:
            grads[1] = dx if want_x else None
            return tuple(grads)
        step1, step2 = ctx.steps
        want_bn = any(needs[9:])
        grad = _sigmoid_backward(dbeta.view(beta.shape), beta)
        if step2 is not None:
            grad, grads[11], grads[12] = _batch_norm_backward(
                grad, step2[0], bn_params[2], *step2[1:], [True, want_bn, want_bn]
            )
        if needs[7]:
            grads[7] = grad.t().mm(a1).view(w2.shape)
        if needs[8]:
            grads[8] = grad.sum(0)
        grad = grad.mm(w2.flatten(1))
        if step1 is not None:
            grad, grads[9], grads[10] = _batch_norm_backward(
                grad, step1[0], bn_params[0], *step1[1:], [True, want_bn, want_bn]
            )
        if needs[6]:
            grads[6] = grad.sum(0)
        grad = grad * (1.0 / ctx.count)  # the mean's 1/count, applied once at (N, hidden)
        if needs[5]:
            # (total^T grad)^T: the product with the narrow output; grad^T
            # total (a wide output) ran 3x slower on 2 threads here.
            grads[5] = total.t().mm(grad).t().view(w1.shape)
        if want_x:
            # The mean's gradient, constant along the reduced axes, added in
            # place into the acon op's dx by one broadcasting pass.
            shape = [1] * x.dim()
            shape[0], shape[ctx.cdim] = x.shape[0], x.shape[ctx.cdim]
            grads[1] = dx.add_(grad.mm(w1.flatten(1)).view(shape))
        return tuple(grads)


def _differentiable_grads(ctx, grad_y, x, p1, p2, w1, b1, w2, b2, *bn_params):
    """The gradients as differentiable tensors (double backward)."""

    def norm(step, weight, bias):
        _, running_mean, running_var, _, _, use_batch, eps = step
        if use_batch:
            return lambda h: F.batch_norm(h, None, None, weight, bias, True, 0.0, eps)
        return lambda h: F.batch_norm(h, running_mean, running_var, weight, bias, False, 0.0, eps)

    norms = (None, None)
    if ctx.norm:
        g1, c1, g2, c2 = bn_params
        norms = (norm(ctx.steps[0], g1, c1), norm(ctx.steps[1], g2, c2))
    inputs = [None, x, None, p1, p2, w1, b1, w2, b2, *bn_params]
    wanted = [t for t, need in zip(inputs, ctx.needs_input_grad) if need]
    y = reference.acon_c(x, p1, p2, _beta(x, ctx.cdim, w1, b1, w2, b2, *norms), ctx.cdim)
    grads = iter(torch.autograd.grad(y, wanted, grad_y, create_graph=True, allow_unused=True))
    return tuple(next(grads) if need else None for need in ctx.needs_input_grad)


def meta_acon_c(module, x: Tensor, cdim: int) -> Tensor:
    """The fused Meta-ACON of ``module`` (a MetaAconC) on x."""
    if (
        torch.compiler.is_compiling()
        or torch._C._are_functorch_transforms_active()
        or torch.onnx.is_in_onnx_export()
        or torch.is_autocast_enabled(x.device.type)
    ):
        # Tracing, transforms, export and autocast need ordinary ops.
        return meta_acon_c_plain(module, x, cdim, ops.acon_c)
    return MetaAconCFunction.apply(module, x, cdim, module.p1, module.p2, *_generator_params(module))
