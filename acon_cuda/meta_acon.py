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
- :func:`meta_acon_c`: plain eager calls, one op (``_meta_acon_c``) whose C++
  autograd node (``csrc/meta_acon_c.cpp``) runs the generator's ATen calls
  around the fused acon ops and adds the mean's gradient into the x-sized
  gradient in place: on small maps a dozen autograd nodes, or a Python
  Function's per-call costs, would cost more than the activation itself.

The mean's gradient never exists at x's size.

Which path ``MetaAconC.forward`` takes:

=========================================  ======================================
when                                       what runs
=========================================  ======================================
a submodule is not a plain Conv2d /        :func:`meta_acon_c_modules`: the
BatchNorm2d, or has hooks                  submodules' own forward, then acon_c
``impl="reference"``                       :func:`meta_acon_c_plain` with
                                           ``reference.acon_c``
tracing, torch.compile, torch.func,        :func:`meta_acon_c_plain` with the
export, forward-mode AD, autocast,         fused ``ops.acon_c`` (its own paths:
inference mode, an empty x, meta device    see ``ops.py``)
any other eager call                       :func:`meta_acon_c`: the
                                           ``_meta_acon_c`` op and its C++ node
its backward with ``create_graph=True``    the node differentiates a recomputation
                                           in ordinary ATen ops
