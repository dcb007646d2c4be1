"""Python face of the acon ops: the public wrapper (a torch.autograd.Function),
fake kernels and vmap rules.

Which autograd path a call of :func:`acon_c` takes:

=====================================  ==========================================
when                                   what runs
=====================================  ==========================================
plain eager call                       :class:`AconCEagerFunction` (classic form:
                                       the cheapest ``apply``)
torch.compile / dynamo tracing         :class:`AconCFunction` (``setup_context``
                                       form, which dynamo traces)
a torch.func transform is active       :class:`AconCFunctionWithJvp`, and the
                                       ops' vmap rules below
ONNX export                            ``reference.acon_c`` (standard operators)
backward with ``create_graph=True``    ``reference.acon_c_backward`` (gradients
                                       that are differentiable)
``torch.ops.acon.acon_c_forward``      the ops' C++ autograd kernel
called directly (exported programs)    (csrc/acon_c_autograd.cpp)
=====================================  ==========================================

Every path but the reference ones runs the fused kernels, forward and
backward; MetaAconC's paths are listed in ``meta_acon.py``."""

import torch
from torch import Tensor

from . import reference

__all__ = ["AconCEagerFunction", "AconCFunction", "AconCFunctionWithJvp", "acon_c", "cpu_kernel_isa"]

# The OpOverloads themselves: calling them skips the overload resolution of
# torch.ops.acon.acon_c_forward(...) on every call.
_forward_op = torch.ops.acon.acon_c_forward.default
_backward_op = torch.ops.acon.acon_c_backward.default


class AconCFunction(torch.autograd.Function):
    """The fused ACON-C forward and backward ops as one autograd node.

    Only the inputs are saved; the backward recomputes the sigmoid from x.
    The backward computes only what ``ctx.needs_input_grad`` asks for (frozen
    ACON parameters skip the parameter sums; a frozen x skips writing dx).
    With ``create_graph=True`` (double backward) the gradients come from the
    plain-PyTorch formula, so that they are differentiable themselves.
    ``torch.func``: ``vmap`` runs the ops' vmap rules (the fused kernel when
    only x is batched, the reference formula vectorised otherwise);
    forward mode (``jvp``, ``jacfwd``) is :class:`AconCFunctionWithJvp`.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, p1, p2, beta, channel_dim):
        return _forward_op(x, p1, p2, beta, channel_dim)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, p1, p2, beta, channel_dim = inputs
        ctx.save_for_backward(x, p1, p2, beta)
        ctx.channel_dim = channel_dim

    @staticmethod
    def backward(ctx, grad_y):
        x, p1, p2, beta = ctx.saved_tensors
        return (*_acon_c_grads(ctx, grad_y, x, p1, p2, beta), None)


class AconCFunctionWithJvp(AconCFunction):
    """:class:`AconCFunction` with forward-mode AD (``torch.func.jvp``,
    ``jacfwd``): what ``acon_c`` uses under the ``torch.func`` transforms.
    Dynamo cannot trace a Function with a custom ``jvp``, so compiled code
    gets :class:`AconCFunction`."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        AconCFunction.setup_context(ctx, inputs, output)
        ctx.save_for_forward(*inputs[:4])

    @staticmethod
    def jvp(ctx, x_t, p1_t, p2_t, beta_t, _):
        x, p1, p2, beta = ctx.saved_tensors
        return reference.acon_c_jvp(x, p1, p2, beta, ctx.channel_dim, x_t, p1_t, p2_t, beta_t)


class AconCEagerFunction(torch.autograd.Function):
    """The same node in the classic form (``forward(ctx, ...)``), for plain
    eager calls: with a ``setup_context``, ``Function.apply`` binds the
    arguments through ``inspect.signature`` on every call, which costs about
    40-70 us here, more than the tiny tensors' kernels. Same backward and
    jvp; no torch.func support (acon_c switches to :class:`AconCFunctionWithJvp`
    when a transform is active)."""

    @staticmethod
    def forward(ctx, x, p1, p2, beta, channel_dim):
        ctx.save_for_backward(x, p1, p2, beta)
        ctx.save_for_forward(x, p1, p2, beta)
        ctx.channel_dim = channel_dim
        return _forward_op(x, p1, p2, beta, channel_dim)

    backward = staticmethod(AconCFunction.backward)
    jvp = staticmethod(AconCFunctionWithJvp.jvp)


def _acon_c_grads(ctx, grad_y, x, p1, p2, beta):
    """x, p1, p2 and beta's gradients, None where they are not needed."""
    needs = ctx.needs_input_grad[:4]
    output_mask = [needs[0], needs[1] or needs[2] or needs[3]]
    if torch.is_grad_enabled():
        # create_graph=True (double backward, e.g. a gradient penalty; and the
        # torch.func transforms): the gradients must be differentiable
        # themselves, so they come from the formulas in plain PyTorch ops.
        # Ordinary backward passes never get here.
        grads = reference.acon_c_backward(grad_y, x, p1, p2, beta, ctx.channel_dim, output_mask)
    else:
        grads = _backward_op(grad_y, x, p1, p2, beta, ctx.channel_dim, output_mask)
    return [g if need else None for g, need in zip(grads, needs)]


