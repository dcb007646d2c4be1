"""fuse_batchnorm: BatchNorm -> ACON pairs of real models (torchvision's,
timm's) compute as before when fused, in train and eval mode, with the same
gradients, running statistics and state_dict; the pairs that cannot be fused
are left as they are and named in one warning; untraceable blocks are fused
through example_input."""

import copy
import io
import os
import sys
import warnings

import pytest
import torch
from torch import nn

import acon_cuda
from acon_cuda import AconA, AconB, AconC, MetaAconC
from acon_cuda.fuse import fuse_batchnorm, fused_pairs, unfuse_batchnorm
from acon_cuda.testing import DEVICES, TEST_SEED, device_available

torchvision = pytest.importorskip("torchvision")

# Fused and unfused float64 results agree to about 1e-13 of their scale (the
# fused op sums in another order); gradients are measured against the
# largest gradient of the step: one that cancels to zero (a BatchNorm's bias
# before another BatchNorm) keeps the rounding of the terms it sums.
TOL = 1e-11


def assert_same(actual, expected, what="", scale=None):
    assert actual.shape == expected.shape, what
    if not expected.is_floating_point():
        assert torch.equal(actual, expected), what
    elif expected.numel():
        # A model trained on a batch of 2 can overflow in eval on some draws:
        # then both must overflow alike, and the rest agree.
        finite = expected.isfinite()
        assert torch.equal(actual.isfinite(), finite), f"{what}: not finite in other places"
        actual, expected = actual[finite], expected[finite]
        if not expected.numel():
            return
        scale = expected.abs().max().item() if scale is None else scale
        error = (actual - expected).abs().max().item()
        assert error <= TOL * scale, f"{what}: error {error:.3g} at scale {scale:.3g}"


def fuse_quietly(model, **kwargs):
    """fuse_batchnorm, which must not warn."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fuse_batchnorm(model, **kwargs)


def fuse_warning(model, **kwargs):
    """fuse_batchnorm's one warning, as text."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert fuse_batchnorm(model, **kwargs) is model
    notes = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(notes) == 1, notes
    return notes[0]


