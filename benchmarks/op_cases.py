"""The op cases: the fused acon_c against the paper's code, the plain-PyTorch
reference, torch.compile of the reference, F.silu and a copy of x, forward,
backward (from the forward's saved state) and forward+backward, on the
sizes of SIZES.
"""

import math
import time

import torch
import torch.nn.functional as F

import acon_cuda
from acon_cuda import reference

from .paper import paper_acon_c
from .timing import input_copies, interleaved_medians, rotation, saved_bytes, warm_up

MODES = ["forward", "backward", "fwd+bwd"]
# x-sized tensors each mode must move at least (read x, write y; read x and
# dy, write dx), and beta-sized ones (read beta; read beta, write its
# gradient), which count where beta is per sample: the bytes behind the
# GB/s figures.
TRAFFIC = {"forward": 2, "backward": 3, "fwd+bwd": 5}
BETA_TRAFFIC = {"forward": 1, "backward": 2, "fwd+bwd": 3}

# name -> (shape, channel_dim, per-sample beta); None is the batch (--batch:
# 32 on CUDA; 16 on the CPU, where 2 cores would take over 4 minutes at 32).
# ResNet-50's stage outputs, a tensor small enough that launch overhead
# dominates, (N, C) and (B, T, C) features, Meta-ACON's per-sample beta, and
# (GPU only) one above 256 MB in float32 and bfloat16.
SIZES = {
    "stage1": ((None, 256, 56, 56), 1, False),
    "stage2": ((None, 512, 28, 28), 1, False),
    "stage3": ((None, 1024, 14, 14), 1, False),
    "stage4": ((None, 2048, 7, 7), 1, False),
    "small": ((4, 64, 8, 8), 1, False),
    "features": ((256, 4096), 1, False),
    # Meta-ACON on features, (N, C) beta: not a default case; compare it
    # with "features" (--sizes features,meta-feat).
    "meta-feat": ((256, 4096), 1, True),
    "tokens": ((32, 197, 768), -1, False),
    "meta-acon": ((None, 256, 28, 28), 1, True),
    "large": ((64, 256, 112, 112), 1, False),
}
DEFAULT_BATCH = {"cpu": 16, "cuda": 32}
DEFAULT_SIZES = {
    "cpu": ["stage1", "stage2", "stage3", "stage4", "small", "features", "tokens", "meta-acon"],
    "cuda": ["large", "stage1", "stage2", "stage3", "stage4", "small", "features", "tokens", "meta-acon"],
}
QUICK_SIZES = ["small", "tokens"]


def silu(x, p1, p2, beta, channel_dim):
    return F.silu(x)


def make_inputs(shape, channel_dim, layout, per_sample, dtype, device):
    x = torch.randn(shape, dtype=dtype, device=device)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    channels = shape[channel_dim]
    p1 = torch.randn(channels, device=device)
    p2 = torch.randn(channels, device=device)
    beta = torch.rand(shape[0], channels, device=device) + 0.5 if per_sample else torch.ones(channels, device=device)
    return x, p1, p2, beta


