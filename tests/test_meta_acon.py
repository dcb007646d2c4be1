"""MetaAconC's fast path (acon_cuda/meta_acon.py) against the paper's module,
re-typed here for any rank and channel axis, in float64: outputs, every
gradient, running statistics over training steps; and what the fast path
promises about memory (no x-sized tensor but the acon op's)."""

import copy
from functools import partial

import pytest
import torch
from torch import nn
from torch.nn.utils import prune
from torch.utils._python_dispatch import TorchDispatchMode

from acon_cuda import MetaAconC
from acon_cuda.testing import TEST_SEED


class PaperLayoutMetaAconC(nn.Module):
    """The paper's MetaAconC (1x1 convolutions and BatchNorm2d on the
    (N, C, 1, 1) mean), for x of any rank with channels at ``channel_dim``."""

    def __init__(self, width, channel_dim, norm, r=16):
        super().__init__()
        hidden = max(r, width // r)
        self.channel_dim, self.norm = channel_dim, norm
        self.fc1 = nn.Conv2d(width, hidden, kernel_size=1, stride=1, bias=True)
        self.fc2 = nn.Conv2d(hidden, width, kernel_size=1, stride=1, bias=True)
        if norm:
            self.bn1 = nn.BatchNorm2d(hidden)
            self.bn2 = nn.BatchNorm2d(width)
        self.p1 = nn.Parameter(torch.randn(1, width, 1, 1))
        self.p2 = nn.Parameter(torch.randn(1, width, 1, 1))

    def forward(self, x):
        xc = x.movedim(self.channel_dim, 1)
        n, c = xc.shape[:2]
        y = xc.mean(dim=tuple(range(2, xc.dim()))) if xc.dim() > 2 else xc
        h = self.fc1(y[:, :, None, None])
        if self.norm:
            h = self.bn1(h)
        h = self.fc2(h)
        if self.norm:
            h = self.bn2(h)
        ones = [1] * (xc.dim() - 2)
        beta = torch.sigmoid(h).reshape(n, c, *ones)
        p1, p2 = self.p1.reshape(1, c, *ones), self.p2.reshape(1, c, *ones)
        out = (p1 * xc - p2 * xc) * torch.sigmoid(beta * (p1 * xc - p2 * xc)) + p2 * xc
        return out.movedim(1, self.channel_dim)


# (shape, channel_dim, memory format): ranks 2 to 5, both layouts of 4-D and
# 5-D maps, features last, 7x7 maps.
CASES = [
    ((6, 5), 1, None),
    ((3, 5, 11), 1, None),
    ((4, 5, 6, 7), 1, None),
    ((4, 5, 6, 7), 1, torch.channels_last),
    ((3, 20, 7, 7), 1, torch.channels_last),
    ((2, 5, 3, 4, 6), 1, None),
    ((2, 5, 3, 4, 6), 1, torch.channels_last_3d),
    ((3, 9, 5), -1, None),
    # Runs and row blocks longer than the CPU means' 256-value blocks.
    ((2, 3, 20, 20), 1, None),
    ((2, 3, 20, 20), 1, torch.channels_last),
]
CASE_IDS = ["NC", "NCL", "NCHW", "NHWC", "7x7-NHWC", "NCDHW", "NDHWC", "BTC", "20x20-NCHW", "20x20-NHWC"]

BATCH_NORMS = {
    "default": {},
    "cumulative": {"momentum": None},
    "no_running_stats": {"track_running_stats": False},
}


def make_pair(shape, channel_dim, norm, impl, bn_config):
    """A paper-layout module and ours with its state, float64."""
    width = shape[channel_dim]
    paper = PaperLayoutMetaAconC(width, channel_dim, norm).double()
    ours = MetaAconC(width, channel_dim=channel_dim, norm=norm, impl=impl, dtype=torch.float64)
    for module in (paper, ours):
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                for key, value in BATCH_NORMS[bn_config].items():
                    setattr(m, key, value)
                if not m.track_running_stats:
                    m.running_mean = m.running_var = m.num_batches_tracked = None
    with torch.no_grad():
        for m in paper.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.normal_()
                m.bias.normal_()
                if m.track_running_stats:
                    m.running_mean.normal_()
                    m.running_var.uniform_(0.5, 2.0)
    ours.load_state_dict(paper.state_dict(), strict=True)
    return paper, ours


def make_x(shape, fmt):
    x = 2 * torch.randn(shape, dtype=torch.float64)
    return x.contiguous(memory_format=fmt) if fmt is not None else x


def named_grads(module, out, x, grad):
    names = [name for name, _ in module.named_parameters()]
    params = [p for _, p in module.named_parameters()]
    grads = torch.autograd.grad(out, [x, *params], grad)
    return grads[0], dict(zip(names, grads[1:]))


def assert_close(actual, expected):
    # atol: fc1.bias's gradient under a training BatchNorm is a sum that
    # cancels to ~1e-13 (BatchNorm removes the batch mean).
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-10)


