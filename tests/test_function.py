"""The autograd.Function wrapper: torch.func (vmap, per-sample gradients,
jacrev, jacfwd), gradients only where needed, the backward op's output mask,
and strict parameter shapes. Float64, against acon_cuda.reference."""

import contextlib

import pytest
import torch
from cases import copy_free_layouts, make_params, make_x, per_sample_kinds
from torch._dynamo.testing import AotEagerAndRecordGraphs
from torch.func import grad, jacfwd, jacrev, vmap

import acon_cuda
from acon_cuda import ops, reference

F64 = dict(rtol=1e-12, atol=1e-12)


@contextlib.contextmanager
def no_vmap_fallback():
    """PyTorch's slow per-example vmap fallback raises instead of running."""
    torch._C._functorch._set_vmap_fallback_enabled(False)
    try:
        yield
    finally:
        torch._C._functorch._set_vmap_fallback_enabled(True)


def inputs(device, layout="contiguous", per_sample=False, shape=(3, 4, 5, 2)):
    x, channel_dim = make_x(shape, layout, torch.float64, device, scale=2.0)
    return (x, *make_params(x, channel_dim, per_sample, torch.float64)), channel_dim


def test_grad_fn_is_the_function(device):
    (x, p1, p2, beta), _ = inputs(device)
    y = acon_cuda.acon_c(x.requires_grad_(), p1, p2, beta)
    assert type(y.grad_fn)._forward_cls is ops.AconCEagerFunction  # one node, classic form in eager
    (want,) = torch.autograd.grad(y.sum(), x)
    x.grad = None
    backend = AotEagerAndRecordGraphs()
    compiled = torch.compile(acon_cuda.acon_c, backend=backend, fullgraph=True)
    compiled(x, p1, p2, beta).sum().backward()
    # Dynamo traced an autograd.Function (AconCFunction: the eager form has
    # no setup_context and would break the graph) whose forward and backward
    # are the fused ops.
    (graph,) = backend.graphs
    assert "torch.ops.higher_order.autograd_function_apply" in graph.code
    assert "torch.ops.acon.acon_c_forward" in backend.fw_graphs[0].code
    assert "torch.ops.acon.acon_c_backward" in backend.bw_graphs[0].code
    torch.testing.assert_close(x.grad, want)


def test_forward_mode_ad_outside_torch_func(device):
    import torch.autograd.forward_ad as fwAD

    (x, p1, p2, beta), _ = inputs(device, per_sample=True)
    tangents = [torch.randn_like(t) for t in (x, p1, p2, beta)]
    with fwAD.dual_level():
        duals = [fwAD.make_dual(t, tt) for t, tt in zip((x, p1, p2, beta), tangents)]
        got = fwAD.unpack_dual(acon_cuda.acon_c(*duals)).tangent
    want = torch.func.jvp(reference.acon_c, (x, p1, p2, beta), tuple(tangents))[1]
    torch.testing.assert_close(got, want, **F64)


@copy_free_layouts
@per_sample_kinds
@pytest.mark.parametrize("batched", [(0,), (1, 2, 3), (0, 1, 2, 3), (0, 3)], ids=["x", "params", "all", "x_and_beta"])
def test_vmap(device, layout, per_sample, batched):
    (x, *params), channel_dim = inputs(device, layout, per_sample)
    args = [x, *params]
    in_dims = [None] * 4
    for i in batched:
        # A batch of 3 on a different axis of each argument.
        dim = i % (args[i].dim() + 1)
        args[i] = torch.stack([args[i] * (1 + 0.1 * k) for k in range(3)], dim=dim)
        in_dims[i] = dim
    in_dims = (*in_dims, None)
    with no_vmap_fallback():
        out = vmap(acon_cuda.acon_c, in_dims=in_dims)(*args, channel_dim)
    expected = vmap(reference.acon_c, in_dims=in_dims)(*args, channel_dim)
    torch.testing.assert_close(out, expected, **F64)


@copy_free_layouts
def test_per_sample_gradients(device, layout):
    """vmap(grad(loss)) over the batch, as DP-SGD does, equals a loop over the
    samples."""
    (x, p1, p2, beta), channel_dim = inputs(device, layout, per_sample=False, shape=(4, 3, 5, 2))
    target = torch.randn_like(x)

    def loss(p1, p2, beta, sample, target):
        y = acon_cuda.acon_c(sample.unsqueeze(0), p1, p2, beta, channel_dim)
        return ((y.squeeze(0) - target) ** 2).sum()

    def reference_loss(p1, p2, beta, sample, target):
        y = reference.acon_c(sample.unsqueeze(0), p1, p2, beta, channel_dim)
        return ((y.squeeze(0) - target) ** 2).sum()

    with no_vmap_fallback():
        per_sample_grads = vmap(grad(loss, argnums=(0, 1, 2)), in_dims=(None, None, None, 0, 0))(
            p1, p2, beta, x, target
        )
    for n in range(x.shape[0]):
        leaves = [t.detach().requires_grad_() for t in (p1, p2, beta)]
        expected = torch.autograd.grad(reference_loss(*leaves, x[n], target[n]), leaves)
        for got, want in zip(per_sample_grads, expected):
            torch.testing.assert_close(got[n], want, **F64)


