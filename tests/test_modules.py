"""The nn.Modules: the paper's checkpoints, shapes, laziness, parameter
groups, and fitting into torch.compile, torch.export and autocast."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parameter import UninitializedParameter

import acon_cuda
from acon_cuda import AconA, AconB, AconC, MetaAconC
from acon_cuda.testing import TEST_SEED, assert_as_accurate

MODULES = {
    "acon_a": lambda **kw: AconA(**kw),
    "acon_b": lambda **kw: AconB(**kw),
    "acon_c": lambda **kw: AconC(**kw),
    "meta_acon_c": lambda **kw: MetaAconC(**kw),
    "meta_acon_c_no_norm": lambda **kw: MetaAconC(norm=False, **kw),
}


# The paper's public code (AconC, MetaAconC) and YOLOv5's MetaAconC, as they
# define parameters and compute: the checkpoints users have come from these.
class PaperAconC(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.p1 = nn.Parameter(torch.randn(1, width, 1, 1))
        self.p2 = nn.Parameter(torch.randn(1, width, 1, 1))
        self.beta = nn.Parameter(torch.ones(1, width, 1, 1))

    def forward(self, x):
        return (self.p1 * x - self.p2 * x) * torch.sigmoid(self.beta * (self.p1 * x - self.p2 * x)) + self.p2 * x


class PaperMetaAconC(nn.Module):
    def __init__(self, width, r=16):
        super().__init__()
        self.fc1 = nn.Conv2d(width, max(r, width // r), kernel_size=1, stride=1, bias=True)
        self.bn1 = nn.BatchNorm2d(max(r, width // r))
        self.fc2 = nn.Conv2d(max(r, width // r), width, kernel_size=1, stride=1, bias=True)
        self.bn2 = nn.BatchNorm2d(width)
        self.p1 = nn.Parameter(torch.randn(1, width, 1, 1))
        self.p2 = nn.Parameter(torch.randn(1, width, 1, 1))

    def forward(self, x):
        beta = torch.sigmoid(
            self.bn2(self.fc2(self.bn1(self.fc1(x.mean(dim=2, keepdims=True).mean(dim=3, keepdims=True)))))
        )
        return (self.p1 * x - self.p2 * x) * torch.sigmoid(beta * (self.p1 * x - self.p2 * x)) + self.p2 * x


class YoloMetaAconC(nn.Module):
    def __init__(self, c1, k=1, s=1, r=16):
        super().__init__()
        c2 = max(r, c1 // r)
        self.p1 = nn.Parameter(torch.randn(1, c1, 1, 1))
        self.p2 = nn.Parameter(torch.randn(1, c1, 1, 1))
        self.fc1 = nn.Conv2d(c1, c2, k, s, bias=True)
        self.fc2 = nn.Conv2d(c2, c1, k, s, bias=True)

    def forward(self, x):
        y = x.mean(dim=2, keepdims=True).mean(dim=3, keepdims=True)
        beta = torch.sigmoid(self.fc2(self.fc1(y)))
        dpx = (self.p1 - self.p2) * x
        return dpx * torch.sigmoid(beta * dpx) + self.p2 * x


def randomise_batchnorms(module):
    """Running statistics and affine parameters away from their defaults, so
    that eval-mode comparisons exercise them."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()


@pytest.mark.parametrize(
    "paper_cls, ours",
    [
        (PaperAconC, lambda w: AconC(w)),
        (PaperMetaAconC, lambda w: MetaAconC(w)),
        (YoloMetaAconC, lambda w: MetaAconC(w, norm=False)),
        (PaperAconC, lambda w: AconC()),
        (PaperMetaAconC, lambda w: MetaAconC()),
        (YoloMetaAconC, lambda w: MetaAconC(norm=False)),
    ],
    ids=["acon_c", "meta_acon_c", "yolov5_meta_acon_c", "lazy_acon_c", "lazy_meta_acon_c", "lazy_yolov5_meta_acon_c"],
)
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_loads_the_papers_checkpoints(paper_cls, ours, train):
    width = 48
    paper = paper_cls(width)
    randomise_batchnorms(paper)
    module = ours(width)
    module.load_state_dict(paper.state_dict(), strict=True)
    assert set(module.state_dict()) == set(paper.state_dict())
    paper.train(train)
    module.train(train)
    x = torch.randn(4, width, 9, 7)
    torch.testing.assert_close(module(x), paper(x), rtol=1e-5, atol=1e-5)


