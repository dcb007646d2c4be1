"""Meta-ACON after BatchNorm in one op (acon_cuda.meta_acon.batch_norm_meta_acon_c,
the pairs fuse_batchnorm makes of a BatchNorm and a MetaAconC) against the two
it replaces: F.batch_norm, then the MetaAconC module."""

import copy

import pytest
import torch
import torch.nn.functional as F
from cases import BATCH_NORM_LAYOUTS as LAYOUTS
from cases import BATCH_NORM_MODES as MODES
from cases import BATCH_NORM_SHAPES as SHAPES
from cases import make_x
from torch.autograd.graph import saved_tensors_hooks

from acon_cuda import MetaAconC
from acon_cuda.meta_acon import batch_norm_meta_acon_c, batch_norm_meta_acon_c_serves
from acon_cuda.testing import TEST_SEED, assert_as_accurate

_op = torch.ops.acon._batch_norm_meta_acon_c.default


def make_case(shape, layout, dtype, affine, track, norm, seed=TEST_SEED):
    """x, the BatchNorm's weight, bias and running statistics, and a
    MetaAconC whose parameters and buffers are drawn (not the initial
    values, which make some terms vanish)."""
    torch.manual_seed(seed)
    x, _ = make_x(shape, layout, dtype, "cpu")
    x = x + 2.0  # a mean away from zero
    c = shape[1]
    weight = torch.randn(c, dtype=dtype) if affine else None
    bias = torch.randn(c, dtype=dtype) if affine else None
    running = (torch.randn(c, dtype=dtype), torch.rand(c, dtype=dtype) + 0.5) if track else (None, None)
    module = MetaAconC(c, r=2, norm=norm).to(dtype)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.7)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.normal_()
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
    return x, weight, bias, running, module


def run(fused, case, training, momentum=0.1, grad_seed=1):
    """The pair's output, every gradient (x, weight, bias, then the
    module's parameters; None where absent) and every buffer it leaves
    (the BatchNorm's running statistics, then the module's)."""
    x, weight, bias, running, module = case
    module = copy.deepcopy(module).train(training)
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, bias)]
    running = [t.clone() if t is not None else None for t in running]
    args = (leaves[0], *running, leaves[1], leaves[2], training, momentum, 1e-5)
    if fused:
        assert batch_norm_meta_acon_c_serves(module, leaves[0])
        y = batch_norm_meta_acon_c(module, *args)
    else:
        y = module(F.batch_norm(*args))
    g = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(grad_seed))
    y.backward(g)
    grads = [t.grad if t is not None else None for t in leaves] + [p.grad for p in module.parameters()]
    return y, grads, running + list(module.buffers())