def forward_backward(model, x):
    """The output and the named gradients of one training step."""
    model.zero_grad()
    out = model(x)
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(TEST_SEED), dtype=out.dtype)
    (out * target).sum().backward()
    return out.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def check_same_training(fused, unfused, x, steps=3):
    """`steps` SGD steps in train mode, then eval: the same outputs,
    gradients, parameters and buffers (running statistics,
    num_batches_tracked). After each step the unfused model takes the fused
    one's parameters, so that each step compares one step's rounding rather
    than the drift of two training runs (which BatchNorm over few values
    amplifies a hundredfold per step)."""
    fused.train()
    unfused.train()
    optimizer = torch.optim.SGD(fused.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    for step in range(steps):
        out, grads = forward_backward(fused, x)
        out_ref, grads_ref = forward_backward(unfused, x)
        assert_same(out, out_ref, f"output, step {step}")
        assert grads.keys() == grads_ref.keys()
        scale = max(g.abs().max().item() for g in grads_ref.values())
        for name in grads_ref:
            assert_same(grads[name], grads_ref[name], f"gradient of {name}, step {step}", scale)
        optimizer.step()
        with torch.no_grad():
            for p, q in zip(unfused.parameters(), fused.parameters()):
                p.copy_(q)
    state, state_ref = fused.state_dict(), unfused.state_dict()
    assert list(state) == list(state_ref)
    for key, value in state_ref.items():
        scale = None
        if key.endswith("running_mean"):  # a mean near 0 has the rounding of values of the data's spread
            scale = max(value.abs().max().item(), state_ref[key[: -len("mean")] + "var"].sqrt().max().item())
        assert_same(state[key], value, key, scale)
    fused.eval()
    unfused.eval()
    with torch.no_grad():
        assert_same(fused(x), unfused(x), "eval output")


def check_checkpoints(fused, unfused_model_factory, x):
    """A checkpoint of an unfused model loads strictly into the fused one
    (which then computes what that model does) and the other way round."""
    other = unfused_model_factory()
    fused.load_state_dict(other.state_dict(), strict=True)
    for key, value in other.state_dict().items():
        assert torch.equal(fused.state_dict()[key], value), key
    with torch.no_grad():
        assert_same(fused.eval()(x), other.eval()(x), "output after loading")
    again = unfused_model_factory()
    again.load_state_dict(fused.state_dict(), strict=True)


# What convert_activations puts after the models' BatchNorms here.
ACON_AFTER_BN = (AconC, MetaAconC)


def expected_pairs(model):
    """BatchNorm -> activation pairs by the model's layout: a BatchNorm followed
    by an ACON module in a Sequential, or a block's bn1 and its first relu (the
    torchvision ResNet blocks and stem)."""
    pairs = []
    for path, module in model.named_modules():
        prefix = f"{path}." if path else ""
        children = list(module.named_children())
        for (a, bn), (b, act) in zip(children, children[1:]):
            if isinstance(module, nn.Sequential) and isinstance(bn, nn.BatchNorm2d) and isinstance(act, ACON_AFTER_BN):
                pairs.append((prefix + a, prefix + b))
        bn1, relu = getattr(module, "bn1", None), getattr(module, "relu", None)
        if isinstance(bn1, nn.BatchNorm2d) and isinstance(relu, ACON_AFTER_BN):
            pairs.append((prefix + "bn1", prefix + "relu"))
    return sorted(pairs)


def model_input(new):
    """The models' input: a batch of 2, or 6 for MetaAconC, whose generator
    normalises over the batch: over two samples whose values nearly agree
    it divides by their tiny difference, and the rounding of any two float64
    computations drifts apart by 1e-11 to 1e-9 of the output (measured
    between the unfused model in both memory formats); over six it stays
    near 1e-14."""
    if new == "meta_acon_c":
        return torch.randn(6, 3, 48, 48, dtype=torch.float64)
    return torch.randn(2, 3, 64, 64, dtype=torch.float64)


# --- torchvision ----------------------------------------------------------------


@pytest.mark.parametrize("new", ["acon_c", "meta_acon_c"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("arch, count", [("shufflenet_v2_x0_5", 37), ("resnet18", 9)])
def test_torchvision_models_fused_compute_as_before(arch, count, channels_last, new):
    torch.manual_seed(TEST_SEED)
    x = model_input(new)

    def make():
        model = getattr(torchvision.models, arch)(num_classes=10)
        return acon_cuda.convert_activations(model.double(), new=new, example_input=x)

    model = make()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    unfused = copy.deepcopy(model)
    parameters = list(model.parameters())
    state = model.state_dict()

    assert fuse_quietly(model) is model  # ResNet's bn2 and downsample go into the add: not pairs, not reported
    pairs = fused_pairs(model)
    assert len(pairs) == count
    assert sorted(pairs) == expected_pairs(model)
    # Nothing moved: the same Parameter objects, the same state_dict.
    assert [id(p) for p in model.parameters()] == [id(p) for p in parameters]
    assert list(model.state_dict()) == list(state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    bn, act = (model.get_submodule(p) for p in pairs[0])
    kind = MetaAconC if new == "meta_acon_c" else AconC
    assert isinstance(bn, nn.BatchNorm2d) and isinstance(act, kind)
    assert f"fused with {kind.__name__} '{pairs[0][1]}'" in repr(bn)
    assert f"fused: applied by the BatchNorm '{pairs[0][0]}'" in repr(act)

    check_same_training(model, unfused, x)
    check_checkpoints(model, make, x)


# --- timm -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, count, new",
    [
        ("mobilenetv3_small_050", 23, "acon_c"),
        ("efficientnet_b0", 33, "acon_c"),
        ("regnetx_002", 27, "acon_c"),
        ("resnet18", 9, "acon_c"),
        ("mobilenetv3_small_050", 23, "meta_acon_c"),
    ],
)
def test_timm_models_fused_compute_as_before(name, count, new):
    """timm's BatchNormAct2d applies its own act (mobilenetv3, efficientnet,
    regnet); timm's ResNet blocks put drop_block, an nn.Identity, between bn1
    and act1."""
    timm = pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d

    torch.manual_seed(TEST_SEED)
    x = model_input(new)

    def make():
        model = timm.create_model(name, pretrained=False, num_classes=10)
        return acon_cuda.convert_activations(
            model.double(), old=(nn.ReLU, nn.SiLU, nn.Hardswish), new=new, example_input=x
        )

    model = make()
    # convert_activations converts the act inside timm's BatchNormAct2d too.
    kind = MetaAconC if new == "meta_acon_c" else AconC
    with_acon = [p for p, m in model.named_modules() if isinstance(m, BatchNormAct2d) and isinstance(m.act, kind)]
    unfused = copy.deepcopy(model)
    state = model.state_dict()

    fuse_quietly(model)
    pairs = fused_pairs(model)
    assert len(pairs) == count
    if with_acon:
        assert pairs == [(p, f"{p}.act") for p in with_acon]
        bn = model.get_submodule(with_acon[0])
        assert isinstance(bn, BatchNormAct2d) and type(bn.act) is kind  # its act keeps its class: it is not called
        assert f"fused with {kind.__name__} '{with_acon[0]}.act'" in repr(bn)
    else:
        assert pairs == [("bn1", "act1")] + [
            (f"layer{i}.{j}.bn1", f"layer{i}.{j}.act1") for i in range(1, 5) for j in range(2)
        ]
    assert list(model.state_dict()) == list(state)

    check_same_training(model, unfused, x)
    check_checkpoints(model, make, x)


def test_timm_norm_act_without_act_fuses_with_the_acon_after_it():
    timm = pytest.importorskip("timm")
    torch.manual_seed(TEST_SEED)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), timm.layers.BatchNormAct2d(8, apply_act=False), AconC(8), nn.Conv2d(8, 4, 1)
    ).double()
    unfused = copy.deepcopy(model)
    fuse_quietly(model)
    assert fused_pairs(model) == [("1", "2")]
    check_same_training(model, unfused, torch.randn(3, 3, 6, 6, dtype=torch.float64))


def test_timm_norm_act_with_dropout_or_hooks_is_left():
    timm = pytest.importorskip("timm")
    model = nn.Sequential(timm.layers.BatchNormAct2d(4), timm.layers.BatchNormAct2d(4))
    model[0].act, model[0].drop = AconC(4), nn.Dropout(0.1)
    model[1].act = AconC(4)
    model[1].act.register_forward_pre_hook(lambda module, args: None)
    assert left_pairs(fuse_warning(model)) == {
        "0 (BatchNormAct2d) -> 0.act (AconC)": "its drop (Dropout) is not an nn.Identity",
        "1 (BatchNormAct2d) -> 1.act (AconC)": "the ACON module has a forward pre-hook",
    }
    assert fused_pairs(model) == []


# --- Every BatchNorm flavour and ACON module ------------------------------------


@pytest.mark.parametrize("acon", [AconA, AconB, AconC, MetaAconC])
@pytest.mark.parametrize(
    "bn, shape",
    [
        (nn.BatchNorm1d(5), (4, 5)),
        (nn.BatchNorm1d(5, momentum=None), (4, 5, 3)),
        (nn.BatchNorm2d(5, affine=False), (4, 5, 3, 2)),
        (nn.BatchNorm2d(5, track_running_stats=False), (4, 5, 3, 2)),
        (nn.BatchNorm3d(5, momentum=None, affine=False), (2, 5, 2, 2, 3)),
    ],
    ids=["1d", "1d-3d-input-cumulative", "2d-no-affine", "2d-no-running-stats", "3d-cumulative"],
)
def test_batchnorm_flavours_fused_compute_as_before(bn, shape, acon):
    torch.manual_seed(TEST_SEED)
    model = nn.Sequential(copy.deepcopy(bn), acon(5)).double()
    for p in model[1].parameters():  # not the initial values, which make some terms vanish
        nn.init.uniform_(p, 0.5, 1.5)
    unfused = copy.deepcopy(model)
    fuse_quietly(model)
    assert fused_pairs(model) == [("0", "1")]
    check_same_training(model, unfused, torch.randn(shape, dtype=torch.float64))


def test_example_input_initialises_lazy_acon_modules_and_shows_the_input_rank():
    """channel_dim=-1 after a BatchNorm1d is its channel axis for (N, C) input:
    fused when the example shows that; a later (N, C, L) input runs the two
    ops, as unfused."""
    torch.manual_seed(TEST_SEED)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), AconC(channel_dim=-1), nn.Linear(5, 3)).double()
    unfused = copy.deepcopy(model)
    left = left_pairs(fuse_warning(copy.deepcopy(model)))
    assert list(left) == ["1 (BatchNorm1d) -> 2 (AconC)"]
    reasons = left["1 (BatchNorm1d) -> 2 (AconC)"]
    assert "the ACON module is lazy (its width is not known yet): pass example_input=" in reasons
    assert "channel axis 1 for 3-D input (BatchNorm1d takes 2-D and 3-D input" in reasons
    fuse_quietly(model, example_input=torch.randn(6, 4, dtype=torch.float64))
    assert fused_pairs(model) == [("1", "2")]
    unfused.load_state_dict(model.state_dict())
    check_same_training(model, unfused, torch.randn(6, 4, dtype=torch.float64))
    check_same_training(model, unfused, torch.randn(6, 5, 4, dtype=torch.float64))


