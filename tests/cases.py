"""Inputs and float64 truths shared by the tests."""

import pytest
import torch

import acon_cuda
from acon_cuda import reference
from acon_cuda.testing import DTYPES, ROUNDING, TOLERANCES, opmath_dtype

# Logical (N, C, *spatial) shapes: odd sizes, C = 1, spatial size 1, ranks
# 2 to 5, empty batch, empty spatial axis, no channels, C wider than a vector
# and not a multiple of one, C = 64 (exactly four AVX-512 float vectors: the
# widest rows whose sums stay in registers), channels-innermost rows wide
# enough to go in pairs (forward and backward), an odd number of them,
# (N, C) features with more rows
# than one flush and an odd count, and some large enough for several
# reduction blocks and threads, also with fewer samples than blocks (a
# per-sample beta's sums then come from several blocks).
SHAPES = [
    (2, 3),
    (6, 1100),
    (3, 1500, 1, 3),
    (257, 300),
    (3, 5, 7),
    (2, 3, 5, 7),
    (2, 3, 4, 5, 3),
    (4, 1, 3, 3),
    (3, 7, 1, 1),
    (0, 3, 4, 4),
    (2, 3, 0, 4),
    (2, 0, 3),
    (5, 67, 3, 37),
    (8, 19, 33, 35),
    (3, 150, 9, 37),
    (3, 64, 5, 3),
    (2, 16, 75, 61),
]

# contiguous: (N, C, ...) with channel_dim=1; channels_last: rank 4/5 only;
# features_last: (N, ..., C) with channel_dim=-1; strided: a non-dense slice;
# transposed: dense, but every stride reversed (the batch is innermost).
LAYOUTS = ["contiguous", "channels_last", "features_last", "strided", "transposed"]

# The two kinds of beta, and the layouts the kernels run without a copy, as
# pytest parametrisations shared by the test files.
per_sample_kinds = pytest.mark.parametrize("per_sample", [False, True], ids=["beta_per_channel", "beta_per_sample"])
copy_free_layouts = pytest.mark.parametrize("layout", ["contiguous", "channels_last", "features_last"])


def make_x(shape, layout, dtype, device, scale=3.0):
    """x of logical shape (N, C, *S) in `layout`, and its channel_dim."""
    n, c, *spatial = shape
    if layout == "features_last":
        return scale * torch.randn(n, *spatial, c, dtype=dtype, device=device), -1
    x = scale * torch.randn(shape, dtype=dtype, device=device)
    if layout == "channels_last":
        fmt = {4: torch.channels_last, 5: torch.channels_last_3d}[len(shape)]
        return x.contiguous(memory_format=fmt), 1
    if layout == "strided":
        wide = scale * torch.randn(n, 2 * c, *spatial, dtype=dtype, device=device)
        return wide[:, ::2], 1
    if layout == "transposed":
        dims = list(reversed(range(len(shape))))
        return x.permute(dims).contiguous().permute(dims), 1
    return x, 1


def make_params(x, channel_dim, per_sample, dtype):
    """p1 (C,), p2 (1, C, 1, ...) and beta (C,) or (N, C), of `dtype`."""
    c = x.shape[channel_dim]
    p1 = torch.randn(c, device=x.device).to(dtype)
    p2_shape = [1] * x.dim()
    p2_shape[1] = c
    p2 = torch.randn(p2_shape, device=x.device).to(dtype)
    beta_shape = (x.shape[0], c) if per_sample else (c,)
    beta = (torch.randn(beta_shape, device=x.device) + 0.5).to(dtype)
    return p1, p2, beta


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def run_fused(x, p1, p2, beta, channel_dim, grad):
    inputs = leaves(x, p1, p2, beta)
    y = acon_cuda.acon_c(*inputs, channel_dim=channel_dim)
    grads = torch.autograd.grad(y, inputs, grad, allow_unused=True)
    return y, grads