@pytest.mark.parametrize("norm", [True, False], ids=["norm", "no_norm"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", MODES, ids=lambda m: "train%d_affine%d_track%d" % m)
def test_matches_two_ops_float64(shape, layout, mode, norm):
    training, affine, track = mode
    if layout == "channels_last" and len(shape) not in (4, 5):
        pytest.skip("channels_last is rank 4 and 5")
    case = make_case(shape, layout, torch.float64, affine, track, norm)
    y, grads, buffers = run(True, case, training)
    y0, grads0, buffers0 = run(False, case, training)
    assert y.shape == y0.shape
    torch.testing.assert_close(y, y0, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads + buffers, grads0 + buffers0):
        assert (got is None) == (want is None)
        if got is not None:
            # dx of a BatchNorm cancels: absolute tolerance on its terms' scale.
            scale = max(want.abs().max().item(), 1.0)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-11 * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("training", [True, False])
def test_as_accurate_as_two_ops(dtype, layout, training):
    """A model converted to a lower precision (module, BatchNorm and x in
    one dtype): as close to the float64 truth as the two ops are."""
    case = make_case((8, 24, 9, 11), layout, dtype, True, True, True)

    def flat(result):
        y, grads, buffers = result
        return [y.detach(), *grads, *buffers]

    x, weight, bias, running, module = case
    wide = [t.double() if t is not None else None for t in (x, weight, bias)]
    truth_case = (*wide, [t.double() for t in running], copy.deepcopy(module).double())
    fused, plain, truth = run(True, case, training), run(False, case, training), run(False, truth_case, training)
    assert_as_accurate(flat(fused), flat(plain), flat(truth))
    assert fused[0].dtype == dtype


def op_function(training, norm, running):
    """The op as a function of its differentiable tensors, the running
    statistics fresh copies per call (the generator's BatchNorms use batch
    statistics)."""

    def fn(x, weight, bias, p1, p2, w1, b1, w2, b2, *generator_norms):
        rm, rv = (t.clone() for t in running)
        if not norm:
            return _op(x, weight, bias, rm, rv, training, 0.1, 1e-5, p1, p2, w1, b1, w2, b2)
        g1, c1, g2, c2 = generator_norms
        bn1 = (g1, c1, None, None, None, True, False, 0.1, 1e-5)
        bn2 = (g2, c2, None, None, None, True, False, 0.1, 1e-5)
        return _op(x, weight, bias, rm, rv, training, 0.1, 1e-5, p1, p2, w1, b1, w2, b2, True, *bn1, *bn2)

    return fn


def op_inputs(case, norm):
    x, weight, bias, running, module = case
    params = [module.p1, module.p2, module.fc1.weight, module.fc1.bias, module.fc2.weight, module.fc2.bias]
    if norm:
        params += [module.bn1.weight, module.bn1.bias, module.bn2.weight, module.bn2.bias]
    return [t.detach().clone().requires_grad_() for t in (x, weight, bias, *params)]


@pytest.mark.parametrize("norm", [True, False], ids=["norm", "no_norm"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "shape, layout", [((3, 4, 3, 2), "contiguous"), ((3, 4, 3, 2), "channels_last"), ((4, 3), "contiguous")]
)
def test_gradcheck(shape, layout, training, norm):
    case = make_case(shape, layout, torch.float64, True, True, norm)
    fn = op_function(training, norm, case[3])
    assert torch.autograd.gradcheck(fn, op_inputs(case, norm), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_double_backward(training):
    """Backward with create_graph=True differentiates a recomputation in
    ordinary ops, BatchNorm included."""
    case = make_case((3, 4, 3, 2), "contiguous", torch.float64, True, True, True)
    fn = op_function(training, True, case[3])
    inputs = op_inputs(case, True)
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5)


def test_backward_keeps_only_x():
    """Nothing x-sized is saved for the backward but x itself: the
    BatchNorm's output is recomputed from x, and the generator keeps (N, C)
    values."""
    x, weight, bias, running, module = make_case((4, 16, 6, 6), "channels_last", torch.float32, True, True, True)
    x.requires_grad_()
    saved = []
    with saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = batch_norm_meta_acon_c(module, x, *running, weight, bias, True, 0.1, 1e-5)
    large = [t for t in saved if t.numel() >= x.numel()]
    assert large and all(t.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for t in large)
    saved.clear()
    with saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        module(F.batch_norm(x, *running, weight, bias, True, 0.1, 1e-5))
    assert len({t.untyped_storage().data_ptr() for t in saved if t.numel() >= x.numel()}) == 2
    y.sum().backward()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_sums_do_not_depend_on_threads(layout):
    case = make_case((16, 40, 30, 31), layout, torch.float32, True, True, True)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(threads, 2)):
            torch.set_num_threads(n)
            y, grads, buffers = run(True, case, True)
            results.append([y, *grads, *buffers])
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: a.update(weight=torch.ones(4)), "weight"),
        (lambda a: a.update(running_var=torch.ones(2)), "running_var"),
        (lambda a: a.update(training=False, running_mean=None, running_var=None), "running_mean"),
        (lambda a: a.update(x=torch.randn(2, 3).int()), "x must be"),
        (lambda a: a.update(p2=torch.zeros(4)), "p2"),
        (lambda a: a.update(x=torch.randn(1, 3, 1)), "more than 1 value per channel"),
    ],
)
def test_bad_arguments_raise_before_any_state_changes(change, match):
    torch.manual_seed(TEST_SEED)
    module = MetaAconC(3, r=2)
    args = dict(
        x=torch.randn(2, 3, 4),
        weight=torch.ones(3),
        bias=torch.zeros(3),
        running_mean=torch.zeros(3),
        running_var=torch.ones(3),
        training=True,
        momentum=0.1,
        eps=1e-5,
        p1=module.p1,
        p2=module.p2,
    )
    change(args)
    bn1 = module.bn1
    counted = bn1.num_batches_tracked.clone()
    statistics = [t.clone() for t in (bn1.running_mean, module.bn2.running_var)]
    generator = (module.fc1.weight, module.fc1.bias, module.fc2.weight, module.fc2.bias, True)
    bn1_args = (bn1.weight, bn1.bias, bn1.running_mean, bn1.running_var, bn1.num_batches_tracked, True, True, 0.1, 1e-5)
    bn2 = module.bn2
    bn2_args = (bn2.weight, bn2.bias, bn2.running_mean, bn2.running_var, bn2.num_batches_tracked, True, True, 0.1, 1e-5)
    with pytest.raises((ValueError, TypeError), match=match):
        _op(*args.values(), *generator, *bn1_args, *bn2_args)
    assert torch.equal(bn1.num_batches_tracked, counted)
    assert all(torch.equal(a, b) for a, b in zip(statistics, (bn1.running_mean, module.bn2.running_var)))


def test_two_apart_where_the_op_does_not_serve():
    """torch.func, inference mode and a module with non-plain submodules
    run the two apart; the op itself serves plain eager CPU calls only."""
    x, weight, bias, running, module = make_case((4, 3, 5), "contiguous", torch.float64, True, False, True)
    assert batch_norm_meta_acon_c_serves(module, x)
    with torch.inference_mode():
        assert not batch_norm_meta_acon_c_serves(module, x)
    torch.func.grad(lambda t: (assert_not_served(module, t), t.sum())[1])(x)
    hooked = copy.deepcopy(module)
    hooked.fc1.register_forward_hook(lambda *args: None)
    assert not batch_norm_meta_acon_c_serves(hooked, x)
    assert not batch_norm_meta_acon_c_serves(MetaAconC(3, impl="reference").double(), x)


def assert_not_served(module, x):
    assert not batch_norm_meta_acon_c_serves(module, x)
