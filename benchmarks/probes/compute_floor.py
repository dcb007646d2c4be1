"""The compute floor: what the fused ops cost per element when memory is not
the limit, against SiLU's price.

    python -m benchmarks.probes.compute_floor [--repeat 5] [--calls 300] [--isa-all]

On one thread, with every tensor small enough to stay in L2 and the same
inputs used on every call (cache-hot), times the fused forward
(``torch.ops.acon.acon_c_forward``) against ``F.silu``, and the fused
backward (``torch.ops.acon.acon_c_backward``, both parameter gradients
wanted) against ``torch.ops.aten.silu_backward``, in ns per element of x:
the best of ``--repeat`` repetitions of ``--calls`` calls each. The main
benchmark (``python -m benchmarks``) runs from memory on every thread, where
a kernel that does more arithmetic than SiLU can still match it by waiting
on the same bytes; here nothing hides that arithmetic, so the ratio to SiLU
is how far the kernels are from SiLU's price in compute alone (per-call host
costs are included: ``per_call`` measures them apart).

Cases: channels innermost ((16, 4096) and (64, 1024), channel_dim 1: one
parameter per column), and NCHW maps ((1, 1024, 8, 8), (1, 1024, 7, 7),
(1, 256, 14, 14), channel_dim 1: runs of 64, 49 and 196 elements sharing one
channel's parameters), float32.

``--isa-all`` runs the probe again in a subprocess per CPU kernel build,
under ``ATEN_CPU_CAPABILITY=avx512``, ``avx2`` and ``default``, skipping a
build that PyTorch does not run on this CPU, and prints one table per build.
"""

import argparse
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import acon_cuda

from ..report import cpu_model
from ..timing import keep_freed_memory

# (name, shape, channel_dim): channels innermost, then NCHW maps of three run lengths.
CASES = [
    ("rows C=4096", (16, 4096), 1),
    ("rows C=1024", (64, 1024), 1),
    ("NCHW run 64", (1, 1024, 8, 8), 1),
    ("NCHW run 49", (1, 1024, 7, 7), 1),
    ("NCHW run 196", (1, 256, 14, 14), 1),
]
# The builds --isa-all runs, widest first (ATEN_CPU_CAPABILITY's values).
ISAS = ("avx512", "avx2", "default")
WARMUP_CALLS = 20
# Exit status of a child of --isa-all whose build PyTorch does not run here.
SKIPPED = 3
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def best_seconds(fn, calls, repeat):
    """The best, over repeat repetitions of calls calls, of the time per call."""
    for _ in range(WARMUP_CALLS):
        fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def measure(calls, repeat):
    """ns per element of each case's four ops, on one thread (the caller's
    thread count is restored)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = []
        for name, shape, channel_dim in CASES:
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(shape, generator=gen)
            grad = torch.randn(shape, generator=gen)
            channels = shape[channel_dim]
            p1, p2 = torch.randn(channels, generator=gen), torch.randn(channels, generator=gen)
            beta = torch.rand(channels, generator=gen) + 0.5
            ops = {
                "acon fwd": lambda: torch.ops.acon.acon_c_forward(x, p1, p2, beta, channel_dim),
                "silu fwd": lambda: F.silu(x),
                "acon bwd": lambda: torch.ops.acon.acon_c_backward(grad, x, p1, p2, beta, channel_dim, [True, True]),
                "silu bwd": lambda: torch.ops.aten.silu_backward(grad, x),
            }
            ns = {op: best_seconds(fn, calls, repeat) / x.numel() * 1e9 for op, fn in ops.items()}
            rows.append({"case": name, "shape": shape, "channel_dim": channel_dim, "numel": x.numel(), "ns": ns})
        return rows
    finally:
        torch.set_num_threads(threads)


def table(rows):
    head = (
        f"{'case':<13} {'shape':<13} {'elements':>8} | {'fwd acon':>8} {'silu':>6} {'ratio':>6} | "
        f"{'bwd acon':>8} {'silu':>6} {'ratio':>6}"
    )
    lines = [head, "-" * len(head)]
    for row in rows:
        ns = row["ns"]
        lines.append(
            f"{row['case']:<13} {'x'.join(map(str, row['shape'])):<13} {row['numel']:>8} | "
            f"{ns['acon fwd']:8.3f} {ns['silu fwd']:6.3f} {ns['acon fwd'] / ns['silu fwd']:5.2f}x | "
            f"{ns['acon bwd']:8.3f} {ns['silu bwd']:6.3f} {ns['acon bwd'] / ns['silu bwd']:5.2f}x"
        )
    lines.append("ns per element of x, best of the repetitions; ratio: acon over SiLU (1.00x: SiLU's price).")
    return "\n".join(lines)


def run_each_isa(argv):
    """This probe in a subprocess per build of ISAS; the builds that ran."""
    ran = []
    for isa in ISAS:
        env = dict(os.environ, ATEN_CPU_CAPABILITY=isa)
        command = [sys.executable, "-m", "benchmarks.probes.compute_floor", *argv, "--require-capability", isa]
        sys.stdout.flush()
        done = subprocess.run(command, cwd=ROOT, env=env)
        if done.returncode == 0:
            ran.append(isa)
        elif done.returncode != SKIPPED:
            raise SystemExit(f"ATEN_CPU_CAPABILITY={isa}: the probe failed (exit status {done.returncode})")
        print()
    return ran


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.probes.compute_floor",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--repeat", type=int, default=5, help="repetitions; the best one counts (default 5)")
    parser.add_argument("--calls", type=int, default=300, help="calls per repetition (default 300)")
    parser.add_argument(
        "--isa-all",
        action="store_true",
        help="one table per CPU kernel build (ATEN_CPU_CAPABILITY=avx512, avx2, default; those this CPU runs)",
    )
    # Set by --isa-all for its children: skip (exit status SKIPPED) unless
    # PyTorch runs this build.
    parser.add_argument("--require-capability", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.calls < 1:
        parser.error("--repeat and --calls must be positive")
    if args.isa_all:
        return run_each_isa(["--repeat", str(args.repeat), "--calls", str(args.calls)])

    capability = torch.backends.cpu.get_cpu_capability()
    forced = os.environ.get("ATEN_CPU_CAPABILITY")
    forced = f"ATEN_CPU_CAPABILITY={forced}" if forced else "ATEN_CPU_CAPABILITY not set"
    title = (
        f"CPU {cpu_model() or 'unknown'}; CPU kernels {acon_cuda.cpu_kernel_isa()} (ATen CPU capability "
        f"{capability}, {forced}); torch {torch.__version__}; 1 thread, cache-hot"
    )
    if args.require_capability and capability != args.require_capability.upper():
        print(f"{title}\nskipped: ATEN_CPU_CAPABILITY={args.require_capability} does not run here")
        sys.exit(SKIPPED)
    keep_freed_memory()  # no page faults on the outputs' allocations
    rows = measure(args.calls, args.repeat)
    print(title)
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