=========================================  ======================================
"""

import math
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import forward_ad

from . import ops

__all__ = [
    "autocast_enabled",
    "batch_norm_meta_acon_c",
    "batch_norm_meta_acon_c_serves",
    "has_plain_submodules",
    "meta_acon_c",
    "meta_acon_c_modules",
    "meta_acon_c_plain",
    "uses_batch_statistics",
]

_meta_op = torch.ops.acon._meta_acon_c.default
_batch_norm_meta_op = torch.ops.acon._batch_norm_meta_acon_c.default
# Device types with acon kernels; others (meta: shape inference without
# data) take the plain path, whose ops have kernels for them.
_KERNEL_DEVICES = ("cpu", "cuda")


def autocast_enabled(x: Tensor) -> bool:
    """Whether autocast is on for x's device type (False for device types
    without autocast, such as meta, for which torch.is_autocast_enabled
    raises)."""
    try:
        return torch.is_autocast_enabled(x.device.type)
    except RuntimeError:
        return False


def _reduced_axes(x: Tensor, cdim: int) -> List[int]:
    return [i for i in range(1, x.dim()) if i != cdim]


def _sum_and_count(x: Tensor, cdim: int):
    """(s, count) with s / count the mean of x over every axis but batch and
    channel, (N, C), in x's dtype, taken as a sum: its gradient is an
    expanded view, where ``x.mean``'s would be divided at x's size. A
    float16 sum overflows (65504) where the mean does not: 16-bit x is summed
    in float32 and divided at once (count 1)."""
    other = _reduced_axes(x, cdim)
    if not other:
        return x, 1
    count = math.prod([x.shape[i] for i in other])
    if x.dtype in (torch.float16, torch.bfloat16):
        return (x.sum(dim=other, dtype=torch.float32) / count).to(x.dtype), 1
    return x.sum(dim=other), count


def _mean(x: Tensor, cdim: int) -> Tensor:
    total, count = _sum_and_count(x, cdim)
    return total / count if count != 1 else total


def batch_norm_mode(bn):
    """(running_mean, running_var, use_batch_statistics, momentum), as
    ``nn.BatchNorm2d.forward`` chooses them, counting the batch in
    ``num_batches_tracked`` as that forward does. The eager op resolves the
    same in C++ (``batch_norm_mode`` and ``count_batch`` in csrc/meta_acon_c.cpp).
    Buffers are read from ``bn._buffers``: ``nn.Module.__getattr__`` costs
    about a microsecond per access here."""
    buffers = bn._buffers
    running_mean, running_var = buffers.get("running_mean"), buffers.get("running_var")
    momentum = 0.0 if bn.momentum is None else bn.momentum
    tracked = buffers.get("num_batches_tracked")
    if bn.training and bn.track_running_stats and tracked is not None:
        tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average
            # A meta counter has no value (nn.BatchNorm2d raises there); the
            # momentum of a shape-only pass does not matter.
            momentum = 0.0 if tracked.is_meta else 1.0 / float(tracked)
    use_batch = uses_batch_statistics(bn)
    if bn.training and not bn.track_running_stats:
        running_mean = running_var = None
    return running_mean, running_var, use_batch, momentum


def _generator_modules(module):
    """fc1, bn1, fc2, bn2 (the BatchNorms None with norm=False), read from
    ``_modules``: ``nn.Module.__getattr__`` costs about a microsecond per
    access, and the eager path runs once per activation call."""
    modules = module._modules
    if module.norm:
        return modules["fc1"], modules["bn1"], modules["fc2"], modules["bn2"]
    return modules["fc1"], None, modules["fc2"], None


def _generator_params(module):
    """fc1.weight, fc1.bias, fc2.weight, fc2.bias, then bn1's and bn2's
    weight and bias with norm=True."""
    fc1, bn1, fc2, bn2 = _generator_modules(module)
    fc1, fc2 = fc1._parameters, fc2._parameters
    params = [fc1["weight"], fc1["bias"], fc2["weight"], fc2["bias"]]
    if module.norm:
        bn1, bn2 = bn1._parameters, bn2._parameters
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


def _check_generator_shapes(module, channels: int) -> None:
    """The generator's widths, checked before bn1 counts a batch: a mismatch
    found later (fc2, bn2, p2) would raise after bn1's statistics moved. The
    eager op checks the same in C++ (check_meta_acon_c_args)."""
    if torch.jit.is_tracing():
        return  # a trace records no checks (and warns at each shape test)
    w1, b1, w2, b2 = _generator_params(module)[:4]
    hidden = w1.shape[0]
    wanted = {"fc1.weight": (w1, (hidden, channels)), "fc2.weight": (w2, (channels, hidden))}
    wanted.update({"fc1.bias": (b1, (hidden,)), "fc2.bias": (b2, (channels,)), "p2": (module.p2, (channels,))})
    if module.norm:
        for name, width in (("bn1", hidden), ("bn2", channels)):
            bn = module._modules[name]
            for key in ("weight", "bias", "running_mean", "running_var"):
                wanted[f"{name}.{key}"] = (getattr(bn, key), (width,))
    for name, (t, shape) in wanted.items():
        if t is not None and t.numel() != math.prod(shape):
            raise ValueError(f"MetaAconC: {name} has shape {tuple(t.shape)}, but this generator needs {shape}")


def meta_acon_c_plain(module, x: Tensor, cdim: int, acon_c) -> Tensor:
    """Meta-ACON in ordinary ops (the generator) around ``acon_c``."""
    _check_generator_shapes(module, x.shape[cdim])
    norm1, norm2 = (_module_norm(module.bn1), _module_norm(module.bn2)) if module.norm else (None, None)
    beta = _beta(x, cdim, *_generator_params(module)[:4], norm1, norm2)
    return _activation(module, x, cdim, beta, acon_c)


def _activation(module, x: Tensor, cdim: int, beta: Tensor, acon_c) -> Tensor:
    """acon_c with the module's p1, p2 and the generated (N, C) beta."""
    if beta.dtype != x.dtype:
        beta = beta.float()  # e.g. float32 x under autocast: the op takes float32
    return acon_c(x, module.p1, module.p2, beta, cdim)


def uses_batch_statistics(bn) -> bool:
    """Whether bn normalises with the batch's statistics (training mode, or
    no running statistics), as nn.BatchNorm2d.forward decides."""
    buffers = bn._buffers
    return bn.training or (buffers.get("running_mean") is None and buffers.get("running_var") is None)


