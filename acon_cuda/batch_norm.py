"""BatchNorm followed by ACON-C as one op (the pairs ``fuse_batchnorm`` makes).

``batch_norm_acon_c(x, running_mean, running_var, weight, bias, training,
momentum, eps, p1, p2, beta)`` equals
``acon_c(F.batch_norm(x, running_mean, running_var, weight, bias, training,
momentum, eps), p1, p2, beta, channel_dim=1)``, running statistics updated
the same way, without the BatchNorm's output in memory: the forward is a
statistics pass and one element-wise pass, the backward a sums pass and one
element-wise pass that recompute the normalised value from x and the
per-channel statistics, and x is the only x-sized tensor kept for the
backward (docs/batch_norm.md).

Which path a call takes:

=====================================  ==========================================
when                                   what runs
=====================================  ==========================================
CPU tensors, eager or torch.compile    the fused ops (:class:`BatchNormAconCFunction`)
another device (CUDA)                  ``F.batch_norm``, then the fused ACON-C op
a torch.func transform, ONNX export,   ``F.batch_norm``, then ``acon_c``
torch.export, an empty input
backward with ``create_graph=True``    the gradients of the two-op form, so
                                       that they are differentiable
=====================================  ==========================================
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference
from .ops import acon_c

__all__ = ["BatchNormAconCFunction", "batch_norm_acon_c", "batch_norm_acon_c_plain"]

_forward_op = torch.ops.acon.batch_norm_acon_c_forward.default
_backward_op = torch.ops.acon.batch_norm_acon_c_backward.default


def batch_norm_acon_c_plain(x, running_mean, running_var, weight, bias, training, momentum, eps, p1, p2, beta):
    """The pair as two ops: BatchNorm, then ACON-C."""
    z = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    return acon_c(z, p1, p2, beta, 1)


class BatchNormAconCFunction(torch.autograd.Function):
    """The fused forward and backward ops as one autograd node. Saves x,
    the parameters and the per-channel statistics (no x-sized tensor but
    x); the backward computes only what ``ctx.needs_input_grad`` asks for.
    Classic form (``forward(ctx, ...)``): its ``apply`` costs less per call
    than the ``setup_context`` form, and dynamo traces it as well."""

    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, training, momentum, eps, p1, p2, beta):
        y, save_mean, save_invstd = _forward_op(
            x, weight, bias, running_mean, running_var, p1, p2, beta, training, momentum, eps
        )
        ctx.save_for_backward(x, weight, bias, save_mean, save_invstd, p1, p2, beta)
        ctx.training = training
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bias, save_mean, save_invstd, p1, p2, beta = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():
            # create_graph=True: differentiable gradients, from the two-op
            # form recomputed on the saved tensors.
            return _differentiable_grads(ctx, grad_y, x, weight, bias, save_mean, save_invstd, p1, p2, beta)
        want_x, want_norm, want_acon = needs[0], needs[3] or needs[4], needs[8] or needs[9] or needs[10]
        grads = _backward_op(
            grad_y,
            x,
            weight,
            bias,
            save_mean,
            save_invstd,
            p1,
            p2,
            beta,
            ctx.training,
            [want_x, want_norm, want_acon],
        )
        # The op's outputs are the gradients of inputs 0, 3, 4, 8, 9, 10.
        out = [None] * 11
        for position, grad in zip(_GRAD_POSITIONS, grads):
            if needs[position]:
                out[position] = grad
        return tuple(out)


# Where forward's inputs x, weight, bias, p1, p2, beta stand in its argument list.
_GRAD_POSITIONS = (0, 3, 4, 8, 9, 10)


def _differentiable_grads(ctx, grad_y, x, weight, bias, save_mean, save_invstd, p1, p2, beta):
    """The gradients of the two-op form at the saved inputs, themselves
    differentiable (double backward): with batch statistics they are taken
    again from x by differentiable ops; otherwise the saved running ones
    are constants."""
    inputs = (x, weight, bias, p1, p2, beta)
    wanted = [i for i, pos in enumerate(_GRAD_POSITIONS) if ctx.needs_input_grad[pos] and inputs[i] is not None]
    shape = [1, -1] + [1] * (x.dim() - 2)
    if ctx.training:
        var, mean = torch.var_mean(x, dim=[d for d in range(x.dim()) if d != 1], unbiased=False, keepdim=True)
        z = (x - mean) * torch.rsqrt(var + ctx.eps)
    else:
        z = (x - save_mean.to(x.dtype).view(shape)) * save_invstd.to(x.dtype).view(shape)
    if weight is not None:
        z = z * weight.view(shape)
    if bias is not None:
        z = z + bias.view(shape)
    y = reference.acon_c(z, p1, p2, beta, 1)
    got = torch.autograd.grad(y, [inputs[i] for i in wanted], grad_y, create_graph=True, allow_unused=True)
    out = [None] * 11
    for i, g in zip(wanted, got):
        out[_GRAD_POSITIONS[i]] = g if g is not None else torch.zeros_like(inputs[i])
    return tuple(out)


def _fused_serves(x: Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.numel() > 0
        and not torch.onnx.is_in_onnx_export()
        and not torch.compiler.is_exporting()
        and not torch._C._are_functorch_transforms_active()
    )


def batch_norm_acon_c(
    x: Tensor,
    running_mean,
    running_var,
    weight,
    bias,
    training: bool,
    momentum: float,
    eps: float,
    p1: Tensor,
    p2: Tensor,
    beta: Tensor,
) -> Tensor:
    """``F.batch_norm`` (same arguments, same running-statistics update),
    then ACON-C on channel axis 1 with per-channel ``p1``, ``p2``, ``beta``
    (C values each, any shape that holds them, such as (1, C, 1, 1)).

    ``training`` means batch statistics, as in ``F.batch_norm``; ``momentum``
    is the running statistics' update factor (a number: resolve ``None`` as
    nn.BatchNorm does). x: float32, float64, float16 or bfloat16, rank >= 2,
    channels on axis 1, any memory format (the result keeps it); parameters
    and running statistics float32 or x's dtype. The fused kernels serve
    CPU tensors; see the module docstring for the other paths.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"batch_norm_acon_c: x must be a torch.Tensor, got {type(x).__name__}")
    if training and x.dim() >= 2:
        F._verify_batch_size(x.size())  # nn.BatchNorm's own check and message
    args = (x, running_mean, running_var, weight, bias, training, momentum, eps, p1, p2, beta)
    if not _fused_serves(x):
        return batch_norm_acon_c_plain(*args)
    return BatchNormAconCFunction.apply(*args)


@torch.library.register_fake("acon::batch_norm_acon_c_forward")
def _forward_fake(x, weight, bias, running_mean, running_var, p1, p2, beta, training, momentum, eps):
    torch.ops.acon.acon_c_check_args(x, p1, p2, beta, 1)
    stats = x.new_empty((x.shape[1],), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


@torch.library.register_fake("acon::batch_norm_acon_c_backward")
def _backward_fake(grad_y, x, weight, bias, save_mean, save_invstd, p1, p2, beta, training, output_mask):
    torch.ops.acon.acon_c_check_args(x, p1, p2, beta, 1, grad_y)
    want_x, want_norm, want_acon = output_mask

    def grad_like(t, wanted):
        return t.new_empty(t.shape) if wanted and t is not None else x.new_empty((0,))

    return (
        torch.empty_like(x) if want_x else x.new_empty((0,)),
        grad_like(weight, want_norm),
        grad_like(bias, want_norm),
        grad_like(p1, want_acon),
        grad_like(p2, want_acon),
        grad_like(beta, want_acon),
    )
