"""GPU-only probes of the CUDA kernels, for benchmarks/gpu_check.sh.

    python -m benchmarks.probes.gpu_probe --profile OUT_DIR   per-kernel times and launches per call
    python -m benchmarks.probes.gpu_probe --sanitize          every kernel variant once, for compute-sanitizer
    python -m benchmarks.probes.gpu_probe --list              the sanitize cases (and their launch plans, CUDA builds)
    python -m benchmarks.probes.gpu_probe --sanitize --device emulated   the same calls, CUDA code emulated on the CPU

--profile times each kernel of one forward and one backward call with
torch.profiler (after a warm-up call) and reports it beside a device copy of
x in the same run: bytes moved per microsecond, as a fraction of the copy's.
It also writes sanitize_kernels.txt: the distinct kernels the --sanitize
cases launch, so a run shows which variants the sanitizer saw.

--sanitize calls the public ops (torch.ops.acon.acon_c_forward / _backward)
on small shapes that reach every main kernel variant (runs: vector, ragged,
element-wise, lines cut into chunks; columns: vector, element-wise, the
widest tile), every dtype, both kinds of beta and every backward output
mask, so that the reduce runs with per-channel and per-sample sums, and
blocks that take several items in turn. Sizes stay small: compute-sanitizer
makes the instrumented kernels 10-100 times slower.
"""

import argparse
import json
import os
from typing import NamedTuple, Optional

import torch

# (logical shape, channels_last, per-sample beta, dtype): shapes whose launch
# plans were reviewed (benchmarks/probes/cuda_plan.py).
PROFILE_CASES = [
    ((32, 256, 56, 56), False, False, torch.float32),
    ((32, 256, 56, 56), True, False, torch.float32),
    ((32, 256, 56, 56), True, False, torch.bfloat16),
    ((16, 2048, 7, 7), False, True, torch.float32),
    ((16, 2048, 7, 7), True, True, torch.bfloat16),
    ((64, 64, 7, 7), False, True, torch.float32),
    ((1, 64, 512, 512), False, False, torch.float32),
]

ALL_GRADS = (True, True)
ONLY_GRAD_X = (True, False)
ONLY_PARAM_GRADS = (False, True)
EVERY_MASK = (ALL_GRADS, ONLY_GRAD_X, ONLY_PARAM_GRADS)


class SanitizeCase(NamedTuple):
    name: str
    shape: tuple
    layout: str  # "contiguous", "channels_last" (4-D), or "features_last" (channels on the last dim)
    dtype: torch.dtype
    per_sample: bool = False  # beta of shape (N, C), else (C,)
    unaligned: bool = False  # x and grad_y start one element into their storage
    masks: tuple = (ALL_GRADS,)  # the backward's output_masks
    kind: Optional[str] = None  # the main kernel it must reach: "runs" or "columns" (see launch_kinds)
    turns: bool = False  # more items than a grid of resident blocks takes at once (loops, reused shared memory)


