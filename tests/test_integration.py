"""The op as PyTorch sees it: registration, fake kernels, torch.compile,
saved tensors, bad input, and the CPU kernel builds per instruction set."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from cases import copy_free_layouts, make_params, make_x, per_sample_kinds

import acon_cuda
from acon_cuda import reference
from acon_cuda.testing import assert_as_accurate

OPS = ["acon_c_forward", "acon_c_backward"]


@pytest.mark.parametrize("op", OPS)
def test_ops_have_kernels(op):
    name = f"acon::{op}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "Meta")


@copy_free_layouts
@per_sample_kinds
def test_opcheck(device, layout, per_sample):
    x, channel_dim = make_x((2, 5, 3, 4), layout, torch.float32, device)
    p1, p2, beta = make_params(x, channel_dim, per_sample, torch.float32)
    grad = torch.randn_like(x)
    inputs = [t.requires_grad_() for t in (x, p1, p2, beta)]
    torch.library.opcheck(torch.ops.acon.acon_c_forward.default, (*inputs, channel_dim))
    detached = [t.detach() for t in (grad, x, p1, p2, beta)]
    torch.library.opcheck(torch.ops.acon.acon_c_backward.default, (*detached, channel_dim))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_forward_and_backward(device, backend):
    x, _ = make_x((4, 6, 5, 7), "channels_last", torch.float32, device)
    params = make_params(x, 1, False, torch.float32)

    def loss(x, p1, p2, beta):
        return (acon_cuda.acon_c(x, p1, p2, beta) * torch.arange(7.0, device=x.device)).sum()

    def value_and_grads(f, dtype):
        inputs = [t.detach().to(dtype).requires_grad_() for t in (x, *params)]
        value = f(*inputs)
        value.backward()
        return [value, *(t.grad for t in inputs)]

    # Inductor sums the loss's 840 terms in its own order: in float32 the
    # compiled result must be as close to the float64 truth as eager's is.
    truth = value_and_grads(loss, torch.float64)
    eager = value_and_grads(loss, torch.float32)
    compiled = value_and_grads(torch.compile(loss, fullgraph=True, backend=backend), torch.float32)
    assert_as_accurate(compiled, eager, truth)


def test_compiled_graphs_call_the_fused_ops(device):
    """AOTAutograd traces the fused forward and backward ops, not the
    plain-PyTorch formula that serves double backward."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(gm, example_inputs):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return make_boxed_func(gm.forward)

    x, _ = make_x((2, 3, 4), "contiguous", torch.float32, device)
    inputs = [t.requires_grad_() for t in (x, *make_params(x, 1, False, torch.float32))]
    compiled = torch.compile(
        lambda *t: acon_cuda.acon_c(*t).sum(), backend=aot_autograd(fw_compiler=keep, bw_compiler=keep), fullgraph=True
    )
    compiled(*inputs).backward()
    forward, backward = graphs
    assert "acon.acon_c_forward.default" in forward
    assert "acon.acon_c_backward.default" in backward
    assert "aten.sigmoid.default" not in forward + backward


@copy_free_layouts
@per_sample_kinds
def test_supported_layouts_are_not_copied(device, layout, per_sample):
    """Forward and backward run on x (and a gradient of x's layout) in place:
    no copy, clone or contiguous-ing kernel of activation size."""
    x, channel_dim = make_x((4, 16, 9, 11), layout, torch.float32, device)
    inputs = [t.requires_grad_() for t in (x, *make_params(x, channel_dim, per_sample, torch.float32))]
    grad = torch.randn_like(x)
    with torch.profiler.profile(record_shapes=True) as prof:
        y = acon_cuda.acon_c(*inputs, channel_dim=channel_dim)
        torch.autograd.grad(y, inputs, grad)
    copy_ops = ("aten::copy_", "aten::clone", "aten::_to_copy", "aten::contiguous")

    def activation_copies(prof):
        return [
            (e.key, e.input_shapes)
            for e in prof.key_averages(group_by_input_shape=True)
            if e.key in copy_ops and any(math.prod(shape) == x.numel() for shape in e.input_shapes if shape)
        ]

    assert not activation_copies(prof)
    # The check can see a copy: a gradient in another layout needs one.
    with torch.profiler.profile(record_shapes=True) as prof:
        other_layout = grad.transpose(0, 1).contiguous().transpose(0, 1)
        torch.autograd.grad(acon_cuda.acon_c(*inputs, channel_dim=channel_dim), inputs, other_layout)
    assert activation_copies(prof)


