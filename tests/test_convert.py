"""convert_activations on the paper's models (and timm's) and on the cases it
must get right: one ACON module per call site, the channel axis of each site,
no activation silently left, stable checkpoint keys, blocks whose forward a
graph cannot hold (no_grad, autocast, checkpoint) left as they are, warnings
only where something changes, argument errors that name the argument."""

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import acon_cuda
from acon_cuda import AconB, AconC, MetaAconC
from acon_cuda.modules import _Acon
from acon_cuda.testing import TEST_SEED

torchvision = pytest.importorskip("torchvision")
models = torchvision.models


def acon_modules(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _Acon)]


def record_inputs(model):
    """Each ACON module's input shapes, through forward pre-hooks."""
    seen = {}
    for name, m in acon_modules(model):
        m.register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, []).append(args[0].shape))
    return seen


def calls_of(model, types, x):
    """How many times modules of `types` run in one forward pass of `model`."""
    count = [0]
    hooks = [
        m.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        for m in model.modules()
        if isinstance(m, types)
    ]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return count[0]


def check_converted(model, x, sites, channel_dim):
    """`sites` distinct ACON modules, no lazy parameter left, each as wide as
    the input it sees on `channel_dim`, and forward and backward run."""
    found = acon_modules(model)
    assert len(found) == len({id(m) for _, m in found}) == sites
    assert not any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters())
    model.train()
    seen = record_inputs(model)
    model(x).square().mean().backward()
    for name, m in found:
        assert m.channel_dim == channel_dim, name
        assert len(seen[name]) == 1, name  # one module per call
        assert seen[name][0][channel_dim] == m.width, name
        for p in m.parameters():
            assert p.grad is not None, name
    return found


@pytest.mark.parametrize("new", ["acon_c", "meta_acon_c"])
@pytest.mark.parametrize("arch, sites", [("resnet18", 17), ("resnet50", 49)])
def test_resnets_get_one_acon_per_relu_site(arch, sites, new):
    x = torch.randn(2, 3, 32, 32)
    model = getattr(models, arch)(num_classes=10)
    assert calls_of(model, nn.ReLU, x) == sites
    model = acon_cuda.convert_activations(model, new=new, example_input=x)
    found = check_converted(model, x, sites, channel_dim=1)
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    names = [name for name, _ in found]
    cls = AconC if new == "acon_c" else MetaAconC
    assert all(type(m) is cls for _, m in found)
    # The documented names: a block's first call keeps the attribute, the others are relu_1, relu_2.
    per_block = ["layer1.0.relu", "layer1.0.relu_1"] + (["layer1.0.relu_2"] if arch == "resnet50" else [])
    assert names[0] == "relu" and names[1 : len(per_block) + 1] == per_block


def test_resnet50_widths_follow_the_bottleneck():
    x = torch.randn(2, 3, 32, 32)
    model = acon_cuda.convert_activations(models.resnet50(num_classes=10), example_input=x)
    block = model.layer2[0]
    assert [block.relu.width, block.relu_1.width, block.relu_2.width] == [128, 128, 512]


def test_mobilenet_v2_names_relu6_and_converts_it_when_asked():
    model = models.mobilenet_v2(num_classes=10)
    with pytest.raises(ValueError, match=r"found ReLU6 x35.*old=nn\.ReLU6"):
        acon_cuda.convert_activations(model)
    assert sum(isinstance(m, nn.ReLU6) for m in model.modules()) == 35  # untouched
    x = torch.randn(2, 3, 32, 32)
    model = acon_cuda.convert_activations(model, old=nn.ReLU6, example_input=x)
    check_converted(model, x, 35, channel_dim=1)


@pytest.mark.parametrize("arch, old", [("efficientnet_b0", nn.SiLU), ("shufflenet_v2_x0_5", nn.ReLU)])
def test_every_site_of_efficientnet_and_shufflenet(arch, old):
    x = torch.randn(2, 3, 32, 32)
    model = getattr(models, arch)(num_classes=10)
    sites = calls_of(model, old, x)
    model = acon_cuda.convert_activations(model, example_input=x)
    check_converted(model, x, sites, channel_dim=1)
    assert not any(isinstance(m, old) for m in model.modules())


def test_convnext_gelu_is_per_feature():
    x = torch.randn(2, 3, 32, 32)
    model = acon_cuda.convert_activations(models.convnext_tiny(num_classes=10), old=nn.GELU, example_input=x)
    found = check_converted(model, x, 18, channel_dim=-1)
    assert sorted(m.width for _, m in found) == [384] * 3 + [768] * 3 + [1536] * 9 + [3072] * 3


