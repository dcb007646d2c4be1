"""The BatchNorm pair cases: BatchNorm2d followed by AconC, fused
(``acon_cuda.fuse_batchnorm``), against the same two modules unfused,
against BatchNorm2d followed by an in-place ReLU (the stock ConvNet pair),
and against nn.SiLU alone (no BatchNorm: the activation's own floor),
in training mode, forward and forward+backward (x and every parameter),
with inputs rotated as in the op cases (op_cases.measure_case) and the
contenders timed in interleaved blocks (timing.interleaved_medians).
"""

import math

import torch
from torch import nn

import acon_cuda

from .timing import input_copies, interleaved_medians, rotation, saved_bytes, warm_up

# (shape, layout): ResNet-50's stage 1 both ways, a ShuffleNetV2-like narrow
# map, and a wide 14x14 one (the BatchNorm fusion issue's cases).
PAIR_CASES = [
    ((16, 256, 56, 56), "channels_last"),
    ((16, 256, 56, 56), "contiguous"),
    ((32, 24, 80, 80), "channels_last"),
    ((16, 1024, 14, 14), "channels_last"),
]
PAIR_MODES = ["forward", "fwd+bwd"]


def make_pairs(width, device):
    """The contenders, each a module from BatchNorm2d (training mode)."""
    torch.manual_seed(0)
    pairs = {
        "fused": nn.Sequential(nn.BatchNorm2d(width), acon_cuda.AconC(width)),
        "bn_acon_c": nn.Sequential(nn.BatchNorm2d(width), acon_cuda.AconC(width)),
        "bn_relu": nn.Sequential(nn.BatchNorm2d(width), nn.ReLU(inplace=True)),
        "silu": nn.SiLU(),
    }
    acon_cuda.fuse_batchnorm(pairs["fused"])
    return {key: module.to(device).train() for key, module in pairs.items()}


def measure_batch_norm_pairs(device, rounds, budget_s, cases=PAIR_CASES):
    rows = []
    for shape, layout in cases:
        x_bytes = math.prod(shape) * 4
        copies = input_copies(device, x_bytes)
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        xs = [torch.randn(shape, device=device).contiguous(memory_format=fmt).requires_grad_() for _ in range(copies)]
        grads = [torch.randn_like(x) for x in xs]
        modules = make_pairs(shape[1], device)

        def calls_for(module):
            wrt = list(module.parameters())

            def forward(i):
                def call():
                    with torch.no_grad():
                        module(xs[i])

                return call

            def both(i):
                return lambda: torch.autograd.grad(module(xs[i]), [xs[i], *wrt], grads[i])

            return {"forward": rotation(forward, copies), "fwd+bwd": rotation(both, copies)}

        calls = {key: calls_for(module) for key, module in modules.items()}
        estimate = warm_up(
            {(key, mode): call for key, per_mode in calls.items() for mode, call in per_mode.items()}, device, copies
        )
        # The contenders' blocks in turn, per mode: their ratios are what
        # the table reports.
        ms = {key: {} for key in calls}
        for mode in PAIR_MODES:
            per_call = {key: calls[key][mode] for key in calls}
            medians = interleaved_medians(
                per_call, device, rounds * 5 * budget_s * len(calls), {key: estimate[(key, mode)] for key in calls}
            )
            for key, value in medians.items():
                ms[key][mode] = value
        rows.append(
            {
                "shape": list(shape),
                "layout": layout,
                "ms": ms,
                "saved_bytes": {key: saved_bytes(lambda m=m: m(xs[0]), ()) for key, m in modules.items()},
                "x_bytes": x_bytes,
            }
        )
    return rows


def pair_table(rows):
    """The pair cases as a text table: the fused pair's time as ratios."""
    head = (
        f"{'shape':<18} {'layout':<13} {'mode':<8} {'fused ms':>9} {'/ BN+AconC':>10} {'/ BN+ReLU':>9} "
        f"{'/ SiLU':>7} {'saved/x fused':>13} {'BN+AconC':>8} {'BN+ReLU':>7}"
    )
    lines = [
        "\nBatchNorm2d + AconC fused (fuse_batchnorm), training mode, float32, against BatchNorm2d + AconC, "
        "BatchNorm2d + ReLU(inplace=True) and nn.SiLU alone",
        head,
        "-" * len(head),
    ]
    for r in rows:
        ms = r["ms"]
        saved = {key: b / r["x_bytes"] for key, b in r["saved_bytes"].items()}
        for mode in PAIR_MODES:
            fused = ms["fused"][mode]
            lines.append(
                f"{'x'.join(map(str, r['shape'])):<18} {r['layout']:<13} {mode:<8} {fused:>9.2f} "
                f"{fused / ms['bn_acon_c'][mode]:>10.2f} {fused / ms['bn_relu'][mode]:>9.2f} "
                f"{fused / ms['silu'][mode]:>7.2f} "
                f"{saved['fused']:>13.2f} {saved['bn_acon_c']:>8.2f} {saved['bn_relu']:>7.2f}"
            )
    lines.append(
        "/ X: the fused pair's time over X's (lower is better); saved/x: bytes autograd keeps for the backward,\n"
        "over x's (the ReLU pair keeps the BatchNorm's input and the ReLU's output, which the next layer keeps\n"
        "anyway in a network)."
    )
    return "\n".join(lines)
