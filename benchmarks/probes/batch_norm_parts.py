"""Where the fused BatchNorm + AconC pair's time goes, pass by pass, beside
the passes of BatchNorm2d + in-place ReLU that the benchmark compares it with:

    python -m benchmarks.probes.batch_norm_parts [--shape 16,1024,14,14] [--layout channels_last]

In one run, on every thread, inputs rotated (as ``make bench`` times them),
contenders timed in interleaved blocks (``timing.interleaved_medians``):

- the fused ops: the training forward (statistics pass + element-wise
  pass), the eval forward (the element-wise pass alone; their difference is
  the statistics pass) and the training backward (sums pass + element-wise
  pass);
- ATen's BatchNorm forward and backward (training), ReLU in place and its
  backward (threshold_backward): the two-op baseline's parts;
- acon_c's forward and backward ops and SiLU's: what ACON-C's arithmetic
  costs in one pass each way, for scale;
- a copy of x (one read, one write): the memory floor of one pass.

It prints each part in ms and the sums the ratios rest on: the fused pair
(forward + backward) against BatchNorm + ReLU (forward, ReLU, ReLU's
backward, BatchNorm's backward). The pair's passes move about 9 x-sized
tensors (x read by the statistics pass, x in and y out, x and dy in and dz
out, x and dz in and dx out); BatchNorm + ReLU about 13, but without ACON's
arithmetic.
"""

import argparse

import torch

import acon_cuda

from ..timing import interleaved_medians, keep_freed_memory, rotation, warm_up

COPIES = 4  # rotated inputs


def parts(shape, layout, budget_s):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    channels = shape[1]
    xs = [torch.randn(shape).contiguous(memory_format=fmt) for _ in range(COPIES)]
    grad = torch.randn(shape).contiguous(memory_format=fmt)
    weight, bias, p1, p2, beta = (torch.randn(channels) for _ in range(5))
    running_mean, running_var = torch.zeros(channels), torch.ones(channels)
    forward = torch.ops.acon.batch_norm_acon_c_forward.default
    backward = torch.ops.acon.batch_norm_acon_c_backward.default
    _, mean, invstd = forward(xs[0], weight, bias, running_mean, running_var, p1, p2, beta, True, 0.1, 1e-5)
    relu_out = torch.relu(xs[0])

    def fused_forward(training):
        return lambda i: (
            lambda: forward(xs[i], weight, bias, running_mean, running_var, p1, p2, beta, training, 0.1, 1e-5)
        )

    calls = {
        "fused forward (train)": fused_forward(True),
        "fused forward (eval)": fused_forward(False),
        "fused backward (train)": lambda i: (
            lambda: backward(grad, xs[i], weight, bias, mean, invstd, p1, p2, beta, True, [True, True, True])
        ),
        "BatchNorm forward": lambda i: (
            lambda: torch.ops.aten.native_batch_norm(xs[i], weight, bias, running_mean, running_var, True, 0.1, 1e-5)
        ),
        "BatchNorm backward": lambda i: (
            lambda: torch.ops.aten.native_batch_norm_backward(
                grad, xs[i], weight, running_mean, running_var, mean, invstd, True, 1e-5, [True, True, True]
            )
        ),
        # In place on a fresh copy, as ReLU(inplace=True) runs on BatchNorm's output; the copy is subtracted.
        "copy + ReLU in place": lambda i: lambda: torch.relu_(xs[i].clone()),
        "ReLU backward": lambda i: lambda: torch.ops.aten.threshold_backward(grad, relu_out, 0),
        "acon_c forward": lambda i: lambda: torch.ops.acon.acon_c_forward(xs[i], p1, p2, beta, 1),
        "acon_c backward": lambda i: lambda: torch.ops.acon.acon_c_backward(grad, xs[i], p1, p2, beta, 1, [True, True]),
        "SiLU forward": lambda i: lambda: torch.nn.functional.silu(xs[i]),
        "SiLU backward": lambda i: lambda: torch.ops.aten.silu_backward(grad, xs[i]),
        "copy of x": lambda i: lambda: xs[i].clone(),
    }
    rotated = {key: rotation(make, COPIES) for key, make in calls.items()}
    estimates = warm_up(rotated, "cpu", COPIES)
    return interleaved_medians(rotated, "cpu", budget_s, estimates)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.probes.batch_norm_parts",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--shape", default="16,1024,14,14", help="x's shape (N, C, H, W)")
    parser.add_argument("--layout", default="channels_last", choices=["channels_last", "contiguous"])
    parser.add_argument("--seconds", type=float, default=6.0, help="measuring time, all parts together")
    args = parser.parse_args(argv)
    keep_freed_memory()
    shape = tuple(int(s) for s in args.shape.split(","))
    ms = parts(shape, args.layout, args.seconds)
    print(f"x {shape} {args.layout} float32, {torch.get_num_threads()} threads, kernels {acon_cuda.cpu_kernel_isa()}")
    for name, value in ms.items():
        print(f"{name:<26} {value:8.3f} ms")
    statistics_pass = ms["fused forward (train)"] - ms["fused forward (eval)"]
    fused = ms["fused forward (train)"] + ms["fused backward (train)"]
    relu = ms["copy + ReLU in place"] - ms["copy of x"]
    baseline = ms["BatchNorm forward"] + relu + ms["ReLU backward"] + ms["BatchNorm backward"]
    print(f"{'statistics pass':<26} {statistics_pass:8.3f} ms (train forward - eval forward)")
    print(f"{'fused pair, fwd+bwd':<26} {fused:8.3f} ms")
    print(f"{'BatchNorm + ReLU, fwd+bwd':<26} {baseline:8.3f} ms ({fused / baseline:.2f}x)")
    print(
        f"{'acon_c + SiLU scale':<26} acon_c fwd+bwd {ms['acon_c forward'] + ms['acon_c backward']:.3f} ms, "
        f"SiLU fwd+bwd {ms['SiLU forward'] + ms['SiLU backward']:.3f} ms"
    )
    return ms


if __name__ == "__main__":
    main()
