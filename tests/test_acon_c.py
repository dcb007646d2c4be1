"""The fused op against the float64 reference: values, gradients, layouts."""

import pytest
import torch
from cases import (
    check_against_truth,
    copy_free_layouts,
    dtype_pairs,
    make_params,
    make_x,
    per_sample_kinds,
    run_fused,
    shape_layouts,
)

import acon_cuda
from acon_cuda.testing import DTYPES


@per_sample_kinds
@pytest.mark.parametrize("shape, layout", list(shape_layouts()))
@pytest.mark.parametrize("dtype, p_dtype", list(dtype_pairs()))
def test_matches_reference(device, dtype, p_dtype, shape, layout, per_sample):
    x, channel_dim = make_x(shape, layout, dtype, device)
    p1, p2, beta = make_params(x, channel_dim, per_sample, p_dtype)
    y, grads = check_against_truth(x, p1, p2, beta, channel_dim)
    # Same memory format as x: what empty_like gives (x's strides when dense).
    assert y.stride() == torch.empty_like(x).stride()
    assert grads[0].stride() == torch.empty_like(x).stride()
    if x.numel() == 0:
        for g in grads[1:]:
            assert not g.any()


@copy_free_layouts
@per_sample_kinds
def test_gradcheck_float64(device, layout, per_sample):
    x, channel_dim = make_x((3, 4, 3, 5), layout, torch.float64, device, scale=2.0)
    params = make_params(x, channel_dim, per_sample, torch.float64)
    inputs = [t.detach().clone().requires_grad_() for t in (x, *params)]
    assert torch.autograd.gradcheck(
        lambda *t: acon_cuda.acon_c(*t, channel_dim=channel_dim), inputs, eps=1e-6, atol=1e-8, rtol=1e-6
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_extreme_magnitudes(device, dtype):
    """|u| far past where sigmoid saturates, and results near dtype's range."""
    big = {torch.float16: 15000.0, torch.bfloat16: 1e30, torch.float32: 1e30, torch.float64: 1e200}[dtype]
    values = torch.tensor(
        [-big, -big / 7, -100.0, -20.0, -2.3994, -1e-3, 0.0, 1e-3, 2.3994, 20.0, 100.0, big / 7, big],
        dtype=torch.float64,
    )
    x = values.to(dtype).reshape(1, 1, -1).repeat(2, 3, 1).to(device)
    p1 = torch.tensor([1.0, 0.5, 1.0], device=device).to(dtype)
    p2 = torch.tensor([-4.0, 0.25, 0.0], device=device).to(dtype)
    beta = torch.tensor([1.0, 3.0, 1.0], device=device).to(dtype)
    if dtype == torch.float16:
        # The float16 example of docs/math.md (Numerics): the true y = 60000 fits in float16.
        y = acon_cuda.acon_c(x, p1, p2, beta)
        assert y[0, 0, 0].item() == 60000.0
    y, grads = check_against_truth(x, p1, p2, beta, 1)
    assert torch.isfinite(y).all()
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("channels_last", [False, True], ids=["runs", "channels_last"])
def test_degenerate_channels(device, dtype, channels_last):
    """p1 = p2 (d = 0), beta = 0 and a tiny d: the channels where the CPU
    kernels' factored beta term (G's sums times d^2 per channel, docs/math.md,
    The beta term) differs most from the reference's order. dbeta must be
    exactly 0 for d = 0, every gradient finite and within the tolerances."""
    tiny = {torch.float16: 1e-4, torch.bfloat16: 1e-20, torch.float32: 1e-20, torch.float64: 1e-160}[dtype]
    x = (torch.randn(2, 4, 5, 7, dtype=torch.float64) * 3).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x = x.to(device)
    p1 = torch.tensor([0.75, 1.0, tiny, 2.0], dtype=torch.float64).to(dtype).to(device)
    p2 = torch.tensor([0.75, -0.5, 0.0, 0.5], dtype=torch.float64).to(dtype).to(device)
    beta = torch.tensor([1.5, 0.0, 1.0, 1.0], dtype=torch.float64).to(dtype).to(device)
    _, grads = check_against_truth(x, p1, p2, beta, 1)
    assert grads[3][0].item() == 0.0
    assert all(torch.isfinite(g).all() for g in grads)


def test_derivative_limits(device):
    """As u -> +inf dy/dx -> p1; as u -> -inf, dy/dx -> p2 (docs/math.md, Gradients)."""
    x = torch.tensor([[-60.0, 60.0]], dtype=torch.float64, device=device).requires_grad_()
    p1 = torch.tensor([1.5], dtype=torch.float64, device=device)
    p2 = torch.tensor([-0.25], dtype=torch.float64, device=device)
    beta = torch.tensor([1.0], dtype=torch.float64, device=device)
    acon_cuda.acon_c(x.reshape(1, 1, 2), p1, p2, beta).sum().backward()
    assert x.grad.tolist() == [[-0.25, 1.5]]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_nan_and_inf_propagate_like_the_reference(device, dtype):
    x = torch.randn(2, 3, 8, dtype=torch.float64).to(dtype).to(device)
    x[0, 1, 2] = float("nan")
    x[1, 1, 3] = float("inf")
    x[1, 1, 5] = float("-inf")
    p1, p2, beta = make_params(x, 1, False, dtype)
    y, grads = check_against_truth(x, p1, p2, beta, 1)
    # Nothing beyond channel 1 is touched.
    others = [0, 2]
    assert torch.isfinite(y[:, others]).all()
    assert torch.isfinite(grads[0][:, others]).all()
    for g in grads[1:]:
        assert torch.isfinite(g.reshape(-1)[others]).all()


def test_per_sample_beta_nan_stays_in_its_sample(device):
    x = torch.randn(3, 4, 5, device=device)
    x[1, 2, 0] = float("nan")
    p1, p2, beta = make_params(x, 1, True, torch.float32)
    _, grads = check_against_truth(x, p1, p2, beta, 1)
    dbeta = grads[3]
    assert dbeta[1, 2].isnan() and torch.isfinite(dbeta[[0, 2]]).all() and torch.isfinite(dbeta[1, [0, 1, 3]]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape", [(2, 70001), (3, 70001, 1, 1)], ids=["features", "1x1_maps"])
def test_one_row_samples_with_wide_rows(device, dtype, shape):
    """A per-sample beta whose samples are single rows (the CPU kernel writes
    beta's gradient straight, without sums), rows wider than one of the
    kernel's blocks of elements, and beta's gradient wanted alone (no
    grad_x): the same gradient as with every gradient wanted."""
    x, channel_dim = make_x(shape, "contiguous", dtype, device)
    p1, p2, beta = make_params(x, channel_dim, True, dtype)
    check_against_truth(x, p1, p2, beta, channel_dim)
    beta_leaf = beta.detach().clone().requires_grad_()
    grad = torch.randn_like(x)
    (dbeta,) = torch.autograd.grad(acon_cuda.acon_c(x, p1, p2, beta_leaf, channel_dim=channel_dim), beta_leaf, grad)
    assert torch.equal(dbeta, run_fused(x, p1, p2, beta, channel_dim, grad)[1][3])


@copy_free_layouts
@per_sample_kinds
@pytest.mark.parametrize("shape", [(8, 64, 28, 28), (6, 100, 23, 23)], ids=["28x28", "23x23"])
def test_parameter_gradients_are_deterministic(device, layout, per_sample, shape):
    """Bit-identical on every run, and (CPU) for any number of threads; also
    with maps whose rows do not end on a vector, and reduction blocks some
    of which reach a range of channels that wraps past the last one."""
    x, channel_dim = make_x(shape, layout, torch.float32, device)
    p1, p2, beta = make_params(x, channel_dim, per_sample, torch.float32)
    grad = torch.randn_like(x)
    first = run_fused(x, p1, p2, beta, channel_dim, grad)[1]
    threads = torch.get_num_threads()
    try:
        for n in (1, 3, threads):
            if device == "cpu":
                torch.set_num_threads(n)
            again = run_fused(x, p1, p2, beta, channel_dim, grad)[1]
            for a, b in zip(first, again):
                assert torch.equal(a, b)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("layout", ["contiguous", "features_last"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_storage_offset_that_breaks_vector_alignment(device, dtype, layout):
    """Dense x whose data starts one element into its storage: no 16-byte
    aligned vector loads, so the kernels take their element-wise paths."""
    shape = (3, 16, 8, 8) if layout == "contiguous" else (3, 8, 8, 16)
    storage = 3.0 * torch.randn(1 + torch.Size(shape).numel(), dtype=dtype, device=device)
    x = storage[1:].view(shape)
    p1, p2, beta = make_params(x, 1 if layout == "contiguous" else -1, False, dtype)
    check_against_truth(x, p1, p2, beta, 1 if layout == "contiguous" else -1)


@pytest.mark.parametrize("layout", ["runs", "channels_last", "rows"])
@pytest.mark.parametrize("p2_value", [1.0, 0.5, 3.0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_every_16bit_value_converts_like_the_reference(device, dtype, p2_value, layout):
    """With p1 = p2 (so d = 0) the forward is y = p2 * x, exact in float32
    and rounded once to x's dtype: over all 65536 bit patterns of x, the
    fused op's loads and stores convert exactly as the reference's float32
    computation and torch's rounding do (0.5 and 3 make results that need
    rounding: halved subnormals, products with more bits, overflow to inf).
    Infinite x gives NaN in both (0 * inf)."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype).reshape(4, 16, 32, 32).to(device)
    channel_dim = 1
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "rows":
        x = x.reshape(-1, 16)
    p1 = torch.full((16,), p2_value, dtype=dtype, device=device)
    p2, beta = p1.clone(), torch.ones_like(p1)
    y = torch.ops.acon.acon_c_forward(x, p1, p2, beta, channel_dim)
    as_float = [t.float() for t in (x, p1, p2, beta)]
    expected = acon_cuda.reference.acon_c(*as_float, channel_dim=channel_dim).to(dtype)
    assert torch.equal(y.isnan(), expected.isnan())
    assert torch.equal(y.isnan(), ~torch.isfinite(x))
    finite = torch.isfinite(x)
    assert torch.equal(y[finite].view(torch.int16), expected[finite].view(torch.int16))