def measure_case(name, layout, dtype, device, rounds, budget_s, batch):
    shape, channel_dim, per_sample = SIZES[name]
    shape = tuple(batch if n is None else n for n in shape)
    x_bytes = math.prod(shape) * dtype.itemsize
    copies = input_copies(device, x_bytes)
    sets = [make_inputs(shape, channel_dim, layout, per_sample, dtype, device) for _ in range(copies)]
    grads = [torch.randn_like(s[0]) for s in sets]
    leaves = [[t.clone().requires_grad_() for t in s] for s in sets]

    torch._dynamo.reset()  # each case compiles afresh, within the recompile limit
    compiled = torch.compile(reference.acon_c)
    contenders = {
        "fused": acon_cuda.acon_c,
        "paper": paper_acon_c,
        "reference": reference.acon_c,
        "compiled": compiled,
        "silu": silu,
    }
    # Compile (inference graph, forward and backward graphs) before timing.
    start = time.perf_counter()
    with torch.no_grad():
        compiled(*sets[0], channel_dim)
    torch.autograd.grad(compiled(*leaves[0], channel_dim), leaves[0], grads[0])
    if device == "cuda":
        torch.cuda.synchronize()
    compile_s = time.perf_counter() - start

    def calls_for(fn):
        # SiLU has no parameters: its backward reaches x only.
        def wrt(i):
            return leaves[i][:1] if fn is silu else leaves[i]

        outputs = [fn(*leaves[i], channel_dim) for i in range(copies)]

        def forward(i):
            def call():
                with torch.no_grad():
                    fn(*sets[i], channel_dim)

            return call

        def backward(i):
            return lambda: torch.autograd.grad(outputs[i], wrt(i), grads[i], retain_graph=True)

        def both(i):
            return lambda: torch.autograd.grad(fn(*leaves[i], channel_dim), wrt(i), grads[i])

        return {
            "forward": rotation(forward, copies),
            "backward": rotation(backward, copies),
            "fwd+bwd": rotation(both, copies),
        }

    calls = {key: calls_for(fn) for key, fn in contenders.items()}
    buffers = [torch.empty_like(s[0]) for s in sets]
    calls["copy"] = {"forward": rotation(lambda i: lambda: buffers[i].copy_(sets[i][0]), copies)}

    flat = {(key, mode): call for key, per_mode in calls.items() for mode, call in per_mode.items()}
    estimate = warm_up(flat, device, copies)
    # Per mode, the contenders' blocks in turn (as in batch_norm_pairs): a
    # change of the machine's speed then hits the fused op and the
    # baselines it is reported against alike. Timed one contender and mode
    # after another, the fused op's and SiLU's figures came from moments up
    # to a second apart, and on the shared 2-core VM their ratio moved by
    # 0.2-0.3 from run to run. Each contender is timed for `rounds` budgets,
    # in 5 * rounds blocks.
    ms = {key: {} for key in calls}
    for mode in MODES:
        per_call = {key: per_mode[mode] for key, per_mode in calls.items() if mode in per_mode}
        medians = interleaved_medians(
            per_call, device, rounds * budget_s, {key: estimate[(key, mode)] for key in per_call}, blocks=5 * rounds
        )
        for key, value in medians.items():
            ms[key][mode] = value

    beta_bytes = sets[0][3].nbytes
    moved = {mode: TRAFFIC[mode] * x_bytes + BETA_TRAFFIC[mode] * beta_bytes for mode in MODES}
    result = {
        "case": name,
        "shape": list(shape),
        "channel_dim": channel_dim,
        "layout": layout,
        "per_sample_beta": per_sample,
        "dtype": str(dtype).replace("torch.", ""),
        "x_bytes": x_bytes,
        "beta_bytes": beta_bytes,
        "input_copies": copies,
        "compile_s": compile_s,
        "ms": ms,
        "gbps": {
            key: {mode: moved[mode] / (t * 1e6) for mode, t in per_mode.items()}
            for key, per_mode in ms.items()
            if key != "copy"
        },
        "copy_gbps": TRAFFIC["forward"] * x_bytes / (ms["copy"]["forward"] * 1e6),
        "saved_bytes": {key: saved_bytes(fn, (*leaves[0], channel_dim)) for key, fn in contenders.items()},
    }
    if device == "cuda":
        result["peak_bytes"] = {
            key: cuda_peak_bytes(fn, leaves[0], grads[0], channel_dim) for key, fn in contenders.items()
        }
    return result


def cuda_peak_bytes(fn, leaves, grad, channel_dim):
    """Peak CUDA memory of one forward+backward, above what was allocated before."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    wrt = leaves[:1] if fn is silu else leaves
    torch.autograd.grad(fn(*leaves, channel_dim), wrt, grad)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base