def acon_c(x: Tensor, p1: Tensor, p2: Tensor, beta: Tensor, channel_dim: int = 1) -> Tensor:
    """ACON-C: ``(p1 - p2) * x * sigmoid(beta * (p1 - p2) * x) + p2 * x``.

    Args:
        x: float32, float64, float16 or bfloat16 tensor of rank >= 2.
        p1, p2: C values each, C = ``x.shape[channel_dim]``: shape ``(C,)``,
            or that with size-1 axes added, such as ``(1, C, 1, 1)``.
        beta: shape ``(C,)`` (one per channel) or ``(N, C)`` (one per sample
            and channel, Meta-ACON), N = ``x.shape[0]``, or one of those with
            size-1 axes added, such as ``(1, C, 1, 1)`` or ``(N, C, 1, 1)``.
            Other shapes raise a ValueError.
        channel_dim: the channel axis; may be negative (-1 for features last).

    x and the parameters must be on one device: CPU, or CUDA where the
    extension was built with its CUDA kernels. Parameters may be float32
    while x is float16/bfloat16: the arithmetic is float32 and the result
    keeps x's dtype. The result has x's shape and memory format
    (channels_last stays channels_last). Differentiable in x, p1, p2 and beta
    through one autograd node, :class:`AconCFunction` and its twins (classic
    form for eager calls, with jvp under torch.func); each gradient has its
    input's shape and dtype. Works under ``torch.compile``, ``torch.export``,
    autocast and the ``torch.func`` transforms (``vmap``, ``grad``,
    ``jacrev``, ``jacfwd``); exports to ONNX as standard operators.
    """
    _check_arg_types(x, p1, p2, beta, channel_dim)
    if torch.onnx.is_in_onnx_export():
        # The formula in standard operators (Sigmoid, Mul, Add, ...): the
        # exported graph runs in any ONNX runtime, with nothing of this package.
        return reference.acon_c(x, p1, p2, beta, channel_dim)
    if torch.compiler.is_compiling():
        return AconCFunction.apply(x, p1, p2, beta, channel_dim)
    if torch._C._are_functorch_transforms_active():
        return AconCFunctionWithJvp.apply(x, p1, p2, beta, channel_dim)
    return AconCEagerFunction.apply(x, p1, p2, beta, channel_dim)


def _check_arg_types(x, p1, p2, beta, channel_dim) -> None:
    # The ops' own checks (csrc/acon_c.cpp) see only tensors: a Python
    # number or array would fail first inside autograd, with its message.
    for name, value in (("x", x), ("p1", p1), ("p2", p2), ("beta", beta)):
        if not isinstance(value, Tensor):
            raise TypeError(
                f"acon_c: {name} must be a torch.Tensor, got {type(value).__name__}; "
                f"wrap numbers and arrays with torch.as_tensor"
            )
    if not isinstance(channel_dim, int) or isinstance(channel_dim, bool):
        raise TypeError(f"acon_c: channel_dim must be an int, got {type(channel_dim).__name__}")


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
def _acon_c_backward_fake(grad_y, x, p1, p2, beta, channel_dim, output_mask=(True, True)):
    torch.ops.acon.acon_c_check_args(x, p1, p2, beta, channel_dim, grad_y)

    def grad_like(t, wanted):
        return t.new_empty(t.shape) if wanted else t.new_empty((0,))

    want_x, want_params = output_mask
    return (
        torch.empty_like(x) if want_x else x.new_empty((0,)),
        grad_like(p1, want_params),
        grad_like(p2, want_params),
        grad_like(beta, want_params),
    )


# The ops' own autograd (for code that calls torch.ops.acon.acon_c_forward
# directly, such as an exported program) is registered in C++
# (csrc/acon_c_autograd.cpp): a Python registration would cost ~7 us per call.


@torch.library.register_vmap("acon::acon_c_forward")
def _acon_c_forward_vmap(info, in_dims, x, p1, p2, beta, channel_dim):
    x_dim, p1_dim, p2_dim, beta_dim = in_dims[:4]
    if x_dim is not None and p1_dim is None and p2_dim is None and beta_dim is None:
        # Only x is batched: the fused kernel, with vmap's batch as one more
        # leading axis (per-channel beta) or folded into the samples
        # (per-sample beta, whose N*C values repeat for each batch entry).
        xb = x.movedim(x_dim, 0)
        one = xb[0] if xb.shape[0] else xb.new_empty(xb.shape[1:])  # one entry's x, for the checks
        torch.ops.acon.acon_c_check_args(one, p1, p2, beta, channel_dim)
        cdim = channel_dim % one.dim()
        if beta.numel() == one.shape[cdim]:
            return _forward_op(xb, p1, p2, beta, cdim + 1), 0
        batch, samples = info.batch_size, one.shape[0]
        per_sample = beta.reshape(1, -1).expand(batch, -1).reshape(batch * samples, -1)
        y = _forward_op(xb.flatten(0, 1), p1, p2, per_sample, cdim)
        return y.unflatten(0, (batch, samples)), 0
    # Batched parameters: the reference formula, on the batch made explicit.
    return _expand_batch(reference.batched_acon_c(*_explicit_batch(in_dims, x, p1, p2, beta), channel_dim), info), 0


@torch.library.register_vmap("acon::acon_c_backward")
def _acon_c_backward_vmap(info, in_dims, grad_y, x, p1, p2, beta, channel_dim, output_mask=(True, True)):
    # Under vmap every parameter gradient is per batch entry (per-sample
    # gradients), which the kernel's per-channel sums are not: the formulas,
    # on the batch made explicit.
    tensors = _explicit_batch(in_dims, grad_y, x, p1, p2, beta)
    grads = reference.batched_acon_c_backward(*tensors, channel_dim, output_mask)
    return tuple(_expand_batch(g, info) for g in grads), (0, 0, 0, 0)


def _explicit_batch(in_dims, *tensors):
    """Each tensor with vmap's batch as its leading axis (size 1 where it is
    not batched, to broadcast)."""
    return [t.unsqueeze(0) if dim is None else t.movedim(dim, 0) for t, dim in zip(tensors, in_dims)]


def _expand_batch(t, info):
    return t.expand(info.batch_size, *t.shape[1:])
