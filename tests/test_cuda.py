"""What only the CUDA build has: its registration (checked on every machine
that can build it) and GPU-only behaviour (skipped without a GPU)."""

import os
import re
import shutil
import subprocess

import pytest
import torch
from cases import make_params

import acon_cuda
from acon_cuda import reference

OPS = ["acon_c_forward", "acon_c_backward"]


def cuda_toolkit_major():
    """The major version of the CUDA toolkit setup.py would build with, or None."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [os.path.join(home, "bin", "nvcc")] if home else []
    candidates += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
    for nvcc in candidates:
        if nvcc and os.path.exists(nvcc):
            out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
            match = re.search(r"release (\d+)\.", out)
            return match.group(1) if match else None
    return None


@pytest.mark.parametrize("op", OPS)
def test_cuda_kernels_are_built_where_they_can_be(op):
    """A CUDA build of torch and a toolkit of its major version (as on this
    project's CI machine) must give an extension with CUDA kernels, GPU or not."""
    if torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} is a CPU-only build")
    if cuda_toolkit_major() != torch.version.cuda.split(".")[0]:
        pytest.skip(f"no CUDA {torch.version.cuda.split('.')[0]} toolkit here")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"acon::{op}", "CUDA")


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["p1", "p2", "beta"])
def test_parameter_on_another_device_raises(name):
    x = torch.randn(2, 3, 4, device="cuda")
    params = {n: torch.randn(3, device="cuda") for n in ("p1", "p2", "beta")}
    params[name] = params[name].cpu()
    with pytest.raises(RuntimeError, match=f"{name} is on cpu but x is on cuda"):
        acon_cuda.acon_c(x, **params)


@pytest.mark.cuda
def test_runs_on_the_current_stream():
    x = torch.randn(16, 32, 40, 40, device="cuda")
    p1, p2, beta = make_params(x, 1, False, torch.float32)
    expected = reference.acon_c(x, p1, p2, beta)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # queue work on the side stream only
            y = acon_cuda.acon_c(x, p1, p2, beta)
    stream.synchronize()
    torch.testing.assert_close(y, expected)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="one GPU")
def test_second_gpu():
    x = torch.randn(4, 8, 5, 5, device="cuda:1")
    p1, p2, beta = make_params(x, 1, True, torch.float32)
    y = acon_cuda.acon_c(x, p1, p2, beta)
    assert y.device == x.device
    torch.testing.assert_close(y, reference.acon_c(x, p1, p2, beta))


def chunked_reference_grads(x, p1, p2, beta, grad, channel_dim, dim, pieces):
    """The reference's gradients of p1, p2 and beta, summed in float64 over
    pieces of x along `dim` (the whole tensor would not fit its temporaries)."""
    totals = None
    for xs, gs in zip(x.chunk(pieces, dim), grad.chunk(pieces, dim)):
        inputs = [t.detach().clone().requires_grad_() for t in (p1, p2, beta)]
        y = reference.acon_c(xs, *inputs, channel_dim=channel_dim)
        found = [g.double() for g in torch.autograd.grad(y, inputs, gs)]
        totals = found if totals is None else [a + b for a, b in zip(totals, found)]
    return totals