def assert_matches(paper, ours, x, grad, close=assert_close):
    """ours(x) against paper(x): the output, x's gradient and every
    parameter's gradient."""
    expected_out, out = paper(x), ours(x)
    close(out, expected_out)
    expected_dx, expected = named_grads(paper, expected_out, x, grad)
    dx, actual = named_grads(ours, out, x, grad)
    close(dx, expected_dx)
    for name in expected:
        close(actual[name], expected[name])


# BatchNorm settings with norm=True, and YOLOv5's norm=False.
NORMS = [(True, config) for config in BATCH_NORMS] + [(False, "default")]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("norm, bn_config", NORMS, ids=[f"norm-{c}" for c in BATCH_NORMS] + ["no_norm"])
@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize("shape, channel_dim, fmt", CASES, ids=CASE_IDS)
def test_matches_the_papers_module_over_training_steps(shape, channel_dim, fmt, impl, norm, bn_config, train):
    torch.manual_seed(TEST_SEED)
    paper, ours = make_pair(shape, channel_dim, norm, impl, bn_config)
    paper.train(train)
    ours.train(train)
    for _ in range(3):
        x = make_x(shape, fmt).requires_grad_()
        grad = torch.randn_like(x)
        expected_out = paper(x)
        out = ours(x)
        assert_close(out, expected_out)
        assert out.stride() == x.stride()
        expected_dx, expected = named_grads(paper, expected_out, x, grad)
        dx, actual = named_grads(ours, out, x, grad)
        assert_close(dx, expected_dx)
        assert dx.stride() == x.stride()
        assert actual.keys() == expected.keys()
        for name in expected:
            assert actual[name].shape == expected[name].shape, name
            assert_close(actual[name], expected[name])
        # One SGD step on both, so the next step starts elsewhere.
        with torch.no_grad():
            for name, param in paper.named_parameters():
                param -= 0.1 * expected[name]
                ours.get_parameter(name).copy_(param)
    paper_state, state = paper.state_dict(), ours.state_dict()
    assert state.keys() == paper_state.keys()
    for key in paper_state:
        assert_close(state[key], paper_state[key])