def _hooked(module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def has_plain_submodules(module) -> bool:
    """Whether fc1 / fc2 are plain nn.Conv2d and bn1 / bn2 plain
    nn.BatchNorm2d, without hooks or parametrizations: only then may the
    generator skip their forward. A SyncBatchNorm, FrozenBatchNorm, fused,
    pruned or quantisation-wrapped submodule, or one with hooks, keeps its
    own forward (meta_acon_c_modules)."""
    fc1, bn1, fc2, bn2 = _generator_modules(module)
    if type(fc1) is not nn.Conv2d or type(fc2) is not nn.Conv2d or _hooked(fc1) or _hooked(fc2):
        return False
    return not module.norm or (
        type(bn1) is nn.BatchNorm2d and type(bn2) is nn.BatchNorm2d and not _hooked(bn1) and not _hooked(bn2)
    )


def meta_acon_c_modules(module, x: Tensor, cdim: int, acon_c) -> Tensor:
    """Meta-ACON with the generator's submodules called as the paper's code
    calls them, on the (N, C, 1, 1) mean."""
    h = module.fc1(_mean(x, cdim)[:, :, None, None])
    if module.norm:
        h = module.bn1(h)
    h = module.fc2(h)
    if module.norm:
        h = module.bn2(h)
    return _activation(module, x, cdim, torch.sigmoid(h).flatten(1), acon_c)


def _eager_op_serves(x: Tensor) -> bool:
    """Whether a plain eager call on x may take the ops with C++ autograd
    nodes: tracing, transforms, export, forward-mode AD, autocast and the
    meta device need ordinary ops; so do inference mode (the eager op's one
    kernel is its autograd kernel, which inference mode skips) and empty
    inputs (BatchNorm of an empty batch)."""
    return not (
        torch.compiler.is_compiling()
        or torch._C._are_functorch_transforms_active()
        or torch.onnx.is_in_onnx_export()
        or torch.jit.is_tracing()
        or forward_ad._current_level >= 0
        or x.device.type not in _KERNEL_DEVICES
        or autocast_enabled(x)
        or torch.is_inference_mode_enabled()
        or x.numel() == 0
    )


def _op_args(module):
    """The eager ops' arguments from p1 to the generator's last: p1, p2,
    the products' weights and biases, then with norm=True the BatchNorms'
    parameters, buffers and settings (the schema's bn1_* and bn2_*)."""
    # p1 and p2 from _parameters (fast), or as attributes where a
    # parametrization computes them.
    p1, p2 = (module._parameters.get(name) for name in ("p1", "p2"))
    if p1 is None or p2 is None:
        p1, p2 = module.p1, module.p2
    if not module.norm:
        return (p1, p2, *_generator_params(module))
    w1, b1, w2, b2, g1, c1, g2, c2 = _generator_params(module)
    _, bn1, _, bn2 = _generator_modules(module)
    s1, s2 = bn1._buffers, bn2._buffers
    return (
        p1, p2, w1, b1, w2, b2,
        g1, c1, s1.get("running_mean"), s1.get("running_var"), s1.get("num_batches_tracked"),
        bn1.training, bn1.track_running_stats, bn1.momentum, bn1.eps,
        g2, c2, s2.get("running_mean"), s2.get("running_var"), s2.get("num_batches_tracked"),
        bn2.training, bn2.track_running_stats, bn2.momentum, bn2.eps,
    )  # fmt: skip


def meta_acon_c(module, x: Tensor, cdim: int) -> Tensor:
    """The fused Meta-ACON of ``module`` (a MetaAconC) on x."""
    if not _eager_op_serves(x):
        return meta_acon_c_plain(module, x, cdim, ops.acon_c)
    # One op, whose C++ autograd node (csrc/meta_acon_c.cpp) runs the
    # generator's ATen calls around the fused acon ops and resolves each
    # BatchNorm's mode as batch_norm_mode does.
    args = _op_args(module)
    if module.norm:
        return _meta_op(x, *args[:6], cdim, True, *args[6:])
    return _meta_op(x, *args, cdim)


def batch_norm_meta_acon_c_serves(module, x: Tensor) -> bool:
    """Whether :func:`batch_norm_meta_acon_c` takes x: plain eager calls on
    CPU tensors, ``module`` with ``impl="fused"`` and plain submodules.
    Other calls run the BatchNorm and the module apart."""
    return _eager_op_serves(x) and x.device.type == "cpu" and module.impl == "fused" and has_plain_submodules(module)


def batch_norm_meta_acon_c(
    module, x: Tensor, running_mean, running_var, weight, bias, training: bool, momentum: float, eps: float
) -> Tensor:
    """``F.batch_norm`` of x (its arguments, resolved as nn.BatchNorm
    resolves them), then ``module``, a MetaAconC on channel axis 1, as one
    op (``_batch_norm_meta_acon_c``): the pairs ``fuse_batchnorm`` makes,
    where :func:`batch_norm_meta_acon_c_serves`. Its node runs the fused
    BatchNorm + ACON-C passes with the generator in between (its means from
    the statistics pass, beta's gradient from the sums pass)."""
    module._check_call(x, lazy=False, plain=True)
    args = _op_args(module)
    norm_args = (x, weight, bias, running_mean, running_var, training, momentum, eps)
    return _batch_norm_meta_op(*norm_args, *args[:6], module.norm, *args[6:])