def test_vision_transformer_gelu_is_per_feature():
    model = models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=40, num_classes=10
    )
    x = torch.randn(2, 3, 32, 32)
    model = acon_cuda.convert_activations(model, old=nn.GELU, example_input=x)
    found = check_converted(model, x, 3, channel_dim=-1)
    assert {m.width for _, m in found} == {40}


class FunctionalBlock(nn.Module):
    """Functional activations in every spelling, a shared module called at two
    widths, and an in-place activation whose input is read again."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.wide = nn.Conv2d(4, 6, 1)
        self.fc = nn.Linear(6, 5)
        self.act = nn.SiLU()

    def forward(self, x):
        h = F.silu(self.conv(x))
        h = self.act(h) + 1
        h = self.act(self.wide(h))
        t = self.fc(h.permute(0, 2, 3, 1))
        return F.silu(t).sum(-1) + h.mean(1)


def test_functional_and_shared_sites_become_modules_with_the_same_outputs():
    torch.manual_seed(TEST_SEED)
    block = FunctionalBlock()
    x = torch.randn(2, 3, 5, 5)
    before = block(x)
    # init="swish" makes each ACON-C equal SiLU: the converted block computes what it did.
    converted = acon_cuda.convert_activations(copy.deepcopy(block), old=nn.SiLU, init="swish", example_input=x)
    found = dict(acon_modules(converted))
    assert {name: (m.width, m.channel_dim) for name, m in found.items()} == {
        "act": (4, 1), "act_1": (6, 1), "silu_1": (4, 1), "silu_2": (5, -1),
    }  # fmt: skip
    torch.testing.assert_close(converted(x), before, rtol=1e-5, atol=1e-6)
    converted(x).sum().backward()
    assert type(converted).__name__ == "FunctionalBlock"


class ReluSpellings(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        a = self.conv(x)
        b = torch.relu(a) + a.relu() + F.relu(self.bn(a), inplace=True)
        c = self.bn(b) - 1.0
        self.relu(c)  # in place: the result is read through c
        return c * 2


def test_relu_spellings_and_in_place_semantics():
    torch.manual_seed(TEST_SEED)
    block = ReluSpellings().eval()
    x = torch.randn(2, 3, 5, 5)
    before = block(x)
    # A plain (not in-place) ReLU as the "new" activation must give the same result.
    converted = acon_cuda.convert_activations(copy.deepcopy(block), new=lambda: nn.ReLU())
    assert sum(isinstance(m, nn.ReLU) and not m.inplace for m in converted.modules()) == 4
    torch.testing.assert_close(converted(x), before)
    acon = acon_cuda.convert_activations(copy.deepcopy(block), example_input=x)
    assert len(acon_modules(acon)) == 4


def test_checkpoint_round_trip_into_a_fresh_conversion():
    torch.manual_seed(TEST_SEED)
    x = torch.randn(4, 3, 32, 32)
    model = acon_cuda.convert_activations(models.resnet50(num_classes=10), new="meta_acon_c", example_input=x)
    optimizer = torch.optim.SGD(acon_cuda.param_groups(model, 1e-4), lr=1e-3)
    F.cross_entropy(model(x), torch.arange(4)).backward()
    optimizer.step()
    state = model.state_dict()
    again = acon_cuda.convert_activations(models.resnet50(num_classes=10), new="meta_acon_c", example_input=x)
    assert list(again.state_dict().keys()) == list(state.keys())
    fresh = acon_cuda.convert_activations(models.resnet50(num_classes=10), new="meta_acon_c")  # lazy
    fresh.load_state_dict(state, strict=True)
    assert list(fresh.state_dict().keys()) == list(state.keys())
    model.eval()
    fresh.eval()
    assert model(x).isfinite().all()
    torch.testing.assert_close(fresh(x), model(x))
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(other(x), model(x))


def test_share_keeps_one_module_per_object():
    x = torch.randn(2, 3, 32, 32)
    model = acon_cuda.convert_activations(models.resnet18(num_classes=10), share=True, example_input=x)
    assert len({id(m) for _, m in acon_modules(model)}) == 9
    assert isinstance(model.layer1[0], models.resnet.BasicBlock)  # nothing rewritten
    model(x).sum().backward()


def test_undecided_channel_axis_names_the_site():
    net = nn.Sequential(nn.ReLU(), nn.Conv2d(3, 4, 1))
    with pytest.raises(ValueError, match=r"'0'.*channel_dim=1 or channel_dim=-1"):
        acon_cuda.convert_activations(net)
    assert isinstance(net[0], nn.ReLU)
    net = acon_cuda.convert_activations(net, channel_dim=1, example_input=torch.randn(2, 3, 4, 4))
    assert net[0].width == 3 and net[0].channel_dim == 1


class Untraceable(nn.Module):
    def __init__(self, calls):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.act = nn.ReLU()
        self.calls = calls

    def forward(self, x):
        if x.sum() > -1e9:  # data-dependent: torch.fx cannot trace it
            for _ in range(self.calls):
                x = self.act(self.conv(x))
        return x


def test_untraceable_block():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="share=True"):
        acon_cuda.convert_activations(Untraceable(2), channel_dim=1)
    with pytest.raises(ValueError, match="ran 2 times"):
        acon_cuda.convert_activations(Untraceable(2), channel_dim=1, example_input=x)
    once = acon_cuda.convert_activations(Untraceable(1), channel_dim=1, example_input=x)
    assert isinstance(once.act, AconC) and once.act.width == 3
    shared = acon_cuda.convert_activations(Untraceable(2), channel_dim=1, share=True, example_input=x)
    assert isinstance(shared.act, AconC)


class ModeDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return F.dropout(F.relu(self.conv(x)), 0.5, self.training)


def test_a_block_whose_forward_depends_on_the_mode_is_not_frozen():
    model = nn.Sequential(ModeDependent())
    with pytest.raises(ValueError, match="depends on train/eval mode"):
        acon_cuda.convert_activations(model)
    assert type(model[0]) is ModeDependent  # untouched


def test_converted_modules_follow_the_models_device_and_dtype(device):
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.SiLU()).to(device, torch.float64)
    x = torch.randn(2, 3, 5, 5, device=device, dtype=torch.float64)
    net = acon_cuda.convert_activations(net, new="meta_acon_c", r=2, example_input=x)
    assert not any(isinstance(p, nn.parameter.UninitializedParameter) for p in net.parameters())
    net(x).sum().backward()
    for p in net.parameters():
        assert p.dtype == torch.float64 and p.device.type == device


def test_dry_run_moves_no_batchnorm_statistics():
    model = models.resnet18(num_classes=10)
    before = copy.deepcopy(model.state_dict())
    model = acon_cuda.convert_activations(model, example_input=torch.randn(2, 3, 32, 32))
    assert model.training and all(m.training for m in model.modules())
    for key, value in before.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)


def test_swapping_swish_init_into_a_silu_network_keeps_its_outputs():
    torch.manual_seed(TEST_SEED + 1)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.SiLU(), nn.Conv2d(8, 8, 3), nn.SiLU(), nn.Flatten(), nn.LazyLinear(5))
    x = torch.randn(2, 3, 12, 12)
    before = net(x)
    assert acon_cuda.convert_activations(net, old=nn.SiLU, init="swish") is net  # nothing to rewrite
    assert sum(isinstance(m, AconC) for m in net.modules()) == 2
    torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-6)


def test_convert_other_targets():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Sequential(nn.Conv2d(4, 4, 1), nn.GELU()))
    acon_cuda.convert_activations(net, old=nn.GELU, new="meta_acon_c", norm=False, r=2)
    assert isinstance(net[2][1], MetaAconC) and isinstance(net[1], nn.ReLU)
    acon_cuda.convert_activations(net, new=lambda: AconB())
    assert isinstance(net[1], AconB)
    net(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match="new must be one of"):
        acon_cuda.convert_activations(net, new="swish")
    with pytest.raises(TypeError, match="keyword arguments"):
        acon_cuda.convert_activations(net, new=lambda: AconB(), init="swish")
    with pytest.raises(TypeError):
        acon_cuda.convert_activations(net, new="acon_c", widht=3)
    with pytest.raises(TypeError, match="old must be"):
        acon_cuda.convert_activations(net, old=F.relu)


def test_a_callable_with_channel_dim_is_given_the_sites_axis():
    net = acon_cuda.convert_activations(nn.Sequential(nn.Linear(3, 4), nn.ReLU()), new=AconC)
    assert isinstance(net[1], AconC) and net[1].channel_dim == -1
    net(torch.randn(2, 5, 3))
    assert net[1].width == 4


def test_compiled_resnet50_runs():
    x = torch.randn(2, 3, 32, 32)
    model = acon_cuda.convert_activations(models.resnet50(num_classes=10), example_input=x)
    # aot_eager: the same Dynamo graph capture and AOT autograd as inductor,
    # without inductor's minutes of C++ compilation on two cores.
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, model(x))
    out.sum().backward()
    assert all(m.p1.grad is not None for _, m in acon_modules(model))


def converter_warnings(record):
    return [str(w.message) for w in record if str(w.message).startswith("convert_activations")]


class UntraceableWithFunctional(Untraceable):
    def forward(self, x):
        if x.sum() > -1e9:
            x = F.relu(self.act(self.conv(x)))
        return x


class UntraceableInPlace(Untraceable):
    def __init__(self):
        super().__init__(1)
        self.act = nn.ReLU(inplace=True)


def test_an_untraceable_block_warns_only_about_what_it_changes():
    x = torch.randn(2, 3, 4, 4)
    # Its module activation is converted as it would be if it could be traced: nothing to say.
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        acon_cuda.convert_activations(Untraceable(1), channel_dim=1, example_input=x)
    assert converter_warnings(record) == []
    # A functional activation in its forward is left; an in-place one becomes an ACON module that is not.
    with pytest.warns(
        UserWarning, match=r"cannot trace the model \(UntraceableWithFunctional\).*\(relu\) are not converted"
    ):
        acon_cuda.convert_activations(UntraceableWithFunctional(1), channel_dim=1, example_input=x)
    with pytest.warns(UserWarning, match=r"in-place activations \('act'\)"):
        acon_cuda.convert_activations(UntraceableInPlace(), channel_dim=1, example_input=x)


@pytest.mark.parametrize(
    "name, old",
    [
        ("resnet18", nn.ReLU),
        ("mobilenetv3_small_100", (nn.ReLU, nn.Hardswish)),
        ("convnext_atto", nn.GELU),
        ("regnetx_002", nn.ReLU),
    ],
)
def test_timm_models_convert_without_warnings_about_their_heads(name, old):
    timm = pytest.importorskip("timm")
    torch.manual_seed(TEST_SEED)
    x = torch.randn(2, 3, 64, 64)
    model = timm.create_model(name, pretrained=False, num_classes=10)
    # timm has activation classes of its own (GELU, calling F.gelu): count them by name.
    names = {t.__name__ for t in (old if isinstance(old, tuple) else (old,))}
    sites = calls_of(model, tuple({type(m) for m in model.modules() if type(m).__name__ in names}), x)
    assert sites > 0
    # torch.fx cannot trace their classifier heads (`if pre_logits:`), which apply no activation.
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = acon_cuda.convert_activations(model, old=old, example_input=x)
    assert converter_warnings(record) == []
    assert len(acon_modules(model)) == sites
    model.train()
    optimizer = torch.optim.SGD(acon_cuda.param_groups(model, 1e-4), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    loss = F.cross_entropy(model(x), torch.tensor([1, 2]))
    loss.backward()
    optimizer.step()
    assert loss.isfinite()
    assert all(m.p1.grad is not None and m.p1.grad.isfinite().all() for _, m in acon_modules(model))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


class NoGradStem(nn.Module):
    """A frozen stem, functional activations."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.head = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        with torch.no_grad():
            f = F.relu(self.stem(x))
        return F.relu(self.head(f))