# Views the fused path must read as they are: not dense, and dense with the
# batch axis not outermost (the CPU means then take a contiguous copy).
VIEWS = {
    "strided": lambda base: base[:, :, ::2, 1:],
    "batch_inner": lambda base: base.transpose(0, 1).contiguous().transpose(0, 1),
    "channels_last_slice": lambda base: base.contiguous(memory_format=torch.channels_last)[1:],
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("view", VIEWS)
def test_views_match_the_papers_module(view, train):
    torch.manual_seed(TEST_SEED)
    x = VIEWS[view](make_x((5, 6, 8, 7), None)).requires_grad_()
    paper, ours = make_pair(tuple(x.shape), 1, True, "fused", "default")
    paper.train(train)
    ours.train(train)
    assert_matches(paper, ours, x, torch.randn_like(x))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", [None, torch.channels_last], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(8, 32, 5, 5), (4, 32, 20, 17)], ids=["5x5", "20x17"])
def test_float32_matches_the_papers_module_in_float64(shape, fmt, train):
    # The float32 module against the float64 paper-layout module (the
    # truth), no further from it than the paper-layout module run in float32
    # (with some slack): the generator's gradients are sums that BatchNorm
    # makes cancel (fc1's bias gradient is 0 in exact arithmetic), so a
    # fixed tolerance would say little. The CPU BatchNorm of the generator
    # accumulates in double as ATen's does.
    torch.manual_seed(TEST_SEED)
    paper, ours = make_pair(shape, 1, True, "fused", "default")
    paper32 = copy.deepcopy(paper).float()
    x = make_x(shape, fmt)
    grad = torch.randn_like(x)
    results = []
    for module, dtype in ((paper, torch.float64), (paper32, torch.float32), (ours.float(), torch.float32)):
        module.train(train)
        xs = x.to(dtype).requires_grad_()
        out = module(xs)
        dx, grads = named_grads(module, out, xs, grad.to(dtype))
        state = {f"state {key}": value for key, value in module.state_dict().items()}
        results.append({"out": out, "dx": dx, **grads, **state})
    truths, float32s, actuals = results
    assert actuals.keys() == truths.keys()
    for key, truth in truths.items():
        scale = max(1.0, truth.abs().max().item())
        bound = 4 * (float32s[key].double() - truth).abs().max().item() + 1e-6 * scale
        assert (actuals[key].double() - truth).abs().max().item() <= bound, key


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_inference_mode_matches_no_grad(train):
    torch.manual_seed(TEST_SEED)
    module = MetaAconC(16).train(train)
    x = torch.randn(4, 16, 5, 5)
    state = {k: v.clone() for k, v in module.state_dict().items()}
    with torch.no_grad():
        expected = module(x)
    module.load_state_dict(state)
    with torch.inference_mode():
        actual = module(x)
    torch.testing.assert_close(actual, expected)


def test_running_statistics_updated_after_an_eval_forward_raise_in_its_backward():
    module = MetaAconC(16)
    x = torch.randn(4, 16, 5, 5, requires_grad=True)
    y = module.eval()(x)  # its backward uses the running statistics
    module.train()(x)  # updates them in place
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_a_module_called_twice_in_training_backpropagates_both_calls():
    # Training BatchNorms do not use the running statistics in the backward,
    # so the second call's update must not make the first call's raise.
    torch.manual_seed(TEST_SEED)
    paper, ours = make_pair((4, 6, 5, 5), 1, True, "fused", "default")
    x = make_x((4, 6, 5, 5), None).requires_grad_()
    expected = torch.autograd.grad(paper(paper(x)).sum(), [x, *paper.parameters()])
    actual = torch.autograd.grad(ours(ours(x)).sum(), [x, *ours.parameters()])
    assert_close(actual[0], expected[0])
    names = [n for n, _ in paper.named_parameters()]
    ours_grads = dict(zip([n for n, _ in ours.named_parameters()], actual[1:]))
    for name, grad in zip(names, expected[1:]):
        assert_close(ours_grads[name], grad)


def test_direct_op_calls_are_checked_before_any_buffer_changes():
    module = MetaAconC(8)
    for x, cdim, match in (
        (torch.randn(4, 8, 3), 0, "batch axis"),
        (torch.randn(1, 8, 3), 1, "batch of 1"),
        (torch.randn(0, 8, 3), 1, "non-empty"),
    ):
        with pytest.raises(ValueError, match=match):
            torch.ops.acon._meta_acon_c(**direct_op_args(module, x, cdim, bn1_momentum=0.1))
    assert int(module.bn1.num_batches_tracked) == 0


def direct_op_args(module, x, cdim=1, **replace):
    """_meta_acon_c's arguments, by name, for a MetaAconC(norm=True) in
    training mode (bn1 with a cumulative momentum), with any replaced."""
    args = {
        "x": x, "p1": module.p1, "p2": module.p2, "w1": module.fc1.weight, "b1": module.fc1.bias,
        "w2": module.fc2.weight, "b2": module.fc2.bias, "channel_dim": cdim, "norm": True,
    }  # fmt: skip
    for prefix, bn in (("bn1", module.bn1), ("bn2", module.bn2)):
        # bn1_weight, ...: the nn.BatchNorm2d attributes of these names.
        for name in (
            "weight", "bias", "running_mean", "running_var", "num_batches_tracked",
            "training", "track_running_stats", "momentum", "eps",
        ):  # fmt: skip
            args[f"{prefix}_{name}"] = getattr(bn, name)
    args["bn1_momentum"] = None
    args.update(replace)
    return args


def inference_counter():
    with torch.inference_mode():
        return torch.zeros((), dtype=torch.long)


def state_copy(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_state_unchanged(module, before):
    after = module.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), key


@pytest.mark.parametrize(
    "replace, error, match",
    [
        ({"p1": torch.randn(1, 6, 1, 1)}, ValueError, "p1"),
        ({"p2": torch.ones(1, 8, 1, 1, dtype=torch.long)}, TypeError, "p2"),
        ({"w2": torch.randn(8, 8, 1, 1)}, ValueError, r"fc2\.weight"),
        ({"w2": torch.randn(16, 8, 1, 1, dtype=torch.float64)}, TypeError, r"fc2\.weight"),
        ({"b2": torch.randn(6)}, ValueError, r"fc2\.bias"),
        ({"bn2_weight": torch.randn(6)}, ValueError, r"bn2\.weight"),
        ({"bn2_running_var": torch.ones(6)}, ValueError, r"bn2\.running_var"),
        ({"bn2_bias": torch.zeros(8, device="meta")}, RuntimeError, r"bn2\.bias is on meta"),
        ({"x": torch.randn(4, 6, 3, 3)}, ValueError, "p1 must hold C"),  # the wrong C
        ({"x": torch.randn(4, 8, 3, 3, device="meta")}, RuntimeError, "is on meta"),
        ({"x": torch.randn(4, 8, 3, 3, dtype=torch.float64)}, TypeError, r"fc1\.weight"),
        ({"x": torch.ones(4, 8, 3, 3, dtype=torch.long)}, TypeError, "float32"),
        ({"bn2_weight": torch.ones(8, dtype=torch.float64)}, TypeError, r"bn2\.weight"),
        (
            {"bn2_num_batches_tracked": torch.zeros(2, dtype=torch.long), "bn2_momentum": None},
            ValueError,
            r"bn2\.num_batches_tracked must be a one-element",
        ),
        (
            {"bn2_num_batches_tracked": torch.zeros((), dtype=torch.long, device="meta")},
            RuntimeError,
            r"bn2\.num_batches_tracked is on meta",
        ),
        ({"bn2_num_batches_tracked": inference_counter()}, RuntimeError, r"bn2\.num_batches_tracked is an inference"),
    ],
    ids=lambda v: "-".join(v) if isinstance(v, dict) else None,
)
def test_a_direct_op_call_that_raises_changes_no_state(replace, error, match):
    torch.manual_seed(TEST_SEED)
    module = MetaAconC(8, r=2)
    before = state_copy(module)
    replace = dict(replace)
    x = replace.pop("x", torch.randn(4, 8, 3, 3))
    with pytest.raises(error, match=match):
        torch.ops.acon._meta_acon_c(**direct_op_args(module, x, **replace))
    assert_state_unchanged(module, before)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.int64, torch.bool, torch.complex64])
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_a_module_call_with_x_of_another_dtype_raises_before_counting(dtype, impl):
    module = MetaAconC(8, impl=impl)
    module.bn1.momentum = None  # counted batches set the running averages' weights
    before = state_copy(module)
    x = torch.randn(4, 8, 3, 3).to(dtype)
    match = "convert the module" if dtype.is_floating_point else "must be a float32, float64, float16 or bfloat16"
    with pytest.raises(TypeError, match=match):
        module(x)
    assert_state_unchanged(module, before)