@pytest.mark.cuda
@pytest.mark.parametrize(
    "shape, channel_dim, dim",
    [((2, 2, 2**29 + 3), 1, 2), ((2**28 + 3, 8), -1, 0)],
    ids=["runs", "channels_innermost"],
)
def test_more_than_2_31_elements(shape, channel_dim, dim):
    """64-bit indexing: a bfloat16 tensor of over 2**31 elements (about 4.3 GB)."""
    free, _ = torch.cuda.mem_get_info()
    if free < 40 * 2**30:
        pytest.skip("needs about 40 GB of free GPU memory")
    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    assert x.numel() > 2**31
    p1, p2, beta = make_params(x, channel_dim, False, torch.float32)
    grad = torch.randn_like(x)
    inputs = [t.detach().clone().requires_grad_() for t in (x, p1, p2, beta)]
    y = acon_cuda.acon_c(*inputs, channel_dim=channel_dim)
    dx, dp1, dp2, dbeta = torch.autograd.grad(y, inputs, grad)
    # The elements past 2**31 are checked element by element ...
    tail = slice(x.shape[dim] - 1000, None)
    index = [slice(None)] * x.dim()
    index[dim] = tail
    index = tuple(index)
    x_tail = x[index].detach().clone().requires_grad_()
    y_tail = reference.acon_c(x_tail, p1, p2, beta, channel_dim)
    (dx_tail,) = torch.autograd.grad(y_tail, [x_tail], grad[index])
    torch.testing.assert_close(y[index], y_tail, rtol=2**-7, atol=1e-6)
    torch.testing.assert_close(dx[index], dx_tail, rtol=2**-7, atol=1e-6)
    # ... and every element counts in the parameter sums.
    del y, dx, y_tail, dx_tail
    truth = chunked_reference_grads(x, p1, p2, beta, grad, channel_dim, dim, 32)
    for got, want in zip((dp1, dp2, dbeta), truth):
        torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-2 * want.abs().max().item())


def cuda_kernels_in(fn):
    """The names of the CUDA kernels one call of fn launches (torch.profiler)."""
    fn()  # warm-up: occupancy queries, allocator blocks
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


@pytest.mark.cuda
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_kernel_forward_two_backward(dtype, layout, per_sample):
    """float32 parameters (the usual case) need no conversion kernels: the
    forward is one kernel, the backward the main kernel and the reduce."""
    x = torch.randn(8, 64, 14, 14, device="cuda", dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    p1, p2, beta = make_params(x, 1, per_sample, torch.float32)
    grad = torch.randn_like(x)
    forward = cuda_kernels_in(lambda: torch.ops.acon.acon_c_forward(x, p1, p2, beta, 1))
    backward = cuda_kernels_in(lambda: torch.ops.acon.acon_c_backward(grad, x, p1, p2, beta, 1, [True, True]))
    assert len(forward) == 1 and "acon_c_" in forward[0], forward
    assert len(backward) == 2 and "reduce_channel_sums" in backward[1], backward
    no_params = cuda_kernels_in(lambda: torch.ops.acon.acon_c_backward(grad, x, p1, p2, beta, 1, [True, False]))
    assert len(no_params) == 1, no_params
    full = torch.ops.acon.acon_c_backward(grad, x, p1, p2, beta, 1, [True, True])
    assert torch.equal(torch.ops.acon.acon_c_backward(grad, x, p1, p2, beta, 1, [True, False])[0], full[0])


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_parameter_gradients_are_bit_identical_across_runs(layout):
    """Fixed-order sums, no atomics: the same gradients on every call."""
    x = torch.randn(8, 64, 28, 28, device="cuda")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    p1, p2, beta = make_params(x, 1, True, torch.float32)
    grad = torch.randn_like(x)
    first = torch.ops.acon.acon_c_backward(grad, x, p1, p2, beta, 1, [True, True])
    for _ in range(3):
        again = torch.ops.acon.acon_c_backward(grad, x, p1, p2, beta, 1, [True, True])
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_graph_capture_and_replay(layout):
    """Forward and backward captured in a CUDA graph (after a warm-up call,
    as torch.cuda.graphs asks) give the eager results on new data."""
    x = torch.randn(4, 32, 9, 9, device="cuda")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    p1, p2, beta = make_params(x, 1, True, torch.float32)
    grad = torch.randn_like(x)

    def step():
        y = torch.ops.acon.acon_c_forward(x, p1, p2, beta, 1)
        return (y,) + tuple(torch.ops.acon.acon_c_backward(grad, x, p1, p2, beta, 1, [True, True]))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    x.copy_(torch.randn_like(x))
    grad.copy_(torch.randn_like(grad))
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, step()):
        assert torch.equal(got, want)