def explicit(name, module, x, cdim):
    """The module's function written out in plain ops, in float64."""
    shape = [1] * x.dim()
    shape[cdim] = x.shape[cdim]
    x = x.double()

    def p(t):
        return t.detach().double().reshape(shape)

    if name == "acon_a":
        return x * torch.sigmoid(p(module.beta) * x)
    if name == "acon_b":
        d = 1 - p(module.p)
        return d * x * torch.sigmoid(p(module.beta) * d * x) + p(module.p) * x
    if name == "acon_c":
        d = p(module.p1) - p(module.p2)
        return d * x * torch.sigmoid(p(module.beta) * d * x) + p(module.p2) * x
    raise AssertionError(name)


SHAPES = [((6, 5), 1), ((3, 5, 11), 1), ((2, 5, 6, 7), 1), ((2, 5, 3, 4, 6), 1), ((2, 9, 5), -1)]


@pytest.mark.parametrize("shape, channel_dim", SHAPES, ids=["NC", "NCL", "NCHW", "NCDHW", "BTC"])
@pytest.mark.parametrize("name", ["acon_a", "acon_b", "acon_c"])
def test_formula_on_every_rank(name, shape, channel_dim):
    module = MODULES[name](channel_dim=channel_dim)
    x = torch.randn(shape)
    y = module(x)
    with torch.no_grad():  # parameters away from their initial values
        for p in module.parameters():
            p.add_(0.3 * torch.randn_like(p))
    y = module(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), explicit(name, module, x, channel_dim % x.dim()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape, channel_dim", SHAPES, ids=["NC", "NCL", "NCHW", "NCDHW", "BTC"])
@pytest.mark.parametrize("name", list(MODULES))
def test_fused_and_reference_impls_agree(name, shape, channel_dim):
    """Every module, every rank: outputs and all gradients (generator
    included) match between impl="fused" and impl="reference"."""
    fused = MODULES[name](channel_dim=channel_dim)
    x = torch.randn(shape, dtype=torch.float64)
    fused = fused.double()
    fused(x)  # materialise
    ref = MODULES[name](channel_dim=channel_dim, impl="reference").double()
    ref(x)
    ref.load_state_dict(fused.state_dict())
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ys = [m(xi) for m, xi in zip((fused, ref), xs)]
    torch.testing.assert_close(ys[0], ys[1])
    grad = torch.randn_like(ys[0])
    for y in ys:
        y.backward(grad)
    torch.testing.assert_close(xs[0].grad, xs[1].grad)
    for (n, a), (_, b) in zip(fused.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=n)


def test_meta_acon_averages_every_axis_but_batch_and_channel():
    module = MetaAconC(6, r=2, channel_dim=-1, norm=False, impl="reference").double()
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    mean = x.mean(dim=(1, 2)).reshape(3, 6, 1, 1)
    beta = torch.sigmoid(module.fc2(module.fc1(mean))).reshape(3, 1, 1, 6)
    d = (module.p1 - module.p2).reshape(1, 1, 1, 6)
    expected = d * x * torch.sigmoid(beta * d * x) + module.p2.reshape(1, 1, 1, 6) * x
    torch.testing.assert_close(module(x), expected)


def test_swish_init_equals_silu():
    x = torch.randn(4, 16, 8, 8) * 4
    torch.testing.assert_close(AconC(16, init="swish")(x), F.silu(x), rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(AconA(16)(x), F.silu(x), rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(AconB(16)(x), F.silu(x), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(MODULES))
def test_lazy_width(name):
    module = MODULES[name]()
    assert module.width is None and module.has_uninitialized_params()
    assert any(isinstance(p, UninitializedParameter) for p in module.parameters())
    assert "None (lazy)" in repr(module)
    module(torch.randn(2, 24, 5, 5))
    assert module.width == 24 and not module.has_uninitialized_params()
    for name_, p in module.named_parameters():
        if "." not in name_:
            assert p.shape == (1, 24, 1, 1), name_
    assert "width=24" in repr(module)
    with pytest.raises(ValueError, match="input has 12 channels"):
        module(torch.randn(2, 12, 5, 5))


@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("lazy", [False, True], ids=["width", "lazy"])
def test_copy_pickle_and_state_dict_round_trips(name, lazy):
    module = MODULES[name]() if lazy else MODULES[name](width=10)
    x = torch.randn(3, 10, 4, 4)
    for other in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        assert repr(other) == repr(module)
    module(x)
    module.eval()
    for other in (copy.deepcopy(module), pickle.loads(pickle.dumps(module))):
        torch.testing.assert_close(other(x), module(x))
    fresh = MODULES[name]() if lazy else MODULES[name](width=10)
    fresh.load_state_dict(module.state_dict(), strict=True)
    fresh.eval()
    torch.testing.assert_close(fresh(x), module(x))


def test_extra_repr_shows_options():
    assert repr(AconC(8, channel_dim=-1, init="swish")) == "AconC(width=8, channel_dim=-1, init='swish')"
    assert "r=4, norm=False" in repr(MetaAconC(8, r=4, norm=False))
    assert "impl='reference'" in repr(AconA(8, impl="reference"))


@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda: AconC(0), ValueError, "width must be a positive int"),
        (lambda: AconC(3.5), ValueError, "width must be a positive int"),
        (lambda: AconC(4, init="zeros"), ValueError, "init must be one of"),
        (lambda: AconC(4, channel_dim=1.0), TypeError, "channel_dim must be an int"),
        (lambda: AconA(4, impl="cuda"), ValueError, "impl must be one of"),
        (lambda: MetaAconC(4, r=0), ValueError, "r must be a positive int"),
    ],
)
def test_bad_arguments(make, error, words):
    with pytest.raises(error, match=words):
        make()