def test_a_lazy_module_that_raises_stays_lazy():
    module = MetaAconC()
    for x in (
        torch.ones(4, 8, 3, dtype=torch.long),
        torch.randn(4, 0, 3),
        torch.randn(4),
        torch.randn(1, 8, 3),  # a batch of 1 in training mode
        torch.randn(4, 8, 3).half(),  # not the module's dtype, outside autocast
    ):
        with pytest.raises((TypeError, ValueError)):
            module(x)
        assert module.has_uninitialized_params() and not hasattr(module, "fc1")
    with pytest.raises(ValueError, match="batch axis"):
        MetaAconC(channel_dim=0)(torch.randn(4, 8, 3))
    with pytest.raises(ValueError, match="0 channels"):
        module(torch.randn(4, 0, 3))


@pytest.mark.parametrize("where", ["reference", "autocast"])
def test_the_plain_path_checks_the_generator_before_counting(where):
    module = MetaAconC(32, impl="reference" if where == "reference" else "fused")
    module.bn2 = nn.BatchNorm2d(16)  # the generator's output is 32 wide
    before = state_copy(module)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=where == "autocast"):
        with pytest.raises(ValueError, match=r"bn2\.weight has shape \(16,\)"):
            module(torch.randn(4, 32, 3, 3))
    assert_state_unchanged(module, before)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_a_lazy_module_takes_its_parents_mode(train):
    torch.manual_seed(TEST_SEED)
    model = nn.Sequential(nn.Conv2d(3, 8, 1), MetaAconC()).train(train)
    x = torch.randn(4, 3, 5, 5)
    model(x)
    meta = model[1]
    for bn in (meta.bn1, meta.bn2):
        assert bn.training == train
        assert int(bn.num_batches_tracked) == int(train)
    if not train:
        # Eval: each sample's output is its own, and a batch of 1 works.
        torch.testing.assert_close(model(x)[:2], model(x[:2]))
        model(x[:1])
        assert int(meta.bn1.num_batches_tracked) == 0