# Runs: channels not innermost (inner > 1), each (sample, channel) line a
# run. Columns: channels innermost. Vector widths are 16 bytes (8 in the
# 16-bit backward); "ragged" runs have a length that is not a multiple of it.
SANITIZE_CASES = [
    SanitizeCase("runs, vector, float32", (4, 64, 8, 8), "contiguous", torch.float32, masks=EVERY_MASK, kind="runs"),
    # x's bytes not a multiple of 16: the last run's last window ends inside x.
    SanitizeCase("runs, ragged 7x7, per-sample beta", (5, 6, 7, 7), "contiguous", torch.float32, True, kind="runs"),
    SanitizeCase("runs, ragged 7x7, bfloat16", (3, 10, 7, 7), "contiguous", torch.bfloat16, kind="runs"),
    SanitizeCase("runs, element-wise (run of 5), float16", (32, 16, 5), "contiguous", torch.float16, kind="runs"),
    SanitizeCase(
        "runs, element-wise (unaligned view)", (4, 64, 8, 8), "contiguous", torch.float32, unaligned=True, kind="runs"
    ),
    SanitizeCase(
        "runs, lines cut into chunks", (2, 16, 256, 256), "contiguous", torch.float32, masks=EVERY_MASK, kind="runs"
    ),
    SanitizeCase("runs, vector, float64", (64, 3, 8), "contiguous", torch.float64, True, kind="runs"),
    SanitizeCase(
        "runs, several turns, per-sample beta",
        (256, 160, 7, 7),
        "contiguous",
        torch.float32,
        True,
        kind="runs",
        turns=True,
    ),
    SanitizeCase(
        "columns, 16-bit vector, bfloat16",
        (8, 64, 7, 7),
        "channels_last",
        torch.bfloat16,
        masks=EVERY_MASK,
        kind="columns",
    ),
    SanitizeCase(
        "columns, 16-bit vector, float16, per-sample beta",
        (8, 64, 7, 7),
        "channels_last",
        torch.float16,
        True,
        kind="columns",
    ),
    SanitizeCase(
        "columns, widest tile (C = 2048), per-sample beta",
        (16, 2048, 7, 7),
        "channels_last",
        torch.bfloat16,
        True,
        masks=EVERY_MASK,
        kind="columns",
    ),
    SanitizeCase(
        "columns, widest tile (C = 1024), float32", (8, 1024, 7, 7), "channels_last", torch.float32, kind="columns"
    ),
    SanitizeCase("columns, element-wise (C = 33)", (4, 33, 5, 5), "channels_last", torch.float16, kind="columns"),
    SanitizeCase(
        "columns, element-wise (unaligned view)",
        (4, 64, 5, 5),
        "channels_last",
        torch.float32,
        True,
        True,
        kind="columns",
    ),
    SanitizeCase(
        "columns, features last, per-sample beta", (8, 96, 197), "features_last", torch.float32, True, kind="columns"
    ),
    SanitizeCase("columns, (N, C), per-sample beta", (64, 512), "contiguous", torch.float32, True, kind="columns"),
    SanitizeCase("columns, vector, float64", (4, 24, 5, 5), "channels_last", torch.float64, True, kind="columns"),
    SanitizeCase(
        "columns, several turns, per-sample beta",
        (2048, 64, 2, 2),
        "channels_last",
        torch.bfloat16,
        True,
        masks=EVERY_MASK,
        kind="columns",
        turns=True,
    ),
]


def channel_dim(case):
    return -1 if case.layout == "features_last" else 1


def physical_shape(case):
    """The shape of x as stored, channels innermost for channels_last and
    features_last."""
    if case.layout == "contiguous":
        return tuple(case.shape)
    n, c, *rest = case.shape
    return (n, *rest, c)


def make_x(case, device, generator):
    """x of the case's logical shape and layout; for an unaligned case a view
    one element into a larger storage (so no vector load is aligned). Made on
    the CPU and copied: on the GPU only this project's kernels run, and
    initcheck sees every input byte written (by the copy)."""
    stored = physical_shape(case)
    numel = 1
    for s in stored:
        numel *= s
    offset = 1 if case.unaligned else 0
    flat = torch.randn(numel + offset, generator=generator).to(case.dtype).to(device)
    x = flat[offset:].view(stored)
    if case.layout == "channels_last":
        x = x.permute(0, x.dim() - 1, *range(1, x.dim() - 1))  # back to (N, C, H, W), channels_last strides
    return x


def make_sanitize_case(case, device):
    """x, p1, p2, beta, grad_y; the parameters in the kernels' opmath dtype,
    so that no conversion kernel runs."""
    g = torch.Generator().manual_seed(0)
    x = make_x(case, device, g)
    grad = make_x(case, device, g)
    c = x.shape[channel_dim(case)]
    opmath = torch.float64 if case.dtype == torch.float64 else torch.float32
    p1 = torch.randn(c, generator=g, dtype=opmath).to(device)
    p2 = torch.randn(c, generator=g, dtype=opmath).to(device)
    beta = (torch.rand((x.shape[0], c) if case.per_sample else (c,), generator=g, dtype=opmath) + 0.5).to(device)
    return x, p1, p2, beta, grad


