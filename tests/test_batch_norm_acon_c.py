"""BatchNorm fused with ACON-C (acon_cuda.batch_norm) against the two ops it
replaces, F.batch_norm then acon_c."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from cases import BATCH_NORM_LAYOUTS as LAYOUTS
from cases import BATCH_NORM_MODES as MODES
from cases import BATCH_NORM_SHAPES as SHAPES
from cases import BATCH_NORM_WRAPPING_SHAPE, make_x
from torch.autograd.graph import saved_tensors_hooks

from acon_cuda import reference
from acon_cuda.batch_norm import BatchNormAconCFunction, batch_norm_acon_c, batch_norm_acon_c_plain
from acon_cuda.testing import assert_as_accurate


def make_case(shape, layout, dtype, affine, track, param_dtype=None, seed=0):
    torch.manual_seed(seed)
    x, _ = make_x(shape, layout, dtype, "cpu")
    x = x + 2.0  # a mean away from zero
    c = shape[1]
    pd = param_dtype or dtype
    weight = torch.randn(c, dtype=pd) if affine else None
    bias = torch.randn(c, dtype=pd) if affine else None
    running = (torch.randn(c, dtype=pd), torch.rand(c, dtype=pd) + 0.5) if track else (None, None)
    p1, p2, beta = (torch.randn(1, c, *[1] * (len(shape) - 2), dtype=pd) for _ in range(3))
    return x, weight, bias, running, (p1, p2, beta + 0.5)


def run(fn, x, weight, bias, running, acon, training, momentum=0.1, grad_seed=1):
    """fn's output, every gradient (x, weight, bias, p1, p2, beta; None
    where absent) and the running statistics it leaves."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, bias, *acon)]
    running = [t.clone() if t is not None else None for t in running]
    y = fn(leaves[0], *running, leaves[1], leaves[2], training, momentum, 1e-5, *leaves[3:])
    g = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(grad_seed))
    y.backward(g)
    return y, [t.grad if t is not None else None for t in leaves], running


@pytest.mark.parametrize("shape", [*SHAPES, BATCH_NORM_WRAPPING_SHAPE], ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES, ids=lambda m: "train%d_affine%d_track%d" % m)
def test_matches_two_ops_float64(shape, layout, mode):
    training, affine, track = mode
    if layout == "channels_last" and len(shape) not in (4, 5):
        pytest.skip("channels_last is rank 4 and 5")
    x, weight, bias, running, acon = make_case(shape, layout, torch.float64, affine, track)
    y, grads, stats = run(batch_norm_acon_c, x, weight, bias, running, acon, training)
    y0, grads0, stats0 = run(batch_norm_acon_c_plain, x, weight, bias, running, acon, training)
    assert y.shape == y0.shape
    torch.testing.assert_close(y, y0, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads + stats, grads0 + stats0):
        assert (got is None) == (want is None)
        if got is not None:
            # dx of a BatchNorm cancels (it is orthogonal to 1 and x per
            # channel): absolute tolerance on the scale of its terms.
            scale = max(want.abs().max().item(), 1.0)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-11 * scale)


def test_keeps_memory_format():
    x, weight, bias, running, acon = make_case((2, 8, 5, 3), "channels_last", torch.float32, True, True)
    y = batch_norm_acon_c(x, *running, weight, bias, True, 0.1, 1e-5, *acon)
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False])
def test_as_accurate_as_two_ops(dtype, layout, training):
    """Lower precision (16-bit x with float32 parameters, as under autocast):
    the fused pair is as close to the float64 truth as the two ops are."""
    shape = (8, 24, 9, 11)
    param_dtype = torch.float32
    x, weight, bias, running, acon = make_case(shape, layout, dtype, True, True, param_dtype=param_dtype)
    fused = run(batch_norm_acon_c, x, weight, bias, running, acon, training)
    plain = run(batch_norm_acon_c_plain, x, weight, bias, running, acon, training)

    def to64(t):
        return t.double() if t is not None else None

    truth = run(
        batch_norm_acon_c_plain,
        to64(x),
        to64(weight),
        to64(bias),
        [to64(t) for t in running],
        [t.double() for t in acon],
        training,
    )

    def flat(result):
        y, grads, stats = result
        return [y.detach(), *grads, *stats]

    assert_as_accurate(flat(fused), flat(plain), flat(truth))
    assert fused[0].dtype == dtype and fused[1][0].dtype == dtype