def test_a_lazy_module_loaded_from_a_checkpoint_takes_its_mode():
    source = MetaAconC(8)
    module = MetaAconC().eval()
    module.load_state_dict(source.state_dict())
    assert not module.bn1.training and not module.bn2.training


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_runs_on_the_meta_device(norm, momentum):
    module = MetaAconC(8, norm=norm, device="meta")
    if norm:
        module.bn1.momentum = module.bn2.momentum = momentum
    y = module(torch.randn(4, 8, 3, 3, device="meta"))
    assert y.shape == (4, 8, 3, 3) and y.is_meta
    lazy = MetaAconC(norm=norm, device="meta")
    assert lazy(torch.randn(4, 8, 3, 3, device="meta")).is_meta
    assert lazy.fc1.weight.is_meta


def test_a_batchnorm_on_another_device_raises():
    module = MetaAconC(8)
    module.bn1.to("meta")
    with pytest.raises(RuntimeError, match=r"bn1\.weight is on meta but x is on cpu"):
        module(torch.randn(4, 8, 3, 3))


def test_batchnorm_of_the_wrong_width_raises():
    module = MetaAconC(32)
    module.bn2 = nn.BatchNorm2d(16)  # the generator's output is 32 wide
    with pytest.raises(ValueError, match=r"bn2\.weight must have shape \(32,\)"):
        module(torch.randn(4, 32, 3, 3))