# --- What is not fused ------------------------------------------------------------


class ReadTwice(nn.Module):
    """The BatchNorm's output is read by the ACON module and by the add."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.act = AconC(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return self.act(y) + y


class SharedAcon(nn.Module):
    """One ACON module after a BatchNorm and after a convolution."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.act = AconC(4)
        self.conv2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.act(self.conv2(self.act(self.bn(self.conv(x)))))


class SharedBatchNorm(nn.Module):
    """One BatchNorm called twice."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.act = AconC(3)
        self.act2 = AconC(3)

    def forward(self, x):
        return self.act(self.bn(x)) + self.act2(self.bn(x * 2))


class ModeDependent(nn.Module):
    """In eval mode the BatchNorm's output is also read by the add."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.act = AconC(3)

    def forward(self, x):
        y = self.bn(x)
        if self.training:
            return self.act(y)
        return self.act(y) + y


def hooked():
    block = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), AconC(4))
    block[1].register_forward_hook(lambda module, args, output: None)
    return block


class Cases(nn.Module):
    """Every case in one model: 4-D input x, (N, 5) input v, (N, 5, 5) input u."""

    def __init__(self):
        super().__init__()
        self.read_twice = ReadTwice()
        self.hooked = hooked()
        self.sync = nn.Sequential(nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4), AconC(4))
        self.meta = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), MetaAconC(4, r=2))
        self.meta_reference = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), MetaAconC(4, r=2, impl="reference"))
        self.shared_acon = SharedAcon()
        self.shared_bn = SharedBatchNorm()
        self.mode_dependent = ModeDependent()
        self.rank2 = nn.Sequential(nn.Linear(5, 5), nn.BatchNorm1d(5), AconC(5, channel_dim=-1))
        self.rank3 = nn.Sequential(nn.BatchNorm1d(5), AconC(5, channel_dim=-1))
        self.plain = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), AconB(4))

    def forward(self, x, v, u):
        outs = [self.read_twice(x), self.hooked(x), self.meta(x), self.meta_reference(x), self.shared_acon(x)]
        outs.append(self.shared_bn(x))
        outs += [self.mode_dependent(x), self.plain(x)]
        if isinstance(x, torch.fx.Proxy):  # traced, not run: SyncBatchNorm does not run on the CPU
            outs.append(self.sync(x))
        return sum(o.sum() for o in outs) + self.rank2(v).sum() + self.rank3(u).sum()


