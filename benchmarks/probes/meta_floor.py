"""What Meta-ACON must cost beyond ACON-C, part by part, in one run.

``python -m benchmarks.probes.meta_floor [--shape 16x2048x7x7] [--layout contiguous]``
times, with x rotated through enough copies to overflow the caches (as the
module cases of ``python -m benchmarks`` do), in training mode:

- the fused ``AconC`` module, forward+backward (x and its parameters): the
  baseline of the Meta-ACON issue's "at most 1.5x AconC";
- ``MetaAconC``, the same;
- and the parts any Meta-ACON adds, each with ATen's ops: the activation with
  an (N, C) beta (``acon_c``, beta's gradient wanted), the mean of x over
  its map (one read of x), the mean's gradient added into dx (one in-place
  pass over an x-sized tensor), and the generator's six matrix products (two
  forward; fc2's and fc1's weight and input gradients backward), with their
  weights in cache, and again with them cold (rotated, as x is).

The floor is the sum of those parts (products with their weights in cache)
over AconC's time: no MetaAconC can be cheaper without doing one of them
faster than ATen (or than our own acon op) does it. What MetaAconC costs
above the floor is its BatchNorms, sigmoid, bias sums, host work (the
Python module, the op call, autograd) and weights read from memory; its own
products are split over the threads (csrc/meta_acon_c.cpp: ``product``),
which ATen's plain calls here are not.
"""

import argparse
import itertools
import math
import statistics

import torch

import acon_cuda

from ..timing import CACHE_BYTES, keep_freed_memory, median_ms, wall_ms

# The parts whose sum is the floor (names of `parts`).
FLOOR_PARTS = ["acon_c, (N, C) beta", "mean of x", "dx += mean's gradient", "6 generator products"]


def rotation(calls):
    cycle = itertools.cycle(calls)
    return lambda: next(cycle)()


def parts(shape, layout):
    """name -> a call that runs one part (or module) on the next copy."""
    n, c = shape[0], shape[1]
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    copies = max(1, min(32, math.ceil(CACHE_BYTES["cpu"] / (math.prod(shape) * 4))))
    xs = [torch.randn(shape).contiguous(memory_format=fmt).requires_grad_() for _ in range(copies)]
    dys = [torch.randn_like(x) for x in xs]
    meta = acon_cuda.MetaAconC(c).train()
    acon = acon_cuda.AconC(c).train()
    hidden = meta.fc1.out_channels
    # The generator's weights: one set (in cache at each call: the floor's
    # most favourable case), and a rotation like x's (from memory: in the
    # module, x's tensors stream through the caches between two uses).
    weights = [
        (torch.randn(hidden, c), torch.randn(hidden), torch.randn(c, hidden), torch.randn(c)) for _ in range(copies)
    ]
    p1, p2 = (torch.randn(c, requires_grad=True) for _ in range(2))
    betas = [torch.rand(n, c, requires_grad=True) for _ in range(copies)]
    mean, g = torch.randn(n, c), torch.randn(n, c)
    h, dh = torch.randn(n, hidden), torch.randn(n, hidden)
    axes = [i for i in range(2, len(shape))]
    term = torch.randn(n, c).view(n, c, *[1] * len(axes))
    meta_params, acon_params = list(meta.parameters()), list(acon.parameters())

    def products(w1, b1, w2, b2):
        torch.addmm(b1, mean, w1.t())  # fc1
        torch.addmm(b2, h, w2.t())  # fc2
        torch.mm(g.t(), h)  # fc2's weight gradient
        torch.mm(g, w2)  # fc2's input gradient
        torch.mm(dh.t(), mean)  # fc1's weight gradient
        torch.mm(dh, w1)  # the mean's gradient

    def module(m, params):
        return [lambda i=i: torch.autograd.grad(m(xs[i]), [xs[i], *params], dys[i]) for i in range(copies)]

    return {
        "AconC module": rotation(module(acon, acon_params)),
        "MetaAconC module": rotation(module(meta, meta_params)),
        "acon_c, (N, C) beta": rotation(
            [
                lambda i=i: torch.autograd.grad(
                    acon_cuda.acon_c(xs[i], p1, p2, betas[i]), [xs[i], p1, p2, betas[i]], dys[i]
                )
                for i in range(copies)
            ]
        ),
        "mean of x": rotation([lambda i=i: xs[i].detach().mean(axes) for i in range(copies)]),
        # Into the modules' dy copies (any x-sized tensor will do), scaled to
        # leave them as they are.
        "dx += mean's gradient": rotation([lambda i=i: dys[i].add_(term, alpha=1e-30) for i in range(copies)]),
        "6 generator products": lambda: products(*weights[0]),
        "(the same, weights cold)": rotation([lambda w=w: products(*w) for w in weights]),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.probes.meta_floor", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--shape", default="16x2048x7x7", help="N x C x map axes (default 16x2048x7x7)")
    parser.add_argument("--layout", default="contiguous", choices=["contiguous", "channels_last"])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--seconds", type=float, default=1.0, help="time per part and round (default 1)")
    args = parser.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split("x"))
    if len(shape) < 3 or min(shape) < 1:
        parser.error("--shape must be N x C x a map of one or more axes, each at least 1 (such as 16x2048x7x7)")
    keep_freed_memory()
    calls = parts(shape, args.layout)
    estimate = {}
    for name, call in calls.items():
        for _ in range(3):
            estimate[name] = wall_ms(call, "cpu")
    times = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, call in calls.items():
            times[name].append(median_ms(call, "cpu", args.seconds, estimate[name]))
    ms = {name: statistics.median(t) for name, t in times.items()}
    base = ms["AconC module"]
    print(f"{args.shape} {args.layout}, float32, {torch.get_num_threads()} threads, training mode, fwd+bwd")
    for name, t in ms.items():
        print(f"  {name:<24} {t:8.3f} ms  {t / base:5.2f}x AconC")
    floor = sum(ms[name] for name in FLOOR_PARTS)
    print(f"  {'floor (sum of the parts)':<24} {floor:8.3f} ms  {floor / base:5.2f}x AconC")
    print(f"  {'MetaAconC above floor':<24} {ms['MetaAconC module'] - floor:8.3f} ms")
    return ms


if __name__ == "__main__":
    main()