def test_a_no_grad_region_stays_frozen():
    x = torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match=r"the model \(NoGradStem\) is left as it is.*no_grad.*F\.relu"):
        net = acon_cuda.convert_activations(NoGradStem(), example_input=x)
    assert type(net) is NoGradStem  # not a GraphModule
    net(x).sum().backward()
    assert net.stem.weight.grad is None and net.head.weight.grad is not None


def same_outputs_and_grads(original, converted, x):
    """`converted` computes and differentiates as `original` (a copy of it
    before conversion) does, on x and on the parameters they share by name."""
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out1, out2 = original(x1), converted(x2)
    assert out1.dtype == out2.dtype
    torch.testing.assert_close(out2, out1, rtol=1e-5, atol=1e-6)
    out1.float().square().sum().backward()
    out2.float().square().sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-6)
    grads = dict(converted.named_parameters())
    for name, p in original.named_parameters():
        if p.grad is None:
            assert grads[name].grad is None, name
        else:
            torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)


class ConvHeadAct(nn.Module):
    """Two convolutions and a SiLU module; subclasses' forwards use them with
    something a graph cannot hold."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 8, 1)
        self.act = nn.SiLU()


class FrozenFeatures(ConvHeadAct):
    """A frozen stem's functional activation, and a module activation after it."""

    def forward(self, x):
        with torch.no_grad():
            f = F.silu(self.conv(x))
        return self.act(self.head(f))