def test_frozen_parts_get_no_gradient_and_the_rest_stays_right():
    torch.manual_seed(TEST_SEED)
    paper, ours = make_pair((4, 6, 5, 5), 1, True, "fused", "default")
    for module in (paper, ours):
        module.fc1.requires_grad_(False)
        module.bn2.requires_grad_(False)
        module.p1.requires_grad_(False)
    x = make_x((4, 6, 5, 5), torch.channels_last)
    grad = torch.randn_like(x)
    for wrt_x in (True, False):
        inputs = [x.requires_grad_(wrt_x)] if wrt_x else []
        expected_out, out = paper(x), ours(x)
        trainable = [(n, p) for n, p in paper.named_parameters() if p.requires_grad]
        expected = torch.autograd.grad(expected_out, inputs + [p for _, p in trainable], grad)
        actual = torch.autograd.grad(out, inputs + [ours.get_parameter(n) for n, _ in trainable], grad)
        for a, e in zip(actual, expected):
            assert_close(a, e)
        x = x.detach()


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_double_backward_matches_the_reference_impl(train):
    torch.manual_seed(TEST_SEED)
    _, fused = make_pair((4, 6, 5, 5), 1, True, "fused", "default")
    reference = MetaAconC(6, impl="reference", dtype=torch.float64)
    reference.load_state_dict(fused.state_dict())
    fused.train(train)
    reference.train(train)
    x = make_x((4, 6, 5, 5), None)
    results = []
    for module in (fused, reference):
        xs = x.clone().requires_grad_()
        params = [xs, *module.parameters()]
        grads = torch.autograd.grad(module(xs).sin().sum(), params, create_graph=True)
        penalty = sum(g.square().sum() for g in grads)
        results.append(torch.autograd.grad(penalty, params))
    for a, e in zip(*results):
        assert_close(a, e)


class XSized(TorchDispatchMode):
    """Records the ops that return a tensor of `numel` elements in memory of
    its own (not a view of an input, not an input written in place)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.ops = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat_in = torch.utils._pytree.tree_leaves((args, kwargs))
        inputs = {t.untyped_storage().data_ptr() for t in flat_in if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() == self.numel and t.untyped_storage().data_ptr() not in inputs:
                self.ops.append(func._schema.name)
        return out


@pytest.mark.parametrize("fmt", [None, torch.channels_last], ids=["contiguous", "channels_last"])
def test_no_x_sized_tensor_but_the_acon_ops(fmt):
    module = MetaAconC(32).train()
    x = make_x((4, 32, 6, 6), fmt).float().requires_grad_()
    grad = torch.randn_like(x)
    with XSized(x.numel()) as forward:
        y = module(x)
    with XSized(x.numel()) as backward:
        torch.autograd.grad(y, [x, *module.parameters()], grad)
    assert forward.ops == ["acon::acon_c_forward"]
    assert backward.ops == ["acon::acon_c_backward"]


class Ops(TorchDispatchMode):
    """Records the name and result shape of every op it sees."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((func._schema.name, tuple(out.shape) if isinstance(out, torch.Tensor) else None))
        return out


def test_products_split_across_threads_but_whole_under_a_dispatch_mode():
    # 16 x 2048 x 128 products: above the size where the CPU splits them
    # across threads, which a TorchDispatchMode would not see, so under a
    # mode they run whole, on the calling thread.
    module = MetaAconC(2048).train()
    x = torch.randn(16, 2048, 2, 2)
    with Ops() as seen:
        module(x)
    assert [shape for name, shape in seen.ops if name == "aten::addmm"] == [(16, 128), (16, 2048)]
    if torch.get_num_threads() > 1:
        with torch.profiler.profile(record_shapes=True) as prof:
            module(x)
        outs = [e.input_shapes[-1] for e in prof.events() if e.name == "aten::addmm"]
        assert outs and all(out[1] < 2048 and out[1] != 128 for out in outs), outs


def test_small_products_are_aten_ops_under_a_dispatch_mode():
    # Small products and bias sums run in plain loops on the CPU, but a
    # TorchDispatchMode (a FLOP counter, a logger) sees them as ATen ops.
    module = MetaAconC(8).train()
    x = torch.randn(4, 8, 3, 3, requires_grad=True)
    with Ops() as forward:
        y = module(x)
    assert [shape for name, shape in forward.ops if name == "aten::addmm"] == [(4, 16), (4, 8)]
    with Ops() as backward:
        torch.autograd.grad(y, [x, *module.parameters()], torch.randn_like(y))
    assert sorted(shape for name, shape in backward.ops if name == "aten::mm") == [(4, 8), (4, 16), (8, 16), (8, 16)]
    assert sorted(shape for name, shape in backward.ops if name == "aten::sum") == [(8,), (16,)]