# The GPU an emulated run plans for: an H200's multiprocessors, 3 blocks each.
EMULATED_GPU = (132, 3)


def run_case(case, device):
    """The case's forward and backwards: through the public ops on `device`
    ("cuda" or "cpu"), or ("emulated") through the CUDA code's CPU emulation
    (torch.ops.acon._acon_c_*_cuda_emulated, CUDA builds), on CPU tensors."""
    x, p1, p2, beta, grad = make_sanitize_case(case, "cpu" if device == "emulated" else device)
    cdim = channel_dim(case)
    if device == "emulated":
        torch.ops.acon._acon_c_forward_cuda_emulated(x, p1, p2, beta, cdim, *EMULATED_GPU)
        for mask in case.masks:
            torch.ops.acon._acon_c_backward_cuda_emulated(grad, x, p1, p2, beta, cdim, *EMULATED_GPU, list(mask))
        return
    torch.ops.acon.acon_c_forward(x, p1, p2, beta, cdim)
    for mask in case.masks:
        torch.ops.acon.acon_c_backward(grad, x, p1, p2, beta, cdim, list(mask))


def sanitize(device="cuda"):
    from acon_cuda.testing import has_cuda_test_hooks

    if device == "cuda" and not torch._C._dispatch_has_kernel_for_dispatch_key("acon::acon_c_forward", "CUDA"):
        raise SystemExit("this build of acon_cuda has no CUDA kernels")
    if device == "emulated" and not has_cuda_test_hooks():
        raise SystemExit("this build has no CUDA emulation (a CPU-only build)")
    for case in SANITIZE_CASES:
        run_case(case, device)
        if device == "cuda":
            torch.cuda.synchronize()  # a fault is reported at the case that made it
        print("ran:", case.name, flush=True)
    print("sanitize cases ran:", len(SANITIZE_CASES), "on", device, flush=True)


def launch_kinds(case, backward, gpu=EMULATED_GPU):
    """The kinds of the kernels one call launches, from the launch-plan hook
    (CUDA builds; CPU tensors, no GPU): "runs" or "columns" for the main
    kernel, then "reduce" for a backward's reduce."""
    x, _, _, beta, _ = make_sanitize_case(case, "cpu")
    flat = torch.ops.acon._acon_c_cuda_launch_plan(x, beta, channel_dim(case), backward, *gpu)
    # The first number is the main kernel's kind; the reduce follows it.
    return ["runs", "columns", "reduce"][flat[0]], flat


def list_cases():
    from acon_cuda.testing import has_cuda_test_hooks

    hooks = has_cuda_test_hooks()
    for case in SANITIZE_CASES:
        line = (
            f"{case.name:52} {'x'.join(map(str, case.shape)):>14} {case.layout:14} "
            f"{str(case.dtype).replace('torch.', ''):8} beta {'(N, C)' if case.per_sample else '(C,)  '} "
            f"masks {','.join(''.join('TF'[not m] for m in mask) for mask in case.masks)}"
        )
        if hooks:
            # The main kernel's kind, grid and work items (the plan's numbers 0, 1 and 3).
            plans = [launch_kinds(case, backward) for backward in (False, True)]
            line += " | " + ", ".join(
                f"{direction} {kind} ({flat[1]} blocks, {flat[3]} items)"
                for direction, (kind, flat) in zip(["forward", "backward"], plans)
            )
        print(line)
    if not hooks:
        print("(no launch plans: this build has no CUDA kernels)")