EXPECTED_LEFT = {
    "read_twice.bn (BatchNorm2d) -> read_twice.act (AconC)": "the BatchNorm's output is also read by add",
    "hooked.1 (BatchNorm2d) -> hooked.2 (AconC)": "the BatchNorm has a forward hook",
    "sync.1 (SyncBatchNorm) -> sync.2 (AconC)": "SyncBatchNorm is not fused",
    "meta_reference.1 (BatchNorm2d) -> meta_reference.2 (MetaAconC)": "the ACON module has impl='reference'",
    "shared_acon.bn (BatchNorm2d) -> shared_acon.act (AconC)": (
        "the ACON module is also called on 'shared_acon.conv2' in 'shared_acon.forward'"
    ),
    "shared_bn.bn (BatchNorm2d) -> shared_bn.act (AconC)": "the BatchNorm is called at 2 places in 'shared_bn.forward'",
    "shared_bn.bn (BatchNorm2d) -> shared_bn.act2 (AconC)": "the BatchNorm is called at 2 places",
    "mode_dependent.bn (BatchNorm2d) -> mode_dependent.act (AconC)": (
        "the BatchNorm's output is also read by add (in eval mode)"
    ),
    "rank3.0 (BatchNorm1d) -> rank3.1 (AconC)": (
        "the ACON module's channel_dim=-1 is not the BatchNorm's channel axis 1 for 3-D input"
    ),
}


def left_pairs(note):
    """{pair: reasons} from the warning's lines."""
    lines = note.splitlines()[1:]
    return dict(line.strip().split(": ", 1) for line in lines)