def test_small_generators_give_fc1_a_gradient_in_its_own_layout():
    # So that AccumulateGrad takes it without a copy (large products return
    # a transposed view, the faster product there).
    module = MetaAconC(48).train()
    x = torch.randn(8, 48, 5, 5, requires_grad=True)
    (grad,) = torch.autograd.grad(module(x), [module.fc1.weight], torch.randn_like(x))
    assert grad.is_contiguous() and grad.shape == module.fc1.weight.shape


def test_eager_calls_make_one_autograd_node():
    module = MetaAconC(8)
    x = torch.randn(2, 8, 3, 3, requires_grad=True)
    y = module(x)
    assert "MetaAconCNode" in y.grad_fn.name()
    # Its inputs are the leaves themselves: x and every parameter, no node between.
    leaves = [f.variable for f, _ in y.grad_fn.next_functions if f is not None]
    assert len(leaves) == 1 + len(list(module.parameters()))
    assert leaves[0] is x and all(any(p is leaf for leaf in leaves) for p in module.parameters())


def test_counts_batches_as_batchnorm_does():
    torch.manual_seed(TEST_SEED)
    paper, ours = make_pair((4, 6, 5), 1, True, "fused", "cumulative")
    for _ in range(3):
        x = make_x((4, 6, 5), None)
        paper(x)
        ours(x)
    assert ours.bn1.num_batches_tracked.item() == 3 == ours.bn2.num_batches_tracked.item()
    for key, value in paper.state_dict().items():
        assert_close(ours.state_dict()[key], value)
    ours.eval()
    ours(make_x((4, 6, 5), None))
    assert ours.bn1.num_batches_tracked.item() == 3


@pytest.mark.cuda
@pytest.mark.parametrize("fmt", [None, torch.channels_last], ids=["contiguous", "channels_last"])
def test_matches_the_papers_module_on_cuda(fmt):
    torch.manual_seed(TEST_SEED)
    paper, ours = make_pair((4, 20, 7, 7), 1, True, "fused", "default")
    paper, ours = paper.cuda(), ours.cuda()
    for _ in range(2):
        x = make_x((4, 20, 7, 7), fmt).cuda().requires_grad_()
        grad = torch.randn_like(x)
        assert_matches(paper, ours, x, grad)
    for key, value in paper.state_dict().items():
        assert_close(ours.state_dict()[key], value)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_float16_sums_of_large_maps_do_not_overflow(impl, train):
    # mean x count above 65504: a float16 sum would be inf.
    torch.manual_seed(TEST_SEED)
    paper, ours = make_pair((2, 8, 128, 128), 1, True, impl, "default")
    paper.train(train)
    ours = ours.half().train(train)
    # The two samples' means 1 apart: a BatchNorm of two samples whose means
    # differ by less than float16's spacing at 5 (2**-8) would normalise
    # rounding noise, in any implementation.
    x = (torch.rand(2, 8, 128, 128) + 4.5 + torch.tensor([0.0, 1.0]).view(2, 1, 1, 1)).half()
    out = ours(x)
    assert out.isfinite().all()
    torch.testing.assert_close(out.double(), paper(x.double()), rtol=2e-2, atol=2e-2)
    assert all(t.isfinite().all() for t in ours.state_dict().values())


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(0, 6, 4, 4), (3, 6, 0, 4)], ids=["empty_batch", "empty_map"])
def test_empty_inputs_behave_as_the_papers_module(shape, train):
    torch.manual_seed(TEST_SEED)
    paper, ours = make_pair(shape, 1, True, "fused", "default")
    paper.train(train)
    ours.train(train)
    x = make_x(shape, None).requires_grad_()
    assert_matches(paper, ours, x, torch.ones_like(x), close=partial(torch.testing.assert_close, equal_nan=True))
    for key, value in paper.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, equal_nan=True)