def make_case(shape, channels_last, per_sample, dtype):
    x = torch.randn(shape, device="cuda", dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    p1 = torch.randn(c, device="cuda")
    p2 = torch.randn(c, device="cuda")
    beta = torch.rand((shape[0], c) if per_sample else (c,), device="cuda") + 0.5
    return x, p1, p2, beta, torch.randn_like(x)


def kernel_events(fn):
    """The CUDA kernel events of one call of fn, after a warm-up."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def kernel_times(fn):
    """[(kernel name, microseconds)] of one call of fn, after a warm-up."""
    return [(e.name, e.device_time) for e in kernel_events(fn)]


def sanitize_kernels(out_dir):
    """The distinct acon kernels the sanitize cases launch, to
    OUT_DIR/sanitize_kernels.txt."""

    def all_cases():
        for case in SANITIZE_CASES:
            run_case(case, "cuda")

    names = sorted({e.name for e in kernel_events(all_cases) if "acon" in e.name})
    with open(os.path.join(out_dir, "sanitize_kernels.txt"), "w") as f:
        f.write("\n".join(names) + "\n")
    print(f"the sanitize cases launch {len(names)} distinct acon kernels (sanitize_kernels.txt)")


def profile(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    rows = []
    for shape, channels_last, per_sample, dtype in PROFILE_CASES:
        x, p1, p2, beta, grad = make_case(shape, channels_last, per_sample, dtype)
        nbytes = x.numel() * x.element_size()
        copy = sum(t for _, t in kernel_times(lambda: x.clone()))
        fwd = kernel_times(lambda: torch.ops.acon.acon_c_forward(x, p1, p2, beta, 1))
        bwd = kernel_times(lambda: torch.ops.acon.acon_c_backward(grad, x, p1, p2, beta, 1, [True, True]))
        row = {
            "shape": list(shape),
            "channels_last": channels_last,
            "per_sample_beta": per_sample,
            "dtype": str(dtype).replace("torch.", ""),
            "copy_us": copy,
            "forward": fwd,
            "backward": bwd,
            # Bytes moved (x + y; x + dy + dx) per microsecond, over the copy's (2 * x).
            "forward_vs_copy": (2 * nbytes / sum(t for _, t in fwd)) / (2 * nbytes / copy),
            "backward_vs_copy": (3 * nbytes / sum(t for _, t in bwd)) / (2 * nbytes / copy),
        }
        rows.append(row)
        print(
            f"{'x'.join(map(str, shape)):>16} {'NHWC' if channels_last else 'NCHW'} "
            f"{'per-sample' if per_sample else 'per-channel'} {row['dtype']:>8}: "
            f"copy {copy:7.1f} us | fwd {len(fwd)} kernel(s) "
            + " + ".join(f"{t:.1f}" for _, t in fwd)
            + f" us ({row['forward_vs_copy']:.2f} of copy bandwidth) | bwd {len(bwd)} kernel(s) "
            + " + ".join(f"{t:.1f}" for _, t in bwd)
            + f" us ({row['backward_vs_copy']:.2f})",
            flush=True,
        )
        # Written after every case: a run stopped at its time limit keeps them.
        with open(os.path.join(out_dir, "kernels.json"), "w") as f:
            json.dump(rows, f, indent=1)
    sanitize_kernels(out_dir)


def main():
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.probes.gpu_probe",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--profile", metavar="OUT_DIR", help="time each kernel; kernels.json in OUT_DIR")
    parser.add_argument("--sanitize", action="store_true", help="run every sanitize case once")
    parser.add_argument("--list", action="store_true", help="print the sanitize cases (no GPU needed)")
    parser.add_argument(
        "--device",
        default="cuda",
        choices=["cuda", "cpu", "emulated"],
        help="where --sanitize runs: cuda; dry runs: cpu (the CPU kernels), emulated (the CUDA code on the CPU)",
    )
    args = parser.parse_args()
    if not (args.profile or args.sanitize or args.list):
        parser.error("nothing to do: give --profile, --sanitize or --list")
    import acon_cuda  # noqa: F401  (registers the ops)

    if args.list:
        list_cases()
    if args.profile:
        profile(args.profile)
    if args.sanitize:
        sanitize(args.device)


if __name__ == "__main__":
    main()