@pytest.mark.parametrize("with_example", [False, True])
def test_unfusable_pairs_are_left_and_named_in_one_warning(with_example):
    torch.manual_seed(TEST_SEED)
    model = Cases().double()
    inputs = (torch.randn(4, 3, 3, 3), torch.randn(4, 5), torch.randn(4, 5, 5))
    inputs = tuple(t.double() for t in inputs)
    classes = {path: type(m) for path, m in model.named_modules()}
    unfused = copy.deepcopy(model)

    note = fuse_warning(model, example_input=inputs if with_example else None)
    assert note.startswith("fuse_batchnorm: ")
    left = left_pairs(note)
    expected = dict(EXPECTED_LEFT)
    if not with_example:  # (N, 5) or (N, 5, L)? Only the example tells
        expected["rank2.1 (BatchNorm1d) -> rank2.2 (AconC)"] = (
            "for 3-D input (BatchNorm1d takes 2-D and 3-D input; example_input= shows which this model gives it)"
        )
    assert sorted(left) == sorted(expected)
    for pair, reason in expected.items():
        assert reason in left[pair], (pair, left[pair])
    fused = [("meta.1", "meta.2"), ("plain.1", "plain.2")] + ([("rank2.1", "rank2.2")] if with_example else [])
    assert sorted(fused_pairs(model)) == sorted(fused)
    for path, cls in classes.items():
        if not any(path in pair for pair in fused):
            assert type(model.get_submodule(path)) is cls, path
    model.train()
    unfused.train()
    assert_same(model(*inputs), unfused(*inputs))


class _TwoBranches(nn.Module):
    """Two BatchNorms and one ACON module that both branches call."""

    def __init__(self):
        super().__init__()
        self.bn_a = nn.BatchNorm2d(3)
        self.bn_b = nn.BatchNorm2d(3)
        self.act = AconC(3)

    def forward(self, x):
        return self.act(self.bn_a(x)) * self.act(self.bn_b(x + 1))


def test_shared_acon_after_two_fused_batchnorms_is_fused():
    torch.manual_seed(TEST_SEED)
    model = _TwoBranches().double()
    unfused = copy.deepcopy(model)
    fuse_quietly(model)
    assert fused_pairs(model) == [("bn_a", "act"), ("bn_b", "act")]
    assert "applied by the BatchNorm 'bn_a', 'bn_b'" in repr(model.act)
    check_same_training(model, unfused, torch.randn(4, 3, 3, 3, dtype=torch.float64))


def test_shared_acon_left_with_every_batchnorm_it_follows():
    class TwoBranches(_TwoBranches):
        def forward(self, x):
            y = self.bn_b(x)
            return self.act(self.bn_a(x)) * self.act(y) + y

    left = left_pairs(fuse_warning(TwoBranches()))
    assert left == {
        "bn_a (BatchNorm2d) -> act (AconC)": "the ACON module is also applied after 'bn_b', which is not fused",
        "bn_b (BatchNorm2d) -> act (AconC)": "the BatchNorm's output is also read by add",
    }


# --- Blocks torch.fx cannot trace ----------------------------------------------------


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Identity()
        self.act = AconC(4)

    def forward(self, x):
        if x.sum() > 0:  # torch.fx cannot trace this
            x = x * 2
        return self.act(self.drop(self.bn(self.conv(x))))


class DataDependentBranches(DataDependent):
    """The example takes one branch: the ACON module's other call is not seen."""

    def forward(self, x):
        y = self.bn(self.conv(x))
        if x.sum() > -1e9:
            return self.act(y)
        return self.act(self.conv(x))


class DataDependentInPlace(DataDependent):
    """The BatchNorm's output is changed in place before the ACON module reads
    it: not a pair."""

    def forward(self, x):
        y = self.bn(self.conv(x))
        if x.sum() > -1e9:
            y += 1
        return self.act(y)


def untraceable_model():
    return nn.Sequential(
        DataDependent(), nn.Conv2d(4, 3, 1), DataDependentBranches(), nn.Conv2d(4, 3, 1), DataDependentInPlace()
    ).double()


