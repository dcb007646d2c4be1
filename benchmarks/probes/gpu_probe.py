"""GPU-only probes of the CUDA kernels, for benchmarks/gpu_check.sh.

    python -m benchmarks.probes.gpu_probe --profile OUT_DIR   per-kernel times and launches per call
    python -m benchmarks.probes.gpu_probe --sanitize          a few shapes once, for compute-sanitizer

--profile times each kernel of one forward and one backward call with
torch.profiler (after a warm-up call) and reports it beside a device copy of
x in the same run: bytes moved per microsecond, as a fraction of the copy's.
"""

import argparse
import json
import os

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

# Small shapes with many more work items than blocks, every kernel kind, for
# memcheck / racecheck / synccheck.
SANITIZE_CASES = [
    ((64, 64, 7, 7), False, True, torch.float32),
    ((4, 512, 7, 7), False, False, torch.bfloat16),
    ((8, 33, 13, 13), True, True, torch.float16),
    ((6, 96, 5, 5), True, False, torch.float32),
    ((512, 3, 8), False, False, torch.float64),
]


def make_case(shape, channels_last, per_sample, dtype):
    x = torch.randn(shape, device="cuda", dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    p1 = torch.randn(c, device="cuda")
    p2 = torch.randn(c, device="cuda")
    beta = torch.rand((shape[0], c) if per_sample else (c,), device="cuda") + 0.5
    return x, p1, p2, beta, torch.randn_like(x)


def kernel_times(fn):
    """[(kernel name, microseconds)] of one call of fn, after a warm-up."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return [(e.name, e.device_time) for e in events]


def profile(out_dir):
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
            + f" us ({row['backward_vs_copy']:.2f})"
        )
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "kernels.json"), "w") as f:
        json.dump(rows, f, indent=1)


def sanitize():
    for case in SANITIZE_CASES:
        x, p1, p2, beta, grad = make_case(*case)
        torch.ops.acon.acon_c_forward(x, p1, p2, beta, 1)
        torch.ops.acon.acon_c_backward(grad, x, p1, p2, beta, 1, [True, True])
        # An unaligned view: the element-wise kernels.
        xu = torch.randn(x.numel() + 1, device="cuda", dtype=x.dtype)[1:].view(x.shape)
        torch.ops.acon.acon_c_backward(grad.contiguous(), xu, p1, p2, beta, 1, [True, True])
    torch.cuda.synchronize()
    print("sanitize cases ran:", len(SANITIZE_CASES))


def main():
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.probes.gpu_probe",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--profile", metavar="OUT_DIR")
    parser.add_argument("--sanitize", action="store_true")
    args = parser.parse_args()
    import acon_cuda  # noqa: F401  (registers the ops)

    if args.profile:
        profile(args.profile)
    if args.sanitize:
        sanitize()


if __name__ == "__main__":
    main()