@per_sample_kinds
def test_jacrev_and_jacfwd(device, per_sample):
    (x, p1, p2, beta), channel_dim = inputs(device, per_sample=per_sample, shape=(2, 3, 4))
    for transform in (jacrev, jacfwd):
        with no_vmap_fallback():
            got = transform(acon_cuda.acon_c, argnums=(0, 1, 2, 3))(x, p1, p2, beta, channel_dim)
        want = jacrev(reference.acon_c, argnums=(0, 1, 2, 3))(x, p1, p2, beta, channel_dim)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, **F64)


def test_forward_mode_dual_numbers(device):
    (x, p1, p2, beta), _ = inputs(device, per_sample=True)
    tangents = [torch.randn_like(t) for t in (x, p1, p2, beta)]
    got = torch.func.jvp(acon_cuda.acon_c, (x, p1, p2, beta), tuple(tangents))
    want = torch.func.jvp(reference.acon_c, (x, p1, p2, beta), tuple(tangents))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **F64)


@per_sample_kinds
@pytest.mark.parametrize("frozen", ["params", "x", "p2_only", "none"])
def test_needs_input_grad(device, per_sample, frozen):
    (x, p1, p2, beta), channel_dim = inputs(device, "channels_last", per_sample)
    wanted = {
        "params": (True, False, False, False),
        "x": (False, True, True, True),
        "p2_only": (False, False, True, False),
        "none": (True, True, True, True),
    }[frozen]
    leaves = [t.detach().clone().requires_grad_(w) for t, w in zip((x, p1, p2, beta), wanted)]
    g = torch.randn_like(x)
    acon_cuda.acon_c(*leaves, channel_dim).backward(g)
    truth_leaves = [t.detach().clone().requires_grad_() for t in (x, p1, p2, beta)]
    reference.acon_c(*truth_leaves, channel_dim).backward(g)
    for leaf, truth, w in zip(leaves, truth_leaves, wanted):
        if w:
            torch.testing.assert_close(leaf.grad, truth.grad, **F64)
        else:
            assert leaf.grad is None


@per_sample_kinds
@pytest.mark.parametrize("mask", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_backward_op_output_mask(device, layout, per_sample, mask):
    (x, p1, p2, beta), channel_dim = inputs(device, layout, per_sample)
    g = torch.randn_like(x)
    got = torch.ops.acon.acon_c_backward(g, x, p1, p2, beta, channel_dim, list(mask))
    want = reference.acon_c_backward(g, x, p1, p2, beta, channel_dim)
    for k, (out, truth) in enumerate(zip(got, want)):
        if mask[min(k, 1)]:
            torch.testing.assert_close(out, truth, **F64)
        else:
            assert out.numel() == 0 and out.dtype == truth.dtype


def test_reference_backward_matches_autograd(device):
    (x, p1, p2, beta), channel_dim = inputs(device, "features_last", per_sample=True)
    g = torch.randn_like(x)
    leaves = [t.detach().clone().requires_grad_() for t in (x, p1, p2, beta)]
    expected = torch.autograd.grad(reference.acon_c(*leaves, channel_dim), leaves, g)
    for got, want in zip(reference.acon_c_backward(g, x, p1, p2, beta, channel_dim), expected):
        torch.testing.assert_close(got, want, **F64)


@pytest.mark.parametrize(
    "name, shape, ok",
    [
        ("beta", (6,), True),
        ("beta", (1, 6, 1, 1), True),
        ("beta", (4, 6), True),
        ("beta", (4, 6, 1, 1), True),
        ("beta", (4, 1, 6), True),
        ("beta", (6, 4), False),  # (C, N): used to be read silently in (N, C) order
        ("beta", (2, 12), False),
        ("beta", (24,), False),
        ("beta", (3, 2), False),
        ("p1", (1, 6, 1, 1), True),
        ("p1", (6, 1), True),
        ("p1", (2, 3), False),
        ("p2", (3, 2), False),
    ],
)
def test_strict_parameter_shapes(device, name, shape, ok):
    x = torch.randn(4, 6, 3, device=device)
    params = {
        "p1": torch.randn(6, device=device),
        "p2": torch.randn(6, device=device),
        "beta": torch.ones(6, device=device),
    }
    params[name] = torch.randn(shape, device=device)
    call = lambda: acon_cuda.acon_c(x, params["p1"], params["p2"], params["beta"])  # noqa: E731
    if ok:
        y = call()
        # The values are read in the shape's own order.
        torch.testing.assert_close(y, reference.acon_c(x, params["p1"], params["p2"], params["beta"]))
    else:
        with pytest.raises(ValueError, match=f"{name} must"):
            call()
        with pytest.raises(ValueError, match=f"{name} must"):  # the fake kernel says the same
            torch.ops.acon.acon_c_forward(x.to("meta"), *(params[k].to("meta") for k in ("p1", "p2", "beta")), 1)