def test_gradcheck():
    for training, (shape, layout) in itertools.product(
        [True, False], [((3, 4, 3, 2), "contiguous"), ((3, 4, 3, 2), "channels_last"), ((5, 3), "contiguous")]
    ):
        x, weight, bias, running, acon = make_case(shape, layout, torch.float64, True, True)
        inputs = [t.detach().clone().requires_grad_() for t in (x, weight, bias, *acon)]

        def fn(x, weight, bias, p1, p2, beta):
            rm, rv = (t.clone() for t in running)
            return BatchNormAconCFunction.apply(x, rm, rv, weight, bias, training, 0.1, 1e-5, p1, p2, beta)

        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_double_backward(training):
    x, weight, bias, running, acon = make_case((4, 3, 5), "contiguous", torch.float64, True, True)

    def grad_norm(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (x, weight, bias, *acon)]
        rm, rv = (t.clone() for t in running)
        y = fn(leaves[0], rm, rv, leaves[1], leaves[2], training, 0.1, 1e-5, *leaves[3:])
        gx, gp1 = torch.autograd.grad((y * y).sum(), [leaves[0], leaves[3]], create_graph=True)
        (gx.square().sum() + gp1.square().sum()).backward()
        return [t.grad for t in leaves]

    for got, want in zip(grad_norm(batch_norm_acon_c), grad_norm(batch_norm_acon_c_plain)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_backward_keeps_only_x():
    """Nothing x-sized is saved for the backward but x itself (the BatchNorm's
    output is recomputed from x and the per-channel statistics)."""
    x, weight, bias, running, acon = make_case((4, 16, 6, 6), "channels_last", torch.float32, True, True)
    x.requires_grad_()
    saved = []
    with saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = batch_norm_acon_c(x, *running, weight, bias, True, 0.1, 1e-5, *acon)
    large = [t for t in saved if t.numel() >= x.numel()]
    assert large and all(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in large)
    # The two ops keep the BatchNorm's output as well.
    saved.clear()
    with saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        batch_norm_acon_c_plain(x, *running, weight, bias, True, 0.1, 1e-5, *acon)
    assert len({t.untyped_storage().data_ptr() for t in saved if t.numel() >= x.numel()}) == 2
    y.sum().backward()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_sums_do_not_depend_on_threads(layout):
    x, weight, bias, running, acon = make_case((16, 40, 30, 31), layout, torch.float32, True, True)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(threads, 2)):
            torch.set_num_threads(n)
            y, grads, stats = run(batch_norm_acon_c, x, weight, bias, running, acon, True)
            results.append([y, *grads, *stats])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_empty_batch_keeps_running_stats():
    x, weight, bias, running, acon = make_case((0, 3, 4, 4), "contiguous", torch.float32, True, True)
    y, grads, stats = run(batch_norm_acon_c, x, weight, bias, running, acon, True)
    assert y.shape == x.shape
    torch.testing.assert_close(stats[0], running[0])
    assert float(grads[1].abs().sum()) == 0.0


