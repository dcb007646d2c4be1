"""ACON-C in plain PyTorch ops: the oracle of the tests, the baseline of the benchmarks.

Same signature and semantics as ``acon_cuda.acon_c``. It computes in float32
for float16/bfloat16 inputs (float64 for float64) and returns x's dtype, so
it does not overflow where the true result fits; its gradients come from
autograd. It keeps several activation-sized tensors for backward, which is
what the fused op avoids.
"""

import torch
from torch import Tensor

__all__ = ["acon_c"]


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def acon_c(x: Tensor, p1: Tensor, p2: Tensor, beta: Tensor, channel_dim: int = 1) -> Tensor:
    """``(p1 - p2) * x * sigmoid(beta * (p1 - p2) * x) + p2 * x``, see ``acon_cuda.acon_c``."""
    cdim = channel_dim % x.dim()
    channels = x.shape[cdim]
    shape = [1] * x.dim()
    shape[cdim] = channels
    if beta.numel() == channels:
        beta_shape = shape
    else:  # one beta per sample and channel, (N, C) order
        beta_shape = list(shape)
        beta_shape[0] = x.shape[0]
    opmath = _opmath(x.dtype)
    xf = x.to(opmath)
    p2f = p2.reshape(shape).to(opmath)
    d = p1.reshape(shape).to(opmath) - p2f
    bd = beta.reshape(beta_shape).to(opmath) * d
    return (xf * (d * torch.sigmoid(bd * xf) + p2f)).to(x.dtype)