class Autocast(ConvHeadAct):
    def forward(self, x):
        h = self.act(self.conv(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.silu(self.head(h))


class Checkpointed(ConvHeadAct):
    def forward(self, x):
        return checkpoint(self.segment, self.act(self.conv(x)), use_reentrant=False)

    def segment(self, h):
        return F.silu(self.head(h))


class RoundStraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.round()

    @staticmethod
    def backward(ctx, grad):
        return grad


class CustomFunction(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)

    def forward(self, x):
        return F.silu(RoundStraightThrough.apply(self.conv(x) * 4))


@pytest.mark.parametrize(
    "block, uses",
    [
        (FrozenFeatures, "torch.autograd.grad_mode.no_grad"),
        (Autocast, "torch.amp.autocast_mode.autocast"),
        (Checkpointed, "torch.utils.checkpoint.checkpoint"),
        (CustomFunction, "the custom autograd.Function RoundStraightThrough"),
    ],
)
def test_a_block_whose_forward_a_graph_cannot_hold_is_left_as_it_is(block, uses):
    torch.manual_seed(TEST_SEED)
    original = nn.Sequential(nn.Identity(), block())
    x = torch.randn(2, 3, 6, 6)
    # init="swish": each ACON-C computes what the SiLU it replaces did.
    with pytest.warns(UserWarning) as record:
        converted = acon_cuda.convert_activations(copy.deepcopy(original), old=nn.SiLU, init="swish", example_input=x)
    [message] = converter_warnings(record)
    assert message.startswith(f"convert_activations: '1' ({block.__name__}) is left as it is")
    assert uses in message and "F.silu (node 'silu') in 1.forward" in message
    assert type(converted[1]) is block
    # Its module activation, called once, is converted in place.
    assert [name for name, _ in acon_modules(converted)] == (["1.act"] if hasattr(converted[1], "act") else [])
    same_outputs_and_grads(original, converted, x)


def test_a_checkpointed_segment_still_recomputes():
    torch.manual_seed(TEST_SEED)
    x = torch.randn(2, 3, 6, 6)
    with pytest.warns(UserWarning, match="checkpoint"):
        block = acon_cuda.convert_activations(Checkpointed(), old=nn.SiLU, init="swish", example_input=x)
    runs = []
    block.head.register_forward_hook(lambda *_: runs.append(1))
    block(x).sum().backward()
    assert len(runs) == 2  # the forward, and again in the backward


class SharedInNoGrad(ConvHeadAct):
    def forward(self, x):
        with torch.no_grad():
            h = self.act(self.conv(x))
        return self.act(self.head(h))


def test_a_module_called_twice_in_a_frozen_block_is_left_unless_shared():
    torch.manual_seed(TEST_SEED)
    x = torch.randn(2, 3, 6, 6)
    original = SharedInNoGrad()
    with pytest.warns(UserWarning, match=r"'act' \(2 calls\).*share=True"):
        left = acon_cuda.convert_activations(copy.deepcopy(original), old=nn.SiLU, init="swish", example_input=x)
    assert type(left) is SharedInNoGrad and type(left.act) is nn.SiLU
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        shared = acon_cuda.convert_activations(
            copy.deepcopy(original), old=nn.SiLU, init="swish", share=True, example_input=x
        )
    assert converter_warnings(record) == []
    assert type(shared) is SharedInNoGrad and isinstance(shared.act, AconC)
    same_outputs_and_grads(original, shared, x)


def test_the_model_itself_an_activation_is_converted():
    x = torch.randn(2, 3, 4, 4)
    act = acon_cuda.convert_activations(nn.ReLU(), channel_dim=1, example_input=x)
    assert type(act) is AconC and act.width == 3 and act.channel_dim == 1
    assert type(acon_cuda.convert_activations(nn.SiLU(), new=lambda: nn.GELU())) is nn.GELU
    with pytest.raises(ValueError, match=r"itself an activation \(ReLU\).*channel_dim=1 or channel_dim=-1"):
        acon_cuda.convert_activations(nn.ReLU())


def test_channel_dim_goes_to_a_callable_that_takes_it():
    # The undecided-axis error asks for channel_dim=; a callable new takes it too.
    net = acon_cuda.convert_activations(nn.Sequential(nn.ReLU(), nn.Conv2d(3, 4, 1)), new=AconC, channel_dim=1)
    assert isinstance(net[0], AconC) and net[0].channel_dim == 1
    with pytest.raises(TypeError, match="takes no channel_dim"):
        acon_cuda.convert_activations(nn.Sequential(nn.ReLU(), nn.Conv2d(3, 4, 1)), new=lambda: AconB(), channel_dim=1)


@pytest.mark.parametrize(
    "arguments, error, message",
    [
        (dict(old=nn.ReLU()), TypeError, r"old must be .* got a ReLU; pass its class, old=nn\.ReLU"),
        (dict(old=F.relu), TypeError, r"old must be .* got the function relu; pass old=nn\.ReLU"),
        (dict(old=()), ValueError, r"old is empty"),
        (dict(old=nn.Module), ValueError, r"old takes activation module classes .* Module would match whole blocks"),
        (dict(new=AconC()), TypeError, r"new must be .* got an instance of AconC.*Pass new=AconC"),
        (dict(new=nn.Linear), TypeError, r"new\(\) failed for new=Linear"),
        (dict(widht=3), TypeError, r"new='acon_c' \(AconC\) with widht=3: .*widht"),
        (dict(init="swishh"), ValueError, r"new='acon_c' \(AconC\) with init='swishh'"),
        (dict(example_input=[torch.randn(2, 3, 5, 5)]), TypeError, r"example_input must be a tensor or a tuple"),
        (dict(example_input=torch.randn(2, 5, 5, 5)), ValueError, r"the model cannot run example_input: Runtime"),
        (dict(share="yes"), TypeError, r"share must be True or False"),
    ],
)
def test_argument_errors_name_the_argument_and_touch_nothing(arguments, error, message):
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
    with pytest.raises(error, match=message):
        acon_cuda.convert_activations(net, **arguments)
    assert type(net[1]) is nn.ReLU


def test_a_model_that_is_not_a_module_instance_is_named():
    with pytest.raises(TypeError, match=r"model must be an nn\.Module instance, got the function resnet18; call"):
        acon_cuda.convert_activations(models.resnet18)
    with pytest.raises(TypeError, match=r"got the class ResNet; pass an instance"):
        acon_cuda.convert_activations(models.ResNet)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_meta_acon_generators_built_by_the_dry_run_keep_the_models_mode(train):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.ReLU()).train(train)
    model = acon_cuda.convert_activations(model, new="meta_acon_c", example_input=torch.randn(2, 3, 8, 8))
    metas = [m for m in model.modules() if isinstance(m, MetaAconC)]
    assert len(metas) == 2
    for meta in metas:
        for sub in meta.modules():
            assert sub.training == train
        # The dry run moved no statistics.
        assert int(meta.bn1.num_batches_tracked) == 0 and int(meta.bn2.num_batches_tracked) == 0
        assert torch.equal(meta.bn2.running_mean, torch.zeros(meta.width))


@pytest.mark.parametrize("new", ["acon_c", "meta_acon_c"])
def test_a_model_on_the_meta_device_converts(new):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.ReLU()).to("meta")
    model = acon_cuda.convert_activations(model, new=new, example_input=torch.randn(2, 3, 8, 8, device="meta"))
    acons = [m for m in model.modules() if isinstance(m, _Acon)]
    assert [m.width for m in acons] == [8, 4]
    assert all(p.is_meta for p in model.parameters())
    assert model(torch.randn(2, 3, 8, 8, device="meta")).shape == (2, 4, 6, 6)


class FrozenNormBlock(nn.Module):
    """A block rewritten as a graph (its ReLU module is called twice) whose
    BatchNorm is frozen (eval) inside a training model."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.relu(self.conv(x))))


def test_a_rewritten_block_keeps_its_childrens_modes():
    model = nn.Sequential(FrozenNormBlock()).train()
    model[0].bn.eval()
    model = acon_cuda.convert_activations(model, example_input=torch.randn(2, 3, 4, 4))
    assert isinstance(model[0], torch.fx.GraphModule)
    assert model[0].training and not model[0].bn.training
    assert all(m.training for m in model[0].modules() if isinstance(m, AconC))


def test_a_callable_new_that_takes_no_axis_needs_none():
    # Nothing tells this ReLU's channel axis; a new that takes none does not ask.
    net = acon_cuda.convert_activations(nn.Sequential(nn.ReLU()), new=lambda: nn.Tanh())
    assert type(net[0]) is nn.Tanh