@per_sample_kinds
def test_saves_only_inputs_for_backward(device, per_sample):
    x, _ = make_x((4, 8, 6, 6), "contiguous", torch.float32, device)
    params = make_params(x, 1, per_sample, torch.float32)
    inputs = [t.requires_grad_() for t in (x, *params)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = acon_cuda.acon_c(*inputs)
    saved_bytes = sum(t.numel() * t.element_size() for t in saved)
    allowed = sum(t.numel() * t.element_size() for t in inputs)
    assert saved_bytes <= allowed
    assert any(t.data_ptr() == x.data_ptr() for t in saved)  # x itself, not a copy
    y.sum().backward()  # and that is enough for the backward


def test_reference_saves_more(device):
    """The point of the fused op: the plain composite keeps activation-sized
    intermediates for backward."""
    x, _ = make_x((4, 8, 6, 6), "contiguous", torch.float32, device)
    inputs = [t.requires_grad_() for t in (x, *make_params(x, 1, False, torch.float32))]
    storages = set()
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: storages.add((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())) or t, lambda t: t
    ):
        reference.acon_c(*inputs)
    assert sum(n for _, n in storages) >= 3 * x.numel() * x.element_size()


@per_sample_kinds
def test_double_backward(device, per_sample):
    """create_graph=True gives differentiable gradients (gradient penalties)."""
    x, _ = make_x((2, 3, 4), "contiguous", torch.float64, device)
    inputs = [t.requires_grad_() for t in (x, *make_params(x, 1, per_sample, torch.float64))]
    assert torch.autograd.gradgradcheck(lambda *t: acon_cuda.acon_c(*t), inputs)


def test_backward_op_itself_is_not_differentiable(device):
    x, _ = make_x((2, 3, 4), "contiguous", torch.float64, device)
    inputs = [t.requires_grad_() for t in (x, *make_params(x, 1, False, torch.float64))]
    grads = torch.ops.acon.acon_c_backward(torch.ones_like(x), *inputs, 1)
    with pytest.raises(RuntimeError, match="not differentiable"):
        grads[0].sum().backward()


def test_the_op_itself_is_differentiable_once(device):
    """torch.ops.acon.acon_c_forward called directly (an exported program
    does): first-order gradients as acon_c's; differentiating them again
    raises instead of silently giving nothing (acon_c supports that)."""
    x, _ = make_x((2, 3, 4), "contiguous", torch.float64, device)
    inputs = [t.requires_grad_() for t in (x, *make_params(x, 1, False, torch.float64))]
    grads = torch.autograd.grad(torch.ops.acon.acon_c_forward(*inputs, 1).sum(), inputs, create_graph=True)
    expected = torch.autograd.grad(acon_cuda.acon_c(*inputs).sum(), inputs)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)
    with pytest.raises(RuntimeError, match="not differentiable"):
        grads[0].sum().backward()


def test_mixed_precision_keeps_x_dtype(device):
    x = torch.randn(2, 4, 3, 3, device=device, dtype=torch.bfloat16)
    p1, p2, beta = [t.requires_grad_() for t in make_params(x, 1, False, torch.float32)]
    y = acon_cuda.acon_c(x, p1, p2, beta)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert p1.grad.dtype == p2.grad.dtype == beta.grad.dtype == torch.float32


def test_accepts_c_values_with_size_one_axes_around(device):
    x = torch.randn(2, 4, 3, device=device)
    p1 = torch.randn(1, 4, 1, device=device)
    p2 = torch.randn(4, 1, device=device)
    beta = torch.randn(1, 1, 4, device=device)
    expected = reference.acon_c(x, p1, p2, beta)
    torch.testing.assert_close(acon_cuda.acon_c(x, p1, p2, beta), expected)


def call(x=None, p1=None, p2=None, beta=None, channel_dim=1):
    x = torch.randn(2, 3, 4) if x is None else x
    c = x.shape[channel_dim % x.dim()] if x.dim() > 0 else 1
    p1 = torch.randn(c) if p1 is None else p1
    p2 = torch.randn(c) if p2 is None else p2
    beta = torch.randn(c) if beta is None else beta
    return acon_cuda.acon_c(x, p1, p2, beta, channel_dim=channel_dim)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(x=torch.ones(2, 3, 4, dtype=torch.int64)), TypeError, "x must be a float"),
        (dict(x=torch.ones(2, 3, 4, dtype=torch.complex64)), TypeError, "x must be a float"),
        (dict(x=torch.ones(2, 3, 4, dtype=torch.bool)), TypeError, "x must be a float"),
        (dict(x=torch.ones(5)), ValueError, "at least 2 dimensions"),
        (dict(x=torch.ones(())), ValueError, "at least 2 dimensions"),
        (dict(channel_dim=3), ValueError, "channel_dim=3"),
        (dict(channel_dim=-4), ValueError, "channel_dim=-4"),
        (dict(p1=torch.randn(4)), ValueError, "p1 must hold C"),
        (dict(p2=torch.randn(1, 2, 1)), ValueError, "p2 must hold C"),
        (dict(beta=torch.randn(5)), ValueError, "beta must have shape"),
        (dict(beta=torch.randn(3, 3)), ValueError, "beta must have shape"),
        (dict(x=torch.randn(2, 3), beta=torch.randn(2, 2), channel_dim=0), ValueError, "per-sample beta"),
        (dict(p1=torch.randn(3, dtype=torch.float64)), TypeError, "p1 must have x's dtype"),
        (dict(x=torch.randn(2, 3, 4).bfloat16(), p2=torch.randn(3).half()), TypeError, "p2 must have x's dtype"),
        (dict(beta=torch.ones(3, dtype=torch.int32)), TypeError, "beta must have x's dtype"),
        (dict(p1=torch.randn(3, device="meta")), RuntimeError, "p1 is on meta but x is on cpu"),
        (dict(beta=torch.randn(3, device="meta")), RuntimeError, "beta is on meta but x is on cpu"),
    ],
)
def test_bad_input_raises_a_clear_error(kwargs, error, words):
    with pytest.raises(error, match=words):
        call(**kwargs)