def test_momentum_and_cumulative_average():
    """A momentum of 1 / count (what nn.BatchNorm passes for momentum=None)
    gives the same running statistics as the two ops."""
    x, weight, bias, running, acon = make_case((6, 5, 4), "contiguous", torch.float64, True, True)
    for momentum in (0.0, 1.0, 1.0 / 3):
        _, _, stats = run(batch_norm_acon_c, x, weight, bias, running, acon, True, momentum)
        _, _, stats0 = run(batch_norm_acon_c_plain, x, weight, bias, running, acon, True, momentum)
        for a, b in zip(stats, stats0):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.update(beta=torch.ones(2, 3)), "beta"),
        (lambda a: a.update(weight=torch.ones(4)), "weight"),
        (lambda a: a.update(running_var=torch.ones(2)), "running_var"),
        (lambda a: a.update(x=torch.randn(1, 3)), "more than 1 value per channel"),
        (lambda a: a.update(training=False, running_mean=None, running_var=None), "running_mean"),
        (lambda a: a.update(x=torch.randn(2, 3).int()), "x must be"),
    ],
)
def test_bad_arguments_raise(change, match):
    args = dict(
        x=torch.randn(2, 3),
        running_mean=torch.zeros(3),
        running_var=torch.ones(3),
        weight=torch.ones(3),
        bias=torch.zeros(3),
        training=True,
        momentum=0.1,
        eps=1e-5,
        p1=torch.ones(3),
        p2=torch.zeros(3),
        beta=torch.ones(3),
    )
    change(args)
    with pytest.raises((ValueError, TypeError), match=match):
        batch_norm_acon_c(**args)


def test_torch_compile_fullgraph():
    x, weight, bias, running, acon = make_case((4, 6, 5, 5), "channels_last", torch.float32, True, True)
    compiled = torch.compile(batch_norm_acon_c, fullgraph=True, backend="aot_eager")
    rm, rv = (t.clone() for t in running)
    xl = x.clone().requires_grad_()
    y = compiled(xl, rm, rv, weight, bias, True, 0.1, 1e-5, *acon)
    y.sum().backward()
    rm0, rv0 = (t.clone() for t in running)
    x0 = x.clone().requires_grad_()
    want = batch_norm_acon_c(x0, rm0, rv0, weight, bias, True, 0.1, 1e-5, *acon)
    want.sum().backward()
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(xl.grad, x0.grad)
    torch.testing.assert_close(rm, rm0)
    torch.testing.assert_close(rv, rv0)


def test_torch_func_uses_two_ops():
    x, weight, bias, running, acon = make_case((4, 3, 5), "contiguous", torch.float64, True, False)

    def f(fn, x):
        return fn(x, None, None, weight, bias, True, 0.1, 1e-5, *acon).square().sum()

    got = torch.func.grad(lambda x: f(batch_norm_acon_c, x))(x)
    want = torch.func.grad(lambda x: f(batch_norm_acon_c_plain, x))(x)
    torch.testing.assert_close(got, want)


def test_reference_acon_is_what_follows_batch_norm():
    """The two-op form is what the docs say: F.batch_norm, then ACON-C."""
    x, weight, bias, running, acon = make_case((3, 4, 5), "contiguous", torch.float64, True, True)
    y = batch_norm_acon_c(x, *[t.clone() for t in running], weight, bias, False, 0.1, 1e-5, *acon)
    z = F.batch_norm(x, *running, weight, bias, False, 0.1, 1e-5)
    torch.testing.assert_close(y, reference.acon_c(z, *acon, 1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("training", [True, False])
def test_opcheck(training):
    """The ops' schemas (running statistics mutated), fake kernels and
    autograd-free dispatch, as torch.library.opcheck checks them."""
    x, weight, bias, running, acon = make_case((4, 5, 3, 3), "channels_last", torch.float64, True, True)
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    forward = torch.ops.acon.batch_norm_acon_c_forward.default
    args = (x, weight, bias, *[t.clone() for t in running], *acon, training, 0.1, 1e-5)
    torch.library.opcheck(forward, args, test_utils=utils)
    y, mean, invstd = forward(*args)
    grad = torch.randn_like(y)
    backward_args = (grad, x, weight, bias, mean, invstd, *acon, training, [True, True, True])
    torch.library.opcheck(torch.ops.acon.batch_norm_acon_c_backward.default, backward_args, test_utils=utils)
