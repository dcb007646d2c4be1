"""ACON-C in plain PyTorch ops: the oracle of the tests, the baseline of the benchmarks.

``acon_c`` has the signature and semantics of ``acon_cuda.acon_c``. It computes
in float32 for float16/bfloat16 inputs (float64 for float64) and returns x's
dtype, so it does not overflow where the true result fits; its gradients
come from autograd. It keeps several activation-sized tensors for backward,
which is what the fused op avoids.

``acon_c_backward`` and ``acon_c_jvp`` are the derivatives written out as in
docs/math.md (Gradients), in the same plain ops: the vmap and forward-mode rules of the
fused op use them, and tests check the fused backward against them.
"""

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["acon_c", "acon_c_backward", "acon_c_jvp"]


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _Terms:
    """x, d = p1 - p2, p2 and bd = beta * d in opmath precision, the
    parameters shaped to broadcast against x.

    With ``lead=1`` every tensor has one more leading axis, of size B or 1
    (broadcast): vmap's batch made explicit, for the op's vmap rules.
    """

    def __init__(self, x: Tensor, p1: Tensor, p2: Tensor, beta: Tensor, channel_dim: int, lead: int = 0):
        self.lead = lead
        self.cdim = lead + channel_dim % (x.dim() - lead)
        # One beta per sample and channel, in (N, C) order, or one per channel.
        self.per_sample = math.prod(beta.shape[lead:]) != x.shape[self.cdim]
        self.x = x.to(_opmath(x.dtype))
        self.p2 = self.shaped(p2)
        self.d = self.shaped(p1) - self.p2
        self.bd = self.shaped(beta, self.per_sample) * self.d

    def shaped(self, param: Tensor, per_sample: bool = False) -> Tensor:
        """C (or N*C, per_sample) values, shaped to broadcast against x."""
        shape = [*param.shape[: self.lead]] + [1] * (self.x.dim() - self.lead)
        shape[self.cdim] = self.x.shape[self.cdim]
        if per_sample:
            shape[self.lead] = self.x.shape[self.lead]
        return param.reshape(shape).to(self.x.dtype)

    def value(self) -> Tensor:
        return self.x * (self.d * torch.sigmoid(self.bd * self.x) + self.p2)

    def derivatives(self):
        """u = bd*x, S = sigmoid(u), 1 - S = sigmoid(-u), and h = S*(1 + u*(1 - S))."""
        u = self.bd * self.x
        s, s_neg = torch.sigmoid(u), torch.sigmoid(-u)
        return s, s_neg, s * (1 + u * s_neg)

    def beta_term(self, s: Tensor, s_neg: Tensor) -> Tensor:
        """dy/dbeta = (d*x)^2 * S * (1 - S), as (d*x) * ((d*x) * S * (1 - S))."""
        dxd = self.d * self.x
        return dxd * (dxd * (s * s_neg))


def acon_c(x: Tensor, p1: Tensor, p2: Tensor, beta: Tensor, channel_dim: int = 1) -> Tensor:
    """``(p1 - p2) * x * sigmoid(beta * (p1 - p2) * x) + p2 * x``, see ``acon_cuda.acon_c``."""
    return _Terms(x, p1, p2, beta, channel_dim).value().to(x.dtype)


def acon_c_backward(
    grad_y: Tensor,
    x: Tensor,
    p1: Tensor,
    p2: Tensor,
    beta: Tensor,
    channel_dim: int = 1,
    output_mask: Sequence[bool] = (True, True),
):
    """(dx, dp1, dp2, dbeta) as ``torch.ops.acon.acon_c_backward`` returns
    them: each in its input's dtype and shape, an empty tensor where
    ``output_mask`` (x's gradient, the parameters' gradients) is False."""
    return _backward(_Terms(x, p1, p2, beta, channel_dim), grad_y, x, p1, p2, beta, output_mask)


def _backward(t: _Terms, grad_y, x, p1, p2, beta, output_mask):
    s, s_neg, h = t.derivatives()
    dy = grad_y.to(t.x.dtype)
    lead = list(dy.shape[: t.lead]) if t.lead else []
    want_x, want_params = output_mask
    dx = (dy * (t.d * h + t.p2)).to(x.dtype) if want_x else x.new_empty(lead + [0])
    if not want_params:
        return (dx, *(p.new_empty(lead + [0]) for p in (p1, p2, beta)))
    dims = [i for i in range(t.lead, t.x.dim()) if i != t.cdim]
    b_terms = dy * t.x
    a = (b_terms * h).sum(dims)
    b = b_terms.sum(dims)
    g_terms = dy * t.beta_term(s, s_neg)
    g = g_terms.sum(dims[1:]) if t.per_sample else g_terms.sum(dims)

    def as_grad(total: Tensor, param: Tensor) -> Tensor:
        return total.reshape(*total.shape[: t.lead], *param.shape[t.lead :]).to(param.dtype)

    return dx, as_grad(a, p1), as_grad(b - a, p2), as_grad(g, beta)


def batched_acon_c(x, p1, p2, beta, channel_dim):
    """``acon_c`` over a leading axis that every argument has, of size B or 1
    (broadcast): vmap's batch, made explicit (the op's vmap rule)."""
    return _Terms(x, p1, p2, beta, channel_dim, lead=1).value().to(x.dtype)


def batched_acon_c_backward(grad_y, x, p1, p2, beta, channel_dim, output_mask=(True, True)):
    """``acon_c_backward`` over a leading axis, as ``batched_acon_c``: every
    gradient is per batch entry (per-sample gradients)."""
    t = _Terms(x, p1, p2, beta, channel_dim, lead=1)
    return _backward(t, grad_y, x, p1, p2, beta, output_mask)


def acon_c_jvp(
    x: Tensor,
    p1: Tensor,
    p2: Tensor,
    beta: Tensor,
    channel_dim: int,
    x_t: Optional[Tensor],
    p1_t: Optional[Tensor],
    p2_t: Optional[Tensor],
    beta_t: Optional[Tensor],
) -> Tensor:
    """The forward-mode derivative of ``acon_c`` along the tangents (None
    for an input without one), in x's dtype."""
    t = _Terms(x, p1, p2, beta, channel_dim)
    s, s_neg, h = t.derivatives()
    out = torch.zeros_like(t.x)
    if x_t is not None:
        out = out + (t.d * h + t.p2) * x_t.to(t.x.dtype)
    if p1_t is not None:
        out = out + t.x * h * t.shaped(p1_t)
    if p2_t is not None:
        out = out + t.x * (1 - h) * t.shaped(p2_t)
    if beta_t is not None:
        out = out + t.beta_term(s, s_neg) * t.shaped(beta_t, t.per_sample)
    return out.to(x.dtype)
