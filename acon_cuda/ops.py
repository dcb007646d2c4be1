"""Python face of the acon ops: the public wrapper, fake kernels, autograd."""

import torch
from torch import Tensor

from . import reference

__all__ = ["acon_c", "cpu_kernel_isa"]


def acon_c(x: Tensor, p1: Tensor, p2: Tensor, beta: Tensor, channel_dim: int = 1) -> Tensor:
    """ACON-C: ``(p1 - p2) * x * sigmoid(beta * (p1 - p2) * x) + p2 * x``.

    Args:
        x: float32, float64, float16 or bfloat16 tensor of rank >= 2.
        p1, p2: C values each (any shape, e.g. ``(C,)`` or ``(1, C, 1, 1)``),
            C = ``x.shape[channel_dim]``.
        beta: C values (shared over the batch) or N*C values in (N, C) order,
            one per sample and channel (Meta-ACON), N = ``x.shape[0]``.
        channel_dim: the channel axis; may be negative (-1 for features last).

    x and the parameters must be on one device: CPU, or CUDA where the
    extension was built with its CUDA kernels. Parameters may be float32
    while x is float16/bfloat16: the arithmetic is
    float32 and the result keeps x's dtype. The result has x's shape and
    memory format (channels_last stays channels_last). Differentiable in x,
    p1, p2 and beta; each gradient has its input's shape and dtype.
    """
    return torch.ops.acon.acon_c_forward(x, p1, p2, beta, channel_dim)


def cpu_kernel_isa() -> str:
    """Which build of the CPU kernels runs on this machine: AVX512, AVX2 or DEFAULT.

    It follows PyTorch's own choice (``torch.backends.cpu.get_cpu_capability()``),
    so ``ATEN_CPU_CAPABILITY=avx2`` or ``=default`` selects a narrower build.
    """
    return torch.ops.acon.cpu_kernel_isa()


@torch.library.register_fake("acon::acon_c_forward")
def _acon_c_forward_fake(x, p1, p2, beta, channel_dim):
    torch.ops.acon.acon_c_check_args(x, p1, p2, beta, channel_dim)
    return torch.empty_like(x)


@torch.library.register_fake("acon::acon_c_backward")
def _acon_c_backward_fake(grad_y, x, p1, p2, beta, channel_dim):
    torch.ops.acon.acon_c_check_args(x, p1, p2, beta, channel_dim, grad_y)

    def grad_like(t):
        return t.new_empty(t.shape)

    return torch.empty_like(x), grad_like(p1), grad_like(p2), grad_like(beta)


def _acon_c_setup_context(ctx, inputs, output):
    x, p1, p2, beta, channel_dim = inputs
    # Only the inputs are kept: the backward recomputes sigmoid from x.
    ctx.save_for_backward(x, p1, p2, beta)
    ctx.channel_dim = channel_dim


def _acon_c_backward(ctx, grad_y):
    x, p1, p2, beta = ctx.saved_tensors
    if torch.is_grad_enabled():
        # create_graph=True (double backward, e.g. a gradient penalty): the
        # gradients must be differentiable themselves, so take them through
        # the plain-PyTorch formula. Ordinary backward passes never get here.
        return (*_differentiable_grads(grad_y, x, p1, p2, beta, ctx), None)
    grads = torch.ops.acon.acon_c_backward(grad_y, x, p1, p2, beta, ctx.channel_dim)
    return (*grads, None)


def _differentiable_grads(grad_y, x, p1, p2, beta, ctx):
    inputs = (x, p1, p2, beta)
    wanted = [t for t, need in zip(inputs, ctx.needs_input_grad) if need]
    y = reference.acon_c(x, p1, p2, beta, ctx.channel_dim)
    found = iter(torch.autograd.grad(y, wanted, grad_y, create_graph=True, allow_unused=True))
    return [next(found) if need else None for need in ctx.needs_input_grad[:4]]


def _acon_c_backward_backward(ctx, *grads):
    raise RuntimeError(
        "acon::acon_c_backward is not differentiable; differentiate acon_cuda.acon_c "
        "(its backward supports create_graph=True) instead of calling the op directly"
    )


torch.library.register_autograd(
    "acon::acon_c_forward", _acon_c_backward, setup_context=_acon_c_setup_context
)
torch.library.register_autograd("acon::acon_c_backward", _acon_c_backward_backward)
