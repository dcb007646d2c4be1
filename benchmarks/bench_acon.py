"""Fused ACON-C against its plain-PyTorch reference, torch.compile of the
reference, and F.silu (one transcendental per element: the floor for this kind
of op), for forward, backward and forward+backward.

Every figure is a ratio or a median time measured in this run; contenders are
measured in interleaved rounds so that a noisy neighbour hurts all of them.
"""

import argparse
import ctypes
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.utils import benchmark

import acon_cuda
from acon_cuda import reference

# (name, shape, channel_dim, memory_format, per_sample_beta)
CASES = [
    ("resnet stage1 NCHW", (32, 64, 56, 56), 1, torch.contiguous_format, False),
    ("resnet stage1 NHWC", (32, 64, 56, 56), 1, torch.channels_last, False),
    ("resnet stage3 NCHW", (32, 256, 14, 14), 1, torch.contiguous_format, False),
    ("meta-acon NCHW", (32, 256, 14, 14), 1, torch.contiguous_format, True),
    ("features (N, C)", (256, 1024), 1, torch.contiguous_format, False),
    ("tokens (B, T, C)", (8, 196, 768), -1, torch.contiguous_format, False),
]
QUICK_CASES = [
    ("small NCHW", (8, 32, 28, 28), 1, torch.contiguous_format, False),
    ("small NHWC", (8, 32, 28, 28), 1, torch.channels_last, False),
]


def make_inputs(shape, channel_dim, memory_format, per_sample, dtype):
    x = torch.randn(shape, dtype=dtype).contiguous(memory_format=memory_format)
    channels = shape[channel_dim]
    p1 = torch.randn(1, channels, 1, 1)
    p2 = torch.randn(1, channels, 1, 1)
    beta = torch.rand(shape[0], channels) + 0.5 if per_sample else torch.ones(1, channels, 1, 1)
    return x, p1, p2, beta


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory instead of returning it to the
    system. By default, large blocks go back to the kernel on free and are
    faulted in again page by page on the next allocation, which then costs
    more than the kernels themselves, by an amount that depends on the order
    of earlier allocations. That is noise, and it hits the composite reference
    (many temporaries) hardest, so this setting is the conservative one for
    the fused op's speedups. Same effect as running under jemalloc/tcmalloc.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 1 << 30))


def silu(x, p1, p2, beta, channel_dim):
    return F.silu(x)


def saved_bytes(fn, inputs):
    """Bytes autograd keeps for backward (distinct storages, as packed)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(seen.values())


def median_ms(stmt, env, min_run_time):
    timer = benchmark.Timer(stmt=stmt, globals=env)
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def measure_case(case, dtype, rounds, min_run_time):
    name, shape, channel_dim, memory_format, per_sample = case
    x, p1, p2, beta = make_inputs(shape, channel_dim, memory_format, per_sample, dtype)
    torch._dynamo.reset()  # each case compiles afresh, within the recompile limit
    compiled = torch.compile(reference.acon_c)
    contenders = {
        "fused": acon_cuda.acon_c,
        "reference": reference.acon_c,
        "compiled ref": compiled,
        "F.silu": silu,
    }
    leaves = [t.clone().requires_grad_() for t in (x, p1, p2, beta)]
    grad = torch.randn_like(x)

    # Compile (inference graph, and forward and backward graphs) outside the
    # timed region; its time is reported on its own.
    start = time.perf_counter()
    compiled(x, p1, p2, beta, channel_dim)
    torch.autograd.grad(compiled(*leaves, channel_dim), leaves, grad)
    compile_s = time.perf_counter() - start

    envs = {}
    for key, fn in contenders.items():
        env = {"fn": fn, "leaves": leaves, "grad": grad, "cd": channel_dim, "torch": torch}
        env["inputs"] = [x, p1, p2, beta]
        env["y"] = fn(*leaves, channel_dim)
        # SiLU has no parameters: its backward reaches x only.
        env["wrt"] = leaves[:1] if fn is silu else leaves
        envs[key] = env
    stmts = {
        "forward": "fn(*inputs, cd)",
        "backward": "torch.autograd.grad(y, wrt, grad, retain_graph=True)",
        "fwd+bwd": "torch.autograd.grad(fn(*leaves, cd), wrt, grad)",
    }
    for mode, stmt in stmts.items():  # warm-up: nothing lazy is timed
        for key in contenders:
            for _ in range(2):
                exec(stmt, envs[key])
    times = {(k, m): [] for k in contenders for m in stmts}
    for _ in range(rounds):
        for mode, stmt in stmts.items():
            for key in contenders:
                times[(key, mode)].append(median_ms(stmt, envs[key], min_run_time))
    result = {
        "case": name,
        "shape": list(shape),
        "channel_dim": channel_dim,
        "layout": "channels_last" if memory_format == torch.channels_last else "contiguous",
        "per_sample_beta": per_sample,
        "dtype": str(dtype).replace("torch.", ""),
        "compile_s": compile_s,
        "ms": {f"{k}/{m}": statistics.median(v) for (k, m), v in times.items()},
        "saved_bytes": {
            k: saved_bytes(fn, (*leaves, channel_dim)) for k, fn in contenders.items()
        },
        "x_bytes": x.numel() * x.element_size(),
    }
    return result


def print_table(results):
    modes = ["forward", "backward", "fwd+bwd"]
    head = f"{'case':<20} {'dtype':<8} {'mode':<9} {'fused ms':>9} {'vs ref':>7} {'vs compiled':>11} {'/ silu':>7} {'saved/x':>8}"
    print(head)
    print("-" * len(head))
    for r in results:
        for mode in modes:
            ms = r["ms"]
            fused = ms[f"fused/{mode}"]
            saved = r["saved_bytes"]["fused"] / r["x_bytes"]
            print(
                f"{r['case']:<20} {r['dtype']:<8} {mode:<9} {fused:9.3f} "
                f"{ms[f'reference/{mode}'] / fused:6.2f}x {ms[f'compiled ref/{mode}'] / fused:10.2f}x "
                f"{fused / ms[f'F.silu/{mode}']:6.2f}x {saved:8.2f}"
            )
    print(
        "\nvs ref / vs compiled: speedup of the fused op over the eager reference and "
        "torch.compile(reference) (higher is better).\n/ silu: fused time over F.silu's "
        "(lower is better; SiLU is the floor).\nsaved/x: bytes kept for backward by the fused "
        "op over x's bytes (x itself is kept; parameters are tiny)."
    )


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small tensors, one round")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per case")
    parser.add_argument(
        "--system-malloc", action="store_true",
        help="leave glibc's malloc as it is (page faults on every large allocation)",
    )
    args = parser.parse_args(argv)
    kept = False if args.system_malloc else keep_freed_memory()
    dtype = getattr(torch, args.dtype)
    cases = QUICK_CASES if args.quick else CASES
    rounds = 1 if args.quick else args.rounds
    min_run_time = 0.05 if args.quick else 0.2
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU kernels: "
        f"{acon_cuda.cpu_kernel_isa()}, malloc keeps freed memory: {kept}",
        file=sys.stderr,
    )
    results = []
    for i, case in enumerate(cases):
        print(f"[{i + 1}/{len(cases)}] {case[0]} {case[1]}", file=sys.stderr, flush=True)
        results.append(measure_case(case, dtype, rounds, min_run_time))
    print_table(results)
    compile_s = ", ".join(f"{r['case']} {r['compile_s']:.1f} s" for r in results)
    print(f"torch.compile time of the reference (not in the timings): {compile_s}")
    return results