@pytest.mark.parametrize(
    "name, value",
    [
        ("x", np.ones((2, 3, 4), dtype=np.float32)),
        ("p1", [1.0, 2.0, 3.0]),
        ("p2", np.zeros(3, dtype=np.float32)),
        ("beta", 1.0),
        ("channel_dim", 1.0),
        ("channel_dim", True),
        ("channel_dim", torch.tensor(1)),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_arguments_of_another_type_raise_a_type_error_naming_them(name, value):
    args = {
        "x": torch.randn(2, 3, 4),
        "p1": torch.randn(3),
        "p2": torch.randn(3),
        "beta": torch.ones(3),
        "channel_dim": 1,
    }
    args[name] = value
    with pytest.raises(TypeError, match=f"acon_c: {name} must be"):
        acon_cuda.acon_c(**args)


def test_bad_input_raises_under_meta_and_compile():
    x = torch.randn(2, 3, 4, device="meta")
    with pytest.raises(ValueError, match="p1 must hold C"):
        acon_cuda.acon_c(x, torch.randn(5, device="meta"), torch.randn(3, device="meta"), torch.randn(3, device="meta"))
    compiled = torch.compile(acon_cuda.acon_c, fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="beta must have shape"):
        compiled(torch.randn(2, 3, 4), torch.randn(3), torch.randn(3), torch.randn(4))


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(grad_y=torch.randn(2, 3, 5)), ValueError, "grad_y must have x's shape"),
        (dict(grad_y=torch.randn(2, 3, 4, dtype=torch.float64)), TypeError, "grad_y must have x's dtype"),
    ],
)
def test_backward_op_checks_grad_y(kwargs, error, words):
    x, p1, p2, beta = torch.randn(2, 3, 4), torch.randn(3), torch.randn(3), torch.randn(3)
    with pytest.raises(error, match=words):
        torch.ops.acon.acon_c_backward(kwargs["grad_y"], x, p1, p2, beta, 1)


def test_cpu_kernels_use_pytorchs_instruction_set():
    """The vectorised build that runs is the one PyTorch picked for its own
    CPU kernels (AVX2 on the machine of the committed benchmark results)."""
    expected = torch.backends.cpu.get_cpu_capability()
    if expected not in ("AVX512", "AVX2"):
        expected = "DEFAULT"
    assert acon_cuda.cpu_kernel_isa() == expected


def supported_isas():
    capability = torch.backends.cpu.get_cpu_capability()
    isas = ["default"]
    if capability in ("AVX2", "AVX512"):
        isas.append("avx2")
    if capability == "AVX512":
        isas.append("avx512")
    return isas


@pytest.mark.parametrize("isa", supported_isas())
def test_each_cpu_kernel_build_matches_reference(isa):
    """Each instruction-set build, forced through ATEN_CPU_CAPABILITY in a
    fresh process, passes the reference comparison, and its BatchNorm-fused
    kernels (with AconC and with MetaAconC) the comparison with the two."""
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, ATEN_CPU_CAPABILITY=isa)
    check = (
        "import acon_cuda, sys; isa = acon_cuda.cpu_kernel_isa(); "
        f"sys.exit(0 if isa == {isa.upper()!r} else 'runs ' + isa)"
    )
    subprocess.run([sys.executable, "-c", check], env=env, check=True, timeout=120)
    selections = {
        "test_acon_c.py": (
            "cpu and (float32 or bfloat16 or float64 or every_16bit) and not strided and not transposed and not params"
        ),
        "test_batch_norm_acon_c.py": "not strided and not transposed",
        "test_batch_norm_meta_acon_c.py": "not strided and not transposed",
    }
    for test_file, selection in selections.items():
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-x",
                "-p",
                "no:cacheprovider",
                os.path.join(here, test_file),
                "-k",
                selection,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