def test_bad_input_shapes():
    with pytest.raises(ValueError, match="rank >= 2"):
        AconC()(torch.randn(5))
    with pytest.raises(ValueError, match="channel_dim=3 is out of range"):
        AconC(channel_dim=3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="batch axis 0"):
        MetaAconC(channel_dim=0)(torch.randn(4, 3, 5))


def test_meta_acon_batch_of_one():
    x = torch.randn(1, 32, 6, 6)
    with pytest.raises(ValueError, match="norm=False"):
        MetaAconC(32)(x)
    MetaAconC(32, norm=False)(x).sum().backward()
    MetaAconC(32).eval()(x)


def test_param_groups():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), AconC(), nn.Conv2d(8, 8, 1), MetaAconC(), AconB())
    with pytest.raises(ValueError, match="run one forward pass"):
        acon_cuda.param_groups(net, 1e-4)
    net(torch.randn(2, 3, 8, 8))
    groups = acon_cuda.param_groups(net, 1e-4)
    decayed, free = groups
    assert decayed["weight_decay"] == 1e-4 and free["weight_decay"] == 0.0
    acon = {id(p) for p in (net[2].p1, net[2].p2, net[2].beta, net[4].p1, net[4].p2, net[5].p, net[5].beta)}
    assert {id(p) for p in free["params"]} == acon
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(all_ids) == sorted(id(p) for p in net.parameters())
    torch.optim.SGD(groups, lr=0.1, momentum=0.9)


def small_net(activation):
    torch.manual_seed(TEST_SEED)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        activation(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        activation(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )


@pytest.mark.parametrize("name", list(MODULES))
def test_torch_compile_fullgraph_matches_eager(name):
    net = small_net(MODULES[name])
    x = torch.randn(4, 3, 10, 10)
    net(x)  # materialise the lazy modules before compiling
    net64 = copy.deepcopy(net).double()

    def outputs_and_grads(model, x):
        out = model(x)
        return [out, *torch.autograd.grad(out.square().sum(), list(model.parameters()))]

    torch._dynamo.reset()  # each case compiles the modules' code for two dtypes
    # The same math: in float64 the two paths agree to float64 rounding.
    truth = outputs_and_grads(net64, x.double())
    compiled64 = outputs_and_grads(torch.compile(net64, fullgraph=True, backend="aot_eager"), x.double())
    scale = max(t.abs().max().item() for t in truth)
    for a, b in zip(compiled64, truth):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12 * scale)
    # In float32 each path rounds in its own order: the compiled one must be
    # as accurate as eager, measured against float64.
    eager = outputs_and_grads(net, x)
    compiled = outputs_and_grads(torch.compile(net, fullgraph=True, backend="aot_eager"), x)
    assert_as_accurate(compiled, eager, truth)


@pytest.mark.parametrize("name", list(MODULES))
def test_torch_export(name):
    net = small_net(MODULES[name])
    x = torch.randn(4, 3, 10, 10)
    net(x)
    net.eval()
    exported = torch.export.export(net, (x,))
    assert any("acon" in str(node.target) for node in exported.graph.nodes)
    x2 = torch.randn(4, 3, 10, 10)
    torch.testing.assert_close(exported.module()(x2), net(x2))


def autocast_cases():
    yield pytest.param("cpu", torch.bfloat16, id="cpu-bfloat16")
    yield pytest.param(
        "cuda",
        torch.float16,
        id="cuda-float16",
        marks=pytest.mark.cuda,
    )


@pytest.mark.parametrize("device_type, dtype", list(autocast_cases()))
@pytest.mark.parametrize("name", list(MODULES))
def test_autocast_keeps_the_autocast_dtype(name, device_type, dtype):
    conv = nn.Conv2d(3, 8, 3).to(device_type)
    act = MODULES[name]().to(device_type)
    x = torch.randn(2, 3, 9, 9, device=device_type)
    act(conv(x))  # materialise in float32
    with torch.autocast(device_type, dtype=dtype):
        h = conv(x)
        y = act(h)
    assert h.dtype == dtype and y.dtype == dtype
    assert all(p.dtype == torch.float32 for p in act.parameters())
    y.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in act.parameters())
