"""The Meta-ACON module cases: MetaAconC in training mode, forward+backward
(x and every parameter), against the fused AconC module, the paper's
MetaAconC and nn.SiLU.
"""

import math
import statistics

import torch

import acon_cuda

from .paper import PaperMetaAconC
from .timing import input_copies, median_ms, rotation, saved_bytes, warm_up

# Meta-ACON module cases (None: --batch): the Meta-ACON issue's sizes.
META_SHAPES = [(None, 256, 28, 28), (None, 2048, 7, 7), (4, 64, 8, 8)]
META_MODULES = {
    "silu": lambda width: torch.nn.SiLU(),
    "acon_c": lambda width: acon_cuda.AconC(width),
    "meta_acon_c": lambda width: acon_cuda.MetaAconC(width),
    "paper_meta_acon_c": lambda width: PaperMetaAconC(width),
}


def measure_meta_modules(device, batch, layouts, rounds, budget_s):
    """Modules in training mode, forward+backward (x and every parameter):
    MetaAconC against the fused AconC, the paper's MetaAconC and SiLU, with
    inputs rotated as in the op cases (op_cases.measure_case)."""
    rows = []
    for shape in META_SHAPES:
        shape = tuple(batch if n is None else n for n in shape)
        x_bytes = math.prod(shape) * 4
        copies = input_copies(device, x_bytes)
        for layout in layouts:
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            xs = [
                torch.randn(shape, device=device).contiguous(memory_format=fmt).requires_grad_() for _ in range(copies)
            ]
            grads = [torch.randn_like(x) for x in xs]
            torch.manual_seed(0)
            modules = {key: make(shape[1]).to(device).train() for key, make in META_MODULES.items()}

            def call_for(module):
                wrt = list(module.parameters())

                def call(i):
                    return lambda: torch.autograd.grad(module(xs[i]), [xs[i], *wrt], grads[i])

                return rotation(call, copies)

            calls = {key: call_for(module) for key, module in modules.items()}
            estimate = warm_up(calls, device, copies)
            times = {key: [] for key in calls}
            for _ in range(rounds):
                for key in calls:
                    times[key].append(median_ms(calls[key], device, budget_s, estimate[key]))
            rows.append(
                {
                    "shape": list(shape),
                    "layout": layout,
                    "ms": {key: statistics.median(samples) for key, samples in times.items()},
                    "saved_bytes": {key: saved_bytes(lambda m=m: m(xs[0]), ()) for key, m in modules.items()},
                    "x_bytes": x_bytes,
                }
            )
    return rows