@pytest.mark.parametrize("with_example", [False, True], ids=["no_example", "example"])
def test_untraceable_block_is_left(with_example):
    """A run of example_input shows one path through a forward, not the
    branches it did not take: pairs in a block fx cannot trace are left, with
    or without it, and the run changes no buffer or mode."""
    torch.manual_seed(TEST_SEED)
    model = untraceable_model().train()
    before = copy.deepcopy(model)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    left = left_pairs(fuse_warning(model, example_input=x if with_example else None))
    # (The run shows 4's output changed in place before the ACON reads it: no pair.)
    sites = (0, 2) if with_example else (0, 2, 4)
    assert list(left) == [f"{i}.bn (BatchNorm2d) -> {i}.act (AconC)" for i in sites]
    reasons = left["0.bn (BatchNorm2d) -> 0.act (AconC)"]
    assert reasons.startswith("torch.fx cannot trace '0' (DataDependent) (TraceError: ")
    assert "which holds '0.bn' and '0.act'" in reasons
    assert fused_pairs(model) == []
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), before.buffers()))
    assert all(m.training for m in model.modules())


def test_example_input_that_does_not_run_raises():
    with pytest.raises(ValueError, match="fuse_batchnorm: the model cannot run example_input: RuntimeError"):
        fuse_batchnorm(untraceable_model(), example_input=torch.randn(2, 7, 5, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="fuse_batchnorm: example_input must be a tensor or a tuple"):
        fuse_batchnorm(untraceable_model(), example_input=[1, 2])
    with pytest.raises(TypeError, match="fuse_batchnorm: model must be an nn.Module"):
        fuse_batchnorm(nn.Sequential)


# --- Fusing again, copies, checkpoints --------------------------------------------


def test_fusing_twice_changes_nothing_and_fused_models_copy_and_pickle():
    torch.manual_seed(TEST_SEED)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), AconC(4), nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2), AconA(2)
    )
    model = model.double().train()
    fuse_quietly(model)
    classes = [type(m) for m in model.modules()]
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    assert fuse_quietly(model) is model
    assert fuse_quietly(model, example_input=x) is model
    assert [type(m) for m in model.modules()] == classes
    assert fused_pairs(model) == [("1", "2"), ("4", "5")]

    for copied in (copy.deepcopy(model), torch.load(save(model), weights_only=False)):
        assert fused_pairs(copied) == fused_pairs(model)
        assert copied[1]._fused_acon is copied[2]  # the copy's own ACON module
        assert [type(m) for m in copied.modules()] == classes
        check_same_training(copied, copy.deepcopy(model), x)


def save(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def _small_fused_pair_model(acon=AconC):
    """A fused pair between convolutions, in float64: fused and unfused then
    agree to float64 rounding on any CPU build."""
    torch.manual_seed(TEST_SEED)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), acon(8), nn.Conv2d(8, 4, 1)).double()
    reference_model = copy.deepcopy(model)
    fuse_batchnorm(model)
    assert fused_pairs(model) == [("1", "2")]
    return model, reference_model


