"""convert_activations on the paper's models and on the cases it must get
right: one ACON module per call site, the channel axis of each site, no
activation silently left, stable checkpoint keys."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import acon_cuda
from acon_cuda import AconB, AconC, MetaAconC
from acon_cuda.modules import _Acon

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
    torch.manual_seed(0)
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
    torch.manual_seed(0)
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
    torch.manual_seed(0)
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
    with pytest.warns(UserWarning, match="cannot trace"), pytest.raises(ValueError, match="share=True"):
        acon_cuda.convert_activations(Untraceable(2), channel_dim=1)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="ran 2 times"):
        acon_cuda.convert_activations(Untraceable(2), channel_dim=1, example_input=x)
    with pytest.warns(UserWarning):
        once = acon_cuda.convert_activations(Untraceable(1), channel_dim=1, example_input=x)
    assert isinstance(once.act, AconC) and once.act.width == 3
    with pytest.warns(UserWarning):
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
    torch.manual_seed(1)
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