@pytest.mark.parametrize("which", ["bn1", "bn2"])
def test_a_batchnorm_without_affine_parameters(which):
    torch.manual_seed(TEST_SEED)
    paper, ours = make_pair((4, 6, 5, 5), 1, True, "fused", "default")
    for module in (paper, ours):
        width = getattr(module, which).num_features
        setattr(module, which, nn.BatchNorm2d(width, affine=False, dtype=torch.float64))
    x = make_x((4, 6, 5, 5), torch.channels_last).requires_grad_()
    grad = torch.randn_like(x)
    assert_matches(paper, ours, x, grad)


def test_batch_of_one_raises_only_where_a_batchnorm_uses_batch_statistics():
    torch.manual_seed(TEST_SEED)
    paper, ours = make_pair((1, 6, 5, 5), 1, True, "fused", "default")
    x = make_x((1, 6, 5, 5), None)
    # Training, BatchNorms frozen (fine-tuning): running statistics, fine.
    for module in (paper, ours):
        module.train()
        module.bn1.eval()
        module.bn2.eval()
    assert_close(ours(x), paper(x))
    # A BatchNorm in training mode, or one without running statistics.
    ours.eval()
    ours.bn2.train()
    with pytest.raises(ValueError, match="batch of 1 with batch statistics"):
        ours(x)
    _, no_stats = make_pair((1, 6, 5, 5), 1, True, "fused", "no_running_stats")
    with pytest.raises(ValueError, match="batch of 1 with batch statistics"):
        no_stats.eval()(x)


def test_forward_mode_dual_numbers_in_eager_code():
    torch.manual_seed(TEST_SEED)
    paper, ours = make_pair((4, 6, 5, 5), 1, True, "fused", "default")
    x, tangent = make_x((4, 6, 5, 5), None), make_x((4, 6, 5, 5), None)
    results = []
    for module in (paper, ours):
        with torch.autograd.forward_ad.dual_level():
            out = module(torch.autograd.forward_ad.make_dual(x, tangent))
            results.append(torch.autograd.forward_ad.unpack_dual(out))
    assert_close(results[1].primal, results[0].primal)
    assert_close(results[1].tangent, results[0].tangent)


def test_torch_jit_trace():
    torch.manual_seed(TEST_SEED)
    _, ours = make_pair((4, 6, 5, 5), 1, True, "fused", "default")
    ours.eval()
    x = make_x((4, 6, 5, 5), None)
    traced = torch.jit.trace(ours, (x,), check_trace=False)
    x2 = make_x((4, 6, 5, 5), None)
    assert_close(traced(x2), ours(x2))


def test_a_parametrized_p1_is_used():
    # The eager path reads p1 and p2 from _parameters where they are there;
    # a parametrization moves p1 out of them, and its value must be used.
    class Doubled(nn.Module):
        def forward(self, p):
            return 2 * p

    torch.manual_seed(TEST_SEED)
    paper, ours = make_pair((4, 6, 5, 5), 1, True, "fused", "default")
    for module in (paper, ours):
        nn.utils.parametrize.register_parametrization(module, "p1", Doubled())
    x = make_x((4, 6, 5, 5), None).requires_grad_()
    assert_matches(paper, ours, x, torch.randn_like(x))


def test_submodules_with_hooks_or_replaced_keep_their_own_forward():
    torch.manual_seed(TEST_SEED)
    paper, ours = make_pair((4, 6, 5, 5), 1, True, "fused", "default")
    calls = []
    ours.fc1.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    x = make_x((4, 6, 5, 5), None)
    assert_close(ours(x), paper(x))
    assert calls == [torch.Size([4, 16, 1, 1])]

    class ShiftedBatchNorm(nn.BatchNorm2d):
        def forward(self, h):
            return super().forward(h) + 0.25

    for module in (paper, ours):
        shifted = ShiftedBatchNorm(6, dtype=torch.float64)
        shifted.load_state_dict(module.bn2.state_dict())
        module.bn2 = shifted
        prune.l1_unstructured(module.fc2, "weight", amount=0.5)
    x = make_x((4, 6, 5, 5), None).requires_grad_()
    grad = torch.randn_like(x)
    assert_matches(paper, ours, x, grad)