@pytest.mark.parametrize("acon", [AconC, MetaAconC])
@pytest.mark.parametrize("training", [True, False])
def test_fused_model_under_torch_compile_fullgraph(training, acon):
    model, unfused = _small_fused_pair_model(acon)
    model.train(training)
    unfused.train(training)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    out = compiled(x)
    want = unfused(x)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    out.square().sum().backward()
    want.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), unfused.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-9, msg=name)
    for a, b in zip(model.buffers(), unfused.buffers()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("acon", [AconC, MetaAconC])
def test_fused_model_under_torch_export(acon):
    model, unfused = _small_fused_pair_model(acon)
    model.eval()
    unfused.eval()
    x = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    program = torch.export.export(model, (x,))
    torch.testing.assert_close(program.module()(x), unfused(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("acon", [AconC, MetaAconC])
@pytest.mark.parametrize("device", DEVICES)
def test_fused_model_on_every_device(device, acon):
    """Off the CPU the fused module runs BatchNorm, then the ACON op: the
    same results as the unfused modules."""
    if not device_available(device):
        pytest.skip(f"no {device} here")
    model, unfused = _small_fused_pair_model(acon)
    model.to(device)
    unfused.to(device)
    x = torch.randn(4, 3, 6, 6, device=device, dtype=torch.float64)
    torch.testing.assert_close(model(x), unfused(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(model[1].running_mean, unfused[1].running_mean)


@pytest.mark.parametrize("new", ["acon_c", "meta_acon_c"])
def test_fused_shufflenet_keeps_no_more_for_backward_than_relu(new):
    """With every ReLU converted to AconC (or MetaAconC) and the BatchNorms
    fused, ShuffleNetV2 keeps no more bytes for the backward than the stock
    ReLU model (the ACON's input is not kept beside the BatchNorm's). The
    parameters are left out: at this small input MetaAconC's generator
    weights (which its backward keeps, and which exist anyway) would
    outweigh the activations; the benchmark's full-size step counts them."""
    torchvision = pytest.importorskip("torchvision")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.timing import saved_bytes  # what the benchmark reports

    def saved(model, x):
        return saved_bytes(model, (x,), exclude=list(model.parameters()))

    torch.manual_seed(TEST_SEED)
    x = torch.randn(4, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    relu = torchvision.models.shufflenet_v2_x0_5().to(memory_format=torch.channels_last)
    acon = acon_cuda.convert_activations(copy.deepcopy(relu), new=new, example_input=x[:2])
    unfused = saved(acon, x)
    fuse_batchnorm(acon)
    assert saved(acon, x) <= saved(relu, x) < unfused


# --- What the graphs alone would miss (found by review) ---------------------------


class _ReadsChildMode(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn, self.act = nn.BatchNorm2d(3), AconC(3)

    def forward(self, x):
        y = self.bn(x)
        if self.bn.training:  # a child's mode, not self.training
            return self.act(y)
        return self.act(y) + y


class _ReadsGradMode(_ReadsChildMode):
    def forward(self, x):
        y = self.bn(x)
        if torch.is_grad_enabled():
            return self.act(y)
        return self.act(y) + y


class _NoGradBetween(_ReadsChildMode):
    def forward(self, x):
        y = self.bn(x)
        with torch.no_grad():
            return self.act(y)


class _StoresFeature(_ReadsChildMode):
    def forward(self, x):
        y = self.bn(x)
        self.feature = y
        return self.act(y)


class _UntraceableSibling(nn.Module):
    """b cannot be traced and holds a's ACON module, which it calls."""

    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.BatchNorm2d(3), AconC(3))
        self.b = _DataDependentCaller(self.a[1])

    def forward(self, x):
        return self.a(x) + self.b(x)


class _DataDependentCaller(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.act = act

    def forward(self, x):
        return self.act(x) if x.sum() > -1e9 else x


@pytest.mark.parametrize(
    "make, reason",
    [
        (_ReadsChildMode, "also read by add (in eval mode)"),
        (_ReadsGradMode, "torch.is_grad_enabled"),
        (_NoGradBetween, "uses the context manager torch.autograd.grad_mode.no_grad"),
        (_StoresFeature, "its forward stores on the module (feature)"),
        (_UntraceableSibling, "which holds 'a.1'"),
    ],
)
def test_pairs_a_graph_does_not_show_are_left(make, reason):
    torch.manual_seed(TEST_SEED)
    model = make().double()
    unfused = copy.deepcopy(model)
    message = fuse_warning(model)
    assert reason in message, message
    assert fused_pairs(model) == []
    assert "feature" not in model.__dict__  # tracing left nothing behind
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    for mode in (True, False):
        model.train(mode)
        unfused.train(mode)
        torch.testing.assert_close(model(x), unfused(x))


def test_fusing_again_checks_earlier_pairs():
    """A submodule fused alone, whose ACON module its parent also calls on
    something else: fusing the parent leaves the pair, unfused again."""
    torch.manual_seed(TEST_SEED)
    inner = nn.Sequential(nn.BatchNorm2d(3), AconC(3))
    model = nn.Sequential(inner, inner[1]).double()
    fuse_quietly(inner)
    assert fused_pairs(inner) == [("0", "1")]
    unfused = copy.deepcopy(model)
    unfuse_batchnorm(unfused)
    message = fuse_warning(model)
    assert "the ACON module is also called on" in message, message
    assert fused_pairs(model) == []
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(model(x), unfused(x))


def test_unfuse_restores_the_classes_for_model_surgery():
    torch.manual_seed(TEST_SEED)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), AconC(4)).double()
    classes = [type(m) for m in model.modules()]
    fuse_quietly(model)
    assert unfuse_batchnorm(model) is model
    assert [type(m) for m in model.modules()] == classes and fused_pairs(model) == []
    assert not any(name.startswith("_fused") for m in model.modules() for name in m.__dict__)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # surgery on the unfused model
    assert isinstance(model[1], nn.SyncBatchNorm)