def run_truth(x, p1, p2, beta, channel_dim, grad):
    """The reference in float64 on the same values: y, its gradients and, for
    each of them, the magnitude of what was multiplied or summed to make it."""
    x64, p1_64, p2_64, beta64 = (t.detach().double() for t in (x, p1, p2, beta))
    g64 = grad.double()
    inputs = leaves(x64, p1_64, p2_64, beta64)
    y = reference.acon_c(*inputs, channel_dim=channel_dim)
    grads = torch.autograd.grad(y, inputs, g64, allow_unused=True)

    # Magnitudes of what makes each result (docs/math.md, section 5; in float64):
    # the error of a product is relative to its size, that of a sum to the
    # sum of its terms' sizes. h = S*(1 + u*S_neg) cancels near u = -1.28, so
    # its size is taken as S*(1 + |u|*S_neg).
    cdim = channel_dim % x.dim()
    shape = [1] * x.dim()
    shape[cdim] = x.shape[cdim]
    per_sample = beta64.numel() != x.shape[cdim]
    beta_shape = list(shape)
    if per_sample:
        beta_shape[0] = x.shape[0]
    d = p1_64.reshape(shape) - p2_64.reshape(shape)
    p2a = p2_64.reshape(shape).abs()
    u = beta64.reshape(beta_shape) * d * x64
    s, s_neg = torch.sigmoid(u), torch.sigmoid(-u)
    h_size = s * (1 + u.abs() * s_neg)
    dyx = (g64 * x64).abs()
    y_size = x64.abs() * (d.abs() * s + p2a)
    dx_size = g64.abs() * (d.abs() * h_size + p2a)
    a_size, b_size = dyx * h_size, dyx
    dxa = (d * x64).abs()
    g_size = g64.abs() * dxa * (dxa * (s * s_neg))  # no overflow of (d*x)**2
    other = [i for i in range(x.dim()) if i != cdim]
    beta_other = [i for i in other if i != 0] if per_sample else other

    def total(t, dims):
        return t.sum(dims) if dims else t

    # The truth's own error: autograd takes sigmoid's derivative as S*(1 - S),
    # with 1 - S by subtraction, which is off by up to min(2**-53, S_neg).
    s_neg_error = torch.clamp(s_neg, max=2.0**-53)
    g_truth_error = 2 * total(g64.abs() * dxa * (dxa * (s * s_neg_error)), beta_other)
    sizes = (
        (dx_size, 0.0),
        (total(a_size, other), 0.0),
        (total(a_size + b_size, other), 0.0),
        (total(g_size, beta_other), g_truth_error),
    )
    return y, grads, (y_size, 0.0), sizes


def assert_close_to_truth(actual, truth, size, opmath_dtype):
    """|actual - truth| <= rounding to actual's dtype + arithmetic error.

    `size` is (magnitude, truth's own error). The arithmetic error is taken
    relative to the magnitude of the terms that made each value (for a sum,
    the sum of their absolute values), so the test stays tight where a result
    is small because its terms are, and fair where they cancel. NaN must meet
    NaN and an infinity the same infinity.
    """
    # Rounding the result to a dtype narrower than the arithmetic's.
    out_rtol, out_atol = (0.0, 0.0) if actual.dtype == opmath_dtype else ROUNDING[actual.dtype]
    op_rtol, op_atol = TOLERANCES[opmath_dtype]
    bound, truth_error = size
    truth = truth.reshape(actual.shape)
    bound = bound.reshape(actual.shape)
    if isinstance(truth_error, torch.Tensor):
        truth_error = truth_error.reshape(actual.shape)
    err = (actual.double() - truth).abs()
    allowed = out_rtol * truth.abs() + out_atol + op_rtol * bound + op_atol + truth_error
    bad = ~(err <= allowed)
    both_nan = actual.isnan() & truth.isnan()
    same_inf = actual.isinf() & (actual.double() == truth)
    bad &= ~(both_nan | same_inf)
    assert not bad.any(), (
        f"{int(bad.sum())} of {actual.numel()} values off; worst: actual "
        f"{actual.flatten()[bad.flatten()][:4].tolist()} truth {truth.flatten()[bad.flatten()][:4].tolist()}"
    )


def check_against_truth(x, p1, p2, beta, channel_dim, run=None):
    """Runs the op (run_fused, or `run` with the same signature) and checks
    y and every gradient against the float64 truth."""
    grad = torch.randn_like(x)
    y, grads = (run or run_fused)(x, p1, p2, beta, channel_dim, grad)
    y_truth, grads_truth, y_bound, bounds = run_truth(x, p1, p2, beta, channel_dim, grad)
    opmath = opmath_dtype(x.dtype)

    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert_close_to_truth(y, y_truth, y_bound, opmath)
    for name, g, t, g_truth, bound in zip(("x", "p1", "p2", "beta"), grads, (x, p1, p2, beta), grads_truth, bounds):
        assert g.shape == t.shape and g.dtype == t.dtype, name
        assert_close_to_truth(g, g_truth, bound, opmath)
    return y, grads


