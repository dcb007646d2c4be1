"""Deploy: models with ACON export to ONNX with standard operators only, and
onnxruntime's results match PyTorch's."""

import warnings

import pytest
import torch
from cases import make_params, make_x, per_sample_kinds
from torch import nn

import acon_cuda
from acon_cuda import AconA, AconB, AconC, MetaAconC
from acon_cuda.testing import TEST_SEED

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

MODULES = {
    "acon_a": lambda **kw: AconA(8, **kw),
    "acon_b": lambda **kw: AconB(8, **kw),
    "acon_c": lambda **kw: AconC(8, **kw),
    "meta_acon_c": lambda **kw: MetaAconC(8, r=2, **kw),
    "meta_acon_c_no_norm": lambda **kw: MetaAconC(8, r=2, norm=False, **kw),
}
EXPORTERS = pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])


def export_and_run(model, inputs, path, dynamo):
    """Exports with a plain torch.onnx.export call, runs the file in
    onnxruntime on the CPU; returns its outputs and the ONNX model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, inputs, str(path), dynamo=dynamo)
    proto = onnx.load(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: t.detach().numpy() for i, t in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(o) for o in session.run(None, feeds)], proto


def assert_standard_onnx(proto):
    """Only the default ONNX domain: no custom op a runtime would need a
    plugin for, nothing of acon_cuda."""
    nodes = list(proto.graph.node)
    for function in proto.functions:
        nodes += list(function.node)
    assert {n.domain for n in nodes} <= {"", "ai.onnx"}, {n.domain for n in nodes}
    assert not any("acon" in n.op_type.lower() for n in nodes)


@EXPORTERS
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "features_last"])
@pytest.mark.parametrize("name", list(MODULES))
def test_modules_export_and_match(tmp_path, name, layout, dynamo):
    torch.manual_seed(TEST_SEED)
    if layout == "features_last":  # (B, T, C) tokens after a Linear
        model = nn.Sequential(nn.Linear(3, 8), MODULES[name](channel_dim=-1))
        model(torch.randn(4, 5, 3))
        x = torch.randn(2, 5, 3)
    else:
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), MODULES[name]())
        model(torch.randn(4, 3, 6, 6))  # a training step's statistics, then eval
        x = torch.randn(2, 3, 6, 7)
    model.eval()
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    (out,), proto = export_and_run(model, (x,), tmp_path / "model.onnx", dynamo)
    assert_standard_onnx(proto)
    torch.testing.assert_close(out, model(x).detach(), rtol=1e-4, atol=1e-5)


@EXPORTERS
@per_sample_kinds
@pytest.mark.parametrize("layout", ["contiguous", "features_last"])
def test_bare_op_exports_and_matches(tmp_path, layout, per_sample, dynamo):
    x, channel_dim = make_x((2, 5, 4, 3), layout, torch.float32, "cpu")
    p1, p2, beta = make_params(x, channel_dim, per_sample, torch.float32)

    class Op(nn.Module):
        def forward(self, x, beta):
            return acon_cuda.acon_c(x, p1, p2, beta, channel_dim)

    (out,), proto = export_and_run(Op(), (x, beta), tmp_path / "op.onnx", dynamo)
    assert_standard_onnx(proto)
    torch.testing.assert_close(out, acon_cuda.acon_c(x, p1, p2, beta, channel_dim), rtol=1e-4, atol=1e-5)


@EXPORTERS
def test_float16_model(tmp_path, dynamo):
    """A .half() model: the graph computes in float32 between casts, as the
    kernels do, and onnxruntime's CPU provider runs it."""
    torch.manual_seed(TEST_SEED)
    model = nn.Sequential(AconC(8), MetaAconC(8, r=2, norm=False)).eval()
    x = torch.randn(2, 8, 5, 5)
    model(x)
    model = model.half()
    x = x.half()
    (out,), proto = export_and_run(model, (x,), tmp_path / "half.onnx", dynamo)
    assert_standard_onnx(proto)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, model(x).detach(), rtol=2e-3, atol=2e-3)


def test_training_still_runs_the_fused_op(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 8, 1), AconC(8))
    export_and_run(model.eval(), (torch.randn(1, 3, 4, 4),), tmp_path / "m.onnx", True)
    y = model.train()(torch.randn(2, 3, 4, 4))
    assert type(y.grad_fn)._forward_cls is acon_cuda.ops.AconCEagerFunction


@EXPORTERS
@pytest.mark.parametrize("acon", [AconC, MetaAconC])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fused_batchnorm_exports_as_batch_normalization(tmp_path, layout, dynamo, acon):
    """A BatchNorm fused with its AconC or MetaAconC (fuse_batchnorm) exports
    as the two ops it computes, in standard operators (the exporter may then
    fold the eval-mode BatchNorm into the convolution), and matches."""
    torch.manual_seed(TEST_SEED)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), acon(8))
    model(torch.randn(4, 3, 6, 6))
    acon_cuda.fuse_batchnorm(model)
    assert acon_cuda.fused_pairs(model) == [("1", "2")]
    model.eval()
    x = torch.randn(2, 3, 6, 7)
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    (out,), proto = export_and_run(model, (x,), tmp_path / "fused.onnx", dynamo)
    assert_standard_onnx(proto)
    torch.testing.assert_close(out, model(x).detach(), rtol=1e-4, atol=1e-5)