def shape_layouts():
    for shape in SHAPES:
        for layout in LAYOUTS:
            if layout != "channels_last" or len(shape) in (4, 5):
                yield pytest.param(shape, layout, id="x".join(map(str, shape)) + "-" + layout)


def dtype_pairs():
    """(x dtype, parameter dtype): the same, or float32 parameters (mixed precision)."""
    for dtype in DTYPES:
        name = str(dtype).replace("torch.", "")
        yield pytest.param(dtype, dtype, id=name)
        if dtype != torch.float32:
            yield pytest.param(dtype, torch.float32, id=name + "-float32_params")


def run_emulated(gpu):
    """A `run` for check_against_truth: the CUDA kernels' code emulated on
    the CPU (the CUDA build's test hooks), on a GPU of gpu = (multiprocessors,
    resident blocks per multiprocessor)."""

    def run(x, p1, p2, beta, channel_dim, grad):
        x, p1, p2, beta = leaves(x, p1, p2, beta)
        y = torch.ops.acon._acon_c_forward_cuda_emulated(x, p1, p2, beta, channel_dim, *gpu)
        grads = torch.ops.acon._acon_c_backward_cuda_emulated(grad, x, p1, p2, beta, channel_dim, *gpu, [True, True])
        return y, grads

    return run


# BatchNorm fused with ACON (test_batch_norm_acon_c.py, test_batch_norm_meta_acon_c.py):
# (N, C, *spatial): ranks 2 to 5, odd sizes, C = 1, one value per sample
# and channel, C wider than a vector and not a multiple of one, runs shorter
# than a vector, and some large enough for several reduction blocks.
BATCH_NORM_SHAPES = [
    (3, 5),
    (257, 70),
    (3, 5, 7),
    (2, 3, 5, 7),
    (2, 3, 4, 5, 3),
    (4, 1, 3, 3),
    (5, 7, 1, 1),
    (5, 67, 3, 37),
    (8, 19, 33, 35),
    (4, 150, 9, 37),
]
# Several reduction blocks, some of which reach a range of channels that
# wraps past the last one (the kernels clear and combine only that range).
# Not in BATCH_NORM_SHAPES: test_batch_norm_meta_acon_c's float64 comparison
# of module gradients (absolute tolerance on the result's scale, not the
# sum's) fails on it by 3e-11 with the kernels before that change too.
BATCH_NORM_WRAPPING_SHAPE = (3, 150, 9, 37)
BATCH_NORM_LAYOUTS = ["contiguous", "channels_last", "strided", "transposed"]
# (training, affine, track_running_stats) as nn.BatchNorm resolves them:
# batch statistics with and without running ones, and running ones alone.
BATCH_NORM_MODES = [
    (True, True, True),
    (True, False, False),
    (False, True, True),
    (False, False, True),
    (True, True, False),
]


# The launch plan's fields, as torch.ops.acon._acon_c_cuda_launch_plan lists
# them for each kernel of a call (csrc/cuda/acon_c_launch.h).
PLAN_FIELDS = ["kind", "grid", "threads", "items", "teams_per_block", "most_items", "busy_permille", "lanes"]
PLAN_KINDS = {0: "runs", 1: "columns", 2: "reduce"}


def launch_plan(x, per_sample, channel_dim, backward, multiprocessors, blocks_per_multiprocessor):
    """The kernels a call launches on a GPU of that size, one dict each."""
    c = x.shape[channel_dim]
    beta = torch.ones((x.shape[0], c) if per_sample else (c,), dtype=x.dtype)
    flat = torch.ops.acon._acon_c_cuda_launch_plan(
        x, beta, channel_dim, backward, multiprocessors, blocks_per_multiprocessor
    )
    # A backward's list ends with its workspace's bytes.
    workspace = flat.pop() if backward else 0
    assert len(flat) % len(PLAN_FIELDS) == 0
    kernels = [dict(zip(PLAN_FIELDS, flat[i : i + len(PLAN_FIELDS)])) for i in range(0, len(flat), len(PLAN_FIELDS))]
    for k in kernels:
        k["kind"] = PLAN_KINDS[k["kind"]]
        if k["kind"] == "reduce":  # field 6: the most partial sums one lane adds
            k["longest_lane"] = k.pop("busy_permille")
            k["workspace_bytes"] = workspace
    return kernels


def empty_x(shape, layout, dtype):
    """An uninitialised x (CPU pages are not touched): only its layout counts."""
    if layout == "features_last":
        n, c, *spatial = shape
        return torch.empty(n, *spatial, c, dtype=dtype), -1
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    return torch.empty(shape, dtype=dtype, memory_format=fmt), 1
